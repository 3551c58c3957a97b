"""The mail-delivery round trip: submit a marked message over SMTP, find it over POP3.

Each message carries a token in an ``X-Pop3-Exporter-Probe`` header: an id, when it
was sent, until when its probe waits for it, and an HMAC over these and the recipient
with a key that only this exporter has. The exporter deletes only messages whose HMAC
checks, so nobody can make it delete anything else (a copied header with another
recipient, or a forged one, fails the check), and it leaves alone the messages of
probes that are still waiting (concurrent probes of one mailbox).
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import hashlib
import hmac
import os
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from pop3_exporter.config import DeliveryConfig, SmtpConfig, TLSMode
from pop3_exporter.credentials import Secret
from pop3_exporter.errors import (
    MailboxError,
    ProtocolError,
    SmtpAuthError,
    SmtpConnectError,
    SmtpRejectedError,
    SmtpTemporaryError,
    SmtpTLSError,
)
from pop3_exporter.protocol import Pop3Connection
from pop3_exporter.result import Phase
from pop3_exporter.session import read_header

TOKEN_HEADER = "X-Pop3-Exporter-Probe"
_TOKEN_VERSION = "v1"
KEY_BYTES = 32
KEY_FILE_NAME = "delivery.key"
# Messages of one UIDL listing the probe looks at; a delivery mailbox is meant to be
# (almost) empty, and this bounds the per-probe memory of a full one.
MAX_SCAN_MESSAGES = 2000
MAX_UID_LENGTH = 70  # RFC 1939 section 7
MAX_HEADER_LINES = 2000
# A message that QUIT after the DELE may take to commit (it never fails the probe).
SMTP_QUIT_GRACE_SECONDS = 1.0
# The client library's own timeout: longer than any probe, so that the probe's
# deadline (which cancels it) is what ends a hung dialogue.
_SMTP_LIBRARY_TIMEOUT = 3600.0
_MESSAGE_POLICY = email.policy.SMTP.clone(max_line_length=998)


class DeliveryKeyError(Exception):
    """The delivery key file cannot be read or made. The message names the file only."""


@dataclass(frozen=True, slots=True)
class DeliveryRuntime:
    """What a delivery module needs at every probe, built once per configuration."""

    key: bytes
    smtp_ssl_context: ssl.SSLContext | None
    # The target policy for the SMTP server's address (None: no address rules).
    smtp_address_check: Callable[[str, int], None] | None = None


def key_path(config: DeliveryConfig, state_directory: Path) -> Path:
    return Path(config.secret_file) if config.secret_file else state_directory / KEY_FILE_NAME


def load_key(path: Path, *, create: bool) -> bytes:
    """The key in `path` (hex, first line); with `create`, a new random one written
    there first when the file does not exist (mode 0600, never overwritten)."""
    if create and not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # made meanwhile by another process: read it
        except OSError as exc:
            raise DeliveryKeyError(f"cannot create {path}: {exc.strerror or exc}") from None
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(KEY_BYTES) + "\n")
    try:
        text = path.read_text(encoding="ascii").split("\n", 1)[0].strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DeliveryKeyError(f"cannot read {path}: {reason}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise DeliveryKeyError(f"{path}: the first line is not a hex key") from None
    if len(key) < 16:
        raise DeliveryKeyError(f"{path}: the key is shorter than 16 bytes")
    return key


# ------------------------------------------------------------------ tokens


@dataclass(frozen=True, slots=True)
class Token:
    probe_id: str
    sent_ms: int
    deadline_ms: int


def _mac(key: bytes, probe_id: str, sent_ms: int, deadline_ms: int, recipient: str) -> str:
    text = f"{_TOKEN_VERSION} {probe_id} {sent_ms} {deadline_ms} {recipient.lower()}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:32]


def make_token(key: bytes, token: Token, recipient: str) -> str:
    mac = _mac(key, token.probe_id, token.sent_ms, token.deadline_ms, recipient)
    return f"{_TOKEN_VERSION} {token.probe_id} {token.sent_ms} {token.deadline_ms} {mac}"


def check_token(key: bytes, value: str, recipient: str) -> Token | None:
    """The token if `value` is one this exporter made for `recipient`, else None."""
    parts = value.split()
    if len(parts) != 5 or parts[0] != _TOKEN_VERSION:
        return None
    _, probe_id, sent, deadline, mac = parts
    if not (sent.isdigit() and deadline.isdigit() and len(sent) < 16 and len(deadline) < 16):
        return None
    expected = _mac(key, probe_id, int(sent), int(deadline), recipient)
    if not hmac.compare_digest(expected, mac):
        return None
    return Token(probe_id, int(sent), int(deadline))


def build_message(config: DeliveryConfig, token: str, probe_id: str, sent: float) -> bytes:
    message = EmailMessage(policy=_MESSAGE_POLICY)
    message["From"] = config.from_address
    message["To"] = config.to
    message["Subject"] = f"pop3_exporter delivery probe {probe_id}"
    message["Date"] = email.utils.formatdate(sent, usegmt=True)
    message["Message-ID"] = f"<{probe_id}@pop3-exporter.invalid>"
    # RFC 3834: no vacation replies or other auto-answers to a probe.
    message["Auto-Submitted"] = "auto-generated"
    message[TOKEN_HEADER] = token
    message.set_content(
        "This message tests mail delivery. The pop3_exporter that sent it deletes it.\n"
    )
    return message.as_bytes()


# ------------------------------------------------------------------ SMTP


def _smtp_error(exc: BaseException, phase: Phase) -> Exception:
    """Our error for what the SMTP library (or the socket under it) raised."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    shown = f"{code} {message}" if isinstance(code, int) and code > 0 else message
    detail = f"{phase}: {shown}"[:200]
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError) and not 400 <= (code or 0) < 500:
        return SmtpAuthError(detail)
    if isinstance(code, int) and 400 <= code < 500:
        return SmtpTemporaryError(detail)
    if isinstance(code, int) and 500 <= code < 600:
        if phase is Phase.SMTP_AUTH:
            return SmtpAuthError(detail)
        return SmtpRejectedError(detail)
    if phase is Phase.SMTP_TLS:
        return SmtpTLSError(detail)
    if phase is Phase.SMTP_AUTH:
        return SmtpAuthError(detail)
    return SmtpConnectError(detail)


