"""Turning a ProbeResult into metric families (pure, synchronous, no I/O), and the
exporter's own metrics."""

from __future__ import annotations

import enum
import platform
from collections.abc import Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pop3_exporter import __version__
from pop3_exporter.config import TLSMode
from pop3_exporter.policy import RefusalReason
from pop3_exporter.result import (
    REGISTERED_CAPABILITIES,
    CertFacts,
    FailureReason,
    Phase,
    ProbeResult,
)

MAX_LABEL_LENGTH = 256
MAX_SHORT_LABEL_LENGTH = 64
# Per-certificate series are written for the first this many certificates of the
# presented chain (leaf first); real chains have 2-4. probe_tls_cert_chain_length
# says how many there were, so that a cut chain shows.
MAX_CHAIN_CERTS = 10
_CHAIN_NUMBERS = tuple(str(number) for number in range(MAX_CHAIN_CERTS))
# Enum .value is a descriptor call; these are read for every probe.
_FAILURE_REASONS = tuple((reason, reason.value) for reason in FailureReason)
_PHASE_VALUES = {phase: phase.value for phase in Phase}


def sanitize_label(value: str, max_length: int = MAX_LABEL_LENGTH) -> str:
    """Server-supplied text made safe for a label: printable only, length-capped."""
    if value.isprintable():
        cleaned = value  # the usual case, without a pass over every character
    else:
        cleaned = "".join(ch if ch.isprintable() else "?" for ch in value)
    if len(cleaned) > max_length:
        cleaned = cleaned[: max_length - 3] + "..."
    return cleaned


class ProbeFamily:
    """One gauge family of a probe result, without prometheus_client's per-object cost.

    It has GaugeMetricFamily's constructor and add_metric(); to_metric() makes the real
    GaugeMetricFamily (for registries and the debug page), and render.render_families()
    writes the same bytes as prometheus_client's encoders would, for /probe.
    """

    __slots__ = ("documentation", "labels", "name", "samples")

    def __init__(
        self,
        name: str,
        documentation: str,
        value: float | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        if value is not None and labels:
            raise ValueError("Can only specify at most one of value and labels.")
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels or ())
        self.samples: list[tuple[tuple[str, ...], float]] = []
        if value is not None:
            self.samples.append(((), value))

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((tuple(labels), value))

    def to_metric(self) -> GaugeMetricFamily:
        if not self.labels:
            if not self.samples:
                return GaugeMetricFamily(self.name, self.documentation)
            return GaugeMetricFamily(self.name, self.documentation, value=self.samples[0][1])
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.samples:
            family.add_metric(labels, value)
        return family


