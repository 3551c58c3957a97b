"""End to end for mail delivery: real Postfix -> LMTP -> Dovecot (tests/support/mailpath.py)
-> a pop3_exporter process with a delivery module -> real Prometheus with
deploy/prometheus/prometheus.yml and deploy/'s rules.

test_e2e_alerting.py proves every other dashboard query; this test proves the
"Mail delivery" row's, which need a real round trip, and the delivery rules on real
data:

1. Mail goes round: every query of the row returns a series.
2. Delivery stops (Postfix accepts, cannot deliver): the probes fail with
   delivery_timeout and Pop3MailDeliveryFailing fires, naming the reason, while
   Pop3ProbeFailed, Pop3Unreachable and Pop3LoginFailing stay quiet.
3. Delivery resumes: the queued messages arrive late, the next probes find and
   delete them (the late-messages query counts them) and the alert resolves.

As in test_e2e_alerting.py, only what a lab must change is changed: addresses,
ports, short intervals (a 3s scrape, leaving the round trip 2.5s) and every
``for:`` divided by 60.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import prom
from tests.support.mailpath import MailPath
from tests.support.prom import (
    DASHBOARD,
    DEPLOY,
    ExporterProcess,
    PrometheusAPI,
    PrometheusServer,
    client_session,
    dashboard_queries,
    dump_yaml,
    load_yaml,
    localize_prometheus_config,
    stop_all,
    wait_until,
    write_test_rules,
)

pytestmark = [pytest.mark.prometheus, pytest.mark.mailpath, pytest.mark.slow]

PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
MODULE = "delivery"
SCRAPE_INTERVAL = "3s"
EVALUATION_INTERVAL = "1s"
FOR_FACTOR = 60  # Pop3MailDeliveryFailing: "10m" -> "10s"
STARTUP_WITHIN = 45.0
ALERT_WITHIN = 60.0
DELIVERY_ROW = "Mail delivery"


def exporter_config(mailpath: MailPath, address: str, password_file: Path) -> str:
    ca_file = mailpath.ca_file
    return f"""\
modules:
  {MODULE}:
    tls: implicit
    tls_config: {{ca_file: '{ca_file}'}}
    auth: {{username: '{address}', password_file: '{password_file}'}}
    delivery:
      smtp:
        address: '127.0.0.1:{mailpath.submission_port}'
        tls: starttls
        tls_config: {{ca_file: '{ca_file}'}}
        auth: {{username: '{address}', password_file: '{password_file}'}}
        helo_name: probe.example.test
      from: '{address}'
      to: '{address}'
      poll_interval: 200ms
"""


def prometheus_config(
    exporter: ExporterProcess, target: str, rule_files: list[Path]
) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the delivery module as its only probe."""
    original = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [j for j in original["scrape_configs"] if j["job_name"] == "pop3"]
    job["static_configs"].append({"targets": [target], "labels": {"module": MODULE}})
    (exporter_address,) = {
        r["replacement"] for r in job["relabel_configs"] if r.get("target_label") == "__address__"
    }
    config = localize_prometheus_config(
        original,
        addresses={exporter_address: exporter.address},
        targets_by_module={MODULE: [target]},
        alertmanager="127.0.0.1:9",  # nothing listens: the alerts are read from Prometheus
        rule_files=[str(p) for p in rule_files],
        interval=SCRAPE_INTERVAL,
        scrape_timeout=SCRAPE_INTERVAL,
    )
    config["global"]["evaluation_interval"] = EVALUATION_INTERVAL
    return config


