"""Tests of the test support code: the PKI, the fake server and the Dovecot wrapper.

The fake server is checked against the standard library's poplib, so that the
exporter's own tests can trust it. Blocking clients (poplib, raw sockets) run
in a thread whenever the fake server shares the test's event loop.
"""

from __future__ import annotations

import asyncio
import poplib
import socket
import ssl
import time
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import DovecotFactory, require_dovecot
from tests.support import dovecot as dovecot_module
from tests.support.certs import VARIANTS, CertFiles, TestPKI, client_ssl_context
from tests.support.dovecot import DovecotError, DovecotServer
from tests.support.fakepop3 import (
    FakeConnection,
    FakePop3Server,
    close_immediately,
    dialogue,
    err_greeting,
    reset_immediately,
    server_ssl_context,
    silent,
)

TIMEOUT = 5.0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no ::1 on this machine")


class _POP3(poplib.POP3):
    """poplib.POP3 that verifies STLS as ``tls_hostname`` and never leaks its socket.

    poplib leaves the socket open when the greeting is refused in __init__,
    which filterwarnings=error would turn into a ResourceWarning failure.
    """

    def __init__(self, host: str, port: int, *, tls_hostname: str | None = None) -> None:
        self.tls_hostname = tls_hostname or host
        try:
            super().__init__(host, port, timeout=TIMEOUT)
        except BaseException:
            self._close_quietly()
            raise

    def _close_quietly(self) -> None:
        for name in ("file", "sock"):
            resource = getattr(self, name, None)
            if resource is not None:
                resource.close()

    def stls(self, context: ssl.SSLContext | None = None) -> bytes:
        # poplib passes self.host as server_hostname; connect by IP, verify by name.
        host, self.host = self.host, self.tls_hostname
        try:
            return super().stls(context)
        finally:
            self.host = host


class _POP3SSL(poplib.POP3_SSL):
    """poplib.POP3_SSL connecting to ``host`` but verifying ``tls_hostname``."""

    def __init__(self, host: str, port: int, *, context: ssl.SSLContext, tls_hostname: str) -> None:
        self._tls_context = context
        self.tls_hostname = tls_hostname
        super().__init__(host, port, timeout=TIMEOUT, context=context)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout)
        try:
            return self._tls_context.wrap_socket(sock, server_hostname=self.tls_hostname)
        except BaseException:
            sock.close()
            raise


def _raw_capa(host: str, port: int, source: str | None = None) -> tuple[bytes, list[str]]:
    """Greeting and CAPA lines over a plain socket, optionally from a chosen source address."""
    source_address = (source, 0) if source else None
    with (
        socket.create_connection(
            (host, port), timeout=TIMEOUT, source_address=source_address
        ) as sock,
        sock.makefile("rb") as f,
    ):
        greeting = f.readline()
        sock.sendall(b"CAPA\r\n")
        status = f.readline()
        assert status.startswith(b"+OK"), status
        lines: list[str] = []
        for _ in range(100):  # bounded: a CAPA list is a handful of lines
            line = f.readline()
            if line in (b".\r\n", b""):
                break
            lines.append(line.decode().rstrip("\r\n"))
        sock.sendall(b"QUIT\r\n")
        return greeting, lines


def _chain(cert: CertFiles) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(cert.cert_path.read_bytes())


# ---------------------------------------------------------------- PKI


async def _tls_handshake(
    cert: CertFiles, ca_file: Path, server_hostname: str, host: str = "127.0.0.1"
) -> int | bytes:
    """A real handshake against an asyncio server presenting ``cert``.

    Returns the verify_code on failure, else the peer's leaf certificate (DER).
    """
    async with FakePop3Server(
        dialogue(), host=host, ssl_context=server_ssl_context(cert)
    ) as server:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    server.port,
                    ssl=client_ssl_context(ca_file),
                    server_hostname=server_hostname,
                ),
                TIMEOUT,
            )
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_code
        try:
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"+OK fake ready\r\n"
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert isinstance(der, bytes)
            return der
        finally:
            writer.close()
            await writer.wait_closed()


