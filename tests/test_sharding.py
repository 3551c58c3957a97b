"""Sharding past one Prometheus: deploy/prometheus/sharding/ with real processes.

End to end: a real Dovecot on many loopback addresses (the targets that are up)
and closed loopback ports (the targets that are down) -> one real pop3_exporter
per location of the shard template -> two real Prometheus shards, each
rendered from ``prometheus-shard.tmpl.yml`` with the ``sed`` command of its
header -> a real global Prometheus with ``prometheus-global.yml`` that
federates them and evaluates ``pop3_alerts.yml``.

What the test changes in the deploy files, and nothing else
(``tests.support.prom.localize_prometheus_config``): the exporter and shard
addresses (loopback ports), the Alertmanager address (a closed loopback port:
the alerts are read from the global Prometheus' API), the scrape and evaluation
intervals (1s), and the alerts' ``for:`` (divided by 60, as in
test_e2e_alerting.py). The rule files keep the relative paths of the configs;
their copies sit in ``rules/`` next to each rendered config, as the configs'
headers lay them out. The target file is the test's own, in the format of
``targets/pop3.yml``.

It checks that every target is scraped by exactly one shard (the one Python's
``hashmod`` predicts), is visible exactly once in the global view, and that
Pop3Unreachable, evaluated on the global view from the shards' recorded
quorum, fires for the down targets (its description listing the failure
reason per location, which reaches the global view only through
pop3_shard.yml's renaming) and for none of the up ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_dovecot
from tests.support import prom
from tests.support.certs import TestPKI
from tests.support.dovecot import DovecotServer
from tests.support.prom import (
    DEPLOY,
    REPO,
    RULES_DIR,
    ExporterProcess,
    PrometheusAPI,
    PrometheusServer,
    client_session,
    dump_yaml,
    load_yaml,
    localize_prometheus_config,
    stop_all,
    wait_until,
)

SHARDING = DEPLOY / "prometheus" / "sharding"
SHARD_TEMPLATE = SHARDING / "prometheus-shard.tmpl.yml"
GLOBAL_CONFIG = SHARDING / "prometheus-global.yml"
SHARDING_RULES = SHARDING / "rules"
SHARDING_RULE_FILES = sorted(SHARDING_RULES.glob("*.yml"))
SHARDING_RULE_TESTS = sorted((SHARDING_RULES / "tests").glob("*_test.yml"))
EXAMPLE_TARGETS = SHARDING / "targets" / "pop3.yml"
DOC = REPO / "docs" / "sharding.md"

INTERVAL = "1s"
FOR_FACTOR = 60  # "2m" -> "2s", as in test_e2e_alerting.py
STARTUP_WITHIN = 45.0
ALERT_WITHIN = 45.0
# Dovecot listens on 127.0.0.1 .. 127.0.0.UP_ADDRESSES and ::1.
UP_ADDRESSES = 11
DOWN_PER_SHARD = 2
# The alerts that count failing locations (pop3-availability in pop3_alerts.yml).
QUORUM_ALERTS = frozenset(
    {
        "Pop3Unreachable",
        "Pop3GreetingFailed",
        "Pop3StartTLSMissing",
        "Pop3TLSHandshakeFailed",
        "Pop3CertificateInvalid",
        "Pop3ProbeFailed",
        "Pop3RegionalFailure",
    }
)
SEVERITIES = {"warning", "critical"}

Target = tuple[str, str]  # (instance, module)


# ---------------------------------------------------------------- the deploy files


def sed_expressions(shard: int, shards: int) -> list[str]:
    """The ``sed`` arguments of the template's header, for this shard."""
    return ["-e", f"s/[$]{{SHARD}}/{shard}/g", "-e", f"s/[$]{{SHARDS}}/{shards}/g"]


