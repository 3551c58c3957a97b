"""Every address behind a name (issue 12, item 4): ``ip_protocol: all`` probes each A
and AAAA address at once within the one deadline.

Names come from the real NSD + Unbound test bed (tests/support/dns.py), the POP3
servers are real Dovecots: the session one listens on 127.0.0.1 and ::1, the one of
this module on 127.0.0.1 only, so that a name with both addresses has one address
that works and one where nothing listens.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pop3_exporter.config import (
    AddressSelection,
    DaneMode,
    InvalidConfigError,
    Module,
    TLSConfig,
    TLSMode,
    module_to_mapping,
    parse_config,
)
from pop3_exporter.fanout import MAX_ADDRESSES, choose, merge_legacy, worst
from pop3_exporter.policy import RefusalReason, TargetRefusedError
from pop3_exporter.prober import probe_pop3
from pop3_exporter.resolver import DnsResolver
from pop3_exporter.result import FailureReason, Phase, ProbeResult
from pop3_exporter.target import ProbeTarget
from tests.conftest import require_dovecot
from tests.support.certs import TestPKI
from tests.support.dns import SIGNED_ZONE, Testbed
from tests.support.dovecot import DovecotServer, stop_servers
from tests.support.exposition import Samples, labelled, parse_samples, promtool_check_metrics, value
from tests.support.prom import DASHBOARD, dashboard_panels
from tests.support.render import render_probe
from tests.support.tlsa import chain_of, sha256, spki, tlsa

pytestmark = pytest.mark.dovecot

TIMEOUT = 5.0
V4 = socket.AF_INET
V6 = socket.AF_INET6


@pytest.fixture(scope="module")
def v4_only(pki: TestPKI, dovecot_workroot: Path) -> Iterator[DovecotServer]:
    """A Dovecot listening on 127.0.0.1 only."""
    require_dovecot()
    server = DovecotServer(
        dovecot_workroot / "v4-only", pki.variants["good"], listen=("127.0.0.1",)
    )
    server.start()
    try:
        yield server
    finally:
        stop_servers([server])


def every_address(pki: TestPKI, **changes: object) -> Module:
    module = Module(
        name="all",
        tls=TLSMode.IMPLICIT,
        ip_protocol=AddressSelection.ALL,
        timeout=TIMEOUT,
        tls_config=TLSConfig(ca_file=str(pki.ca_file), server_name="localhost"),
    )
    return replace(module, **changes)  # type: ignore[arg-type]


async def probe(testbed: Testbed, host: str, port: int, module: Module) -> ProbeResult:
    return await probe_pop3(
        ProbeTarget(host, port, is_ip_literal=False),
        module,
        TIMEOUT,
        resolver=DnsResolver(testbed.unbound_address),
        record_transcript=True,
    )


def samples_of(result: ProbeResult, module: Module) -> Samples:
    body, _ = render_probe(result, module.tls, "")
    text = body.decode()
    promtool_check_metrics(text)
    return parse_samples(text)


def address_series(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    """{(address, ip_protocol[, reason]): value} of one per-address family."""
    found = {}
    for (metric, labels), sample in samples.items():
        if metric == name:
            found[tuple(v for _, v in labels)] = sample
    return found


async def test_one_family_listening_fails_with_the_reason_of_the_other(
    dns_testbed: Testbed, v4_only: DovecotServer, pki: TestPKI
) -> None:
    dns_testbed.add_records(SIGNED_ZONE, ["addr-half IN A 127.0.0.1", "addr-half IN AAAA ::1"])
    module = every_address(pki)
    result = await probe(dns_testbed, f"addr-half.{SIGNED_ZONE}", v4_only.pop3s_port, module)
    assert not result.success
    assert result.failure_reason is FailureReason.CONNECT_REFUSED
    assert result.address == "::1" and result.ip_protocol == 6
    assert (result.failure_detail or "").startswith("::1: ")
    samples = samples_of(result, module)
    assert value(samples, "probe_success") == 0.0
    assert value(samples, "probe_pop3_failure", reason="connect_refused") == 1.0
    assert value(samples, "probe_ip_protocol") == 6.0
    assert address_series(samples, "probe_pop3_address_success") == {
        ("::1", "ip6"): 0.0,
        ("127.0.0.1", "ip4"): 1.0,
    }
    # Only the failing address has a failure series, with its one reason.
    assert address_series(samples, "probe_pop3_address_failure") == {
        ("::1", "ip6", "connect_refused"): 1.0
    }
    durations = address_series(samples, "probe_pop3_address_duration_seconds")
    assert set(durations) == {("::1", "ip6"), ("127.0.0.1", "ip4")}
    assert all(0 < seconds < TIMEOUT for seconds in durations.values())
    assert value(samples, "probe_pop3_addresses_resolved") == 2.0
    assert value(samples, "probe_pop3_addresses_skipped") == 0.0
    # The worst address's facts: it never got to TLS; the other one did.
    assert result.tls is None
    assert "probe_tls_valid" not in {name for name, _ in samples}
    phases = labelled(samples, "probe_pop3_duration_seconds", "phase")
    assert set(phases) == {"resolve", "connect"}
    assert phases["resolve"] > 0  # the one real lookup, not the literal's
    # The debug transcript has both addresses' dialogues.
    texts = [line.text for line in result.transcript]
    assert "--- address ::1 ---" in texts and "--- address 127.0.0.1 ---" in texts
    assert any(text.startswith("+OK") for text in texts)


async def test_both_families_listening_succeeds(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI
) -> None:
    dns_testbed.add_records(SIGNED_ZONE, ["addr-both IN A 127.0.0.1", "addr-both IN AAAA ::1"])
    module = every_address(pki)
    result = await probe(dns_testbed, f"addr-both.{SIGNED_ZONE}", dovecot.pop3s_port, module)
    assert result.success, result.failure_detail
    samples = samples_of(result, module)
    assert value(samples, "probe_success") == 1.0
    assert address_series(samples, "probe_pop3_address_success") == {
        ("::1", "ip6"): 1.0,
        ("127.0.0.1", "ip4"): 1.0,
    }
    assert address_series(samples, "probe_pop3_address_failure") == {}
    assert value(samples, "probe_tls_valid") == 1.0
    assert result.addresses is not None
    assert [o.address for o in result.addresses.outcomes] == ["::1", "127.0.0.1"]
    # The worst of two successes is the slower one.
    slowest = max(result.addresses.outcomes, key=lambda outcome: outcome.duration_seconds)
    assert result.address == slowest.address


def listeners_on_both_families() -> tuple[int, list[socket.socket]]:
    """Listening sockets on 127.0.0.1 and ::1 with one port that accept (the kernel
    does) and never say a word."""
    for _ in range(50):
        v4 = socket.create_server(("127.0.0.1", 0))
        port = v4.getsockname()[1]
        try:
            v6 = socket.create_server(("::1", port), family=socket.AF_INET6)
        except OSError:
            v4.close()
            continue
        return port, [v4, v6]
    raise RuntimeError("no port free on both 127.0.0.1 and ::1")


async def test_addresses_are_probed_at_once_within_one_deadline(dns_testbed: Testbed) -> None:
    """Two addresses that never greet: both wait for a greeting until the one
    deadline, side by side."""
    dns_testbed.add_records(SIGNED_ZONE, ["addr-slow IN A 127.0.0.1", "addr-slow IN AAAA ::1"])
    module = Module(name="all", ip_protocol=AddressSelection.ALL, timeout=1.0)
    port, sockets = listeners_on_both_families()
    try:
        started = time.monotonic()
        result = await probe_pop3(
            ProbeTarget(f"addr-slow.{SIGNED_ZONE}", port, is_ip_literal=False),
            module,
            1.0,
            resolver=DnsResolver(dns_testbed.unbound_address),
        )
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert result.failure_reason is FailureReason.GREETING_TIMEOUT
    assert result.addresses is not None
    reasons = {o.address: o.failure_reason for o in result.addresses.outcomes}
    assert reasons == {
        "::1": FailureReason.GREETING_TIMEOUT,
        "127.0.0.1": FailureReason.GREETING_TIMEOUT,
    }
    # One after the other, the second would have had no time left: each waited for a
    # greeting for (nearly) the whole second.
    assert all(o.duration_seconds >= 0.9 for o in result.addresses.outcomes)
    assert 0.9 <= result.duration_seconds <= elapsed < 2.5


async def test_dane_over_every_address(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI
) -> None:
    """One TLSA lookup for the name, a verdict for each address's chain."""
    leaf = chain_of(pki, "good").leaf
    port = dovecot.pop3s_port
    dns_testbed.add_records(
        SIGNED_ZONE,
        [
            "addr-dane IN A 127.0.0.1",
            "addr-dane IN AAAA ::1",
            tlsa("addr-dane", port, f"3 1 1 {sha256(spki(leaf))}"),
        ],
    )
    module = every_address(pki, dane=DaneMode.REQUIRE)
    result = await probe(dns_testbed, f"addr-dane.{SIGNED_ZONE}", port, module)
    assert result.success, result.failure_detail
    assert result.dane is not None and (result.dane.records, result.dane.match) == (1, True)
    samples = samples_of(result, module)
    assert value(samples, "probe_tls_dane_match") == 1.0
    assert value(samples, "probe_tls_dane_secure") == 1.0


