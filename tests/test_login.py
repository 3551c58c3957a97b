"""Authenticated probes against the fake mail server: every mechanism, every response
code, and the faults a real Dovecot does not produce (see test_dovecot_login.py for
the real server). Each probe must end with a fixed reason and in time."""

from __future__ import annotations

import ssl
import time
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest

from pop3_exporter.config import AuthConfig, MailboxConfig, Module, TLSConfig, TLSMode
from pop3_exporter.credentials import Mechanism, Secret
from pop3_exporter.debug import debug_report
from pop3_exporter.prober import probe_pop3
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.result import FailureReason, Phase, ProbeResult
from pop3_exporter.target import ProbeTarget
from tests.support.certs import TestPKI
from tests.support.exposition import Samples, parse_samples, promtool_check_metrics
from tests.support.fakemail import FakeMailServer
from tests.support.fakepop3 import FakeConnection, FakePop3Server, server_ssl_context
from tests.support.render import render_probe

R = FailureReason
TIMEOUT = 5.0
MARGIN = 0.5
PASSWORD = "correct horse"
TOKEN = "tok-good"


def _message(date: str | None, body: str = "hello") -> bytes:
    headers = ["From: a@example.test", "Subject: test"]
    if date is not None:
        headers.append(f"Date: {date}")
    return ("\r\n".join(headers) + "\r\n\r\n" + body + "\r\n").encode()


def _module(
    mechanism: Mechanism = Mechanism.USER,
    *,
    password: str = PASSWORD,
    token_file: str | None = None,
    oldest_message: bool = True,
    tls: TLSMode = TLSMode.NONE,
    ca_file: str | None = None,
    allow_unadvertised: bool = False,
) -> Module:
    return Module(
        name="login",
        tls=tls,
        tls_config=TLSConfig(ca_file=ca_file),
        auth=AuthConfig(
            username="monitor@example.test",
            mechanism=mechanism,
            password=Secret(password),
            token_file=token_file,
            allow_plaintext=tls is TLSMode.NONE,
            allow_unadvertised=allow_unadvertised,
        ),
        mailbox=MailboxConfig(oldest_message=oldest_message),
    )


def _token_file(directory: Path, token: str = TOKEN) -> str:
    path = directory / "token"
    path.write_text(token + "\n")
    return str(path)


async def _probe(
    server: FakeMailServer, module: Module, *, tls: ssl.SSLContext | None = None
) -> ProbeResult:
    """Probe the fake (by the name the test certificates carry when it speaks TLS)."""
    async with FakePop3Server(server, ssl_context=tls) as fake:
        started = time.monotonic()
        result = await probe_pop3(
            ProbeTarget("localhost", fake.port, is_ip_literal=False),
            module,
            TIMEOUT,
            resolver=StaticResolver({"localhost": ["127.0.0.1"]}),
            record_transcript=True,
        )
        assert time.monotonic() - started <= TIMEOUT + MARGIN
    return result


def _check(result: ProbeResult, reason: FailureReason | None, module: Module) -> Samples:
    """Result and exposition agree on the reason; the exposition is valid."""
    assert result.failure_reason is reason, (result.failure_reason, result.failure_detail)
    body, _ = render_probe(result, module.tls, "")
    promtool_check_metrics(body.decode())
    samples = parse_samples(body.decode())
    assert samples[("probe_success", ())] == float(reason is None)
    assert samples[("probe_pop3_failure", (("reason", (reason or R.TIMEOUT).value),))] == float(
        reason is not None
    )
    return samples


def _sent_after_capa(server: FakeMailServer) -> list[str]:
    (session,) = server.sessions
    return [line for line in session if line != "CAPA"]


# ------------------------------------------------------------------ mechanisms


