"""`pop3_exporter probe`: every exit code against real Dovecot servers, run as users run
it (a subprocess), and the verdict line parsed by the Monitoring Plugins rules."""

from __future__ import annotations

import math
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given, settings

from pop3_exporter import check
from pop3_exporter.check import (
    DAY_SECONDS,
    State,
    Thresholds,
    UnknownError,
    judge,
    number,
    render,
)
from pop3_exporter.cli import build_parser, main
from pop3_exporter.config import AuthConfig, Module, TLSMode, default_config
from pop3_exporter.credentials import Mechanism
from pop3_exporter.result import (
    CertFacts,
    DeliveryFacts,
    FailureReason,
    MailboxFacts,
    Phase,
    ProbeResult,
    TLSFacts,
)
from pop3_exporter.runtime import Runtime
from pop3_exporter.target import ProbeTarget
from tests.conftest import DovecotFactory
from tests.support.certs import TestPKI
from tests.support.dns import UNSIGNED_ZONE, Testbed
from tests.support.dovecot import DovecotServer
from tests.support.dovecot_auth import AuthDovecotServer, MailAccount, deliver_messages
from tests.support.mailpath import MailPath, MailUser
from tests.support.probe_results import probe_results

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60
# Dovecot's greeting, as tests/support/dovecot.py documents it.
GREETING = "+OK Dovecot (Debian) ready."
LEAF = "CN=localhost,O=pop3_exporter tests"
# What a certificate's days-to-expiry may differ by between the test's clock and the
# probe's: the subprocess takes about a second to start; a day is 86400 s.
DAYS_MARGIN = 0.01

# 'label'=value[UOM];[warn];[crit];[min];[max], from the Monitoring Plugins
# Development Guidelines; a range is [@][start:][end] with ~ for minus infinity.
_VALUE = r"-?[0-9]+(?:\.[0-9]+)?"
_RANGE = rf"@?(?:(?:{_VALUE}|~):)?(?:{_VALUE})?"
PERFDATUM = re.compile(
    rf"(?P<label>'[^'=]+'|[^'= ]+)=(?P<value>{_VALUE})(?P<unit>s|ms|us|%|B|KB|MB|TB|c)?"
    rf"(?:;(?P<warn>{_RANGE})(?:;(?P<crit>{_RANGE})(?:;(?P<min>{_VALUE})?"
    rf"(?:;(?P<max>{_VALUE})?)?)?)?)?"
)
FIRST_LINE = re.compile(r"POP3 (?P<state>OK|WARNING|CRITICAL|UNKNOWN) - (?P<summary>[^|]*?)")


@dataclass(frozen=True)
class Perf:
    value: float
    unit: str
    warn: str
    crit: str
    minimum: str
    maximum: str


@dataclass(frozen=True)
class Output:
    """One run of the check, its output taken apart."""

    code: int
    state: str
    summary: str
    perfdata: Mapping[str, Perf]
    long_output: tuple[str, ...]
    stdout: str
    stderr: str


def parse_perfdata(text: str) -> dict[str, Perf]:
    items: dict[str, Perf] = {}
    for token in text.split():
        match = PERFDATUM.fullmatch(token)
        assert match is not None, f"not perfdata by the guidelines: {token!r}"
        items[match["label"].strip("'")] = Perf(
            float(match["value"]),
            match["unit"] or "",
            match["warn"] or "",
            match["crit"] or "",
            match["min"] or "",
            match["max"] or "",
        )
    return items


def parse_output(completed: subprocess.CompletedProcess[str]) -> Output:
    first, *rest = completed.stdout.splitlines()
    head, separator, perf_text = first.partition(" | ")
    match = FIRST_LINE.fullmatch(head)
    assert match is not None, completed.stdout
    # Only the first line has perfdata: a "|" anywhere else would start more of it.
    assert "|" not in perf_text and not any("|" in line for line in rest), completed.stdout
    assert separator or "|" not in head
    output = Output(
        code=completed.returncode,
        state=match["state"],
        summary=match["summary"],
        perfdata=parse_perfdata(perf_text),
        long_output=tuple(rest),
        stdout=completed.stdout,
        stderr=completed.stderr,
    )
    # The exit code is the state, always; nothing goes to stderr (Icinga 2 would mix it in).
    assert State[output.state] == output.code, completed.stdout
    assert output.stderr == "", output.stderr
    return output


