"""A scriptable fake POP3 server for faults a real Dovecot cannot produce.

The server runs in the test's own event loop. Each accepted connection runs a
*script*, an ``async`` function that receives a :class:`FakeConnection` and
says exactly what the server sends and when. Misbehaviour is a few lines::

    async def slow_greeting(conn: FakeConnection) -> None:
        for byte in b"+OK slow\\r\\n":
            await conn.send(bytes([byte]))
            await asyncio.sleep(1)

    async with FakePop3Server(slow_greeting) as server:
        ...  # probe 127.0.0.1:server.port

:func:`dialogue` builds a well-behaved server from parameters; the other
module-level scripts are ready-made faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

from tests.support.certs import CertFiles

# Upper bounds so that a script never outlives a broken test for long.
MAX_COMMANDS = 10_000
SILENT_MAX_SECONDS = 120.0
CLOSE_TIMEOUT = 2.0


class FakeConnection:
    """One accepted client connection as seen by a script."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        # Every line the client sent, in order, exactly as received (with its line ending).
        self.received: list[bytes] = []
        self.tls = False

    async def send(self, data: bytes) -> None:
        """Send raw bytes and wait until they are handed to the kernel."""
        self.writer.write(data)
        await self.writer.drain()

    async def send_line(self, line: str | bytes) -> None:
        """Send one line; CRLF is appended."""
        data = line.encode() if isinstance(line, str) else line
        await self.send(data + b"\r\n")

    # A plain timeout argument keeps scripts short; asyncio.timeout would add a block each.
    async def readline(self, timeout: float = 10.0) -> bytes:  # noqa: ASYNC109
        """The next line from the client, or ``b""`` on EOF, error or timeout."""
        try:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
        except (TimeoutError, ConnectionError, ssl.SSLError, ValueError):
            # ValueError: a line longer than the reader's limit; treat like EOF.
            return b""
        if line:
            self.received.append(line)
        return line

    async def start_tls(self, ctx: ssl.SSLContext, *, handshake_timeout: float = 10.0) -> None:
        """Upgrade this connection to TLS as the server side (after "+OK" to STLS)."""
        await self.writer.start_tls(ctx, ssl_handshake_timeout=handshake_timeout)
        self.tls = True

    def abort(self) -> None:
        """Reset the connection: SO_LINGER 0 makes the kernel send RST, not FIN."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close politely (TLS close_notify if any), bounded in time; abort if stuck."""
        if self.writer.transport.is_closing():
            # Already closing or aborted: only wait for the transport to finish.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
            return
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            self.writer.transport.abort()


Script = Callable[[FakeConnection], Awaitable[None]]


class FakePop3Server:
    """Listens on ``host`` port 0 and runs ``script`` for every connection.

    With ``ssl_context`` the listener speaks implicit TLS (like port 995): the
    handshake completes before the script starts, and failed handshakes never
    reach the script (nor count in ``connections``).
    """

    def __init__(
        self,
        script: Script,
        *,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 100,
    ) -> None:
        self.script = script
        self.host = host
        self.port = 0
        self.ssl_context = ssl_context
        self.backlog = backlog
        self.connections = 0  # accepted so far (scripts started)
        self.sessions: list[FakeConnection] = []  # in accept order, for inspecting `received`
        self.errors: list[BaseException] = []  # exceptions raised by scripts, not re-raised
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = FakeConnection(reader, writer)
        self.connections += 1
        self.sessions.append(conn)
        try:
            await self.script(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Clients hanging up mid-script is normal in fault tests; keep it
            # for the test to look at instead of logging noise.
            self.errors.append(exc)
        finally:
            await conn.close()
            if task is not None:
                self._tasks.discard(task)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, 0, ssl=self.ssl_context, backlog=self.backlog
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, cancel running scripts and close their connections."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT * 2)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakePop3Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def server_ssl_context(cert: CertFiles) -> ssl.SSLContext:
    """Server-side context presenting ``cert`` (leaf plus its chain file)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.fspath(cert.cert_path), os.fspath(cert.key_path))
    return ctx


def _capa_response(capabilities: Sequence[str]) -> bytes:
    lines = ["+OK Capability list follows", *capabilities, "."]
    return "".join(f"{line}\r\n" for line in lines).encode()


def dialogue(
    *,
    greeting: bytes = b"+OK fake ready\r\n",
    capabilities: Sequence[str] = ("TOP", "UIDL", "USER", "SASL PLAIN LOGIN"),
    stls_context: ssl.SSLContext | None = None,
    capabilities_after_tls: Sequence[str] | None = None,
) -> Script:
    """A well-behaved server: greeting, then CAPA, STLS, NOOP and QUIT.

    STLS is advertised (appended to ``capabilities``) and accepted only when
    ``stls_context`` is given and TLS is not yet active. After the upgrade CAPA
    answers ``capabilities_after_tls`` (default: ``capabilities``). Any other
    command gets ``-ERR unknown``.
    """
    before_tls = list(capabilities)
    if stls_context is not None:
        before_tls.append("STLS")
    after_tls = list(capabilities if capabilities_after_tls is None else capabilities_after_tls)

    async def script(conn: FakeConnection) -> None:
        await conn.send(greeting)
        for _ in range(MAX_COMMANDS):
            line = await conn.readline()
            if not line:
                return
            command = line.strip().split(b" ", 1)[0].upper()
            if command == b"CAPA":
                await conn.send(_capa_response(after_tls if conn.tls else before_tls))
            elif command == b"STLS" and stls_context is not None and not conn.tls:
                await conn.send_line("+OK Begin TLS negotiation")
                await conn.start_tls(stls_context)
            elif command == b"NOOP":
                await conn.send_line("+OK")
            elif command == b"QUIT":
                await conn.send_line("+OK bye")
                return
            else:
                await conn.send_line("-ERR unknown")

    return script


async def silent(conn: FakeConnection) -> None:
    """Accept, never send a byte; read (and record) until the client leaves."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SILENT_MAX_SECONDS
    for _ in range(MAX_COMMANDS):
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        if not await conn.readline(timeout=remaining):
            return


async def close_immediately(conn: FakeConnection) -> None:
    """Accept and close at once (FIN) without a greeting."""
    await conn.close()


async def reset_immediately(conn: FakeConnection) -> None:
    """Accept and reset at once (RST) without a greeting."""
    conn.abort()


async def err_greeting(conn: FakeConnection) -> None:
    """Greet with ``-ERR`` (server refuses service), then close."""
    await conn.send_line("-ERR fake server unavailable")
