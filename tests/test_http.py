"""The HTTP surface with the prober replaced, plus one real probe of a fake server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from pop3_exporter.config import MODULE_SECTION
from pop3_exporter.http import create_app
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.prober import Pop3Prober
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.runtime import ConfigHolder
from tests.support.exposition import (
    labelled,
    parse_samples,
    promtool_check_metrics,
    value,
)
from tests.support.fakepop3 import FakePop3Server, dialogue
from tests.support.fakeprober import FakeProber

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


async def make_client(
    aiohttp_client: ClientFactory,
    prober: object,
    config_path: Path | None = None,
) -> tuple[Client, ConfigHolder]:
    holder = ConfigHolder(str(config_path) if config_path else None, ExporterMetrics())
    app = create_app(holder, prober=prober)  # type: ignore[arg-type]
    return await aiohttp_client(app), holder


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({}, "parameter 'target' is required"),
        ({"target": ""}, "parameter 'target' is required"),
        (
            {"target": "pop.example.com"},
            "parameter 'module' is required unless the target is a pop3:// or pop3s:// URL;"
            " known modules: pop3, pop3_starttls, pop3s",
        ),
        (
            {"target": "pop.example.com", "module": "imap"},
            "unknown module 'imap'; known modules: pop3, pop3_starttls, pop3s",
        ),
        ({"target": "pop.example.com:99999", "module": "pop3"}, "bad target: port 99999"),
        ({"target": "pop3s://h", "module": "pop3"}, "pop3s:// target needs a module"),
        ({"target": "pop3://h", "module": "pop3s"}, "pop3:// target cannot use"),
        ({"target": "h", "module": "pop3", "debug": "yes"}, "'debug' must be true or false"),
    ],
)
async def test_bad_requests_are_400_with_reason(
    aiohttp_client: ClientFactory, query: dict[str, str], message: str
) -> None:
    prober = FakeProber()
    client, _ = await make_client(aiohttp_client, prober)
    response = await client.get("/probe", params=query)
    text = await response.text()
    assert response.status == 400
    assert message in text and text.endswith("\n") and text.count("\n") == 1
    assert prober.calls == []


async def test_repeated_parameter_is_400(aiohttp_client: ClientFactory) -> None:
    client, _ = await make_client(aiohttp_client, FakeProber())
    response = await client.get("/probe?target=a&target=b&module=pop3")
    assert response.status == 400
    assert "given more than once" in await response.text()


async def test_failed_probe_is_http_200(aiohttp_client: ClientFactory) -> None:
    client, _holder = await make_client(aiohttp_client, FakeProber(success=False))
    response = await client.get("/probe", params={"target": "h", "module": "pop3"})
    assert response.status == 200
    samples = parse_samples(await response.text())
    assert value(samples, "probe_success") == 0
    assert labelled(samples, "probe_pop3_failure", "reason")["connect_refused"] == 1
    metrics = parse_samples(await (await client.get("/metrics")).text())
    assert value(metrics, "pop3_exporter_probes_total", module="pop3", result="failure") == 1


async def test_module_port_and_deadline_reach_the_prober(aiohttp_client: ClientFactory) -> None:
    prober = FakeProber()
    client, _ = await make_client(aiohttp_client, prober)
    await client.get("/probe", params={"target": "pop3s://mail.test"})
    await client.get(
        "/probe",
        params={"target": "[::1]", "module": "pop3_starttls"},
        headers={"X-Prometheus-Scrape-Timeout-Seconds": "3"},
    )
    first, second = prober.calls
    assert (str(first.target), first.module.name) == ("mail.test:995", "pop3s")
    assert first.timeout == pytest.approx(10.0, abs=0.1)
    assert (str(second.target), second.module.name) == ("[::1]:110", "pop3_starttls")
    assert second.timeout == pytest.approx(2.5, abs=0.1)


async def test_content_negotiation(aiohttp_client: ClientFactory) -> None:
    client, _ = await make_client(aiohttp_client, FakeProber())
    params = {"target": "h", "module": "pop3"}
    plain = await client.get("/probe", params=params)
    assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    open_metrics = await client.get(
        "/probe", params=params, headers={"Accept": "application/openmetrics-text"}
    )
    assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
    body = await open_metrics.text()
    assert body.rstrip().endswith("# EOF")
    metrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert (await metrics.text()).rstrip().endswith("# EOF")


async def test_metrics_endpoint(aiohttp_client: ClientFactory) -> None:
    client, _ = await make_client(aiohttp_client, FakeProber())
    await client.get("/probe", params={"target": "h", "module": "pop3"})
    text = await (await client.get("/metrics")).text()
    promtool_check_metrics(text)
    samples = parse_samples(text)
    assert value(samples, "pop3_exporter_probes_total", module="pop3", result="success") == 1
    assert value(samples, "pop3_exporter_probe_duration_seconds_count", module="pop3") == 1
    assert value(samples, "pop3_exporter_probes_in_flight") == 0
    assert value(samples, "pop3_exporter_config_last_reload_successful") == 1
    assert (value(samples, "pop3_exporter_config_last_reload_success_timestamp_seconds") or 0) > 0
    build = [labels for (name, labels) in samples if name == "pop3_exporter_build_info"]
    assert build and dict(build[0])["version"]
    assert value(samples, "process_open_fds") is not None


async def test_in_flight_gauge_counts_running_probes(aiohttp_client: ClientFactory) -> None:
    prober = FakeProber(delay=0.5)
    client, _ = await make_client(aiohttp_client, prober)
    task = asyncio.create_task(client.get("/probe", params={"target": "h", "module": "pop3"}))
    for _ in range(100):
        if prober.calls:
            break
        await asyncio.sleep(0.01)
    samples = parse_samples(await (await client.get("/metrics")).text())
    assert value(samples, "pop3_exporter_probes_in_flight") == 1
    await task


async def test_client_disconnect_cancels_probe(aiohttp_client: ClientFactory) -> None:
    prober = FakeProber(delay=30)
    client, _ = await make_client(aiohttp_client, prober)
    request = asyncio.create_task(client.get("/probe", params={"target": "h", "module": "pop3"}))
    for _ in range(200):
        if prober.calls:
            break
        await asyncio.sleep(0.01)
    assert prober.calls, "the probe never started"
    request.cancel()  # the scraper gives up and closes the connection
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(prober.cancelled.wait(), timeout=5)
    assert prober.cancelled.is_set()


async def test_health_index_and_reload_methods(aiohttp_client: ClientFactory) -> None:
    client, _ = await make_client(aiohttp_client, FakeProber())
    healthy = await client.get("/-/healthy")
    assert healthy.status == 200 and (await healthy.text()) == "Healthy\n"
    index = await client.get("/")
    page = await index.text()
    assert index.status == 200
    for link in ('href="metrics"', 'href="-/healthy"', ">pop3_starttls<", 'action="probe"'):
        assert link in page
    # The form's example target has no port: the selected module's port applies, and the
    # module selected first is pop3s (port 995), the common case.
    assert 'placeholder="pop.example.com"' in page
    assert re.findall(r"<option[^>]* selected>([^<]*)<", page) == ["pop3s"]
    assert "<td>pop3s</td><td>implicit</td><td>995</td><td>10s</td>" in page
    assert (await client.get("/-/reload")).status == 405


async def test_reload_keeps_old_config_when_new_one_is_bad(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    path = tmp_path / "c.yml"
    path.write_text("modules:\n  first: {}\n")
    client, holder = await make_client(aiohttp_client, FakeProber(), path)
    path.write_text("modules:\n  second: {}\n")
    ok = await client.post("/-/reload")
    assert ok.status == 200
    assert "second" in holder.runtime.config.modules
    assert "first" not in holder.runtime.config.modules
    path.write_text("modules:\n  third:\n    bogus: 1\n")
    bad = await client.post("/-/reload")
    assert bad.status == 500
    assert await bad.text() == (
        f"failed to reload config: 1 error:\n{path}:3: modules.third.bogus: unknown key"
        f" (known: {', '.join(sorted(MODULE_SECTION.keys))})\n"
    )
    assert "second" in holder.runtime.config.modules  # the old config stays
    samples = parse_samples(await (await client.get("/metrics")).text())
    assert value(samples, "pop3_exporter_config_last_reload_successful") == 0
    response = await client.get("/probe", params={"target": "h", "module": "second"})
    assert response.status == 200


async def test_debug_output_shows_transcript_tls_module_and_metrics(
    aiohttp_client: ClientFactory,
) -> None:
    client, _ = await make_client(
        aiohttp_client, Pop3Prober(StaticResolver({"pop.test": ["127.0.0.1"]}))
    )
    script = dialogue(greeting=b"+OK hello \x1b[31mred\r\n")
    async with FakePop3Server(script) as server:
        response = await client.get(
            "/probe",
            params={"target": f"pop.test:{server.port}", "module": "pop3", "debug": "true"},
        )
    text = await response.text()
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "Result: success" in text
    assert "resolved pop.test to 127.0.0.1" in text
    assert " C: CAPA" in text and " S: +OK hello \\x1b[31mred" in text
    assert "\x1b" not in text  # control characters are escaped, never passed through
    assert " C: QUIT" in text
    # The module as YAML: the pattern as written in a config file, not a Python repr.
    assert "Module pop3, as a configuration file:\nmodules:\n  pop3:\n" in text
    assert "    expect_greeting: ^\\+OK\n" in text
    assert "(no TLS handshake)" in text
    assert "probe_success 1.0" in text


async def test_real_probe_of_fake_server_passes_promtool(aiohttp_client: ClientFactory) -> None:
    client, _ = await make_client(aiohttp_client, Pop3Prober(StaticResolver({})))
    async with FakePop3Server(dialogue()) as server:
        response = await client.get(
            "/probe", params={"target": f"127.0.0.1:{server.port}", "module": "pop3"}
        )
    text = await response.text()
    promtool_check_metrics(text)
    samples = parse_samples(text)
    assert value(samples, "probe_success") == 1
    assert value(samples, "probe_pop3_plaintext_auth_exposed") == 1