async def test_cap_takes_both_families_and_counts_the_rest(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI
) -> None:
    v4 = [f"addr-many IN A 127.0.0.{n}" for n in range(1, 21)]
    dns_testbed.add_records(SIGNED_ZONE, [*v4, "addr-many IN AAAA ::1"])
    module = every_address(pki, tls=TLSMode.NONE)
    result = await probe(dns_testbed, f"addr-many.{SIGNED_ZONE}", dovecot.pop3_port, module)
    assert result.addresses is not None
    probed = {outcome.address: outcome for outcome in result.addresses.outcomes}
    assert len(probed) == MAX_ADDRESSES
    assert result.addresses.resolved == 21 and result.addresses.skipped == 21 - MAX_ADDRESSES
    # The lone AAAA is not crowded out by the twenty A records; which fifteen of those
    # are probed depends on the order Unbound hands them out (it rotates them).
    assert probed.pop("::1").success
    assert len(probed) == MAX_ADDRESSES - 1
    for address, outcome in probed.items():
        # Dovecot listens on 127.0.0.1 only, not on the rest of 127/8.
        if address == "127.0.0.1":
            assert outcome.success
        else:
            assert outcome.failure_reason is FailureReason.CONNECT_REFUSED, address
    samples = samples_of(result, module)
    assert value(samples, "probe_pop3_addresses_skipped") == 21 - MAX_ADDRESSES
    assert len(address_series(samples, "probe_pop3_address_success")) == MAX_ADDRESSES


