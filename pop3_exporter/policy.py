"""Which targets /probe may reach: allow and deny rules on names, addresses and ports.

Without a policy /probe will connect wherever it is told, which turns the exporter
into a port scanner for anyone who can reach it. A policy is checked twice:

1. on the target as requested, before any name resolution, so a refused name is never
   even looked up (and an IP literal is decided completely here);
2. on the address the prober is about to connect to, after resolution, so a name that
   resolves to a denied address (``evil.example`` -> 127.0.0.1, or ``127.1``) is refused.
   The prober connects to exactly that address, so there is no second lookup that a
   rebinding DNS server could answer differently.

Semantics: a rule matches when every condition it has matches (``cidr`` on the address,
``host``/``host_regex`` on the name, ``ports`` on the port). Any matching deny rule
refuses; otherwise a matching allow rule admits; otherwise ``default`` decides.

The YAML side (``policy:`` in the configuration file) is parsed here too, through a
small reader interface that config.py's node walker provides, so that errors carry
file:line like the rest of the configuration.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Protocol

import yaml

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Host globs are limited to what host names contain plus the two wildcards; anything
# fancier belongs in host_regex, where its meaning is explicit.
_GLOB_CHARACTERS = re.compile(r"^[a-z0-9*?_.-]+$")
_PORT_RANGE = re.compile(r"^([0-9]{1,5})-([0-9]{1,5})$")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class RefusalReason(enum.StrEnum):
    """Label values of pop3_exporter_probes_refused_total (a fixed, small set)."""

    DENY_RULE = "deny_rule"
    DEFAULT_DENY = "default_deny"


class TargetRefusedError(Exception):
    """The policy refuses this target. Not a ProbeError: it is our decision, not the
    target's behaviour, so it escapes the prober and becomes HTTP 403."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny rule; a condition left as None is not checked."""

    where: str  # "policy.deny[0]": names the rule in refusals and logs
    networks: tuple[IPNetwork, ...] | None = None
    names: tuple[re.Pattern[str], ...] | None = None
    ports: tuple[PortRange, ...] | None = None

    def match(self, name: str | None, address: IPAddress | None, port: int) -> bool | None:
        """True or False, or None when only the (not yet known) address can tell.

        ``name`` is None for IP-literal targets: name patterns never match addresses.
        """
        if self.ports is not None and not any(port in r for r in self.ports):
            return False
        if self.names is not None and (
            name is None or not any(p.fullmatch(name) for p in self.names)
        ):
            return False
        if self.networks is not None:
            if address is None:
                return None
            if not any(address in network for network in self.networks):
                return False
        return True


def normalize_address(text: str) -> IPAddress:
    """The address rules are matched against: no IPv6 zone, IPv4-mapped IPv6 as IPv4
    (so that a deny of 127.0.0.0/8 also covers ::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(text.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_name(host: str) -> str:
    return host.lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class Policy:
    """The whole policy. The default instance allows everything (no ``policy:`` key)."""

    default_allow: bool = True
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()

    @property
    def uses_addresses(self) -> bool:
        """Whether any rule looks at addresses, i.e. whether the check after name
        resolution can decide differently from the check before it."""
        return any(rule.networks is not None for rule in (*self.allow, *self.deny))

    def check_target(self, host: str, port: int, *, is_ip_literal: bool) -> None:
        """Before resolution: raise TargetRefusedError if no address could be allowed."""
        if self.default_allow and not self.deny:
            return  # the default policy: nothing to check on every probe
        if is_ip_literal:
            self._decide(None, normalize_address(host), port, f"{_show(host)} port {port}")
        else:
            self._decide(normalize_name(host), None, port, f"{_show(host)} port {port}")

    def check_address(self, host: str | None, address: str, port: int) -> None:
        """After resolution: ``host`` is the name asked for (None for an IP literal)."""
        name = normalize_name(host) if host is not None else None
        # The address is deliberately not in the message: it goes back to whoever
        # asked, and the answers of internal DNS are not theirs to learn.
        what = f"{_show(host)} port {port}" if host is not None else f"{address} port {port}"
        self._decide(name, normalize_address(address), port, what)

    def _decide(self, name: str | None, address: IPAddress | None, port: int, what: str) -> None:
        for rule in self.deny:
            if rule.match(name, address, port) is True:
                raise TargetRefusedError(
                    RefusalReason.DENY_RULE, f"target {what} is denied by {rule.where}"
                )
        if self.default_allow:
            return
        # Before resolution an allow rule that might match (None) keeps the target
        # alive; the check after resolution then decides for certain.
        if any(rule.match(name, address, port) is not False for rule in self.allow):
            return
        raise TargetRefusedError(
            RefusalReason.DEFAULT_DENY,
            f"target {what} matches no allow rule (policy default: deny)",
        )


def _show(host: str | None) -> str:
    # The host was validated by parse_target, but the message must stay one safe line.
    text = host or ""
    return text if text.isprintable() and len(text) <= 300 else repr(text[:300])


class NodeReader(Protocol):
    """What policy parsing needs from config.py's YAML walker (its _Source)."""

    def error(self, node: yaml.Node, message: str, *, key: str = "") -> Exception: ...

    def mapping(
        self, node: yaml.Node, where: str, allowed: set[str]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]: ...

    def scalar(self, node: yaml.Node, where: str) -> Any: ...

    def string(self, node: yaml.Node, where: str) -> str: ...


