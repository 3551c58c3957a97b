"""Name resolution behind a small interface, so tests inject their own answers.

The default is ``DnsResolver``: dnspython's asyncio stub resolver. It needs no thread
pool (``getaddrinfo`` in the loop's executor let a few names whose DNS servers never
answer hold every thread, so that healthy targets queued behind them and failed), and it
is cancelled like any coroutine when the probe deadline fires.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.TLSA import TLSA
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from pop3_exporter.errors import ResolveError, ResolveTimeoutError

logger = logging.getLogger("pop3_exporter")

Address = tuple[socket.AddressFamily, str]

RESOLV_CONF = Path("/etc/resolv.conf")
HOSTS_FILE = Path("/etc/hosts")
# The probe deadline is what really bounds a lookup (the prober cancels it then); this
# only stops a lookup that nobody cancels from running forever.
DEFAULT_LIFETIME_SECONDS = 30.0
# How often the system files are checked for changes, as glibc and Go's resolver do,
# so that an edited resolv.conf or hosts file needs no restart.
SYSTEM_FILES_RECHECK_SECONDS = 5.0
DNS_PORT = 53


class Resolver(Protocol):
    async def resolve(self, host: str) -> list[Address]:
        """Return (family, address) pairs in the resolver's order; raise ResolveError."""
        ...


@runtime_checkable
class TLSAResolver(Protocol):
    """A resolver that can also look up TLSA records for DANE (DnsResolver)."""

    async def tlsa(self, name: str) -> TLSAAnswer:
        """The records and whether the answer was authenticated; raise ResolveError."""
        ...


@dataclass(frozen=True, slots=True)
class TLSAAnswer:
    """TLSA records of one name and whether the resolver authenticated the answer (AD).

    ``authenticated`` also describes an empty answer: an authenticated denial means
    the name provably has no TLSA records.
    """

    records: tuple[TLSA, ...]
    authenticated: bool


