"""A small asyncio POP3 client connection: line reading with limits, commands, STLS.

TLS runs over ssl.SSLObject and memory BIOs on the raw stream instead of asyncio's
TLS transport, because we need the SSL object after a failed handshake (to report the
certificates presented) and full control of the plaintext buffer around STLS.

Connections read the socket directly (SocketStream) rather than through asyncio's
transport and StreamReader: fewer layers per probe, and on Linux the kernel's receive
timestamp of each read, so that the greeting latency we report is when the greeting
arrived, not when a busy event loop got round to it.

What this module keeps per connection is bounded whatever the server sends: at most
one read chunk unread in the stream, one line (MAX_LINE_BYTES) being assembled, and
multi-line replies capped as a whole (max_bytes), not only per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType

from pop3_exporter.errors import (
    ConnectError,
    ConnectionClosedError,
    ConnectRefusedError,
    LineTooLongError,
    ProtocolError,
    TLSHandshakeError,
)
from pop3_exporter.tlsinfo import Handshake, handshake_record, verification_error

# RFC 2449 caps response lines at 512 octets; real servers stay far below. We allow
# more before calling it a protocol error, so that a chatty banner is not a failure.
MAX_LINE_BYTES = 4096
# A whole multi-line reply (CAPA, TOP headers, UIDL) is capped too: per line alone,
# 256 lines of 4 KiB would let each probe of a hostile server hold megabytes.
# A real CAPA reply is a few hundred bytes; the headers of one message rarely pass
# 16 KiB.
MAX_REPLY_BYTES = 64 * 1024
_READ_CHUNK = 65536

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

# (direction, text): "C" sent, "S" received, "*" an event.
TranscriptSink = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Response:
    """A status line. `continuation` is the "+ " of a SASL exchange (RFC 5034)."""

    ok: bool
    text: str  # the whole status line, without the line ending
    continuation: bool = False


def decode_line(raw: bytes) -> str:
    """Decode a server line for matching and display; never fails."""
    return raw.decode("utf-8", errors="replace")


class SocketStream:
    """A connected non-blocking socket, read by one reader callback on the loop.

    It reads as soon as the loop sees the socket readable, keeps at most _READ_CHUNK
    bytes unread (then stops reading until they are taken), and notes when the last
    data arrived: by the loop's clock, and by the kernel's where available.
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

    @classmethod
    def wrap(cls, sock: socket.socket) -> SocketStream:
        """A stream on an already connected socket (made non-blocking here)."""
        sock.setblocking(False)
        return cls(asyncio.get_running_loop(), sock, timestamps=False)

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
        # Never more than _READ_CHUNK unread in all, not per read.
        room = _READ_CHUNK - len(self._buffer)
        try:
            if self._timestamps:
                data, ancillary, _, _ = self._sock.recvmsg(room, _ANCILLARY_SIZE)
            else:
                data = self._sock.recv(room)
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

    async def read(self, n: int = _READ_CHUNK) -> bytes:
        """Up to n bytes; b"" once the peer has closed. Raises OSError on a reset."""
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
        if n < len(self._buffer):
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
        else:
            data = bytes(self._buffer)
            self._buffer.clear()
        self._start_reading()
        return data

    async def write(self, data: bytes) -> None:
        """Send all of `data`; raises OSError when the connection is gone."""
        if self._write_error is not None:
            raise self._write_error
        if self._closed:
            raise ConnectionAbortedError("connection closed")
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._write_error = exc
            raise
        if sent < len(data):
            # The kernel's buffer is full: a server that does not read. Wait for it
            # (bounded by the probe deadline, which cancels this).
            try:
                await self._loop.sock_sendall(self._sock, data[sent:])
            except OSError as exc:
                self._write_error = exc
                raise

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


