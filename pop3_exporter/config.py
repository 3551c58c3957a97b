"""Configuration: YAML parsed once into frozen, typed objects.

Parsing walks the YAML node tree (not the plain dicts) so that every error can name
the file, the line and the key. Defaults live in the dataclass fields and nowhere else.

Each section (the top level, a module, its tls_config) is a table of YAML key -> `Key`
(how the value is read, and how it is written back). A new setting is a dataclass
field plus one table entry; tests hold that every field has an entry and every entry a
field. Parsing goes on after a bad key, so that one run reports every problem, each as
``FILE:LINE: KEY.PATH: message``.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import yaml

from pop3_exporter.credentials import (
    CredentialError,
    Mechanism,
    Secret,
    read_secret_env,
    read_secret_file,
    readable_by_others,
)
from pop3_exporter.errors import ConfigError, TargetError
from pop3_exporter.policy import Policy, TargetRefusedError, parse_policy
from pop3_exporter.target import parse_target


class TLSMode(enum.StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class IPProtocol(enum.StrEnum):
    IP4 = "ip4"
    IP6 = "ip6"


class AddressSelection(enum.StrEnum):
    """Which addresses of a name a probe connects to (the module key ``ip_protocol``)."""

    # One: of preferred_ip_protocol, else (ip_protocol_fallback) of the other family.
    PREFERRED = "preferred"
    # Every A and AAAA address, concurrently (fanout.py).
    ALL = "all"


class DaneMode(enum.StrEnum):
    """What the TLSA check (dane.py) does with its verdict."""

    # Report the probe_tls_dane_* series; the probe does not fail for DANE.
    CHECK = "check"
    # Also fail the probe with dane_insecure or dane_mismatch.
    REQUIRE = "require"


TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = MappingProxyType(
    {
        "TLS10": ssl.TLSVersion.TLSv1,
        "TLS11": ssl.TLSVersion.TLSv1_1,
        "TLS12": ssl.TLSVersion.TLSv1_2,
        "TLS13": ssl.TLSVersion.TLSv1_3,
    }
)

DEFAULT_GREETING_PATTERN = r"^\+OK"
PLAIN_PORT = 110
IMPLICIT_TLS_PORT = 995
MODULE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Client TLS settings; names follow prometheus/common's TLSConfig."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False
    min_version: str = "TLS12"
    max_version: str | None = None
    # Extra handshakes limited to TLS 1.0 and to TLS 1.1 (legacytls.py).
    check_legacy_versions: bool = False


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How an authenticated probe logs in. The secret itself is loaded from
    password_file or password_env when the configuration is (re)loaded; token_file is
    read at every probe."""

    username: str
    mechanism: Mechanism = Mechanism.USER
    password_file: str | None = None
    password_env: str | None = None
    token_file: str | None = None
    # Send credentials over a connection without TLS (tls: none).
    allow_plaintext: bool = False
    # Use the mechanism even when CAPA does not advertise it (USER, or the SASL name).
    allow_unadvertised: bool = False
    password: Secret | None = None

    def secret(self) -> Secret:
        """What this probe sends: the loaded password, or the token file read now."""
        if self.mechanism.uses_token:
            if self.token_file is None:
                raise CredentialError(f"auth.mechanism {self.mechanism} needs token_file")
            return read_secret_file(self.token_file)
        if self.password is None:
            raise CredentialError("no password loaded (password_file or password_env)")
        return self.password


@dataclass(frozen=True, slots=True)
class MailboxConfig:
    """What the probe looks at after login (never DELE, never RETR)."""

    stat: bool = True
    # TOP 1 0 and the Date header of message 1.
    oldest_message: bool = False


