"""The `debug=true` report: what the probe did, line by line, as plain text."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from pop3_exporter.config import Module
from pop3_exporter.prober import printable
from pop3_exporter.result import CertFacts, ProbeResult


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_module(module: Module) -> list[str]:
    tls = module.tls_config
    return [
        f"  tls: {module.tls}",
        f"  port: {module.port}",
        f"  timeout: {module.timeout:g}s",
        f"  expect_greeting: {module.expect_greeting.pattern!r}",
        f"  query_capabilities: {str(module.query_capabilities).lower()}",
        f"  preferred_ip_protocol: {module.preferred_ip_protocol}",
        f"  ip_protocol_fallback: {str(module.ip_protocol_fallback).lower()}",
        f"  source_ip_address: {module.source_ip_address or ''}",
        "  tls_config:",
        f"    ca_file: {tls.ca_file or '(system trust store)'}",
        f"    cert_file: {tls.cert_file or ''}",
        f"    key_file: {tls.key_file or ''}",
        f"    server_name: {tls.server_name or '(target host)'}",
        f"    insecure_skip_verify: {str(tls.insecure_skip_verify).lower()}",
        f"    min_version: {tls.min_version}",
        f"    max_version: {tls.max_version or ''}",
    ]


def _cert_lines(index: int, cert: CertFacts) -> list[str]:
    now = time.time()
    days = (cert.not_after - now) / 86400
    return [
        f"  certificate {index}: subject={printable(cert.subject)}",
        f"    issuer={printable(cert.issuer)}",
        f"    not_before={_iso(cert.not_before)} not_after={_iso(cert.not_after)}"
        f" ({days:+.1f} days)",
        f"    serial={cert.serial_number} sha256={cert.fingerprint_sha256}",
        f"    san={printable(','.join(cert.subject_alternative_names))}",
    ]


def debug_report(result: ProbeResult, module: Module, metrics_text: str) -> str:
    started = time.time() - result.duration_seconds
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
            f"  presented chain ({len(tls.presented_chain)} certificates):",
        ]
        for index, cert in enumerate(tls.presented_chain):
            lines += _cert_lines(index, cert)
        if tls.verified_chain:
            lines.append(f"  verified chain ({len(tls.verified_chain)} certificates):")
            for index, cert in enumerate(tls.verified_chain):
                lines += _cert_lines(index, cert)
    lines += ["", f"Module {module.name}:"]
    lines += describe_module(module)
    lines += ["", "Metrics that would have been returned:", metrics_text]
    return "\n".join(lines)
