"""A small asyncio POP3 client connection: line reading with limits, commands, STLS.

TLS runs over ssl.SSLObject and memory BIOs on the raw stream instead of asyncio's
TLS transport, because we need the SSL object after a failed handshake (to report the
certificates presented) and full control of the plaintext buffer around STLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
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

TranscriptSink = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Response:
    ok: bool
    text: str  # the whole status line, without the line ending


def decode_line(raw: bytes) -> str:
    """Decode a server line for matching and display; never fails."""
    return raw.decode("utf-8", errors="replace")


class Pop3Connection:
    """One TCP connection speaking POP3; owns the socket until close()."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        transcript: TranscriptSink | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self._reader = reader
        self._writer = writer
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
        local_addr = (source_address, 0) if source_address else None
        try:
            reader, writer = await asyncio.open_connection(
                address, port, family=family, local_addr=local_addr
            )
        except ConnectionRefusedError as exc:
            raise ConnectRefusedError(f"connection refused by {address} port {port}") from exc
        except OSError as exc:
            raise ConnectError(f"connecting to {address} port {port}: {exc}") from exc
        return cls(reader, writer, transcript=transcript)

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
        return data

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
        self._writer.transport.close()


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
