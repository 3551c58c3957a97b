"""The HTTP side: /probe, /metrics, /-/healthy, /-/reload and a landing page."""

from __future__ import annotations

import functools
import html
import logging
import math
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from aiohttp import web
from prometheus_client.exposition import choose_encoder, generate_latest

from pop3_exporter import __version__
from pop3_exporter.config import (
    MODULE_NAME_PATTERN,
    Config,
    Module,
    TLSMode,
    format_duration,
)
from pop3_exporter.credentials import CredentialError
from pop3_exporter.delivery import DeliveryRuntime
from pop3_exporter.errors import TargetError
from pop3_exporter.logs import fields
from pop3_exporter.metrics import (
    ExporterMetrics,
    InvalidRequestReason,
    probe_registry,
)
from pop3_exporter.policy import TargetRefusedError
from pop3_exporter.prober import AddressCheck, Pop3Prober
from pop3_exporter.render import ProbeRenderer
from pop3_exporter.resolver import DnsResolver
from pop3_exporter.result import ProbeResult
from pop3_exporter.runtime import ConfigHolder
from pop3_exporter.target import ProbeTarget, TargetSpec, parse_target
from pop3_exporter.webconfig import BasicAuth

logger = logging.getLogger("pop3_exporter")

SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
# The module a bare pop3:// or pop3s:// target implies when no module is named.
SCHEME_MODULES: Mapping[str, str] = MappingProxyType({"pop3": "pop3", "pop3s": "pop3s"})


class Prober(Protocol):
    """What /probe calls, with the probe's timeout in seconds. ``address_check`` is
    passed only when the target policy has address (cidr) rules; it must be called
    with the address right before connecting, and what it raises (TargetRefusedError)
    must propagate."""

    async def __call__(
        self,
        target: ProbeTarget,
        module: Module,
        timeout_seconds: float,
        *,
        ssl_context: ssl.SSLContext | None,
        record_transcript: bool,
        address_check: AddressCheck | None = None,
        delivery: DeliveryRuntime | None = None,
    ) -> ProbeResult: ...


@dataclass(frozen=True, slots=True)
class Settings:
    timeout_offset: float = 0.5
    # Probes allowed in flight at once (0: no limit). Each probe holds two file
    # descriptors (the request's connection and the POP3 socket), so 500 stays well
    # under the usual soft limit of 1024 descriptors, yet allows 50 new probes per
    # second against targets that all run into a 10 s timeout.
    max_concurrent_probes: int = 500