def ip_literal(host: str) -> Address | None:
    """(family, address) when ``host`` is an IP address rather than a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return family, host


def parse_hosts(text: str) -> Mapping[str, tuple[Address, ...]]:
    """/etc/hosts: lower-cased name -> its addresses in file order (bad lines skipped)."""
    table: dict[str, list[Address]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        literal = ip_literal(fields[0])
        if literal is None:
            continue
        for name in fields[1:]:
            addresses = table.setdefault(name.lower().rstrip("."), [])
            if literal not in addresses:
                addresses.append(literal)
    return MappingProxyType({name: tuple(addresses) for name, addresses in table.items()})


def _configure(resolver: dns.asyncresolver.Resolver, lifetime: float) -> None:
    resolver.lifetime = lifetime
    # AD in the query asks a validating resolver to say whether it validated the answer
    # (RFC 6840 section 5.7); only TLSA lookups use that, A/AAAA lookups ignore it.
    resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.cache = None  # every probe measures a real lookup, as getaddrinfo did


def _file_signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True, slots=True)
class _SystemConfig:
    resolver: dns.asyncresolver.Resolver
    hosts: Mapping[str, tuple[Address, ...]]
    # Why lookups that reach DNS must fail (no nameserver configured), else None.
    problem: str | None


class _SystemFiles:
    """resolv.conf and hosts, re-read when they change (checked every few seconds)."""

    def __init__(
        self,
        resolv_conf: Path,
        hosts: Path,
        lifetime: float,
        clock: Callable[[], float],
    ) -> None:
        self._resolv_conf = resolv_conf
        self._hosts = hosts
        self._lifetime = lifetime
        self._clock = clock
        self._signature: object = object()
        self._checked_at: float | None = None
        self._config: _SystemConfig | None = None

    def current(self) -> _SystemConfig:
        now = self._clock()
        if (
            self._config is None
            or self._checked_at is None
            or now - self._checked_at >= SYSTEM_FILES_RECHECK_SECONDS
        ):
            self._checked_at = now
            signature = (_file_signature(self._resolv_conf), _file_signature(self._hosts))
            if self._config is None or signature != self._signature:
                self._signature = signature
                self._config = self._load()
        return self._config

    def _load(self) -> _SystemConfig:
        problem: str | None = None
        resolver = dns.asyncresolver.Resolver(configure=False)
        try:
            resolver.read_resolv_conf(str(self._resolv_conf))
        except (OSError, dns.exception.DNSException) as exc:
            # glibc would fall back to a server on 127.0.0.1; a missing or empty
            # resolv.conf is more likely a broken container, so say so instead.
            problem = f"no nameserver from {self._resolv_conf} ({exc})"
            logger.warning("%s: names not in %s fail with dns_error", problem, self._hosts)
            resolver = dns.asyncresolver.Resolver(configure=False)
        _configure(resolver, self._lifetime)
        try:
            hosts = parse_hosts(self._hosts.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            hosts = MappingProxyType({})
        return _SystemConfig(resolver=resolver, hosts=hosts, problem=problem)


class DnsResolver:
    """Asynchronous A and AAAA lookups with dnspython, queried concurrently.

    ``server=None`` follows the system's configuration as getaddrinfo would: names in
    the hosts file are answered from it without a query, the rest go to the
    nameservers of resolv.conf with its search list; both files are re-read when they
    change. With ``server=(address, port)`` every name goes to that server, as an
    absolute name, and the hosts file is not consulted.

    IP literals are returned as they are, without a query (the prober does not even
    ask for them).

    Outcomes: addresses (AAAA first, then A, each in the server's order), or
    ResolveTimeoutError when a lookup got no answer within ``lifetime`` (dns_timeout),
    or ResolveError for NXDOMAIN, SERVFAIL, REFUSED, names with neither an A nor an AAAA
    record, and no nameserver configured (dns_error). A server that does not answer at
    all is a timeout.
    """

    def __init__(
        self,
        server: tuple[str, int] | None = None,
        *,
        lifetime: float = DEFAULT_LIFETIME_SECONDS,
        resolv_conf: Path = RESOLV_CONF,
        hosts: Path = HOSTS_FILE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.lifetime = lifetime
        self._system: _SystemFiles | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None
        if server is None:
            self._system = _SystemFiles(resolv_conf, hosts, lifetime, clock)
        else:
            address, port = server
            if ip_literal(address) is None:
                raise ValueError(f"DNS server {address!r} is not an IP address")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [address]
            resolver.port = port
            _configure(resolver, lifetime)
            self._resolver = resolver

    @property
    def dns_resolver(self) -> dns.asyncresolver.Resolver:
        """The dnspython resolver lookups go to now (nameservers, port, flags)."""
        if self._resolver is not None:
            return self._resolver
        assert self._system is not None
        return self._system.current().resolver

    async def resolve(self, host: str) -> list[Address]:
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        if self._resolver is not None:
            resolver, search = self._resolver, False
        else:
            assert self._system is not None
            config = self._system.current()
            from_hosts = config.hosts.get(host.lower().rstrip("."))
            if from_hosts:
                return list(from_hosts)
            if config.problem is not None:
                raise ResolveError(f"resolving {host!r}: {config.problem}")
            resolver, search = config.resolver, True
        try:
            qname = dns.name.from_text(host) if not search else dns.name.from_text(host, None)
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise ResolveError(f"resolving {host!r}: not a valid name: {exc}") from exc
        async with asyncio.TaskGroup() as group:
            lookups = [
                group.create_task(_lookup(resolver, qname, rdtype, search))
                for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A)
            ]
        return _addresses(host, [lookup.result() for lookup in lookups], self.lifetime)

    async def tlsa(self, name: str) -> TLSAAnswer:
        """The TLSA records of ``name`` (absolute, e.g. ``_110._tcp.mail.example.``).

        No records (NXDOMAIN or no TLSA) is an empty answer, not an error; a DANE check
        decides from ``authenticated`` whether it can trust that.
        """
        resolver = self.dns_resolver
        problem = self._system.current().problem if self._system is not None else None
        if problem is not None:
            raise ResolveError(f"TLSA of {name!r}: {problem}")
        try:
            answer = await resolver.resolve(
                dns.name.from_text(name),
                dns.rdatatype.TLSA,
                raise_on_no_answer=False,
                search=False,
            )
        except dns.resolver.NXDOMAIN as exc:
            # NXDOMAIN.responses() is untyped; it returns this same mapping.
            responses: Mapping[dns.name.Name, dns.message.Message] = exc.kwargs.get("responses", {})
            authenticated = bool(responses) and all(
                bool(response.flags & dns.flags.AD) for response in responses.values()
            )
            return TLSAAnswer(records=(), authenticated=authenticated)
        except dns.exception.Timeout as exc:
            raise ResolveTimeoutError(
                f"TLSA of {name!r}: no answer within {self.lifetime:g}s"
            ) from exc
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise ResolveError(f"TLSA of {name!r}: {exc}") from exc
        records = tuple(r for r in answer.rrset or () if isinstance(r, TLSA))
        return TLSAAnswer(records=records, authenticated=bool(answer.response.flags & dns.flags.AD))


_LookupOutcome = dns.resolver.Answer | dns.exception.DNSException


async def _lookup(
    resolver: dns.asyncresolver.Resolver,
    qname: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    search: bool,
) -> _LookupOutcome:
    """One family's lookup; DNS failures are returned so the other family can finish."""
    try:
        return await resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=search)
    except dns.exception.DNSException as exc:
        return exc