class ProbeCollector(Collector):
    """Exposes one ProbeResult. A fresh instance (and registry) serves each /probe request.

    Sample exposition of a successful pop3s probe (abridged):

        probe_success 1.0
        probe_duration_seconds 0.0125
        probe_pop3_greeting_seconds 0.0094
        probe_pop3_duration_seconds{phase="tls"} 0.0081
        probe_pop3_failure{reason="connect_refused"} 0.0
        probe_pop3_capability{capability="UIDL"} 1.0
        probe_pop3_capabilities_unregistered 0.0
        probe_tls_valid 1.0
        probe_ssl_earliest_cert_expiry 1.7999e+09
        probe_tls_version_info{version="TLS 1.3"} 1.0
    """

    def __init__(self, result: ProbeResult, tls_mode: TLSMode) -> None:
        self._result = result
        self._tls_mode = tls_mode

    def collect(self) -> Iterator[Metric]:
        for family in self.families():
            yield family.to_metric()

    def families(self) -> Iterator[ProbeFamily]:
        """The families as light objects; collect() and the /probe renderer both use them."""
        result = self._result
        yield _gauge("probe_success", "Whether the probe succeeded.", float(result.success))
        yield _gauge(
            "probe_duration_seconds",
            "How long the probe took to complete in seconds.",
            result.duration_seconds,
        )
        yield _gauge(
            "probe_timeout_seconds",
            "The deadline this probe ran under in seconds.",
            result.timeout_seconds,
        )
        yield _gauge(
            "probe_dns_lookup_time_seconds",
            "Returns the time taken for probe dns lookup in seconds.",
            result.dns_lookup_seconds or 0.0,
        )
        yield _gauge(
            "probe_ip_protocol",
            "Specifies whether probe ip protocol is IP4 or IP6 (0 before resolution).",
            float(result.ip_protocol or 0),
        )
        if result.greeting_seconds is not None:
            yield _gauge(
                "probe_pop3_greeting_seconds",
                "From the start of the TCP connect to the complete greeting line.",
                result.greeting_seconds,
            )
        yield _gauge(
            "probe_pop3_greeting_match",
            "1 if the greeting is +OK and matches expect_greeting.",
            float(result.greeting_match),
        )
        phases = ProbeFamily(
            "probe_pop3_duration_seconds",
            "Duration of each probe phase reached, in seconds.",
            labels=["phase"],
        )
        for phase, seconds in result.phase_durations:
            phases.add_metric([_PHASE_VALUES[phase]], seconds)
        yield phases
        failure = ProbeFamily(
            "probe_pop3_failure",
            "1 for the reason the probe failed; all 0 on success.",
            labels=["reason"],
        )
        for reason, reason_value in _FAILURE_REASONS:
            failure.add_metric([reason_value], float(reason is result.failure_reason))
        yield failure
        capabilities = result.capabilities
        if capabilities is not None:
            capability = ProbeFamily(
                "probe_pop3_capability",
                "1 for each capability of the IANA POP3 extension registry the server"
                " advertised, 0 for the others (after STLS where used).",
                labels=["capability"],
            )
            for name in REGISTERED_CAPABILITIES:
                capability.add_metric([name], float(name in capabilities.names))
            yield capability
            yield _gauge(
                "probe_pop3_capabilities_unregistered",
                "Number of distinct advertised capabilities outside the IANA registry.",
                float(capabilities.unregistered),
            )
            if capabilities.login_delay_seconds is not None:
                yield _gauge(
                    "probe_pop3_login_delay_seconds",
                    "LOGIN-DELAY advertised in CAPA: the least time between two logins.",
                    float(capabilities.login_delay_seconds),
                )
        if result.login_success is not None:
            yield _gauge(
                "probe_pop3_login_success",
                "1 if the login succeeded (modules with auth only).",
                float(result.login_success),
            )
        mailbox = result.mailbox
        if mailbox is not None:
            yield _gauge(
                "probe_pop3_mailbox_messages",
                "Messages in the maildrop (STAT after login).",
                float(mailbox.messages),
            )
            yield _gauge(
                "probe_pop3_mailbox_size_bytes",
                "Size of the maildrop in octets (STAT after login).",
                float(mailbox.size_bytes),
            )
            if mailbox.oldest_message_timestamp is not None:
                yield _gauge(
                    "probe_pop3_mailbox_oldest_message_timestamp_seconds",
                    "Date header of message 1 (unix time), when there is one.",
                    mailbox.oldest_message_timestamp,
                )
        delivery = result.delivery
        if delivery is not None:
            yield _gauge(
                "probe_mail_delivery_success",
                "1 if the message sent over SMTP was seen over POP3 by the deadline.",
                float(delivery.success),
            )
            if delivery.seconds is not None:
                yield _gauge(
                    "probe_mail_delivery_seconds",
                    "From the SMTP server accepting the message to the poll that saw it.",
                    delivery.seconds,
                )
            yield _gauge(
                "probe_mail_delivery_late_messages",
                "Messages of earlier probes that arrived after their deadline, deleted now.",
                float(delivery.late_messages),
            )
            yield _gauge(
                "probe_mail_delivery_cleanup_failures",
                "Messages of this exporter that it could not delete.",
                float(delivery.cleanup_failures),
            )
        if self._tls_mode is not TLSMode.IMPLICIT and result.plaintext_auth_exposed is not None:
            yield _gauge(
                "probe_pop3_plaintext_auth_exposed",
                "1 if, before TLS, the server offered USER or SASL PLAIN/LOGIN.",
                float(result.plaintext_auth_exposed),
            )
        yield from self._tls_metrics()
        yield from _dane_families(result)
        yield from _address_families(result)

    def _tls_metrics(self) -> Iterator[ProbeFamily]:
        result = self._result
        if result.legacy_tls_versions:
            # Own connections, so also known when the probe's handshake was not reached.
            legacy = ProbeFamily(
                "probe_tls_legacy_version_accepted",
                "1 if an extra handshake limited to this legacy TLS version succeeded,"
                " 0 if the server refused it; absent when unknown.",
                labels=["version"],
            )
            for version, accepted in result.legacy_tls_versions:
                legacy.add_metric(
                    [sanitize_label(version, MAX_SHORT_LABEL_LENGTH)], float(accepted)
                )
            yield legacy
        tls = result.tls
        attempted = any(phase is Phase.TLS for phase, _ in result.phase_durations)
        if not attempted:
            return
        if tls is None or tls.verification_enabled:
            yield _gauge(
                "probe_tls_valid",
                "1 if the chain verified, the name matched and all certificates are in date.",
                float(tls is not None and tls.verified),
            )
        if tls is None:
            return
        earliest = tls.earliest_presented_expiry
        if earliest is not None:
            yield _gauge(
                "probe_ssl_earliest_cert_expiry",
                "Earliest NotAfter (unix time) among the certificates the server presented.",
                earliest,
            )
        verified_expiry = tls.earliest_verified_expiry
        if verified_expiry is not None:
            yield _gauge(
                "probe_ssl_last_chain_expiry_timestamp_seconds",
                "Earliest NotAfter (unix time) of the verified chain.",
                verified_expiry,
            )
        if tls.version is not None:
            yield _info_gauge(
                "probe_tls_version_info", "The TLS version used.", "version", tls.version
            )
        if tls.cipher is not None:
            yield _info_gauge(
                "probe_tls_cipher_info", "The TLS cipher suite used.", "cipher", tls.cipher
            )
        if tls.presented_chain:
            leaf = tls.presented_chain[0]
            chain_info = ProbeFamily(
                "probe_ssl_last_chain_info",
                "Information about the leaf certificate the server presented.",
                labels=[
                    "fingerprint_sha256",
                    "subject",
                    "issuer",
                    "subjectalternative",
                    "serialnumber",
                ],
            )
            chain_info.add_metric(
                [
                    leaf.fingerprint_sha256,
                    sanitize_label(leaf.subject),
                    sanitize_label(leaf.issuer),
                    sanitize_label(",".join(leaf.subject_alternative_names)),
                    leaf.serial_number,
                ],
                1.0,
            )
            yield chain_info
            yield from _chain_metrics(tls.presented_chain)


