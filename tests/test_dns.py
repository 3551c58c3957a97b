"""Name resolution without a thread pool (issue 10, item 2): DnsResolver, --dns.server,
dns_timeout apart from dns_error, and dead names that do not stall other probes.

DNS servers here are all on loopback: real NSD + Unbound (tests/support/dns.py) for
definite answers and validation, and a scripted server (tests/support/fakedns.py) for a
name that is never answered. No test lets a resolver read the system's resolv.conf: the
system-configuration tests hand it a resolv.conf of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pop3_exporter.cli import build_parser, parse_dns_server
from pop3_exporter.config import IPProtocol, Module
from pop3_exporter.errors import ResolveError, ResolveTimeoutError
from pop3_exporter.prober import probe_pop3
from pop3_exporter.resolver import DnsResolver, SystemResolver, parse_hosts
from pop3_exporter.result import FailureReason
from pop3_exporter.target import ProbeTarget
from tests.support.dns import BOGUS_ZONE, SIGNED_ZONE, UNSIGNED_ZONE, Testbed
from tests.support.dovecot import DovecotServer
from tests.support.exporter import ExporterProcess
from tests.support.exposition import Samples, parse_samples, value
from tests.support.fakedns import FakeDnsError, FakeDnsServer

GOOD = "pop3.good.test"
BOTH = "both.good.test"
SEARCHED = "pop3.search.test"
DEAD = "pop3.dead.test"
V4 = (socket.AF_INET, "127.0.0.1")
V6 = (socket.AF_INET6, "::1")

Report = Callable[[str, str], None]


@pytest.fixture(scope="module")
def fake_dns() -> Iterator[FakeDnsServer]:
    answers = {GOOD: ["127.0.0.1"], BOTH: ["127.0.0.1", "::1"], SEARCHED: ["127.0.0.3"]}
    with FakeDnsServer(answers, drop=[DEAD], lifetime=300) as server:
        yield server


@pytest.fixture
def report(
    record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> Report:
    def emit(name: str, line: str) -> None:
        record_property(name, line)
        with capsys.disabled():
            sys.stdout.write(f"\n[{name}] {line}\n")

    return emit


# ---- --dns.server ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:53", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[fe80::1%eth0]:53", ("fe80::1%eth0", 53)),
    ],
)
def test_dns_server_flag_values(text: str, expected: tuple[str, int]) -> None:
    assert parse_dns_server(text) == expected
    assert build_parser().parse_args(["--dns.server", text]).dns_server == expected


@pytest.mark.parametrize(
    "text",
    ["", ":53", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:\uff15\uff13",
     "dns.example:53", "localhost", "[::1]:x", "[::1", "127.0.0.9:53:53", "::1]:53"],
)  # fmt: skip
def test_dns_server_flag_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_dns_server(text)


def test_dns_server_flag_default_is_the_system_configuration() -> None:
    assert build_parser().parse_args([]).dns_server is None


# ---- DnsResolver against a given server ----


async def test_resolves_both_families_through_unbound(dns_testbed: Testbed) -> None:
    dns_testbed.add_records(
        SIGNED_ZONE, ["res-both IN A 127.0.0.1", "res-both IN AAAA ::1", "res-v6 IN AAAA ::1"]
    )
    resolver = DnsResolver(dns_testbed.unbound_address)
    assert await resolver.resolve(f"res-both.{SIGNED_ZONE}") == [V6, V4]
    assert await resolver.resolve(f"RES-BOTH.{SIGNED_ZONE}".rstrip(".")) == [V6, V4]
    assert await resolver.resolve(f"res-v6.{SIGNED_ZONE}") == [V6]


async def test_definite_failures_are_dns_error_not_timeout(dns_testbed: Testbed) -> None:
    dns_testbed.add_records(BOGUS_ZONE, ["res-bogus IN A 127.0.0.1"])
    dns_testbed.add_records(SIGNED_ZONE, ["res-txt IN TXT hello"])
    resolver = DnsResolver(dns_testbed.unbound_address)
    cases = {
        f"res-missing.{SIGNED_ZONE}": "NXDOMAIN",
        f"res-bogus.{BOGUS_ZONE}": "SERVFAIL",  # validation failure
        "mail.example.com": "REFUSED",  # outside the test zones
        f"res-txt.{SIGNED_ZONE}": "no A or AAAA record",
    }
    for name, words in cases.items():
        with pytest.raises(ResolveError) as caught:
            await resolver.resolve(name)
        assert type(caught.value) is ResolveError, name
        assert caught.value.reason is FailureReason.DNS_ERROR
        assert words in str(caught.value), (name, str(caught.value))


async def test_unanswered_name_is_a_timeout(fake_dns: FakeDnsServer) -> None:
    resolver = DnsResolver(fake_dns.address, lifetime=0.5)
    started = time.monotonic()
    with pytest.raises(ResolveTimeoutError) as caught:
        await resolver.resolve(DEAD)
    assert 0.45 <= time.monotonic() - started < 3.0
    assert caught.value.reason is FailureReason.DNS_TIMEOUT
    # The server stays usable: the other name still resolves at once.
    assert await resolver.resolve(GOOD) == [V4]


async def test_cancelled_lookups_leave_no_socket_open(fake_dns: FakeDnsServer) -> None:
    resolver = DnsResolver(fake_dns.address)
    await resolver.resolve(GOOD)  # first-use allocations out of the way
    before = len(os.listdir("/proc/self/fd"))
    queries_before = fake_dns.count(DEAD)
    tasks = [asyncio.create_task(resolver.resolve(DEAD)) for _ in range(20)]
    await _wait_for(lambda: fake_dns.count(DEAD) - queries_before >= 40, "dead queries")
    during = len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert time.monotonic() - started < 1.0
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    assert during >= before + 40, "the lookups did not hold their sockets"
    assert len(os.listdir("/proc/self/fd")) <= before


class RefusingExecutor(ThreadPoolExecutor):
    """A default executor that fails any work: the resolver must not need it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        raise RuntimeError("no thread pool for resolution")


