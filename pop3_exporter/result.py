"""The immutable outcome of one probe: what happened, when, and why it failed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Phase(enum.StrEnum):
    """Steps of a probe, in the order they run."""

    RESOLVE = "resolve"
    CONNECT = "connect"
    TLS = "tls"
    # Waiting for the TLSA answer after the handshake and matching it (dane: require).
    DANE = "dane"
    GREETING = "greeting"
    CAPA = "capa"
    STLS = "stls"
    LOGIN = "login"
    STAT = "stat"
    TOP = "top"
    SMTP_CONNECT = "smtp_connect"
    SMTP_TLS = "smtp_tls"
    SMTP_AUTH = "smtp_auth"
    SMTP_SEND = "smtp_send"
    DELIVERY_WAIT = "delivery_wait"
    QUIT = "quit"


class FailureReason(enum.StrEnum):
    """The fixed set of reasons a probe can fail; each is always exported."""

    DNS_ERROR = "dns_error"
    DNS_TIMEOUT = "dns_timeout"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECT_ERROR = "connect_error"
    CONNECTION_CLOSED = "connection_closed"
    GREETING_TIMEOUT = "greeting_timeout"
    GREETING_ERROR = "greeting_error"
    GREETING_MISMATCH = "greeting_mismatch"
    STLS_UNSUPPORTED = "stls_unsupported"
    TLS_HANDSHAKE_ERROR = "tls_handshake_error"
    TLS_CERT_EXPIRED = "tls_cert_expired"
    TLS_CERT_UNTRUSTED = "tls_cert_untrusted"
    TLS_HOSTNAME_MISMATCH = "tls_hostname_mismatch"
    DANE_MISMATCH = "dane_mismatch"
    DANE_INSECURE = "dane_insecure"
    AUTH_MECHANISM_UNSUPPORTED = "auth_mechanism_unsupported"
    AUTH_FAILED = "auth_failed"
    AUTH_UNAVAILABLE = "auth_unavailable"
    AUTH_SYSTEM_ERROR = "auth_system_error"
    MAILBOX_IN_USE = "mailbox_in_use"
    LOGIN_DELAY = "login_delay"
    MAILBOX_ERROR = "mailbox_error"
    SMTP_CONNECT_ERROR = "smtp_connect_error"
    SMTP_TLS_ERROR = "smtp_tls_error"
    SMTP_AUTH_FAILED = "smtp_auth_failed"
    SMTP_REJECTED = "smtp_rejected"
    SMTP_TEMPORARY_FAILURE = "smtp_temporary_failure"
    DELIVERY_TIMEOUT = "delivery_timeout"
    PROTOCOL_ERROR = "protocol_error"
    TIMEOUT = "timeout"


# The POP3 extension registry of IANA (RFC 2449 section 7 and the RFCs after it). Only
# these names become label values; a server can advertise anything else, and those
# are only counted, so that no server chooses label values or their number.
REGISTERED_CAPABILITIES: tuple[str, ...] = (
    "TOP",
    "USER",
    "SASL",
    "RESP-CODES",
    "LOGIN-DELAY",
    "PIPELINING",
    "EXPIRE",
    "UIDL",
    "IMPLEMENTATION",
    "STLS",
    "UTF8",
    "LANG",
    "AUTH-RESP-CODE",
)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a CAPA reply said, reduced to what the probe uses and reports."""

    # Registered names advertised, in REGISTERED_CAPABILITIES order.
    names: tuple[str, ...]
    # How many distinct other capability names were advertised.
    unregistered: int
    # SASL mechanisms offered (upper case, capped in number and length).
    sasl_mechanisms: tuple[str, ...] = ()
    # LOGIN-DELAY's argument in seconds, when the server gave one.
    login_delay_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class CertFacts:
    """What one presented certificate says about itself."""

    subject: str
    issuer: str
    serial_number: str  # lower-case hex, as blackbox_exporter prints it
    fingerprint_sha256: str  # lower-case hex of the DER encoding
    subject_alternative_names: tuple[str, ...]
    not_before: float  # unix seconds
    not_after: float  # unix seconds
    # "rsa", "ec", "ed25519", "ed448", "dsa", ... or "unknown" (see tlsinfo.key_facts).
    key_algorithm: str
    # Modulus or curve size; None when the key type is not understood.
    key_bits: int | None
    # OpenSSL's name ("sha256WithRSAEncryption"), else the dotted OID.
    signature_algorithm: str


