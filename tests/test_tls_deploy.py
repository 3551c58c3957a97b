"""The TLS hygiene parts of deploy/ and grafana/ (issue 12): thresholds, alerts and
panels exist, and every probe_tls_* name they use is one the exporter writes.

test_deploy.py checks all rules and panels generically (promtool, PromQL parsing,
layout); test_e2e_alerting.py proves the panels return data from real probes.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pop3_exporter.config import TLSMode, parse_config
from pop3_exporter.metrics import ProbeCollector
from pop3_exporter.result import (
    CertFacts,
    DaneFacts,
    FailureReason,
    Phase,
    ProbeResult,
    TLSFacts,
)
from tests.support.prom import DASHBOARD, REPO, RULES_DIR, dashboard_panels, load_yaml

_METRIC = re.compile(r"\b(probe_tls_[a-z0-9_]+)")


def exported_tls_names() -> set[str]:
    """The probe_tls_* families of a result that has every TLS fact."""
    cert = CertFacts(
        subject="CN=x",
        issuer="CN=y",
        serial_number="1",
        fingerprint_sha256="0" * 64,
        subject_alternative_names=(),
        not_before=0.0,
        not_after=1.0,
        key_algorithm="rsa",
        key_bits=2048,
        signature_algorithm="sha256WithRSAEncryption",
    )
    result = ProbeResult(
        target="pop.test:995",
        module_name="pop3s",
        timeout_seconds=10.0,
        duration_seconds=0.1,
        success=False,
        failure_reason=FailureReason.TLS_CERT_UNTRUSTED,
        failure_detail="x",
        failed_phase=Phase.TLS,
        phase_durations=((Phase.TLS, 0.01),),
        dns_lookup_seconds=None,
        ip_protocol=4,
        address="127.0.0.1",
        greeting=None,
        greeting_seconds=None,
        greeting_match=False,
        capabilities=None,
        plaintext_auth_exposed=None,
        tls=TLSFacts(True, False, "x", "TLS 1.3", "c", (cert,), ()),
        legacy_tls_versions=(("TLS 1.0", False), ("TLS 1.1", True)),
        dane=DaneFacts("_995._tcp.pop.test.", records=1, secure=True, match=False),
    )
    families = ProbeCollector(result, TLSMode.IMPLICIT).families()
    return {family.name for family in families if family.name.startswith("probe_tls_")}


def alert(name: str) -> dict[str, Any]:
    for group in load_yaml(RULES_DIR / "pop3_alerts.yml")["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return dict(rule)
    raise AssertionError(f"no alert {name}")


def test_key_thresholds_are_recording_rules() -> None:
    rules = {
        rule["record"]: rule["expr"]
        for group in load_yaml(RULES_DIR / "pop3_thresholds.yml")["groups"]
        for rule in group["rules"]
    }
    assert rules["pop3:cert_key_rsa_min_threshold:bits"] == "vector(2048)"
    assert rules["pop3:cert_key_ec_min_threshold:bits"] == "vector(256)"
    expr = alert("Pop3WeakCertificateKey")["expr"]
    assert "pop3:cert_key_rsa_min_threshold:bits" in expr
    assert "pop3:cert_key_ec_min_threshold:bits" in expr


def test_hygiene_alerts_are_warnings_on_exported_metrics() -> None:
    exported = exported_tls_names()
    for name, metric in (
        ("Pop3LegacyTLSAccepted", "probe_tls_legacy_version_accepted"),
        ("Pop3WeakCertificateKey", "probe_tls_cert_key_bits"),
    ):
        rule = alert(name)
        assert rule["labels"]["severity"] == "warning"
        assert metric in rule["expr"]
        used = set(_METRIC.findall(rule["expr"] + json.dumps(rule["annotations"])))
        assert used <= exported, used - exported


def test_dashboard_has_chain_timeline_key_and_legacy_panels() -> None:
    panels = dashboard_panels(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}

    def having(*needles: str) -> list[str]:
        return [title for title, expr in exprs.items() if all(n in expr for n in needles)]

    assert having(
        "probe_tls_cert_not_before_timestamp_seconds",
        "probe_tls_cert_not_after_timestamp_seconds",
        "chain_no",
    )
    assert having("probe_tls_cert_key_bits", "key_algorithm", "chain_no")
    assert having("probe_tls_legacy_version_accepted", "version")
    used = {name for expr in exprs.values() for name in _METRIC.findall(expr)}
    assert used <= exported_tls_names(), used - exported_tls_names()


def test_docs_name_every_new_metric_option_and_alert() -> None:
    docs = (REPO / "docs" / "tls.md").read_text(encoding="utf-8")
    # DANE's probe_tls_dane_* are described in dns.md, with the TLSA lookup.
    new_names = exported_tls_names() - {
        "probe_tls_valid",
        "probe_tls_version_info",
        "probe_tls_cipher_info",
        "probe_tls_dane_records",
        "probe_tls_dane_secure",
        "probe_tls_dane_match",
    }
    assert len(new_names) == 6
    for name in (*new_names, "check_legacy_versions", "Pop3WeakCertificateKey"):
        assert f"`{name}`" in docs, name
    assert "`Pop3LegacyTLSAccepted`" in docs
    (example,) = re.findall(r"```yaml\n(.*?)```", docs, re.DOTALL)
    module = parse_config(example, "docs/tls.md").modules["pop3s_audit"]
    assert module.tls_config.check_legacy_versions is True