async def test_no_thread_pool_is_used(fake_dns: FakeDnsServer) -> None:
    loop = asyncio.get_running_loop()
    executor = RefusingExecutor()
    loop.set_default_executor(executor)
    resolver = DnsResolver(fake_dns.address)
    assert await resolver.resolve(BOTH) == [V6, V4]
    with pytest.raises(ResolveError):
        await resolver.resolve("nowhere.good.test")
    assert executor.submitted == 0
    # The check has teeth: getaddrinfo goes through the executor.
    with pytest.raises(RuntimeError, match="no thread pool"):
        await SystemResolver().resolve("localhost")
    assert executor.submitted == 1


async def test_ip_literals_are_not_queried(fake_dns: FakeDnsServer) -> None:
    resolver = DnsResolver(fake_dns.address)
    assert await resolver.resolve("127.0.0.1") == [V4]
    assert await resolver.resolve("::1") == [V6]
    assert fake_dns.count("127.0.0.1") == 0 and fake_dns.count("::1") == 0


def test_dns_resolver_exposes_server_for_later_lookups() -> None:
    resolver = DnsResolver(("::1", 5353))
    assert resolver.dns_resolver.nameservers == ["::1"]
    assert resolver.dns_resolver.port == 5353
    with pytest.raises(ValueError, match="not an IP address"):
        DnsResolver(("dns.example", 53))


# ---- TLSA with the AD bit (for DANE) ----


async def test_tlsa_records_and_authentication(dns_testbed: Testbed) -> None:
    record = "_110._tcp.tlsa IN TLSA 3 1 1 " + "ab" * 32
    dns_testbed.add_records(SIGNED_ZONE, [record])
    dns_testbed.add_records(UNSIGNED_ZONE, [record])
    dns_testbed.add_records(BOGUS_ZONE, [record])
    resolver = DnsResolver(dns_testbed.unbound_address)

    signed = await resolver.tlsa(f"_110._tcp.tlsa.{SIGNED_ZONE}")
    assert signed.authenticated
    assert [(r.usage, r.selector, r.mtype, r.cert) for r in signed.records] == [
        (3, 1, 1, bytes.fromhex("ab" * 32))
    ]
    unsigned = await resolver.tlsa(f"_110._tcp.tlsa.{UNSIGNED_ZONE}")
    assert len(unsigned.records) == 1 and not unsigned.authenticated
    # Authenticated denial: provably no TLSA records (NXDOMAIN and NODATA).
    missing = await resolver.tlsa(f"_995._tcp.tlsa.{SIGNED_ZONE}")
    assert missing.records == () and missing.authenticated
    nodata = await resolver.tlsa(f"ns.{SIGNED_ZONE}")
    assert nodata.records == () and nodata.authenticated
    with pytest.raises(ResolveError, match="SERVFAIL"):
        await resolver.tlsa(f"_110._tcp.tlsa.{BOGUS_ZONE}")