def _addresses(host: str, outcomes: list[_LookupOutcome], lifetime: float) -> list[Address]:
    """Turn the AAAA and A outcomes into addresses or the error that fits them."""
    addresses: list[Address] = []
    errors: list[dns.exception.DNSException] = []
    for outcome in outcomes:
        if isinstance(outcome, dns.exception.DNSException):
            errors.append(outcome)
            continue
        for rdata in outcome.rrset or ():
            if isinstance(rdata, AAAA):
                pair = (socket.AF_INET6, str(rdata.address))
            elif isinstance(rdata, A):
                pair = (socket.AF_INET, str(rdata.address))
            else:
                continue
            if pair not in addresses:
                addresses.append(pair)
    for error in errors:
        # An unanswered family leaves the answer incomplete (a probe of every address
        # would miss some): a timeout wins even when the other family has addresses.
        if isinstance(error, dns.exception.Timeout):
            raise ResolveTimeoutError(
                f"resolving {host!r}: no answer within {lifetime:g}s"
            ) from error
    if addresses:
        # A definite failure of one family (SERVFAIL on AAAA, say) leaves the other
        # family's addresses usable, as getaddrinfo does.
        return addresses
    for error in errors:
        if isinstance(error, dns.resolver.NXDOMAIN):
            raise ResolveError(f"resolving {host!r}: no such name (NXDOMAIN)") from error
    if errors:
        raise ResolveError(f"resolving {host!r}: {errors[0]}") from errors[0]
    raise ResolveError(f"resolving {host!r}: no A or AAAA record")


class SystemResolver:
    """The operating system's resolver via getaddrinfo, run in the loop's default
    executor: its lookups cannot be cancelled and share that small thread pool, which
    is why it is no longer the default (kept for comparison and for nsswitch setups
    such as LDAP or mDNS host lookups)."""

    async def resolve(self, host: str) -> list[Address]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ResolveError(f"resolving {host!r}: {exc}") from exc
        answers: list[Address] = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                pair = (family, str(sockaddr[0]))
                if pair not in answers:
                    answers.append(pair)
        return answers


class StaticResolver:
    """Answers from a fixed table; names not in it fail as NXDOMAIN would."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self._table = table

    async def resolve(self, host: str) -> list[Address]:
        addresses = self._table.get(host.lower().rstrip("."))
        if not addresses:
            raise ResolveError(f"resolving {host!r}: no such host")
        return [
            (socket.AF_INET6 if ":" in address else socket.AF_INET, address)
            for address in addresses
        ]
