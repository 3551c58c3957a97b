"""Hostile and malformed /probe requests, and the cap on probes in flight.

Each bad request must be answered with the right status and a one-line reason, and
must never reach the prober (a fake one here: no network is touched).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from pop3_exporter.cli import warn_about_file_limit
from pop3_exporter.http import create_app
from pop3_exporter.logs import FIELDS_ATTRIBUTE
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.runtime import ConfigHolder
from pop3_exporter.settings import Settings
from tests.support.exporter import ExporterProcess
from tests.support.exposition import labelled, parse_samples, value
from tests.support.fakepop3 import FakeConnection, FakePop3Server, dialogue
from tests.support.fakeprober import FakeProber

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]

OK = "target=pop.example.com&module=pop3"
KNOWN_MODULES = "known modules: pop3, pop3_starttls, pop3s"


async def make_client(
    aiohttp_client: ClientFactory, prober: FakeProber, settings: Settings | None = None
) -> Client:
    holder = ConfigHolder(None, ExporterMetrics())
    return await aiohttp_client(create_app(holder, prober=prober, settings=settings))


async def get_raw(
    client: Client, query: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """GET /probe with the query string sent exactly as written (no re-encoding)."""
    response = await client.get(URL(f"/probe?{query}", encoded=True), headers=headers)
    return response.status, await response.text()


# (query string as sent on the wire, expected status, expected text in the reply)
BAD_QUERIES: list[tuple[str, int, str]] = [
    # Missing, empty and repeated parameters.
    ("", 400, "parameter 'target' is required"),
    ("target=", 400, "parameter 'target' is required"),
    ("module=pop3", 400, "parameter 'target' is required"),
    ("target=a&target=b&module=pop3", 400, "parameter 'target' given more than once"),
    (OK + "&module=pop3s", 400, "parameter 'module' given more than once"),
    (OK + "&debug=true&debug=false", 400, "parameter 'debug' given more than once"),
    # Unknown parameters are refused, never ignored (names are case-sensitive).
    (OK + "&foo=1", 400, "unknown parameter 'foo'; known parameters: debug, module, target"),
    (OK + "&Target=x", 400, "unknown parameter 'Target'"),
    ("targt=pop.example.com&module=pop3", 400, "unknown parameter 'targt'"),
    (OK + "&modul=pop3s", 400, "unknown parameter 'modul'"),
    (OK + "&mod%0d%0aule=x", 400, r"unknown parameter 'mod\r\nule'"),
    (OK + "&" + "p" * 100 + "=1", 400, "unknown parameter '" + "p" * 64 + "'..."),
    # Target: length cap, control characters, CR/LF, whitespace, non-ASCII.
    ("target=" + "a" * 301 + "&module=pop3", 400, "bad target: target is longer than 300"),
    ("target=h%0d%0aX-Injected:%201&module=pop3", 400, "whitespace or control characters"),
    ("target=h%0a&module=pop3", 400, "whitespace or control characters"),
    ("target=h%00&module=pop3", 400, "whitespace or control characters"),
    ("target=h%09x&module=pop3", 400, "whitespace or control characters"),
    ("target=h%20x&module=pop3", 400, "whitespace or control characters"),
    ("target=h+x&module=pop3", 400, "whitespace or control characters"),
    ("target=%1b%5b31m&module=pop3", 400, "whitespace or control characters"),
    ("target=%E2%80%AEmoc.elpmaxe&module=pop3", 400, "whitespace or control characters"),
    ("target=%C3%A9xample.com&module=pop3", 400, "host name must be ASCII"),
    ("target=%ff&module=pop3", 400, "host name must be ASCII"),
    ("target=%zz&module=pop3", 400, "is not a valid host name"),
    ("target=-bad-.example&module=pop3", 400, "is not a valid host name"),
    ("target=a..b&module=pop3", 400, "is not a valid host name"),
    # Ports out of range or not numbers.
    ("target=h:0&module=pop3", 400, "port 0 is out of range 1-65535"),
    ("target=h:65536&module=pop3", 400, "port 65536 is out of range 1-65535"),
    ("target=h:99999999&module=pop3", 400, "port '99999999' is not a number"),
    ("target=h:-1&module=pop3", 400, "port '-1' is not a number"),
    ("target=h:&module=pop3", 400, "port '' is not a number"),
    ("target=h:%D9%A3&module=pop3", 400, "port '\u0663' is not a number"),
    ("target=[::1]:70000&module=pop3", 400, "port 70000 is out of range"),
    # URL forms.
    ("target=ftp://h", 400, "target scheme 'ftp' is not one of pop3://, pop3s://"),
    ("target=pop3://user@h", 400, "must not contain user information"),
    ("target=pop3s://h/inbox", 400, "must not have a path, query or fragment"),
    ("target=[::1&module=pop3", 400, "target has '[' without ']'"),
    ("target=[::1]x&module=pop3", 400, "unexpected text after ']'"),
    ("target=[example.com]:110&module=pop3", 400, "in brackets is not an IPv6 address"),
    # Module: charset and length are checked before the name is echoed back.
    ("target=h&module=", 400, "parameter 'module' must be 1-64 characters"),
    ("target=h&module=pop3%0a", 400, "parameter 'module' must be 1-64 characters"),
    ("target=h&module=pop3%0d%0aSet-Cookie:x", 400, "parameter 'module' must be 1-64"),
    ("target=h&module=" + "m" * 65, 400, "parameter 'module' must be 1-64 characters"),
    ("target=h&module=%C3%A9", 400, "parameter 'module' must be 1-64 characters"),
    ("target=h&module=imap", 400, f"unknown module 'imap'; {KNOWN_MODULES}"),
    ("target=h", 400, "parameter 'module' is required unless the target is a pop3://"),
    ("target=pop3s://h&module=pop3", 400, "pop3s:// target needs a module with tls: implicit"),
    # debug: exactly true or false.
    (OK + "&debug=TRUE", 400, "parameter 'debug' must be true or false"),
    (OK + "&debug=1", 400, "parameter 'debug' must be true or false"),
    (OK + "&debug=", 400, "parameter 'debug' must be true or false"),
]


@pytest.mark.parametrize(("query", "status", "message"), BAD_QUERIES)
async def test_bad_request_table(
    aiohttp_client: ClientFactory, query: str, status: int, message: str
) -> None:
    prober = FakeProber()
    client = await make_client(aiohttp_client, prober)
    got_status, text = await get_raw(client, query)
    assert (got_status, message in text) == (status, True), text
    # One line, and nothing the client sent comes back raw (CR, LF, ESC, NUL).
    assert text.endswith("\n") and text.count("\n") == 1
    assert not any(ch in text[:-1] for ch in "\r\x00\x1b\u202e"), repr(text)
    assert prober.calls == []
    # Every 400 is counted, under exactly one reason.
    invalid = await invalid_counts(client)
    assert sum(invalid.values()) == 1, invalid


async def invalid_counts(client: Client) -> dict[str, float]:
    samples = parse_samples(await (await client.get("/metrics")).text())
    return labelled(samples, "pop3_exporter_probe_requests_invalid_total", "reason")


@pytest.mark.parametrize(
    ("query", "headers", "reason"),
    [
        (OK + "&foo=1", {}, "unknown_parameter"),
        (OK + "&module=pop3s", {}, "repeated_parameter"),
        ("module=pop3", {}, "bad_target"),
        ("target=h%00&module=pop3", {}, "bad_target"),
        ("target=h&module=imap", {}, "unknown_module"),
        ("target=h", {}, "bad_module"),
        ("target=h&module=%C3%A9", {}, "bad_module"),
        ("target=pop3s://h&module=pop3", {}, "bad_module"),
        (OK + "&debug=1", {}, "bad_debug"),
        (OK, {"X-Prometheus-Scrape-Timeout-Seconds": "nan"}, "bad_scrape_timeout"),
    ],
)
async def test_invalid_requests_are_counted_by_reason(
    aiohttp_client: ClientFactory, query: str, headers: dict[str, str], reason: str
) -> None:
    client = await make_client(aiohttp_client, FakeProber())
    before = await invalid_counts(client)
    # Every reason is exported from the start, at 0, so rate() sees each series.
    assert before == {
        "unknown_parameter": 0,
        "repeated_parameter": 0,
        "bad_target": 0,
        "unknown_module": 0,
        "bad_module": 0,
        "bad_debug": 0,
        "bad_scrape_timeout": 0,
    }
    for _ in range(2):
        status, _text = await get_raw(client, query, headers)
        assert status == 400
    assert await invalid_counts(client) == {**before, reason: 2}
    # A good request changes none of them.
    assert (await get_raw(client, OK))[0] == 200
    assert await invalid_counts(client) == {**before, reason: 2}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("abc", "is not a number: 'abc'"),
        ("nan", "is not a number"),
        ("inf", "is not a number"),
        ("1e3", "is not a number"),
        ("1_0", "is not a number"),
        ("-1", "is not a number"),
        ("10s", "is not a number"),
        ("9" * 40, "is not a number"),
        ("0", "must be above zero"),
        ("0.000", "must be above zero"),
    ],
)
async def test_bad_scrape_timeout_header(
    aiohttp_client: ClientFactory, header: str, message: str
) -> None:
    prober = FakeProber()
    client = await make_client(aiohttp_client, prober)
    status, text = await get_raw(client, OK, {"X-Prometheus-Scrape-Timeout-Seconds": header})
    assert (status, message in text) == (400, True), text
    assert len(text) < 200
    assert prober.calls == []


@pytest.mark.parametrize(
    "query",
    [
        OK,
        OK + "&debug=false",
        "target=xn--xample-9ua.com&module=pop3",  # the ASCII form of an international name
        "target=h:65535&module=pop3",
        "target=[::1]:1&module=pop3",
        "target=pop3s://h",
        "target=POP3S://h:995/",
        "target=h.&module=pop3",
        "target=" + "a" * 63 + "." + "b" * 63 + "&module=pop3",
    ],
)
async def test_good_requests_reach_the_prober(aiohttp_client: ClientFactory, query: str) -> None:
    """The controls for the table: near-misses of the bad requests are accepted."""
    prober = FakeProber()
    client = await make_client(aiohttp_client, prober)
    status, text = await get_raw(client, query, {"X-Prometheus-Scrape-Timeout-Seconds": "9.5"})
    assert status == 200, text
    assert len(prober.calls) == 1


async def test_request_line_too_long_is_400_before_the_handler(
    aiohttp_client: ClientFactory,
) -> None:
    prober = FakeProber()
    client = await make_client(aiohttp_client, prober)
    status, text = await get_raw(client, "target=" + "a" * 9000 + "&module=pop3")
    assert status == 400
    assert "Got more than 8190 bytes" in text
    assert prober.calls == []


async def test_only_get_and_head(aiohttp_client: ClientFactory) -> None:
    prober = FakeProber()
    client = await make_client(aiohttp_client, prober)
    for method in ("POST", "PUT", "DELETE"):
        response = await client.request(method, URL("/probe?" + OK, encoded=True))
        assert response.status == 405
    assert prober.calls == []


async def test_excess_probes_get_503_with_retry_after_quickly(
    aiohttp_client: ClientFactory,
) -> None:
    limit = 3
    prober = FakeProber(delay=30)
    client = await make_client(aiohttp_client, prober, Settings(max_concurrent_probes=limit))
    running = [asyncio.create_task(get_raw(client, OK)) for _ in range(limit)]
    for _ in range(500):
        if prober.running == limit:
            break
        await asyncio.sleep(0.01)
    assert prober.running == limit

    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.get(URL("/probe?" + OK, encoded=True))
    elapsed = loop.time() - started
    text = await response.text()
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert text == f"too many probes in flight (limit {limit}); try again later\n"
    assert elapsed < 1.0, "an excess request must be answered at once, not queued"
    assert len(prober.calls) == limit and prober.max_running == limit

    # Other endpoints are not limited, and the rejection is counted.
    metrics = parse_samples(await (await client.get("/metrics")).text())
    assert value(metrics, "pop3_exporter_probes_rejected_total", reason="concurrency_limit") == 1
    assert value(metrics, "pop3_exporter_probes_in_flight") == limit

    prober.release.set()
    assert [status for status, _ in await asyncio.gather(*running)] == [200] * limit
    # Slots are given back: the next probe runs.
    prober.release.clear()
    prober.delay = 0
    status, _ = await get_raw(client, OK)
    assert status == 200
    metrics = parse_samples(await (await client.get("/metrics")).text())
    assert value(metrics, "pop3_exporter_probes_total", module="pop3", result="success") == 4
    assert value(metrics, "pop3_exporter_probes_rejected_total", reason="concurrency_limit") == 1


async def test_zero_means_no_limit(aiohttp_client: ClientFactory) -> None:
    prober = FakeProber(delay=30)
    client = await make_client(aiohttp_client, prober, Settings(max_concurrent_probes=0))
    requests = [asyncio.create_task(get_raw(client, OK)) for _ in range(50)]
    for _ in range(500):
        if prober.running == 50:
            break
        await asyncio.sleep(0.01)
    assert prober.running == 50
    prober.release.set()
    assert {status for status, _ in await asyncio.gather(*requests)} == {200}


async def test_bad_requests_do_not_use_probe_slots(aiohttp_client: ClientFactory) -> None:
    """A flood of invalid requests is answered 400 even when every slot is taken."""
    prober = FakeProber(delay=30)
    client = await make_client(aiohttp_client, prober, Settings(max_concurrent_probes=1))
    running = asyncio.create_task(get_raw(client, OK))
    await asyncio.wait_for(prober.started.wait(), timeout=5)
    status, text = await get_raw(client, "target=h%00&module=pop3")
    assert (status, "control characters" in text) == (400, True)
    prober.release.set()
    assert (await running)[0] == 200


async def test_cap_flag_reaches_the_running_exporter(tmp_path: Path) -> None:
    """--web.max-concurrent-probes end to end: a real exporter process, a real slow
    POP3 server on loopback, the second concurrent probe is turned away."""

    async def slow(conn: FakeConnection) -> None:
        await asyncio.sleep(1.5)
        await dialogue()(conn)

    async with FakePop3Server(slow) as server:
        exporter = ExporterProcess(tmp_path / "exporter.log", "--web.max-concurrent-probes", "1")
        await asyncio.to_thread(exporter.start)
        try:
            url = f"{exporter.url}/probe?target=127.0.0.1:{server.port}&module=pop3"
            async with aiohttp.ClientSession() as session:

                async def fetch() -> int:
                    async with session.get(url) as response:
                        await response.read()
                        return response.status

                first = asyncio.create_task(fetch())
                for _ in range(500):
                    if server.connections:
                        break
                    await asyncio.sleep(0.01)
                assert server.connections == 1
                assert await fetch() == 503
                assert await first == 200
                assert await fetch() == 200
        finally:
            await asyncio.to_thread(exporter.kill)


def test_bad_cap_flag_is_a_usage_error() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "pop3_exporter", "--web.max-concurrent-probes", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert "'-1' is not a whole number >= 0" in completed.stderr


def test_warning_when_the_file_limit_is_too_low_for_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no open file limit here")
    with caplog.at_level(logging.WARNING, logger="pop3_exporter"):
        warn_about_file_limit(soft // 4)
        assert caplog.records == []
        warn_about_file_limit(soft)
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("open file limit is low")
    assert getattr(caplog.records[0], FIELDS_ATTRIBUTE) == {
        "limit": soft,
        "needed": 2 * soft + 64,
        "max_concurrent_probes": soft,
    }
