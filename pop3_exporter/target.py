"""The `target` parameter: host, host:port, [v6]:port, bare IPv6, pop3:// and pop3s:// forms."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pop3_exporter.errors import TargetError

MAX_TARGET_LENGTH = 300
SCHEMES = ("pop3", "pop3s")
_SCOPE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """A parsed target; `port` and `scheme` are None when the target did not say."""

    host: str  # IPv6 without brackets
    port: int | None
    scheme: str | None
    is_ip_literal: bool


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """A target with its port settled (from the target or from the module)."""

    host: str
    port: int
    is_ip_literal: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(raw: str) -> TargetSpec:
    if not raw:
        raise TargetError("target is empty")
    if len(raw) > MAX_TARGET_LENGTH:
        raise TargetError(f"target is longer than {MAX_TARGET_LENGTH} characters")
    if not raw.isprintable() or any(ch.isspace() for ch in raw):
        raise TargetError("target contains whitespace or control characters")
    scheme: str | None = None
    authority = raw
    if "://" in raw:
        scheme, _, authority = raw.partition("://")
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            raise TargetError(f"target scheme {scheme!r} is not one of pop3://, pop3s://")
        if authority.endswith("/"):
            authority = authority[:-1]
        if "/" in authority or "?" in authority or "#" in authority:
            raise TargetError("target URL must not have a path, query or fragment")
        if "@" in authority:
            raise TargetError("target URL must not contain user information")
    host, port = _split_host_port(authority)
    is_ip = _check_host(host)
    return TargetSpec(host=host, port=port, scheme=scheme, is_ip_literal=is_ip)


def _split_host_port(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise TargetError("target has '[' without ']'")
        host = authority[1:close]
        rest = authority[close + 1 :]
        if not _is_ipv6(host):
            raise TargetError(f"{host!r} in brackets is not an IPv6 address")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise TargetError("unexpected text after ']' in target")
        return host, _parse_port(rest[1:])
    if authority.count(":") >= 2:
        # A bare IPv6 literal: it cannot carry a port without brackets.
        if not _is_ipv6(authority):
            raise TargetError(f"{authority!r} is not an IPv6 address (use [addr]:port)")
        return authority, None
    if ":" in authority:
        host, _, port_text = authority.partition(":")
        return host, _parse_port(port_text)
    return authority, None


def _parse_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5:
        raise TargetError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise TargetError(f"port {port} is out of range 1-65535")
    return port


def _is_ipv6(text: str) -> bool:
    # A scope id ("fe80::1%eth0") is an interface name; anything else in it (such as
    # "]") could not be written back in brackets.
    _, percent, scope = text.partition("%")
    if percent and not _SCOPE_ID.match(scope):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _check_host(host: str) -> bool:
    """Return True for an IP literal; raise for anything that is not a valid host name."""
    if not host:
        raise TargetError("target has no host")
    if _is_ipv6(host):
        return True
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return True
    if not host.isascii():
        raise TargetError("host name must be ASCII (use the xn-- form of an international name)")
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in name.split(".")):
        raise TargetError(f"{host!r} is not a valid host name")
    return False
