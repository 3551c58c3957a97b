"""The HTTP side: /probe, /metrics, /-/healthy, /-/reload, and a landing page with the
probe history and its reports (/probe/history/ID)."""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import logging
import math
import re
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Protocol

from aiohttp import web
from prometheus_client.exposition import choose_encoder, generate_latest

from pop3_exporter import __version__
from pop3_exporter.config import (
    MODULE_NAME_PATTERN,
    Config,
    Module,
    format_duration,
)
from pop3_exporter.credentials import CredentialError
from pop3_exporter.delivery import DeliveryRuntime
from pop3_exporter.errors import TargetError
from pop3_exporter.history import (
    HistoryEntry,
    ProbeHistory,
)
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
from pop3_exporter.selection import ModuleChoiceError, choose_module
from pop3_exporter.settings import Settings
from pop3_exporter.target import ProbeTarget, TargetSpec, parse_target
from pop3_exporter.text import plural
from pop3_exporter.webconfig import BasicAuth

logger = logging.getLogger("pop3_exporter")

SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"


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
HISTORY_KEY = web.AppKey("history", ProbeHistory)
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


def _choose_module(config: Config, spec: TargetSpec, module_name: str | None) -> Module:
    try:
        return choose_module(config, spec, module_name)
    except ModuleChoiceError as exc:
        raise BadRequest(exc.reason, str(exc)) from None


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
    history = app[HISTORY_KEY]
    try:
        result = await app[PROBER_KEY](
            target,
            module,
            timeout,
            ssl_context=runtime.ssl_contexts.get(module.name),
            # The history renders each probe's report from its result when someone
            # opens it, so every probe keeps its transcript while the history is on.
            record_transcript=debug or history.enabled,
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
    finished = time.time()
    metrics.record_probe(module.name, result)
    history.add(result, module, finished)
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
        return web.Response(text=_debug_report(result, module, finished), content_type="text/plain")
    # The same bytes as choose_encoder()'s encoder of probe_registry(), made cheaply.
    body, content_type = app[RENDERER_KEY].render(
        result, module.tls, request.headers.get("Accept", "")
    )
    return web.Response(body=body, headers={"Content-Type": content_type})


def _debug_report(result: ProbeResult, module: Module, finished: float) -> str:
    """The debug=true report; the history renders its entries' reports with this too."""
    from pop3_exporter.debug import debug_report

    registry = probe_registry(result, module.tls)
    return debug_report(result, module, generate_latest(registry).decode(), finished=finished)


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


# The landing page's only style. Its Content-Security-Policy allows exactly this text
# and nothing else: no script at all, no other style, forms only to this server. Every
# piece of text on the page is escaped besides; the policy is the second line of
# defence should an escape ever be missed.
INDEX_STYLE = (
    "table{border-collapse:collapse}th,td{border:1px solid #aaa;padding:2px 6px;"
    "text-align:left}.failure{color:#a00}"
)


def _style_source(style: str) -> str:
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    return f"'sha256-{digest}'"


INDEX_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "Content-Security-Policy": f"default-src 'none'; style-src {_style_source(INDEX_STYLE)};"
        " form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
    }
)
# A report is plain text (never sniffed as HTML); the sandbox gives it no origin and
# no scripts even if a browser were to render it as something else.
REPORT_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "Content-Security-Policy": "default-src 'none'; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'; sandbox",
        "X-Content-Type-Options": "nosniff",
    }
)
# Where a kept probe's debug report is served; ids count up from 1.
HISTORY_PATH = "/probe/history/{id:[1-9][0-9]{0,17}}"


def history_link(entry_id: int) -> str:
    """The report's address relative to the landing page (which may sit behind a
    reverse proxy under a path prefix)."""
    return f"probe/history/{entry_id}"


def _timestamp(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _history_row(entry: HistoryEntry) -> str:
    escape = html.escape
    outcome = "<td>success</td>" if entry.success else '<td class="failure">failure</td>'
    if entry.result is None:
        report = "<td>not kept (over the size bound)</td>"
    else:
        report = f'<td><a href="{escape(history_link(entry.id))}">report</a></td>'
    return (
        f"<tr><td>{escape(_timestamp(entry.started))}</td><td>{escape(entry.target)}</td>"
        f"<td>{escape(entry.module_name)}</td>{outcome}"
        f"<td>{escape(entry.failure_reason or '')}</td>"
        f"<td>{escape(entry.failure_detail or '')}</td>"
        f"<td>{entry.duration_seconds * 1000:.1f} ms</td>{report}</tr>"
    )


def _history_section(history: ProbeHistory) -> str:
    if not history.enabled:
        return "<h2>Recent probes</h2>\n<p>The probe history is off (--history.limit 0).</p>"
    entries = history.newest_first()
    intro = (
        f"<p>The last {plural(len(entries), 'probe')} of at most {history.limit}, newest first"
        " (times in UTC); each report is the text of <code>debug=true</code>.</p>"
    )
    if not entries:
        return f"<h2>Recent probes</h2>\n{intro}"
    rows = "\n".join(_history_row(entry) for entry in entries)
    return f"""<h2>Recent probes</h2>
{intro}
<table id="history"><tr><th>started</th><th>target</th><th>module</th><th>result</th>
<th>failure reason</th><th>detail</th><th>duration</th><th>debug</th></tr>
{rows}
</table>"""


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
<html><head><meta charset="utf-8"><title>POP3 Exporter</title>
<style>{INDEX_STYLE}</style></head>
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
{_history_section(request.app[HISTORY_KEY])}
</body></html>
"""
    return web.Response(text=page, content_type="text/html", headers=INDEX_HEADERS)


async def handle_history_report(request: web.Request) -> web.StreamResponse:
    """GET /probe/history/ID: the debug report of a probe the history keeps, as plain
    text; 404 for an id it does not (never was, or dropped since)."""
    history = request.app[HISTORY_KEY]
    entry_id = int(request.match_info["id"])
    entry = history.get(entry_id)
    if entry is None:
        return web.Response(
            status=404,
            text=f"probe {entry_id} is not in the history (it keeps the last"
            f" {plural(history.limit, 'probe')})\n",
        )
    if entry.result is None:
        return web.Response(
            status=404,
            text=f"the report of probe {entry_id} was not kept: its result was over the"
            f" history's bound of {history.max_entry_bytes} bytes per probe\n",
        )
    text = _debug_report(entry.result, entry.module, entry.finished)
    return web.Response(text=text, content_type="text/plain", headers=REPORT_HEADERS)


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
    settings = app[SETTINGS_KEY]
    app[HISTORY_KEY] = ProbeHistory(
        settings.history_limit,
        max_bytes=settings.history_max_bytes,
        max_entry_bytes=settings.history_max_entry_bytes,
    )
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
    app.router.add_get(HISTORY_PATH, handle_history_report)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/-/healthy", handle_healthy)
    app.router.add_post("/-/reload", handle_reload)
    return app