async def test_every_address_passes_the_policy_before_any_connection(
    dns_testbed: Testbed, pki: TestPKI
) -> None:
    """The policy refuses ::1: the probe is refused as a whole, and no address is
    connected to (nothing listens on the port, so a connection would show as a
    connect_refused result instead of the exception)."""
    dns_testbed.add_records(SIGNED_ZONE, ["addr-policy IN A 127.0.0.1", "addr-policy IN AAAA ::1"])
    checked: list[str] = []

    def check(address: str, port: int) -> None:
        checked.append(address)
        if address == "::1":
            raise TargetRefusedError(RefusalReason.DENY_RULE, "::1 is denied")

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    module = every_address(pki, tls=TLSMode.NONE)
    with pytest.raises(TargetRefusedError):
        await probe_pop3(
            ProbeTarget(f"addr-policy.{SIGNED_ZONE}", port, is_ip_literal=False),
            module,
            TIMEOUT,
            resolver=DnsResolver(dns_testbed.unbound_address),
            address_check=check,
        )
    assert checked == ["::1"]
    checked.clear()
    allowed = await probe_pop3(
        ProbeTarget(f"addr-policy.{SIGNED_ZONE}", port, is_ip_literal=False),
        module,
        TIMEOUT,
        resolver=DnsResolver(dns_testbed.unbound_address),
        address_check=lambda address, port: checked.append(address),
    )
    # Checked once up front and once by each address's own probe.
    assert sorted(checked) == ["127.0.0.1", "127.0.0.1", "::1", "::1"]
    assert allowed.failure_reason is FailureReason.CONNECT_REFUSED


