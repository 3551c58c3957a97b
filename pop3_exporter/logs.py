"""Log lines that log shippers can parse: logfmt as Prometheus exporters write it, or JSON.

Every line has the fields ``ts level logger msg``, then the call site's own fields, then
``exc`` for a traceback. Call sites pass their fields structurally and keep the message
a constant text, so that Loki, Vector or jq see ``target`` as a field, not as words
inside ``msg``::

    logger.debug("probe done", extra=fields(target=target, module=module.name))

logfmt follows go-logfmt (what Prometheus exporters emit): a value is quoted only when
it has to be, and inside quotes every control or other non-printable character is
escaped, so one record is always one line and no value can forge another field.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator, Mapping

# The LogRecord attribute that carries the fields (one attribute, so that field names
# such as "module" or "name" cannot clash with LogRecord's own attributes).
FIELDS_ATTRIBUTE = "structured_fields"
_STANDARD_KEYS = ("ts", "level", "logger", "msg")
_EXCEPTION_KEY = "exc"
_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
LOG_LEVELS = tuple(_LEVELS)
LOG_FORMATS = ("logfmt", "json")

Plain = str | int | float | bool | None


def fields(**values: object) -> dict[str, object]:
    """The ``extra`` argument of a logging call that carries these fields."""
    return {FIELDS_ATTRIBUTE: values}


def _plain(value: object) -> Plain:
    """A field value as a JSON scalar: enums by value, non-finite floats and anything
    else as text."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _key(name: str) -> str:
    # Keys are identifiers by convention; anything else would break the line's syntax.
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "_"
    # A call-site field must not shadow ts, level, logger, msg or exc.
    return f"field_{cleaned}" if cleaned in (*_STANDARD_KEYS, _EXCEPTION_KEY) else cleaned


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def _level(record: logging.LogRecord) -> str:
    return record.levelname.lower().replace("warning", "warn")


def _entries(
    formatter: logging.Formatter, record: logging.LogRecord
) -> Iterator[tuple[str, Plain]]:
    yield "ts", _timestamp(record)
    yield "level", _level(record)
    yield "logger", record.name
    yield "msg", record.getMessage()
    extra = getattr(record, FIELDS_ATTRIBUTE, None)
    if isinstance(extra, Mapping):
        for name, value in extra.items():
            yield _key(str(name)), _plain(value)
    if record.exc_info:
        yield _EXCEPTION_KEY, formatter.formatException(record.exc_info)


# --- logfmt ------------------------------------------------------------------------------

_SHORT_ESCAPES: Mapping[str, str] = {
    "\\": "\\\\",
    '"': '\\"',
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
# Besides the non-printable ones, these characters need the value quoted: space ends a
# bare value, = and " are syntax, U+FFFD marks undecodable input (as in go-logfmt).
_QUOTE_TRIGGERS = re.compile('[ ="\ufffd]')


def _escape(character: str) -> str:
    short = _SHORT_ESCAPES.get(character)
    if short is not None:
        return short
    if character.isprintable() and character != "\ufffd":
        return character
    code = ord(character)
    if code > 0xFFFF:
        # \uXXXX holds 16 bits: beyond that, a UTF-16 surrogate pair (as JSON does).
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def logfmt_value(value: Plain) -> str:
    """One value as a logfmt token: bare when that is unambiguous, else quoted."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if value.isprintable() and not _QUOTE_TRIGGERS.search(value) and value != "null":
        return value  # bare: the common case (backslashes alone need no quotes)
    return '"' + "".join(_escape(character) for character in value) + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={logfmt_value(value)}" for key, value in _entries(self, record))


class JSONFormatter(logging.Formatter):
    """The same fields as logfmt, one JSON object per line (ASCII only: every other
    character is escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(dict(_entries(self, record)), allow_nan=False)


def setup_logging(level: str, log_format: str) -> None:
    """Our logger at ``level``, other libraries' at warn; one line per record on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("pop3_exporter").setLevel(_LEVELS.get(level, logging.ERROR))
