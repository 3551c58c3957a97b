"""Configuration: YAML parsed once into frozen, typed objects.

Parsing walks the YAML node tree (not the plain dicts) so that every error can name
the file, the line and the key. Defaults live in the dataclass fields and nowhere else.
"""

from __future__ import annotations

import enum
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from pop3_exporter.errors import ConfigError
from pop3_exporter.policy import Policy, parse_policy


class TLSMode(enum.StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class IPProtocol(enum.StrEnum):
    IP4 = "ip4"
    IP6 = "ip6"


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

    @property
    def uses_tls(self) -> bool:
        return self.tls is not TLSMode.NONE


@dataclass(frozen=True, slots=True)
class Config:
    modules: Mapping[str, Module]
    source: str = "<built-in>"
    # Which targets /probe may reach (policy.py); the default allows every target.
    policy: Policy = field(default_factory=Policy)


def builtin_modules() -> dict[str, Module]:
    """The modules available without any configuration file."""
    return {
        "pop3": Module(name="pop3"),
        "pop3_starttls": Module(name="pop3_starttls", tls=TLSMode.STARTTLS),
        "pop3s": Module(name="pop3s", tls=TLSMode.IMPLICIT, port=IMPLICIT_TLS_PORT),
    }


def default_config() -> Config:
    return Config(modules=MappingProxyType(builtin_modules()))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|y|w|d|h|m|s)")
_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
    "y": 31536000.0,
}


def parse_duration(text: str) -> float:
    """Parse a Prometheus-style duration ("30s", "1m30s", "500ms") into seconds."""
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 10s, 1m30s, 500ms)")
    return total


