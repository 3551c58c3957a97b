"""Real DNS software from Debian on loopback: NSD serving the test's zones (some signed
with dnssec-signzone) and Unbound validating them with the test's trust anchors.

    nsd (127.0.0.1:P1, authoritative)  <--stub--  unbound (127.0.0.1:P2, validating)

Unbound never sends a query off loopback: the test zones and the root are stub zones
at NSD's address (which refuses what it does not serve), clients asking for anything
else get REFUSED (``local-zone: "." refuse``), and there are no root hints or root trust
anchor to prime. ``Testbed.outgoing_targets()`` reads Unbound's log (verbosity 3) to
check that.

Zones: ``signed.test.`` (signed, anchored: answers validate and carry AD),
``unsigned.test.`` (no anchor: answers are insecure, no AD) and ``bogus.test.`` (signed,
but Unbound's anchor is another key: every answer is SERVFAIL). Tests add the names
they need with ``Testbed.add_records`` (re-signs, reloads NSD, flushes Unbound's cache
for the zone), choosing labels no other test uses.

The fixture ``dns_testbed`` (session scope) is registered in tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rdtypes.ANY.SOA
import pytest

from tests.support.processes import signal_child, terminate

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 15.0
RELOAD_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
QUERY_TIMEOUT = 0.5
PORT_TRIES = 5
KEEP_ENV = "POP3_EXPORTER_KEEP_DNS"
BINARIES = {
    "nsd": "nsd",
    "unbound": "unbound",
    "unbound-control": "unbound",
    "unbound-checkconf": "unbound",
    "dnssec-keygen": "bind9-utils",
    "dnssec-signzone": "bind9-utils",
    "dnssec-dsfromkey": "bind9-utils",
}
ALGORITHM = "ECDSAP256SHA256"

SIGNED_ZONE = "signed.test."
UNSIGNED_ZONE = "unsigned.test."
BOGUS_ZONE = "bogus.test."


class DnsTestbedError(RuntimeError):
    """A DNS server did not start, reload or answer; the message ends with its log."""


def require_dns_binaries() -> None:
    """Skip without the Debian packages, but fail in CI where they must exist."""
    missing = sorted({package for binary, package in BINARIES.items() if not _which(binary)})
    if missing:
        message = f"DNS test software missing (Debian packages: {' '.join(missing)})"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _which(binary: str) -> str | None:
    # nsd and unbound live in /usr/sbin, which is not always on a test runner's PATH.
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")


def _binary(binary: str) -> str:
    path = _which(binary)
    if path is None:
        raise DnsTestbedError(f"{binary} not found (Debian package {BINARIES[binary]})")
    return path


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (DNS needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise DnsTestbedError("no port free for both UDP and TCP on 127.0.0.1")


def query(
    server: tuple[str, int],
    name: str,
    rdtype: str = "A",
    *,
    rdclass: str = "IN",
    ad: bool = True,
    timeout: float = 2.0,
) -> dns.message.Message:
    """One UDP query (AD set, as a DANE client would) straight to ``server``."""
    request = dns.message.make_query(name, rdtype, rdclass)
    if ad:
        request.flags |= dns.flags.AD
    return dns.query.udp(request, server[0], port=server[1], timeout=timeout)


@dataclass
class Zone:
    name: str  # absolute, e.g. "signed.test."
    signed: bool
    # Unbound gets the DS of another key than the one that signs the zone.
    wrong_anchor: bool = False
    records: list[str] = field(default_factory=list)
    serial: int = 1

    @property
    def file_stem(self) -> str:
        return self.name.rstrip(".")

    def text(self) -> str:
        lines = [
            f"$ORIGIN {self.name}",
            "$TTL 60",
            f"@ IN SOA ns hostmaster {self.serial} 3600 600 86400 60",
            "@ IN NS ns",
            "ns IN A 127.0.0.1",
            *self.records,
        ]
        return "\n".join(lines) + "\n"


class _Daemon:
    """One foreground server process with its log file, stopped by its PID."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, args: Sequence[str]) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(args), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, STOP_TIMEOUT)