async def _open_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def submit(
    smtp: SmtpConfig,
    address: str,
    ssl_context: ssl.SSLContext | None,
    password: Secret | None,
    sender: str,
    recipient: str,
    message: bytes,
    begin: Callable[[Phase], None],
    note: Callable[[str, str], None],
) -> str:
    """Send `message` through the submission server at `address` (already checked
    against the policy); returns the server's reply to the end of DATA."""
    host, port, _ = smtp.endpoint()
    begin(Phase.SMTP_CONNECT)
    try:
        sock = await _open_socket(address, port)
    except OSError as exc:
        detail = f"smtp_connect: connecting to {address} port {port}: {exc}"
        raise SmtpConnectError(detail) from exc
    client = aiosmtplib.SMTP(
        sock=sock,
        hostname=smtp.tls_config.server_name or host,
        local_hostname=smtp.helo_name or socket.gethostname(),
        use_tls=smtp.tls is TLSMode.IMPLICIT,
        start_tls=False,
        tls_context=ssl_context,
        timeout=_SMTP_LIBRARY_TIMEOUT,
    )
    phase = Phase.SMTP_TLS if smtp.tls is TLSMode.IMPLICIT else Phase.SMTP_CONNECT
    try:
        begin(phase)
        greeting = await client.connect()
        note("S", f"{greeting.code} {greeting.message}"[:200])
        if smtp.tls is TLSMode.STARTTLS:
            phase = Phase.SMTP_TLS
            begin(phase)
            await client.starttls(tls_context=ssl_context)
            note("*", "SMTP TLS established")
        if smtp.auth is not None:
            phase = Phase.SMTP_AUTH
            begin(phase)
            assert password is not None
            await client.login(smtp.auth.username, password.reveal())
            note("*", f"SMTP authenticated as {smtp.auth.username}")
        phase = Phase.SMTP_SEND
        begin(phase)
        _, accepted = await client.sendmail(sender, [recipient], message)
        note("S", f"message accepted: {accepted}"[:200])
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
        client.close()
        raise _smtp_error(exc, phase) from exc
    except BaseException:
        client.close()
        raise
    # QUIT is a courtesy here too: the message is accepted whatever it answers.
    try:
        async with asyncio.timeout(SMTP_QUIT_GRACE_SECONDS):
            await client.quit()
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError):
        pass
    finally:
        client.close()
    return accepted


