"""A fake POP3 server that logs users in and serves a maildrop, for the login faults
that Dovecot does not produce (LOGIN-DELAY, [SYS/PERM], garbage STAT, endless SASL
challenges, odd Date headers). Real logins are tested against Dovecot.

Its checks of what the client sends are the RFCs' (RFC 1939 USER/PASS/APOP, RFC 4616
PLAIN, the LOGIN convention, RFC 7628 OAUTHBEARER and Google's XOAUTH2), so a test
that logs in here proves the client speaks them, not only that it gets "+OK".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.support.fakepop3 import MAX_COMMANDS, FakeConnection

APOP_TIMESTAMP = "<1896.697170952@fake.test>"


@dataclass
class FakeMailServer:
    """Script for FakePop3Server. Every field is a fault knob; defaults behave."""

    user: str = "monitor@example.test"
    password: str = "correct horse"
    token: str = "tok-good"
    greeting: str = f"+OK fake mail ready {APOP_TIMESTAMP}"
    capabilities: Sequence[str] = ("TOP", "UIDL", "USER", "SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER")
    # Messages of the maildrop, as sent by TOP/RETR (CRLF lines).
    messages: Sequence[bytes] = ()
    # Replace the reply to a successful login, to STAT, or to TOP (None: normal).
    login_refusal: str | None = None  # e.g. "-ERR [SYS/TEMP] backend down"
    stat_reply: str | None = None
    top_reply: bytes | None = None
    # Answer every SASL response with another challenge, this many times (0: never).
    endless_challenges: int = 0
    # SASL mechanisms AUTH accepts (whatever CAPA says).
    sasl_supported: Sequence[str] = ("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER")
    # The client's answers to OAuth error challenges, for the test to inspect.
    error_acks: list[bytes] = field(default_factory=list)
    # What each session received after login, for the test to inspect.
    sessions: list[list[str]] = field(default_factory=list)

    async def __call__(self, conn: FakeConnection) -> None:
        received: list[str] = []
        self.sessions.append(received)
        await conn.send_line(self.greeting)
        user: str | None = None
        logged_in = False
        for _ in range(MAX_COMMANDS):
            raw = await conn.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")
            received.append(line)
            verb, _, argument = line.partition(" ")
            verb = verb.upper()
            if verb == "QUIT":
                await conn.send_line("+OK bye")
                return
            if verb == "CAPA":
                await conn.send(
                    b"".join(f"{c}\r\n".encode() for c in ["+OK", *self.capabilities, "."])
                )
            elif logged_in:
                await self._transaction(conn, verb, argument)
            elif verb == "USER":
                user = argument
                await conn.send_line("+OK")
            elif verb == "PASS":
                logged_in = await self._verdict(
                    conn, user == self.user and argument == self.password
                )
            elif verb == "APOP":
                name, _, digest = argument.partition(" ")
                expected = hashlib.md5((APOP_TIMESTAMP + self.password).encode()).hexdigest()
                logged_in = await self._verdict(conn, name == self.user and digest == expected)
            elif verb == "AUTH":
                logged_in = await self._sasl(conn, argument.upper(), received)
            else:
                await conn.send_line("-ERR not now")

    async def _verdict(self, conn: FakeConnection, good: bool) -> bool:
        if not good:
            await conn.send_line("-ERR [AUTH] Authentication failed.")
            return False
        if self.login_refusal is not None:
            await conn.send_line(self.login_refusal)
            return False
        await conn.send_line("+OK Logged in.")
        return True

    async def _sasl(self, conn: FakeConnection, mechanism: str, received: list[str]) -> bool:
        if mechanism not in self.sasl_supported:
            await conn.send_line("-ERR [AUTH] Unsupported authentication mechanism.")
            return False
        answers: list[bytes] = []
        prompts = ["VXNlcm5hbWU6", "UGFzc3dvcmQ6"] if mechanism == "LOGIN" else [""]
        for prompt in prompts:
            await conn.send_line(f"+ {prompt}".rstrip() if prompt else "+ ")
            raw = await conn.readline()
            received.append(raw.decode(errors="replace").rstrip("\r\n"))
            try:
                answers.append(base64.b64decode(raw.strip(), validate=True))
            except binascii.Error:
                await conn.send_line("-ERR bad base64")
                return False
        for _ in range(self.endless_challenges):
            await conn.send_line("+ bW9yZQ==")
            if not await conn.readline():
                return False
        good = self._sasl_good(mechanism, answers)
        if not good and mechanism in ("XOAUTH2", "OAUTHBEARER"):
            # RFC 7628 3.2.2 (and XOAUTH2): the error comes as a challenge first; the
            # client answers it (%x01, or an empty line) to get the final -ERR.
            await conn.send_line("+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=")
            ack = await conn.readline()
            self.error_acks.append(base64.b64decode(ack.strip()))
        return await self._verdict(conn, good)

    def _sasl_good(self, mechanism: str, answers: list[bytes]) -> bool:
        bearer = f"auth=Bearer {self.token}\x01\x01".encode()
        if mechanism == "PLAIN":
            return answers == [f"\0{self.user}\0{self.password}".encode()]
        if mechanism == "LOGIN":
            return answers == [self.user.encode(), self.password.encode()]
        if mechanism == "XOAUTH2":
            return answers == [f"user={self.user}\x01".encode() + bearer]
        # OAUTHBEARER: gs2 header with the user, then host, port and the token.
        (answer,) = answers
        header, _, rest = answer.partition(b"\x01")
        return header == f"n,a={self.user},".encode() and rest.endswith(bearer)

    async def _transaction(self, conn: FakeConnection, verb: str, argument: str) -> None:
        if verb == "STAT":
            size = sum(len(m) for m in self.messages)
            await conn.send_line(self.stat_reply or f"+OK {len(self.messages)} {size}")
        elif verb == "TOP" and argument.split()[:1] == ["1"]:
            if self.top_reply is not None:
                await conn.send(self.top_reply)
            elif self.messages:
                headers = self.messages[0].split(b"\r\n\r\n", 1)[0]
                stuffed = b"\r\n".join(
                    b"." + h if h.startswith(b".") else h for h in headers.split(b"\r\n")
                )
                await conn.send(b"+OK\r\n" + stuffed + b"\r\n\r\n.\r\n")
            else:
                await conn.send_line("-ERR no such message")
        else:
            await conn.send_line("-ERR not supported")
