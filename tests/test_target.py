"""Target forms and the probe deadline arithmetic."""

from __future__ import annotations

import pytest

from pop3_exporter.config import Module
from pop3_exporter.errors import TargetError
from pop3_exporter.http import BadRequest, probe_timeout
from pop3_exporter.target import ProbeTarget, TargetSpec, parse_target


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("pop.example.com", TargetSpec("pop.example.com", None, None, False)),
        ("pop.example.com.", TargetSpec("pop.example.com.", None, None, False)),
        ("pop.example.com:110", TargetSpec("pop.example.com", 110, None, False)),
        ("127.0.0.1", TargetSpec("127.0.0.1", None, None, True)),
        ("127.0.0.1:995", TargetSpec("127.0.0.1", 995, None, True)),
        ("[::1]:995", TargetSpec("::1", 995, None, True)),
        ("[2001:db8::5]", TargetSpec("2001:db8::5", None, None, True)),
        ("2001:db8::5", TargetSpec("2001:db8::5", None, None, True)),
        ("::1", TargetSpec("::1", None, None, True)),
        ("pop3://mail.example.org", TargetSpec("mail.example.org", None, "pop3", False)),
        ("pop3s://mail.example.org:1995", TargetSpec("mail.example.org", 1995, "pop3s", False)),
        ("POP3S://[::1]:995/", TargetSpec("::1", 995, "pop3s", True)),
        ("mail_1.example.org", TargetSpec("mail_1.example.org", None, None, False)),
    ],
)
def test_target_forms(raw: str, expected: TargetSpec) -> None:
    assert parse_target(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty"),
        ("host:0", "out of range"),
        ("host:65536", "out of range"),
        ("host:abc", "not a number"),
        ("host:", "not a number"),
        ("[::1", "without"),
        ("[::1]x", "unexpected text"),
        ("[example.com]:1", "not an IPv6 address"),
        ("1:2:3", "not an IPv6 address"),
        ("imap://host", "scheme"),
        ("pop3://user@host", "user information"),
        ("pop3://host/path", "path"),
        ("host name", "whitespace"),
        ("host\r\nX-Injected: 1", "whitespace or control"),
        ("hôst.example", "ASCII"),
        ("-bad-.example", "not a valid host name"),
        ("a" * 64 + ".example", "not a valid host name"),
        ("x" * 400, "longer than"),
        (":110", "no host"),
    ],
)
def test_bad_targets(raw: str, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        parse_target(raw)


def test_probe_target_formats_ipv6_with_brackets() -> None:
    assert str(ProbeTarget("::1", 995, True)) == "[::1]:995"
    assert str(ProbeTarget("pop.example.com", 110, False)) == "pop.example.com:110"


MODULE = Module(name="m", timeout=10.0)


@pytest.mark.parametrize(
    ("header", "offset", "expected"),
    [
        (None, 0.5, 10.0),  # no header: the module timeout
        ("5", 0.5, 4.5),  # scrape timeout minus offset
        ("30", 0.5, 10.0),  # module timeout is smaller
        ("10.5", 0.5, 10.0),
        ("0.4", 0.5, 0.4),  # offset would leave nothing: the scrape timeout itself
        ("2", 0.0, 2.0),
    ],
)
def test_probe_timeout(header: str | None, offset: float, expected: float) -> None:
    assert probe_timeout(MODULE, header, offset) == pytest.approx(expected)


@pytest.mark.parametrize("header", ["abc", "-1", "0", "nan", "inf"])
def test_probe_timeout_rejects_bad_header(header: str) -> None:
    with pytest.raises(BadRequest, match="X-Prometheus-Scrape-Timeout-Seconds"):
        probe_timeout(MODULE, header, 0.5)
