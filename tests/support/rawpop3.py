"""A blocking POP3 client that sends exactly what a test says and records what the server said.

For checking real servers line by line (poplib hides continuation lines and
raises on ``-ERR``). Also the SASL initial responses of the mechanisms the
exporter speaks, built as RFC 4616 (PLAIN), RFC 7628 (OAUTHBEARER) and
Google's XOAUTH2 description define them, and the RFC 1939 APOP digest.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import ssl
from types import TracebackType

TIMEOUT = 30.0  # generous: the machine is shared; Dovecot's lock wait alone is ~12 s
MAX_LINE = 8192
MAX_MULTILINE = 10_000
_APOP_TIMESTAMP = re.compile(rb"<[^<>]*@[^<>]*>")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def plain_response(user: str, password: str) -> str:
    """AUTH PLAIN: empty authzid, authcid, password (RFC 4616)."""
    return b64(f"\0{user}\0{password}".encode())


def xoauth2_response(user: str, token: str) -> str:
    return b64(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def oauthbearer_response(user: str, token: str, host: str, port: int) -> str:
    """RFC 7628 section 3.1: GS2 header with authzid, then key=value pairs."""
    return b64(f"n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode())


def apop_timestamp(greeting: bytes) -> bytes | None:
    """The ``<...@...>`` of an APOP-capable greeting, or None."""
    found = _APOP_TIMESTAMP.search(greeting)
    return found.group(0) if found else None


def apop_digest(timestamp: bytes, password: str) -> str:
    return hashlib.md5(timestamp + password.encode()).hexdigest()


class RawPop3:
    """One POP3 connection; ``transcript`` holds ("C"|"S", line) in order, without CRLF."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        source: str | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.transcript: list[tuple[str, bytes]] = []
        raw = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self._sock: socket.socket = raw
        try:
            if tls is not None:
                self._sock = tls.wrap_socket(raw, server_hostname=server_hostname)
            self._file = self._sock.makefile("rb")
            self.greeting = self.line()
        except BaseException:
            self._sock.close()
            raise

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def send(self, line: str) -> None:
        data = line.encode()
        self.transcript.append(("C", data))
        self._sock.sendall(data + b"\r\n")

    def line(self) -> bytes:
        """One server line without CRLF; ``b""`` once the server has closed."""
        data = self._file.readline(MAX_LINE)
        if data and not data.endswith(b"\r\n"):
            raise ValueError(f"line without CRLF (or longer than {MAX_LINE}): {data!r}")
        line = data[:-2]
        self.transcript.append(("S", line if data else b"<closed>"))
        return line

    def command(self, line: str) -> bytes:
        self.send(line)
        return self.line()

    def multiline(self) -> list[bytes]:
        """The body of a multi-line answer (after its status line), dot-unstuffed."""
        body: list[bytes] = []
        for _ in range(MAX_MULTILINE):
            line = self.line()
            if line == b".":
                return body
            if not line and self.closed_by_server:
                raise EOFError("server closed inside a multi-line answer")
            body.append(line[1:] if line.startswith(b"..") else line)
        raise ValueError("multi-line answer too long")

    @property
    def closed_by_server(self) -> bool:
        return bool(self.transcript) and self.transcript[-1] == ("S", b"<closed>")

    def stls(self, context: ssl.SSLContext, server_hostname: str | None = None) -> bytes:
        answer = self.command("STLS")
        if answer.startswith(b"+OK"):
            self._file.close()
            self._sock = context.wrap_socket(self._sock, server_hostname=server_hostname)
            self._file = self._sock.makefile("rb")
        return answer

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> RawPop3:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