def test_pki_has_exactly_the_variants(pki: TestPKI) -> None:
    assert tuple(pki.variants) == VARIANTS
    root = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    for name, cert in pki.variants.items():
        assert cert.name == name
        chain = _chain(cert)
        assert chain[0].public_bytes(Encoding.DER) == cert.leaf_der
        assert root not in chain, f"{name}: the root must never be presented"
        assert cert.leaf_not_after == chain[0].not_valid_after_utc
        assert cert.leaf_not_after.tzinfo is UTC
        assert cert.leaf_not_after.microsecond == 0
        assert cert.earliest_not_after == min(c.not_valid_after_utc for c in chain)
        assert cert.key_path.stat().st_mode & 0o777 == 0o644
        # Loads as a server identity: key matches the leaf.
        server_ssl_context(cert)
    expected_lengths = {"self_signed": 1, "incomplete_chain": 1}
    for name, cert in pki.variants.items():
        assert len(_chain(cert)) == expected_lengths.get(name, 2), name


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
async def test_good_chain_verifies(pki: TestPKI, hostname: str) -> None:
    good = pki.variants["good"]
    assert await _tls_handshake(good, pki.ca_file, hostname) == good.leaf_der


@needs_ipv6
async def test_good_chain_verifies_over_ipv6(pki: TestPKI) -> None:
    good = pki.variants["good"]
    assert await _tls_handshake(good, pki.ca_file, "::1", host="::1") == good.leaf_der


async def test_intermediate_expires_first_verifies_now(pki: TestPKI) -> None:
    cert = pki.variants["intermediate_expires_first"]
    assert await _tls_handshake(cert, pki.ca_file, "localhost") == cert.leaf_der


@pytest.mark.parametrize(
    ("variant", "codes"),
    [
        ("expired", {10}),  # X509_V_ERR_CERT_HAS_EXPIRED
        ("not_yet_valid", {9}),  # X509_V_ERR_CERT_NOT_YET_VALID
        ("self_signed", {18, 19}),  # DEPTH_ZERO_SELF_SIGNED_CERT / SELF_SIGNED_CERT_IN_CHAIN
        ("wrong_host", {62}),  # X509_V_ERR_HOSTNAME_MISMATCH
        ("incomplete_chain", {20}),  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    ],
)
async def test_bad_variants_fail_verification(pki: TestPKI, variant: str, codes: set[int]) -> None:
    result = await _tls_handshake(pki.variants[variant], pki.ca_file, "localhost")
    assert result in codes


def test_earliest_not_after_is_the_intermediate(pki: TestPKI) -> None:
    cert = pki.variants["intermediate_expires_first"]
    leaf, intermediate = _chain(cert)
    assert leaf.not_valid_after_utc == cert.leaf_not_after
    assert cert.earliest_not_after == intermediate.not_valid_after_utc
    assert cert.earliest_not_after < cert.leaf_not_after
    assert intermediate.not_valid_before_utc < cert.earliest_not_after
    good = pki.variants["good"]
    assert good.earliest_not_after == good.leaf_not_after


# ---------------------------------------------------------------- fake server vs poplib


async def test_dialogue_with_poplib_stls(pki: TestPKI) -> None:
    script = dialogue(
        greeting=b"+OK hello there\r\n",
        stls_context=server_ssl_context(pki.variants["good"]),
        capabilities_after_tls=("TOP", "UIDL", "USER"),
    )

    def client(port: int) -> tuple[bytes, dict[str, list[str]], bytes, dict[str, list[str]], bytes]:
        pop = _POP3("127.0.0.1", port, tls_hostname="localhost")
        try:
            welcome = pop.getwelcome()
            before = pop.capa()
            stls = pop.stls(client_ssl_context(pki.ca_file))
            after = pop.capa()
            return welcome, before, stls, after, pop.quit()
        finally:
            pop.close()

    async with FakePop3Server(script) as server:
        welcome, before, stls, after, bye = await asyncio.to_thread(client, server.port)
        await _wait_for_scripts(server)

    assert welcome == b"+OK hello there"
    assert before == {"TOP": [], "UIDL": [], "USER": [], "SASL": ["PLAIN", "LOGIN"], "STLS": []}
    assert stls.startswith(b"+OK")
    assert after == {"TOP": [], "UIDL": [], "USER": []}
    assert bye == b"+OK bye"
    assert server.connections == 1
    # poplib's stls() sends its own CAPA first.
    assert server.sessions[0].received == [
        b"CAPA\r\n",
        b"CAPA\r\n",
        b"STLS\r\n",
        b"CAPA\r\n",
        b"QUIT\r\n",
    ]
    assert server.sessions[0].tls
    assert server.errors == []