def _kernel_time(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            return float(seconds + nanoseconds * 1e-9)
    return None


class Pop3Connection:
    """One TCP connection speaking POP3; owns the stream until close().

    Use it as an async context manager (or call close()): the socket is closed on exit
    whatever happened, without waiting for the peer.
    """

    def __init__(
        self,
        stream: SocketStream,
        *,
        transcript: TranscriptSink | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        started: tuple[float, float] | None = None,
    ) -> None:
        self._stream = stream
        # (loop.time(), time.time()) just before the TCP connect, and the same pair for
        # the arrival of the data that ended the last line read.
        self._started = started
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
        max_line_bytes: int = MAX_LINE_BYTES,
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
        stream = SocketStream(loop, sock, timestamps=timestamps)
        return cls(stream, transcript=transcript, max_line_bytes=max_line_bytes, started=started)

    async def __aenter__(self) -> Pop3Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def tls_active(self) -> bool:
        return self._tls is not None

    def _note(self, direction: str, text: str) -> None:
        if self._transcript is not None:
            self._transcript(direction, text)

    async def _receive(self) -> bytes:
        try:
            data = await self._stream.read(_READ_CHUNK)
        except OSError as exc:  # includes ConnectionResetError
            raise ConnectionClosedError(f"connection lost: {exc}") from exc
        self._arrival = (self._stream.arrival, self._stream.arrival_wall)
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

    async def read_response(self, *, continuation: bool = False) -> Response:
        """A status line: +OK or -ERR; with `continuation`, a SASL "+ " line too."""
        line = decode_line(await self.read_line())
        if line.startswith("+OK"):
            return Response(ok=True, text=line)
        if line.startswith("-ERR"):
            return Response(ok=False, text=line)
        if continuation and (line == "+" or line.startswith("+ ")):
            return Response(ok=True, text=line, continuation=True)
        raise ProtocolError(f"reply is neither +OK nor -ERR: {line[:80]!r}")

    async def multiline(self, max_lines: int) -> AsyncIterator[bytes]:
        """The lines of a multi-line reply up to the "." line, dot-unstuffed, one at a
        time: the caller keeps only what it needs. More than `max_lines` lines is a
        protocol error. Stopping early leaves the connection out of step."""
        for count in range(max_lines + 1):
            raw = await self.read_line()
            if raw == b".":
                return
            if count == max_lines:
                break
            yield raw[1:] if raw.startswith(b".") else raw
        raise ProtocolError(f"multi-line reply longer than {max_lines} lines")

    async def read_multiline(self, max_lines: int, max_bytes: int = MAX_REPLY_BYTES) -> list[str]:
        """The body of a multi-line reply, decoded. More than `max_lines` lines, or more
        than `max_bytes` bytes in all, is a protocol error: a reply that is kept is
        bounded as a whole, not only line by line."""
        lines: list[str] = []
        total = 0
        async for raw in self.multiline(max_lines):
            total += len(raw) + 2
            if total > max_bytes:
                raise ProtocolError(f"multi-line reply longer than {max_bytes} bytes")
            lines.append(decode_line(raw))
        return lines

    async def send_command(self, command: str, *, shown: str | None = None) -> None:
        """Send one command line. `shown` replaces it in the transcript (secrets)."""
        if "\r" in command or "\n" in command:
            # Config values are checked for this at load; a line break here would let
            # one command smuggle another.
            raise ValueError("a POP3 command must be one line")
        self._note("C", command if shown is None else shown)
        data = command.encode("utf-8") + b"\r\n"
        if self._tls is not None:
            self._tls.write(data)
            await self._flush_tls()
        else:
            await self._send(data)

    async def command(self, command: str, *, shown: str | None = None) -> Response:
        await self.send_command(command, shown=shown)
        return await self.read_response()

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.write(data)
        except OSError as exc:
            raise ConnectionClosedError(f"connection lost while sending: {exc}") from exc

    async def _flush_tls(self) -> None:
        pending = self._outgoing.read()
        if pending:
            await self._send(pending)

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> Handshake:
        """TLS handshake on this connection (implicit TLS, or after STLS +OK).

        Plaintext already buffered is discarded first: anything a man in the middle
        injected after the STLS reply must never be read as a protected reply
        (RFC 2595 section 4, RFC 3207 section 4.2). A failed handshake raises with
        what was presented (Handshake), so that the chain can still be reported.
        """
        if self._buffer:
            self._note("*", f"discarded {len(self._buffer)} bytes of plaintext before TLS")
            self._buffer.clear()
        tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
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
                        handshake_record(tls, context, verified=False),
                    ) from None
                self._incoming.write(data)
            except ssl.SSLCertVerificationError as exc:
                record = handshake_record(tls, context, verified=False, error=exc)
                message = f"certificate verify failed: {exc.verify_message}"
                raise verification_error(exc)(message, record) from exc
            except ssl.SSLError as exc:
                raise TLSHandshakeError(
                    f"TLS handshake failed: {exc.reason or exc}",
                    handshake_record(tls, context, verified=False),
                ) from exc
        await self._flush_tls()
        self._tls = tls
        record = handshake_record(tls, context, verified=context.verify_mode != ssl.CERT_NONE)
        self._note("*", f"TLS established: {record.version} {record.cipher}")
        return record

    def close(self) -> None:
        """Close at once, without waiting for the peer (the result is already known)."""
        with contextlib.suppress(OSError):
            self._stream.close()
