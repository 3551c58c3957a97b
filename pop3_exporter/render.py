"""The /probe reply body: a fast renderer of the probe's gauge families that writes the
bytes prometheus_client's encoders would, used only after it proved so at start.

Building a CollectorRegistry and prometheus_client's metric objects for every probe
costs more than the rest of a plain probe, so /probe renders ProbeCollector's light
families itself. The format is prometheus_client's to define, though: a ProbeRenderer
renders canned families both ways when it is made (once per application) and falls
back to prometheus_client for good if a single byte differs.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pop3_exporter.config import TLSMode
from pop3_exporter.logs import fields
from pop3_exporter.metrics import ProbeCollector, ProbeFamily, probe_registry
from pop3_exporter.result import (
    AddressesProbed,
    AddressOutcome,
    Capabilities,
    CertFacts,
    DaneFacts,
    DeliveryFacts,
    FailureReason,
    MailboxFacts,
    Phase,
    ProbeResult,
    TLSFacts,
)

logger = logging.getLogger("pop3_exporter")

# (families, open_metrics) -> exposition bytes; open_metrics False is the text format.
FastRender = Callable[[Iterable[ProbeFamily], bool], bytes]

# The Accept headers the self-check renders for: the two formats with each escaping the
# fast renderer stands in for, and what Prometheus 2.x and 3.x send.
SELF_CHECK_ACCEPT_HEADERS = (
    "",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=0.0.1",
    "application/openmetrics-text;version=1.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=underscores",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
)


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


_go_float = cast(Callable[[float], str], floatToGoString)


def _value_text(value: float) -> str:
    """floatToGoString(value), with the two values most samples have made cheap."""
    if value == 1.0:
        return "1.0"
    if value == 0.0 and math.copysign(1.0, value) > 0:
        return "0.0"
    return _go_float(value)


@functools.lru_cache(maxsize=256)
def _family_header(name: str, documentation: str, open_metrics: bool) -> str:
    help_text = documentation.replace("\\", r"\\").replace("\n", r"\n")
    if open_metrics:
        help_text = help_text.replace('"', r"\"")
    return f"# HELP {name} {help_text}\n# TYPE {name} gauge\n"


def render_families(families: Iterable[ProbeFamily], open_metrics: bool) -> bytes:
    """The exposition of gauge families, byte for byte as prometheus_client writes it
    (generate_latest, or OpenMetrics' with the underscores or allow-utf-8 escaping),
    for legacy-valid metric and label names."""
    output: list[str] = []
    append = output.append
    for family in families:
        name = family.name
        append(_family_header(name, family.documentation, open_metrics))
        label_names = family.labels
        if not label_names:
            for _, value in family.samples:
                append(f"{name} {_value_text(value)}\n")
        elif len(label_names) == 1:
            prefix = f'{name}{{{label_names[0]}="'
            for labels, value in family.samples:
                append(f'{prefix}{_escape_label_value(labels[0])}"}} {_value_text(value)}\n')
        else:
            # Both encoders write labels sorted by name.
            order = sorted(range(len(label_names)), key=label_names.__getitem__)
            for labels, value in family.samples:
                label_text = ",".join(
                    f'{label_names[i]}="{_escape_label_value(labels[i])}"' for i in order
                )
                append(f"{name}{{{label_text}}} {_value_text(value)}\n")
    if open_metrics:
        append("# EOF\n")
    return "".join(output).encode("utf-8")


_FAST_ESCAPINGS = frozenset({openmetrics_exposition.UNDERSCORES, openmetrics_exposition.ALLOWUTF8})


@functools.lru_cache(maxsize=64)
def _choose_encoder(
    accept_header: str,
) -> tuple[Callable[..., bytes], str, bool | None, object]:
    """choose_encoder(), plus whether the fast renderer can stand in for the encoder
    (False for the text format, True for OpenMetrics, None when only the real encoder
    will do) and the encoder's _encoder_key()."""
    encoder, content_type = choose_encoder(accept_header)
    fast: bool | None = None
    if encoder is generate_latest:
        fast = False
    elif (
        isinstance(encoder, functools.partial)
        and not encoder.args
        and set(encoder.keywords) <= {"escaping", "version"}
        and encoder.keywords.get("escaping", openmetrics_exposition.UNDERSCORES) in _FAST_ESCAPINGS
    ):
        if encoder.func is generate_latest:
            fast = False
        elif encoder.func is openmetrics_exposition.generate_latest:
            fast = True
    return encoder, content_type, fast, _encoder_key(encoder)


def _encoder_key(encoder: Callable[..., bytes]) -> object:
    """Equal for encoders that write the same: several Accept headers pick one encoder,
    as a new functools.partial each time."""
    if isinstance(encoder, functools.partial):
        return (encoder.func, encoder.args, tuple(sorted(encoder.keywords.items())))
    return encoder


class _FamiliesCollector(Collector):
    def __init__(self, families: Sequence[ProbeFamily]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.to_metric()


def _reference(families: Sequence[ProbeFamily], encoder: Callable[..., bytes]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FamiliesCollector(families))
    return encoder(registry)


def canned_families() -> list[list[ProbeFamily]]:
    """Family lists for the self-check: ProbeCollector's for a few rich results, and
    one with what results cannot hold today (a newline in a label, a HELP needing
    escapes) in case a later change lets it through."""
    expiry = 1.7999e9
    leaf = CertFacts(
        subject='CN=pop.example.com,O=Back\\slash "Quoted" Örg €',
        issuer="CN=Test CA \\\\ ∑,O=Tëst",
        serial_number="1a2b3c",
        fingerprint_sha256="ab" * 32,
        subject_alternative_names=("pop.example.com", "*.example.com", 'we"ird\\name'),
        not_before=0.0,
        not_after=expiry,
        key_algorithm='EC "P-256"',
        key_bits=256,
        signature_algorithm="ecdsa-with-SHA256 \\ Ω",
    )
    ca = CertFacts(
        "CN=Test CA", "CN=Test CA", "01", "cd" * 32, (), -0.0, 4.1e9, "RSA", 4096, "sha256"
    )
    anonymous = CertFacts("", "", "00", "ef" * 32, (), 1e-7, 1e300, "Ed25519", None, "")
    success = ProbeResult(
        target="pop.example.com:110",
        module_name="pop3_starttls",
        timeout_seconds=math.inf,
        duration_seconds=0.012345678901234,
        success=True,
        failure_reason=None,
        failure_detail=None,
        failed_phase=None,
        phase_durations=(
            (Phase.RESOLVE, -0.0),
            (Phase.CONNECT, 1e-7),
            (Phase.GREETING, 1234567.0),
            (Phase.CAPA, 1e21),
            (Phase.STLS, 0.1),
            (Phase.TLS, math.nan),
            (Phase.QUIT, 5e-324),
        ),
        dns_lookup_seconds=2.5e-05,
        ip_protocol=6,
        address="::1",
        greeting="+OK ready",
        greeting_seconds=-math.inf,
        greeting_match=True,
        capabilities=Capabilities(
            names=("TOP", "UIDL", "SASL", "LOGIN-DELAY"),
            unregistered=3,
            sasl_mechanisms=("PLAIN",),
            login_delay_seconds=900,
        ),
        plaintext_auth_exposed=True,
        tls=TLSFacts(
            verification_enabled=True,
            verified=True,
            verify_error=None,
            version="TLS 1.3",
            cipher='TLS_AES_256_GCM_SHA384 "x\\y"',
            presented_chain=(leaf, ca, anonymous),
            verified_chain=(leaf, ca),
        ),
        login_success=True,
        mailbox=MailboxFacts(messages=3, size_bytes=12345, oldest_message_timestamp=1.7e9),
        delivery=DeliveryFacts(success=True, seconds=1.25, late_messages=0, cleanup_failures=2),
        legacy_tls_versions=(("TLS 1.0", False), ('TLS 1.1 "legacy"', True)),
        dane=DaneFacts("_110._tcp.pop.example.com.", 2, True, True, "3 1 1"),
        addresses=AddressesProbed(
            outcomes=(
                AddressOutcome("::1", 6, True, None, 0.01),
                AddressOutcome("127.0.0.1", 4, False, FailureReason.CONNECT_REFUSED, math.nan),
            ),
            resolved=5,
        ),
    )
    expired = ProbeResult(
        target="pop3s://mail.example.org",
        module_name="pop3s",
        timeout_seconds=9.5,
        duration_seconds=math.nan,
        success=False,
        failure_reason=FailureReason.TLS_CERT_EXPIRED,
        failure_detail="certificate has expired",
        failed_phase=Phase.TLS,
        phase_durations=((Phase.RESOLVE, 0.001), (Phase.CONNECT, 0.002), (Phase.TLS, 0.5)),
        dns_lookup_seconds=None,
        ip_protocol=4,
        address="127.0.0.1",
        greeting=None,
        greeting_seconds=None,
        greeting_match=False,
        capabilities=None,
        plaintext_auth_exposed=None,
        tls=TLSFacts(True, False, "certificate has expired", "TLS 1.2", None, (leaf,), ()),
        login_success=False,
        delivery=DeliveryFacts(success=False, seconds=None, late_messages=7, cleanup_failures=0),
        dane=DaneFacts("mail.example.org", 0, False, None, problem="SERVFAIL"),
    )
    unresolved = ProbeResult(
        target="nowhere.invalid",
        module_name="pop3",
        timeout_seconds=1.0,
        duration_seconds=0.0,
        success=False,
        failure_reason=FailureReason.DNS_ERROR,
        failure_detail="NXDOMAIN",
        failed_phase=Phase.RESOLVE,
        phase_durations=(),
        dns_lookup_seconds=None,
        ip_protocol=None,
        address=None,
        greeting=None,
        greeting_seconds=None,
        greeting_match=False,
        capabilities=None,
        plaintext_auth_exposed=None,
        tls=None,
    )
    # Never exported, hence none of the exporter's name prefixes.
    odd = ProbeFamily(
        "render_self_check",
        'HELP with a back\\slash, a "quote" and a\nnewline',
        labels=["zeta", "alpha", "mid"],
    )
    odd.add_metric(["line\nbreak", 'q"uote', "back\\slash\\\\n"], -1.5e-10)
    odd.add_metric(["", "ünïcødé €∑", "\t tab"], 123456789012345.0)
    return [
        list(ProbeCollector(success, TLSMode.STARTTLS).families()),
        list(ProbeCollector(expired, TLSMode.IMPLICIT).families()),
        list(ProbeCollector(unresolved, TLSMode.NONE).families()),
        [odd, ProbeFamily("render_self_check_empty", "No samples.", labels=["x"])],
    ]


def _first_difference(expected: bytes, got: bytes) -> tuple[int, str, str]:
    """(1-based line number, prometheus_client's line, the fast renderer's line)."""
    want = expected.decode("utf-8", "replace").split("\n")
    have = got.decode("utf-8", "replace").split("\n")
    for number, (line_want, line_have) in enumerate(zip(want, have, strict=False), start=1):
        if line_want != line_have:
            return number, line_want, line_have
    shorter = min(len(want), len(have))
    return shorter + 1, "\n".join(want[shorter:])[:200], "\n".join(have[shorter:])[:200]


class ProbeRenderer:
    """Writes /probe replies. Made once per application: the constructor renders
    canned_families() with `fast` and with prometheus_client's encoders for each of
    SELF_CHECK_ACCEPT_HEADERS, and on any difference (or exception from `fast`) logs
    one warning and uses prometheus_client for every reply from then on."""

    def __init__(self, fast: FastRender = render_families) -> None:
        self._fast = fast
        encoders: dict[object, tuple[str, Callable[..., bytes], bool]] = {}
        for accept in SELF_CHECK_ACCEPT_HEADERS:
            encoder, _, open_metrics, key = _choose_encoder(accept)
            if open_metrics is not None:  # None: served by prometheus_client anyway
                encoders.setdefault(key, (accept, encoder, open_metrics))
        # The encoders the fast renderer may stand in for: those it matched, all or none.
        # One that no header above picks (a new escaping, say) is never stood in for.
        self._verified = frozenset(encoders) if self._self_check(fast, encoders) else frozenset()

    @property
    def fast(self) -> bool:
        """Whether replies come from the fast renderer (the self-check passed)."""
        return bool(self._verified)

    @staticmethod
    def _self_check(
        fast: FastRender, encoders: dict[object, tuple[str, Callable[..., bytes], bool]]
    ) -> bool:
        for families in canned_families():
            for accept, encoder, open_metrics in encoders.values():
                expected = _reference(families, encoder)
                try:
                    got = fast(families, open_metrics)
                except Exception as exc:  # any failure of the fast path means: do not use it
                    logger.warning(
                        "fast /probe renderer failed its self-check; using prometheus_client",
                        extra=fields(accept_header=accept, error=repr(exc)),
                    )
                    return False
                if got != expected:
                    line_number, expected_line, got_line = _first_difference(expected, got)
                    logger.warning(
                        "fast /probe renderer differs from prometheus_client; using"
                        " prometheus_client",
                        extra=fields(
                            accept_header=accept,
                            line_number=line_number,
                            expected_line=expected_line,
                            rendered_line=got_line,
                        ),
                    )
                    return False
        return True

    def render(
        self, result: ProbeResult, tls_mode: TLSMode, accept_header: str
    ) -> tuple[bytes, str]:
        """(body, content type) of a /probe reply: what the encoder choose_encoder()
        picks for `accept_header` makes of probe_registry(result, tls_mode)."""
        encoder, content_type, open_metrics, key = _choose_encoder(accept_header)
        if open_metrics is None or key not in self._verified:
            return encoder(probe_registry(result, tls_mode)), content_type
        return self._fast(ProbeCollector(result, tls_mode).families(), open_metrics), content_type
