"""The real mail path (Postfix -> LMTP -> Dovecot -> POP3) checked on its own.

Only Python's smtplib and poplib talk to the servers here, never the exporter:
these tests show that the conditions the delivery probe's tests rely on are
real and behave as tests/support/mailpath.py says. Timings are printed (run
with ``-s`` to see them) and asserted only with wide margins: the machine is
shared.
"""

from __future__ import annotations

import poplib
import smtplib
import socket
import statistics
import time
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest

from tests.conftest import require_mailpath
from tests.support.certs import TestPKI
from tests.support.mailpath import (
    DOMAIN,
    MailPath,
    MailUser,
    child_pids,
    make_message,
    pid_alive,
)

# Generous bounds for a loaded 2-core machine; the typical values are printed.
DELIVERY_BOUND = 5.0
LATENCY_SAMPLES = 20


def report(name: str, seconds: float) -> None:
    print(f"mailpath timing: {name} = {seconds * 1000:.1f} ms")


@pytest.mark.mailpath
def test_submission_over_starttls_and_auth_arrives_over_pop3(mailpath: MailPath) -> None:
    user = mailpath.loop
    msg = make_message(user.address, [user.address], subject="round trip 1")
    queue_id = mailpath.submit(user, message=msg)
    waited = mailpath.wait_pop3_count(user, 1, timeout=DELIVERY_BOUND)
    report("first submission to visible", waited)

    assert mailpath.maildir_count(user) == 1
    [raw] = mailpath.pop3_messages(user)
    received = message_from_bytes(raw, policy=default_policy)
    assert received["Subject"] == "round trip 1"
    assert received["Message-ID"] is not None
    # Dovecot's LMTP wrote the Return-Path; Postfix's Received header names the queue ID.
    assert received["Return-Path"] == f"<{user.address}>"
    assert any(queue_id in str(h) for h in received.get_all("Received", []))
    # The log shows the path the message took: authenticated submission, LMTP to the gate.
    log = mailpath.wait_maillog(f"{queue_id}: removed")
    assert f"{queue_id}: client=unknown[127.0.0.1], sasl_method=PLAIN" in log
    assert f"{queue_id}: to=<{user.address}>, relay=mail.example.test[{mailpath.lmtp_gate}]" in log


@pytest.mark.mailpath
def test_submission_to_visible_latency(mailpath: MailPath, mail_user: MailUser) -> None:
    latencies = []
    for n in range(1, LATENCY_SAMPLES + 1):
        mailpath.submit(mail_user)
        latencies.append(mailpath.wait_pop3_count(mail_user, n, timeout=DELIVERY_BOUND))
    p50 = statistics.median(latencies)
    report(f"submission to visible p50 of {LATENCY_SAMPLES}", p50)
    report(f"submission to visible max of {LATENCY_SAMPLES}", max(latencies))
    assert mailpath.maildir_count(mail_user) == LATENCY_SAMPLES
    assert p50 < 1.0, latencies


@pytest.mark.mailpath
def test_held_message_is_invisible_until_released(mailpath: MailPath) -> None:
    user = mailpath.loop
    mailpath.submit(user, [user.with_extension("hold")])
    [queued] = mailpath.wait_queue(1, "hold")
    assert queued.recipients == (user.with_extension("hold"),)
    # Long enough for a normal delivery (about 10-50 ms) to have happened many times over.
    time.sleep(0.5)
    assert mailpath.pop3_count(user) == 0
    assert mailpath.maildir_count(user) == 0

    began = time.monotonic()
    mailpath.release()
    mailpath.wait_pop3_count(user, 1, timeout=DELIVERY_BOUND)
    report("release of a held message to visible", time.monotonic() - began)
    # Postfix removes its queue file just after Dovecot's LMTP reply.
    mailpath.wait_queue(0)


@pytest.mark.mailpath
def test_stopped_delivery_keeps_mail_queued_until_resumed(mailpath: MailPath) -> None:
    user = mailpath.loop
    with mailpath.delivery_stopped():
        mailpath.submit(user)
        mailpath.submit(user)
        queued = mailpath.wait_queue(2, "deferred")
        # The LMTP socket is gone: a real "delivery agent down" deferral.
        for message in queued:
            [reason] = message.delay_reasons
            assert "No such file or directory" in reason
        # postsuper -h ALL moves what is queued now to the hold queue.
        mailpath.hold_all()
        assert {m.queue_name for m in mailpath.queue()} == {"hold"}
        assert mailpath.pop3_count(user) == 0
        began = time.monotonic()
    mailpath.wait_pop3_count(user, 2, timeout=DELIVERY_BOUND)
    report("resume of stopped delivery to visible (2 messages)", time.monotonic() - began)
    mailpath.wait_queue(0)


