"""Static validation of deploy/ and grafana/: every file parses, the tools that
own each format accept it, and the pieces agree with each other.

Tools: promtool (check config / check rules / test rules), amtool
(check-config, config routes test), a real Prometheus for the relabelling
and for parsing every dashboard query, systemd-analyze, doveconf and
kubectl kustomize where present. The Prometheus tools are required in CI
(CI=true) and skipped elsewhere when missing; systemd-analyze, doveconf and
kubectl are optional everywhere.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pop3_exporter.config import builtin_modules, parse_config
from pop3_exporter.result import FailureReason
from tests.support import prom
from tests.support.prom import (
    DASHBOARD,
    DEPLOY,
    REPO,
    RULES_DIR,
    PrometheusAPI,
    PrometheusServer,
    client_session,
    dashboard_panels,
    dashboard_queries,
    dump_yaml,
    load_yaml,
    localize_prometheus_config,
)

PROMETHEUS_CONFIGS = (
    DEPLOY / "prometheus" / "prometheus.yml",
    DEPLOY / "prometheus" / "prometheus-multi-location.yml",
    DEPLOY / "docker" / "prometheus.yml",
)
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
RULE_TEST_FILES = sorted((RULES_DIR / "tests").glob("*_test.yml"))
SYSTEMD_UNIT = DEPLOY / "systemd" / "pop3_exporter.service"
K8S_DIR = DEPLOY / "kubernetes"
COMPOSE_DIR = DEPLOY / "docker"
PROVISIONING = REPO / "grafana" / "provisioning"

SEVERITIES = {"warning", "critical"}
DASHBOARD_VARIABLES = {"datasource", "target", "module", "location"}
GRAFANA_BUILTINS = {"$__rate_interval", "$__interval", "$__range"}


def run(args: list[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


def alerting_rules() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    yield path, rule


def all_alert_names() -> set[str]:
    return {rule["alert"] for _, rule in alerting_rules()}


# ---------------------------------------------------------------- plain parsing


def yaml_files() -> list[Path]:
    roots = (DEPLOY, REPO / "grafana")
    return sorted(p for root in roots for p in root.rglob("*") if p.suffix in (".yml", ".yaml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert documents, f"{path} is empty"


def test_expected_files_exist() -> None:
    expected = [
        *PROMETHEUS_CONFIGS,
        ALERTMANAGER_CONFIG,
        SYSTEMD_UNIT,
        DEPLOY / "pop3_exporter.yml",
        COMPOSE_DIR / "Dockerfile",
        COMPOSE_DIR / "docker-compose.yml",
        K8S_DIR / "prometheusrule.yaml",
        K8S_DIR / "probe.yaml",
        DASHBOARD,
    ]
    missing = [str(p.relative_to(REPO)) for p in expected if not p.is_file()]
    assert not missing
    assert len(RULE_FILES) >= 3 and RULE_TEST_FILES


# ---------------------------------------------------------------- rules (static)


def test_every_alert_is_documented_and_debounced() -> None:
    names: list[str] = []
    for path, rule in alerting_rules():
        name = rule["alert"]
        names.append(name)
        where = f"{path.name}: {name}"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, where
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert len(annotations.get(key, "").strip()) > 20, f"{where}: {key} missing or short"
        assert "for" in rule, f"{where}: no for: (a single failed probe must not alert)"
    assert len(names) == len(set(names)), "duplicate alert names"


def test_issue_alert_catalogue_is_complete() -> None:
    """The alerts issue 3 asks for, by the names the docs and Alertmanager use."""
    assert {
        "Pop3Unreachable",
        "Pop3GreetingFailed",
        "Pop3StartTLSMissing",
        "Pop3TLSHandshakeFailed",
        "Pop3CertificateInvalid",
        "Pop3ProbeFailed",
        "Pop3RegionalFailure",
        "Pop3CertificateExpiringSoon",
        "Pop3CertificateExpiringCritical",
        "Pop3GreetingSlow",
        "Pop3PlaintextAuthExposed",
        "Pop3ExporterDown",
        "Pop3ProbeScrapeFailing",
        "Pop3ProbesAbsent",
    } <= all_alert_names()


def test_login_and_delivery_alert_catalogue_is_complete() -> None:
    """The alerts issues 8 (login) and 9 (delivery) ask for."""
    assert {
        "Pop3LoginFailing",
        "Pop3AuthBackendDown",
        "Pop3MailboxBacklog",
        "Pop3MailDeliveryFailing",
        "Pop3MailDeliverySlow",
        "Pop3MailDeliveryLate",
    } <= all_alert_names()


def test_mailbox_backlog_is_opt_in() -> None:
    """No default backlog threshold: an ordinary mailbox never raises Pop3MailboxBacklog.
    The thresholds file only shows, commented out, how to opt a mailbox in."""
    text = (RULES_DIR / "pop3_thresholds.yml").read_text(encoding="utf-8")
    records = {
        rule["record"]
        for group in load_yaml(RULES_DIR / "pop3_thresholds.yml")["groups"]
        for rule in group["rules"]
    }
    assert not {r for r in records if r.startswith("pop3:mailbox_backlog")}
    for record in (
        "pop3:mailbox_backlog_threshold:messages",
        "pop3:mailbox_backlog_threshold:seconds",
    ):
        assert f"# - record: {record}" in text
    (backlog,) = [rule for _, rule in alerting_rules() if rule["alert"] == "Pop3MailboxBacklog"]
    assert "pop3:mailbox_backlog_threshold:messages" in backlog["expr"]
    assert "pop3:mailbox_backlog_threshold:seconds" in backlog["expr"]


def test_thresholds_are_recording_rules_with_the_issue_defaults() -> None:
    rules = {
        rule["record"]: rule["expr"]
        for group in load_yaml(RULES_DIR / "pop3_thresholds.yml")["groups"]
        for rule in group["rules"]
    }
    assert rules["pop3:cert_expiry_warning_threshold:days"] == "vector(21)"
    assert rules["pop3:cert_expiry_critical_threshold:days"] == "vector(7)"
    assert rules["pop3:greeting_slow_threshold_default:seconds"].startswith("vector(")
    assert rules["pop3:mail_delivery_slow_threshold_default:seconds"].startswith("vector(")


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TEST_FILES:
        for test in load_yaml(path)["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = all_alert_names()
    assert not alerts - firing, f"alerts never tested firing: {sorted(alerts - firing)}"
    assert not alerts - quiet, f"alerts never tested staying quiet: {sorted(alerts - quiet)}"
    assert not (firing | quiet) - alerts, "unit tests name alerts that do not exist"


def test_every_failure_reason_has_a_tested_cause() -> None:
    """A new reason must be given its cause on purpose (the alert that pages for it),
    not fall into "other" unnoticed: pop3_causes_test.yml has a row for each."""
    test = load_yaml(RULES_DIR / "tests" / "pop3_causes_test.yml")["tests"][0]
    tested = set()
    for series in test["input_series"]:
        match = re.search(r'reason="([a-z0-9_]+)"', series["series"])
        assert match, series
        tested.add(match.group(1))
    assert tested == {reason.value for reason in FailureReason}


def test_rule_test_files_load_the_deploy_rules() -> None:
    for path in RULE_TEST_FILES:
        files = load_yaml(path)["rule_files"]
        resolved = {(path.parent / f).resolve() for f in files}
        assert {p.resolve() for p in RULE_FILES} <= resolved, path.name


# ---------------------------------------------------------------- promtool / amtool


@pytest.mark.prometheus
@pytest.mark.parametrize("path", PROMETHEUS_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_promtool_check_config(path: Path, tmp_path: Path) -> None:
    config = load_yaml(path)
    if any(str(f).startswith("/") for f in config.get("rule_files", [])):
        # The compose file names the rules by their path inside the container:
        # check a copy that points at deploy/prometheus/rules instead.
        config["rule_files"] = [str(RULES_DIR / "*.yml")]
        path = dump_yaml(config, tmp_path / path.name)
    result = run([prom.promtool_binary(), "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout


@pytest.mark.prometheus
def test_promtool_check_rules() -> None:
    result = run([prom.promtool_binary(), "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.prometheus
def test_promtool_test_rules() -> None:
    result = run(
        [prom.promtool_binary(), "test", "rules", *(p.name for p in RULE_TEST_FILES)],
        cwd=RULES_DIR / "tests",
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("SUCCESS") == len(RULE_TEST_FILES), output


@pytest.mark.prometheus
def test_amtool_check_config() -> None:
    result = run([prom.amtool_binary(), "check-config", str(ALERTMANAGER_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.prometheus
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=Pop3Unreachable", "instance=pop:995"], "pop3-page"),
        (["severity=critical", "alertname=Pop3ProbesAbsent"], "pop3-page"),
        (["severity=warning", "alertname=Pop3GreetingSlow", "instance=pop:995"], "pop3-ticket"),
        (["severity=critical", "alertname=Pop3LoginFailing", "instance=pop:995"], "pop3-page"),
        (
            ["severity=critical", "alertname=Pop3MailDeliveryFailing", "instance=pop:995"],
            "pop3-page",
        ),
        (["severity=warning", "alertname=Pop3MailboxBacklog", "instance=pop:995"], "pop3-ticket"),
        (["severity=warning", "alertname=Pop3MailboxInUse", "instance=pop:995"], "pop3-ticket"),
        (["alertname=SomethingElse"], "pop3-ticket"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    result = run(
        [
            prom.amtool_binary(),
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_CONFIG}",
            *labels,
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_alertmanager_groups_by_target_and_inhibits_known_alerts() -> None:
    config = load_yaml(ALERTMANAGER_CONFIG)
    assert config["route"]["group_by"] == ["instance"]
    alerts = all_alert_names()
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            match = re.fullmatch(r'alertname(=~?)"(.+)"', matcher)
            if match:
                pattern = match.group(2) if match.group(1) == "=~" else re.escape(match.group(2))
                assert any(re.fullmatch(pattern, a) for a in alerts), matcher
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            assert webhook.get("send_resolved") is True


# ---------------------------------------------------------------- scrape configs in Prometheus


def exporter_addresses(config: dict[str, Any]) -> set[str]:
    """Every host:port of the file that Prometheus would connect to."""
    found: set[str] = set()
    for job in config["scrape_configs"]:
        for group in job.get("static_configs", []):
            labels = group.get("labels") or {}
            if "module" not in labels:
                found.update(group["targets"])
            if "__exporter" in labels:
                found.add(labels["__exporter"])
        for relabel in job.get("relabel_configs", []):
            if relabel.get("target_label") == "__address__" and "replacement" in relabel:
                found.add(relabel["replacement"])
    return found


def pop3_targets(config: dict[str, Any]) -> set[str]:
    return {
        t
        for job in config["scrape_configs"]
        for group in job.get("static_configs", [])
        if "module" in (group.get("labels") or {})
        for t in group["targets"]
    }


@pytest.mark.prometheus
@pytest.mark.parametrize("path", PROMETHEUS_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
async def test_relabelling_turns_targets_into_probe_urls(path: Path, tmp_path: Path) -> None:
    """Load the scrape config into a real Prometheus (every address replaced by a
    closed loopback port) and check each probe target's scrape URL and labels."""
    original = load_yaml(path)
    exporters = sorted(exporter_addresses(original))
    targets = sorted(pop3_targets(original))
    # Distinct loopback addresses stand in for the exporters (port 9: nothing listens)
    # and the POP3 servers (documentation ports, never contacted).
    addresses = {a: f"127.0.0.{i + 2}:9" for i, a in enumerate(exporters)}
    addresses.update({t: f"127.0.1.{i + 1}:{1100 + i}" for i, t in enumerate(targets)})
    config = localize_prometheus_config(
        original,
        addresses=addresses,
        targets_by_module=None,
        alertmanager="127.0.0.1:9",
        rule_files=[],
        interval="1h",
        scrape_timeout="1s",
    )
    config_file = dump_yaml(config, tmp_path / "prometheus.yml")
    server = PrometheusServer(tmp_path / "prom", config_file)
    try:
        await asyncio.to_thread(server.start)
        async with client_session() as session:
            api = PrometheusAPI(session, server.url)
            active = await prom.wait_until(api.targets, within=20, what="active targets")
    finally:
        await asyncio.to_thread(server.stop)

    probes = [t for t in active if t["discoveredLabels"].get("__metrics_path__") == "/probe"]
    expected_probes = sum(
        len(g["targets"])
        for job in original["scrape_configs"]
        for g in job.get("static_configs", [])
        if "module" in (g.get("labels") or {})
    )
    assert len(probes) == expected_probes
    reverse = {v: k for k, v in addresses.items()}
    for target in probes:
        url = urllib.parse.urlsplit(target["scrapeUrl"])
        params = urllib.parse.parse_qs(url.query)
        labels = target["labels"]
        assert url.path == "/probe"
        # The exporter is scraped; the POP3 server is a parameter and the instance.
        assert reverse[url.netloc] in exporters
        assert params["target"] == [labels["instance"]]
        assert reverse[labels["instance"]] in targets
        assert params["module"] == [labels["module"]]
        assert not any(k.startswith("__") for k in labels)
        if "multi-location" in path.name:
            assert labels["location"]
            location_exporters = {
                g["labels"]["location"]: g["labels"]["__exporter"]
                for job in original["scrape_configs"]
                for g in job.get("static_configs", [])
                if "__exporter" in (g.get("labels") or {})
            }
            assert reverse[url.netloc] == location_exporters[labels["location"]]
    selfs = [t for t in active if t["labels"]["job"].startswith("pop3_exporter")]
    assert selfs, "no scrape job for the exporter's own /metrics"
    assert all(urllib.parse.urlsplit(t["scrapeUrl"]).path == "/metrics" for t in selfs)
    if "multi-location" in path.name:
        assert len({t["labels"]["location"] for t in selfs}) >= 3


