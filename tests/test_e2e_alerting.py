"""End to end: real Dovecot -> pop3_exporter (three "locations") -> real Prometheus
with deploy/'s multi-location scrape config and rules -> real Alertmanager with
deploy/'s configuration -> a webhook receiver in this test.

Only what a lab has to change is changed in the deploy files: addresses and
ports (all on 127.0.0.1), 1s scrape/evaluation intervals, Alertmanager's
group_wait/group_interval (1s), and every alert's ``for:`` divided by 60
(``tests.support.prom.shorten_rule_durations``).

The scenario:

1. Three exporters (eu-west, us-east, ap-southeast) probe three targets: a good
   Dovecot on POP3S and on 110 with STLS, and a Dovecot with an expired
   certificate on POP3S. The ap-southeast exporter expects another greeting
   for pop3_starttls, so that target fails from that location only.
2. The expired certificate pages: Pop3CertificateInvalid reaches /page.
3. The one-location greeting failure is only a ticket: Pop3RegionalFailure
   reaches /ticket, and nothing pages for that target.
4. Stopping the good Dovecot pages Pop3Unreachable (3 of 3 locations);
   starting it again on the same ports sends the resolved notification.
5. Every Grafana panel query returns at least one series from this Prometheus,
   and the dashboard's variables have values.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_dovecot
from tests.support import prom
from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer, stop_servers
from tests.support.prom import (
    DASHBOARD,
    DEPLOY,
    AlertmanagerServer,
    ExporterProcess,
    PrometheusAPI,
    PrometheusServer,
    WebhookReceiver,
    client_session,
    dashboard_queries,
    dump_yaml,
    load_yaml,
    localize_alertmanager_config,
    localize_prometheus_config,
    stop_all,
    wait_until,
    write_test_rules,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.dovecot, pytest.mark.slow]

PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus-multi-location.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
INTERVAL = "1s"
FOR_FACTOR = 60  # "2m" -> "2s", "10m" -> "10s"
# Each wait is bounded; together they keep the test within a few minutes even
# when it fails.
STARTUP_WITHIN = 45.0
ALERT_WITHIN = 45.0
REGIONAL_LOCATION = "ap-southeast"


def exporter_config(ca_file: Path, *, wrong_greeting: bool) -> str:
    """Replace the built-in pop3s/pop3_starttls modules with ones that trust the test CA
    (pop3s also asks about legacy TLS, for the dashboard's panel)."""
    greeting = "\n    expect_greeting: '^\\+OK NotDovecot'" if wrong_greeting else ""
    return f"""\
modules:
  pop3s:
    tls: implicit
    tls_config:
      ca_file: '{ca_file}'
      check_legacy_versions: true
  pop3_starttls:
    tls: starttls{greeting}
    tls_config:
      ca_file: '{ca_file}'
"""


def exporter_locations(config: dict[str, Any]) -> dict[str, str]:
    """{location: exporter address} as written in the multi-location file."""
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pop3_exporter"]
    return {g["labels"]["location"]: g["targets"][0] for g in job["static_configs"]}


@pytest.fixture
def dovecots(pki: TestPKI, dovecot_workroot: Path) -> Iterator[dict[str, DovecotServer]]:
    """Private Dovecots (this test stops and restarts one): good and expired."""
    require_dovecot()
    servers = {
        name: DovecotServer(
            dovecot_workroot / f"e2e-{name}", pki.variants[name], listen=("127.0.0.1",)
        )
        for name in ("good", "expired")
    }
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        stop_servers(servers.values())


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


def restart_on_same_ports(server: DovecotServer) -> None:
    """Start a stopped Dovecot again on its previous ports (the targets must not move)."""
    ports = [server.pop3_port, server.pop3s_port]
    server.start(reuse_ports=True)
    assert [server.pop3_port, server.pop3s_port] == ports


async def test_alerts_fire_and_resolve_through_alertmanager_and_panels_have_data(
    tmp_path: Path,
    pki: TestPKI,
    dovecots: dict[str, DovecotServer],
    webhook: WebhookReceiver,
) -> None:
    began = time.monotonic()
    timings: dict[str, float] = {}
    prometheus_binary = prom.prometheus_binary()
    alertmanager_binary = prom.alertmanager_binary()

    good, expired = dovecots["good"], dovecots["expired"]
    good_pop3s = f"127.0.0.1:{good.pop3s_port}"
    good_starttls = f"127.0.0.1:{good.pop3_port}"
    expired_pop3s = f"127.0.0.1:{expired.pop3s_port}"

    original = load_yaml(PROMETHEUS_CONFIG)
    locations = exporter_locations(original)
    assert len(locations) == 3 and REGIONAL_LOCATION in locations

    exporters: dict[str, ExporterProcess] = {}
    for location in locations:
        config_file = tmp_path / f"exporter-{location}.yml"
        config_file.write_text(
            exporter_config(pki.ca_file, wrong_greeting=location == REGIONAL_LOCATION)
        )
        exporters[location] = ExporterProcess(
            tmp_path / "exporters", config_file, name=f"exporter-{location}"
        )

    alertmanager_file = dump_yaml(
        localize_alertmanager_config(
            load_yaml(ALERTMANAGER_CONFIG),
            webhook_url=webhook.url,
            group_wait="1s",
            group_interval="1s",
        ),
        tmp_path / "alertmanager.yml",
    )
    alertmanager = AlertmanagerServer(
        tmp_path / "alertmanager", alertmanager_file, alertmanager_binary
    )
    processes: list[prom.ManagedProcess] = [*exporters.values(), alertmanager]
    prometheus: PrometheusServer | None = None

    def diagnostics() -> str:
        parts = [p.log_tail(25) for p in processes]
        parts.append(good.log_tail(10))
        parts.append(f"webhook notifications: {len(webhook.notifications)}")
        return "\n".join(parts)

    try:
        for process in processes:
            await asyncio.to_thread(process.start)

        rules = write_test_rules(tmp_path / "rules", FOR_FACTOR)
        prometheus_file = dump_yaml(
            localize_prometheus_config(
                original,
                addresses={
                    address: exporters[location].address for location, address in locations.items()
                },
                targets_by_module={
                    "pop3s": [good_pop3s, expired_pop3s],
                    "pop3_starttls": [good_starttls],
                },
                alertmanager=f"127.0.0.1:{alertmanager.port}",
                rule_files=[str(p) for p in rules],
                interval=INTERVAL,
                scrape_timeout=INTERVAL,
            ),
            tmp_path / "prometheus.yml",
        )
        prometheus = PrometheusServer(tmp_path / "prometheus", prometheus_file, prometheus_binary)
        processes.append(prometheus)
        await asyncio.to_thread(prometheus.start)
        timings["processes started"] = time.monotonic() - began

        async with client_session() as session:
            api = PrometheusAPI(session, prometheus.url)

            async def series_count(expr: str) -> int:
                result = await api.query(expr)
                return int(float(result[0]["value"][1])) if result else 0

            # 3 targets x 3 locations, every one evaluated by the recording rules.
            async def all_probes_recorded() -> bool:
                return await series_count("count(pop3:probe_success)") == 9

            await wait_until(all_probes_recorded, STARTUP_WITHIN, what="9 probe results")
            timings["first probe results"] = time.monotonic() - began
            assert await series_count(f'sum(pop3:probe_success{{instance="{good_pop3s}"}})') == 3

            # --- expired certificate: pages from all three locations
            _, alert = await webhook.wait_for(
                ALERT_WITHIN,
                path="/page",
                status="firing",
                alertname="Pop3CertificateInvalid",
                instance=expired_pop3s,
            )
            timings["certificate alert notified"] = time.monotonic() - began
            assert alert["labels"]["severity"] == "critical"
            assert alert["labels"]["module"] == "pop3s"
            description = alert["annotations"]["description"]
            assert "from 3 of 3 probe location(s)" in description, description
            assert "tls_cert_expired from eu-west" in description, description

            # --- one location sees a wrong greeting: a ticket, not a page
            _, alert = await webhook.wait_for(
                ALERT_WITHIN,
                path="/ticket",
                status="firing",
                alertname="Pop3RegionalFailure",
                instance=good_starttls,
            )
            timings["regional alert notified"] = time.monotonic() - began
            assert alert["labels"]["location"] == REGIONAL_LOCATION
            assert "greeting_mismatch" in alert["annotations"]["description"]
            assert not webhook.matching(path="/page", instance=good_starttls)
            assert not webhook.matching(instance=good_pop3s)

            # --- Dovecot down: Pop3Unreachable pages for both of its targets
            stopped_at = time.monotonic()
            await asyncio.to_thread(good.stop)
            for instance in (good_pop3s, good_starttls):
                _, alert = await webhook.wait_for(
                    ALERT_WITHIN,
                    path="/page",
                    status="firing",
                    since=stopped_at,
                    alertname="Pop3Unreachable",
                    instance=instance,
                )
                assert alert["labels"]["cause"] == "connect"
                description = alert["annotations"]["description"]
                assert "from 3 of 3 probe location(s)" in description, description
                assert "connect_refused" in description, description
            timings["down alert notified after stop"] = time.monotonic() - stopped_at

            # --- Dovecot back on the same ports: resolved notification
            started_at = time.monotonic()
            await asyncio.to_thread(restart_on_same_ports, good)
            _, alert = await webhook.wait_for(
                ALERT_WITHIN,
                path="/page",
                status="resolved",
                since=started_at,
                alertname="Pop3Unreachable",
                instance=good_pop3s,
            )
            timings["resolved notified after start"] = time.monotonic() - started_at

            async def good_target_up() -> bool:
                return (
                    await series_count(f'sum(pop3:probe_success{{instance="{good_pop3s}"}})') == 3
                )

            await wait_until(good_target_up, ALERT_WITHIN, what="the good target up again")

            # Nothing that should stay quiet has fired.
            firing = {
                (a["labels"]["alertname"], a["labels"].get("instance"))
                for a in await api.alerts()
                if a["state"] == "firing"
            }
            assert not {a for a in firing if a[0].startswith("Pop3CertificateExpiring")}
            assert ("Pop3CertificateInvalid", expired_pop3s) in firing
            assert ("Pop3Unreachable", good_pop3s) not in firing
            assert not {a for a in firing if a[0] in ("Pop3ExporterDown", "Pop3ProbesAbsent")}

            # Dovecot's stock TLS 1.2 minimum, and P-256 keys: no TLS hygiene alert.
            # Both pop3s targets x both versions x every location answer "refused"
            # (a probe whose deadline leaves no time has none: hence waiting).
            async def legacy_refused_everywhere() -> bool:
                refused = await series_count("count(probe_tls_legacy_version_accepted == 0)")
                return refused == 2 * 2 * len(locations)

            await wait_until(legacy_refused_everywhere, ALERT_WITHIN, what="legacy TLS answers")
            assert not {
                a for a in firing if a[0] in ("Pop3LegacyTLSAccepted", "Pop3WeakCertificateKey")
            }

            # Every rule evaluated without error on real data (matching errors such
            # as many-to-many only show up at run time).
            unhealthy = [
                f"{group['name']}/{rule['name']}: {rule.get('lastError')}"
                for group in await api.rule_groups()
                for rule in group["rules"]
                if rule.get("health") != "ok"
            ]
            assert not unhealthy, unhealthy

            # --- every dashboard query returns data from this Prometheus
            dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
            empty = []
            queries = dashboard_queries(dashboard)
            for title, ref, expr in queries:
                if not await api.query(expr):
                    empty.append(f"{title} [{ref}]: {expr}")
            assert not empty, "panels without data:\n" + "\n".join(empty)
            for label in ("instance", "module", "location"):
                values = await api.label_values(label, match="probe_pop3_failure")
                assert values, f"dashboard variable for {label} would be empty"
            timings["dashboard queries checked"] = time.monotonic() - began
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnostics()}") from None
    finally:
        await asyncio.to_thread(stop_all, processes)

    timings["total"] = time.monotonic() - began
    print(
        f"\n{prom.binary_version(prometheus_binary)}\n{prom.binary_version(alertmanager_binary)}"
        f"\n{len(queries)} dashboard queries returned data"
    )
    for step, seconds in timings.items():
        print(f"  {step:34s} {seconds:6.1f}s")