async def test_resolution_failure_and_ip_literal(
    dns_testbed: Testbed, dovecot: DovecotServer
) -> None:
    module = Module(name="all", ip_protocol=AddressSelection.ALL, timeout=TIMEOUT)
    missing = await probe(dns_testbed, f"addr-missing.{SIGNED_ZONE}", dovecot.pop3_port, module)
    assert missing.failure_reason is FailureReason.DNS_ERROR
    assert missing.failed_phase is Phase.RESOLVE
    samples = samples_of(missing, module)
    assert value(samples, "probe_pop3_addresses_resolved") == 0.0
    assert address_series(samples, "probe_pop3_address_success") == {}
    literal = await probe_pop3(
        ProbeTarget("::1", dovecot.pop3_port, is_ip_literal=True), module, TIMEOUT
    )
    assert literal.success
    assert address_series(samples_of(literal, module), "probe_pop3_address_success") == {
        ("::1", "ip6"): 1.0
    }


# ---- pieces on their own ----------------------------------------------------------------


def test_choose_interleaves_families_past_the_cap() -> None:
    answers = [(V6, f"2001:db8::{n:x}") for n in range(1, 4)] + [
        (V4, f"127.0.2.{n}") for n in range(1, 10)
    ]
    chosen, total = choose(answers, cap=6)
    assert total == 12
    assert chosen == [
        (V6, "2001:db8::1"),
        (V6, "2001:db8::2"),
        (V6, "2001:db8::3"),
        (V4, "127.0.2.1"),
        (V4, "127.0.2.2"),
        (V4, "127.0.2.3"),
    ]
    # Duplicates and other spellings of one address count once.
    same = [(V6, "::1"), (V6, "0::1"), (V4, "127.0.0.1"), (V4, "127.0.0.1")]
    assert choose(same) == ([(V6, "::1"), (V4, "127.0.0.1")], 2)


def _result(success: bool, phase: Phase | None, duration: float) -> ProbeResult:
    return ProbeResult(
        target="t",
        module_name="m",
        timeout_seconds=1.0,
        duration_seconds=duration,
        success=success,
        failure_reason=None if success else FailureReason.TIMEOUT,
        failure_detail=None,
        failed_phase=phase,
        phase_durations=(),
        dns_lookup_seconds=None,
        ip_protocol=4,
        address=None,
        greeting=None,
        greeting_seconds=None,
        greeting_match=False,
        capabilities=None,
        plaintext_auth_exposed=None,
        tls=None,
    )


def test_worst_is_a_failure_that_got_least_far_else_the_slowest_success() -> None:
    ok_fast, ok_slow = _result(True, None, 0.1), _result(True, None, 0.3)
    assert worst([ok_fast, ok_slow]) == 1
    late = _result(False, Phase.CAPA, 0.2)
    early = _result(False, Phase.CONNECT, 0.01)
    assert worst([ok_slow, late, early]) == 2
    assert worst([ok_slow, late]) == 1
    assert worst([early, _result(False, Phase.CONNECT, 0.5)]) == 0  # resolver order