def test_probe_modules_exist_in_the_exporter_configs() -> None:
    """Every module a scrape config or Probe asks for is defined for that exporter."""
    builtins = set(builtin_modules())
    deploy_modules = set(parse_config((DEPLOY / "pop3_exporter.yml").read_text()).modules)
    docker_modules = set(parse_config((COMPOSE_DIR / "pop3_exporter.yml").read_text()).modules)
    assert builtins <= deploy_modules
    for path, available in (
        (DEPLOY / "prometheus" / "prometheus.yml", builtins),
        (DEPLOY / "prometheus" / "prometheus-multi-location.yml", builtins),
        (COMPOSE_DIR / "prometheus.yml", docker_modules),
    ):
        for job in load_yaml(path)["scrape_configs"]:
            for group in job.get("static_configs", []):
                module = (group.get("labels") or {}).get("module")
                assert module is None or module in available, f"{path.name}: {module}"
    configmap = load_yaml(K8S_DIR / "configmap.yaml")
    k8s_modules = set(parse_config(configmap["data"]["pop3_exporter.yml"]).modules)
    for probe in yaml.safe_load_all((K8S_DIR / "probe.yaml").read_text()):
        assert probe["spec"]["module"] in k8s_modules
        assert (
            probe["spec"]["targets"]["staticConfig"]["labels"]["module"]
            == (probe["spec"]["module"])
        )


