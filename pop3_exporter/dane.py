"""DANE (RFC 6698, RFC 7671): the TLSA records of ``_PORT._tcp.HOST`` matched against
the certificates the server presented.

The lookup starts with the probe (``TLSALookup.start``) and runs beside the connection
and the handshake; the verdict (``evaluate``) is pure. Records are trusted only when
the resolver set the AD bit, i.e. validated them with DNSSEC: the resolver is the
operator's choice (``--dns.server``, or the system's), see docs/dns.md.

How each certificate usage matches:

- DANE-EE (3): the leaf. Nothing else about it is checked, neither its names nor its
  dates nor who issued it (RFC 7671 section 5.1).
- DANE-TA (2): a certificate above the leaf, acting as trust anchor: one the server
  presented, or one of the chain the handshake's PKIX verification built (which may
  end in a root of ca_file or the system store that the server did not send). Every
  certificate from the leaf up to it is signed by the next, the issuing ones are CAs,
  those below the anchor are within their validity period (a trust anchor has none,
  RFC 5280 section 6.1.1), and the leaf names the host: the target's name or
  tls_config.server_name (subjectAltName DNS names, a wildcard only as the whole first
  label). The bare public key of an anchor that is in neither chain is not matched
  (RFC 7671 section 5.2.2 asks servers to send the anchor).
- PKIX-TA (0) and PKIX-EE (1): only when the handshake's own PKIX verification
  succeeded (``tls_config``; never with ``insecure_skip_verify``), a certificate of the
  verified chain above the leaf, or the leaf.

Selectors 0 (the whole certificate) and 1 (its SubjectPublicKeyInfo, as the
certificate encodes it), matching types 0 (the bytes), 1 (SHA-256) and 2 (SHA-512).
Records with other values, or a digest of the wrong length, are unusable and match
nothing (RFC 6698 section 4.1).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from pop3_exporter.errors import DaneInsecureError, DaneMismatchError, ResolveError
from pop3_exporter.resolver import TLSAAnswer, TLSAResolver, ip_literal
from pop3_exporter.result import DaneFacts
from pop3_exporter.tlsinfo import Handshake

PKIX_TA = 0
PKIX_EE = 1
DANE_TA = 2
DANE_EE = 3
_DIGEST_SIZES = {1: 32, 2: 64}


@dataclass(frozen=True, slots=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        if self.usage not in (PKIX_TA, PKIX_EE, DANE_TA, DANE_EE) or self.selector not in (0, 1):
            return False
        if self.mtype == 0:
            return bool(self.data)
        return len(self.data) == _DIGEST_SIZES.get(self.mtype, -1)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype}"


def tlsa_name(host: str, port: int) -> str:
    """The owner name of the TLSA records of a TCP service (RFC 6698 section 3)."""
    return f"_{port}._tcp.{host.rstrip('.')}."


def base_host(host: str, is_ip_literal: bool, server_name: str | None) -> str | None:
    """The name whose TLSA records apply: the target's name, or for a target given as
    an IP address the module's tls_config.server_name; None when there is no name."""
    if not is_ip_literal:
        return host
    if server_name is not None and ip_literal(server_name) is None:
        return server_name
    return None


class TLSALookup:
    """One TLSA lookup, started with the probe so that it costs no time of its own.

    The task belongs to whoever started it (the probe, or the probe of every address,
    whose per-address probes share it): it is cancelled when that probe ends, so it
    never outlives the probe's deadline. Readers wait through a shield, so a reader
    that gives up does not cancel it for the others.
    """

    def __init__(
        self, name: str, host: str | None, task: asyncio.Task[TLSAAnswer] | None, problem: str
    ) -> None:
        self.name = name
        self.host = host
        self._task = task
        self._problem = problem

    @classmethod
    def start(cls, resolver: object, host: str | None, port: int) -> TLSALookup:
        if host is None:
            return cls(
                "(none)",
                None,
                None,
                "the target is an IP address and tls_config.server_name is unset:"
                " no name to look up TLSA records for",
            )
        name = tlsa_name(host, port)
        if not isinstance(resolver, TLSAResolver):
            return cls(name, host, None, "the resolver cannot look up TLSA records")
        return cls(name, host, asyncio.create_task(resolver.tlsa(name)), "")

    def done(self) -> bool:
        return self._task is None or self._task.done()

    async def outcome(self) -> TLSAAnswer | str:
        """The answer, or why there is none (a failed lookup is no answer, not a failure
        of its own: what it means depends on the module's dane mode)."""
        if self._task is None:
            return self._problem
        try:
            return await asyncio.shield(self._task)
        except ResolveError as exc:
            return str(exc)

    def cancel(self) -> None:
        if self._task is None:
            return
        if not self._task.done():
            self._task.cancel()
        elif not self._task.cancelled():
            self._task.exception()  # looked at: no "exception never retrieved" later


def records_of(answer: TLSAAnswer) -> tuple[TLSARecord, ...]:
    return tuple(
        TLSARecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
        for r in answer.records
    )


def reference_names(host: str | None, server_name: str | None) -> tuple[str, ...]:
    """The names a DANE-TA leaf may carry: the TLSA base name and the module's
    tls_config.server_name, the name the operator says the certificate carries."""
    return tuple(dict.fromkeys(name for name in (host, server_name) if name is not None))