def render_shard_text(shard: int, shards: int) -> str:
    """prometheus-shard.tmpl.yml for one shard, rendered by ``sed`` as documented."""
    completed = subprocess.run(
        ["sed", *sed_expressions(shard, shards), str(SHARD_TEMPLATE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "${" not in completed.stdout, "a placeholder is left after sed"
    return completed.stdout


def render_shard_config(shard: int, shards: int) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(render_shard_text(shard, shards))
    return config


def hashmod(value: str, modulus: int) -> int:
    """Prometheus' ``hashmod``: the last 8 bytes of the MD5 of the value, modulo."""
    digest = hashlib.md5(value.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[8:], "big") % modulus


def rule_source(entry: str) -> Path:
    """The deploy file behind a config's ``rules/NAME`` entry."""
    name = Path(entry).name
    for directory in (RULES_DIR, SHARDING_RULES):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no rule file {name} in deploy/")


def install(
    directory: Path,
    config: Mapping[str, Any] | str,
    *,
    for_factor: float | None = None,
    targets: Iterable[Mapping[str, Any]] | None = None,
) -> Path:
    """Lay a config (a mapping, or YAML text written as it is) out as its header
    describes: prometheus.yml, rules/ beside it (copies, ``for:`` shortened when
    asked) and targets/pop3.yml when given."""
    parsed = yaml.safe_load(config) if isinstance(config, str) else config
    rules = directory / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    for entry in parsed.get("rule_files", []):
        source = rule_source(entry)
        if for_factor is None:
            shutil.copyfile(source, rules / source.name)
        else:
            shortened = prom.shorten_rule_durations(load_yaml(source), for_factor)
            dump_yaml(shortened, rules / source.name)
    if targets is not None:
        (directory / "targets").mkdir(exist_ok=True)
        dump_yaml(list(targets), directory / "targets" / "pop3.yml")
    path = directory / "prometheus.yml"
    if isinstance(config, str):
        path.write_text(config, encoding="utf-8")
        return path
    return dump_yaml(dict(config), path)


def exporter_locations(config: Mapping[str, Any]) -> dict[str, str]:
    """{location: exporter address} of the shard template's pop3_exporter job."""
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pop3_exporter"]
    return {g["labels"]["location"]: g["targets"][0] for g in job["static_configs"]}


def probe_jobs(config: Mapping[str, Any]) -> dict[str, str]:
    """{job name: location} of the shard template's probe jobs."""
    jobs = {}
    for job in config["scrape_configs"]:
        if job.get("metrics_path") == "/probe":
            (location,) = [
                r["replacement"]
                for r in job["relabel_configs"]
                if r.get("target_label") == "location"
            ]
            jobs[job["job_name"]] = location
    return jobs


def shard_addresses(config: Mapping[str, Any]) -> list[str]:
    """The shard addresses of the global config's federate job, shard 0 first."""
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "federate"]
    (group,) = job["static_configs"]
    return list(group["targets"])


def sharding_alerts() -> Iterator[dict[str, Any]]:
    for path in SHARDING_RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    yield rule


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


# ---------------------------------------------------------------- static checks


def test_template_header_and_doc_show_the_sed_command_the_tests_use() -> None:
    _, first, _, second = sed_expressions(1, 2)
    command = f"sed -e '{first}' -e '{second}' prometheus-shard.tmpl.yml"
    assert command in SHARD_TEMPLATE.read_text(encoding="utf-8")
    assert command in DOC.read_text(encoding="utf-8")


def test_every_probe_job_shards_on_the_target_before_anything_else() -> None:
    """All jobs of every rendered shard share the same two first relabelling rules,
    hashing __address__ as discovered (the POP3 target, not the exporter)."""
    for shards in (2, 3):
        for shard in range(shards):
            config = render_shard_config(shard, shards)
            assert config["global"]["external_labels"] == {"shard": str(shard)}
            for job in config["scrape_configs"]:
                hash_rule, keep_rule = job["relabel_configs"][:2]
                assert hash_rule == {
                    "source_labels": ["__address__"],
                    "modulus": shards,
                    "target_label": "__tmp_shard",
                    "action": "hashmod",
                }, job["job_name"]
                assert keep_rule == {
                    "source_labels": ["__tmp_shard"],
                    "regex": str(shard),
                    "action": "keep",
                }, job["job_name"]


def test_sharding_alerts_follow_the_rule_conventions() -> None:
    names = []
    for rule in sharding_alerts():
        names.append(rule["alert"])
        assert rule["alert"].startswith("Pop3")
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert len(rule["annotations"].get(key, "").strip()) > 20, (rule["alert"], key)
        assert "for" in rule, rule["alert"]
    assert len(names) == len(set(names)) >= 3
    assert not set(names) & {
        r["alert"]
        for g in load_yaml(RULES_DIR / "pop3_alerts.yml")["groups"]
        for r in g["rules"]
        if "alert" in r
    }


@pytest.mark.prometheus
@pytest.mark.parametrize(("shard", "shards"), [(0, 2), (1, 2), (2, 3)])
def test_promtool_accepts_a_rendered_shard(shard: int, shards: int, tmp_path: Path) -> None:
    text = render_shard_text(shard, shards)
    config = yaml.safe_load(text)
    path = install(tmp_path, text, targets=load_yaml(EXAMPLE_TARGETS))
    result = run([prom.promtool_binary(), "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(config['rule_files'])} rule files found" in result.stdout
    # The shards record and never alert: no alerting rules, no Alertmanager.
    assert "alerting" not in config
    for entry in config["rule_files"]:
        for group in load_yaml(rule_source(entry))["groups"]:
            assert all("record" in r for r in group["rules"]), entry


@pytest.mark.prometheus
def test_promtool_accepts_the_global_config(tmp_path: Path) -> None:
    # The unchanged file, next to its rules as installed.
    text = GLOBAL_CONFIG.read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    path = install(tmp_path, text)
    result = run([prom.promtool_binary(), "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(config['rule_files'])} rule files found" in result.stdout
    names = {Path(entry).name for entry in config["rule_files"]}
    # The global view alerts; recording again what the shards record would
    # write a second copy of the federated series.
    assert "pop3_alerts.yml" in names and "pop3_recording.yml" not in names


@pytest.mark.prometheus
def test_promtool_checks_and_unit_tests_the_sharding_rules() -> None:
    result = run([prom.promtool_binary(), "check", "rules", *map(str, SHARDING_RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(
        [prom.promtool_binary(), "test", "rules", *(p.name for p in SHARDING_RULE_TESTS)],
        cwd=SHARDING_RULES / "tests",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("SUCCESS") == len(SHARDING_RULE_TESTS) >= 2, output


def test_every_sharding_alert_has_firing_and_quiet_unit_tests() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in SHARDING_RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in sharding_alerts()}
    assert alerts <= firing and alerts <= quiet, (alerts - firing, alerts - quiet)


# ---------------------------------------------------------------- end to end


def exporter_config(ca_file: Path) -> str:
    """The built-in TLS modules, trusting the test CA (as in test_e2e_alerting.py)."""
    return f"""\
modules:
  pop3s:
    tls: implicit
    tls_config:
      ca_file: '{ca_file}'
  pop3_starttls:
    tls: starttls
    tls_config:
      ca_file: '{ca_file}'
"""


def up_targets(server: DovecotServer) -> list[Target]:
    """Distinct (instance, module) pairs that the running Dovecot answers."""
    plain, implicit = server.pop3_port, server.pop3s_port
    addresses = [f"127.0.0.{i}" for i in range(1, UP_ADDRESSES + 1)]
    targets = [(f"{a}:{plain}", "pop3") for a in addresses]
    targets.append((f"[::1]:{plain}", "pop3"))
    # The certificate names 127.0.0.1 and ::1 only: the verifying modules there.
    for host in ("127.0.0.1", "[::1]"):
        targets.append((f"{host}:{implicit}", "pop3s"))
        targets.append((f"{host}:{plain}", "pop3_starttls"))
    return targets


def down_targets(shards: int) -> list[Target]:
    """Closed loopback ports (connection refused), DOWN_PER_SHARD for each shard."""
    chosen: dict[int, list[Target]] = {k: [] for k in range(shards)}
    for i in range(200):
        host = f"127.0.0.{100 + i}"
        instance = f"{host}:{prom.free_port(host)}"
        bucket = chosen[hashmod(instance, shards)]
        if len(bucket) < DOWN_PER_SHARD:
            bucket.append((instance, "pop3"))
        if all(len(b) == DOWN_PER_SHARD for b in chosen.values()):
            return [t for b in chosen.values() for t in b]
    raise AssertionError("could not find closed ports for every shard")


def file_sd_groups(targets: Iterable[Target]) -> list[dict[str, Any]]:
    by_module: dict[str, list[str]] = {}
    for instance, module in targets:
        by_module.setdefault(module, []).append(instance)
    return [{"targets": t, "labels": {"module": m}} for m, t in sorted(by_module.items())]


@pytest.fixture
def dovecot_many(pki: TestPKI, dovecot_workroot: Path) -> Iterator[DovecotServer]:
    """One real Dovecot on 127.0.0.1 .. 127.0.0.UP_ADDRESSES and ::1: many distinct
    targets (a hashmod key each) from one server."""
    require_dovecot()
    listen = [f"127.0.0.{i}" for i in range(1, UP_ADDRESSES + 1)] + ["::1"]
    with DovecotServer(
        dovecot_workroot / "sharding", pki.variants["good"], listen=listen
    ) as server:
        yield server


@pytest.mark.prometheus
@pytest.mark.dovecot
@pytest.mark.slow
async def test_shards_split_the_targets_and_the_global_view_alerts_on_the_quorum(
    tmp_path: Path, pki: TestPKI, dovecot_many: DovecotServer
) -> None:
    began = time.monotonic()
    timings: dict[str, float] = {}
    prometheus_binary = prom.prometheus_binary()

    global_original = load_yaml(GLOBAL_CONFIG)
    shard_names = shard_addresses(global_original)
    shards = len(shard_names)
    assert shards >= 2
    template = render_shard_config(0, shards)
    locations = exporter_locations(template)
    jobs = probe_jobs(template)
    assert sorted(jobs.values()) == sorted(locations)

    up = up_targets(dovecot_many)
    down = down_targets(shards)
    targets = up + down
    assert len({t[0] for t in targets}) >= 15, "too few distinct instances to spread"
    expected_shard = {instance: hashmod(instance, shards) for instance, _ in targets}
    assert set(expected_shard.values()) == set(range(shards))

    exporter_file = tmp_path / "exporter.yml"
    exporter_file.write_text(exporter_config(pki.ca_file))
    exporters = {
        location: ExporterProcess(
            tmp_path / "exporters", exporter_file, name=f"exporter-{location}"
        )
        for location in locations
    }
    processes: list[prom.ManagedProcess] = list(exporters.values())
    shard_servers: list[PrometheusServer] = []
    global_server: PrometheusServer | None = None

    def diagnostics() -> str:
        return "\n".join(f"[{p.workdir}]\n{p.log_tail(20)}" for p in processes)

    try:
        await asyncio.gather(*(asyncio.to_thread(e.start) for e in exporters.values()))
        exporter_address = {locations[loc]: e.address for loc, e in exporters.items()}

        for shard in range(shards):
            rendered = render_shard_config(shard, shards)
            config = localize_prometheus_config(
                rendered,
                addresses=exporter_address,
                alertmanager="127.0.0.1:9",  # unused: the shards have no alerting section
                rule_files=rendered["rule_files"],
                interval=INTERVAL,
                scrape_timeout=INTERVAL,
            )
            directory = tmp_path / f"shard-{shard}"
            path = install(
                directory, config, for_factor=FOR_FACTOR, targets=file_sd_groups(targets)
            )
            server = PrometheusServer(directory / "run", path, prometheus_binary)
            shard_servers.append(server)
            processes.append(server)
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in shard_servers))

        global_config = localize_prometheus_config(
            global_original,
            addresses={
                name: s.url.removeprefix("http://")
                for name, s in zip(shard_names, shard_servers, strict=True)
            },
            alertmanager=f"127.0.0.1:{prom.free_port()}",  # closed: alerts are read from the API
            rule_files=global_original["rule_files"],
            interval=INTERVAL,
            scrape_timeout=INTERVAL,
        )
        global_path = install(tmp_path / "global", global_config, for_factor=FOR_FACTOR)
        global_server = PrometheusServer(
            tmp_path / "global" / "run", global_path, prometheus_binary
        )
        processes.append(global_server)
        await asyncio.to_thread(global_server.start)
        timings["processes started"] = time.monotonic() - began

        async with client_session() as session:
            shard_apis = [PrometheusAPI(session, s.url) for s in shard_servers]
            api = PrometheusAPI(session, global_server.url)

            async def vector(prom_api: PrometheusAPI, expr: str) -> dict[tuple[str, ...], float]:
                """{label values in sorted label order: value} of an instant query."""
                return {
                    tuple(v for _, v in sorted(s["metric"].items())): float(s["value"][1])
                    for s in await prom_api.query(expr)
                }

            probes = len(targets) * len(locations)

            async def all_probes_in_global_view() -> bool:
                result = await api.query("count(pop3:probe_success)")
                return bool(result) and int(float(result[0]["value"][1])) == probes

            await wait_until(
                all_probes_in_global_view,
                STARTUP_WITHIN,
                what=f"{probes} probes in the global view",
            )
            timings["all probes in the global view"] = time.monotonic() - began

            # --- every target is scraped by exactly one shard: the one hashmod names
            scraped: list[set[tuple[str, str, str]]] = []
            for shard, shard_api in enumerate(shard_apis):
                active = await shard_api.targets()
                own = set()
                for target in active:
                    labels = target["labels"]
                    if labels["job"] in jobs:
                        assert jobs[labels["job"]] == labels["location"]
                        assert expected_shard[labels["instance"]] == shard, labels
                        own.add((labels["instance"], labels["module"], labels["location"]))
                    else:
                        assert labels["job"] == "pop3_exporter", labels
                        assert hashmod(labels["instance"], shards) == shard, labels
                assert own, f"shard {shard} probes nothing"
                scraped.append(own)
            every_probe = {(i, m, loc) for i, m in targets for loc in locations}
            assert set().union(*scraped) == every_probe
            assert sum(len(s) for s in scraped) == len(every_probe), "a probe on two shards"
            exporter_targets = [
                t["labels"]["instance"]
                for shard_api in shard_apis
                for t in await shard_api.targets()
                if t["labels"]["job"] == "pop3_exporter"
            ]
            assert sorted(exporter_targets) == sorted(e.address for e in exporters.values())

            # --- ... and is visible exactly once in the global view, from its shard
            seen = await vector(
                api, "count by (instance, location, module, shard) (pop3:probe_success)"
            )
            assert {(i, loc, m) for i, loc, m, _ in seen} == {
                (i, loc, m) for i, m, loc in every_probe
            }
            assert set(seen.values()) == {1.0}
            assert all(int(shard) == expected_shard[i] for i, _, _, shard in seen)
            per_target = await vector(api, "count by (instance, module) (pop3:locations:count)")
            assert set(per_target) == set(targets) and set(per_target.values()) == {1.0}
            ups = await vector(api, 'count by (instance, job, module) (up{job=~"pop3-.*"})')
            assert len(ups) == probes and set(ups.values()) == {1.0}

            # --- the quorum alert, evaluated on the global view
            down_instances = {i for i, _ in down}
            up_instances = {i for i, _ in up}

            async def unreachable_firing() -> list[dict[str, Any]]:
                alerts = [
                    a
                    for a in await api.alerts()
                    if a["labels"]["alertname"] == "Pop3Unreachable" and a["state"] == "firing"
                ]
                fired = {a["labels"]["instance"] for a in alerts}
                return alerts if down_instances <= fired else []

            fired = await wait_until(
                unreachable_firing, ALERT_WITHIN, what="Pop3Unreachable for every down target"
            )
            timings["Pop3Unreachable firing for all down targets"] = time.monotonic() - began
            for alert in fired:
                labels = alert["labels"]
                assert labels["instance"] in down_instances, labels
                assert labels["severity"] == "critical" and labels["cause"] == "connect"
                description = alert["annotations"]["description"]
                count = len(locations)
                assert f"from {count} of {count} probe location(s)" in description, description
                # The reasons come from probe_pop3_failure, which the global view
                # gets only through pop3_shard.yml and the federate job's renaming.
                for location in locations:
                    assert f"connect_refused from {location}" in description, description
            assert {a["labels"]["instance"] for a in fired} == down_instances

            firing = [a["labels"] for a in await api.alerts() if a["state"] == "firing"]
            wrong = [
                a
                for a in firing
                if a["alertname"] in QUORUM_ALERTS and a.get("instance") in up_instances
            ]
            assert not wrong, wrong

            # --- the sharding alerts' conditions are clear: no gap, no overlap, no split
            exprs = {rule["alert"]: rule["expr"] for rule in sharding_alerts()}

            async def sharding_conditions() -> dict[str, list[dict[str, Any]]]:
                return {name: await api.query(expr) for name, expr in exprs.items()}

            async def sharding_clear() -> bool:
                return not any((await sharding_conditions()).values())

            await wait_until(sharding_clear, STARTUP_WITHIN, what="the sharding alerts to be clear")
            discovered = await vector(
                api,
                'max by (config) (prometheus_sd_discovered_targets{job="prometheus-shard",'
                ' name="scrape", config=~"pop3-.*"})',
            )
            assert set(discovered.values()) == {float(len(targets))}, discovered

            # --- every rule of all three Prometheus evaluates without error
            for which, prom_api in [("global", api)] + [
                (f"shard {k}", a) for k, a in enumerate(shard_apis)
            ]:
                groups = await prom_api.rule_groups()
                assert groups, which
                unhealthy = [
                    f"{which} {g['name']}/{r['name']}: {r.get('lastError')}"
                    for g in groups
                    for r in g["rules"]
                    if r.get("health") != "ok"
                ]
                assert not unhealthy, unhealthy

            # --- the global view holds a few series per probe, the shards all of them
            # (The exporters' own metrics apart: a few hundred series in all.)
            federated = await vector(api, 'count({shard!="", job!="pop3_exporter"})')
            global_per_probe = sum(federated.values()) / probes
            shard_per_probe = 0.0
            for shard_api in shard_apis:
                on_shard = await vector(shard_api, 'count({__name__=~".+", job!="pop3_exporter"})')
                shard_per_probe += sum(on_shard.values()) / probes
            assert global_per_probe * 4 < shard_per_probe, (global_per_probe, shard_per_probe)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnostics()}") from None
    finally:
        await asyncio.to_thread(stop_all, processes)

    timings["total"] = time.monotonic() - began
    print(
        f"\n{prom.binary_version(prometheus_binary)}: {len(targets)} targets"
        f" ({len(down)} down) x {len(locations)} locations over {shards} shards"
        f" ({', '.join(str(len(s)) for s in scraped)} probes);"
        f" series per probe: {shard_per_probe:.1f} on the shards,"
        f" {global_per_probe:.1f} federated to the global view"
    )
    for step, seconds in timings.items():
        print(f"  {step:46s} {seconds:6.1f}s")