class ProbeGate:
    """Admission to /probe: a cap on probes in flight, closed while shutting down.

    Excess requests are answered at once (503) instead of queued: a queued probe would
    start only after Prometheus had given up on the scrape, and the queue would grow
    for as long as the overload lasts.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.closing = False

    def try_enter(self) -> str | None:
        """None if the probe may run (then call leave()); else the rejection reason."""
        if self.closing:
            return "shutting_down"
        if self.limit and self.active >= self.limit:
            return "concurrency_limit"
        self.active += 1
        return None

    def leave(self) -> None:
        self.active -= 1


CONFIG_KEY = web.AppKey("config", ConfigHolder)
PROBER_KEY = web.AppKey("prober", Prober)
METRICS_KEY = web.AppKey("metrics", ExporterMetrics)
SETTINGS_KEY = web.AppKey("settings", Settings)
GATE_KEY = web.AppKey("gate", ProbeGate)
RENDERER_KEY = web.AppKey("renderer", ProbeRenderer)

# The /probe parameters; any other parameter is refused (see handle_probe).
PROBE_PARAMETERS = frozenset({"target", "module", "debug"})
# Prometheus sends the scrape timeout as a plain decimal ("10", "9.5"); nothing else
# (exponents, "nan", "1_0", which float() would take) is accepted.
_SCRAPE_TIMEOUT_FORMAT = re.compile(r"[0-9]{1,6}(\.[0-9]{1,9})?")
# Retry-After for 503s: probing again within the same scrape would not help anyway.
RETRY_AFTER_SECONDS = 1


class BadRequest(Exception):
    """A /probe request we refuse with HTTP 400 and this one-line reason; ``reason``
    is what pop3_exporter_probe_requests_invalid_total counts it under."""

    def __init__(self, reason: InvalidRequestReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _single(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(
            InvalidRequestReason.REPEATED_PARAMETER, f"parameter '{name}' given more than once"
        )
    return values[0] if values else None


def _check_parameter_names(request: web.Request) -> None:
    for name in request.query:
        if name not in PROBE_PARAMETERS:
            known = ", ".join(sorted(PROBE_PARAMETERS))
            # repr() and a cap: the name is attacker-chosen and goes back in the reply.
            shown = repr(name[:64]) + ("..." if len(name) > 64 else "")
            raise BadRequest(
                InvalidRequestReason.UNKNOWN_PARAMETER,
                f"unknown parameter {shown}; known parameters: {known}",
            )


def _module_name(request: web.Request) -> str | None:
    name = _single(request, "module")
    if name is not None and not MODULE_NAME_PATTERN.fullmatch(name):
        # Checked before the name is echoed in 'unknown module' messages.
        raise BadRequest(
            InvalidRequestReason.BAD_MODULE,
            "parameter 'module' must be 1-64 characters from A-Z a-z 0-9 _ . -",
        )
    return name


def _known_modules(config: Config) -> str:
    return ", ".join(sorted(config.modules))


def _choose_module(config: Config, spec: TargetSpec, module_name: str | None) -> Module:
    if module_name is None:
        if spec.scheme is None:
            raise BadRequest(
                InvalidRequestReason.BAD_MODULE,
                "parameter 'module' is required unless the target is a pop3:// or pop3s:// URL;"
                f" known modules: {_known_modules(config)}",
            )
        module_name = SCHEME_MODULES[spec.scheme]
    module = config.modules.get(module_name)
    if module is None:
        raise BadRequest(
            InvalidRequestReason.UNKNOWN_MODULE,
            f"unknown module {module_name!r}; known modules: {_known_modules(config)}",
        )
    if spec.scheme == "pop3s" and module.tls is not TLSMode.IMPLICIT:
        raise BadRequest(
            InvalidRequestReason.BAD_MODULE,
            f"pop3s:// target needs a module with tls: implicit, not {module.name}",
        )
    if spec.scheme == "pop3" and module.tls is TLSMode.IMPLICIT:
        raise BadRequest(
            InvalidRequestReason.BAD_MODULE,
            f"pop3:// target cannot use the implicit-TLS module {module.name}",
        )
    return module


def probe_timeout(module: Module, header: str | None, offset: float) -> float:
    """min(module timeout, scrape timeout - offset); the scrape timeout alone if the
    offset would leave nothing."""
    if header is None:
        return module.timeout
    invalid = InvalidRequestReason.BAD_SCRAPE_TIMEOUT
    if not _SCRAPE_TIMEOUT_FORMAT.fullmatch(header):
        raise BadRequest(
            invalid, f"header {SCRAPE_TIMEOUT_HEADER} is not a number: {header[:32]!r}"
        )
    try:
        scrape_timeout = float(header)
    except ValueError:
        raise BadRequest(
            invalid, f"header {SCRAPE_TIMEOUT_HEADER} is not a number: {header!r}"
        ) from None
    if not math.isfinite(scrape_timeout) or scrape_timeout <= 0:
        raise BadRequest(invalid, f"header {SCRAPE_TIMEOUT_HEADER} must be above zero")
    budget = scrape_timeout - offset
    if budget <= 0:
        budget = scrape_timeout
    return min(module.timeout, budget)


async def handle_probe(request: web.Request) -> web.StreamResponse:
    """GET /probe?target=T[&module=M][&debug=true|false].

    Request rules (each broken one is HTTP 400 with a one-line reason):
    - only the parameters target, module and debug exist; any other parameter is
      refused rather than ignored, so that a misspelt one (``modul=pop3s``) cannot
      silently change what is probed;
    - each parameter at most once;
    - target: at most 300 characters, printable, no whitespace, control characters
      (CR, LF, NUL) or non-ASCII host names, port 1-65535 (see target.parse_target);
    - module: 1-64 characters from A-Z a-z 0-9 _ . - and a configured module;
    - debug: exactly "true" or "false";
    - header X-Prometheus-Scrape-Timeout-Seconds: a plain decimal above zero.
    Then: a target the policy refuses is HTTP 403 (before or after name resolution),
    and a probe over the in-flight cap, or during shutdown, is HTTP 503.
    """
    app = request.app
    runtime = app[CONFIG_KEY].runtime
    try:
        _check_parameter_names(request)
        raw_target = _single(request, "target")
        if raw_target is None or raw_target == "":
            raise BadRequest(InvalidRequestReason.BAD_TARGET, "parameter 'target' is required")
        try:
            spec = parse_target(raw_target)
        except TargetError as exc:
            raise BadRequest(InvalidRequestReason.BAD_TARGET, f"bad target: {exc}") from None
        module = _choose_module(runtime.config, spec, _module_name(request))
        debug_text = _single(request, "debug")
        if debug_text not in (None, "true", "false"):
            raise BadRequest(
                InvalidRequestReason.BAD_DEBUG, "parameter 'debug' must be true or false"
            )
        debug = debug_text == "true"
        timeout = probe_timeout(
            module, request.headers.get(SCRAPE_TIMEOUT_HEADER), app[SETTINGS_KEY].timeout_offset
        )
    except BadRequest as exc:
        return _invalid(app[METRICS_KEY], exc)

    target = ProbeTarget(spec.host, spec.port or module.port, spec.is_ip_literal)
    metrics = app[METRICS_KEY]
    policy = runtime.config.policy
    try:
        policy.check_target(target.host, target.port, is_ip_literal=target.is_ip_literal)
    except TargetRefusedError as exc:
        return _refused(metrics, target, exc)
    extra: dict[str, AddressCheck] = {}
    if policy.uses_addresses:
        # Only address rules can change the decision once the name is resolved; without
        # them probers need not know about policies at all.
        host = None if target.is_ip_literal else target.host
        extra["address_check"] = functools.partial(policy.check_address, host)

    gate = app[GATE_KEY]
    rejection = gate.try_enter()
    if rejection is not None:
        metrics.probes_rejected.labels(rejection).inc()
        if rejection == "shutting_down":
            return web.Response(status=503, text="exporter is shutting down\n")
        return web.Response(
            status=503,
            text=f"too many probes in flight (limit {gate.limit}); try again later\n",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    metrics.in_flight.inc()
    try:
        result = await app[PROBER_KEY](
            target,
            module,
            timeout,
            ssl_context=runtime.ssl_contexts.get(module.name),
            record_transcript=debug,
            delivery=runtime.deliveries.get(module.name),
            **extra,
        )
    except TargetRefusedError as exc:
        return _refused(metrics, target, exc)
    except CredentialError as exc:
        # The exporter's own setup is broken (a token file gone), not the target: the
        # scrape fails, which the Pop3ProbeScrapeFailing alert catches.
        logger.error("cannot read credentials", extra=fields(module=module.name, err=str(exc)))
        return web.Response(status=500, text=f"cannot read credentials: {exc}\n")
    finally:
        metrics.in_flight.dec()
        gate.leave()
    metrics.record_probe(module.name, result)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "probe done",
            extra=fields(
                target=str(target),
                module=module.name,
                success=result.success,
                reason=result.failure_reason,
                duration_seconds=round(result.duration_seconds, 6),
            ),
        )
    if debug:
        from pop3_exporter.debug import debug_report

        registry = probe_registry(result, module.tls)
        text = debug_report(result, module, generate_latest(registry).decode())
        return web.Response(text=text, content_type="text/plain")
    # The same bytes as choose_encoder()'s encoder of probe_registry(), made cheaply.
    body, content_type = app[RENDERER_KEY].render(
        result, module.tls, request.headers.get("Accept", "")
    )
    return web.Response(body=body, headers={"Content-Type": content_type})


def _invalid(metrics: ExporterMetrics, exc: BadRequest) -> web.Response:
    metrics.probe_requests_invalid.labels(exc.reason.value).inc()
    # Debug, not info: whoever can reach /probe could otherwise flood the log.
    logger.debug("probe request invalid", extra=fields(reason=exc.reason, err=str(exc)))
    return web.Response(status=400, text=f"{exc}\n")


def _refused(
    metrics: ExporterMetrics, target: ProbeTarget, exc: TargetRefusedError
) -> web.Response:
    metrics.probes_refused.labels(exc.reason.value).inc()
    # Debug, not info: whoever can reach /probe could otherwise flood the log.
    logger.debug("probe refused", extra=fields(target=str(target), reason=exc.reason, err=str(exc)))
    return web.Response(status=403, text=f"target refused by policy: {exc}\n")


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[METRICS_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def handle_healthy(request: web.Request) -> web.StreamResponse:
    return web.Response(text="Healthy\n")


async def handle_reload(request: web.Request) -> web.StreamResponse:
    problem = request.app[CONFIG_KEY].reload()
    if problem is not None:
        return web.Response(status=500, text=f"failed to reload config: {problem}\n")
    return web.Response(text="config reloaded\n")


# The landing page's form starts with this module (when configured): implicit TLS on
# port 995 is what most POP3 servers offer today.
INDEX_DEFAULT_MODULE = "pop3s"


def _module_options(config: Config) -> str:
    selected = INDEX_DEFAULT_MODULE if INDEX_DEFAULT_MODULE in config.modules else None
    return "".join(
        f'<option value="{html.escape(name)}"{" selected" if name == selected else ""}>'
        f"{html.escape(name)}</option>"
        for name in sorted(config.modules)
    )


async def handle_index(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY].runtime.config
    rows = "\n".join(
        f"<tr><td>{html.escape(name)}</td><td>{module.tls}</td><td>{module.port}</td>"
        f"<td>{format_duration(module.timeout)}</td></tr>"
        for name, module in sorted(config.modules.items())
    )
    # No port in the placeholder: a target without one gets the module's port (see the
    # table), so the example fits whichever module is selected.
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>POP3 Exporter</title></head>
<body>
<h1>POP3 Exporter {html.escape(__version__)}</h1>
<form action="probe" method="get">
<label>Target: <input type="text" name="target" placeholder="pop.example.com"
 title="host or host:port; without a port, the module's port"></label>
<label>Module: <select name="module">{_module_options(config)}</select></label>
<label>Debug: <input type="checkbox" name="debug" value="true"></label>
<input type="submit" value="Probe">
</form>
<ul>
<li><a href="metrics">Metrics</a> (the exporter's own)</li>
<li><a href="-/healthy">Health</a></li>
</ul>
<h2>Modules (from {html.escape(config.source)})</h2>
<table><tr><th>name</th><th>tls</th><th>port</th><th>timeout</th></tr>
{rows}
</table>
</body></html>
"""
    return web.Response(text=page, content_type="text/html")


