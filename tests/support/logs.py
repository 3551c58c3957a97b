"""Reading the exporter's log lines back as a log shipper would: logfmt with a real
parser in go-logfmt's strict mode, JSON with json."""

from __future__ import annotations

import json
from typing import Any

from logfmtkv import parse_pairs


def parse_logfmt_line(line: str) -> dict[str, str]:
    """One line as fields; fails on anything go-logfmt would reject, on a repeated
    key and on a bare key (the exporter always writes key=value)."""
    pairs = parse_pairs(line, strict=True)
    keys = [pair.key for pair in pairs]
    assert len(set(keys)) == len(keys), f"repeated key in {line!r}"
    record: dict[str, str] = {}
    for pair in pairs:
        assert pair.value is not None, f"bare key {pair.key!r} in {line!r}"
        record[pair.key] = pair.value
    return record


def parse_logfmt(text: str) -> list[dict[str, str]]:
    # Records end at "\n" only: str.splitlines() would also split at \x1c, \x85,
    # U+2028 and others, which a correct formatter never lets through unescaped anyway.
    return [parse_logfmt_line(line) for line in text.split("\n") if line]


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.split("\n"):
        if line:
            record = json.loads(line)
            assert isinstance(record, dict)
            records.append(record)
    return records


def as_text(value: object) -> str:
    """A field value as logfmt writes it, so that JSON and logfmt records compare alike."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def find(records: list[dict[str, Any]], msg: str, **fields: object) -> dict[str, Any]:
    """The one record with this msg and these field values (compared as text)."""
    matches = [
        record
        for record in records
        if record.get("msg") == msg
        and all(as_text(record.get(key)) == as_text(value) for key, value in fields.items())
    ]
    assert len(matches) == 1, f"{len(matches)} records match {msg!r} {fields}: {records}"
    return matches[0]