def test_ip_protocol_config() -> None:
    config = parse_config(
        "modules:\n  a:\n    ip_protocol: all\n  b:\n    ip_protocol: preferred\n"
    )
    assert config.modules["a"].ip_protocol is AddressSelection.ALL
    assert config.modules["b"].ip_protocol is AddressSelection.PREFERRED
    assert config.modules["pop3"].ip_protocol is AddressSelection.PREFERRED
    mapping = module_to_mapping(config.modules["a"])
    assert mapping["ip_protocol"] == "all"
    with pytest.raises(InvalidConfigError, match=r"<string>:3: modules.c.ip_protocol: must be"):
        parse_config("modules:\n  c:\n    ip_protocol: both\n")


async def test_no_task_is_left_behind(
    dns_testbed: Testbed, v4_only: DovecotServer, pki: TestPKI
) -> None:
    """The per-address probes and the shared TLSA lookup end with the probe."""
    dns_testbed.add_records(SIGNED_ZONE, ["addr-tasks IN A 127.0.0.1", "addr-tasks IN AAAA ::1"])
    before = len(asyncio.all_tasks())
    module = every_address(pki, dane=DaneMode.CHECK)
    await probe(dns_testbed, f"addr-tasks.{SIGNED_ZONE}", v4_only.pop3s_port, module)
    assert len(asyncio.all_tasks()) == before


DELIVERY_MODULE = """\
modules:
  loop:
    tls: implicit
    ip_protocol: {ip_protocol}{dane}
    auth: {{username: loop@example.com, password_env: POP3_EXPORTER_TEST_PASSWORD}}
    delivery:
      smtp: {{address: smtp.example.com:587}}
      from: loop@example.com
      to: loop@example.com
"""


def test_delivery_modules_refuse_every_address_and_dane(monkeypatch: pytest.MonkeyPatch) -> None:
    """A round trip sends one message per probe; it is not fanned out, nor DANE-checked."""
    monkeypatch.setenv("POP3_EXPORTER_TEST_PASSWORD", "secret")
    accepted = parse_config(DELIVERY_MODULE.format(ip_protocol="preferred", dane=""))
    assert accepted.modules["loop"].delivery is not None
    with pytest.raises(InvalidConfigError) as caught:
        parse_config(DELIVERY_MODULE.format(ip_protocol="all", dane="\n    dane: check"))
    problems = str(caught.value).splitlines()
    assert problems == [
        "<string>:4: modules.loop.ip_protocol: not supported in a delivery module; probe the"
        " same server with a module without delivery for ip_protocol",
        "<string>:5: modules.loop.dane: not supported in a delivery module; probe the same"
        " server with a module without delivery for dane",
    ]


def test_dashboard_has_the_per_address_and_dane_panels() -> None:
    """Each new family has a panel (test_e2e_alerting checks they return data)."""
    panels = dashboard_panels(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    exprs = " ".join(target["expr"] for panel in panels for target in panel["targets"])
    for needle in (
        "probe_pop3_address_success{",
        "probe_pop3_address_failure{",
        "probe_pop3_address_duration_seconds{",
        "pop3:address_family_success{",
        "probe_tls_dane_records{",
        "probe_tls_dane_secure{",
        "probe_tls_dane_match{",
    ):
        assert needle in exprs, needle


def test_legacy_tls_is_accepted_by_the_name_when_any_address_accepts_it() -> None:
    v6 = replace(_result(True, None, 0.1), legacy_tls_versions=(("TLS 1.0", False),))
    v4 = replace(
        _result(True, None, 0.1), legacy_tls_versions=(("TLS 1.0", True), ("TLS 1.1", False))
    )
    assert merge_legacy([v6, v4]) == (("TLS 1.0", True), ("TLS 1.1", False))
    assert merge_legacy([v6, _result(False, Phase.CONNECT, 0.1)]) == (("TLS 1.0", False),)