class _Source:
    """A YAML document being read: knows its file name for error messages."""

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def compose(self, text: str) -> yaml.Node | None:
        """The document's node tree (None if empty); a syntax error names the line."""
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f"{mark.line + 1}: " if mark is not None else ""
            raise ConfigError(f"{self.filename}:{line}invalid YAML: {exc}") from None

    def error(self, node: yaml.Node, message: str) -> ConfigError:
        return ConfigError(f"{self.filename}:{node.start_mark.line + 1}: {message}")

    def mapping(
        self, node: yaml.Node, where: str, allowed: set[str]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Return key -> (key node, value node); unknown and duplicate keys are errors."""
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{where} must be a mapping")
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(key_node, f"{where}: keys must be strings")
            key = str(key_node.value)
            if key in result:
                raise self.error(key_node, f"{where}: duplicate key '{key}'")
            if allowed and key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(key_node, f"{where}: unknown key '{key}' (known: {known})")
            result[key] = (key_node, value_node)
        return result

    def scalar(self, node: yaml.Node, where: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, f"'{where}' must be a single value")
        return yaml.SafeLoader("").construct_object(node)

    def string(self, node: yaml.Node, where: str) -> str:
        value = self.scalar(node, where)
        if not isinstance(value, str):
            raise self.error(node, f"'{where}' must be a string, got {value!r}")
        return value

    def boolean(self, node: yaml.Node, where: str) -> bool:
        value = self.scalar(node, where)
        if not isinstance(value, bool):
            raise self.error(node, f"'{where}' must be true or false, got {value!r}")
        return value


_T = TypeVar("_T")


def _choice(
    source: _Source, node: yaml.Node, where: str, choices: Callable[[str], _T], names: str
) -> _T:
    text = source.string(node, where)
    try:
        return choices(text)
    except (ValueError, KeyError):
        raise source.error(node, f"'{where}' must be one of {names}, got {text!r}") from None


def _parse_tls_config(source: _Source, node: yaml.Node, where: str) -> TLSConfig:
    allowed = {f.name for f in fields(TLSConfig)}
    entries = source.mapping(node, where, allowed)
    values: dict[str, Any] = {}
    for key, (_, value_node) in entries.items():
        key_where = f"{where}.{key}"
        if key in ("insecure_skip_verify", "check_legacy_versions"):
            values[key] = source.boolean(value_node, key_where)
        elif key in ("min_version", "max_version"):
            version = source.string(value_node, key_where)
            if version not in TLS_VERSIONS:
                names = ", ".join(TLS_VERSIONS)
                raise source.error(value_node, f"'{key_where}' must be one of {names}")
            values[key] = version
        else:
            text = source.string(value_node, key_where)
            if not text:
                raise source.error(value_node, f"'{key_where}' must not be empty")
            values[key] = text
    tls_config = TLSConfig(**values)
    if (tls_config.cert_file is None) != (tls_config.key_file is None):
        raise source.error(node, f"'{where}': cert_file and key_file go together")
    if tls_config.max_version is not None and (
        TLS_VERSIONS[tls_config.max_version] < TLS_VERSIONS[tls_config.min_version]
    ):
        raise source.error(node, f"'{where}': max_version is below min_version")
    return tls_config


def _parse_module(source: _Source, name: str, node: yaml.Node) -> Module:
    where = f"modules.{name}"
    allowed = {f.name for f in fields(Module)} - {"name"}
    entries = source.mapping(node, where, allowed)
    values: dict[str, Any] = {"name": name}
    for key, (_, value_node) in entries.items():
        key_where = f"{where}.{key}"
        if key == "tls":
            values[key] = _choice(
                source, value_node, key_where, TLSMode, "none, starttls, implicit"
            )
        elif key == "port":
            port = source.scalar(value_node, key_where)
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise source.error(value_node, f"'{key_where}' must be a port 1-65535")
            values[key] = port
        elif key == "timeout":
            text = source.scalar(value_node, key_where)
            try:
                seconds = parse_duration(str(text))
            except ValueError as exc:
                raise source.error(value_node, f"'{key_where}': {exc}") from None
            if seconds <= 0:
                raise source.error(value_node, f"'{key_where}' must be above zero")
            values[key] = seconds
        elif key == "expect_greeting":
            pattern = source.string(value_node, key_where)
            try:
                values[key] = re.compile(pattern)
            except re.error as exc:
                raise source.error(value_node, f"'{key_where}': bad regex: {exc}") from None
        elif key in ("query_capabilities", "ip_protocol_fallback"):
            values[key] = source.boolean(value_node, key_where)
        elif key == "preferred_ip_protocol":
            values[key] = _choice(source, value_node, key_where, IPProtocol, "ip4, ip6")
        elif key == "source_ip_address":
            values[key] = _parse_ip(source, value_node, key_where)
        elif key == "tls_config":
            values[key] = _parse_tls_config(source, value_node, key_where)
    if "port" not in values and values.get("tls") is TLSMode.IMPLICIT:
        values["port"] = IMPLICIT_TLS_PORT
    return Module(**values)


def _parse_ip(source: _Source, node: yaml.Node, where: str) -> str:
    import ipaddress

    text = source.string(node, where)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise source.error(node, f"'{where}' must be an IP address, got {text!r}") from None


def parse_config(text: str, filename: str = "<string>") -> Config:
    """Parse configuration text. Modules from the file are added to the built-in ones
    (a module of the same name replaces the built-in one)."""
    source = _Source(filename)
    root = source.compose(text)
    modules = builtin_modules()
    if root is None:
        return Config(modules=MappingProxyType(modules), source=filename)
    top = source.mapping(root, "top level", {"modules", "policy"})
    policy = parse_policy(source, top["policy"][1]) if "policy" in top else Policy()
    if "modules" in top:
        _, modules_node = top["modules"]
        for name, (key_node, module_node) in source.mapping(modules_node, "modules", set()).items():
            if not MODULE_NAME_PATTERN.fullmatch(name):
                raise source.error(
                    key_node, f"module name '{name}' must match {MODULE_NAME_PATTERN.pattern}"
                )
            modules[name] = _parse_module(source, name, module_node)
    return Config(modules=MappingProxyType(modules), source=filename, policy=policy)


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return parse_config(text, str(path))