def test_example_exporter_config_passes_config_check() -> None:
    result = run(
        [
            sys.executable,
            "-m",
            "pop3_exporter",
            "--config.check",
            "--config.file",
            str(DEPLOY / "pop3_exporter.yml"),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- dashboard


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None, "exported with an instance id"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) >= DASHBOARD_VARIABLES
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("target", "module", "location"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["includeAll"] and variable["multi"]
        assert variable["datasource"]["uid"] == "${datasource}"
    # A single exporter has no location label: "All" must then match the empty value.
    assert variables["location"]["allValue"] == ".*"

    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", title
        assert panel.get("description"), title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", title
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            allowed = {v.lstrip("$") for v in GRAFANA_BUILTINS} | DASHBOARD_VARIABLES
            assert used <= allowed, f"{title}: unknown variables {used - allowed}"


def test_dashboard_layout_fits_the_grid_without_overlaps() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_covers_the_issue_topics() -> None:
    """Availability, greeting latency (+ heatmap and percentiles), phases, cert expiry,
    failure reasons, TLS version, capabilities, plaintext auth: each has a panel."""
    panels = dashboard_panels(load_dashboard())
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    types = {p["title"]: p["type"] for p in panels}

    def having(*needles: str) -> list[str]:
        return [t for t, e in exprs.items() if all(n in e for n in needles)]

    assert having("probe_success", "location")
    assert having("avg_over_time(probe_success")
    assert having("probe_pop3_greeting_seconds")
    assert any(types[t] == "heatmap" for t in having("probe_pop3_greeting_seconds"))
    assert having("quantile_over_time(0.95, probe_pop3_greeting_seconds")
    assert having("probe_pop3_duration_seconds", "phase")
    assert having("probe_ssl_last_chain_expiry_timestamp_seconds", "86400")
    assert having("probe_pop3_failure", "== 1")
    assert having("probe_tls_version_info")
    assert having("probe_pop3_capability")
    assert having("probe_pop3_plaintext_auth_exposed")


def test_dashboard_has_login_and_delivery_rows() -> None:
    """Issue 8's "Login and mailbox" row and issue 9's "Mail delivery" row, each with
    its metrics (test_e2e_alerting.py and test_e2e_delivery.py prove they have data)."""
    dashboard = load_dashboard()
    rows = prom.panel_rows(dashboard)
    by_row: dict[str, str] = {}
    for panel in dashboard_panels(dashboard):
        exprs = " ".join(t["expr"] for t in panel["targets"])
        by_row[rows[panel["id"]]] = by_row.get(rows[panel["id"]], "") + " " + exprs
    login = by_row["Login and mailbox"]
    for needle in (
        "probe_pop3_login_success",
        'phase=~"login',
        "probe_pop3_mailbox_messages",
        "probe_pop3_mailbox_size_bytes",
        "time() - min by (instance, module) (probe_pop3_mailbox_oldest_message_timestamp_seconds",
    ):
        assert needle in login, needle
    delivery = by_row["Mail delivery"]
    for needle in (
        "probe_mail_delivery_seconds",
        "avg by (instance, module, location) (avg_over_time(probe_mail_delivery_seconds",
        "probe_mail_delivery_success",
        "probe_mail_delivery_late_messages",
        "probe_mail_delivery_cleanup_failures",
    ):
        assert needle in delivery, needle


def test_panel_rows_follow_the_grid_not_the_array() -> None:
    def panel(pid: int, y: int, x: int = 0, kind: str = "timeseries") -> dict[str, Any]:
        return {"id": pid, "type": kind, "title": f"p{pid}", "gridPos": {"y": y, "x": x}}

    dashboard = {
        "panels": [
            panel(5, 30),  # listed first, placed under row "B"
            {**panel(1, 0, kind="row"), "title": "A"},
            panel(2, 1, 12),
            panel(3, 1, 0),
            {**panel(4, 20, kind="row"), "title": "B"},
            {**panel(6, 40, kind="row"), "title": "C", "panels": [panel(7, 41)]},
        ]
    }
    assert prom.panel_rows(dashboard) == {2: "A", 3: "A", 5: "B", 7: "C"}


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    provider = load_yaml(PROVISIONING / "dashboards" / "pop3_exporter.yml")
    path = provider["providers"][0]["options"]["path"]
    compose = load_yaml(COMPOSE_DIR / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../../grafana/dashboards:{path}:ro" in mounts
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home == f"{path}/{DASHBOARD.name}"
    datasource = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"


@pytest.mark.prometheus
async def test_every_dashboard_query_parses_in_prometheus(tmp_path: Path) -> None:
    """Each panel expression (variables substituted) is valid PromQL for the real
    Prometheus; test_e2e_alerting.py checks that each also returns data."""
    config_file = dump_yaml({"global": {"scrape_interval": "1h"}}, tmp_path / "prometheus.yml")
    server = PrometheusServer(tmp_path / "prom", config_file)
    errors = []
    try:
        await asyncio.to_thread(server.start)
        async with client_session() as session:
            for title, ref, expr in dashboard_queries(load_dashboard()):
                async with session.get(
                    server.url + "/api/v1/query", params={"query": expr}
                ) as response:
                    body = await response.json()
                if body["status"] != "success":
                    errors.append(f"{title} [{ref}]: {body.get('error')}\n  {expr}")
    finally:
        await asyncio.to_thread(server.stop)
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------- Kubernetes


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    generator = K8S_DIR / "gen_prometheusrule.py"
    result = run([sys.executable, str(generator), "--check"])
    assert result.returncode == 0, result.stderr
    rule = load_yaml(K8S_DIR / "prometheusrule.yaml")
    expected = [g for path in RULE_FILES for g in load_yaml(path)["groups"]]
    by_name = {g["name"]: g for g in rule["spec"]["groups"]}
    assert sorted(by_name) == sorted(g["name"] for g in expected)
    for group in expected:
        assert by_name[group["name"]] == group


def test_kubernetes_manifests_fit_together() -> None:
    docs = k8s_documents()
    assert {"Deployment", "Service", "Probe", "PrometheusRule", "ConfigMap"} <= set(docs)
    (deployment,) = docs["Deployment"]
    (service,) = docs["Service"]
    pod = deployment["spec"]["template"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in port_names
    assert port_names[service_port["targetPort"]] == 10110
    # Non-root, read-only, no privileges.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    config_volume = next(v for v in pod["spec"]["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == docs["ConfigMap"][0]["metadata"]["name"]
    config_arg = next(a for a in container["args"] if a.startswith("--config.file="))
    mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume["name"])
    assert config_arg.removeprefix("--config.file=").startswith(mount["mountPath"] + "/")
    namespace = load_yaml(K8S_DIR / "kustomization.yaml")["namespace"]
    for probe in docs["Probe"]:
        prober = probe["spec"]["prober"]
        assert prober["url"] == (
            f"{service['metadata']['name']}.{namespace}.svc:{service_port['port']}"
        )
        assert prober["path"] == "/probe"
    for monitor in docs.get("ServiceMonitor", []):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= (
            service["metadata"]["labels"].items()
        )
        # The job label is the Service name; Pop3ExporterDown matches it.
        assert re.fullmatch(r"pop3[-_]exporter.*", service["metadata"]["name"])


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (optional)")
    result = run([kubectl, "kustomize", str(K8S_DIR)])
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout) if d)
    assert kinds == sorted(k for k, v in k8s_documents().items() for _ in v)


# ---------------------------------------------------------------- Docker


def test_dockerfile_is_non_root_slim_and_installs_the_package() -> None:
    text = (COMPOSE_DIR / "Dockerfile").read_text(encoding="utf-8")
    instructions = [
        line.split(None, 1)
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [args for op, *args in instructions if op == "FROM"]
    assert froms and all("slim" in args[0] for args in froms)
    users = [args[0] for op, *args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ["EXPOSE", "10110"] in [[op, *args] for op, *args in instructions]
    assert "pip install" in text and " ." in text
    for op, *args in instructions:
        if op == "COPY" and not args[0].startswith("--from"):
            *sources, _ = args[0].split()
            for source in sources:
                assert (REPO / source).exists(), source


def test_compose_stack_is_complete_and_its_files_exist() -> None:
    compose = load_yaml(COMPOSE_DIR / "docker-compose.yml")
    services = compose["services"]
    assert {"pop3-exporter", "prometheus", "alertmanager", "grafana", "dovecot-demo"} <= set(
        services
    )
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
        build = service.get("build")
        if build:
            context = COMPOSE_DIR / build["context"]
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
    prometheus_config = load_yaml(COMPOSE_DIR / "prometheus.yml")
    service_names = set(services)
    for address in exporter_addresses(prometheus_config) | pop3_targets(prometheus_config):
        host = address.rsplit(":", 1)[0]
        assert host in service_names | {"localhost"}, address
    assert "../prometheus/rules:/etc/prometheus/rules:ro" in services["prometheus"]["volumes"]


@pytest.mark.dovecot
def test_dovecot_demo_config_is_accepted_by_doveconf(tmp_path: Path) -> None:
    doveconf = prom.find_binary("doveconf")
    if doveconf is None:
        pytest.skip("doveconf not installed")
    from tests.support.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    good = pki.variants["good"]
    users = tmp_path / "users"
    users.write_text("demo:{PLAIN}demo:65534:65534::/nonexistent::\n")
    text = (COMPOSE_DIR / "dovecot-demo" / "dovecot.conf").read_text()
    text = (
        text.replace("/demo-pki/dovecot-demo.crt", str(good.cert_path))
        .replace("/etc/dovecot/private/dovecot-demo.key", str(good.key_path))
        .replace("/etc/dovecot/demo-users", str(users))
    )
    config = tmp_path / "demo.conf"
    config.write_text(text)
    result = run([doveconf, "-n", "-c", str(config)])
    assert result.returncode == 0, result.stderr
    assert "protocols = pop3" in result.stdout


# ---------------------------------------------------------------- systemd


def read_unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(SYSTEMD_UNIT.read_text(encoding="utf-8"))
    return parser


def test_systemd_unit_is_sandboxed() -> None:
    service = read_unit()["Service"]
    required = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictNamespaces": "yes",
        "CapabilityBoundingSet": "",
    }
    for key, value in required.items():
        assert service.get(key) == value, key
    assert "AF_INET6" in service["RestrictAddressFamilies"]
    # ProcSubset=pid would hide /proc/stat and with it every process_* metric.
    assert service.get("ProcSubset") != "pid"
    assert "--web.listen-address=:10110" in service["ExecStart"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (optional)")
    # verify insists that ExecStart exists: point it at this checkout's exporter.
    binary = Path(sys.executable).parent / "pop3_exporter"
    if not os.access(binary, os.X_OK):
        binary = Path("/bin/true")
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(
        SYSTEMD_UNIT.read_text().replace("/opt/pop3_exporter/bin/pop3_exporter", str(binary))
    )
    result = run([analyze, "verify", str(unit)], env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    complaints = [line for line in result.stderr.splitlines() if unit.name in line]
    assert result.returncode == 0 and not complaints, result.stderr
    security = run([analyze, "security", "--offline=true", "--no-pager", str(unit)])
    if security.returncode == 0:
        match = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
        assert match and float(match.group(1)) <= 2.5, security.stdout[-500:]
