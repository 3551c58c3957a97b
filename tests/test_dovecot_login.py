"""Authenticated probes against real Dovecot: every mechanism on STLS and implicit TLS,
STAT and TOP against what the test delivered, and every failure reason that Dovecot
can be made to produce (the others are in test_login.py, against the fake server)."""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pop3_exporter.config import AuthConfig, MailboxConfig, Module, TLSConfig, TLSMode
from pop3_exporter.credentials import Mechanism, Secret
from pop3_exporter.prober import probe_pop3
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.result import FailureReason, Phase, ProbeResult
from pop3_exporter.target import ProbeTarget
from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer
from tests.support.dovecot_auth import (
    TEMPFAIL_PREFIX,
    AuthDovecotServer,
    MailAccount,
    deliver,
    deliver_messages,
    make_message,
    message_count,
)
from tests.support.introspection import IntrospectionServer

pytestmark = pytest.mark.dovecot

R = FailureReason
TIMEOUT = 8.0
RESOLVER = StaticResolver({"localhost": ["127.0.0.1"]})
PASSWORD_MECHANISMS = (Mechanism.USER, Mechanism.APOP, Mechanism.PLAIN, Mechanism.LOGIN)
TOKEN_MECHANISMS = (Mechanism.XOAUTH2, Mechanism.OAUTHBEARER)


def _module(
    pki: TestPKI,
    tls: TLSMode,
    mechanism: Mechanism,
    username: str,
    *,
    password: str | None = None,
    token_file: Path | None = None,
    oldest_message: bool = True,
    allow_unadvertised: bool = False,
    timeout: float = TIMEOUT,
) -> Module:
    return Module(
        name=f"login_{mechanism}",
        tls=tls,
        timeout=timeout,
        tls_config=TLSConfig(ca_file=str(pki.ca_file)),
        auth=AuthConfig(
            username=username,
            mechanism=mechanism,
            password=Secret(password) if password is not None else None,
            token_file=str(token_file) if token_file is not None else None,
            allow_unadvertised=allow_unadvertised,
        ),
        mailbox=MailboxConfig(oldest_message=oldest_message),
    )


def _port(server: DovecotServer, tls: TLSMode) -> int:
    return server.pop3s_port if tls is TLSMode.IMPLICIT else server.pop3_port


async def _probe(server: DovecotServer, module: Module) -> ProbeResult:
    target = ProbeTarget("localhost", _port(server, module.tls), is_ip_literal=False)
    return await probe_pop3(
        target, module, module.timeout, resolver=RESOLVER, record_transcript=True
    )


def _token_file(directory: Path, token: str) -> Path:
    path = directory / "token"
    path.write_text(token + "\n")
    return path


def _assert(result: ProbeResult, reason: FailureReason | None) -> None:
    assert result.failure_reason is reason, (result.failure_detail, result.transcript)


TLS_MODES = [TLSMode.STARTTLS, TLSMode.IMPLICIT]


@pytest.mark.parametrize("tls", TLS_MODES, ids=str)
@pytest.mark.parametrize("mechanism", list(Mechanism), ids=str)
async def test_every_mechanism_logs_in_and_stat_matches_the_delivery(
    dovecot_auth: AuthDovecotServer,
    mail_account: MailAccount,
    introspection: IntrospectionServer,
    pki: TestPKI,
    tmp_path: Path,
    mechanism: Mechanism,
    tls: TLSMode,
) -> None:
    dates = [datetime(2026, 10, 1, 6, 0, tzinfo=UTC) + timedelta(days=i) for i in range(3)]
    delivered = deliver_messages(mail_account.maildir, dates, size=700)
    token = _token_file(tmp_path, introspection.issue(mail_account.name))
    module = _module(
        pki,
        tls,
        mechanism,
        mail_account.name,
        password=mail_account.password,
        token_file=token if mechanism.uses_token else None,
    )
    result = await _probe(dovecot_auth, module)
    _assert(result, None)
    assert result.login_success is True
    assert result.tls is not None and result.tls.verified
    assert result.mailbox is not None
    assert result.mailbox.messages == 3
    assert result.mailbox.size_bytes == sum(d.octets for d in delivered) == 2100
    assert result.mailbox.oldest_message_timestamp == dates[0].timestamp()
    assert {Phase.LOGIN, Phase.STAT, Phase.TOP} <= dict(result.phase_durations).keys()
    # Nothing was removed: the probe never changes the mailbox.
    assert message_count(mail_account.maildir) == 3
    sent = " ".join(line.text for line in result.transcript if line.direction == "C")
    assert mail_account.password not in sent and "********" in sent