async def _wait_for_scripts(server: FakePop3Server) -> None:
    """Let the scripts see the client's last bytes before asserting on them."""
    for _ in range(100):
        if all(s.writer.transport.is_closing() for s in server.sessions):
            return
        await asyncio.sleep(0.01)


async def test_dialogue_without_stls_and_other_commands() -> None:
    def client(port: int) -> tuple[bytes, dict[str, list[str]], bytes, str, bytes]:
        pop = _POP3("127.0.0.1", port)
        try:
            capa = pop.capa()
            noop = pop.noop()
            with pytest.raises(poplib.error_proto) as err:
                pop.user("someone")
            return pop.getwelcome(), capa, noop, str(err.value), pop.quit()
        finally:
            pop.close()

    async with FakePop3Server(dialogue(capabilities=("UIDL",))) as server:
        welcome, capa, noop, err, bye = await asyncio.to_thread(client, server.port)
    assert welcome == b"+OK fake ready"
    assert capa == {"UIDL": []}
    assert noop == b"+OK"
    assert "-ERR unknown" in err
    assert bye == b"+OK bye"


async def test_implicit_tls_with_poplib(pki: TestPKI) -> None:
    def client(port: int) -> tuple[bytes, bytes]:
        pop = _POP3SSL(
            "127.0.0.1", port, context=client_ssl_context(pki.ca_file), tls_hostname="localhost"
        )
        try:
            return pop.getwelcome(), pop.quit()
        finally:
            pop.close()

    ctx = server_ssl_context(pki.variants["good"])
    async with FakePop3Server(dialogue(), ssl_context=ctx) as server:
        assert await asyncio.to_thread(client, server.port) == (b"+OK fake ready", b"+OK bye")


@needs_ipv6
async def test_fake_server_on_ipv6() -> None:
    def client(port: int) -> bytes:
        pop = _POP3("::1", port)
        try:
            return pop.quit()
        finally:
            pop.close()

    async with FakePop3Server(dialogue(), host="::1") as server:
        assert server.host == "::1"
        assert await asyncio.to_thread(client, server.port) == b"+OK bye"


async def test_err_greeting_raises_error_proto() -> None:
    async with FakePop3Server(err_greeting) as server:
        with pytest.raises(poplib.error_proto, match="-ERR fake server unavailable"):
            await asyncio.to_thread(_POP3, "127.0.0.1", server.port)


async def test_close_immediately_is_eof() -> None:
    async with FakePop3Server(close_immediately) as server:
        with pytest.raises(poplib.error_proto, match="EOF"):
            await asyncio.to_thread(_POP3, "127.0.0.1", server.port)