# ---- the system's configuration (resolv.conf + hosts), with files of the test ----


@pytest.fixture(scope="module")
def system_dns() -> Iterator[FakeDnsServer]:
    """The scripted server on port 53 of a random 127/8 address: resolv.conf has no
    port syntax, and the resolv.conf of these tests must name the test's own server."""
    if os.geteuid() != 0:
        pytest.skip("a DNS server on port 53 needs root")
    answers = {GOOD: ["127.0.0.1"], SEARCHED: ["127.0.0.3"]}
    for _ in range(5):
        address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
        server = FakeDnsServer(answers, drop=[DEAD], lifetime=300, address=address, port=53)
        try:
            server.start()
        except FakeDnsError:
            continue  # address taken by another run; try another
        try:
            yield server
        finally:
            server.stop()
        return
    pytest.fail("no free loopback address for a DNS server on port 53")


@dataclass
class SystemFiles:
    resolv_conf: Path
    hosts: Path
    now: float = 0.0

    def clock(self) -> float:
        return self.now

    def resolver(self) -> DnsResolver:
        return DnsResolver(resolv_conf=self.resolv_conf, hosts=self.hosts, clock=self.clock)


@pytest.fixture
def system_files(tmp_path: Path, system_dns: FakeDnsServer) -> SystemFiles:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"nameserver {system_dns.host}\nsearch search.test\noptions timeout:1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.5 mailhost mailhost.lan  # a comment\n::1 mailhost\nbad line\n")
    return SystemFiles(resolv_conf, hosts)


async def test_system_config_answers_hosts_file_names_without_a_query(
    system_files: SystemFiles, system_dns: FakeDnsServer
) -> None:
    resolver = system_files.resolver()
    assert resolver.dns_resolver.nameservers == [system_dns.host]
    assert await resolver.resolve("mailhost") == [(socket.AF_INET, "127.0.0.5"), V6]
    assert await resolver.resolve("MailHost.lan.") == [(socket.AF_INET, "127.0.0.5")]
    # Names not in the file go to the nameserver, with resolv.conf's search list.
    assert await resolver.resolve("pop3") == [(socket.AF_INET, "127.0.0.3")]
    assert await resolver.resolve(GOOD) == [V4]
    assert system_dns.count("mailhost") == system_dns.count("mailhost.lan") == 0
    assert system_dns.count(SEARCHED) >= 2  # A and AAAA of the searched name


def _system_hosts() -> Mapping[str, tuple[tuple[socket.AddressFamily, str], ...]]:
    return parse_hosts(Path("/etc/hosts").read_text())


async def test_system_config_localhost_from_the_real_hosts_file(
    tmp_path: Path, system_dns: FakeDnsServer
) -> None:
    """``localhost`` comes from /etc/hosts as with getaddrinfo; should it ever reach
    DNS, it reaches the test's own server (the resolv.conf here), which counts it."""
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"nameserver {system_dns.host}\n")
    resolver = DnsResolver(resolv_conf=resolv_conf)
    expected = _system_hosts()["localhost"]
    assert await resolver.resolve("localhost") == list(expected)
    assert system_dns.count("localhost") == 0


async def test_system_config_follows_file_changes(system_files: SystemFiles) -> None:
    resolver = system_files.resolver()
    assert await resolver.resolve("mailhost.lan") == [(socket.AF_INET, "127.0.0.5")]
    system_files.hosts.write_text("127.0.0.6 mailhost.lan\n")
    system_files.now += 1.0  # too soon to look again
    assert await resolver.resolve("mailhost.lan") == [(socket.AF_INET, "127.0.0.5")]
    system_files.now += 5.0
    assert await resolver.resolve("mailhost.lan") == [(socket.AF_INET, "127.0.0.6")]


