"""The SMTP-to-POP3 round trip against a real mail path: Postfix submission (STARTTLS,
SASL through Dovecot) -> LMTP -> Dovecot -> POP3. Every failure reason of the
delivery probe comes from a real condition, and every test leaves the mailbox empty
of the exporter's messages (the fixture empties the fixed mailboxes afterwards; the
tests check first that the probe itself did)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import secrets
import ssl
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from pop3_exporter.config import (
    AuthConfig,
    DeliveryConfig,
    Module,
    SmtpAuthConfig,
    SmtpConfig,
    TLSConfig,
    TLSMode,
)
from pop3_exporter.credentials import Mechanism, Secret
from pop3_exporter.debug import debug_report
from pop3_exporter.delivery import TOKEN_HEADER, DeliveryRuntime, Token, make_token, scan
from pop3_exporter.prober import probe_pop3
from pop3_exporter.protocol import Pop3Connection
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.result import FailureReason, Phase, ProbeResult
from pop3_exporter.target import ProbeTarget
from tests.support.certs import TestPKI
from tests.support.exporter import REPO, ExporterProcess
from tests.support.exposition import parse_samples, promtool_check_metrics
from tests.support.fakepop3 import FakeConnection, FakePop3Server
from tests.support.mailpath import MailPath, MailUser, make_message
from tests.support.render import render_probe

pytestmark = pytest.mark.mailpath

R = FailureReason
RESOLVER = StaticResolver({"localhost": ["127.0.0.1"]})
TIMEOUT = 8.0
POLL = 0.2


def _runtime(mailpath: MailPath, key: bytes | None = None) -> DeliveryRuntime:
    return DeliveryRuntime(
        key=key or secrets.token_bytes(32), smtp_ssl_context=mailpath.ssl_context()
    )


def _module(
    mailpath: MailPath,
    user: MailUser,
    *,
    to: str | None = None,
    smtp_port: int | None = None,
    smtp_tls: TLSMode = TLSMode.STARTTLS,
    smtp_password: str | None = None,
    smtp_auth: bool = True,
    timeout: float = TIMEOUT,
) -> Module:
    smtp = SmtpConfig(
        address=f"localhost:{smtp_port or mailpath.submission_port}",
        tls=smtp_tls,
        tls_config=TLSConfig(ca_file=str(mailpath.ca_file)),
        auth=SmtpAuthConfig(username=user.address, password=Secret(smtp_password or user.password))
        if smtp_auth
        else None,
        helo_name="probe.example.test",
    )
    return Module(
        name="delivery",
        tls=TLSMode.IMPLICIT,
        port=mailpath.pop3s_port,
        timeout=timeout,
        tls_config=TLSConfig(ca_file=str(mailpath.ca_file)),
        auth=AuthConfig(
            username=user.address, mechanism=Mechanism.USER, password=Secret(user.password)
        ),
        delivery=DeliveryConfig(
            smtp=smtp, from_address=user.address, to=to or user.address, poll_interval=POLL
        ),
    )


async def _probe(
    mailpath: MailPath, module: Module, runtime: DeliveryRuntime | None = None
) -> ProbeResult:
    target = ProbeTarget("localhost", mailpath.pop3s_port, is_ip_literal=False)
    started = time.monotonic()
    result = await probe_pop3(
        target,
        module,
        module.timeout,
        resolver=RESOLVER,
        record_transcript=True,
        delivery=runtime or _runtime(mailpath),
    )
    # QUIT after the message was seen may run a little past the deadline, never more.
    assert time.monotonic() - started <= module.timeout + 1.5
    return result


def _check(
    result: ProbeResult, reason: FailureReason | None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert result.failure_reason is reason, (result.failure_detail, result.transcript)
    body, _ = render_probe(result, TLSMode.IMPLICIT, "")
    promtool_check_metrics(body.decode())
    samples = parse_samples(body.decode())
    assert samples[("probe_mail_delivery_success", ())] == float(reason is None)
    return samples


async def test_a_message_goes_round_and_the_mailbox_ends_empty(mailpath: MailPath) -> None:
    user = mailpath.new_user()
    module = _module(mailpath, user)
    result = await _probe(mailpath, module)
    samples = _check(result, None)
    assert result.delivery is not None
    seconds = result.delivery.seconds
    # Delivery takes some milliseconds here; it can be no longer than the probe.
    assert seconds is not None and 0 < seconds < result.duration_seconds
    assert samples[("probe_mail_delivery_seconds", ())] == seconds
    assert samples[("probe_mail_delivery_late_messages", ())] == 0
    assert samples[("probe_mail_delivery_cleanup_failures", ())] == 0
    phases = dict(result.phase_durations)
    for phase in (Phase.SMTP_CONNECT, Phase.SMTP_TLS, Phase.SMTP_AUTH, Phase.SMTP_SEND):
        assert phase in phases, phase
    assert mailpath.maildir_count(user) == 0
    assert mailpath.pop3_count(user) == 0


async def test_the_measured_time_covers_a_real_delay(mailpath: MailPath) -> None:
    """Delivery stopped for a second after the message was accepted: the delivery time
    is at least that second, and within the probe."""
    user = mailpath.new_user()
    module = _module(mailpath, user)
    mailpath.stop_delivery()
    loop = asyncio.get_running_loop()
    released_at: list[float] = []

    def resume() -> None:
        released_at.append(loop.time())
        mailpath.resume_delivery()

    probe = asyncio.create_task(_probe(mailpath, module))
    started = loop.time()
    # Resume once the message is queued (deferred or active), at least a second after.
    for _ in range(200):
        await asyncio.sleep(0.05)
        if mailpath.queue():
            break
    await asyncio.sleep(1.0)
    await loop.run_in_executor(None, resume)
    result = await probe
    _check(result, None)
    assert result.delivery is not None and result.delivery.seconds is not None
    # Accepted before the queue showed it, seen after the release a second later.
    assert released_at[0] - started >= 1.0
    assert result.delivery.seconds >= 0.95
    assert result.delivery.seconds <= result.duration_seconds
    assert mailpath.maildir_count(user) == 0


async def test_a_stuck_queue_is_a_delivery_timeout_and_the_next_probe_cleans_up(
    mailpath: MailPath,
) -> None:
    user = mailpath.new_user()
    runtime = _runtime(mailpath)  # one exporter: the same key for both probes
    mailpath.stop_delivery()
    stuck = await _probe(mailpath, _module(mailpath, user, timeout=2.5), runtime)
    samples = _check(stuck, R.DELIVERY_TIMEOUT)
    assert ("probe_mail_delivery_seconds", ()) not in samples
    assert stuck.delivery is not None and stuck.delivery.late_messages == 0
    # The message arrives after its probe gave up ...
    await asyncio.get_running_loop().run_in_executor(None, mailpath.resume_delivery)
    await asyncio.get_running_loop().run_in_executor(None, mailpath.wait_pop3_count, user, 1)
    # ... and the next probe of this exporter finds it, counts it and deletes it.
    result = await _probe(mailpath, _module(mailpath, user), runtime)
    samples = _check(result, None)
    assert samples[("probe_mail_delivery_late_messages", ())] == 1
    assert mailpath.maildir_count(user) == 0


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("unknown recipient", R.SMTP_REJECTED),
        ("recipient deferred", R.SMTP_TEMPORARY_FAILURE),
        ("wrong password", R.SMTP_AUTH_FAILED),
        ("closed port", R.SMTP_CONNECT_ERROR),
    ],
)
async def test_smtp_failures_are_told_apart(
    mailpath: MailPath, how: str, reason: FailureReason
) -> None:
    user = mailpath.new_user()
    module = {
        "unknown recipient": lambda: _module(mailpath, user, to="nobody@example.test"),
        "recipient deferred": lambda: _module(mailpath, user, to=user.with_extension("tempfail")),
        "wrong password": lambda: _module(mailpath, user, smtp_password="not-the-password"),
        "closed port": lambda: _module(mailpath, user, smtp_port=mailpath.closed_port),
    }[how]()
    result = await _probe(mailpath, module)
    _check(result, reason)
    assert result.delivery is not None and result.delivery.seconds is None
    # Nothing was sent, so POP3 was never asked.
    assert Phase.LOGIN not in dict(result.phase_durations)
    assert mailpath.maildir_count(user) == 0
    assert "not-the-password" not in repr(result)


async def test_implicit_tls_submission_and_plain_port_25(mailpath: MailPath) -> None:
    user = mailpath.new_user()
    implicit = _module(mailpath, user, smtp_port=mailpath.smtps_port, smtp_tls=TLSMode.IMPLICIT)
    _check(await _probe(mailpath, implicit), None)
    plain = _module(
        mailpath, user, smtp_port=mailpath.smtp_port, smtp_tls=TLSMode.NONE, smtp_auth=False
    )
    _check(await _probe(mailpath, plain), None)
    assert mailpath.maildir_count(user) == 0


async def test_concurrent_probes_of_one_mailbox_each_find_their_own(mailpath: MailPath) -> None:
    """Three locations (three exporters, three keys) probe one mailbox at once."""
    user = mailpath.new_user()
    module = _module(mailpath, user)
    results = await asyncio.gather(*(_probe(mailpath, module) for _ in range(3)))
    for result in results:
        _check(result, None)
        assert result.delivery is not None and result.delivery.cleanup_failures == 0
    assert mailpath.maildir_count(user) == 0


async def test_messages_that_are_not_this_exporters_are_never_deleted(
    mailpath: MailPath,
) -> None:
    user = mailpath.new_user()
    key = secrets.token_bytes(32)
    runtime = _runtime(mailpath, key)
    # An ordinary message; one whose token header was made with another key; one that
    # copies a valid header of ours but for another recipient; an overdue one of ours.
    ordinary = make_message(user.address, [user.address], "hello")
    long_ago = Token("0123456789abcdef", 1, 2)
    forged = make_message(user.address, [user.address], "forged")
    forged[TOKEN_HEADER] = make_token(secrets.token_bytes(32), long_ago, user.address)
    copied = make_message(user.address, [user.address], "copied")
    copied[TOKEN_HEADER] = make_token(key, long_ago, "someone@example.test")
    ours = make_message(user.address, [user.address], "overdue")
    ours[TOKEN_HEADER] = make_token(key, long_ago, user.address)
    for message in (ordinary, forged, copied, ours):
        mailpath.submit(user, message=message)
    await asyncio.get_running_loop().run_in_executor(None, mailpath.wait_pop3_count, user, 4)
    result = await _probe(mailpath, _module(mailpath, user), runtime)
    samples = _check(result, None)
    assert samples[("probe_mail_delivery_late_messages", ())] == 1  # only the overdue one
    left = mailpath.pop3_messages(user)
    subjects = sorted(
        str(email.message_from_bytes(raw, policy=email.policy.default)["Subject"]) for raw in left
    )
    assert subjects == ["copied", "forged", "hello"]


async def test_no_password_in_the_report_or_the_metrics(mailpath: MailPath) -> None:
    user = mailpath.new_user()
    for module in (
        _module(mailpath, user),
        _module(mailpath, user, smtp_password="wrong-smtp-pass-1"),
    ):
        result = await _probe(mailpath, module)
        body, _ = render_probe(result, module.tls, "")
        report = debug_report(result, module, body.decode())
        for secret in (user.password, "wrong-smtp-pass-1"):
            for channel in (report, body.decode(), result.failure_detail or "", repr(result)):
                assert secret not in channel
    assert mailpath.maildir_count(user) == 0


def test_a_delivery_module_needs_its_runtime(mailpath: MailPath) -> None:
    module = _module(mailpath, mailpath.new_user())
    with pytest.raises(ValueError, match="DeliveryRuntime"):
        asyncio.run(
            probe_pop3(
                ProbeTarget("localhost", 1, is_ip_literal=False),
                replace(module, timeout=1.0),
                1.0,
                resolver=RESOLVER,
            )
        )


async def test_a_key_file_is_made_once_and_kept(tmp_path: Path) -> None:
    from pop3_exporter.delivery import load_key

    path = tmp_path / "state" / "delivery.key"
    first = load_key(path, create=True)
    assert len(first) == 32 and oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_key(path, create=True) == first  # never overwritten
    assert load_key(path, create=False) == first


async def test_a_message_expunged_between_uidl_and_top_is_skipped() -> None:
    """Two probes of one mailbox: one deletes its message while the other has it in its
    UIDL listing; the other's TOP then gets -ERR, which is no failure of its own."""
    key = secrets.token_bytes(32)
    ours = make_token(key, Token("feedfacecafebeef", 1, 10**14), "loop@example.test")

    async def script(conn: FakeConnection) -> None:
        await conn.send_line("+OK ready")
        replies = {
            b"UIDL": "+OK\r\n1 uid-gone\r\n2 uid-ours\r\n.",
            b"TOP 1 0": "-ERR Message 1 expunged.",
            b"TOP 2 0": f"+OK\r\n{TOKEN_HEADER}: {ours}\r\n\r\n.",
        }
        for _ in range(10):
            line = (await conn.readline()).strip()
            if not line or line == b"QUIT":
                return
            await conn.send_line(replies.get(line, "-ERR unknown"))

    async with FakePop3Server(script) as server:
        conn = await Pop3Connection.connect("127.0.0.1", server.port)
        async with conn:
            await conn.read_line()
            seen: set[str] = set()
            found = await scan(conn, key, "loop@example.test", "feedfacecafebeef", seen, lambda: 0)
    assert (found.own, found.late) == (2, [])
    assert seen == set()  # the vanished one is not remembered as someone else's


