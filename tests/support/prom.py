"""Real Prometheus, Alertmanager and pop3_exporter processes on loopback, a
webhook receiver, and the rewriting of the files in ``deploy/`` for them.

Everything listens on 127.0.0.1 with ephemeral ports; every process is started
by :class:`ManagedProcess` and stopped by its PID (SIGTERM, then SIGKILL after
a bounded wait). Data directories live in the caller's temporary directory.

The deploy files are used as they are, except for what a test has to change:

* addresses and ports (:func:`localize_prometheus_config`,
  :func:`localize_alertmanager_config`),
* scrape/evaluation intervals and Alertmanager's group timers (short, so that
  a test takes seconds rather than minutes),
* the alerts' ``for:`` durations (:func:`shorten_rule_durations`): the rules
  under test are otherwise byte-for-byte those of ``deploy/prometheus/rules``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession, ClientTimeout, web

from tests.support.processes import signal_child, terminate

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES_DIR = DEPLOY / "prometheus" / "rules"
DASHBOARD = REPO / "grafana" / "dashboards" / "pop3-exporter.json"

START_ATTEMPTS = 3  # only a lost port race is retried
LOG_TAIL_LINES = 40


# ---------------------------------------------------------------- binaries


def find_binary(*names: str) -> str | None:
    """The first of ``names`` found on PATH (or in /usr/bin, /usr/sbin)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for directory in ("/usr/bin", "/usr/sbin"):
            candidate = Path(directory) / name
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def require_binary(*names: str, package: str) -> str:
    """The binary, or skip the test; in CI (CI=true) a missing binary fails it."""
    binary = find_binary(*names)
    if binary is None:
        message = f"{' / '.join(names)} not found (Debian package {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return binary


def prometheus_binary() -> str:
    return require_binary("prometheus", package="prometheus")


def promtool_binary() -> str:
    return require_binary("promtool", package="prometheus")


def alertmanager_binary() -> str:
    # Debian names it prometheus-alertmanager; upstream releases "alertmanager".
    return require_binary(
        "prometheus-alertmanager", "alertmanager", package="prometheus-alertmanager"
    )


def amtool_binary() -> str:
    return require_binary("amtool", package="prometheus-alertmanager")