async def test_delivery_panels_have_data_and_a_stuck_queue_pages(
    tmp_path: Path, mailpath: MailPath
) -> None:
    began = time.monotonic()
    timings: dict[str, float] = {}
    user = mailpath.new_user()
    password_file = tmp_path / "loop.password"
    password_file.write_text(user.password + "\n")
    password_file.chmod(0o600)
    config_file = tmp_path / "exporter.yml"
    config_file.write_text(exporter_config(mailpath, user.address, password_file))
    target = f"127.0.0.1:{mailpath.pop3s_port}"

    exporter = ExporterProcess(
        tmp_path / "exporter",
        config_file,
        extra_args=["--state.directory", str(tmp_path / "state")],
    )
    processes: list[prom.ManagedProcess] = [exporter]
    try:
        await asyncio.to_thread(exporter.start)
        rules = write_test_rules(tmp_path / "rules", FOR_FACTOR)
        config = prometheus_config(exporter, target, rules)
        prometheus = PrometheusServer(
            tmp_path / "prometheus", dump_yaml(config, tmp_path / "p.yml")
        )
        processes.append(prometheus)
        await asyncio.to_thread(prometheus.start)

        async with client_session() as session:
            api = PrometheusAPI(session, prometheus.url)

            async def value(expr: str) -> float | None:
                result = await api.query(expr)
                return float(result[0]["value"][1]) if result else None

            async def alert(name: str, state: str) -> dict[str, Any] | None:
                for found in await api.alerts():
                    labels = found["labels"]
                    if (
                        labels["alertname"] == name
                        and labels.get("instance") == target
                        and found["state"] == state
                    ):
                        return found
                return None

            # --- mail goes round
            async def delivered() -> bool:
                return (
                    await value(f'probe_mail_delivery_seconds{{instance="{target}"}}') is not None
                )

            await wait_until(delivered, STARTUP_WITHIN, what="a delivery round trip")
            timings["first round trip recorded"] = time.monotonic() - began
            assert await value(f'probe_mail_delivery_success{{instance="{target}"}}') == 1

            # --- delivery stops: delivery_timeout, and the page
            stopped_at = time.monotonic()
            await asyncio.to_thread(mailpath.stop_delivery)
            failing = await wait_until(
                lambda: alert("Pop3MailDeliveryFailing", "firing"),
                ALERT_WITHIN,
                what="Pop3MailDeliveryFailing firing",
            )
            timings["failing alert after stop"] = time.monotonic() - stopped_at
            assert failing["labels"]["severity"] == "critical"
            assert failing["labels"]["module"] == MODULE
            description = failing["annotations"]["description"]
            assert "from 1 of 1 probe location(s)" in description, description
            assert "Failures: delivery_timeout." in description, description
            assert await value(f'pop3:mail_delivery_failed{{instance="{target}"}}') == 1
            for name in ("Pop3ProbeFailed", "Pop3Unreachable", "Pop3LoginFailing"):
                for state in ("pending", "firing"):
                    assert await alert(name, state) is None, (name, state)

            # --- delivery resumes: the queued messages arrive late, are found and
            # deleted, and the page resolves
            resumed_at = time.monotonic()
            await asyncio.to_thread(mailpath.resume_delivery)

            async def late_found() -> bool:
                late = await value(
                    f'sum(sum_over_time(probe_mail_delivery_late_messages{{instance="{target}"}}[1h]))'
                )
                return late is not None and late > 0

            await wait_until(late_found, ALERT_WITHIN, what="late messages found")

            async def resolved() -> bool:
                return await alert("Pop3MailDeliveryFailing", "firing") is None

            await wait_until(resolved, ALERT_WITHIN, what="Pop3MailDeliveryFailing resolved")
            timings["late found and resolved after resume"] = time.monotonic() - resumed_at

            unhealthy = [
                f"{group['name']}/{rule['name']}: {rule.get('lastError')}"
                for group in await api.rule_groups()
                for rule in group["rules"]
                if rule.get("health") != "ok"
            ]
            assert not unhealthy, unhealthy

            # --- every query of the delivery row returns data
            dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
            queries = dashboard_queries(dashboard, only_rows={DELIVERY_ROW})
            assert len(queries) >= 6
            empty = [
                f"{title} [{ref}]: {expr}"
                for title, ref, expr in queries
                if not await api.query(expr)
            ]
            assert not empty, "delivery panels without data:\n" + "\n".join(empty)
            timings["total"] = time.monotonic() - began
    except AssertionError as exc:
        logs = "\n".join(p.log_tail(25) for p in processes)
        raise AssertionError(f"{exc}\n{logs}\n{mailpath.log_tail(20)}") from None
    finally:
        await asyncio.to_thread(stop_all, processes)

    print(f"\n{len(queries)} delivery panel queries returned data")
    for step, seconds in timings.items():
        print(f"  {step:38s} {seconds:6.1f}s")