def _recv_first(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        return sock.recv(100)


async def test_reset_immediately_is_rst() -> None:
    async with FakePop3Server(reset_immediately) as server:
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(_recv_first, server.port)


async def test_silent_sends_nothing_and_records_input() -> None:
    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(b"CAPA\r\n")
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(100)

    async with FakePop3Server(silent) as server:
        await asyncio.to_thread(client, server.port)
        await _wait_for_scripts(server)
    assert server.sessions[0].received == [b"CAPA\r\n"]


async def test_exit_cancels_running_scripts_quickly() -> None:
    started = asyncio.Event()

    async def hang(conn: FakeConnection) -> None:
        started.set()
        await asyncio.sleep(3600)

    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        began = time.monotonic()
        async with FakePop3Server(hang) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await asyncio.wait_for(started.wait(), TIMEOUT)
        assert time.monotonic() - began < 3
        assert server.connections == 1
        # The client sees the connection closed.
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        if writer is not None:
            writer.close()
            await writer.wait_closed()


async def test_send_and_script_errors_are_recorded() -> None:
    async def fragments(conn: FakeConnection) -> None:
        await conn.send(b"+OK ")
        await conn.send_line(b"split greeting")
        await conn.send_line("-ERR bye")
        raise RuntimeError("script bug")

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            data = b""
            for _ in range(20):
                chunk = sock.recv(100)
                if not chunk:
                    break
                data += chunk
            return data

    async with FakePop3Server(fragments) as server:
        assert await asyncio.to_thread(client, server.port) == b"+OK split greeting\r\n-ERR bye\r\n"
    assert [str(e) for e in server.errors] == ["script bug"]


# ---------------------------------------------------------------- require_dovecot


def test_require_dovecot_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.conftest.dovecot_binary", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_dovecot()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_dovecot()


# ---------------------------------------------------------------- real Dovecot


@pytest.mark.dovecot
def test_dovecot_plain_greeting_and_capa(dovecot: DovecotServer) -> None:
    pop = _POP3("127.0.0.1", dovecot.pop3_port)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        assert "STLS" in pop.capa()
        pop.quit()
    finally:
        pop.close()


@pytest.mark.dovecot
def test_dovecot_implicit_tls(dovecot: DovecotServer, pki: TestPKI) -> None:
    pop = _POP3SSL(
        "127.0.0.1",
        dovecot.pop3s_port,
        context=client_ssl_context(pki.ca_file),
        tls_hostname="localhost",
    )
    try:
        assert pop.getwelcome().startswith(b"+OK")
        assert isinstance(pop.sock, ssl.SSLSocket)
        assert pop.sock.getpeercert(binary_form=True) == pki.variants["good"].leaf_der
        pop.quit()
    finally:
        pop.close()


@pytest.mark.dovecot
def test_dovecot_stls_then_login(dovecot: DovecotServer, pki: TestPKI) -> None:
    pop = _POP3("127.0.0.1", dovecot.pop3_port, tls_hostname="localhost")
    try:
        assert pop.stls(client_ssl_context(pki.ca_file)).startswith(b"+OK")
        assert "STLS" not in pop.capa()
        pop.user("probe")
        pop.pass_("secret")
        assert pop.stat() == (0, 0)
        pop.quit()
    finally:
        pop.close()


@pytest.mark.dovecot
def test_dovecot_wrong_password_fails_fast(dovecot: DovecotServer, pki: TestPKI) -> None:
    pop = _POP3("127.0.0.1", dovecot.pop3_port)
    try:
        pop.stls(client_ssl_context(pki.ca_file))
        pop.user("probe")
        began = time.monotonic()
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop.pass_("wrong")
        assert time.monotonic() - began < 1.5  # auth_failure_delay = 0
    finally:
        pop.close()


@needs_ipv6
@pytest.mark.dovecot
def test_dovecot_listens_on_ipv6(dovecot: DovecotServer) -> None:
    greeting, capabilities = _raw_capa("::1", dovecot.pop3_port)
    assert greeting.startswith(b"+OK")
    assert "STLS" in capabilities


@pytest.mark.dovecot
def test_dovecot_secured_only_from_its_own_address(dovecot: DovecotServer) -> None:
    _, same_address = _raw_capa("127.0.0.1", dovecot.pop3_port)
    assert "USER" in same_address
    assert "SASL PLAIN LOGIN" in same_address
    _, other_address = _raw_capa("127.0.0.1", dovecot.pop3_port, source="127.0.0.2")
    assert "STLS" in other_address
    assert "USER" not in other_address
    assert "SASL" in other_address  # advertised, but without mechanisms
    assert not any(line.startswith("SASL ") for line in other_address)


@pytest.mark.dovecot
def test_dovecot_variant_presents_that_certificate(
    dovecot_variant: DovecotFactory, pki: TestPKI
) -> None:
    server = dovecot_variant("expired")
    assert dovecot_variant("expired") is server  # cached
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        _POP3SSL(
            "127.0.0.1",
            server.pop3s_port,
            context=client_ssl_context(pki.ca_file),
            tls_hostname="localhost",
        )
    assert err.value.verify_code == 10
    insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    pop = _POP3SSL("127.0.0.1", server.pop3s_port, context=insecure, tls_hostname="localhost")
    try:
        assert isinstance(pop.sock, ssl.SSLSocket)
        assert pop.sock.getpeercert(binary_form=True) == pki.variants["expired"].leaf_der
        pop.quit()
    finally:
        pop.close()


@pytest.mark.dovecot
def test_dovecot_lifecycle(pki: TestPKI, dovecot_workroot: Path) -> None:
    require_dovecot()
    server = DovecotServer(
        dovecot_workroot / "lifecycle", pki.variants["good"], listen=["127.0.0.1"]
    )
    assert not server.running
    with server:
        assert server.running
        assert server.pop3_port != server.pop3s_port
        assert server.start_seconds is not None
        greeting, _ = _raw_capa("127.0.0.1", server.pop3_port)
        assert greeting.startswith(b"+OK")
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
    assert not server.running
    assert server.stop_seconds is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.pop3_port), timeout=TIMEOUT).close()
    server.stop()  # idempotent
    assert "starting up" in server.log_tail()