async def test_an_empty_mailbox_reports_zero_and_no_date(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, pki: TestPKI
) -> None:
    module = _module(
        pki, TLSMode.IMPLICIT, Mechanism.USER, mail_account.name, password=mail_account.password
    )
    result = await _probe(dovecot_auth, module)
    _assert(result, None)
    assert result.mailbox is not None
    assert (result.mailbox.messages, result.mailbox.size_bytes) == (0, 0)
    assert result.mailbox.oldest_message_timestamp is None


@pytest.mark.parametrize("mechanism", PASSWORD_MECHANISMS, ids=str)
async def test_a_wrong_password_is_auth_failed(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, pki: TestPKI, mechanism: Mechanism
) -> None:
    module = _module(pki, TLSMode.STARTTLS, mechanism, mail_account.name, password="not-it")
    result = await _probe(dovecot_auth, module)
    _assert(result, R.AUTH_FAILED)
    assert result.failed_phase is Phase.LOGIN
    assert result.login_success is False
    assert "[AUTH] Authentication failed." in (result.failure_detail or "")


async def test_a_failing_password_backend_is_auth_unavailable(
    dovecot_auth: AuthDovecotServer, pki: TestPKI
) -> None:
    # The checkpassword passdb for these names exits 111: the backend is down.
    for mechanism in (Mechanism.USER, Mechanism.PLAIN):
        module = _module(
            pki, TLSMode.IMPLICIT, mechanism, f"{TEMPFAIL_PREFIX}-ldap", password="anything"
        )
        result = await _probe(dovecot_auth, module)
        _assert(result, R.AUTH_UNAVAILABLE)
        assert "[SYS/TEMP]" in (result.failure_detail or "")


async def test_a_failing_token_endpoint_is_auth_unavailable_and_a_revoked_token_auth_failed(
    dovecot_auth: AuthDovecotServer,
    mail_account: MailAccount,
    introspection: IntrospectionServer,
    pki: TestPKI,
    tmp_path: Path,
) -> None:
    for mechanism in TOKEN_MECHANISMS:
        revoked = introspection.issue(mail_account.name)
        introspection.revoke(revoked)
        module = _module(
            pki,
            TLSMode.IMPLICIT,
            mechanism,
            mail_account.name,
            token_file=_token_file(tmp_path, revoked),
        )
        _assert(await _probe(dovecot_auth, module), R.AUTH_FAILED)
        _token_file(tmp_path, introspection.issue_failing(503))
        _assert(await _probe(dovecot_auth, module), R.AUTH_UNAVAILABLE)
        # The token file is read at every probe: a fresh token works at once.
        _token_file(tmp_path, introspection.issue(mail_account.name))
        _assert(await _probe(dovecot_auth, module), None)


async def test_a_mailbox_dovecot_cannot_open_is_a_mailbox_error(
    dovecot_auth: AuthDovecotServer, pki: TestPKI
) -> None:
    # "+OK Logged in." and then "-ERR [SYS/TEMP] Internal error": the step decides.
    account = dovecot_auth.add_user(mailbox=False)
    module = _module(pki, TLSMode.IMPLICIT, Mechanism.USER, account.name, password=account.password)
    result = await _probe(dovecot_auth, module)
    _assert(result, R.MAILBOX_ERROR)
    assert result.login_success is True
    assert result.failed_phase is Phase.STAT