# ------------------------------------------------------------------ POP3 side


@dataclass
class Scan:
    """What one POP3 session found in the mailbox."""

    own: int | None = None  # message number of this probe's message
    late: list[int] = field(default_factory=list)  # earlier probes' messages, overdue
    deleted: int = 0  # DELEs the server accepted in this session (not yet committed)


async def scan(
    conn: Pop3Connection,
    key: bytes,
    recipient: str,
    probe_id: str,
    seen: set[str],
    now_ms: Callable[[], int],
) -> Scan:
    """UIDL, then TOP n 0 of every message not seen in an earlier poll of this probe.
    Messages that are not this exporter's are remembered as seen and never touched."""
    reply = await conn.command("UIDL")
    if not reply.ok:
        raise MailboxError(f"UIDL refused: {reply.text[:120]!r}")
    listing: list[tuple[int, str]] = []
    over = False
    async for line in conn.multiline(MAX_SCAN_MESSAGES + 1_000_000):
        if len(listing) >= MAX_SCAN_MESSAGES:
            over = True  # read to the end to stay in step, keep nothing
            continue
        words = line.split()
        if len(words) != 2 or not words[0].isdigit() or len(words[1]) > MAX_UID_LENGTH:
            raise ProtocolError(f"UIDL line is not 'number uid': {line[:80]!r}")
        listing.append((int(words[0]), words[1].decode("ascii", errors="replace")))
    if over:
        raise MailboxError(
            f"more than {MAX_SCAN_MESSAGES} messages: use a mailbox for delivery probes only"
        )
    found = Scan()
    for number, uid in listing:
        if uid in seen:
            continue
        present, value = await _token_header(conn, number)
        if not present:
            continue  # expunged meanwhile, by another session (a concurrent probe)
        token = check_token(key, value, recipient) if value is not None else None
        if token is None:
            seen.add(uid)  # not ours: never looked at again, never deleted
        elif token.probe_id == probe_id:
            found.own = number
        elif token.deadline_ms < now_ms():
            found.late.append(number)
        # else: a probe still waiting for it (a concurrent probe of this mailbox)
    return found


async def _token_header(conn: Pop3Connection, number: int) -> tuple[bool, str | None]:
    """(whether message `number` is still there, its X-Pop3-Exporter-Probe header or
    None), from TOP n 0. A message listed by UIDL can be gone by its TOP: another
    session (a concurrent probe of the mailbox) deleted it, and Dovecot then answers
    "-ERR Message 1 expunged"; the scan just skips it."""
    reply = await conn.command(f"TOP {number} 0")
    if not reply.ok:
        return False, None
    value = await read_header(conn, TOKEN_HEADER, max_lines=MAX_HEADER_LINES, max_length=200)
    return True, value.decode("ascii", errors="replace") if value is not None else None


async def delete(conn: Pop3Connection, numbers: list[int]) -> int:
    """DELE each message; returns how many the server refused."""
    refused = 0
    for number in numbers:
        if not (await conn.command(f"DELE {number}")).ok:
            refused += 1
    return refused


def wall_ms() -> int:
    return int(time.time() * 1000)


def new_probe_id() -> str:
    return secrets.token_hex(8)
