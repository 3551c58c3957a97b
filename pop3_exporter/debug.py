"""The `debug=true` report: what the probe did, line by line, as plain text."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import yaml

from pop3_exporter.config import Module, module_to_mapping
from pop3_exporter.prober import printable
from pop3_exporter.result import CertFacts, ProbeResult
from pop3_exporter.text import plural


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def module_yaml(module: Module) -> str:
    """The module as a configuration file that defines it: pasted into one (or loaded
    with --config.file), it gives an equal module. Unset keys are left out."""
    document = {"modules": {module.name: module_to_mapping(module)}}
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    notes = []
    if module.uses_tls and module.tls_config.ca_file is None:
        notes.append("# tls_config.ca_file unset: the system trust store verifies the server")
    if module.uses_tls and module.tls_config.server_name is None:
        notes.append("# tls_config.server_name unset: the target's host name is verified")
    return text + "".join(f"{note}\n" for note in notes)


def _cert_lines(index: int, cert: CertFacts, now: float) -> list[str]:
    days = (cert.not_after - now) / 86400
    return [
        f"  certificate {index}: subject={printable(cert.subject)}",
        f"    issuer={printable(cert.issuer)}",
        f"    not_before={_iso(cert.not_before)} not_after={_iso(cert.not_after)}"
        f" ({days:+.1f} days)",
        f"    serial={cert.serial_number} sha256={cert.fingerprint_sha256}",
        f"    san={printable(','.join(cert.subject_alternative_names))}",
    ]


def debug_report(
    result: ProbeResult, module: Module, metrics_text: str, *, finished: float | None = None
) -> str:
    """The report of one probe. ``finished`` is when the probe ended (unix seconds;
    default now): a report rendered later from a kept result (the probe history) gives
    the start time and the days to expiry as they were then."""
    now = time.time() if finished is None else finished
    started = now - result.duration_seconds
    outcome = (
        "success"
        if result.success
        else f"failure: {result.failure_reason} ({printable(result.failure_detail or '')})"
        f" in phase {result.failed_phase or '-'}"
    )
    lines = [
        f"Probe of {result.target} with module {result.module_name}"
        f" started {_iso(started)}, deadline {result.timeout_seconds:.3f}s",
        f"Result: {outcome} after {result.duration_seconds:.6f}s",
        f"Address: {result.address or '-'} (IPv{result.ip_protocol or '?'})",
        "",
        "Transcript (seconds since start; C: sent, S: received, *: event;"
        " secrets sent are shown as ********):",
    ]
    lines += [
        f"  {line.offset_seconds:9.6f} {line.direction}: {line.text}" for line in result.transcript
    ]
    lines += ["", "Phases:"]
    lines += [f"  {phase}: {seconds:.6f}s" for phase, seconds in result.phase_durations]
    if result.login_success is not None:
        lines += ["", f"Login: {'success' if result.login_success else 'failed'}"]
    if result.mailbox is not None:
        oldest = result.mailbox.oldest_message_timestamp
        lines.append(
            f"Mailbox: {result.mailbox.messages} messages, {result.mailbox.size_bytes} octets"
            + (f", message 1 dated {_iso(oldest)}" if oldest is not None else "")
        )
    if result.delivery is not None:
        seen = (
            f"seen {result.delivery.seconds:.3f}s after the SMTP server accepted it"
            if result.delivery.seconds is not None
            else "not seen"
        )
        lines.append(
            f"Delivery: message {seen}; {result.delivery.late_messages} late message(s)"
            f" deleted, {result.delivery.cleanup_failures} cleanup failure(s)"
        )
    lines += ["", "TLS:"]
    tls = result.tls
    if tls is None:
        lines.append("  (no TLS handshake)")
    else:
        verified = "yes" if tls.verified else f"no ({tls.verify_error or 'not verified'})"
        if not tls.verification_enabled:
            verified = "not checked (insecure_skip_verify)"
        lines += [
            f"  version: {tls.version or '-'}",
            f"  cipher: {tls.cipher or '-'}",
            f"  verified: {verified}",
            f"  presented chain ({plural(len(tls.presented_chain), 'certificate')}):",
        ]
        for index, cert in enumerate(tls.presented_chain):
            lines += _cert_lines(index, cert, now)
        if tls.verified_chain:
            lines.append(f"  verified chain ({plural(len(tls.verified_chain), 'certificate')}):")
            for index, cert in enumerate(tls.verified_chain):
                lines += _cert_lines(index, cert, now)
    lines += ["", f"Module {module.name}, as a configuration file:"]
    lines.append(module_yaml(module))
    lines += ["Metrics that would have been returned:", metrics_text]
    return "\n".join(lines)