def binary_version(binary: str) -> str:
    """First line of ``binary --version`` (Prometheus tools print it on stdout or stderr)."""
    completed = subprocess.run(
        [binary, "--version"], capture_output=True, timeout=30, check=False, text=True
    )
    text = (completed.stdout or completed.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


# ---------------------------------------------------------------- ports and HTTP


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (callers retry on a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A blocking GET for readiness polls (loopback URLs only)."""
    assert url.startswith(("http://127.0.0.1:", "http://[::1]:")), url
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""


# ---------------------------------------------------------------- processes


class ProcessError(RuntimeError):
    pass


class ManagedProcess:
    """One child process with its output in a log file; stopped by PID only."""

    name = "process"
    ready_path = "/"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self.port = 0
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # Subclasses: the command line for a given port.
    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no {self.name} log)"
        return f"--- {self.log_path.name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def start(self, timeout: float = 30.0) -> None:
        """Start on a free port and wait until ``ready_path`` answers 200."""
        if self.running:
            raise RuntimeError(f"{self.name} already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        deadline = began + timeout
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            offset = self._log_size()
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    self.command(self.port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                )
            if self._wait_ready(deadline):
                self.start_seconds = time.monotonic() - began
                return
            returncode = self._proc.poll()
            self.stop()
            with self.log_path.open("rb") as log:
                log.seek(offset)
                new_output = log.read().decode(errors="replace")
            if "address already in use" in new_output.lower() and attempt < START_ATTEMPTS:
                continue
            reason = (
                f"exited with status {returncode}"
                if returncode is not None
                else f"was not ready within {timeout:.0f}s"
            )
            raise ProcessError(f"{self.name} {reason}\n{self.log_tail()}")
        raise ProcessError(f"{self.name} could not bind a port\n{self.log_tail()}")

    def _wait_ready(self, deadline: float) -> bool:
        # Bounded by the deadline and by the number of polls.
        for _ in range(2000):
            if self._proc is None or self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                status, _ = http_get(self.url + self.ready_path, timeout=1.0)
                if status == 200:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM our child by PID, wait, SIGKILL after ``timeout``. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        terminate(proc, timeout)
        self._proc = None

    def __enter__(self) -> ManagedProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class PrometheusServer(ManagedProcess):
    name = "prometheus"
    ready_path = "/-/ready"

    def __init__(self, workdir: Path, config_file: Path, binary: str | None = None) -> None:
        super().__init__(workdir)
        self.config_file = config_file
        self.binary = binary or prometheus_binary()

    def command(self, port: int) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.external-url=http://127.0.0.1:{port}/",
            "--storage.tsdb.retention.time=1d",
            "--log.level=info",
        ]


class AlertmanagerServer(ManagedProcess):
    name = "alertmanager"
    ready_path = "/-/ready"

    def __init__(self, workdir: Path, config_file: Path, binary: str | None = None) -> None:
        super().__init__(workdir)
        self.config_file = config_file
        self.binary = binary or alertmanager_binary()

    def command(self, port: int) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_file}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.external-url=http://127.0.0.1:{port}/",
            # Empty: no cluster listener (it would bind 0.0.0.0:9094).
            "--cluster.listen-address=",
            "--log.level=info",
        ]


class ExporterProcess(ManagedProcess):
    """``python -m pop3_exporter`` from this checkout, on 127.0.0.1."""

    ready_path = "/-/healthy"

    def __init__(
        self,
        workdir: Path,
        config_file: Path,
        name: str = "pop3_exporter",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        super().__init__(workdir)
        self.config_file = config_file
        self.extra_args = tuple(extra_args)

    def command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pop3_exporter",
            "--web.listen-address",
            f"127.0.0.1:{port}",
            "--config.file",
            str(self.config_file),
            *self.extra_args,
        ]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def stop_all(processes: Iterable[ManagedProcess]) -> None:
    """Signal every process first (each by its PID), then wait for each."""
    processes = [p for p in processes if p.running]
    for process in processes:
        if process._proc is not None:
            signal_child(process._proc, signal.SIGTERM)
    for process in processes:
        process.stop()


# ---------------------------------------------------------------- HTTP APIs


class PrometheusAPI:
    """The parts of Prometheus' HTTP API the tests use."""

    def __init__(self, session: ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def _get(self, path: str, **params: str) -> Any:
        async with self.session.get(self.url + path, params=params) as response:
            body = await response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result list (vector samples, or [scalar] for scalars)."""
        data = await self._get("/api/v1/query", query=expr)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        return list(result)

    async def query_range(self, expr: str, seconds: float, step: str = "1s") -> list[Any]:
        end = time.time()
        data = await self._get(
            "/api/v1/query_range",
            query=expr,
            start=f"{end - seconds:.3f}",
            end=f"{end:.3f}",
            step=step,
        )
        return list(data["result"])

    async def label_values(self, label: str, match: str | None = None) -> list[str]:
        params = {"match[]": match} if match else {}
        return list(await self._get(f"/api/v1/label/{label}/values", **params))

    async def alerts(self) -> list[dict[str, Any]]:
        return list((await self._get("/api/v1/alerts"))["alerts"])

    async def targets(self) -> list[dict[str, Any]]:
        return list((await self._get("/api/v1/targets", state="active"))["activeTargets"])

    async def rule_groups(self) -> list[dict[str, Any]]:
        return list((await self._get("/api/v1/rules"))["groups"])


@dataclass
class Notification:
    """One webhook POST from Alertmanager."""

    path: str
    received: float
    payload: dict[str, Any]

    def alerts(self, status: str | None = None, **labels: str) -> list[dict[str, Any]]:
        """The alerts of this notification with the given status and labels."""
        found = []
        for alert in self.payload.get("alerts", []):
            if status is not None and alert.get("status") != status:
                continue
            if all(alert.get("labels", {}).get(k) == v for k, v in labels.items()):
                found.append(alert)
        return found


@dataclass
class WebhookReceiver:
    """An aiohttp server on 127.0.0.1:0 that records Alertmanager's webhook posts."""

    notifications: list[Notification] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.notifications.append(Notification(request.path, time.monotonic(), payload))
        self._changed.set()
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def matching(
        self, path: str | None = None, status: str | None = None, **labels: str
    ) -> list[tuple[Notification, dict[str, Any]]]:
        return [
            (n, alert)
            for n in self.notifications
            if path is None or n.path == path
            for alert in n.alerts(status, **labels)
        ]

    async def wait_for(
        self,
        within: float,
        path: str | None = None,
        status: str | None = None,
        since: float = 0.0,
        **labels: str,
    ) -> tuple[Notification, dict[str, Any]]:
        """The first alert notified after ``since`` (monotonic) matching the filters,
        waiting at most ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            for notification, alert in self.matching(path, status, **labels):
                if notification.received >= since:
                    return notification, alert
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [
                    (n.path, n.payload.get("status"), n.payload.get("groupLabels"))
                    for n in self.notifications
                ]
                raise AssertionError(
                    f"no {status or 'any'} notification on {path or 'any path'} for {labels} "
                    f"within {within:.0f}s; received: {json.dumps(seen)}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))


async def wait_until(
    check: Callable[[], Any], within: float, interval: float = 0.5, what: str = "condition"
) -> Any:
    """Await ``check()`` until it returns something truthy, for at most ``within``
    seconds; bounded in time and in count."""
    deadline = time.monotonic() + within
    last: Any = None
    for _ in range(int(within / interval) + 2):
        last = await check()
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within:.0f}s waiting for {what}; last: {last!r}")


def client_session() -> ClientSession:
    return ClientSession(timeout=ClientTimeout(total=10))


# ---------------------------------------------------------------- deploy files


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dump_yaml(data: Any, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_DURATION_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 604800,
    "y": 31536000,
}


def duration_seconds(text: str) -> float:
    """A Prometheus duration ("2m", "1h30m", "500ms") in seconds."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _DURATION_SECONDS[u] for n, u in parts)


def shorten_rule_durations(rules: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """A copy of a rule file with every alert's ``for:`` divided by ``factor``
    (at least 1s): with factor 60, "2m" becomes "2s" and "10m" "10s", so the
    alerts keep their order relative to each other but fire within seconds.

    This is the only change the end-to-end test makes to the rules. By hand:
    ``yq '(.groups[].rules[] | select(has("for"))).for = "10s"' pop3_alerts.yml``.
    """
    result = copy.deepcopy(dict(rules))
    for group in result["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule:
                seconds = max(1, math.ceil(duration_seconds(str(rule["for"])) / factor))
                rule["for"] = f"{seconds}s"
    return result


def write_test_rules(directory: Path, factor: float) -> list[Path]:
    """Copies of deploy/prometheus/rules/*.yml with ``for:`` divided by ``factor``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted(RULES_DIR.glob("*.yml")):
        written.append(
            dump_yaml(shorten_rule_durations(load_yaml(source), factor), directory / source.name)
        )
    return written


def localize_prometheus_config(
    config: Mapping[str, Any],
    *,
    addresses: Mapping[str, str],
    targets_by_module: Mapping[str, Sequence[str]] | None = None,
    alertmanager: str,
    rule_files: Sequence[str],
    interval: str,
    scrape_timeout: str,
) -> dict[str, Any]:
    """A copy of a deploy/ Prometheus config for loopback.

    ``addresses`` maps every exporter address in the file (static targets,
    hidden ``__exporter`` labels, relabelling replacements) to a loopback one;
    ``targets_by_module`` replaces the POP3 targets of each group by its
    ``module`` label. Relabelling rules, metrics_path and labels stay as they
    are. Raises if a non-loopback address is left (nothing may be resolved or
    contacted outside this machine).
    """
    result = copy.deepcopy(dict(config))
    result["global"] = dict(result.get("global") or {})
    result["global"]["scrape_interval"] = interval
    result["global"]["evaluation_interval"] = interval
    result["global"]["scrape_timeout"] = scrape_timeout
    result["rule_files"] = list(rule_files)
    for alerting in result.get("alerting", {}).get("alertmanagers", []):
        alerting["static_configs"] = [{"targets": [alertmanager]}]

    def mapped(address: str) -> str:
        if address not in addresses:
            raise KeyError(f"no loopback address given for {address!r}")
        return addresses[address]

    for job in result.get("scrape_configs", []):
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        for group in job.get("static_configs", []):
            labels = group.setdefault("labels", {}) or {}
            module = labels.get("module")
            if targets_by_module is not None and module is not None:
                group["targets"] = list(targets_by_module.get(module, []))
            else:
                group["targets"] = [mapped(t) for t in group["targets"]]
            if "__exporter" in labels:
                labels["__exporter"] = mapped(labels["__exporter"])
        for relabel in job.get("relabel_configs", []):
            if relabel.get("target_label") == "__address__" and "replacement" in relabel:
                relabel["replacement"] = mapped(relabel["replacement"])
        # Drop groups left without targets (a module the test does not use).
        job["static_configs"] = [g for g in job.get("static_configs", []) if g["targets"]]
    check_loopback_only(result)
    return result


def localize_alertmanager_config(
    config: Mapping[str, Any], *, webhook_url: str, group_wait: str, group_interval: str
) -> dict[str, Any]:
    """A copy of deploy/alertmanager/alertmanager.yml posting to ``webhook_url``.

    Each webhook keeps its path (``/page``, ``/ticket``) on the new host and
    port; the route's group_wait and group_interval are shortened.
    """
    result = copy.deepcopy(dict(config))
    for receiver in result.get("receivers", []):
        for webhook in receiver.get("webhook_configs", []):
            path = re.sub(r"^https?://[^/]+", "", webhook["url"])
            webhook["url"] = webhook_url.rstrip("/") + path

    def shorten(route: dict[str, Any]) -> None:
        for key, value in (("group_wait", group_wait), ("group_interval", group_interval)):
            if key in route or route is result["route"]:
                route[key] = value
        for child in route.get("routes", []):
            shorten(child)

    shorten(result["route"])
    check_loopback_only(result)
    return result


_URL_HOST = re.compile(r"^(?:[a-z][a-z0-9+.-]*://)?(\[[^\]]+\]|[^/:\s]+):\d+")


def check_loopback_only(data: Any) -> None:
    """Fail on any host:port or URL in ``data`` whose host is not a loopback address."""
    if isinstance(data, Mapping):
        for value in data.values():
            check_loopback_only(value)
    elif isinstance(data, list):
        for value in data:
            check_loopback_only(value)
    elif isinstance(data, str):
        match = _URL_HOST.match(data)
        if match:
            host = match.group(1).strip("[]")
            if host not in ("127.0.0.1", "::1") and not host.startswith("127."):
                raise AssertionError(f"non-loopback address left in a test config: {data!r}")


# ---------------------------------------------------------------- dashboard


DASHBOARD_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "2m",
    "${target}": ".*",
    "$target": ".*",
    "${module}": ".*",
    "$module": ".*",
    "${location}": ".*",
    "$location": ".*",
}


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows; rows themselves excluded."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def panel_rows(dashboard: Mapping[str, Any]) -> dict[int, str]:
    """{panel id: title of the row it is in} ("" above the first row).

    A collapsed row holds its panels; the others own the panels below them up to
    the next row, in Grafana's order (top to bottom, then left to right), whatever
    the order of the JSON array.
    """
    rows: dict[int, str] = {}
    placed: list[tuple[int, int, str, dict[str, Any]]] = []
    for panel in dashboard.get("panels", []):
        grid = panel.get("gridPos", {})
        if panel.get("type") == "row":
            for inner in panel.get("panels", []):
                rows[inner["id"]] = panel["title"]
            kind = "row"
        else:
            kind = "panel"
        placed.append((int(grid.get("y", 0)), int(grid.get("x", 0)), kind, panel))
    current = ""
    for _, _, kind, panel in sorted(placed, key=lambda item: (item[0], item[1])):
        if kind == "row":
            current = panel["title"]
        else:
            rows[panel["id"]] = current
    return rows


def substitute_variables(expr: str, substitutions: Mapping[str, str] | None = None) -> str:
    """A panel expression with Grafana's variables replaced as Grafana would ("All")."""
    for name, value in sorted(
        (substitutions or DASHBOARD_SUBSTITUTIONS).items(), key=lambda kv: -len(kv[0])
    ):
        expr = expr.replace(name, value)
    if "$" in expr:
        raise AssertionError(f"unknown variable left in {expr!r}")
    return expr


def dashboard_queries(
    dashboard: Mapping[str, Any],
    *,
    only_rows: Collection[str] | None = None,
    skip_rows: Collection[str] = (),
) -> list[tuple[str, str, str]]:
    """(panel title, refId, expression with variables substituted) for every query,
    or only for the panels in ``only_rows``, or for all but those in ``skip_rows``
    (rows by title, see :func:`panel_rows`)."""
    rows = panel_rows(dashboard)
    queries = []
    for panel in dashboard_panels(dashboard):
        row = rows.get(panel["id"], "")
        if (only_rows is not None and row not in only_rows) or row in skip_rows:
            continue
        for target in panel.get("targets", []):
            if target.get("hide"):
                continue
            queries.append(
                (panel["title"], target.get("refId", "?"), substitute_variables(target["expr"]))
            )
    return queries