async def test_system_config_without_nameserver(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.5 mailhost\n")
    resolver = DnsResolver(resolv_conf=tmp_path / "missing.conf", hosts=hosts)
    assert await resolver.resolve("mailhost") == [(socket.AF_INET, "127.0.0.5")]
    with pytest.raises(ResolveError, match="no nameserver") as caught:
        await resolver.resolve("pop3.example")
    assert type(caught.value) is ResolveError


# ---- through the prober: the deadline during resolution is dns_timeout ----


async def test_probe_deadline_during_resolution_is_dns_timeout(fake_dns: FakeDnsServer) -> None:
    module = Module(name="ip4", preferred_ip_protocol=IPProtocol.IP4)
    result = await probe_pop3(
        ProbeTarget(DEAD, 110, is_ip_literal=False),
        module,
        0.6,
        resolver=DnsResolver(fake_dns.address),
    )
    assert not result.success
    assert result.failure_reason is FailureReason.DNS_TIMEOUT
    assert 0.55 <= result.duration_seconds < 1.5


# ---- the exporter as a process, with --dns.server ----

EXPORTER_CONFIG = """\
modules:
  good:
    preferred_ip_protocol: ip4
  dead:
    preferred_ip_protocol: ip4
    timeout: {dead_timeout}s
  ip4_only:
    preferred_ip_protocol: ip4
    ip_protocol_fallback: false
"""
# Long enough that the good batch surely ends first on a busy shared machine.
DEAD_TIMEOUT = 8.0
WARM_UP_PROBES = 50
GOOD_PROBES = 200
DEAD_PROBES = 50


@dataclass
class Probe:
    status: int
    samples: Samples
    seconds: float

    @property
    def success(self) -> bool:
        return value(self.samples, "probe_success") == 1.0

    @property
    def reason(self) -> str | None:
        for (name, labels), sample in self.samples.items():
            if name == "probe_pop3_failure" and sample == 1.0:
                return dict(labels)["reason"]
        return None


async def fetch_probe(
    session: aiohttp.ClientSession, exporter: ExporterProcess, target: str, module: str
) -> Probe:
    started = time.monotonic()
    async with session.get(
        f"{exporter.url}/probe", params={"target": target, "module": module}
    ) as response:
        text = await response.text()
    seconds = time.monotonic() - started
    return Probe(response.status, parse_samples(text) if response.status == 200 else {}, seconds)


def start_exporter(tmp_path: Path, dns_server: str) -> ExporterProcess:
    config = tmp_path / "pop3_exporter.yml"
    config.write_text(EXPORTER_CONFIG.format(dead_timeout=DEAD_TIMEOUT))
    exporter = ExporterProcess(
        tmp_path / "exporter.log",
        "--config.file",
        str(config),
        "--dns.server",
        dns_server,
        "--log.level",
        "warn",
        "--web.max-concurrent-probes",
        "1000",
    )
    exporter.start()
    return exporter


@pytest.fixture(scope="module")
def unbound_exporter(
    tmp_path_factory: pytest.TempPathFactory, dns_testbed: Testbed
) -> Iterator[ExporterProcess]:
    exporter = start_exporter(tmp_path_factory.mktemp("unbound-exporter"), dns_testbed.unbound_flag)
    try:
        yield exporter
    finally:
        exporter.kill()


@pytest.mark.dovecot
async def test_probe_through_unbound_and_nsd(
    dns_testbed: Testbed, unbound_exporter: ExporterProcess, dovecot: DovecotServer
) -> None:
    dns_testbed.add_records(
        SIGNED_ZONE,
        ["probe-v4 IN A 127.0.0.1", "probe-both IN A 127.0.0.1", "probe-both IN AAAA ::1"],
    )
    port = dovecot.pop3_port
    async with aiohttp.ClientSession() as session:
        v4 = await fetch_probe(session, unbound_exporter, f"probe-v4.{SIGNED_ZONE}:{port}", "good")
        both = await fetch_probe(
            session, unbound_exporter, f"probe-both.signed.test:{port}", "pop3"
        )
    assert v4.status == both.status == 200
    assert v4.success and value(v4.samples, "probe_ip_protocol") == 4
    assert both.success and value(both.samples, "probe_ip_protocol") == 6  # default prefers ip6
    lookup = value(v4.samples, "probe_dns_lookup_time_seconds")
    assert lookup is not None and 0 < lookup < 2
    assert f"127.0.0.1#{dns_testbed.nsd_port}" in dns_testbed.outgoing_targets()


@pytest.mark.dovecot
async def test_dns_errors_through_unbound(
    dns_testbed: Testbed, unbound_exporter: ExporterProcess, dovecot: DovecotServer
) -> None:
    dns_testbed.add_records(SIGNED_ZONE, ["probe-v6only IN AAAA ::1"])
    dns_testbed.add_records(BOGUS_ZONE, ["probe-bogus IN A 127.0.0.1"])
    port = dovecot.pop3_port
    cases = [
        (f"probe-nx.signed.test:{port}", "good"),  # NXDOMAIN
        (f"probe-v6only.signed.test:{port}", "ip4_only"),  # only AAAA, ip4 required
        (f"probe-bogus.bogus.test:{port}", "good"),  # SERVFAIL: fails validation
    ]
    async with aiohttp.ClientSession() as session:
        probes = [await fetch_probe(session, unbound_exporter, *case) for case in cases]
        # The AAAA-only name is fine when ip6 may be used.
        fallback = await fetch_probe(session, unbound_exporter, cases[1][0], "good")
    for case, probe in zip(cases, probes, strict=True):
        assert probe.status == 200, case
        assert not probe.success and probe.reason == "dns_error", (case, probe.reason)
        assert value(probe.samples, "probe_pop3_failure", reason="dns_timeout") == 0.0
    assert fallback.success and value(fallback.samples, "probe_ip_protocol") == 6


async def _wait_for(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _batch(
    session: aiohttp.ClientSession, exporter: ExporterProcess, target: str, count: int
) -> tuple[float, list[Probe]]:
    started = time.monotonic()
    probes = await asyncio.gather(
        *(fetch_probe(session, exporter, target, "good") for _ in range(count))
    )
    return time.monotonic() - started, probes


@pytest.mark.dovecot
@pytest.mark.slow
async def test_dead_names_do_not_stall_other_probes(
    tmp_path: Path, fake_dns: FakeDnsServer, dovecot: DovecotServer, report: Report
) -> None:
    """The issue's test: while 50 probes of a name whose DNS server never answers are in
    flight, 200 probes of a good name all succeed in their normal time."""
    exporter = start_exporter(tmp_path, fake_dns.flag)
    try:
        good = f"{GOOD}:{dovecot.pop3_port}"
        dead = f"{DEAD}:{dovecot.pop3_port}"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            # Dovecot starts login processes on demand: not part of "normal time".
            _, warm_up = await _batch(session, exporter, good, WARM_UP_PROBES)
            assert all(probe.success for probe in warm_up), exporter.log()
            baseline_seconds, baseline = await _batch(session, exporter, good, GOOD_PROBES)

            dead_before = fake_dns.count(DEAD)
            dead_started = time.monotonic()
            dead_tasks = [
                asyncio.create_task(fetch_probe(session, exporter, dead, "dead"))
                for _ in range(DEAD_PROBES)
            ]
            # Every dead probe has sent its A and AAAA queries: they are in flight.
            await _wait_for(
                lambda: fake_dns.count(DEAD) - dead_before >= 2 * DEAD_PROBES,
                "the dead probes' queries",
            )
            loaded_seconds, loaded = await _batch(session, exporter, good, GOOD_PROBES)
            still_in_flight = sum(not task.done() for task in dead_tasks)
            dead_probes = await asyncio.gather(*dead_tasks)
            dead_seconds = time.monotonic() - dead_started
    finally:
        exporter.kill()

    def slowest(probes: list[Probe]) -> float:
        return max(value(p.samples, "probe_duration_seconds") or 0.0 for p in probes)

    report(
        "dns_dead_names",
        f"{GOOD_PROBES} good probes: {baseline_seconds:.2f}s alone (slowest probe"
        f" {slowest(baseline):.3f}s), {loaded_seconds:.2f}s with {DEAD_PROBES} dead-name"
        f" probes in flight (slowest {slowest(loaded):.3f}s); dead probes ended after"
        f" {dead_seconds:.2f}s (deadline {DEAD_TIMEOUT:g}s)",
    )
    for probe in baseline + loaded:
        assert probe.status == 200 and probe.success, (probe.status, probe.reason)
    assert still_in_flight == DEAD_PROBES, "dead probes ended before the good ones: no overlap"
    # Normal time: generous margins for a shared 2-core machine, yet far below the
    # dead probes' deadline, which is where a shared thread pool would put them.
    assert loaded_seconds <= max(3 * baseline_seconds, baseline_seconds + 1.0)
    assert slowest(loaded) <= max(3 * slowest(baseline), 1.0)
    for probe in dead_probes:
        assert probe.status == 200 and not probe.success
        assert probe.reason == "dns_timeout", probe.reason
        duration = value(probe.samples, "probe_duration_seconds")
        assert duration is not None and DEAD_TIMEOUT - 0.05 <= duration <= DEAD_TIMEOUT + 1.0
    assert dead_seconds < DEAD_TIMEOUT + 3.0