def create_app(
    holder: ConfigHolder,
    *,
    prober: Prober | None = None,
    settings: Settings | None = None,
    auth: BasicAuth | None = None,
    renderer: ProbeRenderer | None = None,
) -> web.Application:
    """Application factory; everything it needs is passed in (no module globals).

    With ``auth`` every route (and every unknown path) needs basic auth; the app
    closes it on cleanup.
    """
    app = web.Application(middlewares=[auth.middleware()] if auth is not None else [])
    app[CONFIG_KEY] = holder
    app[METRICS_KEY] = holder.metrics
    app[PROBER_KEY] = prober or Pop3Prober(DnsResolver())
    app[SETTINGS_KEY] = settings or Settings()
    gate = ProbeGate(app[SETTINGS_KEY].max_concurrent_probes)
    app[GATE_KEY] = gate
    # Its self-check against prometheus_client runs here, once per application.
    app[RENDERER_KEY] = renderer or ProbeRenderer()

    async def close_gate(app: web.Application) -> None:
        # on_shutdown runs once the listener is closed and before aiohttp waits for
        # running handlers: probes in flight finish, new ones on kept-alive
        # connections are turned away.
        gate.closing = True

    app.on_shutdown.append(close_gate)
    if auth is not None:

        async def close_auth(app: web.Application) -> None:
            auth.close()

        app.on_cleanup.append(close_auth)
    app.router.add_get("/", handle_index)
    app.router.add_get("/probe", handle_probe)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/-/healthy", handle_healthy)
    app.router.add_post("/-/reload", handle_reload)
    return app
