"""End to end: real Dovecot -> pop3_exporter (three "locations") -> real Prometheus
with deploy/'s multi-location scrape config and rules -> real Alertmanager with
deploy/'s configuration -> a webhook receiver in this test.

Only what a lab has to change is changed in the deploy files: addresses and
ports (all on 127.0.0.1), 1s scrape/evaluation intervals, Alertmanager's
group_wait/group_interval (1s), and every alert's ``for:`` divided by 60
(``tests.support.prom.shorten_rule_durations``). Added, as a user would add
them: a job for the login modules (2s, as a failed login takes Dovecot half a
second) and a backlog threshold for one mailbox (pop3_thresholds.yml).

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
5. Login modules probe a second Dovecot (every login mechanism's test server)
   from all three locations: a good account with two messages, opted in to the
   backlog alert with a threshold of one message (Pop3MailboxBacklog reaches
   /ticket); a wrong password (Pop3LoginFailing pages, naming auth_failed); an
   account whose password backend fails temporarily (Pop3AuthBackendDown
   pages). None of them is Pop3ProbeFailed, Pop3Unreachable or regional.
6. Every Grafana panel query returns at least one series from this Prometheus,
   and the dashboard's variables have values; the "Mail delivery" row, which
   needs a real mail path, is checked by test_e2e_delivery.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_dovecot
from tests.support import prom
from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer, stop_servers
from tests.support.dovecot_auth import TEMPFAIL_PREFIX, AuthDovecotServer, deliver_messages
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
# The login modules' job: a refused login takes Dovecot about 0.5 s, more than a
# 1 s scrape leaves the probe (scrape timeout minus the exporter's 0.5 s offset).
LOGIN_JOB = "pop3_login"
LOGIN_INTERVAL = "2s"
LOGIN_MODULES = ("pop3s_login", "pop3s_wrong_password", "pop3s_auth_backend")
LOGIN_MESSAGES = 2
DELIVERY_ROW = "Mail delivery"


def exporter_config(
    ca_file: Path, *, wrong_greeting: bool, user: str, password_file: Path, wrong_file: Path
) -> str:
    """Replace the built-in pop3s/pop3_starttls modules with ones that trust the test CA
    (pop3s also asks about legacy TLS, for the dashboard's panel), and add the login
    modules: a good login that looks into the mailbox, a wrong password, and a user
    whose password backend fails temporarily.

    pop3_starttls also reports per address (one, for an IP target) and DANE (no TLSA
    name for an IP target, so no DNS query: zeros), so that those panels have data."""
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
    ip_protocol: all
    dane: check
    tls_config:
      ca_file: '{ca_file}'
  pop3s_login:
    tls: implicit
    tls_config: {{ca_file: '{ca_file}'}}
    auth: {{username: '{user}', password_file: '{password_file}'}}
    mailbox: {{stat: true, oldest_message: true}}
  pop3s_wrong_password:
    tls: implicit
    tls_config: {{ca_file: '{ca_file}'}}
    auth: {{username: '{user}', password_file: '{wrong_file}'}}
  pop3s_auth_backend:
    tls: implicit
    tls_config: {{ca_file: '{ca_file}'}}
    auth: {{username: '{TEMPFAIL_PREFIX}-e2e', password_file: '{wrong_file}'}}
"""


def with_login_job(config: dict[str, Any]) -> dict[str, Any]:
    """The multi-location config with one more probe job: the pop3 job's scraping
    and relabelling, for the login modules from every location."""
    (pop3,) = [j for j in config["scrape_configs"] if j["job_name"] == "pop3"]
    seen: set[str] = set()
    groups = []
    for group in pop3["static_configs"]:
        labels = group["labels"]
        if labels["location"] in seen:
            continue
        seen.add(labels["location"])
        for module in LOGIN_MODULES:
            groups.append(
                {"targets": ["pop.example.com:995"], "labels": {**labels, "module": module}}
            )
    job = {**copy.deepcopy(pop3), "job_name": LOGIN_JOB, "static_configs": groups}
    return {**config, "scrape_configs": [*config["scrape_configs"], job]}


def backlog_override(instance: str) -> dict[str, Any]:
    """Opt the good login's mailbox in to Pop3MailboxBacklog (pop3_thresholds.yml)."""
    return {
        "groups": [
            {
                "name": "pop3-thresholds-e2e",
                "rules": [
                    {
                        "record": "pop3:mailbox_backlog_threshold:messages",
                        "expr": "vector(1)",
                        "labels": {"instance": instance, "module": "pop3s_login"},
                    }
                ],
            }
        ]
    }


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
    dovecot_auth: AuthDovecotServer,
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

    auth_pop3s = f"127.0.0.1:{dovecot_auth.pop3s_port}"
    account = dovecot_auth.add_user()
    now = datetime.now(UTC).replace(microsecond=0)
    oldest = now - timedelta(hours=2)
    deliver_messages(account.maildir, [oldest, now - timedelta(hours=1)])
    password_file = tmp_path / "login.password"
    password_file.write_text(account.password + "\n")
    wrong_file = tmp_path / "wrong.password"
    wrong_file.write_text("not-" + account.password + "\n")
    for secret in (password_file, wrong_file):
        secret.chmod(0o600)

    original = load_yaml(PROMETHEUS_CONFIG)
    locations = exporter_locations(original)
    assert len(locations) == 3 and REGIONAL_LOCATION in locations

    exporters: dict[str, ExporterProcess] = {}
    for location in locations:
        config_file = tmp_path / f"exporter-{location}.yml"
        config_file.write_text(
            exporter_config(
                pki.ca_file,
                wrong_greeting=location == REGIONAL_LOCATION,
                user=account.name,
                password_file=password_file,
                wrong_file=wrong_file,
            )
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
        rules.append(dump_yaml(backlog_override(auth_pop3s), tmp_path / "rules" / "backlog.yml"))
        prometheus_config = localize_prometheus_config(
            with_login_job(original),
            addresses={
                address: exporters[location].address for location, address in locations.items()
            },
            targets_by_module={
                "pop3s": [good_pop3s, expired_pop3s],
                "pop3_starttls": [good_starttls],
                **{module: [auth_pop3s] for module in LOGIN_MODULES},
            },
            alertmanager=f"127.0.0.1:{alertmanager.port}",
            rule_files=[str(p) for p in rules],
            interval=INTERVAL,
            scrape_timeout=INTERVAL,
        )
        (login_job,) = [
            j for j in prometheus_config["scrape_configs"] if j["job_name"] == LOGIN_JOB
        ]
        login_job["scrape_interval"] = login_job["scrape_timeout"] = LOGIN_INTERVAL
        prometheus_file = dump_yaml(prometheus_config, tmp_path / "prometheus.yml")
        prometheus = PrometheusServer(tmp_path / "prometheus", prometheus_file, prometheus_binary)
        processes.append(prometheus)
        await asyncio.to_thread(prometheus.start)
        timings["processes started"] = time.monotonic() - began

        async with client_session() as session:
            api = PrometheusAPI(session, prometheus.url)

            async def series_count(expr: str) -> int:
                result = await api.query(expr)
                return int(float(result[0]["value"][1])) if result else 0

            # 3 targets and 3 login modules x 3 locations, every one evaluated by
            # the recording rules.
            async def all_probes_recorded() -> bool:
                return await series_count("count(pop3:probe_success)") == 18

            await wait_until(all_probes_recorded, STARTUP_WITHIN, what="18 probe results")
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

            # --- logins: a wrong password and a failing password backend page,
            # each as itself; an opted-in mailbox that holds mail is a ticket
            _, alert = await webhook.wait_for(
                ALERT_WITHIN,
                path="/page",
                status="firing",
                alertname="Pop3LoginFailing",
                instance=auth_pop3s,
            )
            assert alert["labels"]["module"] == "pop3s_wrong_password"
            assert "(auth_failed; pop3s_wrong_password)" in alert["annotations"]["summary"]
            assert "from 3 of 3 probe location(s)" in alert["annotations"]["description"]
            _, alert = await webhook.wait_for(
                ALERT_WITHIN,
                path="/page",
                status="firing",
                alertname="Pop3AuthBackendDown",
                instance=auth_pop3s,
            )
            assert alert["labels"]["module"] == "pop3s_auth_backend"
            assert "from 3 of 3 probe location(s)" in alert["annotations"]["description"]
            _, alert = await webhook.wait_for(
                ALERT_WITHIN,
                path="/ticket",
                status="firing",
                alertname="Pop3MailboxBacklog",
                instance=auth_pop3s,
            )
            assert alert["labels"]["module"] == "pop3s_login"
            description = alert["annotations"]["description"]
            assert f"holds {LOGIN_MESSAGES} message(s), the oldest dated 2h" in description
            timings["login alerts notified"] = time.monotonic() - began
            assert (
                await series_count('max(probe_pop3_mailbox_messages{module="pop3s_login"})')
                == LOGIN_MESSAGES
            )
            oldest_seen = await api.query(
                'min(probe_pop3_mailbox_oldest_message_timestamp_seconds{module="pop3s_login"})'
            )
            assert float(oldest_seen[0]["value"][1]) == oldest.timestamp()
            assert await series_count('min(probe_pop3_login_success{module="pop3s_login"})') == 1

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
            # Refused logins are not "unreachable", "other" or regional failures;
            # nothing is locked or too frequent, and the mailbox can be opened.
            for name in (
                "Pop3Unreachable",
                "Pop3ProbeFailed",
                "Pop3RegionalFailure",
                "Pop3MailboxInUse",
                "Pop3LoginTooFrequent",
                "Pop3MailboxError",
                "Pop3ProbeScrapeFailing",
            ):
                assert (name, auth_pop3s) not in firing, name
            login_pages = {
                (a["labels"]["alertname"], a["labels"]["module"])
                for a in await api.alerts()
                if a["labels"].get("instance") == auth_pop3s
                and a["labels"]["severity"] == "critical"
                and a["state"] == "firing"
            }
            assert login_pages == {
                ("Pop3LoginFailing", "pop3s_wrong_password"),
                ("Pop3AuthBackendDown", "pop3s_auth_backend"),
            }

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

            # --- every dashboard query returns data from this Prometheus (the
            # delivery row: test_e2e_delivery.py, against a real mail path)
            dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
            assert dashboard_queries(dashboard, only_rows={DELIVERY_ROW})
            empty = []
            queries = dashboard_queries(dashboard, skip_rows={DELIVERY_ROW})
            results: dict[str, list[dict[str, Any]]] = {}
            for title, ref, expr in queries:
                results[title] = await api.query(expr)
                if not results[title]:
                    empty.append(f"{title} [{ref}]: {expr}")
            assert not empty, "panels without data:\n" + "\n".join(empty)
            # Every reason is a series, dns_timeout included.
            assert {r["metric"].get("reason") for r in results["Failures by reason"]} >= {
                "dns_error",
                "dns_timeout",
                "auth_failed",
                "delivery_timeout",
            }
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