@dataclass(frozen=True, slots=True)
class SmtpAuthConfig:
    """Credentials for SMTP submission (SASL as the SMTP client library chooses)."""

    username: str
    password_file: str | None = None
    password_env: str | None = None
    allow_plaintext: bool = False
    password: Secret | None = None


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """The submission server a delivery probe sends through."""

    address: str  # "host:port", as written
    tls: TLSMode = TLSMode.STARTTLS
    tls_config: TLSConfig = field(default_factory=TLSConfig)
    auth: SmtpAuthConfig | None = None
    # The EHLO name; unset: this machine's host name.
    helo_name: str | None = None

    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, host is an IP address); the address was checked at load."""
        spec = parse_target(self.address)
        assert spec.port is not None
        return spec.host, spec.port, spec.is_ip_literal


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """An SMTP-to-POP3 round trip: send, then wait for the message over POP3."""

    smtp: SmtpConfig
    from_address: str
    to: str
    poll_interval: float = 1.0
    # The key that marks this exporter's messages; unset: delivery.key in the state
    # directory (--state.directory). Created with a random key when missing.
    secret_file: str | None = None


@dataclass(frozen=True, slots=True)
class Module:
    """One way of probing; `port` is used when the target names none."""

    name: str
    tls: TLSMode = TLSMode.NONE
    port: int = PLAIN_PORT
    timeout: float = 10.0
    expect_greeting: re.Pattern[str] = field(
        default_factory=lambda: re.compile(DEFAULT_GREETING_PATTERN)
    )
    query_capabilities: bool = True
    preferred_ip_protocol: IPProtocol = IPProtocol.IP6
    ip_protocol_fallback: bool = True
    source_ip_address: str | None = None
    tls_config: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig | None = None
    # Only with auth; None means the defaults (STAT after login).
    mailbox: MailboxConfig | None = None
    delivery: DeliveryConfig | None = None
    # "all": probe every address of the name; preferred_ip_protocol and
    # ip_protocol_fallback then have no effect.
    ip_protocol: AddressSelection = AddressSelection.PREFERRED
    # Unset: no TLSA lookup.
    dane: DaneMode | None = None

    @property
    def uses_tls(self) -> bool:
        return self.tls is not TLSMode.NONE


@dataclass(frozen=True, slots=True)
class Config:
    modules: Mapping[str, Module]
    source: str = "<built-in>"
    # Which targets /probe may reach (policy.py); the default allows every target.
    policy: Policy = field(default_factory=Policy)
    # Key path ("modules.a.tls_config.ca_file") -> line in `source`, for problems found
    # after parsing (a certificate that does not load). Not part of the configuration's
    # meaning, hence not compared.
    lines: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )
    # Things that work but deserve a look (a password file others can read); logged at
    # load and printed by --config.check.
    warnings: tuple[ConfigProblem, ...] = field(default=(), compare=False, repr=False)


def builtin_modules() -> dict[str, Module]:
    """The modules available without any configuration file."""
    return {
        "pop3": Module(name="pop3"),
        "pop3_starttls": Module(name="pop3_starttls", tls=TLSMode.STARTTLS),
        "pop3s": Module(name="pop3s", tls=TLSMode.IMPLICIT, port=IMPLICIT_TLS_PORT),
    }


def default_config() -> Config:
    return Config(modules=MappingProxyType(builtin_modules()))


# --- problems ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration file. Every problem prints the same way:
    ``FILE:LINE: KEY.PATH: message`` (LINE and KEY.PATH left out where there is none,
    as for a file that cannot be read)."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        place = self.file if self.line is None else f"{self.file}:{self.line}"
        # One problem, one line, whatever a library put in its message.
        message = " ".join(self.message.splitlines())
        return f"{place}: {self.key}: {message}" if self.key else f"{place}: {message}"


def in_file_order(problems: Iterable[ConfigProblem]) -> tuple[ConfigProblem, ...]:
    """Problems sorted by file and line (those without a line first), as a reader goes
    through the file; problems on one line keep the order they were found in."""
    return tuple(sorted(problems, key=lambda problem: (problem.file, problem.line or 0)))


class InvalidConfigError(ConfigError):
    """Every problem found in a configuration, one per line in str()."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


class _Reported(InvalidConfigError):
    """A section failed; its problems are in the source's list already."""

    def __init__(self) -> None:
        super().__init__(())


# --- durations -----------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|y|w|d|h|m|s)")
_DURATION_UNITS: Mapping[str, Fraction] = MappingProxyType(
    {
        "y": Fraction(31536000),
        "w": Fraction(604800),
        "d": Fraction(86400),
        "h": Fraction(3600),
        "m": Fraction(60),
        "s": Fraction(1),
        "ms": Fraction(1, 1000),
    }
)


def parse_duration(text: str) -> float:
    """Parse a Prometheus-style duration ("30s", "1m30s", "500ms") into seconds.

    The sum is exact and rounded to a float once, so "10s" is 10.0 and "100ms" is the
    float nearest to 0.1, never one drifted by adding 0.001 a hundred times.
    """
    position = 0
    total = Fraction(0)
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += Fraction(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 10s, 1m30s, 500ms)")
    return float(total)