def _chain_metrics(chain: Sequence[CertFacts]) -> Iterator[ProbeFamily]:
    """Per-certificate series of the presented chain; chain_no (the position, 0 for the
    leaf) keeps every series of a family distinct whatever the certificates say."""
    yield _gauge(
        "probe_tls_cert_chain_length",
        "Number of certificates the server presented; per-certificate series cover"
        f" the first {MAX_CHAIN_CERTS}.",
        float(len(chain)),
    )
    shown = tuple(zip(_CHAIN_NUMBERS, chain, strict=False))
    not_before = ProbeFamily(
        "probe_tls_cert_not_before_timestamp_seconds",
        "NotBefore (unix time) of each presented certificate; chain_no 0 is the leaf.",
        labels=["chain_no"],
    )
    not_after = ProbeFamily(
        "probe_tls_cert_not_after_timestamp_seconds",
        "NotAfter (unix time) of each presented certificate; chain_no 0 is the leaf.",
        labels=["chain_no"],
    )
    key_bits = ProbeFamily(
        "probe_tls_cert_key_bits",
        "Public key size in bits of each presented certificate, by key algorithm.",
        labels=["chain_no", "key_algorithm"],
    )
    info = ProbeFamily(
        "probe_tls_cert_info",
        "Names, serial and signature algorithm of each presented certificate.",
        labels=["chain_no", "subject", "issuer", "serial", "signature_algorithm"],
    )
    for number, cert in shown:
        not_before.add_metric([number], cert.not_before)
        not_after.add_metric([number], cert.not_after)
        if cert.key_bits is not None:
            key_bits.add_metric(
                [number, sanitize_label(cert.key_algorithm, MAX_SHORT_LABEL_LENGTH)],
                float(cert.key_bits),
            )
        info.add_metric(
            [
                number,
                sanitize_label(cert.subject),
                sanitize_label(cert.issuer),
                sanitize_label(cert.serial_number, MAX_SHORT_LABEL_LENGTH),
                sanitize_label(cert.signature_algorithm, MAX_SHORT_LABEL_LENGTH),
            ],
            1.0,
        )
    yield not_before
    yield not_after
    if key_bits.samples:
        yield key_bits
    yield info


