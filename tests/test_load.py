"""Load and soak: the exporter as a real process, probing a local POP3 server process.

Loopback only, bounded in count and time. Checked: every probe answered and counted,
/-/healthy prompt while saturated, config reloads under load lose no probe, and after
tens of thousands of probes the open file descriptors are back to idle and memory has
stopped growing. The numbers are printed (even without -s) and recorded as junit
properties.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.exporter import REPO, ExporterProcess
from tests.support.exposition import parse_samples, value

pytestmark = pytest.mark.slow

MODULE = "load"
CONFIG = f"modules:\n  {MODULE}:\n    timeout: 5s\n"
# A second, different but equally valid config for reloads under load.
CONFIG_ALTERNATE = f"modules:\n  {MODULE}:\n    timeout: 6s\n  spare:\n    port: 2110\n"
SUCCESS_LINE = "\nprobe_success 1.0\n"
HEALTH_LIMIT_SECONDS = 2.0
MAX_RELOADS = 1000
# Hard bounds: a run that gets slower than this fails instead of hanging CI.
LOAD_TIME_LIMIT = 90.0
SOAK_TIME_LIMIT = 150.0

Report = Callable[[str, str], None]


@pytest.fixture
def report(
    record_property: Callable[[str, object], None], capsys: pytest.CaptureFixture[str]
) -> Report:
    """Print a result line to the terminal whatever the capture mode, and record it."""

    def emit(name: str, line: str) -> None:
        record_property(name, line)
        with capsys.disabled():
            sys.stdout.write(f"\n[{name}] {line}\n")
            sys.stdout.flush()

    return emit


@pytest.fixture(scope="module")
def pop3_port() -> Iterator[int]:
    """A cheap POP3 server in a process of its own (stopped by its PID)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.loadserver", "--lifetime", "600"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip().isdigit(), f"load server did not start: {line!r}"
        yield int(line)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[ExporterProcess]:
    config = tmp_path / "pop3_exporter.yml"
    config.write_text(CONFIG)
    process = ExporterProcess(
        tmp_path / "exporter.log",
        "--config.file",
        str(config),
        "--log.level",
        "warn",
        "--web.max-concurrent-probes",
        "1000",
    )
    with process:
        yield process


@dataclass
class LoadResult:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    not_successful: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    health_latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def max_health_latency(self) -> float:
        return max(self.health_latencies, default=0.0)


async def run_load(
    session: aiohttp.ClientSession,
    url: str,
    target: str,
    count: int,
    concurrency: int,
    *,
    health_url: str | None = None,
    during: Callable[[asyncio.Event], Coroutine[Any, Any, None]] | None = None,
) -> LoadResult:
    """``count`` probes from ``concurrency`` workers; optionally measure /-/healthy on
    fresh connections meanwhile, and run ``during(done)`` alongside (``done`` is set
    once every probe has been answered)."""
    result = LoadResult()
    next_index = 0
    done = asyncio.Event()
    params = {"target": target, "module": MODULE}

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            next_index += 1
            result.sent += 1
            try:
                async with session.get(f"{url}/probe", params=params) as response:
                    text = await response.text()
                    result.statuses[response.status] += 1
                    if response.status != 200 or SUCCESS_LINE not in text:
                        result.not_successful += 1
                        if len(result.errors) < 5:
                            result.errors.append(f"{response.status}: {text[:200]}")
            except aiohttp.ClientError as exc:
                result.statuses[0] += 1
                if len(result.errors) < 5:
                    result.errors.append(repr(exc))

    async def health() -> None:
        assert health_url is not None
        # A new connection every time, like a liveness probe: accept() latency counts.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh:
            for _ in range(10_000):
                if done.is_set():
                    return
                started = time.monotonic()
                async with fresh.get(health_url) as response:
                    assert response.status == 200
                    await response.read()
                result.health_latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.05)

    loop = asyncio.get_running_loop()
    started = loop.time()
    extras: list[asyncio.Task[None]] = []
    if health_url is not None:
        extras.append(asyncio.create_task(health()))
    if during is not None:
        extras.append(asyncio.create_task(during(done)))
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = loop.time() - started
    finally:
        done.set()
    await asyncio.gather(*extras)
    return result


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        return parse_samples(await response.text())


async def settle_fds(exporter: ExporterProcess, target: int | None, within: float) -> int:
    """Poll the exporter's descriptor count until it equals ``target`` (or, without a
    target, stops changing) or ``within`` seconds pass; return the last count."""
    deadline = time.monotonic() + within
    last = exporter.open_fds()
    stable = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        count = exporter.open_fds()
        if target is not None and count == target:
            return count
        stable = stable + 1 if count == last else 0
        if target is None and stable >= 5:
            return count
        last = count
    return last


async def warm_up(exporter: ExporterProcess, target: str) -> tuple[int, int]:
    """A few probes so lazily created things exist, then the idle (fds, RSS KiB)."""
    async with aiohttp.ClientSession() as session:
        result = await run_load(session, exporter.url, target, 50, 10)
    assert result.statuses == {200: 50}, result.errors
    fds = await settle_fds(exporter, None, 5)
    return fds, exporter.rss_kib()


def probes_counted(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "pop3_exporter_probes_total" and dict(labels).get("module") == MODULE
    )