def _wait_answering(
    daemon: _Daemon, server: tuple[str, int], name: str, rdtype: str, rdclass: str = "IN"
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not daemon.running:
            raise DnsTestbedError(f"{daemon.name} exited at start:\n{daemon.log_tail()}")
        try:
            query(server, name, rdtype, rdclass=rdclass, timeout=QUERY_TIMEOUT)
        except (dns.exception.Timeout, OSError):
            time.sleep(0.02)
            continue
        return
    raise DnsTestbedError(f"{daemon.name} did not answer in time:\n{daemon.log_tail()}")


def _run(args: Sequence[str], cwd: Path) -> str:
    completed = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if completed.returncode != 0:
        raise DnsTestbedError(
            f"{' '.join(args)} failed ({completed.returncode}):\n"
            f"{completed.stdout}{completed.stderr}"
        )
    return completed.stdout


class Testbed:
    """NSD and Unbound on loopback with their own files in ``workdir``."""

    # Not a test class, despite the name pytest looks for.
    __test__ = False

    def __init__(self, workdir: Path, zones: Iterable[Zone]) -> None:
        self.workdir = workdir
        self.zones = {zone.name: zone for zone in zones}
        self.nsd = _Daemon("nsd", workdir / "nsd.log")
        self.unbound = _Daemon("unbound", workdir / "unbound.log")
        self.nsd_port = 0
        self.unbound_port = 0
        # Zone name -> the DS record text Unbound trusts for it.
        self.trust_anchors: dict[str, str] = {}
        self.start_seconds: float | None = None

    @property
    def nsd_address(self) -> tuple[str, int]:
        return LOOPBACK, self.nsd_port

    @property
    def unbound_address(self) -> tuple[str, int]:
        return LOOPBACK, self.unbound_port

    @property
    def unbound_flag(self) -> str:
        """The exporter's ``--dns.server`` value for the validating resolver."""
        return f"{LOOPBACK}:{self.unbound_port}"

    # ---- zones ----

    def _keys_dir(self, zone: Zone) -> Path:
        return self.workdir / "keys" / zone.file_stem

    def _make_keys(self, zone: Zone) -> None:
        keys = self._keys_dir(zone)
        keys.mkdir(parents=True, exist_ok=True)
        keygen = _binary("dnssec-keygen")
        _run([keygen, "-q", "-a", ALGORITHM, "-f", "KSK", "-K", str(keys), zone.name], keys)
        _run([keygen, "-q", "-a", ALGORITHM, "-K", str(keys), zone.name], keys)
        if zone.wrong_anchor:
            # A key that signs nothing: a validator anchored on it finds every
            # answer of the zone bogus.
            other = self.workdir / "keys" / f"{zone.file_stem}.unrelated"
            other.mkdir(parents=True, exist_ok=True)
            _run([keygen, "-q", "-a", ALGORITHM, "-f", "KSK", "-K", str(other), zone.name], other)
            (key_file,) = other.glob("K*.key")
            self.trust_anchors[zone.name] = _ds_from_key(key_file, zone.name)

    def _write_zone(self, zone: Zone) -> None:
        source = self.workdir / f"{zone.file_stem}.zone"
        source.write_text(zone.text())
        served = self.workdir / f"{zone.file_stem}.served"
        if not zone.signed:
            shutil.copyfile(source, served)
            return
        keys = self._keys_dir(zone)
        _run(
            [
                _binary("dnssec-signzone"),
                "-S",
                "-K",
                str(keys),
                "-d",
                str(keys),
                "-o",
                zone.name,
                "-f",
                str(served),
                str(source),
            ],
            keys,
        )
        if not zone.wrong_anchor:
            self.trust_anchors[zone.name] = _one_line((keys / f"dsset-{zone.name}").read_text())

    def add_records(self, zone_name: str, records: Iterable[str]) -> None:
        """Add zone-file lines (relative to the zone) and serve them: re-sign, reload
        NSD (waits for the new serial), and flush Unbound's cache for the zone."""
        zone = self.zones[zone_name]
        zone.records.extend(records)
        zone.serial += 1
        self._write_zone(zone)
        signal_child(self._nsd_process(), signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while self._served_serial(zone) != zone.serial:
            if time.monotonic() > deadline or not self.nsd.running:
                raise DnsTestbedError(
                    f"nsd did not load serial {zone.serial} of {zone.name}:\n{self.nsd.log_tail()}"
                )
            time.sleep(0.02)
        self._unbound_control("flush_zone", zone.name)

    def _served_serial(self, zone: Zone) -> int | None:
        try:
            response = query(self.nsd_address, zone.name, "SOA", ad=False, timeout=QUERY_TIMEOUT)
        except (dns.exception.Timeout, OSError):
            return None
        for rrset in response.answer:
            for rdata in rrset:
                if isinstance(rdata, dns.rdtypes.ANY.SOA.SOA):
                    return int(rdata.serial)
        return None

    def _nsd_process(self) -> subprocess.Popen[bytes]:
        assert self.nsd.process is not None
        return self.nsd.process

    # ---- servers ----

    def _nsd_config(self) -> str:
        d = self.workdir
        zones = "".join(
            f'zone:\n  name: "{zone.name}"\n  zonefile: "{zone.file_stem}.served"\n'
            for zone in self.zones.values()
        )
        return f"""\
# Generated by tests/support/dns.py; private to one test run.
server:
  ip-address: {LOOPBACK}
  port: {self.nsd_port}
  username: ""
  chroot: ""
  zonesdir: "{d}"
  database: ""
  pidfile: ""
  logfile: "{d / "nsd.log"}"
  xfrdfile: "{d / "xfrd.state"}"
  zonelistfile: "{d / "zone.list"}"
  xfrdir: "{d}"
  server-count: 1
  reuseport: no
  verbosity: 2
  hide-version: yes
remote-control:
  control-enable: no
{zones}"""

    def _unbound_config(self) -> str:
        d = self.workdir
        lines = [
            "# Generated by tests/support/dns.py; private to one test run.",
            "server:",
            f"  interface: {LOOPBACK}",
            f"  port: {self.unbound_port}",
            "  do-daemonize: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{d}"',
            '  pidfile: ""',
            "  use-syslog: no",
            f'  logfile: "{d / "unbound.log"}"',
            # 3 logs every upstream query with its address ("sending to target").
            "  verbosity: 3",
            "  log-time-ascii: yes",
            "  num-threads: 1",
            "  so-reuseport: no",
            "  do-ip6: no",
            "  access-control: 127.0.0.0/8 allow",
            # Unbound skips 127.0.0.0/8 upstreams by default; ours are all there.
            "  do-not-query-localhost: no",
            '  module-config: "validator iterator"',
            "  val-log-level: 2",
            # No key-tag and sentinel queries (RFC 8145, 8509): only the test's own.
            "  trust-anchor-signaling: no",
            "  root-key-sentinel: no",
            # Clients get REFUSED for everything outside the test zones.
            '  local-zone: "." refuse',
        ]
        for zone in self.zones.values():
            lines.append(f'  local-zone: "{zone.name}" transparent')
        for zone in self.zones.values():
            if zone.name in self.trust_anchors:
                lines.append(f'  trust-anchor: "{self.trust_anchors[zone.name]}"')
        # The root too is a stub at NSD (which refuses it): whatever Unbound might look
        # up by itself goes to loopback instead of the root servers of its built-in hints.
        for name in [".", *self.zones]:
            lines += ["stub-zone:", f'  name: "{name}"', f"  stub-addr: {LOOPBACK}@{self.nsd_port}"]
        lines += [
            "remote-control:",
            "  control-enable: yes",
            f'  control-interface: "{d / "unbound.ctl"}"',
            "  control-use-cert: no",
        ]
        return "\n".join(lines) + "\n"

    def _unbound_control(self, *args: str) -> str:
        return _run(
            [_binary("unbound-control"), "-c", str(self.workdir / "unbound.conf"), *args],
            self.workdir,
        )

    def start(self) -> None:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for zone in self.zones.values():
            if zone.signed:
                self._make_keys(zone)
            self._write_zone(zone)
        for attempt in range(PORT_TRIES):
            self.nsd_port = free_port()
            config = self.workdir / "nsd.conf"
            config.write_text(self._nsd_config())
            self.nsd.start([_binary("nsd"), "-d", "-c", str(config)])
            try:
                _wait_answering(self.nsd, self.nsd_address, SIGNED_ZONE, "SOA")
                break
            except DnsTestbedError:
                self.nsd.stop()
                if attempt == PORT_TRIES - 1:
                    raise
        for attempt in range(PORT_TRIES):
            self.unbound_port = free_port()
            config = self.workdir / "unbound.conf"
            config.write_text(self._unbound_config())
            _run([_binary("unbound-checkconf"), str(config)], self.workdir)
            self.unbound.start([_binary("unbound"), "-d", "-c", str(config)])
            try:
                # A CHAOS query Unbound answers itself: it is up, and NSD is not involved.
                _wait_answering(self.unbound, self.unbound_address, "version.server", "TXT", "CH")
                break
            except DnsTestbedError:
                self.unbound.stop()
                if attempt == PORT_TRIES - 1:
                    raise
        self.start_seconds = time.monotonic() - started

    def stop(self) -> None:
        self.unbound.stop()
        self.nsd.stop()

    def outgoing_targets(self) -> list[str]:
        """Every upstream address Unbound has sent a query to, as "ADDRESS#PORT"."""
        targets = []
        for line in self.unbound.log_path.read_text(errors="replace").splitlines():
            if "sending to target:" in line:
                targets.append(line.rsplit(" ", 1)[-1])
        return targets

    def unbound_log(self) -> str:
        return self.unbound.log_path.read_text(errors="replace")

    def __enter__(self) -> Testbed:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _one_line(record: str) -> str:
    return " ".join(record.split())


def _ds_from_key(key_file: Path, zone_name: str) -> str:
    output = _run([_binary("dnssec-dsfromkey"), "-2", str(key_file)], key_file.parent)
    for line in output.splitlines():
        if " DS " in f" {_one_line(line)} ":
            return _one_line(line)
    raise DnsTestbedError(f"no DS for {zone_name} from {key_file}: {output!r}")


def default_zones() -> list[Zone]:
    return [
        Zone(SIGNED_ZONE, signed=True),
        Zone(UNSIGNED_ZONE, signed=False),
        Zone(BOGUS_ZONE, signed=True, wrong_anchor=True),
    ]


@pytest.fixture(scope="session")
def dns_testbed() -> Iterator[Testbed]:
    """NSD + validating Unbound on loopback for the whole session (see module doc)."""
    require_dns_binaries()
    # Short and outside pytest's tmp tree: Unbound's control socket path must fit
    # into a unix socket address.
    workdir = Path(tempfile.mkdtemp(prefix="pop3exp-dns-"))
    try:
        with Testbed(workdir, default_zones()) as testbed:
            yield testbed
            # Whatever the session's tests asked, Unbound asked only NSD.
            nsd = f"{LOOPBACK}#{testbed.nsd_port}"
            strays = set(testbed.outgoing_targets()) - {nsd}
            if strays:
                pytest.fail(f"Unbound sent queries to {sorted(strays)}", pytrace=False)
    finally:
        if os.environ.get(KEEP_ENV) != "1":
            shutil.rmtree(workdir, ignore_errors=True)
