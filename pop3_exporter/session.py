"""After the door: logging in (RFC 1939 USER/PASS and APOP, RFC 5034 SASL) and looking
at the maildrop (STAT, TOP 1 0). Nothing here changes the mailbox: no DELE, no RETR.

A refused login becomes a precise reason from its RFC 2449 / RFC 3206 response code.
The reason depends on the step that failed too: the same [SYS/TEMP] that refuses a
login means "the mailbox cannot be opened" when it answers STAT after a login.

Secrets are sent only through send_command(..., shown=...), so that the transcript
shows asterisks; error messages quote what the server said, never what we sent.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime

from pop3_exporter.config import AuthConfig
from pop3_exporter.credentials import REDACTED, Mechanism, Secret
from pop3_exporter.errors import (
    AuthFailedError,
    AuthMechanismUnsupportedError,
    AuthSystemError,
    AuthUnavailableError,
    LoginDelayError,
    MailboxError,
    MailboxInUseError,
    ProtocolError,
)
from pop3_exporter.protocol import Pop3Connection, Response
from pop3_exporter.result import Capabilities

# Challenges a SASL exchange may add after our last response (an error challenge of
# RFC 7628 section 3.2.2 is one); a server that keeps sending "+" is out of step.
MAX_EXTRA_CHALLENGES = 2
# RFC 1939 section 7: the APOP timestamp is a msg-id, "<process-ID.clock@hostname>".
_APOP_TIMESTAMP = re.compile(r"<[^<>\s]{1,250}@[^<>\s]{1,250}>")
# RFC 2449 section 8: "-ERR [CODE] text"; codes are atoms joined by "/".
_RESPONSE_CODE = re.compile(r"^-ERR \[([A-Za-z0-9/-]{1,64})\]")
# STAT numbers beyond this are not a real maildrop (a petabyte, or 10^15 messages).
_MAX_STAT_DIGITS = 15
# Lines of a TOP 1 0 reply we read (headers only); each one is capped by the reader.
MAX_HEADER_LINES = 10_000
# A Date further ahead than this is not trusted (clock skew is minutes, not days).
_FUTURE_DATE_TOLERANCE = 86400.0


def response_code(reply: Response) -> str | None:
    """The RFC 2449 response code of a -ERR line, upper case, or None."""
    match = _RESPONSE_CODE.match(reply.text)
    return match.group(1).upper() if match else None


def _refusal(reply: Response, step: str) -> AuthFailedError:
    """The error for a -ERR to a login step, by its response code (RFC 2449, 3206)."""
    code = response_code(reply)
    message = f"{step} refused: {reply.text[:120]!r}"
    if code is None:
        return AuthFailedError(message)
    if code == "SYS/TEMP" or code.startswith("SYS/TEMP/"):
        return AuthUnavailableError(message)
    if code == "SYS/PERM" or code.startswith("SYS/PERM/"):
        return AuthSystemError(message)
    if code == "IN-USE" or code.startswith("IN-USE/"):
        return MailboxInUseError(message)
    if code == "LOGIN-DELAY" or code.startswith("LOGIN-DELAY/"):
        return LoginDelayError(message)
    return AuthFailedError(message)


async def login(
    conn: Pop3Connection,
    auth: AuthConfig,
    secret: Secret,
    capabilities: Capabilities | None,
    greeting: str,
    server_name: str,
    port: int,
) -> None:
    """Log in with the configured mechanism; raises the reason it failed."""
    mechanism = auth.mechanism
    if not auth.allow_unadvertised:
        _check_advertised(mechanism, capabilities)
    if mechanism is Mechanism.USER:
        await _user_pass(conn, auth.username, secret)
    elif mechanism is Mechanism.APOP:
        await _apop(conn, auth.username, secret, greeting)
    else:
        responses, error_ack = _sasl_responses(mechanism, auth.username, secret, server_name, port)
        await _sasl(conn, mechanism, responses, error_ack)


def _check_advertised(mechanism: Mechanism, capabilities: Capabilities | None) -> None:
    """RFC 2449: what CAPA (inside TLS) offers. APOP has no capability; its sign is the
    greeting's timestamp, checked when it is used."""
    if mechanism is Mechanism.APOP:
        return
    if capabilities is None:
        raise AuthMechanismUnsupportedError(
            "no CAPA answer, so the server does not advertise"
            f" {'USER' if mechanism is Mechanism.USER else f'SASL {mechanism.sasl_name}'}"
        )
    if mechanism is Mechanism.USER:
        if "USER" not in capabilities.names:
            raise AuthMechanismUnsupportedError("server does not advertise USER")
    elif mechanism.sasl_name not in capabilities.sasl_mechanisms:
        raise AuthMechanismUnsupportedError(f"server does not advertise SASL {mechanism.sasl_name}")


async def _user_pass(conn: Pop3Connection, username: str, secret: Secret) -> None:
    reply = await conn.command(f"USER {username}")
    if not reply.ok:
        raise _refusal(reply, "USER")
    reply = await conn.command(f"PASS {secret.reveal()}", shown=f"PASS {REDACTED}")
    if not reply.ok:
        raise _refusal(reply, "PASS")


def apop_digest(timestamp: str, secret: Secret) -> str:
    digest = hashlib.md5((timestamp + secret.reveal()).encode(), usedforsecurity=False)
    return digest.hexdigest()


async def _apop(conn: Pop3Connection, username: str, secret: Secret, greeting: str) -> None:
    match = _APOP_TIMESTAMP.search(greeting)
    if match is None:
        raise AuthMechanismUnsupportedError("greeting has no APOP timestamp")
    digest = apop_digest(match.group(0), secret)
    reply = await conn.command(f"APOP {username} {digest}", shown=f"APOP {username} {REDACTED}")
    if not reply.ok:
        raise _refusal(reply, "APOP")