@pytest.mark.dovecot
def test_dovecot_refuses_a_private_workdir(pki: TestPKI, tmp_path: Path) -> None:
    require_dovecot()
    tmp_path.chmod(0o700)
    server = DovecotServer(tmp_path / "dc", pki.variants["good"])
    with pytest.raises(RuntimeError, match="not traversable"):
        server.start()
    assert not server.running


def _blocked_port_picker(
    monkeypatch: pytest.MonkeyPatch, blocked: int, times: int
) -> list[list[int]]:
    """Make the first ``times`` port picks return ``blocked``; returns the picks made."""
    real = dovecot_module._pick_ports
    picks: list[list[int]] = []

    def pick(listen: Sequence[str], count: int = 2, tries: int = 50) -> list[int]:
        ports = real(listen, count, tries)
        if len(picks) < times:
            ports[0] = blocked
        picks.append(ports)
        return ports

    monkeypatch.setattr(dovecot_module, "_pick_ports", pick)
    return picks


@pytest.mark.dovecot
def test_dovecot_start_retries_a_lost_port(
    pki: TestPKI, dovecot_workroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_dovecot()
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        blocked = blocker.getsockname()[1]
        picks = _blocked_port_picker(monkeypatch, blocked, times=1)
        with DovecotServer(
            dovecot_workroot / "retry", pki.variants["good"], listen=["127.0.0.1"]
        ) as server:
            assert len(picks) == 2
            assert server.pop3_port != blocked
            greeting, _ = _raw_capa("127.0.0.1", server.pop3_port)
            assert greeting.startswith(b"+OK Dovecot")
            assert "Address already in use" in server.log_tail()


@pytest.mark.dovecot
def test_dovecot_start_failure_reports_the_log(
    pki: TestPKI, dovecot_workroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_dovecot()
    with socket.create_server(("127.0.0.1", 0)) as blocker:
        picks = _blocked_port_picker(monkeypatch, blocker.getsockname()[1], times=100)
        # Each failed attempt costs Dovecot's ~1 s exit; two show the loop gives up.
        monkeypatch.setattr(dovecot_module, "START_ATTEMPTS", 2)
        server = DovecotServer(
            dovecot_workroot / "blocked", pki.variants["good"], listen=["127.0.0.1"]
        )
        with pytest.raises(DovecotError, match="Address already in use"):
            server.start()
    assert len(picks) == 2
    assert not server.running
