"""The fast /probe renderer must write exactly what prometheus_client writes, and the
renderer must notice at start when it does not and serve prometheus_client's bytes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import prometheus_client.exposition
import prometheus_client.openmetrics.exposition
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

import pop3_exporter.render
from pop3_exporter.config import TLSMode
from pop3_exporter.http import RENDERER_KEY, create_app
from pop3_exporter.logs import FIELDS_ATTRIBUTE
from pop3_exporter.metrics import ExporterMetrics, ProbeFamily, probe_registry
from pop3_exporter.render import (
    SELF_CHECK_ACCEPT_HEADERS,
    ProbeRenderer,
    canned_families,
    render_families,
)
from pop3_exporter.result import Capabilities, ProbeResult
from pop3_exporter.runtime import ConfigHolder
from tests.support.fakeprober import FakeProber, canned_result
from tests.support.probe_results import ACCEPT_HEADERS, probe_results

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]
# One for the property test: its self-check is not what that test is about.
_RENDERER = ProbeRenderer()
_go_float = cast(Callable[[float], str], floatToGoString)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(probe_results, st.sampled_from(TLSMode), st.sampled_from(ACCEPT_HEADERS))
def test_render_probe_matches_prometheus_client(
    result: ProbeResult, tls_mode: TLSMode, accept: str
) -> None:
    assert _RENDERER.fast
    encoder, content_type = choose_encoder(accept)
    expected = encoder(probe_registry(result, tls_mode))
    body, fast_type = _RENDERER.render(result, tls_mode, accept)
    assert fast_type == content_type
    assert body == expected


def test_self_check_passes_and_logs_nothing_with_this_prometheus_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # If this fails after a prometheus_client upgrade, the exporter still serves correct
    # bytes (through the fallback), only slower: render_families needs to catch up.
    with caplog.at_level(logging.WARNING, logger="pop3_exporter"):
        assert ProbeRenderer().fast
    assert caplog.records == []


def test_canned_families_hold_what_the_check_is_for() -> None:
    """The canned input is rich enough to catch differences where they would show:
    escaped label values, several families, TLS facts, special float values."""
    text = b"".join(render_families(families, False) for families in canned_families())
    for needed in (
        rb"probe_ssl_last_chain_info{",  # TLS, five labels sorted by name
        r"Back\\slash \"Quoted\" Örg".encode(),  # escaping and UTF-8 in a label value
        rb'zeta="line\nbreak"',  # a newline in a label value
        rb"probe_tls_version_info{",
        b"NaN\n",
        b"+Inf\n",
        b"-Inf\n",
        b"-0.0\n",
        b"e-07\n",
        b"e+21\n",
        b"5e-324\n",
    ):
        assert needed in text, needed
    assert len({families[0].name for families in canned_families()}) >= 2


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a log record (pop3_exporter.logs.fields)."""
    values = getattr(record, FIELDS_ATTRIBUTE)
    assert isinstance(values, dict)
    return values


def _broken_renderer(calls: list[bool]) -> Callable[[Iterable[ProbeFamily], bool], bytes]:
    """Writes "1" where prometheus_client writes "1.0": the kind of difference a
    future prometheus_client could bring the other way round."""

    def render(families: Iterable[ProbeFamily], open_metrics: bool) -> bytes:
        calls.append(open_metrics)
        return render_families(families, open_metrics).replace(b" 1.0\n", b" 1\n")

    return render


def _sample_result() -> ProbeResult:
    """A result that is none of the canned ones."""
    return ProbeResult(
        target="pop.example.net:995",
        module_name="pop3s",
        timeout_seconds=5.0,
        duration_seconds=0.25,
        success=True,
        failure_reason=None,
        failure_detail=None,
        failed_phase=None,
        phase_durations=(),
        dns_lookup_seconds=0.001,
        ip_protocol=4,
        address="127.0.0.1",
        greeting="+OK",
        greeting_seconds=0.1,
        greeting_match=True,
        capabilities=Capabilities(names=("UIDL",), unregistered=0),
        plaintext_auth_exposed=None,
        tls=None,
    )


def test_a_renderer_that_differs_is_replaced_by_prometheus_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[bool] = []
    with caplog.at_level(logging.WARNING, logger="pop3_exporter"):
        renderer = ProbeRenderer(fast=_broken_renderer(calls))
    assert not renderer.fast
    assert calls, "the self-check never ran the fast renderer"
    [record] = caplog.records  # one warning, not one per format or per family list
    assert record.levelno == logging.WARNING
    # The first differing line is a field of its own, both ways.
    assert _fields(record)["expected_line"].endswith(" 1.0")
    assert _fields(record)["rendered_line"] == _fields(record)["expected_line"][: -len(".0")]
    assert _fields(record)["line_number"] >= 3  # after HELP and TYPE
    assert _fields(record)["accept_header"] in SELF_CHECK_ACCEPT_HEADERS
    assert "1.0" not in record.getMessage()

    calls.clear()
    result = _sample_result()
    for accept in SELF_CHECK_ACCEPT_HEADERS:
        encoder, content_type = choose_encoder(accept)
        body, served_type = renderer.render(result, TLSMode.IMPLICIT, accept)
        assert (body, served_type) == (
            encoder(probe_registry(result, TLSMode.IMPLICIT)),
            content_type,
        )
        assert b"probe_success 1.0\n" in body
    assert calls == [], "the broken renderer was used after it failed its self-check"
    assert len(caplog.records) == 1, "rendering must not warn again"