@pytest.mark.mailpath
def test_unknown_and_outside_recipients_are_refused_at_rcpt(mailpath: MailPath) -> None:
    user = mailpath.loop
    with mailpath.smtp_client() as client:
        client.login(user.address, user.password)
        assert client.mail(user.address)[0] == 250
        code, reply = client.rcpt(f"nobody@{DOMAIN}")
        assert (code, reply[:5]) == (550, b"5.1.1")
        assert b"User unknown" in reply
        # Nothing is ever relayed, not even for an authenticated client.
        code, reply = client.rcpt("someone@elsewhere.invalid")
        assert code == 550
        assert b"leaving the test domain is disabled" in reply
        client.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail(user.address, [f"nobody@{DOMAIN}"], b"Subject: x\r\n\r\nx\r\n")
    assert mailpath.queue() == []


@pytest.mark.mailpath
def test_tempfail_recipient_gets_450_at_rcpt(mailpath: MailPath) -> None:
    user = mailpath.loop
    with mailpath.smtp_client() as client:
        client.login(user.address, user.password)
        assert client.mail(user.address)[0] == 250
        code, reply = client.rcpt(user.with_extension("tempfail"))
    assert (code, reply[:5]) == (450, b"4.2.0")
    assert mailpath.queue() == []


@pytest.mark.mailpath
def test_wrong_password_gets_535_without_slowing_later_logins(mailpath: MailPath) -> None:
    user = mailpath.loop
    with mailpath.smtp_client() as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(user.address, "wrong-password")
        assert failed.value.smtp_code == 535
        assert failed.value.smtp_error[:5] == b"5.7.8"
    # Dovecot's auth penalty is off: the next login from 127.0.0.1 is not delayed (2 s+).
    began = time.monotonic()
    with mailpath.smtp_client() as client:
        code, _ = client.login(user.address, user.password)
    elapsed = time.monotonic() - began
    report("login after a failed one", elapsed)
    assert code == 235
    assert elapsed < 1.5


@pytest.mark.mailpath
def test_submission_demands_starttls_then_auth(mailpath: MailPath) -> None:
    user = mailpath.loop
    with smtplib.SMTP("127.0.0.1", mailpath.submission_port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # smtpd_tls_auth_only
        assert client.mail(user.address)[0] == 530
    with mailpath.smtp_client() as client:
        assert client.has_extn("auth")
        assert client.mail(user.address)[0] == 250
        code, reply = client.rcpt(user.address)
        assert code == 554  # no AUTH, no submission
        assert b"Access denied" in reply


@pytest.mark.mailpath
def test_implicit_tls_and_plain_ports(mailpath: MailPath, mail_user: MailUser) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", mailpath.smtps_port, timeout=10, context=mailpath.ssl_context()
    ) as client:
        client.login(mail_user.address, mail_user.password)
        assert (
            client.sendmail(mail_user.address, [mail_user.address], b"Subject: a\r\n\r\na\r\n")
            == {}
        )
    # The port-25 style service: no TLS, AUTH allowed in clear, local mail without AUTH.
    with smtplib.SMTP("127.0.0.1", mailpath.smtp_port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert client.has_extn("auth")
        client.login(mail_user.address, mail_user.password)
        assert (
            client.sendmail(mail_user.address, [mail_user.address], b"Subject: b\r\n\r\nb\r\n")
            == {}
        )
    with smtplib.SMTP("127.0.0.1", mailpath.smtp_port, timeout=10) as client:
        assert (
            client.sendmail("x@elsewhere.invalid", [mail_user.address], b"Subject: c\r\n\r\nc\r\n")
            == {}
        )
        client.mail("x@elsewhere.invalid")
        assert client.rcpt("y@elsewhere.invalid")[0] == 554  # relay access denied
    mailpath.wait_pop3_count(mail_user, 3, timeout=DELIVERY_BOUND)
    with mailpath.pop3(mail_user, implicit_tls=True) as pop3s:
        assert pop3s.stat()[0] == 3


@pytest.mark.mailpath
def test_closed_port_refuses(mailpath: MailPath) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", mailpath.closed_port), timeout=5).close()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.1", mailpath.closed_port, timeout=5)