def _gauge(name: str, documentation: str, value: float) -> ProbeFamily:
    return ProbeFamily(name, documentation, value=value)


def _info_gauge(name: str, documentation: str, label: str, value: str) -> ProbeFamily:
    family = ProbeFamily(name, documentation, labels=[label])
    family.add_metric([sanitize_label(value, MAX_SHORT_LABEL_LENGTH)], 1.0)
    return family


def _dane_families(result: ProbeResult) -> Iterator[ProbeFamily]:
    """Modules with dane, once the TLSA lookup answered or failed (absent when it had not
    answered by the end of the probe)."""
    dane = result.dane
    if dane is None:
        return
    yield _gauge(
        "probe_tls_dane_records",
        "TLSA records of the target (0 without an answer).",
        float(dane.records),
    )
    yield _gauge(
        "probe_tls_dane_secure",
        "1 if the resolver authenticated the TLSA answer with DNSSEC (the AD bit).",
        float(dane.secure),
    )
    if dane.match is not None:
        yield _gauge(
            "probe_tls_dane_match",
            "1 if an authenticated TLSA record matches the presented certificates"
            " (of every address, with ip_protocol: all).",
            float(dane.match),
        )


_IP_PROTOCOL_LABELS = {4: "ip4", 6: "ip6"}


def _address_families(result: ProbeResult) -> Iterator[ProbeFamily]:
    """Modules with ip_protocol: all: one success and one duration series per address
    probed, and a failure series only for a failing address, with its one reason (all
    reasons for every address would multiply the series by the number of reasons; the
    success series are what alerts watch, the reason is for the reader)."""
    probed = result.addresses
    if probed is None:
        return
    yield _gauge(
        "probe_pop3_addresses_resolved",
        "Distinct A and AAAA addresses the name resolved to.",
        float(probed.resolved),
    )
    yield _gauge(
        "probe_pop3_addresses_skipped",
        "Addresses not probed because the name has more than the per-probe cap.",
        float(probed.skipped),
    )
    labels = ["address", "ip_protocol"]
    success = ProbeFamily(
        "probe_pop3_address_success", "1 if the probe of this address succeeded.", labels=labels
    )
    duration = ProbeFamily(
        "probe_pop3_address_duration_seconds",
        "How long the probe of this address took, in seconds.",
        labels=labels,
    )
    failure = ProbeFamily(
        "probe_pop3_address_failure",
        "1 with the reason the probe of this address failed; absent while it succeeds.",
        labels=[*labels, "reason"],
    )
    for outcome in probed.outcomes:
        address_labels = [outcome.address, _IP_PROTOCOL_LABELS[outcome.ip_protocol]]
        success.add_metric(address_labels, float(outcome.success))
        duration.add_metric(address_labels, outcome.duration_seconds)
        if outcome.failure_reason is not None:
            failure.add_metric([*address_labels, outcome.failure_reason.value], 1.0)
    if success.samples:
        yield success
        yield duration
    if failure.samples:
        yield failure