def evaluate(
    name: str,
    outcome: TLSAAnswer | str,
    handshake: Handshake | None,
    names: Sequence[str],
    now: datetime,
) -> DaneFacts:
    """The verdict on one presented chain (``handshake`` None: nothing to compare)."""
    presented = handshake.presented_der if handshake is not None else ()
    if isinstance(outcome, str):
        return DaneFacts(name, 0, False, False if presented else None, problem=outcome)
    records = records_of(outcome)
    if not presented:
        return DaneFacts(name, len(records), outcome.authenticated, None)
    if not outcome.authenticated:
        # Unauthenticated records could come from anyone on the path: never trusted.
        return DaneFacts(name, len(records), False, False)
    assert handshake is not None
    matched = match_chain(records, handshake, names, now)
    return DaneFacts(
        name, len(records), True, matched is not None, str(matched) if matched else None
    )


def enforce(facts: DaneFacts) -> None:
    """dane: require: raise why a client that insists on DANE would refuse the server."""
    if not facts.secure:
        why = facts.problem or (
            "the answer is not authenticated (no AD bit): the zone is unsigned, or the"
            " resolver does not validate"
        )
        raise DaneInsecureError(f"TLSA {facts.name}: {why}")
    if facts.records == 0:
        raise DaneMismatchError(f"TLSA {facts.name}: no records (authenticated denial)")
    if not facts.match:
        raise DaneMismatchError(
            f"TLSA {facts.name}: none of {facts.records} records matches the presented chain"
        )


def describe(facts: DaneFacts) -> str:
    """One line for the debug transcript."""
    if facts.problem is not None:
        return f"TLSA {facts.name}: no answer ({facts.problem})"
    trust = "authenticated" if facts.secure else "NOT authenticated"
    if facts.match is None:
        verdict = "no certificate to compare"
    elif facts.match:
        verdict = f"record {facts.matched} matches"
    else:
        verdict = "no match"
    return f"TLSA {facts.name}: {facts.records} records, {trust}, {verdict}"


def match_chain(
    records: Sequence[TLSARecord], handshake: Handshake, names: Sequence[str], now: datetime
) -> TLSARecord | None:
    """The first usable record that matches the handshake's chain, or None."""
    presented = handshake.presented_der
    chains = [presented, handshake.verified_der] if handshake.verified else [presented]
    for record in records:
        if not record.usable or not presented:
            continue
        if record.usage == DANE_EE:
            if matches(record, presented[0]):
                return record
        elif record.usage == DANE_TA:
            if any(
                matches(record, chain[index]) and _chains_to(chain, index, names, now)
                for chain in chains
                for index in range(1, len(chain))
            ):
                return record
        elif handshake.verified:
            verified = handshake.verified_der
            candidates = verified[1:] if record.usage == PKIX_TA else verified[:1]
            if any(matches(record, der) for der in candidates):
                return record
    return None


def matches(record: TLSARecord, certificate_der: bytes) -> bool:
    selected = certificate_der if record.selector == 0 else subject_public_key_info(certificate_der)
    if selected is None:
        return False
    if record.mtype == 1:
        return hashlib.sha256(selected).digest() == record.data
    if record.mtype == 2:
        return hashlib.sha512(selected).digest() == record.data
    return selected == record.data


# ---- DER: the SubjectPublicKeyInfo exactly as the certificate encodes it ----------
# Re-encoding the parsed key (cryptography's public_bytes) could differ from the
# certificate's bytes for unusual keys, and a 3 1 x digest is over the original bytes.


def _header(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, offset of the content, content length) of the DER element at offset."""
    if offset + 2 > len(der):
        raise ValueError("truncated")
    tag, first = der[offset], der[offset + 1]
    offset += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or offset + count > len(der):
            raise ValueError("bad length")
        length = int.from_bytes(der[offset : offset + count], "big")
        offset += count
    if offset + length > len(der):
        raise ValueError("truncated")
    return tag, offset, length


_SEQUENCE = 0x30
_VERSION = 0xA0  # [0] EXPLICIT Version


def subject_public_key_info(certificate_der: bytes) -> bytes | None:
    """Certificate -> tbsCertificate -> its 7th element (RFC 5280 section 4.1), or None
    for bytes that are not shaped like a certificate."""
    try:
        tag, body, _ = _header(certificate_der, 0)
        if tag != _SEQUENCE:
            return None
        tag, offset, _ = _header(certificate_der, body)
        if tag != _SEQUENCE:
            return None
        # version (optional), serialNumber, signature, issuer, validity, subject
        tag, content, length = _header(certificate_der, offset)
        if tag == _VERSION:
            offset = content + length
        for _ in range(5):
            _, content, length = _header(certificate_der, offset)
            offset = content + length
        tag, content, length = _header(certificate_der, offset)
    except ValueError:
        return None
    if tag != _SEQUENCE:
        return None
    return certificate_der[offset : content + length]


# ---- DANE-TA -----------------------------------------------------------------------


def _chains_to(
    chain_der: Sequence[bytes], anchor: int, names: Sequence[str], now: datetime
) -> bool:
    """The leaf chains up to chain_der[anchor] as RFC 7671 asks of a DANE-TA(2) match."""
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der[: anchor + 1]]
    except ValueError:
        return False
    for child, issuer in itertools.pairwise(chain):
        if child.issuer != issuer.subject or not _is_ca(issuer):
            return False
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False
    for cert in chain[:anchor]:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return False
    return any(names_host(chain[0], name) for name in names)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def names_host(cert: x509.Certificate, host: str) -> bool:
    """RFC 6125 matching of the subjectAltName DNS names (no fallback to the CN)."""
    wanted = host.rstrip(".").lower()
    try:
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, ValueError):
        return False
    for name in names:
        name = name.rstrip(".").lower()
        if name == wanted:
            return True
        if name.startswith("*.") and "*" not in name[2:]:
            label, _, rest = wanted.partition(".")
            if label and rest and rest == name[2:]:
                return True
    return False


def utc_now() -> datetime:
    return datetime.now(UTC)
