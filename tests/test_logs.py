"""Log lines: real fields that a logfmt parser (go-logfmt's strict rules) and a JSON
parser read back exactly, whatever the values hold."""

from __future__ import annotations

import enum
import json
import logging
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3_exporter.logs import JSONFormatter, LogfmtFormatter, fields, logfmt_value
from tests.support.logs import as_text, parse_logfmt_line

HOSTILE = [
    "",
    "plain",
    "two words",
    'say "hi"',
    "back\\slash",
    "C:\\tmp",
    'end\\"',
    "line\nbreak",
    "cr\rlf\r\n",
    "tab\there",
    "nul\x00byte",
    "escape \x1b[31mred\x1b[0m",
    "del\x7f",
    "c1 \x85 next line",
    "é, 日本語, emoji 😀",
    "line separator \u2028 and \u2029",
    "bidi \u202emoc.elpmaxe",
    "replacement \ufffd",
    "a=b",
    "=",
    "key=value other=x",
    " leading and trailing ",
    "null",
    '" forged=1 "',
    'msg=fake level=error x="',
]


def _record(msg: str, /, **values: object) -> logging.LogRecord:
    record = logging.LogRecord("pop3_exporter", logging.INFO, __file__, 1, msg, None, None)
    for key, value in fields(**values).items():
        setattr(record, key, value)
    return record


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_survive_logfmt_and_json(value: str) -> None:
    record = _record(value, target=value, module="pop3", empty="")
    line = LogfmtFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    assert all(character.isprintable() for character in line), repr(line)
    parsed = parse_logfmt_line(line)
    assert list(parsed) == ["ts", "level", "logger", "msg", "target", "module", "empty"]
    assert parsed["msg"] == value
    assert parsed["target"] == value
    assert (parsed["level"], parsed["logger"], parsed["module"]) == (
        "info",
        "pop3_exporter",
        "pop3",
    )
    assert parsed["empty"] == ""
    json_line = JSONFormatter().format(record)
    assert json_line.isascii() and "\n" not in json_line
    assert json.loads(json_line) == parsed


@given(
    msg=st.text(max_size=80),
    value=st.text(max_size=80),
    key=st.text(min_size=1, max_size=20),
)
def test_any_text_round_trips(msg: str, value: str, key: str) -> None:
    record = _record(msg, **{key: value})
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    parsed = parse_logfmt_line(line)
    assert parsed["msg"] == msg
    # Keys outside [A-Za-z0-9_.-] are made safe, never allowed to break the line.
    [extra] = [k for k in parsed if k not in ("ts", "level", "logger", "msg")]
    assert parsed[extra] == value
    assert json.loads(JSONFormatter().format(record)) == {**parsed, extra: value}


class Color(enum.StrEnum):
    RED = "red"


def test_types_of_values() -> None:
    record = _record(
        "typed",
        yes=True,
        no=False,
        count=3,
        seconds=0.25,
        infinite=float("inf"),
        missing=None,
        color=Color.RED,
        path=["a", "b"],
    )
    parsed = parse_logfmt_line(LogfmtFormatter().format(record))
    assert parsed["yes"] == "true" and parsed["no"] == "false"
    assert parsed["count"] == "3" and parsed["seconds"] == "0.25"
    assert parsed["infinite"] == "inf" and parsed["missing"] == ""
    assert parsed["color"] == "red" and parsed["path"] == "['a', 'b']"
    as_json = json.loads(JSONFormatter().format(record))
    # JSON keeps the types; as text, every value is what logfmt wrote.
    assert as_json["yes"] is True and as_json["count"] == 3 and as_json["seconds"] == 0.25
    assert as_json["missing"] is None and as_json["infinite"] == "inf"
    assert {key: as_text(value) for key, value in as_json.items()} == parsed


def test_fields_cannot_shadow_the_standard_ones() -> None:
    record = _record("real", msg="fake", level="error", ts="0", logger="x", exc="y")
    parsed = parse_logfmt_line(LogfmtFormatter().format(record))
    assert (parsed["msg"], parsed["level"], parsed["logger"]) == ("real", "info", "pop3_exporter")
    assert parsed["field_msg"] == "fake" and parsed["field_level"] == "error"
    assert parsed["field_exc"] == "y"


def test_exception_is_one_field() -> None:
    try:
        raise ValueError('bad "thing"\nsecond line')
    except ValueError:
        record = logging.LogRecord(
            "pop3_exporter", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    line = LogfmtFormatter().format(record)
    parsed = parse_logfmt_line(line)
    assert parsed["level"] == "error" and parsed["msg"] == "failed"
    assert parsed["exc"].startswith("Traceback (most recent call last):\n")
    assert parsed["exc"].endswith('ValueError: bad "thing"\nsecond line')
    assert json.loads(JSONFormatter().format(record))["exc"] == parsed["exc"]


def test_warn_level_name_and_timestamp() -> None:
    record = logging.LogRecord("pop3_exporter", logging.WARNING, __file__, 1, "w", None, None)
    record.created, record.msecs = 86400.5, 500.0
    parsed = parse_logfmt_line(LogfmtFormatter().format(record))
    assert parsed["level"] == "warn"
    assert parsed["ts"] == "1970-01-02T00:00:00.500Z"


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("plain", "plain"),
        ("", ""),
        ("a b", '"a b"'),
        ("C:\\tmp", "C:\\tmp"),  # a backslash alone needs no quotes (as in go-logfmt)
        ('a"b', '"a\\"b"'),
        ("a\nb", '"a\\nb"'),
        ("\x00", '"\\u0000"'),
        ("\x1b", '"\\u001b"'),
        ("\x7f", '"\\u007f"'),
        ("\u2028", '"\\u2028"'),
        ("😀", "😀"),
        ("null", '"null"'),
        (None, ""),
        (True, "true"),
        (1.5, "1.5"),
    ],
)
def test_logfmt_tokens(value: str | bool | float | None, token: str) -> None:
    assert logfmt_value(value) == token