def probe_registry(result: ProbeResult, tls_mode: TLSMode) -> CollectorRegistry:
    """A fresh registry holding only this probe's result."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProbeCollector(result, tls_mode))
    return registry


class InvalidRequestReason(enum.StrEnum):
    """Why a /probe request was answered HTTP 400: the label values of
    pop3_exporter_probe_requests_invalid_total (a fixed, small set)."""

    UNKNOWN_PARAMETER = "unknown_parameter"
    REPEATED_PARAMETER = "repeated_parameter"
    # Missing, empty or malformed target.
    BAD_TARGET = "bad_target"
    # A well-formed module name that is not configured (a Prometheus job out of step
    # with the exporter's configuration).
    UNKNOWN_MODULE = "unknown_module"
    # Missing or malformed module, or one that does not fit a pop3:// / pop3s:// target.
    BAD_MODULE = "bad_module"
    BAD_DEBUG = "bad_debug"
    BAD_SCRAPE_TIMEOUT = "bad_scrape_timeout"


class ExporterMetrics:
    """The exporter's own metrics, in a registry owned by one application."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        build_info = Gauge(
            "pop3_exporter_build_info",
            "A metric with a constant '1' value labeled by version and python_version.",
            ["version", "python_version"],
            registry=self.registry,
        )
        build_info.labels(__version__, platform.python_version()).set(1)
        self.probes = Counter(
            "pop3_exporter_probes",
            "Probes run, by module and result (success or failure).",
            ["module", "result"],
            registry=self.registry,
        )
        self.probe_duration = Histogram(
            "pop3_exporter_probe_duration_seconds",
            "Duration of probes by module.",
            ["module"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "pop3_exporter_probes_in_flight",
            "Probes currently running.",
            registry=self.registry,
        )
        self.probes_refused = Counter(
            "pop3_exporter_probes_refused",
            "Probe requests refused by the target policy (HTTP 403), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.probes_rejected = Counter(
            "pop3_exporter_probes_rejected",
            "Probe requests turned away unprobed (HTTP 503): too many probes in flight,"
            " or shutting down.",
            ["reason"],
            registry=self.registry,
        )
        self.probe_requests_invalid = Counter(
            "pop3_exporter_probe_requests_invalid",
            "Probe requests answered HTTP 400 (unprobed), by reason.",
            ["reason"],
            registry=self.registry,
        )
        # Exported at 0 from the start, so that alerts on rate() see every series.
        for refusal in RefusalReason:
            self.probes_refused.labels(refusal.value)
        for reason in ("concurrency_limit", "shutting_down"):
            self.probes_rejected.labels(reason)
        for invalid in InvalidRequestReason:
            self.probe_requests_invalid.labels(invalid.value)
        self.reload_success = Gauge(
            "pop3_exporter_config_last_reload_successful",
            "Whether the last configuration reload attempt was successful.",
            registry=self.registry,
        )
        self.reload_timestamp = Gauge(
            "pop3_exporter_config_last_reload_success_timestamp_seconds",
            "Timestamp of the last successful configuration reload.",
            registry=self.registry,
        )

    def record_probe(self, module: str, result: ProbeResult) -> None:
        self.probes.labels(module, "success" if result.success else "failure").inc()
        self.probe_duration.labels(module).observe(result.duration_seconds)