def test_a_renderer_that_raises_is_replaced_by_prometheus_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(families: Iterable[ProbeFamily], open_metrics: bool) -> bytes:
        raise KeyError("gone")

    with caplog.at_level(logging.WARNING, logger="pop3_exporter"):
        renderer = ProbeRenderer(fast=explode)
    assert not renderer.fast
    [record] = caplog.records
    assert "KeyError" in _fields(record)["error"]
    result = _sample_result()
    body, _ = renderer.render(result, TLSMode.NONE, "")
    assert body == prometheus_client.exposition.generate_latest(
        probe_registry(result, TLSMode.NONE)
    )


def test_a_changed_prometheus_client_is_followed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What the check is for: prometheus_client changes how it writes a sample value
    (simulated in both encoders), the fast renderer does not, so /probe must follow
    prometheus_client."""

    def changed(value: float) -> str:
        return _go_float(value).removesuffix(".0")

    monkeypatch.setattr(prometheus_client.exposition, "floatToGoString", changed)
    monkeypatch.setattr(prometheus_client.openmetrics.exposition, "floatToGoString", changed)
    with caplog.at_level(logging.WARNING, logger="pop3_exporter"):
        renderer = ProbeRenderer()
    assert not renderer.fast
    [record] = caplog.records
    assert _fields(record)["rendered_line"].endswith(".0")
    result = _sample_result()
    for accept in ("", "application/openmetrics-text;version=1.0.0"):
        body, _ = renderer.render(result, TLSMode.IMPLICIT, accept)
        assert b"probe_success 1\n" in body
        assert body == choose_encoder(accept)[0](probe_registry(result, TLSMode.IMPLICIT))


async def test_probe_endpoint_serves_prometheus_client_bytes_after_a_failed_check(
    aiohttp_client: ClientFactory,
) -> None:
    calls: list[bool] = []
    holder = ConfigHolder(None, ExporterMetrics())
    broken = ProbeRenderer(fast=_broken_renderer(calls))
    prober = FakeProber()
    app = create_app(holder, prober=prober, renderer=broken)
    assert app[RENDERER_KEY] is broken
    client = await aiohttp_client(app)
    calls.clear()
    accept = "application/openmetrics-text;version=1.0.0"
    reply = await client.get(
        "/probe", params={"target": "127.0.0.1:110", "module": "pop3"}, headers={"Accept": accept}
    )
    assert reply.status == 200
    [call] = prober.calls
    encoder, content_type = choose_encoder(accept)
    result = canned_result(call.target, call.module)
    assert await reply.read() == encoder(probe_registry(result, call.module.tls))
    assert reply.headers["Content-Type"] == content_type
    assert calls == []


async def test_create_app_checks_its_own_renderer(aiohttp_client: ClientFactory) -> None:
    app = create_app(ConfigHolder(None, ExporterMetrics()), prober=FakeProber())
    assert app[RENDERER_KEY].fast
    client = await aiohttp_client(app)
    reply = await client.get("/probe", params={"target": "127.0.0.1:110", "module": "pop3"})
    assert reply.status == 200
    assert b"probe_success 1.0\n" in await reply.read()


def test_an_encoder_the_self_check_did_not_cover_is_left_to_prometheus_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if prometheus_client picked an encoder for OpenMetrics that no header of the
    # self-check led to: the fast renderer is trusted only with what it was checked on.
    monkeypatch.setattr(pop3_exporter.render, "SELF_CHECK_ACCEPT_HEADERS", ("",))
    calls: list[bool] = []

    def counting(families: Iterable[ProbeFamily], open_metrics: bool) -> bytes:
        calls.append(open_metrics)
        return render_families(families, open_metrics)

    renderer = ProbeRenderer(fast=counting)
    assert renderer.fast and set(calls) == {False}
    calls.clear()
    result = _sample_result()
    for accept, fast_used in (
        ("application/openmetrics-text;version=1.0.0", False),
        ("text/plain;version=0.0.4", True),
    ):
        encoder, content_type = choose_encoder(accept)
        body, served_type = renderer.render(result, TLSMode.NONE, accept)
        assert (body, served_type) == (encoder(probe_registry(result, TLSMode.NONE)), content_type)
        assert calls == ([False] if fast_used else []), accept
        calls.clear()