@pytest.mark.parametrize("mechanism", list(Mechanism))
async def test_every_mechanism_logs_in_and_reads_the_mailbox(
    mechanism: Mechanism, tmp_path: Path
) -> None:
    token_file = _token_file(tmp_path) if mechanism.uses_token else None
    when = datetime(2026, 11, 1, 8, 30, tzinfo=UTC)
    messages = [_message(format_datetime(when)), _message("Tue, 3 Nov 2026 10:00:00 +0100")]
    server = FakeMailServer(messages=messages)
    module = _module(mechanism, token_file=token_file)
    result = await _probe(server, module)
    samples = _check(result, None, module)
    assert result.login_success is True
    assert samples[("probe_pop3_login_success", ())] == 1.0
    assert samples[("probe_pop3_mailbox_messages", ())] == 2.0
    assert samples[("probe_pop3_mailbox_size_bytes", ())] == float(sum(map(len, messages)))
    assert samples[("probe_pop3_mailbox_oldest_message_timestamp_seconds", ())] == when.timestamp()
    phases = dict(result.phase_durations)
    assert {Phase.LOGIN, Phase.STAT, Phase.TOP} <= set(phases)
    # The probe never changes the mailbox.
    sent = [line.split()[0].upper() for line in _sent_after_capa(server)]
    assert not {"DELE", "RETR", "RSET"} & set(sent)
    assert sent[-1] == "QUIT"


async def test_login_over_implicit_tls(pki: TestPKI) -> None:
    server = FakeMailServer(messages=[_message(None)])
    module = _module(tls=TLSMode.IMPLICIT, ca_file=str(pki.ca_file))
    result = await _probe(server, module, tls=server_ssl_context(pki.variants["good"]))
    samples = _check(result, None, module)
    assert samples[("probe_pop3_mailbox_messages", ())] == 1.0
    # No Date header: the oldest-message series is absent, not 0.
    assert ("probe_pop3_mailbox_oldest_message_timestamp_seconds", ()) not in samples


async def test_oauth_error_challenges_are_answered_as_the_mechanism_says(
    tmp_path: Path,
) -> None:
    token_file = _token_file(tmp_path, "tok-revoked")
    for mechanism, ack in ((Mechanism.OAUTHBEARER, b"\x01"), (Mechanism.XOAUTH2, b"")):
        server = FakeMailServer()
        module = _module(mechanism, token_file=token_file)
        result = await _probe(server, module)
        _check(result, R.AUTH_FAILED, module)
        assert server.error_acks == [ack]
        assert result.login_success is False


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        ("-ERR [SYS/TEMP] Temporary authentication failure.", R.AUTH_UNAVAILABLE),
        ("-ERR [SYS/TEMP/LDAP] backend down", R.AUTH_UNAVAILABLE),
        ("-ERR [SYS/PERM] Account disabled.", R.AUTH_SYSTEM_ERROR),
        ("-ERR [IN-USE] Mailbox is locked by another POP3 session.", R.MAILBOX_IN_USE),
        ("-ERR [LOGIN-DELAY] Too soon.", R.LOGIN_DELAY),
        ("-ERR [AUTH] Authentication failed.", R.AUTH_FAILED),
        ("-ERR [NEW-CODE] something else", R.AUTH_FAILED),
        ("-ERR no code at all", R.AUTH_FAILED),
        ("-ERR [sys/temp] lower case code", R.AUTH_UNAVAILABLE),
    ],
)
async def test_response_codes_decide_the_login_reason(refusal: str, reason: FailureReason) -> None:
    for mechanism in (Mechanism.USER, Mechanism.PLAIN):
        server = FakeMailServer(login_refusal=refusal)
        module = _module(mechanism)
        result = await _probe(server, module)
        samples = _check(result, reason, module)
        assert result.failed_phase is Phase.LOGIN
        assert samples[("probe_pop3_login_success", ())] == 0.0
        assert ("probe_pop3_mailbox_messages", ()) not in samples
        # A refused login still ends politely.
        assert _sent_after_capa(server)[-1] == "QUIT"


async def test_wrong_password_is_auth_failed_for_every_password_mechanism() -> None:
    for mechanism in (Mechanism.USER, Mechanism.APOP, Mechanism.PLAIN, Mechanism.LOGIN):
        module = _module(mechanism, password="wrong")
        result = await _probe(FakeMailServer(), module)
        _check(result, R.AUTH_FAILED, module)


@pytest.mark.parametrize(
    ("capabilities", "mechanism"),
    [
        (("TOP", "SASL PLAIN"), Mechanism.USER),
        (("TOP", "USER"), Mechanism.PLAIN),
        (("TOP", "USER", "SASL PLAIN"), Mechanism.XOAUTH2),
        (("TOP", "USER", "SASL"), Mechanism.LOGIN),
    ],
)
async def test_an_unadvertised_mechanism_is_never_tried(
    capabilities: tuple[str, ...], mechanism: Mechanism, tmp_path: Path
) -> None:
    server = FakeMailServer(capabilities=capabilities)
    module = _module(mechanism, token_file=_token_file(tmp_path))
    result = await _probe(server, module)
    _check(result, R.AUTH_MECHANISM_UNSUPPORTED, module)
    assert _sent_after_capa(server) == ["QUIT"]  # no credentials, not even a user name