@dataclass(frozen=True, slots=True)
class TLSFacts:
    """What the TLS handshake showed, including when verification failed."""

    verification_enabled: bool
    verified: bool
    # OpenSSL's verify result when the chain was rejected (e.g. "certificate has expired").
    verify_error: str | None
    version: str | None  # "TLS 1.3"
    cipher: str | None
    # Every certificate the server sent, leaf first; empty if the handshake died before.
    presented_chain: tuple[CertFacts, ...]
    # The chain OpenSSL built to a trust anchor; empty unless verified.
    verified_chain: tuple[CertFacts, ...]

    @property
    def earliest_presented_expiry(self) -> float | None:
        return min((cert.not_after for cert in self.presented_chain), default=None)

    @property
    def earliest_verified_expiry(self) -> float | None:
        return min((cert.not_after for cert in self.verified_chain), default=None)


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    """One line of the dialogue; `direction` is "C" (we sent), "S" (server) or "*" (event)."""

    offset_seconds: float
    direction: str
    text: str


@dataclass(frozen=True, slots=True)
class MailboxFacts:
    """What STAT (and TOP 1 0) said about the maildrop after login."""

    messages: int
    size_bytes: int
    # The Date header of message 1 (unix seconds); None when the mailbox is empty, TOP
    # was not asked, or the header is missing, unparsable or far in the future.
    oldest_message_timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class DeliveryFacts:
    """What a delivery round trip found."""

    success: bool
    # From the server accepting the message to the poll that saw it; None if unseen.
    seconds: float | None
    # Earlier probes' messages that arrived after their deadline, found and deleted.
    late_messages: int
    # This exporter's messages (this probe's or late ones) it could not delete.
    cleanup_failures: int


@dataclass(frozen=True, slots=True)
class DaneFacts:
    """What the TLSA records of the target said about the presented chain."""

    name: str  # the TLSA owner name asked, "_995._tcp.mail.example.", or the target
    records: int  # TLSA records in the answer (0 when there was none, or no answer)
    # The resolver set the AD bit: it validated the answer with DNSSEC.
    secure: bool
    # An authenticated, usable record matched; None when no certificate was presented
    # to compare. With several addresses: every address that presented one matched.
    match: bool | None
    # The record that matched ("3 1 1"), for the debug output.
    matched: str | None = None
    # Why no answer could be used: the lookup failed, the target is an IP address.
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class AddressOutcome:
    """How the probe of one address of the name went (module key ip_protocol: all)."""

    address: str
    ip_protocol: int  # 4 or 6
    success: bool
    failure_reason: FailureReason | None
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class AddressesProbed:
    """Every address probed, in the resolver's order, and how many were left out."""

    outcomes: tuple[AddressOutcome, ...]
    resolved: int  # addresses the name had; those past the cap were not probed

    @property
    def skipped(self) -> int:
        return self.resolved - len(self.outcomes)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Everything the probe learned. Built once at the end of a probe, never mutated."""

    target: str
    module_name: str
    timeout_seconds: float
    duration_seconds: float
    success: bool
    failure_reason: FailureReason | None
    failure_detail: str | None
    # The phase that was running when the probe ended (failed or timed out).
    failed_phase: Phase | None
    phase_durations: tuple[tuple[Phase, float], ...]
    dns_lookup_seconds: float | None
    ip_protocol: int | None  # 4 or 6
    address: str | None
    greeting: str | None
    greeting_seconds: float | None
    greeting_match: bool
    # The last CAPA answered (after STLS where used); None if none was.
    capabilities: Capabilities | None
    # None when the module cannot know (implicit TLS never talks in the clear).
    plaintext_auth_exposed: bool | None
    tls: TLSFacts | None
    transcript: tuple[TranscriptLine, ...] = field(default=())
    # None when the module does not log in; else whether the login succeeded.
    login_success: bool | None = None
    mailbox: MailboxFacts | None = None
    delivery: DeliveryFacts | None = None
    # Extra handshakes limited to one legacy version ("TLS 1.0", accepted?), only
    # those that reached an answer; see legacytls.py.
    legacy_tls_versions: tuple[tuple[str, bool], ...] = field(default=())
    # Modules with dane: what the TLSA records said; None when the lookup gave nothing
    # by the end of the probe.
    dane: DaneFacts | None = None
    # Modules with ip_protocol: all; the other fields then describe the worst address.
    addresses: AddressesProbed | None = None