def _gs2_name(username: str) -> str:
    """RFC 5801 saslname: "," and "=" escaped."""
    return username.replace("=", "=3D").replace(",", "=2C")


def _sasl_responses(
    mechanism: Mechanism, username: str, secret: Secret, server_name: str, port: int
) -> tuple[list[bytes], bytes]:
    """The client responses of a mechanism, and what to answer an error challenge."""
    value = secret.reveal()
    if mechanism is Mechanism.PLAIN:
        # RFC 4616: authzid (empty), authcid, password.
        return [f"\0{username}\0{value}".encode()], b"*"
    if mechanism is Mechanism.LOGIN:
        return [username.encode(), value.encode()], b"*"
    if mechanism is Mechanism.XOAUTH2:
        # Google's XOAUTH2: an error comes as a challenge; an empty response ends it.
        return [f"user={username}\x01auth=Bearer {value}\x01\x01".encode()], b""
    # RFC 7628 OAUTHBEARER; an error challenge is answered with a single %x01.
    gs2 = f"n,a={_gs2_name(username)},"
    fields = f"\x01host={server_name}\x01port={port}\x01auth=Bearer {value}\x01\x01"
    return [(gs2 + fields).encode()], b"\x01"


async def _sasl(
    conn: Pop3Connection, mechanism: Mechanism, responses: Sequence[bytes], error_ack: bytes
) -> None:
    """RFC 5034 AUTH, without an initial response: credentials go only after the server
    has accepted the mechanism, and a -ERR before them means it does not offer it."""
    await conn.send_command(f"AUTH {mechanism.sasl_name}")
    reply = await conn.read_response(continuation=True)
    if not reply.ok:
        error = _refusal(reply, f"AUTH {mechanism.sasl_name}")
        if type(error) is AuthFailedError:  # [AUTH] or no code: the mechanism itself
            raise AuthMechanismUnsupportedError(str(error))
        raise error
    if not reply.continuation:
        raise ProtocolError("AUTH accepted before any credentials were sent")
    for response in responses:
        await conn.send_command(_b64(response), shown=REDACTED)
        reply = await conn.read_response(continuation=True)
        if not reply.continuation:
            break
    for _ in range(MAX_EXTRA_CHALLENGES):
        if not reply.continuation:
            break
        # An error challenge (or a server out of step): answer it so that the server
        # can send its -ERR; "*" cancels the exchange (RFC 5034 section 4).
        await conn.send_command(_b64(error_ack) if error_ack != b"*" else "*", shown="(end)")
        reply = await conn.read_response(continuation=True)
    if reply.continuation:
        raise ProtocolError("SASL exchange does not end")
    if not reply.ok:
        raise _refusal(reply, f"AUTH {mechanism.sasl_name}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_stat(reply: Response) -> tuple[int, int]:
    """(messages, octets) of a STAT reply: "+OK nn mm" (RFC 1939 section 5)."""
    words = reply.text.split()
    if len(words) < 3 or not all(_plausible_number(word) for word in words[1:3]):
        raise ProtocolError(f"STAT reply is not '+OK count size': {reply.text[:80]!r}")
    return int(words[1]), int(words[2])


def _plausible_number(word: str) -> bool:
    return word.isascii() and word.isdigit() and len(word) <= _MAX_STAT_DIGITS


async def stat(conn: Pop3Connection) -> tuple[int, int]:
    reply = await conn.command("STAT")
    if not reply.ok:
        raise MailboxError(f"STAT refused: {reply.text[:120]!r}")
    return parse_stat(reply)


async def oldest_message_date(conn: Pop3Connection) -> float | None:
    """The Date header of message 1 as unix seconds (TOP 1 0), or None when it is
    missing, unparsable or far in the future."""
    reply = await conn.command("TOP 1 0")
    if not reply.ok:
        raise MailboxError(f"TOP refused: {reply.text[:120]!r}")
    date = await read_header(conn, "Date", max_lines=MAX_HEADER_LINES, max_length=1024)
    return parse_date(date) if date is not None else None


async def read_header(
    conn: Pop3Connection, name: str, *, max_lines: int, max_length: int
) -> bytes | None:
    """After "+OK" to TOP n 0: read the reply to its end, keeping only the value of the
    first `name` header, unfolded (RFC 5322 2.2.3) and cut at `max_length` bytes."""
    prefix = name.lower().encode() + b":"
    value: bytearray | None = None
    in_headers = True
    in_field = False
    async for line in conn.multiline(max_lines):
        if not in_headers:
            continue  # TOP n 0 has no body lines, but a server may send some
        if not line:
            in_headers = False
        elif line[:1] in (b" ", b"\t"):  # a folded continuation
            if in_field and value is not None and len(value) < max_length:
                value += b" " + line.strip()
        else:
            in_field = value is None and line[: len(prefix)].lower() == prefix
            if in_field:
                value = bytearray(line[len(prefix) :].strip())
    return bytes(value[:max_length]) if value is not None else None


def parse_date(value: bytes) -> float | None:
    try:
        when = parsedate_to_datetime(value.decode("ascii", errors="replace"))
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    try:
        timestamp = when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
    if when.tzinfo is None or not math.isfinite(timestamp):
        return None  # RFC 5322 dates carry a zone; without one the instant is unknown
    if timestamp > time.time() + _FUTURE_DATE_TOLERANCE:
        return None
    return timestamp