def format_duration(seconds: float) -> str:
    """The text that parse_duration() reads back to exactly ``seconds``: Prometheus
    style ("1m30s", "500ms") for whole milliseconds, else decimal seconds."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {seconds!r}")
    # repr() is the shortest decimal that reads back to the same float.
    decimal = Decimal(repr(seconds))
    millis = decimal * 1000
    if millis != millis.to_integral_value():
        return f"{decimal:f}s"
    remaining = int(millis)
    if remaining == 0:
        return "0s"
    parts = []
    for unit, size in _DURATION_UNITS.items():
        count, remaining = divmod(remaining, int(size * 1000))
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# --- reading YAML nodes ----------------------------------------------------------------


def _yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong, where in the line."""
    problem = getattr(exc, "problem", None)
    if problem is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None)
    text = f"{problem} ({context})" if context else str(problem)
    return f"{text}, column {mark.column + 1}" if mark is not None else text


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class _Source:
    """A YAML document being read: knows its file name, collects problems, and
    remembers the line of every key it has seen."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[ConfigProblem] = []
        self.warnings: list[ConfigProblem] = []
        self.lines: dict[str, int] = {}

    def compose(self, text: str) -> yaml.Node | None:
        """The document's node tree (None if empty); a syntax error names the line and
        ends the reading (nothing after it can be trusted)."""
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = ConfigProblem(self.filename, line, "", f"invalid YAML: {_yaml_error(exc)}")
            raise InvalidConfigError([problem]) from None

    def problem(self, node: yaml.Node, message: str, key: str = "") -> ConfigProblem:
        return ConfigProblem(self.filename, node.start_mark.line + 1, key, message)

    def error(self, node: yaml.Node, message: str, *, key: str = "") -> InvalidConfigError:
        """The exception for one problem at ``node``; ``key`` is its key path."""
        return InvalidConfigError([self.problem(node, message, key)])

    def note(self, node: yaml.Node, message: str, *, key: str = "") -> None:
        """Record a problem and go on reading."""
        self.problems.append(self.problem(node, message, key))

    def warn(self, node: yaml.Node, message: str, *, key: str = "") -> None:
        """Record something that works but deserves a look."""
        self.warnings.append(self.problem(node, message, key))

    def report(self, exc: ConfigError) -> None:
        if isinstance(exc, InvalidConfigError):
            self.problems.extend(exc.problems)
        else:
            self.problems.append(ConfigProblem(self.filename, None, "", str(exc)))

    def mapping(
        self, node: yaml.Node, where: str, allowed: set[str]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Return key -> (key node, value node); unknown and duplicate keys raise.

        ``where`` is the mapping's key path ("" for the document); an empty ``allowed``
        allows any key.
        """
        entries, problems = self._entries(node, where, allowed)
        if problems:
            raise InvalidConfigError(problems)
        return entries

    def entries(
        self, node: yaml.Node, where: str, allowed: set[str]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """As mapping(), but unknown and duplicate keys are recorded and left out."""
        entries, problems = self._entries(node, where, allowed)
        self.problems.extend(problems)
        return entries

    def _entries(
        self, node: yaml.Node, where: str, allowed: set[str]
    ) -> tuple[dict[str, tuple[yaml.Node, yaml.Node]], list[ConfigProblem]]:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return {}, []
        if not isinstance(node, yaml.MappingNode):
            message = "must be a mapping" if where else "the top level must be a mapping"
            return {}, [self.problem(node, message, where)]
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        problems: list[ConfigProblem] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(self.problem(key_node, "keys must be strings", where))
                continue
            key = str(key_node.value)
            path = _join(where, key)
            if key in result:
                problems.append(self.problem(key_node, "duplicate key", path))
            elif allowed and key not in allowed:
                known = ", ".join(sorted(allowed))
                problems.append(self.problem(key_node, f"unknown key (known: {known})", path))
            else:
                result[key] = (key_node, value_node)
                self.lines[path] = value_node.start_mark.line + 1
        return result, problems

    def scalar(self, node: yaml.Node, where: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, "must be a single value", key=where)
        return yaml.SafeLoader("").construct_object(node)

    def string(self, node: yaml.Node, where: str) -> str:
        value = self.scalar(node, where)
        if not isinstance(value, str):
            raise self.error(node, f"must be a string, got {value!r}", key=where)
        return value

    def boolean(self, node: yaml.Node, where: str) -> bool:
        value = self.scalar(node, where)
        if not isinstance(value, bool):
            raise self.error(node, f"must be true or false, got {value!r}", key=where)
        return value


# --- sections as tables ---------------------------------------------------------------

_T = TypeVar("_T")
_S = TypeVar("_S")
_E = TypeVar("_E", bound=enum.StrEnum)
# (source, value node, key path) -> the field's value; raises source.error(...).
Parser = Callable[[_Source, yaml.Node, str], _T]


@dataclass(frozen=True, slots=True)
class Key(Generic[_T]):
    """One YAML key of a section: how its value is read, and how it is written back
    (a plain YAML value that ``parse`` reads back to an equal field value)."""

    parse: Parser[_T]
    dump: Callable[[_T], object]
    # The dataclass field, when it cannot have the key's name ("from" is a keyword).
    field: str | None = None

    def field_name(self, key: str) -> str:
        return self.field or key


# (source, section key path, values read so far, entries) -> None. Runs once every key
# has parsed cleanly; checks that involve several keys record problems with
# source.note(), and defaults that depend on other keys are added to the values.
Finisher = Callable[[_Source, str, dict[str, Any], Mapping[str, tuple[yaml.Node, yaml.Node]]], None]


def _no_finish(
    source: _Source,
    where: str,
    values: dict[str, Any],
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Section(Generic[_S]):
    """A YAML mapping read into a dataclass: one `Key` per field, except the fields in
    ``given`` that the caller supplies (a module's name comes from its key) or the
    finisher derives (a password, read from the file a key names)."""

    build: Callable[..., _S]
    keys: Mapping[str, Key[Any]]
    finish: Finisher = _no_finish
    given: frozenset[str] = frozenset()

    def parse(self, source: _Source, node: yaml.Node, where: str, **given: Any) -> _S:
        """Every bad key is recorded in source.problems; then _Reported is raised."""
        problems_before = len(source.problems)
        entries = source.entries(node, where, set(self.keys))
        values: dict[str, Any] = dict(given)
        for key, (_, value_node) in entries.items():
            entry = self.keys[key]
            try:
                values[entry.field_name(key)] = entry.parse(source, value_node, _join(where, key))
            except ConfigError as exc:
                source.report(exc)
        if len(source.problems) == problems_before:
            # Checks across keys only on a clean section: on a half-read one they would
            # report what is merely a consequence of an error already reported.
            self.finish(source, where, values, entries)
        if len(source.problems) != problems_before:
            raise _Reported
        return self.build(**values)

    def dump(self, value: _S) -> dict[str, object]:
        """The plain mapping that parse() reads back to an equal object; unset (None)
        fields are left out."""
        result: dict[str, object] = {}
        for key, entry in self.keys.items():
            field_value = getattr(value, entry.field_name(key))
            if field_value is not None:
                result[key] = entry.dump(field_value)
        return result

    def fields(self) -> set[str]:
        """The dataclass fields the keys fill (for the tests that keep both in step)."""
        return {entry.field_name(key) for key, entry in self.keys.items()}

    def key(self) -> Key[_S]:
        """This section as the value of a key of another section."""
        return Key(self.parse, self.dump)


def _same(value: _T) -> _T:
    return value


def _enum_value(value: enum.StrEnum) -> str:
    return value.value


def _choice(choices: Mapping[str, _T]) -> Parser[_T]:
    names = ", ".join(choices)

    def parse(source: _Source, node: yaml.Node, where: str) -> _T:
        text = source.string(node, where)
        if text not in choices:
            raise source.error(node, f"must be one of {names}, got {text!r}", key=where)
        return choices[text]

    return parse


def _enum_choice(enum_type: type[_E]) -> Parser[_E]:
    return _choice({member.value: member for member in enum_type})


def _non_empty_string(source: _Source, node: yaml.Node, where: str) -> str:
    text = source.string(node, where)
    if not text:
        raise source.error(node, "must not be empty", key=where)
    return text


def _boolean(source: _Source, node: yaml.Node, where: str) -> bool:
    return source.boolean(node, where)


def _port(source: _Source, node: yaml.Node, where: str) -> int:
    port = source.scalar(node, where)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise source.error(node, f"must be a port 1-65535, got {port!r}", key=where)
    return port


def _timeout(source: _Source, node: yaml.Node, where: str) -> float:
    text = source.scalar(node, where)
    try:
        seconds = parse_duration(str(text))
    except ValueError as exc:
        raise source.error(node, str(exc), key=where) from None
    if seconds <= 0:
        raise source.error(node, "must be above zero", key=where)
    return seconds


def _regex(source: _Source, node: yaml.Node, where: str) -> re.Pattern[str]:
    pattern = source.string(node, where)
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise source.error(node, f"bad regex: {exc}", key=where) from None


def _pattern_text(pattern: re.Pattern[str]) -> str:
    return pattern.pattern


def _ip_address(source: _Source, node: yaml.Node, where: str) -> str:
    text = source.string(node, where)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise source.error(node, f"must be an IP address, got {text!r}", key=where) from None


def _tls_version(source: _Source, node: yaml.Node, where: str) -> str:
    version = source.string(node, where)
    if version not in TLS_VERSIONS:
        names = ", ".join(TLS_VERSIONS)
        raise source.error(node, f"must be one of {names}, got {version!r}", key=where)
    return version


def _finish_tls_config(
    source: _Source,
    where: str,
    values: dict[str, Any],
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
) -> None:
    for present, missing in (("cert_file", "key_file"), ("key_file", "cert_file")):
        if present in values and missing not in values:
            source.note(entries[present][1], f"needs {missing} too", key=_join(where, present))
    minimum = values.get("min_version", TLSConfig().min_version)
    maximum = values.get("max_version")
    if maximum is not None and TLS_VERSIONS[maximum] < TLS_VERSIONS[minimum]:
        source.note(
            entries["max_version"][1],
            f"{maximum} is below min_version {minimum}",
            key=_join(where, "max_version"),
        )


TLS_CONFIG_SECTION: Section[TLSConfig] = Section(
    build=TLSConfig,
    keys=MappingProxyType(
        {
            "ca_file": Key(_non_empty_string, _same),
            "cert_file": Key(_non_empty_string, _same),
            "key_file": Key(_non_empty_string, _same),
            "server_name": Key(_non_empty_string, _same),
            "insecure_skip_verify": Key(_boolean, _same),
            "min_version": Key(_tls_version, _same),
            "max_version": Key(_tls_version, _same),
            "check_legacy_versions": Key(_boolean, _same),
        }
    ),
    finish=_finish_tls_config,
)


# A user name goes into a command line ("USER name"), so no spaces or control
# characters; RFC 1939 leaves its form to the server.
_USERNAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _username(source: _Source, node: yaml.Node, where: str) -> str:
    text = source.string(node, where)
    if not _USERNAME.fullmatch(text):
        raise source.error(
            node, "must be 1-255 characters without spaces or control characters", key=where
        )
    return text


def _env_name(source: _Source, node: yaml.Node, where: str) -> str:
    text = source.string(node, where)
    if not _ENV_NAME.fullmatch(text):
        raise source.error(node, f"is not an environment variable name: {text!r}", key=where)
    return text


def _finish_auth(
    source: _Source,
    where: str,
    values: dict[str, Any],
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
) -> None:
    """Which secret the mechanism needs, and the password read now (re-read on reload;
    a token file is read at every probe, but must be readable now too)."""
    mechanism = values.get("mechanism", AuthConfig.__dataclass_fields__["mechanism"].default)
    if "username" not in values:
        source.note(_section_node(entries), "needs username", key=_join(where, "username"))
        return
    sources = [key for key in ("password_file", "password_env", "token_file") if key in values]
    allowed = ("token_file",) if mechanism.uses_token else ("password_file", "password_env")
    if len(sources) != 1 or sources[0] not in allowed:
        node = entries[sources[-1]][1] if sources else _section_node(entries)
        wanted = " or ".join(allowed)
        source.note(node, f"mechanism {mechanism} needs one of {wanted}, alone", key=where)
        return
    (key,) = sources
    secret = _read_secret(source, where, key, values[key], entries[key][1])
    if secret is not None and key != "token_file":
        values["password"] = secret


def _read_secret(
    source: _Source, where: str, key: str, value: str, node: yaml.Node
) -> Secret | None:
    """The secret a *_file or *_env key names, read now; a problem (None) if it cannot
    be read, a warning if other users can read its file."""
    try:
        secret = read_secret_env(value) if key.endswith("_env") else read_secret_file(value)
    except CredentialError as exc:
        source.note(node, str(exc), key=_join(where, key))
        return None
    if key.endswith("_file") and readable_by_others(value):
        source.warn(node, "the file is readable by other users", key=_join(where, key))
    return secret


def _section_node(entries: Mapping[str, tuple[yaml.Node, yaml.Node]]) -> yaml.Node:
    """A node to point at when a section lacks a key: its first key."""
    return next(iter(entries.values()))[0] if entries else yaml.ScalarNode("", "")


AUTH_SECTION: Section[AuthConfig] = Section(
    build=AuthConfig,
    keys=MappingProxyType(
        {
            "mechanism": Key(_enum_choice(Mechanism), _enum_value),
            "username": Key(_username, _same),
            "password_file": Key(_non_empty_string, _same),
            "password_env": Key(_env_name, _same),
            "token_file": Key(_non_empty_string, _same),
            "allow_plaintext": Key(_boolean, _same),
            "allow_unadvertised": Key(_boolean, _same),
        }
    ),
    finish=_finish_auth,
    given=frozenset({"password"}),
)


def _finish_smtp_auth(
    source: _Source,
    where: str,
    values: dict[str, Any],
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
) -> None:
    if "username" not in values:
        source.note(_section_node(entries), "needs username", key=_join(where, "username"))
        return
    sources = [key for key in ("password_file", "password_env") if key in values]
    if len(sources) != 1:
        node = entries[sources[-1]][1] if sources else _section_node(entries)
        source.note(node, "needs one of password_file or password_env, alone", key=where)
        return
    (key,) = sources
    values["password"] = _read_secret(source, where, key, values[key], entries[key][1])


SMTP_AUTH_SECTION: Section[SmtpAuthConfig] = Section(
    build=SmtpAuthConfig,
    keys=MappingProxyType(
        {
            "username": Key(_username, _same),
            "password_file": Key(_non_empty_string, _same),
            "password_env": Key(_env_name, _same),
            "allow_plaintext": Key(_boolean, _same),
        }
    ),
    finish=_finish_smtp_auth,
    given=frozenset({"password"}),
)


def _smtp_address(source: _Source, node: yaml.Node, where: str) -> str:
    text = source.string(node, where)
    try:
        spec = parse_target(text)
    except TargetError as exc:
        raise source.error(node, f"must be HOST:PORT: {exc}", key=where) from None
    if spec.port is None or spec.scheme is not None:
        raise source.error(node, f"must be HOST:PORT, got {text!r}", key=where)
    return text


def _host_name(source: _Source, node: yaml.Node, where: str) -> str:
    text = source.string(node, where)
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", text):
        raise source.error(node, f"must be a host name, got {text!r}", key=where)
    return text


def _finish_smtp(
    source: _Source,
    where: str,
    values: dict[str, Any],
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
) -> None:
    if "address" not in values:
        source.note(_section_node(entries), "needs address", key=_join(where, "address"))
        return
    auth: SmtpAuthConfig | None = values.get("auth")
    tls = values.get("tls", TLSMode.STARTTLS)
    if auth is not None and tls is TLSMode.NONE and not auth.allow_plaintext:
        source.note(
            entries["auth"][0],
            "would send credentials without TLS (tls: none); use tls: starttls or implicit,"
            " or set auth.allow_plaintext: true",
            key=_join(where, "auth"),
        )


SMTP_SECTION: Section[SmtpConfig] = Section(
    build=SmtpConfig,
    keys=MappingProxyType(
        {
            "address": Key(_smtp_address, _same),
            "tls": Key(_enum_choice(TLSMode), _enum_value),
            "tls_config": TLS_CONFIG_SECTION.key(),
            "auth": SMTP_AUTH_SECTION.key(),
            "helo_name": Key(_host_name, _same),
        }
    ),
    finish=_finish_smtp,
)

# RFC 5321 mailbox, loosely: local@domain without spaces, brackets or control characters.
_MAIL_ADDRESS = re.compile(r"[^\s<>@\x00-\x1f\x7f]{1,64}@[A-Za-z0-9.-]{1,253}")


def _mail_address(source: _Source, node: yaml.Node, where: str) -> str:
    text = source.string(node, where)
    if not _MAIL_ADDRESS.fullmatch(text):
        raise source.error(
            node, f"must be an address like user@example.com, got {text!r}", key=where
        )
    return text


def _finish_delivery(
    source: _Source,
    where: str,
    values: dict[str, Any],
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
) -> None:
    for key, name in (("smtp", "smtp"), ("from_address", "from"), ("to", "to")):
        if key not in values:
            source.note(_section_node(entries), f"needs {name}", key=_join(where, name))


DELIVERY_SECTION: Section[DeliveryConfig] = Section(
    build=DeliveryConfig,
    keys=MappingProxyType(
        {
            "smtp": SMTP_SECTION.key(),
            "from": Key(_mail_address, _same, field="from_address"),
            "to": Key(_mail_address, _same),
            "poll_interval": Key(_timeout, format_duration),
            "secret_file": Key(_non_empty_string, _same),
        }
    ),
    finish=_finish_delivery,
)


MAILBOX_SECTION: Section[MailboxConfig] = Section(
    build=MailboxConfig,
    keys=MappingProxyType(
        {
            "stat": Key(_boolean, _same),
            "oldest_message": Key(_boolean, _same),
        }
    ),
)


def _finish_module(
    source: _Source,
    where: str,
    values: dict[str, Any],
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
) -> None:
    if "port" not in values and values.get("tls") is TLSMode.IMPLICIT:
        values["port"] = IMPLICIT_TLS_PORT
    if "dane" in values and values.get("tls", TLSMode.NONE) is TLSMode.NONE:
        source.note(
            entries["dane"][1],
            "DANE checks the certificate of a TLS handshake; use tls: starttls or implicit",
            key=_join(where, "dane"),
        )
    if "delivery" in entries:
        # A round trip sends a message per probe: one per address would flood the
        # mailbox, and its polls are several sessions a DANE verdict would have to span.
        for key, unsupported in (
            ("ip_protocol", values.get("ip_protocol") is AddressSelection.ALL),
            ("dane", "dane" in values),
        ):
            if unsupported:
                source.note(
                    entries[key][1],
                    "not supported in a delivery module; probe the same server with a"
                    f" module without delivery for {key}",
                    key=_join(where, key),
                )
    auth: AuthConfig | None = values.get("auth")
    if auth is None:
        for key in ("mailbox", "delivery"):
            if key in entries:
                source.note(entries[key][0], "needs auth (a login)", key=_join(where, key))
        return
    if "delivery" in entries and "mailbox" in entries:
        source.note(
            entries["mailbox"][0],
            "a delivery module looks at its own messages only; leave mailbox out",
            key=_join(where, "mailbox"),
        )
    auth_node = entries["auth"][0]
    if values.get("tls", TLSMode.NONE) is TLSMode.NONE and not auth.allow_plaintext:
        source.note(
            auth_node,
            "would send credentials without TLS (tls: none); use tls: starttls or implicit,"
            " or set auth.allow_plaintext: true",
            key=_join(where, "auth"),
        )
    if not values.get("query_capabilities", True) and not auth.allow_unadvertised:
        source.note(
            auth_node,
            "a login needs CAPA to know the mechanism is offered; set query_capabilities:"
            " true, or auth.allow_unadvertised: true",
            key=_join(where, "auth"),
        )
    mailbox: MailboxConfig = values.get("mailbox") or MailboxConfig()
    if mailbox.oldest_message and not mailbox.stat:
        source.note(
            entries["mailbox"][0],
            "oldest_message needs stat (TOP is only sent when STAT counts a message)",
            key=_join(where, "mailbox.oldest_message"),
        )
    tls_config: TLSConfig = values.get("tls_config", TLSConfig())
    if tls_config.insecure_skip_verify and values.get("tls", TLSMode.NONE) is not TLSMode.NONE:
        source.warn(
            auth_node,
            "credentials are sent to a server whose certificate is not verified"
            " (tls_config.insecure_skip_verify)",
            key=_join(where, "auth"),
        )


MODULE_SECTION: Section[Module] = Section(
    build=Module,
    keys=MappingProxyType(
        {
            "tls": Key(_enum_choice(TLSMode), _enum_value),
            "port": Key(_port, _same),
            "timeout": Key(_timeout, format_duration),
            "expect_greeting": Key(_regex, _pattern_text),
            "query_capabilities": Key(_boolean, _same),
            "preferred_ip_protocol": Key(_enum_choice(IPProtocol), _enum_value),
            "ip_protocol_fallback": Key(_boolean, _same),
            "source_ip_address": Key(_ip_address, _same),
            "tls_config": TLS_CONFIG_SECTION.key(),
            "auth": AUTH_SECTION.key(),
            "mailbox": MAILBOX_SECTION.key(),
            "delivery": DELIVERY_SECTION.key(),
            "ip_protocol": Key(_enum_choice(AddressSelection), _enum_value),
            "dane": Key(_enum_choice(DaneMode), _enum_value),
        }
    ),
    finish=_finish_module,
    given=frozenset({"name"}),
)


def module_to_mapping(module: Module) -> dict[str, object]:
    """The module as the plain mapping a configuration file would hold under
    ``modules.NAME`` (the inverse of parsing; unset keys left out)."""
    return MODULE_SECTION.dump(module)


def _modules(source: _Source, node: yaml.Node, where: str) -> Mapping[str, Module]:
    """The built-in modules, with those of the file added (a module of the same name
    replaces the built-in one). Modules with problems are left out."""
    modules = builtin_modules()
    for name, (key_node, module_node) in source.entries(node, where, set()).items():
        path = _join(where, name)
        if not MODULE_NAME_PATTERN.fullmatch(name):
            source.note(key_node, f"module name must match {MODULE_NAME_PATTERN.pattern}", key=path)
            continue
        try:
            modules[name] = MODULE_SECTION.parse(source, module_node, path, name=name)
        except ConfigError as exc:
            source.report(exc)
    return MappingProxyType(modules)


def _policy(source: _Source, node: yaml.Node, where: str) -> Policy:
    return parse_policy(source, node)


# The top level: key -> parser of the Config field of that name.
TOP_LEVEL_KEYS: Mapping[str, Parser[Any]] = MappingProxyType(
    {
        "modules": _modules,
        "policy": _policy,
    }
)


def parse_config_partial(
    text: str, filename: str = "<string>"
) -> tuple[Config, tuple[ConfigProblem, ...]]:
    """The configuration without the parts that have problems, and every problem.

    --config.check uses it to go on checking (certificates) past the first problem;
    everything else uses parse_config(), which raises instead.
    """
    source = _Source(filename)
    try:
        root = source.compose(text)
    except InvalidConfigError as exc:
        return Config(modules=MappingProxyType(builtin_modules()), source=filename), exc.problems
    values: dict[str, Any] = {"modules": MappingProxyType(builtin_modules())}
    if root is not None:
        for key, (_, value_node) in source.entries(root, "", set(TOP_LEVEL_KEYS)).items():
            try:
                values[key] = TOP_LEVEL_KEYS[key](source, value_node, key)
            except ConfigError as exc:
                source.report(exc)
    config = Config(
        **values,
        source=filename,
        lines=MappingProxyType(source.lines),
        warnings=in_file_order(source.warnings),
    )
    return config, in_file_order((*source.problems, *_smtp_policy_problems(config)))


def _smtp_policy_problems(config: Config) -> list[ConfigProblem]:
    """A delivery module's SMTP server goes through the target policy, as a /probe
    target does: a name, port or address rule that refuses it is a problem now (an
    address rule is checked again on the address each probe connects to)."""
    problems = []
    for name, module in config.modules.items():
        if module.delivery is None:
            continue
        host, port, is_ip = module.delivery.smtp.endpoint()
        try:
            config.policy.check_target(host, port, is_ip_literal=is_ip)
        except TargetRefusedError as exc:
            key = f"modules.{name}.delivery.smtp.address"
            message = f"refused by the policy: {exc}"
            problems.append(ConfigProblem(config.source, config.lines.get(key), key, message))
    return problems


def parse_config(text: str, filename: str = "<string>") -> Config:
    """Parse configuration text; raises InvalidConfigError naming every problem.

    Modules from the file are added to the built-in ones (a module of the same name
    replaces the built-in one)."""
    config, problems = parse_config_partial(text, filename)
    if problems:
        raise InvalidConfigError(problems)
    return config


def load_config_partial(path: str | Path) -> tuple[Config, tuple[ConfigProblem, ...]]:
    """As parse_config_partial(), from a file; a file that cannot be read is a problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = ConfigProblem(str(path), None, "", f"cannot read: {exc}")
        return Config(modules=MappingProxyType(builtin_modules()), source=str(path)), (problem,)
    return parse_config_partial(text, str(path))


def load_config(path: str | Path) -> Config:
    config, problems = load_config_partial(path)
    if problems:
        raise InvalidConfigError(problems)
    return config
