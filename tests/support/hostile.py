"""Misbehaving POP3 servers: scripts for :class:`FakePop3Server` and a full-backlog listener.

Each script here is one entry of the hostile-server catalogue in
``tests/test_hostile_servers.py``. Every loop is bounded in count and in time, so
a script outlives a broken test by seconds at most (and ``FakePop3Server.stop``
cancels it anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

from tests.support.certs import CertFiles
from tests.support.fakepop3 import MAX_COMMANDS, FakeConnection, Script, dialogue, silent

PLAIN_CAPABILITIES: tuple[str, ...] = ("TOP", "UIDL", "USER", "SASL PLAIN LOGIN")
# After STLS a well-run server stops offering plaintext-only mechanisms.
TLS_CAPABILITIES: tuple[str, ...] = ("TOP", "UIDL", "USER", "SASL PLAIN")
# What a man in the middle appends to the STLS "+OK" (a forged, complete CAPA reply).
INJECTED_NAME = "X-INJECTED-BY-MITM"
INJECTED_PLAINTEXT = f"+OK forged capability list\r\n{INJECTED_NAME}\r\n.\r\n".encode()

# Returns False to end the session after the STLS command.
StlsHandler = Callable[[FakeConnection], Awaitable[bool]]


def capa_block(capabilities: Sequence[str | bytes], eol: bytes = b"\r\n") -> bytes:
    """A complete CAPA reply (status, lines, terminator) with the given line ending."""
    lines = [b"+OK capability list follows"]
    lines += [c.encode() if isinstance(c, str) else c for c in capabilities]
    lines.append(b".")
    return b"".join(line + eol for line in lines)


async def serve(
    conn: FakeConnection,
    *,
    greeting: bytes = b"+OK hostile server ready\r\n",
    capabilities: Sequence[str | bytes] = PLAIN_CAPABILITIES,
    after_tls: Sequence[str | bytes] | None = None,
    stls: StlsHandler | None = None,
    eol: bytes = b"\r\n",
    on_quit: Script | None = None,
) -> None:
    """A command loop whose details (line ending, STLS behaviour) are parameters.

    ``stls`` handles the STLS command (only while TLS is not active); the
    capabilities are sent exactly as given (add "STLS" to advertise it).
    """
    await conn.send(greeting)
    for _ in range(MAX_COMMANDS):
        line = await conn.readline()
        if not line:
            return
        command = line.strip().split(b" ", 1)[0].upper()
        if command == b"CAPA":
            listed = after_tls if conn.tls and after_tls is not None else capabilities
            await conn.send(capa_block(listed, eol))
        elif command == b"STLS" and stls is not None and not conn.tls:
            if not await stls(conn):
                return
        elif command == b"QUIT":
            if on_quit is None:
                await conn.send(b"+OK bye" + eol)
            else:
                await on_quit(conn)
            return
        else:
            await conn.send(b"-ERR unknown" + eol)


def split_greeting(
    parts: Sequence[bytes],
    pause: float,
    capabilities: Sequence[str] = PLAIN_CAPABILITIES,
) -> Script:
    """The greeting in several writes with pauses between them, then a normal session.

    Over plain TCP each write is its own segment (asyncio sets TCP_NODELAY); on an
    implicit-TLS listener each write is its own TLS record.
    """
    rest = dialogue(greeting=b"", capabilities=capabilities)

    async def script(conn: FakeConnection) -> None:
        for index, part in enumerate(parts):
            if index:
                await asyncio.sleep(pause)
            await conn.send(part)
        await rest(conn)

    return script


async def bare_lf(conn: FakeConnection) -> None:
    """Every line the server sends ends in LF alone (no CR)."""
    await serve(conn, greeting=b"+OK bare LF server ready\n", eol=b"\n")


class Trickle:
    """One byte per ``interval`` seconds, never a line ending (bounded by ``max_bytes``)."""

    def __init__(self, interval: float = 1.0, max_bytes: int = 120) -> None:
        self.interval = interval
        self.max_bytes = max_bytes
        self.sent = 0

    async def __call__(self, conn: FakeConnection) -> None:
        payload = b"+OK " + b"z" * self.max_bytes
        for byte in payload[: self.max_bytes]:
            await conn.send(bytes([byte]))
            self.sent += 1
            await asyncio.sleep(self.interval)


class Flood:
    """``total`` bytes without a newline, written in chunks as fast as the client reads."""

    def __init__(self, total: int = 16 * 1024 * 1024, chunk: int = 64 * 1024) -> None:
        self.total = total
        self.chunk = b"+OK" + b"A" * (chunk - 3)
        self.sent = 0

    async def __call__(self, conn: FakeConnection) -> None:
        for _ in range(self.total // len(self.chunk) + 1):
            if self.sent >= self.total:
                return
            # Raises once the client hung up; FakePop3Server records that as a script error.
            await conn.send(self.chunk)
            self.sent += len(self.chunk)


async def capa_never_terminated(conn: FakeConnection) -> None:
    """CAPA starts (+OK and two lines) but the "." never comes."""
    await conn.send(b"+OK hostile server ready\r\n")
    for _ in range(MAX_COMMANDS):
        line = await conn.readline()
        if not line:
            return
        if line.strip().upper() == b"CAPA":
            await conn.send(b"+OK capability list follows\r\nTOP\r\nUIDL\r\n")
            await silent(conn)
            return
        await conn.send(b"-ERR unknown\r\n")


def capa_flood(count: int = 5000, width: int = 0) -> Script:
    """CAPA answered with ``count`` capability lines (then the terminator), each padded
    with an argument of ``width`` bytes."""

    async def script(conn: FakeConnection) -> None:
        padding = " " + "p" * width if width else ""
        names = [f"X-CAP-{index}{padding}" for index in range(count)]
        await serve(conn, capabilities=[*PLAIN_CAPABILITIES, *names])

    return script


async def stls_not_advertised(conn: FakeConnection) -> None:
    """CAPA works but does not list STLS; STLS itself is unknown."""
    await serve(conn, capabilities=PLAIN_CAPABILITIES)


async def _refuse_stls(conn: FakeConnection) -> bool:
    await conn.send(b"-ERR TLS is not available today\r\n")
    return True


async def stls_refused(conn: FakeConnection) -> None:
    """STLS advertised, then answered with -ERR."""
    await serve(conn, capabilities=(*PLAIN_CAPABILITIES, "STLS"), stls=_refuse_stls)


async def _plaintext_instead_of_tls(conn: FakeConnection) -> bool:
    await conn.send(b"+OK begin TLS negotiation\r\n")
    # Wait for the client's ClientHello, then answer it in plaintext.
    with contextlib.suppress(TimeoutError, ConnectionError):
        await asyncio.wait_for(conn.reader.read(16384), 5.0)
    await conn.send(b"+OK this is not a TLS handshake\r\n")
    await silent(conn)
    return False


async def stls_plaintext_instead_of_tls(conn: FakeConnection) -> None:
    """STLS +OK, then plaintext where the TLS ServerHello should be."""
    await serve(conn, capabilities=(*PLAIN_CAPABILITIES, "STLS"), stls=_plaintext_instead_of_tls)


def stls_with_injection(context: ssl.SSLContext) -> Script:
    """STLS +OK with a forged plaintext CAPA reply in the same segment, then real TLS.

    A client that kept the injected bytes would read them, after the handshake, as
    the protected reply to its next CAPA and report ``INJECTED_NAME`` as a capability.
    """

    async def upgrade(conn: FakeConnection) -> bool:
        await conn.send(b"+OK begin TLS negotiation\r\n" + INJECTED_PLAINTEXT)
        await conn.start_tls(context)
        return True

    async def script(conn: FakeConnection) -> None:
        await serve(
            conn,
            capabilities=(*PLAIN_CAPABILITIES, "STLS"),
            after_tls=TLS_CAPABILITIES,
            stls=upgrade,
        )

    return script


def hostile_text(greeting: bytes, capabilities: Sequence[str | bytes]) -> Script:
    """A server whose greeting and capabilities carry arbitrary bytes."""

    async def script(conn: FakeConnection) -> None:
        await serve(conn, greeting=greeting, capabilities=capabilities)

    return script


def limited_version_context(
    cert: CertFiles, maximum: ssl.TLSVersion, minimum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A server context offering at most ``maximum`` (and at least ``minimum``).

    Security level 0 lets OpenSSL 3 actually negotiate TLS 1.0/1.1 when asked to.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        # Python deprecates naming TLS 1.0/1.1; naming them is this server's whole point.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = minimum or maximum
        ctx.maximum_version = maximum
    if maximum < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(os.fspath(cert.cert_path), os.fspath(cert.key_path))
    return ctx


def negotiates(server: ssl.SSLContext, version: ssl.TLSVersion) -> bool:
    """Whether ``server`` can complete a handshake at ``version`` (in memory, no sockets).

    Used to check that a TLS 1.1-only server really speaks TLS 1.1 on this OpenSSL
    build, so that a probe failing against it fails for the version and not for an
    unusable server.
    """
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = client.maximum_version = version
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_side=False)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):  # a handshake takes a handful of flights
        for name, side in (("client", client_side), ("server", server_side)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                return False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client_side.version() == {
                ssl.TLSVersion.TLSv1: "TLSv1",
                ssl.TLSVersion.TLSv1_1: "TLSv1.1",
                ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                ssl.TLSVersion.TLSv1_3: "TLSv1.3",
            }.get(version)
    return False


class FullBacklog:
    """A loopback listener that is never accepted from, with a full accept queue.

    With ``listen(0)`` Linux queues one established connection; once that slot is
    taken, the kernel drops further SYNs (it does not answer them, and SYN cookies do
    not apply to a full accept queue), so a client's connect() neither succeeds nor
    fails until it gives up: a connect timeout without leaving 127.0.0.1.
    """

    FILL_CONNECTIONS = 4
    SETTLE_SECONDS = 2.0

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._listener: socket.socket | None = None
        self._fillers: list[socket.socket] = []

    def __enter__(self) -> FullBacklog:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener = listener
        try:
            listener.bind((self.host, 0))
            listener.listen(0)
            self.port = listener.getsockname()[1]
            for _ in range(self.FILL_CONNECTIONS):
                filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self._fillers.append(filler)
                filler.setblocking(False)
                filler.connect_ex((self.host, self.port))
            self._wait_for_first_filler()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_for_first_filler(self) -> None:
        give_up = time.monotonic() + self.SETTLE_SECONDS
        while time.monotonic() < give_up:
            try:
                self._fillers[0].getpeername()
            except OSError:
                time.sleep(0.01)
                continue
            return

    def drops_syns(self, timeout: float = 0.3) -> bool:
        """True if one more connection attempt neither connects nor fails in ``timeout``."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            try:
                probe.connect((self.host, self.port))
            except TimeoutError:
                return True
            except OSError:
                return False
            return False

    def close(self) -> None:
        for sock in self._fillers:
            sock.close()
        self._fillers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _refuse_stls_then_ignore_quit(conn: FakeConnection) -> bool:
    await conn.send(b"-ERR TLS is not available today\r\n")
    await silent(conn)  # QUIT is read but never answered
    return False


async def stls_refused_quit_ignored(conn: FakeConnection) -> None:
    """STLS advertised, refused with -ERR, and the QUIT that follows never answered."""
    await serve(
        conn, capabilities=(*PLAIN_CAPABILITIES, "STLS"), stls=_refuse_stls_then_ignore_quit
    )


async def _quit_err(conn: FakeConnection) -> None:
    await conn.send(b"-ERR not now\r\n")


async def _quit_garbage(conn: FakeConnection) -> None:
    await conn.send(b"what?\r\n")


async def _quit_hang_up(conn: FakeConnection) -> None:
    conn.abort()


# How a server that did everything else right answers QUIT; none of these may fail
# a probe (QUIT is a courtesy).
QUIT_BEHAVIOURS: dict[str, Script] = {
    "err": _quit_err,
    "garbage": _quit_garbage,
    "silent": silent,
    "hang-up": _quit_hang_up,
}


def bad_quit(kind: str) -> Script:
    """A well-behaved server (greeting, CAPA) whose QUIT reply is QUIT_BEHAVIOURS[kind]."""

    async def script(conn: FakeConnection) -> None:
        await serve(conn, on_quit=QUIT_BEHAVIOURS[kind])

    return script