async def test_thousands_of_probes_at_high_concurrency(
    exporter: ExporterProcess, pop3_port: int, report: Report
) -> None:
    target = f"127.0.0.1:{pop3_port}"
    idle_fds, idle_rss = await warm_up(exporter, target)
    count, concurrency = 6000, 300
    async with asyncio.timeout(LOAD_TIME_LIMIT):
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            result = await run_load(
                session,
                exporter.url,
                target,
                count,
                concurrency,
                health_url=f"{exporter.url}/-/healthy",
            )
            busy_fds = exporter.open_fds()
        after_fds = await settle_fds(exporter, idle_fds, 10)
        after_rss = exporter.rss_kib()
        samples = await scrape(exporter.url)
    line = (
        f"{result.sent} probes at concurrency {concurrency} in {result.seconds:.1f}s"
        f" = {result.rate:.0f} probes/s; /-/healthy max {result.max_health_latency * 1000:.0f}"
        f" ms over {len(result.health_latencies)} checks; fds idle {idle_fds},"
        f" busy {busy_fds}, after {after_fds}; RSS {idle_rss // 1024} MiB ->"
        f" {after_rss // 1024} MiB"
    )
    report("load", line)
    assert result.statuses == {200: count}, (line, result.errors)
    assert result.not_successful == 0, (line, result.errors)
    # Warm-up probes are counted too.
    assert probes_counted(samples) == count + 50, line
    assert value(samples, "pop3_exporter_probes_total", module=MODULE, result="failure") is None
    assert value(samples, "pop3_exporter_probes_rejected_total", reason="concurrency_limit") == 0
    assert value(samples, "pop3_exporter_probes_in_flight") == 0
    assert result.health_latencies, "no health check completed during the load"
    assert result.max_health_latency < HEALTH_LIMIT_SECONDS, line
    assert after_fds == idle_fds, line
    assert after_rss - idle_rss < 64 * 1024, line


async def test_config_reload_under_load_loses_no_probe(
    exporter: ExporterProcess, pop3_port: int, tmp_path: Path, report: Report
) -> None:
    target = f"127.0.0.1:{pop3_port}"
    config = tmp_path / "pop3_exporter.yml"
    reloads = Counter[str]()

    async def keep_reloading(done: asyncio.Event) -> None:
        """Alternate configs, reloading by SIGHUP and by POST /-/reload in turn, for as
        long as probes are running."""
        async with aiohttp.ClientSession() as session:
            for index in range(MAX_RELOADS):
                if done.is_set():
                    return
                text = CONFIG_ALTERNATE if index % 2 == 0 else CONFIG
                staging = tmp_path / "staging.yml"
                staging.write_text(text)
                # Atomic replace: a reload must never read a half-written file.
                os.replace(staging, config)
                if index % 2 == 0:
                    exporter.signal(signal.SIGHUP)
                    reloads["sighup"] += 1
                else:
                    async with session.post(f"{exporter.url}/-/reload") as response:
                        assert response.status == 200, await response.text()
                    reloads["http"] += 1
                await asyncio.sleep(0.02)

    count, concurrency = 5000, 150
    async with asyncio.timeout(LOAD_TIME_LIMIT):
        await warm_up(exporter, target)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            result = await run_load(
                session, exporter.url, target, count, concurrency, during=keep_reloading
            )
        samples = await scrape(exporter.url)
    line = (
        f"{result.sent} probes in {result.seconds:.1f}s ({result.rate:.0f}/s) with"
        f" {reloads['sighup']} SIGHUP and {reloads['http']} HTTP reloads"
    )
    report("reload", line)
    assert reloads["sighup"] >= 10 and reloads["http"] >= 10, line
    assert result.statuses == {200: count}, (line, result.errors)
    assert result.not_successful == 0, (line, result.errors)
    assert probes_counted(samples) == count + 50, line
    assert value(samples, "pop3_exporter_config_last_reload_successful") == 1
    assert "reload failed" not in exporter.log()


async def test_soak_fds_back_to_idle_and_memory_stops_growing(
    exporter: ExporterProcess, pop3_port: int, report: Report
) -> None:
    target = f"127.0.0.1:{pop3_port}"
    rounds, per_round, concurrency = 10, 2000, 100
    idle_fds, idle_rss = await warm_up(exporter, target)
    rss: list[int] = []
    fds: list[int] = []
    total = LoadResult()
    async with asyncio.timeout(SOAK_TIME_LIMIT):
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(rounds):
                result = await run_load(session, exporter.url, target, per_round, concurrency)
                total.sent += result.sent
                total.statuses.update(result.statuses)
                total.not_successful += result.not_successful
                total.errors.extend(result.errors[:2])
                total.seconds += result.seconds
                rss.append(exporter.rss_kib())
                # Settled: the last POP3 sockets of a round may still be closing.
                fds.append(await settle_fds(exporter, None, 3))
        after_fds = await settle_fds(exporter, idle_fds, 10)
        samples = await scrape(exporter.url)
    half = rounds // 2
    # Growth over the second half of the soak, once caches and allocator pools are warm.
    late_growth = rss[-1] - rss[half - 1]
    line = (
        f"{total.sent} probes at concurrency {concurrency} in {total.seconds:.1f}s ="
        f" {total.rate:.0f} probes/s; fds idle {idle_fds}, after {after_fds}"
        f" (per {per_round}: {fds}); RSS MiB idle {idle_rss / 1024:.1f},"
        f" per {per_round}: {[round(r / 1024, 1) for r in rss]};"
        f" growth over the last {rounds - half} rounds {late_growth} KiB"
    )
    report("soak", line)
    assert total.sent == rounds * per_round >= 20_000
    assert total.statuses == {200: total.sent}, (line, total.errors)
    assert total.not_successful == 0, (line, total.errors)
    assert probes_counted(samples) == total.sent + 50, line
    assert after_fds == idle_fds, line
    # Descriptors do not creep from round to round either (keep-alive conns included).
    assert max(fds) - min(fds) <= 5, line
    assert late_growth < 4 * 1024, line
    assert rss[-1] - idle_rss < 48 * 1024, line
    # A live exporter after all that: still healthy.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{exporter.url}/-/healthy") as response,
    ):
        assert response.status == 200