async def test_a_message_dovecot_cannot_read_makes_top_a_mailbox_error(
    dovecot_auth: AuthDovecotServer, mail_account: MailAccount, pki: TestPKI
) -> None:
    date = datetime(2026, 11, 1, tzinfo=UTC)
    deliver(mail_account.maildir, make_message(date), date=date, readable=False)
    module = _module(
        pki, TLSMode.IMPLICIT, Mechanism.USER, mail_account.name, password=mail_account.password
    )
    result = await _probe(dovecot_auth, module)
    _assert(result, R.MAILBOX_ERROR)
    assert result.failed_phase is Phase.TOP
    assert result.mailbox is not None and result.mailbox.messages == 1


async def test_a_mechanism_dovecot_does_not_enable_is_unsupported(
    dovecot: DovecotServer, pki: TestPKI, tmp_path: Path
) -> None:
    # The stock test Dovecot has auth_mechanisms = plain login: no XOAUTH2, no APOP.
    token = _token_file(tmp_path, "unused")
    module = _module(pki, TLSMode.IMPLICIT, Mechanism.XOAUTH2, "probe", token_file=token)
    result = await _probe(dovecot, module)
    _assert(result, R.AUTH_MECHANISM_UNSUPPORTED)
    assert "does not advertise SASL XOAUTH2" in (result.failure_detail or "")
    assert not [line for line in result.transcript if line.direction == "C" and "AUTH" in line.text]
    # Asked to try it anyway, Dovecot refuses the mechanism before any credentials.
    forced = _module(
        pki, TLSMode.IMPLICIT, Mechanism.XOAUTH2, "probe", token_file=token, allow_unadvertised=True
    )
    result = await _probe(dovecot, forced)
    _assert(result, R.AUTH_MECHANISM_UNSUPPORTED)
    assert "Unsupported authentication mechanism" in (result.failure_detail or "")
    apop = _module(pki, TLSMode.IMPLICIT, Mechanism.APOP, "probe", password="secret")
    result = await _probe(dovecot, apop)
    _assert(result, R.AUTH_MECHANISM_UNSUPPORTED)
    assert "no APOP timestamp" in (result.failure_detail or "")


@pytest.mark.slow
async def test_a_locked_mailbox_is_mailbox_in_use(
    dovecot_auth: AuthDovecotServer, pki: TestPKI
) -> None:
    """Dovecot waits about 11 s for the lock before -ERR [IN-USE]: a module timeout
    above that sees the code (below it, a timeout in the login phase)."""
    account = dovecot_auth.add_user(lock_session=True)
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    with (
        socket.create_connection(("127.0.0.1", dovecot_auth.pop3s_port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as holder,
    ):
        reader = holder.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        holder.sendall(f"USER {account.name}\r\nPASS {account.password}\r\n".encode())
        assert reader.readline().startswith(b"+OK")
        assert reader.readline().startswith(b"+OK Logged in")
        module = _module(
            pki,
            TLSMode.IMPLICIT,
            Mechanism.USER,
            account.name,
            password=account.password,
            timeout=20.0,
        )
        result = await _probe(dovecot_auth, module)
        holder.sendall(b"QUIT\r\n")
        reader.close()
    _assert(result, R.MAILBOX_IN_USE)
    assert "[IN-USE]" in (result.failure_detail or "")
    # Dovecot waited for the lock before answering (a fixed 10 s in 2.3.19).
    assert dict(result.phase_durations)[Phase.LOGIN] > 9.0
    # Once the holder has left, the next probe gets in at once.
    again = await _probe(dovecot_auth, module)
    _assert(again, None)
    assert dict(again.phase_durations)[Phase.LOGIN] < 2.0
