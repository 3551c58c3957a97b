"""Small wording helpers for text that people read (reports, command output)."""

from __future__ import annotations


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``plural(1, "probe")`` is "1 probe", ``plural(2, "probe")`` is "2 probes"."""
    word = singular if count == 1 else (plural_form or f"{singular}s")
    return f"{count} {word}"
