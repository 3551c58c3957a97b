"""The fast /probe renderer must write exactly what prometheus_client writes."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import choose_encoder

from pop3_exporter.config import TLSMode
from pop3_exporter.metrics import probe_registry, render_probe
from pop3_exporter.result import ProbeResult
from tests.support.probe_results import ACCEPT_HEADERS, probe_results


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
    encoder, content_type = choose_encoder(accept)
    expected = encoder(probe_registry(result, tls_mode))
    body, fast_type = render_probe(result, tls_mode, accept)
    assert fast_type == content_type
    assert body == expected