@pytest.mark.parametrize("how", ["implicit TLS on the STARTTLS port", "untrusted certificate"])
async def test_smtp_tls_failures_are_smtp_tls_error(
    mailpath: MailPath, pki: TestPKI, how: str
) -> None:
    user = mailpath.new_user()
    module = _module(mailpath, user, smtp_tls=TLSMode.IMPLICIT)  # plaintext greeting there
    runtime = _runtime(mailpath)
    if how == "untrusted certificate":
        module = _module(mailpath, user)
        # A client context that trusts the system store only, not the test CA.
        runtime = replace(runtime, smtp_ssl_context=ssl.create_default_context())
    result = await _probe(mailpath, module, runtime)
    _check(result, R.SMTP_TLS_ERROR)
    assert result.failed_phase is Phase.SMTP_TLS
    assert Phase.SMTP_AUTH not in dict(result.phase_durations)  # no password was sent
    assert mailpath.maildir_count(user) == 0


async def test_no_smtp_or_pop3_password_in_any_output_of_a_real_exporter(
    mailpath: MailPath, tmp_path: Path
) -> None:
    """The exporter as a process at debug level, a delivery module with the SMTP password
    in its own file: probes (good, and with a wrong SMTP password), debug reports, the
    landing page and its history reports, /metrics, --config.check: no password."""
    user = mailpath.new_user()
    pop3_password = tmp_path / "pop3.password"
    pop3_password.write_text(user.password + "\n")
    smtp_good = tmp_path / "smtp.password"
    smtp_good.write_text(user.password + "\n")
    smtp_wrong = tmp_path / "smtp-wrong.password"
    smtp_wrong.write_text("wrong-smtp-secret-77\n")
    for path in (pop3_password, smtp_good, smtp_wrong):
        path.chmod(0o600)

    def module(name: str, smtp_password: Path) -> str:
        return f"""\
  {name}:
    tls: implicit
    tls_config: {{ca_file: '{mailpath.ca_file}', server_name: localhost}}
    auth: {{username: '{user.address}', password_file: '{pop3_password}'}}
    delivery:
      smtp:
        address: '127.0.0.1:{mailpath.submission_port}'
        tls_config: {{ca_file: '{mailpath.ca_file}', server_name: localhost}}
        auth: {{username: '{user.address}', password_file: '{smtp_password}'}}
      from: '{user.address}'
      to: '{user.address}'
      poll_interval: 200ms
"""

    config = tmp_path / "exporter.yml"
    config.write_text("modules:\n" + module("good", smtp_good) + module("wrong", smtp_wrong))
    state = ["--state.directory", str(tmp_path / "state")]
    collected: list[str] = []
    check = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "pop3_exporter", "--config.file", str(config), *state),
        "--config.check",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await check.communicate()
    assert check.returncode == 0, output
    collected.append(output.decode())
    exporter = ExporterProcess(
        tmp_path / "exporter.log", "--config.file", str(config), "--log.level", "debug", *state
    )
    with exporter:
        async with aiohttp.ClientSession() as session:

            async def get(path: str) -> str:
                async with session.get(exporter.url + path) as response:
                    assert response.status == 200, path
                    return await response.text()

            target = f"127.0.0.1:{mailpath.pop3s_port}"  # the path listens on IPv4 only
            for name, ok in (("good", True), ("wrong", False)):
                body = await get(f"/probe?target={target}&module={name}")
                assert ("probe_mail_delivery_success 1.0" in body) is ok, body
                collected += [body, await get(f"/probe?target={target}&module={name}&debug=true")]
            page = await get("/")
            collected.append(page)
            for link in re.findall(r'href="(/probe/history/[0-9]+)"', page):
                collected.append(await get(link))
            collected.append(await get("/metrics"))
    collected.append(exporter.log())
    assert "probe done" in collected[-1]
    everything = "\n".join(collected)
    assert "smtp_auth_failed" in everything  # the wrong password really was refused
    for secret in (user.password, "wrong-smtp-secret-77"):
        assert secret not in everything
    assert mailpath.maildir_count(user) == 0
