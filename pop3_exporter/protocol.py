"""A small asyncio POP3 client connection: line reading with limits, commands, STLS.

TLS runs over ssl.SSLObject and memory BIOs on the raw stream instead of asyncio's
TLS transport, because we need the SSL object after a failed handshake (to report the
certificates presented) and full control of the plaintext buffer around STLS.

Connections we open ourselves read the socket directly (_SocketStream) rather than
through asyncio's transport and StreamReader: fewer layers per probe, and on Linux the
kernel's receive timestamp of each read, so that the greeting latency we report is
when the greeting arrived, not when a busy event loop got round to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import platform
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from pop3_exporter.errors import (
    ConnectError,
    ConnectionClosedError,
    ConnectRefusedError,
    LineTooLongError,
    ProtocolError,
    TLSHandshakeError,
)
from pop3_exporter.result import CertFacts, TLSFacts
from pop3_exporter.tlsinfo import (
    cert_facts,
    presented_chain_der,
    tls_version_label,
    verification_error,
    verified_chain_der,
)

# RFC 2449 caps response lines at 512 octets; real servers stay far below. We allow
# more before calling it a protocol error, so that a chatty banner is not a failure.
MAX_LINE_BYTES = 4096
# More capability lines than this is abuse, and each would become a label value.
MAX_CAPA_LINES = 256
_READ_CHUNK = 65536
# Distinct certificate chains whose parsed facts are kept. A target presents the same
# chain probe after probe, and parsing it (x509, names, SANs, SHA-256) cost about a
# fifth of a TLS probe's CPU; the facts depend on the DER bytes alone. Chains above
# the byte cap (typical ones are 1-5 KiB) are parsed every time, so that the cache
# stays below about 2048 * 2 * 8 KiB whatever targets present.
CERT_FACTS_CACHE_SIZE = 2048
CERT_FACTS_CACHE_MAX_CHAIN_BYTES = 8192

# SO_TIMESTAMPNS: the kernel stamps each received segment (CLOCK_REALTIME) and recvmsg
# returns the stamp of the last one read. Python's socket module does not name it; 35
# is its value in the generic Linux ABI, which these architectures use.
_SO_TIMESTAMPNS = 35
_TIMESTAMP_ARCHITECTURES = frozenset(
    {"x86_64", "amd64", "aarch64", "arm64", "i386", "i686", "armv7l", "riscv64", "s390x"}
)
KERNEL_TIMESTAMPS = (
    sys.platform == "linux" and platform.machine().lower() in _TIMESTAMP_ARCHITECTURES
)
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
# A kernel time later than the loop's by more than this means the wall clock stepped.
_CLOCK_TOLERANCE = 0.001

TranscriptSink = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Response:
    ok: bool
    text: str  # the whole status line, without the line ending


def decode_line(raw: bytes) -> str:
    """Decode a server line for matching and display; never fails."""
    return raw.decode("utf-8", errors="replace")


class _SocketStream:
    """A connected non-blocking socket, read by one reader callback on the loop.

    It stands in for both StreamReader and StreamWriter (read, write, drain, close,
    wait_closed). It reads as soon as the loop sees the socket readable, keeps at most
    _READ_CHUNK bytes unread (then stops reading until they are taken), and notes when
    the last data arrived: by the loop's clock, and by the kernel's where available.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, *, timestamps: bool
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._timestamps = timestamps
        self._buffer = bytearray()
        self._pending = bytearray()  # written but not yet accepted by the kernel
        self._eof = False
        self._error: OSError | None = None
        self._write_error: OSError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading = False
        self._closed = False
        self.arrival = 0.0  # loop.time() when the last data was read
        self.arrival_wall: float | None = None  # the kernel's time.time() for it
        self._start_reading()

    def _start_reading(self) -> None:
        if not (self._reading or self._eof or self._closed) and self._error is None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        ancillary: list[tuple[int, int, bytes]] = []
        try:
            if self._timestamps:
                data, ancillary, _, _ = self._sock.recvmsg(_READ_CHUNK, _ANCILLARY_SIZE)
            else:
                data = self._sock.recv(_READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # includes ConnectionResetError
            self._error = exc
            self._stop_reading()
        else:
            self.arrival = self._loop.time()
            self.arrival_wall = _kernel_time(ancillary)
            if data:
                self._buffer += data
                if len(self._buffer) >= _READ_CHUNK:
                    self._stop_reading()
            else:
                self._eof = True
                self._stop_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all there are if n < 0); b"" once the peer has closed."""
        while not self._buffer:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            if self._closed:
                raise ConnectionAbortedError("connection closed")
            self._start_reading()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if 0 <= n < len(self._buffer):
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
        else:
            data = bytes(self._buffer)
            self._buffer.clear()
        self._start_reading()
        return data

    def write(self, data: bytes) -> None:
        if self._closed or self._write_error is not None:
            return
        if self._pending:
            self._pending += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._write_error = exc
            return
        if sent < len(data):
            self._pending += data[sent:]

    async def drain(self) -> None:
        if self._write_error is not None:
            raise self._write_error
        if self._closed:
            raise ConnectionAbortedError("connection closed")
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            await self._loop.sock_sendall(self._sock, data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        # A send cut short by a timeout may have left a writer registered.
        self._loop.remove_writer(self._fd)
        self._sock.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_closed(self) -> None:
        return None


def _kernel_time(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            return float(seconds + nanoseconds * 1e-9)
    return None


class Pop3Connection:
    """One TCP connection speaking POP3; owns the socket until close()."""

    def __init__(
        self,
        reader: asyncio.StreamReader | _SocketStream,
        writer: asyncio.StreamWriter | _SocketStream,
        *,
        transcript: TranscriptSink | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self._reader = reader
        self._writer = writer
        # Set by connect(): (loop.time(), time.time()) just before the TCP connect, and
        # the same pair for the arrival of the data that ended the last line read.
        self._started: tuple[float, float] | None = None
        self._arrival: tuple[float, float | None] | None = None
        self._line_arrival: tuple[float, float | None] | None = None
        self._buffer = bytearray()
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._transcript = transcript
        self._max_line_bytes = max_line_bytes

    @classmethod
    async def connect(
        cls,
        address: str,
        port: int,
        *,
        source_address: str | None = None,
        transcript: TranscriptSink | None = None,
    ) -> Pop3Connection:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectError(f"connecting to {address} port {port}: {exc}") from exc
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            timestamps = KERNEL_TIMESTAMPS
            if timestamps:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
                except OSError:
                    timestamps = False
            if source_address:
                sock.bind((source_address, 0))
            started = (loop.time(), time.time())
            await loop.sock_connect(sock, (address, port))
        except ConnectionRefusedError as exc:
            sock.close()
            raise ConnectRefusedError(f"connection refused by {address} port {port}") from exc
        except OSError as exc:
            sock.close()
            raise ConnectError(f"connecting to {address} port {port}: {exc}") from exc
        except BaseException:  # cancelled, or the probe deadline
            sock.close()
            raise
        stream = _SocketStream(loop, sock, timestamps=timestamps)
        connection = cls(stream, stream, transcript=transcript)
        connection._started = started
        return connection

    @property
    def tls_active(self) -> bool:
        return self._tls is not None

    def _note(self, direction: str, text: str) -> None:
        if self._transcript is not None:
            self._transcript(direction, text)

    async def _receive(self) -> bytes:
        try:
            data = await self._reader.read(_READ_CHUNK)
        except OSError as exc:  # includes ConnectionResetError
            raise ConnectionClosedError(f"connection lost: {exc}") from exc
        if isinstance(self._reader, _SocketStream):
            self._arrival = (self._reader.arrival, self._reader.arrival_wall)
        return data

    def line_latency(self) -> float | None:
        """Seconds from the TCP connect to the arrival of the data that completed the
        last line read_line() returned; None if unknown (not opened by connect()).

        It is the kernel's receive time where there is one, else the time the event
        loop saw the data; either way not when the probe's task got to run again."""
        if self._started is None or self._line_arrival is None:
            return None
        arrival, arrival_wall = self._line_arrival
        latency = arrival - self._started[0]
        if arrival_wall is not None:
            kernel_latency = arrival_wall - self._started[1]
            if 0.0 <= kernel_latency <= latency + _CLOCK_TOLERANCE:
                return kernel_latency
        return latency

    async def _fill(self) -> None:
        """Append at least one byte of application data to the buffer, or raise."""
        if self._tls is None:
            data = await self._receive()
            if not data:
                raise ConnectionClosedError("server closed the connection")
            self._buffer += data
            return
        while True:
            try:
                chunk = self._tls.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                await self._flush_tls()
                data = await self._receive()
                if not data:
                    raise ConnectionClosedError("server closed the connection") from None
                self._incoming.write(data)
                continue
            except ssl.SSLZeroReturnError as exc:
                raise ConnectionClosedError("server closed the TLS session") from exc
            except ssl.SSLError as exc:
                raise ProtocolError(f"TLS record error: {exc.reason or exc}") from exc
            if not chunk:
                raise ConnectionClosedError("server closed the TLS session")
            self._buffer += chunk
            return

    async def read_line(self) -> bytes:
        """One line without its ending; CRLF and bare LF are both accepted."""
        searched = 0
        while True:
            newline = self._buffer.find(b"\n", searched)
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > self._max_line_bytes:
                    raise LineTooLongError(f"line longer than {self._max_line_bytes} bytes")
                self._line_arrival = self._arrival
                self._note("S", decode_line(line))
                return line
            searched = len(self._buffer)
            # A legal line of max_line_bytes may have its CR here and its LF still
            # in flight: only one byte more, and only a CR, can still become valid.
            if searched > self._max_line_bytes + 1 or (
                searched == self._max_line_bytes + 1 and not self._buffer.endswith(b"\r")
            ):
                raise LineTooLongError(
                    f"more than {self._max_line_bytes} bytes without a line ending"
                )
            await self._fill()

    async def read_response(self) -> Response:
        line = decode_line(await self.read_line())
        if line.startswith("+OK"):
            return Response(ok=True, text=line)
        if line.startswith("-ERR"):
            return Response(ok=False, text=line)
        raise ProtocolError(f"reply is neither +OK nor -ERR: {line[:80]!r}")

    async def read_multiline(self, max_lines: int) -> list[str]:
        """The body of a multi-line reply up to the "." line, with dot-unstuffing."""
        lines: list[str] = []
        while True:
            raw = await self.read_line()
            if raw == b".":
                return lines
            if raw.startswith(b"."):
                raw = raw[1:]
            if len(lines) >= max_lines:
                raise ProtocolError(f"multi-line reply longer than {max_lines} lines")
            lines.append(decode_line(raw))

    async def send_command(self, command: str) -> None:
        self._note("C", command)
        data = command.encode("ascii") + b"\r\n"
        if self._tls is not None:
            self._tls.write(data)
            await self._flush_tls()
        else:
            self._writer.write(data)
            await self._drain()

    async def command(self, command: str) -> Response:
        await self.send_command(command)
        return await self.read_response()

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as exc:
            raise ConnectionClosedError(f"connection lost while sending: {exc}") from exc

    async def _flush_tls(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._writer.write(pending)
            await self._drain()

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> TLSFacts:
        """TLS handshake on this connection (implicit TLS, or after STLS +OK).

        Plaintext already buffered is discarded first: anything a man in the middle
        injected after the STLS reply must never be read as a protected reply
        (RFC 2595 section 4, RFC 3207 section 4.2).
        """
        if self._buffer:
            self._note("*", f"discarded {len(self._buffer)} bytes of plaintext before TLS")
            self._buffer.clear()
        tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        verification_enabled = context.verify_mode != ssl.CERT_NONE
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush_tls()
                data = await self._receive()
                if not data:
                    raise TLSHandshakeError(
                        "server closed the connection during the TLS handshake",
                        _facts(tls, verification_enabled, verified=False),
                    ) from None
                self._incoming.write(data)
            except ssl.SSLCertVerificationError as exc:
                facts = _facts(tls, verification_enabled, verified=False, error=exc)
                error_type = verification_error(exc)
                raise error_type(f"certificate verify failed: {exc.verify_message}", facts) from exc
            except ssl.SSLError as exc:
                facts = _facts(tls, verification_enabled, verified=False)
                raise TLSHandshakeError(
                    f"TLS handshake failed: {exc.reason or exc}", facts
                ) from exc
        await self._flush_tls()
        self._tls = tls
        facts = _facts(tls, verification_enabled, verified=verification_enabled)
        self._note("*", f"TLS established: {facts.version} {facts.cipher}")
        return facts

    async def close(self) -> None:
        self._writer.close()
        # The server may have reset first; the socket is closed either way.
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    def close_now(self) -> None:
        """Close without waiting for the peer (the probe's result is already known)."""
        self._writer.close()  # StreamWriter.close() is its transport's close()


def _facts(
    tls: ssl.SSLObject,
    verification_enabled: bool,
    *,
    verified: bool,
    error: ssl.SSLCertVerificationError | None = None,
) -> TLSFacts:
    cipher = tls.cipher()
    return TLSFacts(
        verification_enabled=verification_enabled,
        verified=verified,
        verify_error=error.verify_message if error is not None else None,
        version=tls_version_label(tls.version()),
        cipher=cipher[0] if cipher else None,
        presented_chain=_chain_facts(presented_chain_der(tls)),
        verified_chain=_chain_facts(verified_chain_der(tls)) if verified else (),
    )


def _chain_facts(chain: list[bytes]) -> tuple[CertFacts, ...]:
    """cert_facts(chain), remembered by the chain's DER bytes (facts are immutable)."""
    key = tuple(chain)
    if sum(map(len, key)) > CERT_FACTS_CACHE_MAX_CHAIN_BYTES:
        return cert_facts(key)
    return _cached_chain_facts(key)


@functools.lru_cache(maxsize=CERT_FACTS_CACHE_SIZE)
def _cached_chain_facts(chain: tuple[bytes, ...]) -> tuple[CertFacts, ...]:
    return cert_facts(chain)
