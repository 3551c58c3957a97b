"""Check that the fast /probe renderer writes exactly what prometheus_client would.

    .venv/bin/python bench/check_render.py [--examples 3000]

For random probe results (hostile label text included) and the Accept headers that
Prometheus and people send, render.ProbeRenderer().render() must return the same bytes and
content type as choose_encoder()'s encoder applied to probe_registry().
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import choose_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pop3_exporter.config import TLSMode
from pop3_exporter.metrics import probe_registry
from pop3_exporter.render import ProbeRenderer
from pop3_exporter.result import ProbeResult
from tests.support.probe_results import ACCEPT_HEADERS, probe_results


def check(examples: int) -> None:
    renderer = ProbeRenderer()
    assert renderer.fast, "the fast renderer failed its self-check; see the warning logged"

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(probe_results, st.sampled_from(TLSMode), st.sampled_from(ACCEPT_HEADERS))
    def same_bytes(result: ProbeResult, tls_mode: TLSMode, accept: str) -> None:
        encoder, content_type = choose_encoder(accept)
        expected = encoder(probe_registry(result, tls_mode))
        body, fast_type = renderer.render(result, tls_mode, accept)
        assert fast_type == content_type, (accept, fast_type, content_type)
        assert body == expected, (accept, body, expected)

    same_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=3000)
    args = parser.parse_args()
    check(args.examples)
    print(f"ProbeRenderer == prometheus_client for {args.examples} random results: OK")


if __name__ == "__main__":
    main()