_RULE_KEYS = {"cidr", "host", "host_regex", "ports"}


def parse_policy(reader: NodeReader, node: yaml.Node) -> Policy:
    """``policy: {default: allow|deny, allow: [rule, ...], deny: [rule, ...]}``."""
    entries = reader.mapping(node, "policy", {"default", "allow", "deny"})
    default_allow = True
    if "default" in entries:
        value_node = entries["default"][1]
        text = reader.string(value_node, "policy.default")
        if text not in ("allow", "deny"):
            raise reader.error(
                value_node, f"must be allow or deny, got {text!r}", key="policy.default"
            )
        default_allow = text == "allow"
    rules: dict[str, tuple[Rule, ...]] = {}
    for kind in ("allow", "deny"):
        if kind in entries:
            rules[kind] = _parse_rules(reader, entries[kind][1], f"policy.{kind}")
    allow = rules.get("allow", ())
    if allow and default_allow:
        # Deny wins over allow, so with a default of allow these rules could never
        # change a decision; saying so beats silently ignoring them.
        raise reader.error(
            entries["allow"][0], "has no effect unless policy.default is deny", key="policy.allow"
        )
    return Policy(default_allow=default_allow, allow=allow, deny=rules.get("deny", ()))


def _parse_rules(reader: NodeReader, node: yaml.Node, where: str) -> tuple[Rule, ...]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return ()
    if not isinstance(node, yaml.SequenceNode):
        raise reader.error(node, "must be a list of rules", key=where)
    return tuple(
        _parse_rule(reader, item, f"{where}[{index}]") for index, item in enumerate(node.value)
    )


def _parse_rule(reader: NodeReader, node: yaml.Node, where: str) -> Rule:
    entries = reader.mapping(node, where, _RULE_KEYS)
    if not entries:
        keys = ", ".join(sorted(_RULE_KEYS))
        raise reader.error(node, f"needs at least one of {keys}", key=where)
    networks: tuple[IPNetwork, ...] | None = None
    names: list[re.Pattern[str]] = []
    ports: tuple[PortRange, ...] | None = None
    for key, (_, value_node) in entries.items():
        key_where = f"{where}.{key}"
        items = _scalar_list(reader, value_node, key_where)
        if key == "cidr":
            networks = tuple(_parse_network(reader, n, v, key_where) for n, v in items)
        elif key == "host":
            names.extend(_parse_glob(reader, n, v, key_where) for n, v in items)
        elif key == "host_regex":
            names.extend(_parse_regex(reader, n, v, key_where) for n, v in items)
        elif key == "ports":
            ports = tuple(_parse_ports(reader, n, v, key_where) for n, v in items)
    return Rule(where=where, networks=networks, names=tuple(names) or None, ports=ports)


def _scalar_list(reader: NodeReader, node: yaml.Node, where: str) -> list[tuple[yaml.Node, Any]]:
    """A single value or a non-empty list of values, each with its node for errors."""
    nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not nodes:
        raise reader.error(node, "must not be an empty list", key=where)
    return [(item, reader.scalar(item, where)) for item in nodes]


def _parse_network(reader: NodeReader, node: yaml.Node, value: Any, where: str) -> IPNetwork:
    if not isinstance(value, str):
        raise reader.error(node, "must be a CIDR range such as 10.0.0.0/8", key=where)
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise reader.error(node, str(exc), key=where) from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        # Addresses are matched with IPv4-mapped IPv6 turned into IPv4 first.
        raise reader.error(node, "write IPv4-mapped ranges in IPv4 form", key=where)
    return network


def _parse_glob(reader: NodeReader, node: yaml.Node, value: Any, where: str) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        raise reader.error(node, "must be a host name pattern such as *.example.com", key=where)
    glob = normalize_name(value)
    if not _GLOB_CHARACTERS.match(glob):
        raise reader.error(
            node,
            f"{value!r} may hold only host name characters, * and ? (use host_regex for more)",
            key=where,
        )
    if _looks_like_address(glob):
        raise reader.error(node, f"{value!r} is an address; use cidr for addresses", key=where)
    return re.compile(fnmatch.translate(glob))


def _parse_regex(reader: NodeReader, node: yaml.Node, value: Any, where: str) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        raise reader.error(node, "must be a regular expression", key=where)
    try:
        # Names are matched lower-cased and whole (fullmatch); IGNORECASE spares the
        # author from having to know that.
        return re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise reader.error(node, f"bad regex: {exc}", key=where) from None


def _parse_ports(reader: NodeReader, node: yaml.Node, value: Any, where: str) -> PortRange:
    message = "entries must be ports 1-65535 or ranges such as 1000-2000"
    if isinstance(value, bool):
        raise reader.error(node, message, key=where)
    if isinstance(value, int):
        first = last = value
    elif isinstance(value, str) and (match := _PORT_RANGE.match(value)):
        first, last = int(match.group(1)), int(match.group(2))
    elif isinstance(value, str) and value.isdigit() and value.isascii():
        first = last = int(value)
    else:
        raise reader.error(node, message, key=where)
    if not 1 <= first <= last <= 65535:
        raise reader.error(node, message, key=where)
    return PortRange(first, last)


def _looks_like_address(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True
