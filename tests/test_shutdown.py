"""SIGTERM: stop accepting, let probes in flight finish within the grace period, exit 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from pop3_exporter.http import create_app
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.runtime import ConfigHolder
from tests.support.exporter import ExporterProcess
from tests.support.exposition import parse_samples, value
from tests.support.fakepop3 import FakeConnection, FakePop3Server, dialogue, silent
from tests.support.fakeprober import FakeProber
from tests.support.logs import find, parse_logfmt

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]

GREETING_DELAY = 2.0


async def slow_greeting(conn: FakeConnection) -> None:
    """A healthy server that takes a while to greet: the probe is in flight meanwhile."""
    await asyncio.sleep(GREETING_DELAY)
    await dialogue()(conn)


async def fetch(
    session: aiohttp.ClientSession, url: str, params: dict[str, str], headers: dict[str, str]
) -> tuple[int, str]:
    async with session.get(url, params=params, headers=headers) as response:
        return response.status, await response.text()


def listener_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_sigterm_lets_the_probe_in_flight_finish(tmp_path: Path) -> None:
    async with FakePop3Server(slow_greeting) as server:
        exporter = ExporterProcess(tmp_path / "exporter.log", "--web.shutdown-grace", "10s")
        await asyncio.to_thread(exporter.start)
        try:
            async with aiohttp.ClientSession() as session:
                probe = asyncio.create_task(
                    fetch(
                        session,
                        f"{exporter.url}/probe",
                        {"target": f"127.0.0.1:{server.port}", "module": "pop3"},
                        {},
                    )
                )
                await wait_for(lambda: server.connections == 1, 10, "the probe to connect")
                loop = asyncio.get_running_loop()
                signalled = loop.time()
                exporter.signal(signal.SIGTERM)

                # The listener closes at once: new connections are refused...
                await wait_for(
                    lambda: listener_refuses(exporter.port), 1.5, "the listener to close"
                )
                assert not probe.done(), "the probe in flight must not be cut short"
                # ...while the probe in flight runs to its natural end.
                status, text = await asyncio.wait_for(probe, timeout=15)
                finished = loop.time() - signalled
            assert status == 200, text
            assert value(parse_samples(text), "probe_success") == 1
            assert finished >= GREETING_DELAY - 0.5
            returncode = await asyncio.to_thread(exporter.wait, 15)
            exited = loop.time() - signalled
        finally:
            await asyncio.to_thread(exporter.kill)
    assert returncode == 0, exporter.log()
    # Exits soon after its last probe, not at the end of the grace period.
    assert exited < GREETING_DELAY + 3, exited
    records = parse_logfmt(exporter.log())
    find(records, "shutting down", probes_in_flight=1, grace_seconds=10.0)
    find(records, "shut down")


async def test_probe_longer_than_the_grace_period_is_cut_and_exit_is_0(
    tmp_path: Path,
) -> None:
    grace = 1.0
    async with FakePop3Server(silent) as server:
        exporter = ExporterProcess(tmp_path / "exporter.log", "--web.shutdown-grace", f"{grace}")
        await asyncio.to_thread(exporter.start)
        try:
            async with aiohttp.ClientSession() as session:
                probe = asyncio.create_task(
                    fetch(
                        session,
                        f"{exporter.url}/probe",
                        {"target": f"127.0.0.1:{server.port}", "module": "pop3"},
                        # The module timeout (10 s) is far beyond the grace period.
                        {"X-Prometheus-Scrape-Timeout-Seconds": "30"},
                    )
                )
                await wait_for(lambda: server.connections == 1, 10, "the probe to connect")
                loop = asyncio.get_running_loop()
                signalled = loop.time()
                exporter.signal(signal.SIGTERM)
                returncode = await asyncio.to_thread(exporter.wait, 15)
                exited = loop.time() - signalled
                # The scraper sees the connection end, never a made-up result.
                with pytest.raises(aiohttp.ClientError):
                    await asyncio.wait_for(probe, timeout=5)
        finally:
            await asyncio.to_thread(exporter.kill)
    assert returncode == 0, exporter.log()
    # aiohttp waits the grace period, then cancels; cancelling a probe is immediate.
    assert grace - 0.2 <= exited < grace + 3, exited


async def test_idle_exporter_exits_at_once_on_sigterm_and_sigint(tmp_path: Path) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        exporter = ExporterProcess(tmp_path / "exporter.log", "--web.shutdown-grace", "30s")
        await asyncio.to_thread(exporter.start)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            exporter.signal(signum)
            returncode = await asyncio.to_thread(exporter.wait, 15)
            elapsed = loop.time() - started
        finally:
            await asyncio.to_thread(exporter.kill)
        assert returncode == 0, exporter.log()
        assert elapsed < 3, f"{signum.name}: nothing in flight, yet waited {elapsed:.1f}s"


async def test_probes_arriving_during_shutdown_get_503(aiohttp_client: ClientFactory) -> None:
    """Requests that still reach the app once shutdown began (kept-alive connections)
    are turned away rather than starting probes that the grace period would cut."""
    prober = FakeProber()
    client = await aiohttp_client(create_app(ConfigHolder(None, ExporterMetrics()), prober=prober))
    params = {"target": "pop3s://pop.example.com"}
    assert (await client.get("/probe", params=params)).status == 200
    await client.app.shutdown()  # what aiohttp runs once the listener is closed
    response = await client.get("/probe", params=params)
    assert response.status == 503
    assert await response.text() == "exporter is shutting down\n"
    assert len(prober.calls) == 1
    metrics = parse_samples(await (await client.get("/metrics")).text())
    assert value(metrics, "pop3_exporter_probes_rejected_total", reason="shutting_down") == 1


@pytest.mark.parametrize(("flag", "ok"), [("2s", True), ("1.5", True), ("0", True), ("x", False)])
def test_shutdown_grace_flag(flag: str, ok: bool) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "pop3_exporter", "--web.shutdown-grace", flag, "--config.check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (completed.returncode == 0) is ok, completed.stderr
    if not ok:
        assert completed.returncode == 2
        assert "--web.shutdown-grace" in completed.stderr
