"""The /probe body as the exporter's renderer makes it, for tests that check bytes."""

from __future__ import annotations

from pop3_exporter.config import TLSMode
from pop3_exporter.render import ProbeRenderer
from pop3_exporter.result import ProbeResult

# One self-check for all the tests that use it; what it decided never changes.
_RENDERER = ProbeRenderer()


def render_probe(result: ProbeResult, tls_mode: TLSMode, accept_header: str) -> tuple[bytes, str]:
    """(body, content type) of the /probe reply for `result`."""
    return _RENDERER.render(result, tls_mode, accept_header)
