"""The login-test infrastructure against real Dovecot 2.3.19, checked with poplib and raw dialogues.

These tests pin down, line by line, what Dovecot sends for every login
mechanism and every login failure that the exporter's tests rely on; no
exporter code is involved. A changed Dovecot that breaks a fact fails here first.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import poplib
import re
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.certs import TestPKI, client_ssl_context
from tests.support.dovecot_auth import (
    AuthDovecotServer,
    MailAccount,
    deliver,
    deliver_messages,
    empty_maildir,
    make_message,
    message_count,
)
from tests.support.introspection import PATH, IntrospectionServer
from tests.support.rawpop3 import (
    RawPop3,
    apop_digest,
    apop_timestamp,
    b64,
    oauthbearer_response,
    plain_response,
    xoauth2_response,
)

pytestmark = pytest.mark.dovecot

HOST = "127.0.0.1"
OUTSIDE = "127.0.0.2"  # a client address Dovecot does not count as "secured"
TLS_NAME = "localhost"
TIMEOUT = 30.0

LOGGED_IN = b"+OK Logged in."
AUTH_FAILED = b"-ERR [AUTH] Authentication failed."
UNSUPPORTED = b"-ERR [AUTH] Unsupported authentication mechanism."
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
# "[<hostname>:<date time>]" ends the line; the host is the machine's name.
TEMPFAIL = re.compile(
    rb"-ERR \[SYS/TEMP\] Temporary authentication failure\. "
    rb"\[[^\]\s]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]"
)
INTERNAL_ERROR = re.compile(
    rb"-ERR \[SYS/TEMP\] Internal error occurred\. Refer to server log for more information\. "
    rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]"
)
GREETING = re.compile(rb"\+OK Dovecot \(Debian\) ready\. <[^<>@\s]+@[^<>@\s]+>")
# Server challenges: base64 of a JSON error, then the client must answer before the -ERR.
XOAUTH2_ERROR = {"status": "401", "schemes": "bearer", "scope": "mail"}
OAUTHBEARER_ERROR = {"status": "invalid_token"}

CAPA_BASE = [b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE"]
SASL_ALL = b"SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER"  # APOP is not SASL: greeting only

MECHANISMS = ("user", "apop", "plain", "login", "xoauth2", "oauthbearer")
TRANSPORTS = ("stls", "implicit")

# Failure replies come on Dovecot's 500 ms timer; the auth penalty would add 2 s and more.
FAILURE_SECONDS_MAX = 2.0


@pytest.fixture(scope="module")
def tls(pki: TestPKI) -> ssl.SSLContext:
    return client_ssl_context(pki.ca_file)


def connect(
    server: AuthDovecotServer, transport: str, tls: ssl.SSLContext, *, source: str | None = None
) -> RawPop3:
    """A raw session ready for login: greeted, and on TLS for both transports."""
    if transport == "implicit":
        return RawPop3(HOST, server.pop3s_port, tls=tls, server_hostname=TLS_NAME, source=source)
    conn = RawPop3(HOST, server.pop3_port, source=source)
    try:
        assert conn.stls(tls, TLS_NAME) == b"+OK Begin TLS negotiation now."
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def session(
    server: AuthDovecotServer, transport: str, tls: ssl.SSLContext, *, source: str | None = None
) -> Iterator[RawPop3]:
    conn = connect(server, transport, tls, source=source)
    try:
        yield conn
    finally:
        conn.close()


def decoded_challenge(line: bytes) -> object:
    assert line.startswith(b"+ "), line
    return json.loads(base64.b64decode(line[2:], validate=True))


# ---------------------------------------------------------------- greeting and CAPA


def test_greeting_carries_an_apop_timestamp(dovecot_auth: AuthDovecotServer) -> None:
    with RawPop3(HOST, dovecot_auth.pop3_port) as conn:
        assert GREETING.fullmatch(conn.greeting), conn.greeting
        first = apop_timestamp(conn.greeting)
    with RawPop3(HOST, dovecot_auth.pop3_port) as conn:
        assert apop_timestamp(conn.greeting) not in (None, first)  # fresh per connection


@pytest.mark.parametrize(
    ("source", "before_stls"),
    [
        (HOST, [*CAPA_BASE, b"STLS", b"USER", SASL_ALL]),
        # Not "secured": no USER, and SASL without mechanisms until TLS.
        (OUTSIDE, [*CAPA_BASE, b"STLS", b"SASL"]),
    ],
)
def test_capa_before_and_after_stls(
    dovecot_auth: AuthDovecotServer, tls: ssl.SSLContext, source: str, before_stls: list[bytes]
) -> None:
    with RawPop3(HOST, dovecot_auth.pop3_port, source=source) as conn:
        assert conn.command("CAPA") == b"+OK"
        assert conn.multiline() == before_stls
        assert conn.stls(tls, TLS_NAME) == b"+OK Begin TLS negotiation now."
        assert conn.command("CAPA") == b"+OK"
        assert conn.multiline() == [*CAPA_BASE, b"USER", SASL_ALL]
        assert conn.command("AUTH") == b"+OK"
        assert conn.multiline() == [b"PLAIN", b"LOGIN", b"XOAUTH2", b"OAUTHBEARER"]


def test_capa_on_implicit_tls(dovecot_auth: AuthDovecotServer, tls: ssl.SSLContext) -> None:
    with session(dovecot_auth, "implicit", tls) as conn:
        assert GREETING.fullmatch(conn.greeting)
        assert conn.command("CAPA") == b"+OK"
        assert conn.multiline() == [*CAPA_BASE, b"USER", SASL_ALL]


# ---------------------------------------------------------------- successful logins


@contextmanager
def poplib_session(
    server: AuthDovecotServer, transport: str, tls: ssl.SSLContext
) -> Iterator[poplib.POP3]:
    pop: poplib.POP3
    if transport == "implicit":
        pop = poplib.POP3_SSL(HOST, server.pop3s_port, timeout=TIMEOUT, context=tls)
    else:
        pop = poplib.POP3(HOST, server.pop3_port, timeout=TIMEOUT)
    try:
        if transport == "stls":
            assert pop.stls(tls) == b"+OK Begin TLS negotiation now."
        assert isinstance(pop.sock, ssl.SSLSocket)
        yield pop
    finally:
        pop.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mechanism", ["user", "apop"])
def test_poplib_logs_in(
    dovecot_auth: AuthDovecotServer,
    mail_account: MailAccount,
    tls: ssl.SSLContext,
    mechanism: str,
    transport: str,
) -> None:
    with poplib_session(dovecot_auth, transport, tls) as pop:
        if mechanism == "user":
            assert pop.user(mail_account.name) == b"+OK"
            assert pop.pass_(mail_account.password) == LOGGED_IN
        else:
            assert pop.apop(mail_account.name, mail_account.password) == LOGGED_IN
        assert pop.stat() == (0, 0)
        assert pop.quit() == b"+OK Logging out."


def sasl_login(
    conn: RawPop3,
    mechanism: str,
    account: MailAccount,
    introspection: IntrospectionServer,
    server: AuthDovecotServer,
) -> None:
    """Log in with a SASL mechanism, asserting every line Dovecot sends on the way."""
    if mechanism == "plain":
        assert conn.command(f"AUTH PLAIN {plain_response(account.name, account.password)}") == (
            LOGGED_IN
        )
    elif mechanism == "login":
        assert conn.command("AUTH LOGIN") == b"+ " + b64(b"Username:").encode()
        assert conn.command(b64(account.name.encode())) == b"+ " + b64(b"Password:").encode()
        assert conn.command(b64(account.password.encode())) == LOGGED_IN
    elif mechanism == "xoauth2":
        token = introspection.issue(account.name)
        assert conn.command(f"AUTH XOAUTH2 {xoauth2_response(account.name, token)}") == LOGGED_IN
    elif mechanism == "oauthbearer":
        token = introspection.issue(account.name)
        response = oauthbearer_response(account.name, token, HOST, server.pop3s_port)
        assert conn.command(f"AUTH OAUTHBEARER {response}") == LOGGED_IN
    else:
        raise AssertionError(mechanism)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mechanism", ["plain", "login", "xoauth2", "oauthbearer"])
def test_sasl_logs_in(
    dovecot_auth: AuthDovecotServer,
    introspection: IntrospectionServer,
    mail_account: MailAccount,
    tls: ssl.SSLContext,
    mechanism: str,
    transport: str,
) -> None:
    with session(dovecot_auth, transport, tls) as conn:
        sasl_login(conn, mechanism, mail_account, introspection, dovecot_auth)
        assert conn.command("STAT") == b"+OK 0 0"
        assert conn.command("QUIT") == b"+OK Logging out."


def test_sasl_plain_without_initial_response(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, tls: ssl.SSLContext
) -> None:
    with session(dovecot_auth, "implicit", tls) as conn:
        assert conn.command("AUTH PLAIN") == b"+ "  # empty challenge: "+", one space
        assert conn.command(plain_response(mail_account.name, mail_account.password)) == LOGGED_IN


def test_raw_apop_with_the_greeting_timestamp(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, tls: ssl.SSLContext
) -> None:
    with session(dovecot_auth, "stls", tls) as conn:
        timestamp = apop_timestamp(conn.greeting)
        assert timestamp is not None
        digest = apop_digest(timestamp, mail_account.password)
        assert conn.command(f"APOP {mail_account.name} {digest}") == LOGGED_IN


def test_introspection_request_as_dovecot_sends_it(
    dovecot_auth: AuthDovecotServer,
    introspection: IntrospectionServer,
    mail_account: MailAccount,
    tls: ssl.SSLContext,
) -> None:
    token = introspection.issue(mail_account.name)
    with session(dovecot_auth, "implicit", tls) as conn:
        assert conn.command(f"AUTH XOAUTH2 {xoauth2_response(mail_account.name, token)}") == (
            LOGGED_IN
        )
    sent = [r for r in introspection.requests() if r.token == token]
    assert [(r.method, r.content_type) for r in sent] == [
        ("POST", "application/x-www-form-urlencoded")
    ]


# ---------------------------------------------------------------- refused logins


def test_wrong_password_is_refused_quickly_and_without_penalty(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, tls: ssl.SSLContext
) -> None:
    failures: list[float] = []
    for attempt in range(3):
        with session(dovecot_auth, "implicit", tls) as conn:
            assert conn.command(f"USER {mail_account.name}") == b"+OK"
            began = time.monotonic()
            assert conn.command(f"PASS wrong{attempt}") == AUTH_FAILED
            failures.append(time.monotonic() - began)
    with session(dovecot_auth, "implicit", tls) as conn:
        began = time.monotonic()
        assert conn.command(f"AUTH PLAIN {plain_response(mail_account.name, 'wrong')}") == (
            AUTH_FAILED
        )
        failures.append(time.monotonic() - began)
        # Same connection: a second attempt is allowed after a failure.
        began = time.monotonic()
        assert conn.command(f"USER {mail_account.name}") == b"+OK"
        assert conn.command(f"PASS {mail_account.password}") == LOGGED_IN
        success = time.monotonic() - began
    # With the auth penalty these would take 2, 4, 8... s more each.
    assert max(failures) < FAILURE_SECONDS_MAX, failures
    assert success < FAILURE_SECONDS_MAX, success


@pytest.mark.parametrize("mechanism", ["user", "plain", "login", "apop"])
def test_unknown_user_is_refused(
    dovecot_auth: AuthDovecotServer, tls: ssl.SSLContext, mechanism: str
) -> None:
    with session(dovecot_auth, "implicit", tls) as conn:
        if mechanism == "user":
            assert conn.command("USER nobody-here") == b"+OK"  # USER itself never fails
            assert conn.command("PASS whatever") == AUTH_FAILED
        elif mechanism == "plain":
            assert conn.command(f"AUTH PLAIN {plain_response('nobody-here', 'x')}") == AUTH_FAILED
        elif mechanism == "login":
            assert conn.command("AUTH LOGIN").startswith(b"+ ")
            assert conn.command(b64(b"nobody-here")).startswith(b"+ ")
            assert conn.command(b64(b"x")) == AUTH_FAILED
        else:
            assert conn.command("APOP nobody-here " + "0" * 32) == AUTH_FAILED


def test_apop_with_a_wrong_digest_is_refused(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, tls: ssl.SSLContext
) -> None:
    with session(dovecot_auth, "implicit", tls) as conn:
        stale = apop_digest(b"<0.0@elsewhere>", mail_account.password)
        assert conn.command(f"APOP {mail_account.name} {stale}") == AUTH_FAILED


@pytest.mark.parametrize("mechanism", ["user", "plain"])
def test_checkpassword_backend_down_is_sys_temp(
    dovecot_auth: AuthDovecotServer, tls: ssl.SSLContext, mechanism: str
) -> None:
    with session(dovecot_auth, "stls", tls) as conn:
        if mechanism == "user":
            assert conn.command("USER tempfail-one") == b"+OK"
            reply = conn.command("PASS anything")
        else:
            reply = conn.command(f"AUTH PLAIN {plain_response('tempfail-two', 'anything')}")
        assert TEMPFAIL.fullmatch(reply), reply
        # The connection stays open, still before login.
        assert conn.command("CAPA") == b"+OK"
        assert conn.multiline()[-1] == SASL_ALL


def test_unsupported_mechanism(dovecot_auth: AuthDovecotServer, tls: ssl.SSLContext) -> None:
    with session(dovecot_auth, "implicit", tls) as conn:
        assert conn.command("AUTH CRAM-MD5") == UNSUPPORTED
        assert conn.command("AUTH DIGEST-MD5 " + b64(b"x")) == UNSUPPORTED


def test_client_abort_and_bad_base64(dovecot_auth: AuthDovecotServer, tls: ssl.SSLContext) -> None:
    with session(dovecot_auth, "implicit", tls) as conn:
        assert conn.command("AUTH PLAIN") == b"+ "
        assert conn.command("*") == b"-ERR Authentication aborted by client."
        assert conn.command("AUTH PLAIN") == b"+ "
        assert conn.command("!!not-base64") == b"-ERR [AUTH] Invalid base64 in response"


def test_plaintext_before_tls_from_outside(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount
) -> None:
    with RawPop3(HOST, dovecot_auth.pop3_port, source=OUTSIDE) as conn:
        assert conn.command(f"USER {mail_account.name}") == (
            b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
        )
        assert conn.command(f"AUTH PLAIN {plain_response(mail_account.name, 'x')}") == (
            b"-ERR [AUTH] Plaintext authentication disabled."
        )
        assert conn.command("AUTH XOAUTH2") == b"-ERR [AUTH] Plaintext authentication disabled."
        # APOP does not reveal the password, so Dovecot accepts it without TLS.
        timestamp = apop_timestamp(conn.greeting)
        assert timestamp is not None
        digest = apop_digest(timestamp, mail_account.password)
        assert conn.command(f"APOP {mail_account.name} {digest}") == LOGGED_IN


# ---------------------------------------------------------------- OAuth 2.0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_revoked_token_is_refused(
    dovecot_auth: AuthDovecotServer,
    introspection: IntrospectionServer,
    mail_account: MailAccount,
    tls: ssl.SSLContext,
    transport: str,
) -> None:
    token = introspection.issue(mail_account.name)
    introspection.revoke(token)
    with session(dovecot_auth, transport, tls) as conn:
        challenge = conn.command(f"AUTH XOAUTH2 {xoauth2_response(mail_account.name, token)}")
        assert decoded_challenge(challenge) == XOAUTH2_ERROR
        assert conn.command("") == AUTH_FAILED  # the client's empty answer ends the exchange
    with session(dovecot_auth, transport, tls) as conn:
        response = oauthbearer_response(mail_account.name, token, HOST, dovecot_auth.pop3s_port)
        challenge = conn.command(f"AUTH OAUTHBEARER {response}")
        assert decoded_challenge(challenge) == OAUTHBEARER_ERROR
        assert conn.command(b64(b"\x01")) == AUTH_FAILED  # RFC 7628's dummy answer: %x01


def test_token_of_another_user_is_refused(
    dovecot_auth: AuthDovecotServer,
    introspection: IntrospectionServer,
    mail_account: MailAccount,
    tls: ssl.SSLContext,
) -> None:
    someone_else = dovecot_auth.add_user()
    token = introspection.issue(someone_else.name)
    with session(dovecot_auth, "implicit", tls) as conn:
        challenge = conn.command(f"AUTH XOAUTH2 {xoauth2_response(mail_account.name, token)}")
        assert decoded_challenge(challenge) == XOAUTH2_ERROR
        assert conn.command("") == AUTH_FAILED


def test_oauth_challenge_can_be_aborted(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, tls: ssl.SSLContext
) -> None:
    with session(dovecot_auth, "implicit", tls) as conn:
        challenge = conn.command(f"AUTH XOAUTH2 {xoauth2_response(mail_account.name, 'nope')}")
        assert decoded_challenge(challenge) == XOAUTH2_ERROR
        assert conn.command("*") == b"-ERR Authentication aborted by client."


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_introspection_failure_is_sys_temp(
    dovecot_auth: AuthDovecotServer,
    introspection: IntrospectionServer,
    mail_account: MailAccount,
    tls: ssl.SSLContext,
    mechanism: str,
) -> None:
    token = introspection.issue_failing(503)
    if mechanism == "xoauth2":
        command = f"AUTH XOAUTH2 {xoauth2_response(mail_account.name, token)}"
    else:
        response = oauthbearer_response(mail_account.name, token, HOST, dovecot_auth.pop3s_port)
        command = f"AUTH OAUTHBEARER {response}"
    with session(dovecot_auth, "implicit", tls) as conn:
        reply = conn.command(command)
        assert TEMPFAIL.fullmatch(reply), reply  # no challenge line first


def test_introspection_endpoint_answers(introspection: IntrospectionServer) -> None:
    def ask(token: str) -> tuple[int, object]:
        # http.client, not urllib: no proxy from the environment can get in between.
        conn = http.client.HTTPConnection(HOST, introspection.port, timeout=TIMEOUT)
        try:
            conn.request(
                "POST",
                PATH,
                body=f"token={token}",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    token = introspection.issue("someone")
    assert ask(token) == (200, {"active": True, "username": "someone"})
    introspection.revoke(token)
    assert ask(token) == (200, {"active": False})
    assert ask("never-issued") == (200, {"active": False})
    assert ask(introspection.issue_failing(500))[0] == 500
    assert introspection.requests()[-1].token is not None


# ---------------------------------------------------------------- mailbox


def test_unopenable_mailbox_fails_after_logged_in(
    dovecot_auth: AuthDovecotServer, tls: ssl.SSLContext
) -> None:
    account = dovecot_auth.add_user(mailbox=False)
    with session(dovecot_auth, "implicit", tls) as conn:
        assert conn.command(f"USER {account.name}") == b"+OK"
        assert conn.command(f"PASS {account.password}") == LOGGED_IN
        reply = conn.line()
        assert INTERNAL_ERROR.fullmatch(reply), reply
        assert conn.line() == b"" and conn.closed_by_server


def test_stat_list_and_top_match_the_delivered_messages(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, tls: ssl.SSLContext
) -> None:
    oldest = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    dates = [oldest, oldest + timedelta(days=30), oldest - timedelta(days=1)]
    delivered = [
        deliver(mail_account.maildir, make_message(dates[0], size=1000), date=dates[0]),
        deliver(mail_account.maildir, make_message(dates[1], size=4321), date=dates[1]),
        # Any size: STAT counts what was written, CRLF included.
        deliver(mail_account.maildir, make_message(dates[2]), date=dates[2]),
    ]
    assert [d.octets for d in delivered[:2]] == [1000, 4321]
    assert message_count(mail_account.maildir) == 3
    total = sum(d.octets for d in delivered)
    with session(dovecot_auth, "implicit", tls) as conn:
        assert conn.command(f"USER {mail_account.name}") == b"+OK"
        assert conn.command(f"PASS {mail_account.password}") == LOGGED_IN
        assert conn.command("STAT") == f"+OK 3 {total}".encode()
        assert conn.command("LIST") == b"+OK 3 messages:"
        assert conn.multiline() == [f"{i} {d.octets}".encode() for i, d in enumerate(delivered, 1)]
        for number, date in enumerate(dates, 1):
            assert conn.command(f"TOP {number} 0") == b"+OK"
            header = conn.multiline()
            assert header[0] == f"Date: {email.utils.format_datetime(date)}".encode()
            assert email.utils.parsedate_to_datetime(header[0][6:].decode()) == date
            assert header[-1] == b""  # the blank line that ends the header
        assert conn.command("QUIT") == b"+OK Logging out."
    # Dovecot moved them from new/ to cur/; none lost, none added.
    assert message_count(mail_account.maildir) == 3
    assert empty_maildir(mail_account.maildir) == 3
    assert message_count(mail_account.maildir) == 0
    with session(dovecot_auth, "stls", tls) as conn:
        response = plain_response(mail_account.name, mail_account.password)
        assert conn.command(f"AUTH PLAIN {response}") == LOGGED_IN
        assert conn.command("STAT") == b"+OK 0 0"
        assert conn.command("TOP 1 0") == b"-ERR There's no message 1."


def test_deliveries_append_after_a_session(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, tls: ssl.SSLContext
) -> None:
    first = datetime(2020, 5, 6, 7, 8, 9, tzinfo=UTC)
    deliver_messages(mail_account.maildir, [first], size=500)
    with poplib_session(dovecot_auth, "implicit", tls) as pop:
        pop.user(mail_account.name)
        pop.pass_(mail_account.password)
        assert pop.stat() == (1, 500)
        pop.quit()
    deliver_messages(mail_account.maildir, [first - timedelta(days=9)] * 2, size=600)
    with poplib_session(dovecot_auth, "stls", tls) as pop:
        pop.user(mail_account.name)
        pop.pass_(mail_account.password)
        assert pop.stat() == (3, 1700)
        # Message 1 stays the first delivered, whatever the Date headers say.
        _, lines, _ = pop.top(1, 0)
        assert lines[0] == f"Date: {email.utils.format_datetime(first)}".encode()
        pop.quit()


def test_unreadable_message_fails_top_but_counts_in_stat(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, tls: ssl.SSLContext
) -> None:
    date = datetime(2023, 3, 4, 5, 6, 7, tzinfo=UTC)
    bad = deliver(mail_account.maildir, make_message(date, size=700), date=date, readable=False)
    good = deliver(mail_account.maildir, make_message(date, size=800), date=date)
    with session(dovecot_auth, "implicit", tls) as conn:
        assert conn.command(f"USER {mail_account.name}") == b"+OK"
        assert conn.command(f"PASS {mail_account.password}") == LOGGED_IN
        assert conn.command("STAT") == f"+OK 2 {bad.octets + good.octets}".encode()
        assert conn.command("TOP 1 0") == b"-ERR Message 1 expunged."
        assert conn.command("TOP 2 0") == b"+OK"  # the session goes on
        assert conn.multiline()[0].startswith(b"Date: ")


@pytest.mark.parametrize("size", [*range(240, 330), 1000, 4096, 65_537])
def test_make_message_has_the_exact_size(size: int) -> None:
    date = datetime(2024, 2, 29, 12, 0, tzinfo=UTC)
    message = make_message(date, size=size)
    assert len(message) == size
    lines = message.split(b"\r\n")
    assert lines[-1] == b""  # ends with CRLF
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    assert not any(line.startswith(b".") for line in lines)
    assert email.message_from_bytes(message)["Date"] == email.utils.format_datetime(date)


def test_make_message_refuses_impossible_sizes() -> None:
    date = datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="below"):
        make_message(date, size=10)
    with pytest.raises(ValueError, match="timezone"):
        make_message(datetime(2024, 1, 1), size=1000)


# ---------------------------------------------------------------- accounts


def test_accounts_are_fresh_and_usable_at_once(
    dovecot_auth: AuthDovecotServer, tls: ssl.SSLContext
) -> None:
    # Added one after another within a second while Dovecot looks them up.
    for _ in range(3):
        account = dovecot_auth.add_user()
        assert message_count(account.maildir) == 0
        with session(dovecot_auth, "implicit", tls) as conn:
            assert conn.command(f"USER {account.name}") == b"+OK"
            assert conn.command(f"PASS {account.password}") == LOGGED_IN
    with pytest.raises(ValueError, match="exists"):
        dovecot_auth.add_user(account.name)
    with pytest.raises(ValueError, match="unusable"):
        dovecot_auth.add_user("tempfail-mine")


# The session lock ([IN-USE] after Dovecot waits about 11 s for it) is tested once, with
# the exporter: test_dovecot_login.py::test_a_locked_mailbox_is_mailbox_in_use.
