"""Secrets for authenticated probes: where they come from, and a type that never shows them.

Passwords come from a file or an environment variable named in the configuration and
are read when the configuration is (re)loaded; tokens come from a file re-read at every
probe, because OAuth tokens rotate. The configuration file itself never holds a secret,
and neither does a URL, a label, a log line, a debug report or an error message: a
Secret prints as asterisks, and every message about a secret names only its source.
"""

from __future__ import annotations

import enum
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

# A secret file is one line; anything much longer is not a password or token file.
MAX_SECRET_FILE_BYTES = 64 * 1024
REDACTED = "********"


class CredentialError(Exception):
    """A secret could not be read. The message names the source, never the secret."""


class Mechanism(enum.StrEnum):
    """How the probe logs in: RFC 1939 USER/PASS and APOP, or a SASL mechanism."""

    USER = "user"
    APOP = "apop"
    PLAIN = "plain"
    LOGIN = "login"
    XOAUTH2 = "xoauth2"
    OAUTHBEARER = "oauthbearer"

    @property
    def uses_token(self) -> bool:
        return self in (Mechanism.XOAUTH2, Mechanism.OAUTHBEARER)

    @property
    def sasl_name(self) -> str | None:
        """The name in `AUTH <name>` and in CAPA's SASL line; None for USER and APOP."""
        if self in (Mechanism.USER, Mechanism.APOP):
            return None
        return self.value.upper()


@dataclass(frozen=True, slots=True)
class Secret:
    """A password or token. repr() and str() never show it; reveal() does, on purpose."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return REDACTED

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"


def read_secret_file(path: str) -> Secret:
    """The first line of `path`, its line ending stripped."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        # strerror only: the OSError's own text is safe too, but keep one format.
        raise CredentialError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise CredentialError(f"{path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    first = data.split(b"\n", 1)[0].removesuffix(b"\r")
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError(f"{path}: the first line is not UTF-8") from None
    if not text:
        raise CredentialError(f"{path}: the first line is empty")
    if not text.isprintable():
        raise CredentialError(f"{path}: the first line has control characters")
    return Secret(text)


def read_secret_env(name: str) -> Secret:
    value = os.environ.get(name)
    if value is None:
        raise CredentialError(f"environment variable {name} is not set")
    if not value:
        raise CredentialError(f"environment variable {name} is empty")
    if not value.isprintable():
        raise CredentialError(f"environment variable {name} has control characters")
    return Secret(value)


def readable_by_others(path: str) -> bool:
    """True if users other than the owner (and group) can read the file."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IROTH)