async def test_allow_unadvertised_tries_it_anyway() -> None:
    server = FakeMailServer(capabilities=("TOP",))
    module = _module(Mechanism.USER, allow_unadvertised=True)
    result = await _probe(server, module)
    _check(result, None, module)


async def test_auth_refused_before_credentials_is_mechanism_unsupported() -> None:
    server = FakeMailServer(sasl_supported=("LOGIN",))
    module = _module(Mechanism.PLAIN)
    result = await _probe(server, module)
    _check(result, R.AUTH_MECHANISM_UNSUPPORTED, module)
    assert _sent_after_capa(server) == ["AUTH PLAIN", "QUIT"]


async def test_apop_without_a_greeting_timestamp_is_mechanism_unsupported() -> None:
    server = FakeMailServer(greeting="+OK no timestamp here")
    module = _module(Mechanism.APOP)
    result = await _probe(server, module)
    _check(result, R.AUTH_MECHANISM_UNSUPPORTED, module)
    assert _sent_after_capa(server) == ["QUIT"]


async def test_login_delay_capability_is_reported() -> None:
    server = FakeMailServer(capabilities=("TOP", "USER", "LOGIN-DELAY 900"))
    module = _module()
    samples = _check(await _probe(server, module), None, module)
    assert samples[("probe_pop3_login_delay_seconds", ())] == 900.0


# ------------------------------------------------------------------ hostile servers


async def test_endless_sasl_challenges_are_a_protocol_error_in_time() -> None:
    server = FakeMailServer(endless_challenges=1000)
    module = _module(Mechanism.PLAIN)
    result = await _probe(server, module)
    _check(result, R.PROTOCOL_ERROR, module)
    assert result.failed_phase is Phase.LOGIN
    assert result.duration_seconds < 2.0


class _DoubleOk(FakeMailServer):
    """Sends an extra "+OK" before its verdict on the credentials."""

    async def _verdict(self, conn: FakeConnection, good: bool) -> bool:
        await conn.send_line("+OK")
        return await super()._verdict(conn, good)


async def test_a_server_that_says_ok_twice_falls_out_of_step_into_a_fixed_reason() -> None:
    # The extra "+OK" is taken as PASS's reply, so STAT reads "+OK Logged in.", which
    # is no STAT reply: a protocol error, never a crash or a made-up count.
    module = _module()
    result = await _probe(_DoubleOk(), module)
    samples = _check(result, R.PROTOCOL_ERROR, module)
    assert result.failed_phase is Phase.STAT
    assert ("probe_pop3_mailbox_messages", ()) not in samples


@pytest.mark.parametrize(
    "stat_reply",
    [
        "+OK",
        "+OK many lots",
        "+OK 1",
        "+OK -1 10",
        "+OK 99999999999999999999 1",
        "+OK \u0661 \u0662",
    ],
)
async def test_garbage_or_absurd_stat_is_a_protocol_error(stat_reply: str) -> None:
    server = FakeMailServer(stat_reply=stat_reply)
    module = _module()
    result = await _probe(server, module)
    samples = _check(result, R.PROTOCOL_ERROR, module)
    assert result.failed_phase is Phase.STAT
    assert samples[("probe_pop3_login_success", ())] == 1.0
    assert ("probe_pop3_mailbox_messages", ()) not in samples


async def test_stat_or_top_refused_after_login_is_a_mailbox_error() -> None:
    module = _module()
    server = FakeMailServer(stat_reply="-ERR [SYS/TEMP] Internal error occurred.")
    result = await _probe(server, module)
    _check(result, R.MAILBOX_ERROR, module)
    assert result.failed_phase is Phase.STAT
    server = FakeMailServer(messages=[_message(None)], top_reply=b"-ERR TOP not here\r\n")
    result = await _probe(server, module)
    _check(result, R.MAILBOX_ERROR, module)
    assert result.failed_phase is Phase.TOP