@pytest.mark.mailpath
def test_mailboxes_are_independent(mailpath: MailPath, mail_user: MailUser) -> None:
    loop, other = mailpath.loop, mailpath.other
    mailpath.submit(loop)
    mailpath.submit(loop, [other.address, mail_user.address])
    mailpath.submit(mail_user)
    mailpath.wait_pop3_count(loop, 1, timeout=DELIVERY_BOUND)
    mailpath.wait_pop3_count(other, 1, timeout=DELIVERY_BOUND)
    mailpath.wait_pop3_count(mail_user, 2, timeout=DELIVERY_BOUND)
    # Deleting in one mailbox leaves the others alone.
    with mailpath.pop3(other) as client:
        client.dele(1)
    assert mailpath.pop3_count(other) == 0
    assert mailpath.pop3_count(loop) == 1
    assert mailpath.pop3_count(mail_user) == 2
    # One user's password does not open another's mailbox.
    impostor = MailUser(other.address, loop.password, other.home)
    with pytest.raises(poplib.error_proto, match="Authentication failed"):
        mailpath.pop3_count(impostor)


@pytest.mark.mailpath
def test_reset_leaves_an_empty_working_path(mailpath: MailPath) -> None:
    loop = mailpath.loop
    mailpath.submit(loop)
    mailpath.wait_pop3_count(loop, 1, timeout=DELIVERY_BOUND)
    mailpath.stop_delivery()
    mailpath.submit(loop)
    mailpath.wait_queue(1, "deferred")
    mailpath.reset()
    assert mailpath.queue() == []
    assert mailpath.maildir_count(loop) == 0
    assert mailpath.pop3_count(loop) == 0
    mailpath.submit(loop)  # delivery works again
    mailpath.wait_pop3_count(loop, 1, timeout=DELIVERY_BOUND)


@pytest.mark.mailpath
def test_no_lookups_and_no_transport_leaving_the_machine(mailpath: MailPath) -> None:
    queue_id = mailpath.submit(mailpath.loop)
    mailpath.wait_pop3_count(mailpath.loop, 1, timeout=DELIVERY_BOUND)
    mailpath.wait_maillog(f"{queue_id}: removed")
    settings = mailpath.postfix_settings(
        "smtp_dns_support_level", "inet_interfaces", "relayhost", "default_transport"
    )
    assert settings["smtp_dns_support_level"] == "disabled"
    assert settings["inet_interfaces"] == "127.0.0.1"
    assert settings["relayhost"] == ""
    assert settings["default_transport"].startswith("error:")
    log = mailpath.maillog.read_text()
    # No SMTP client ran, no name was looked up, every delivery went to the LMTP gate.
    assert "postfix/smtp[" not in log
    for needle in ("Name service error", "Host not found", "dnsblog", "warning: hostname"):
        assert needle not in log
    relays = [line for line in log.splitlines() if " relay=" in line]
    assert relays
    assert all(f"[{mailpath.lmtp_gate}]" in line or "relay=none" in line for line in relays)


@pytest.mark.mailpath
def test_start_and_stop_leave_nothing_behind(pki: TestPKI, dovecot_workroot: Path) -> None:
    require_mailpath()
    path = MailPath(dovecot_workroot / "mailpath-lifecycle", pki.variants["good"], pki.ca_file)
    path.start()
    try:
        master = path.master_pid
        dovecot = path.dovecot.pid
        assert master is not None and dovecot is not None
        postfix_children = child_pids(master)
        assert postfix_children  # qmgr, pickup, postlogd at least
        ports = (path.submission_port, path.smtps_port, path.smtp_port, path.pop3_port)
        path.submit(path.loop)
        path.wait_pop3_count(path.loop, 1, timeout=DELIVERY_BOUND)
    finally:
        path.stop()
    assert path.start_seconds is not None and path.stop_seconds is not None
    report("whole path start", path.start_seconds)
    report("whole path stop", path.stop_seconds)
    assert not pid_alive(master)
    assert not pid_alive(dovecot)
    assert not [pid for pid in postfix_children if pid_alive(pid)]
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert path.stop_seconds < 10


def test_require_mailpath_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.conftest.missing_mailpath_parts", lambda: ["postfix"])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="postfix"):
        require_mailpath()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="postfix"):
        require_mailpath()