def probe(*args: str) -> Output:
    completed = subprocess.run(
        [sys.executable, "-m", "pop3_exporter", "probe", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return parse_output(completed)


def probe_all(runs: Sequence[Sequence[str]]) -> list[Output]:
    """Several independent checks at once: each is a second of interpreter start-up."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: probe(*args), runs))


def days_left(not_after: datetime) -> float:
    return (not_after.timestamp() - time.time()) / DAY_SECONDS


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released, so it was free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Path:
    """Modules that trust the test CA, and one whose expected greeting has a "|"."""
    path = tmp_path_factory.mktemp("check") / "pop3_exporter.yml"
    path.write_text(
        "modules:\n"
        "  pop3s_test:\n"
        "    tls: implicit\n"
        f"    tls_config: {{ca_file: '{pki.ca_file}'}}\n"
        "  starttls_test:\n"
        "    tls: starttls\n"
        f"    tls_config: {{ca_file: '{pki.ca_file}'}}\n"
        "  picky:\n"
        "    expect_greeting: '^\\+OK (Cyrus|Courier)'\n"
        "  by_name:\n"
        "    tls: implicit\n"
        f"    tls_config: {{ca_file: '{pki.ca_file}', server_name: localhost}}\n"
    )
    return path


def pop3s(server: DovecotServer) -> str:
    return f"127.0.0.1:{server.pop3s_port}"


# ---------------------------------------------------------------- OK


@pytest.mark.dovecot
def test_ok_with_tls_names_the_facts_and_gives_perfdata(
    dovecot: DovecotServer, config: Path, pki: TestPKI
) -> None:
    out = probe(pop3s(dovecot), "--module", "pop3s_test", "--config.file", str(config))
    assert out.code == 0
    assert re.fullmatch(
        rf"{pop3s(dovecot)} \(pop3s_test\): greeting after [0-9.]+s, TLS 1\.[23],"
        r" earliest certificate expires in [0-9.]+ days",
        out.summary,
    ), out.summary
    assert list(out.perfdata) == ["time", "greeting", "cert_expiry_days"]
    time_, greeting, cert = (out.perfdata[k] for k in ("time", "greeting", "cert_expiry_days"))
    assert (time_.unit, time_.minimum, time_.maximum) == ("s", "0", "10")
    assert 0 < greeting.value <= time_.value < 10
    assert (greeting.unit, greeting.warn, greeting.crit, greeting.minimum) == ("s", "", "", "0")
    # The guidelines' range "21:" alerts below 21; days carry no unit (there is none).
    assert (cert.unit, cert.warn, cert.crit) == ("", "21:", "7:")
    assert cert.value == pytest.approx(
        days_left(pki.variants["good"].earliest_not_after), abs=DAYS_MARGIN
    )
    assert out.long_output == ()


@pytest.mark.dovecot
def test_ok_in_plain_text_and_with_stls(dovecot: DovecotServer, config: Path) -> None:
    plain, stls = probe_all(
        [
            [f"127.0.0.1:{dovecot.pop3_port}", "--module", "pop3"],
            # A pop3:// URL may name a module that upgrades with STLS.
            [f"pop3://127.0.0.1:{dovecot.pop3_port}", "--module", "starttls_test",
             "--config.file", str(config)],
        ]
    )  # fmt: skip
    assert plain.code == 0
    assert plain.summary.startswith(f"127.0.0.1:{dovecot.pop3_port} (pop3): greeting after ")
    assert list(plain.perfdata) == ["time", "greeting"]
    assert stls.code == 0, stls.stdout
    assert "(starttls_test)" in stls.summary and "TLS 1." in stls.summary
    assert "cert_expiry_days" in stls.perfdata


@pytest.mark.dovecot
def test_verbose_prints_the_transcript_after_the_verdict(
    dovecot: DovecotServer, config: Path
) -> None:
    base = [pop3s(dovecot), "--module", "pop3s_test", "--config.file", str(config)]
    verbose, more = probe_all([[*base, "-v"], [*base, "-vv"]])
    assert verbose.code == more.code == 0
    lines = verbose.long_output
    assert lines[0] == ""
    assert lines[1].startswith(f"Probe of {pop3s(dovecot)} with module pop3s_test started ")
    assert re.search(rf"^ +[0-9.]+ S: {re.escape(GREETING)}$", "\n".join(lines), re.M)
    assert any(re.fullmatch(r" +[0-9.]+ C: CAPA", line) for line in lines)
    assert "  verified: yes" in lines
    assert lines[-1] == "# tls_config.server_name unset: the target's host name is verified"
    # The metrics are for -vv only: a monitoring system's long output is no place for 150.
    assert not any(line.startswith("probe_success") for line in lines)
    assert "Metrics that would have been returned:" in more.long_output
    assert "probe_success 1.0" in more.long_output


# ---------------------------------------------------------------- WARNING and CRITICAL


@pytest.mark.dovecot
def test_certificate_expiry_against_the_default_thresholds(
    dovecot_variant: DovecotFactory, config: Path, pki: TestPKI
) -> None:
    variants = ("expires_in_10_days", "expires_in_3_days", "intermediate_expires_first")
    runs = [
        [pop3s(dovecot_variant(name)), "--module", "pop3s_test", "--config.file", str(config)]
        for name in variants
    ]
    warning, critical, intermediate = probe_all(runs)

    # The session's PKI may be minutes old by now: 9.998 days are as right as 10.
    assert warning.code == 1
    match = re.match(
        rf"127\.0\.0\.1:[0-9]+ \(pop3s_test\): certificate '{LEAF}' expires in ([0-9.]+)"
        r" days \(\d{4}-\d\d-\d\d [0-9:]+Z\), warning below 21 days; greeting after ",
        warning.summary,
    )
    assert match is not None, warning.summary
    assert float(match[1]) == pytest.approx(
        days_left(pki.variants[variants[0]].leaf_not_after), abs=DAYS_MARGIN
    )
    assert critical.code == 2
    match = re.search(rf"certificate '{LEAF}' expires in ([0-9.]+) days \(", critical.summary)
    assert match is not None, critical.summary
    assert 2.9 < float(match[1]) <= 3
    assert "critical below 7 days" in critical.summary
    # A certificate of the presented chain, not only the leaf: the intermediate ends first.
    assert intermediate.code == 2
    assert "certificate 'CN=pop3_exporter test short-lived intermediate CA," in (
        intermediate.summary
    )
    for out, name in zip((warning, critical, intermediate), variants, strict=True):
        expected = days_left(pki.variants[name].earliest_not_after)
        assert out.perfdata["cert_expiry_days"].value == pytest.approx(expected, abs=DAYS_MARGIN)


@pytest.mark.dovecot
def test_certificate_thresholds_from_flags(dovecot: DovecotServer, config: Path) -> None:
    base = [pop3s(dovecot), "--module", "pop3s_test", "--config.file", str(config)]
    # The good certificate has 90 days left.
    ok, warning, critical = probe_all(
        [
            [*base, "--cert.warning", "80d", "--cert.critical", "2w"],
            [*base, "--cert.warning", "100d"],
            [*base, "--cert.warning", "100d", "--cert.critical", "2160h1m"],
        ]
    )
    assert ok.code == 0, ok.stdout
    assert (ok.perfdata["cert_expiry_days"].warn, ok.perfdata["cert_expiry_days"].crit) == (
        "80:",
        "14:",
    )
    assert warning.code == 1 and "warning below 100 days" in warning.summary
    assert critical.code == 2 and "critical below 90.001 days" in critical.summary
    assert critical.perfdata["cert_expiry_days"].crit == "90.001:"


@pytest.mark.dovecot
def test_greeting_thresholds(dovecot: DovecotServer) -> None:
    target = f"127.0.0.1:{dovecot.pop3_port}"
    # Any greeting takes longer than 0 s; none of Dovecot's takes 60 s.
    ok, warning, critical = probe_all(
        [
            [target, "--module", "pop3", "--greeting.warning", "30s", "--greeting.critical", "1m"],
            [target, "--module", "pop3", "--greeting.warning", "0", "--greeting.critical", "1m"],
            [target, "--module", "pop3", "--greeting.warning", "0", "--greeting.critical", "0s"],
        ]
    )
    assert ok.code == 0
    assert (ok.perfdata["greeting"].warn, ok.perfdata["greeting"].crit) == ("30", "60")
    assert warning.code == 1
    assert re.search(r"greeting took [0-9.]+s \(warning above 0s\)", warning.summary)
    assert critical.code == 2
    assert re.search(r"greeting took [0-9.]+s \(critical above 0s\)", critical.summary)


@pytest.mark.dovecot
def test_failed_probes_are_critical_and_name_reason_and_detail(
    dovecot_variant: DovecotFactory, config: Path
) -> None:
    expired = dovecot_variant("expired")
    good = dovecot_variant("good")
    port = closed_port()
    runs = [
        [pop3s(expired), "--module", "pop3s_test", "--config.file", str(config)],
        [f"127.0.0.1:{port}", "--module", "pop3"],
        # pop3s:// implies the built-in pop3s module: the system trust store, not ours.
        [f"pop3s://{pop3s(good)}"],
        [f"127.0.0.1:{good.pop3_port}", "--module", "picky", "--config.file", str(config)],
    ]
    cert_expired, refused, untrusted, mismatch = probe_all(runs)

    assert cert_expired.code == 2
    assert cert_expired.summary.startswith(
        f"{pop3s(expired)} (pop3s_test): tls_cert_expired in phase tls: "
    )
    assert "expired" in cert_expired.summary.split("in phase tls: ")[1]
    # The presented chain is still reported: the certificate expired 2 days ago.
    assert cert_expired.perfdata["cert_expiry_days"].value == pytest.approx(-2, abs=DAYS_MARGIN)

    assert refused.code == 2
    assert refused.summary == (
        f"127.0.0.1:{port} (pop3): connect_refused in phase connect:"
        f" connection refused by 127.0.0.1 port {port}"
    )
    assert list(refused.perfdata) == ["time"]

    assert untrusted.code == 2
    assert untrusted.summary.startswith(f"{pop3s(good)} (pop3s): tls_cert_untrusted in phase tls")

    # The regex in the detail has a "|": escaped, so that it cannot start perfdata.
    assert mismatch.code == 2
    assert mismatch.summary.endswith(
        "greeting_mismatch in phase greeting: greeting does not match"
        " '^\\\\+OK (Cyrus\\x7cCourier)'"
    ), mismatch.summary
    assert "greeting" in mismatch.perfdata


# ---------------------------------------------------------------- login


def _login_config(directory: Path, pki: TestPKI, account: MailAccount, password: str) -> Path:
    directory.mkdir()
    password_file = directory / "password"
    password_file.write_text(f"{password}\n")
    password_file.chmod(0o600)
    path = directory / "login.yml"
    path.write_text(
        "modules:\n"
        "  login:\n"
        "    tls: implicit\n"
        f"    tls_config: {{ca_file: '{pki.ca_file}'}}\n"
        "    expect_greeting: '^\\+OK (Dovecot|Cyrus)'\n"
        f"    auth: {{mechanism: user, username: {account.name},"
        f" password_file: '{password_file}'}}\n"
    )
    return path


@pytest.mark.dovecot
def test_login_reports_the_mailbox_and_never_prints_the_password(
    dovecot_auth: AuthDovecotServer,
    mail_account: MailAccount,
    pki: TestPKI,
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC)
    deliver_messages(mail_account.maildir, [now - timedelta(hours=2), now - timedelta(hours=1)])
    good = _login_config(tmp_path / "good", pki, mail_account, mail_account.password)
    wrong = _login_config(tmp_path / "wrong", pki, mail_account, "Wrong-" + mail_account.password)
    target = f"127.0.0.1:{dovecot_auth.pop3s_port}"
    ok, failed = probe_all(
        [
            [target, "--module", "login", "--config.file", str(good), "-v"],
            [target, "--module", "login", "--config.file", str(wrong), "-v"],
        ]
    )
    assert ok.code == 0, ok.stdout
    assert ", logged in, 2 messages (" in ok.summary
    messages, size = ok.perfdata["messages"], ok.perfdata["mailbox_size"]
    assert (messages.value, messages.minimum) == (2, "0")
    assert size.unit == "B" and size.value > 0
    transcript = "\n".join(ok.long_output)
    assert re.search(rf"C: USER {mail_account.name}$", transcript, re.M)
    assert re.search(r"C: PASS \*{8}$", transcript, re.M)
    # The module's regex has a "|", in the -v report's module section: escaped too.
    assert "expect_greeting: ^\\+OK (Dovecot\\x7cCyrus)" in transcript

    assert failed.code == 2
    assert "(login): auth_failed in phase login: " in failed.summary
    for out in (ok, failed):
        assert mail_account.password not in out.stdout + out.stderr


@pytest.mark.mailpath
def test_a_delivery_module_reports_the_round_trip(
    mailpath: MailPath, mail_user: MailUser, tmp_path: Path
) -> None:
    """SMTP submission to Postfix, LMTP to Dovecot, POP3 until the message is there."""
    password_file = tmp_path / "password"
    password_file.write_text(f"{mail_user.password}\n")
    password_file.chmod(0o600)
    login = f"username: {mail_user.address}, password_file: '{password_file}'"
    config = tmp_path / "delivery.yml"
    config.write_text(
        "modules:\n"
        "  delivery:\n"
        "    tls: implicit\n"
        "    timeout: 20s\n"
        f"    tls_config: {{ca_file: '{mailpath.ca_file}'}}\n"
        f"    auth: {{mechanism: user, {login}}}\n"
        "    delivery:\n"
        "      smtp:\n"
        f"        address: 127.0.0.1:{mailpath.submission_port}\n"
        "        tls: starttls\n"
        f"        tls_config: {{ca_file: '{mailpath.ca_file}'}}\n"
        f"        auth: {{{login}}}\n"
        f"      from: {mail_user.address}\n"
        f"      to: {mail_user.address}\n"
        "      poll_interval: 200ms\n"
    )
    target = f"127.0.0.1:{mailpath.pop3s_port}"
    out = probe(target, "--module", "delivery", "--config.file", str(config),
                "--state.directory", str(tmp_path), "-v")  # fmt: skip
    assert out.code == 0, out.stdout
    match = re.search(r", delivered in ([0-9.]+)s$", out.summary)
    assert match is not None, out.summary
    delivery = out.perfdata["delivery"]
    assert (delivery.unit, delivery.minimum) == ("s", "0")
    assert delivery.value == pytest.approx(float(match[1]), abs=0.001)
    assert 0 < delivery.value < out.perfdata["time"].value
    assert mail_user.password not in out.stdout
    # The key the check made marks its messages, as the exporter's would.
    assert (tmp_path / "delivery.key").stat().st_mode & 0o777 == 0o600
    assert MailPath.maildir_count(mail_user) == 0


# ---------------------------------------------------------------- names and the policy


@pytest.mark.dovecot
def test_a_name_is_resolved_with_dns_server_and_checked_by_the_policy(
    dns_testbed: Testbed, dovecot: DovecotServer, config: Path, tmp_path: Path
) -> None:
    name = f"check-cmd.{UNSIGNED_ZONE}".rstrip(".")
    dns_testbed.add_records(UNSIGNED_ZONE, ["check-cmd IN A 127.0.0.1"])
    denying = tmp_path / "deny-loopback.yml"
    denying.write_text(config.read_text() + "policy:\n  deny:\n    - cidr: 127.0.0.0/8\n")
    dns = ["--dns.server", dns_testbed.unbound_flag]
    target = f"{name}:{dovecot.pop3s_port}"
    ok, refused = probe_all(
        [
            [target, "--module", "by_name", "--config.file", str(config), *dns],
            # Allowed by name, refused once the name resolved to a loopback address.
            [target, "--module", "by_name", "--config.file", str(denying), *dns],
        ]
    )
    assert ok.code == 0, ok.stdout
    assert ok.summary.startswith(f"{target} (by_name): greeting after ")
    assert refused.code == 3
    assert refused.summary.startswith(f"{target}: target refused by policy: ")
    assert "policy.deny[0]" in refused.summary


# ---------------------------------------------------------------- UNKNOWN


def run_in_process(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> Output:
    """main() in this process: for the many argument cases, where a second of
    interpreter start-up each would add up; the subprocess tests show the wiring."""
    try:
        code: object = main(["probe", *args])
    except SystemExit as exc:
        code = exc.code
    assert isinstance(code, int)
    captured = capsys.readouterr()
    return parse_output(subprocess.CompletedProcess(args, code, captured.out, captured.err))


def test_unknown_for_bad_arguments_modules_and_targets(capsys: pytest.CaptureFixture[str]) -> None:
    cases: dict[str, tuple[list[str], str]] = {
        "no target": ([], "pop3_exporter probe: the following arguments are required: TARGET"),
        "unknown flag": (
            ["127.0.0.1", "--module", "pop3", "--web.listen-address", ":1"],
            "pop3_exporter probe: unrecognized arguments: --web.listen-address :1",
        ),
        "cert threshold without unit": (
            ["127.0.0.1", "--module", "pop3", "--cert.warning", "21"],
            "pop3_exporter probe: argument --cert.warning: '21' needs a unit, e.g. 21d (days)",
        ),
        "not a duration": (
            ["127.0.0.1", "--module", "pop3", "--timeout", "soon"],
            "pop3_exporter probe: argument --timeout: not a duration: 'soon'"
            " (use e.g. 10s, 1m30s, 500ms)",
        ),
        "dns server by name": (
            ["127.0.0.1", "--module", "pop3", "--dns.server", "ns.example.com"],
            "pop3_exporter probe: argument --dns.server: 'ns.example.com' is not ADDRESS:PORT"
            " with an IP address and a port 1-65535",
        ),
        "thresholds the wrong way round": (
            ["127.0.0.1", "--module", "pop3", "--cert.critical", "30d"],
            "--cert.critical (30 days) is longer than --cert.warning (21 days)",
        ),
        "greeting thresholds the wrong way round": (
            ["127.0.0.1", "--module", "pop3", "--greeting.warning", "5s",
             "--greeting.critical", "2s"],
            "--greeting.warning (5s) is longer than --greeting.critical (2s)",
        ),
        "zero timeout": (["127.0.0.1", "--module", "pop3", "--timeout", "0s"],
                         "--timeout must be above zero"),
        "no module": (
            ["127.0.0.1"],
            "--module is required unless TARGET is a pop3:// or pop3s:// URL;"
            " known modules: pop3, pop3_starttls, pop3s",
        ),
        "unknown module": (
            ["127.0.0.1", "--module", "imap"],
            "unknown module 'imap'; known modules: pop3, pop3_starttls, pop3s",
        ),
        "scheme and module disagree": (
            ["pop3s://127.0.0.1", "--module", "pop3"],
            "pop3s:// target needs a module with tls: implicit, not pop3",
        ),
        "bad target": (
            ["127.0.0.1:99999", "--module", "pop3"],
            "bad target: port 99999 is out of range 1-65535",
        ),
    }  # fmt: skip
    for case, (args, message) in cases.items():
        out = run_in_process(args, capsys)
        assert out.code == 3, case
        assert out.summary == message, case
        assert out.perfdata == {}, case


def test_bad_arguments_in_a_real_process() -> None:
    """What argparse does on its own (exit 2, stderr) is replaced in the real process too."""
    missing = probe()
    assert (missing.code, missing.summary) == (
        3,
        "pop3_exporter probe: the following arguments are required: TARGET",
    )
    assert missing.long_output[0].startswith("usage: pop3_exporter probe [-h] [--module MODULE]")
    completed = subprocess.run(
        [sys.executable, "-m", "pop3_exporter", "--config.file", "x.yml", "probe", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    out = parse_output(completed)
    assert (out.code, out.summary) == (3, "put probe first: pop3_exporter probe TARGET [FLAGS]")


def test_unknown_for_configurations_that_do_not_load(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yml"
    broken = tmp_path / "broken.yml"
    broken.write_text("modules:\n  a:\n    timeout: 5\n    retries: 3\n")
    unreadable_password = tmp_path / "password.yml"
    unreadable_password.write_text(
        "modules:\n  login:\n    tls: implicit\n"
        f"    auth: {{username: u, password_file: '{tmp_path / 'gone'}'}}\n"
    )
    refusing = tmp_path / "refusing.yml"
    refusing.write_text("policy: {default: deny}\n")
    outputs = probe_all(
        [
            ["127.0.0.1", "--module", "pop3", "--config.file", str(path)]
            for path in (missing, broken, unreadable_password, refusing)
        ]
    )
    assert all(out.code == 3 for out in outputs), [out.stdout for out in outputs]
    missing_out, broken_out, password_out, refused_out = outputs
    assert missing_out.summary == (
        f"invalid configuration: {missing}: cannot read: [Errno 2] No such file or directory:"
        f" '{missing}'"
    )
    # Every problem: the first on the verdict line, the others as long output.
    assert broken_out.summary == (
        f"invalid configuration (2 problems): {broken}:3: modules.a.timeout: not a duration:"
        " '5' (use e.g. 10s, 1m30s, 500ms)"
    )
    assert broken_out.long_output[0].startswith(f"{broken}:4: modules.a.retries: unknown key")
    assert password_out.summary.startswith(
        f"invalid configuration: {unreadable_password}:4: modules.login.auth.password_file:"
        f" cannot read {tmp_path / 'gone'}"
    )
    assert refused_out.summary == (
        "127.0.0.1:110: target refused by policy: target 127.0.0.1 port 110 matches no"
        " allow rule (policy default: deny)"
    )


async def test_a_token_file_gone_by_probe_time_is_unknown(tmp_path: Path) -> None:
    """The token is read again at every probe; the configuration load has read it once
    already, so a file gone in between is the only way to get here."""
    gone = tmp_path / "token"
    module = Module(
        name="oauth",
        tls=TLSMode.IMPLICIT,
        auth=AuthConfig(username="u", mechanism=Mechanism.XOAUTH2, token_file=str(gone)),
    )
    runtime = Runtime(
        config=replace(default_config(), modules=MappingProxyType({"oauth": module})),
        ssl_contexts=MappingProxyType({}),
    )
    port = closed_port()
    args = build_parser().parse_args(["probe", f"127.0.0.1:{port}", "--module", "oauth"])
    target = ProbeTarget("127.0.0.1", port, is_ip_literal=True)
    # Not connect_refused: the secret is read before anything is sent.
    with pytest.raises(UnknownError) as raised:
        await check._probe(args, runtime, target, module)
    assert str(raised.value) == (
        f"module oauth: cannot read credentials: cannot read {gone}: No such file or directory"
    )


# ---------------------------------------------------------------- the server stays as it was


def test_without_a_command_the_exporter_serves_and_help_lists_probe() -> None:
    args = build_parser().parse_args(["--config.file", "x.yml", "--web.listen-address", ":1"])
    assert (args.command, args.config_file, args.listen_address) == (None, "x.yml", ":1")
    completed = subprocess.run(
        [sys.executable, "-m", "pop3_exporter", "--help"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0
    assert "pop3_exporter probe TARGET [FLAGS]" in completed.stdout
    assert re.search(r"^ +probe +run one probe", completed.stdout, re.M)


def probe_flags() -> list[str]:
    parser = build_parser()
    [commands] = [a for a in parser._actions if a.dest == "command"]
    assert isinstance(commands.choices, dict)
    return [
        option
        for action in commands.choices["probe"]._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]


def test_every_probe_flag_is_documented() -> None:
    """tests/test_docs.py checks the server's flags; these are the subcommand's."""
    flags = probe_flags()
    assert len(flags) >= 9
    for doc in ("docs/check.md", "docs/configuration.md"):
        text = (REPO / doc).read_text(encoding="utf-8")
        assert [flag for flag in flags if f"`{flag}" not in text] == [], doc


# ---------------------------------------------------------------- the verdict, pure


NOW = 1_750_000_000.0


def _cert(subject: str, days: float) -> CertFacts:
    return CertFacts(
        subject=subject,
        issuer="CN=ca",
        serial_number="1",
        fingerprint_sha256="00" * 32,
        subject_alternative_names=(),
        not_before=NOW - DAY_SECONDS,
        not_after=NOW + days * DAY_SECONDS,
        key_algorithm="ec",
        key_bits=256,
        signature_algorithm="ecdsa-with-SHA256",
    )


def _result(**changes: object) -> ProbeResult:
    result = ProbeResult(
        target="pop.example.com:995",
        module_name="m",
        timeout_seconds=10.0,
        duration_seconds=0.25,
        success=True,
        failure_reason=None,
        failure_detail=None,
        failed_phase=None,
        phase_durations=(),
        dns_lookup_seconds=0.01,
        ip_protocol=4,
        address="127.0.0.1",
        greeting="+OK",
        greeting_seconds=0.00001,
        greeting_match=True,
        capabilities=None,
        plaintext_auth_exposed=None,
        tls=None,
    )
    return replace(result, **changes)  # type: ignore[arg-type]


def test_judge_delivery_and_mailbox_perfdata() -> None:
    result = _result(
        login_success=True,
        mailbox=MailboxFacts(messages=0, size_bytes=0),
        delivery=DeliveryFacts(success=True, seconds=1.5, late_messages=0, cleanup_failures=0),
    )
    verdict = judge(result, Thresholds(), NOW)
    assert verdict.state is State.OK
    assert verdict.summary == (
        "pop.example.com:995 (m): greeting after 0s, logged in, 0 messages (0 octets),"
        " delivered in 1.5s"
    )
    # No exponent: 0.00001 is written out.
    assert [str(item) for item in verdict.perfdata] == [
        "time=0.25s;;;0;10",
        "greeting=0.00001s;;;0",
        "messages=0;;;0",
        "mailbox_size=0B;;;0",
        "delivery=1.5s;;;0",
    ]


def test_judge_an_expired_certificate_that_was_not_verified() -> None:
    tls = TLSFacts(False, False, None, "TLS 1.3", "x", (_cert("CN=leaf", -1.5),), ())
    verdict = judge(_result(tls=tls), Thresholds(), NOW)
    assert verdict.state is State.CRITICAL
    assert verdict.summary.startswith(
        "pop.example.com:995 (m): certificate 'CN=leaf' expired 1.5 days ago"
        " (2025-06-14 03:06:40Z), critical below 7 days; greeting after 0s, TLS 1.3,"
        " certificate not verified (insecure_skip_verify)"
    )
    assert str(verdict.perfdata[-1]) == "cert_expiry_days=-1.5;21:;7:"


def test_judge_a_failure_with_server_text_keeps_one_line_and_no_perfdata_in_it() -> None:
    result = _result(
        success=False,
        failure_reason=FailureReason.GREETING_ERROR,
        failure_detail="greeting is not +OK: '-ERR a|b=1;2\r\nPOP3 OK'",
        failed_phase=Phase.GREETING,
    )
    text = render(judge(result, Thresholds(), NOW))
    assert text == (
        "POP3 CRITICAL - pop.example.com:995 (m): greeting_error in phase greeting:"
        " greeting is not +OK: '-ERR a\\x7cb=1;2\\x0d\\x0aPOP3 OK'"
        " | time=0.25s;;;0;10 greeting=0.00001s;;;0\n"
    )


@settings(max_examples=100, deadline=None)
@given(probe_results)
def test_any_result_gives_one_verdict_line_with_valid_perfdata(result: ProbeResult) -> None:
    verdict = judge(result, Thresholds(greeting_warning=1.0, greeting_critical=2.0), NOW)
    assert verdict.state is State.CRITICAL if not result.success else verdict.state <= 2
    first, *rest = render(verdict, ["a|b", "x\ny"]).splitlines()
    assert rest == ["a\\x7cb", "x\\x0ay"]
    head, _, perf = first.partition(" | ")
    assert FIRST_LINE.fullmatch(head) and "|" not in perf
    for item in parse_perfdata(perf).values():
        assert math.isfinite(item.value)


def test_number_is_fixed_point() -> None:
    assert [number(v) for v in (0.0, -0.0, 1e-7, 1e-5, 2.5, 10.0, 1e10)] == [
        "0", "0", "0", "0.00001", "2.5", "10", "10000000000",
    ]  # fmt: skip