@pytest.mark.parametrize(
    "date",
    [
        "not a date",
        "Mon, 32 Foo 2026 99:99:99 +0000",
        "Tue, 1 Jan 2999 00:00:00 +0000",  # far future: not trusted
        "Tue, 1 Jan 2026 00:00:00",  # no zone
        "",
        "Mon, 1 Jan 10000 00:00:00 +0000",
    ],
)
async def test_an_unusable_date_leaves_the_oldest_message_absent(date: str) -> None:
    server = FakeMailServer(messages=[_message(date)])
    module = _module()
    samples = _check(await _probe(server, module), None, module)
    assert samples[("probe_pop3_mailbox_messages", ())] == 1.0
    assert ("probe_pop3_mailbox_oldest_message_timestamp_seconds", ()) not in samples


async def test_folded_date_header_and_dot_stuffed_headers() -> None:
    message = b"From: a\r\n.hidden: x\r\nDate: Sun, 1 Nov 2026\r\n 08:30:00 +0000\r\n\r\nbody\r\n"
    server = FakeMailServer(messages=[message])
    module = _module()
    samples = _check(await _probe(server, module), None, module)
    expected = datetime(2026, 11, 1, 8, 30, tzinfo=UTC).timestamp()
    assert samples[("probe_pop3_mailbox_oldest_message_timestamp_seconds", ())] == expected


async def test_only_the_first_date_header_counts_with_its_own_folding() -> None:
    message = (
        b"Date: Sun, 1 Nov 2026 08:30:00 +0000\r\nDate: Mon, 2 Nov 2026\r\n 09:00:00 +0000\r\n"
        b"\r\nbody\r\n"
    )
    server = FakeMailServer(messages=[message])
    module = _module()
    samples = _check(await _probe(server, module), None, module)
    expected = datetime(2026, 11, 1, 8, 30, tzinfo=UTC).timestamp()
    assert samples[("probe_pop3_mailbox_oldest_message_timestamp_seconds", ())] == expected


async def test_an_empty_mailbox_sends_no_top() -> None:
    server = FakeMailServer()
    module = _module()
    samples = _check(await _probe(server, module), None, module)
    assert samples[("probe_pop3_mailbox_messages", ())] == 0.0
    assert not any(line.startswith("TOP") for line in _sent_after_capa(server))


async def test_a_header_flood_in_top_is_read_in_bounded_memory() -> None:
    flood = b"+OK\r\n" + b"X-Junk: " + b"j" * 1000 + b"\r\n"
    server = FakeMailServer(messages=[_message(None)], top_reply=flood * 1 + b".\r\n")
    module = _module()
    _check(await _probe(server, module), None, module)
    endless = b"+OK\r\n" + (b"X-Junk: j\r\n" * 20_000) + b".\r\n"
    server = FakeMailServer(messages=[_message(None)], top_reply=endless)
    result = await _probe(server, module)
    _check(result, R.PROTOCOL_ERROR, module)
    assert "lines" in (result.failure_detail or "")


# ------------------------------------------------------------------ secrets


async def test_secrets_never_reach_the_transcript_metrics_or_messages(tmp_path: Path) -> None:
    token_file = _token_file(tmp_path)
    for mechanism in Mechanism:
        for password in (PASSWORD, "wrong-pass-7"):
            server = FakeMailServer(messages=[_message(None)])
            module = _module(mechanism, password=password, token_file=token_file)
            result = await _probe(server, module)
            body, _ = render_probe(result, module.tls, "")
            report = debug_report(result, module, body.decode())
            for channel in (report, body.decode(), result.failure_detail or "", repr(result)):
                for secret in (password, TOKEN, "Y29ycmVjdCBob3JzZQ"):
                    assert secret not in channel, (mechanism, secret)
            sent = [line.text for line in result.transcript if line.direction == "C"]
            assert any("********" in line for line in sent), sent


async def test_a_token_file_is_read_at_every_probe(tmp_path: Path) -> None:
    token_file = _token_file(tmp_path, "tok-one")
    server = FakeMailServer(token="tok-two")
    module = _module(Mechanism.XOAUTH2, token_file=token_file)
    _check(await _probe(server, module), R.AUTH_FAILED, module)
    _token_file(tmp_path, "tok-two")  # rotated: the next probe uses it
    _check(await _probe(server, module), None, module)


async def test_a_module_without_tls_and_without_allow_plaintext_never_sends_credentials() -> None:
    auth = _module().auth
    assert auth is not None
    module = replace(_module(), auth=replace(auth, allow_plaintext=False))
    server = FakeMailServer()
    with pytest.raises(RuntimeError, match="without TLS"):
        await _probe(server, module)
    assert _sent_after_capa(server) == []
