"""Command line: flags in Prometheus style, logging, signals, serving."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pop3_exporter import __version__
from pop3_exporter.config import InvalidConfigError, parse_duration
from pop3_exporter.errors import ConfigError
from pop3_exporter.logs import LOG_FORMATS, LOG_LEVELS, fields, setup_logging
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.prober import Pop3Prober
from pop3_exporter.resolver import DNS_PORT, DnsResolver, ip_literal
from pop3_exporter.runtime import ConfigHolder, load_runtime, log_problems, module_names
from pop3_exporter.settings import Settings

# The web server (aiohttp) is imported where it serves, not here: the probe command,
# run once per check by Nagios and friends, starts in half the time without it.
if TYPE_CHECKING:
    from pop3_exporter.http import Prober
    from pop3_exporter.webconfig import BasicAuth

DEFAULT_LISTEN_ADDRESS = ":10110"
# Longer than the default module timeout (10 s), so that a probe started just before
# SIGTERM can still finish; shorter than Kubernetes' default 30 s before SIGKILL.
SHUTDOWN_GRACE_SECONDS = 15.0
# Descriptors besides those of probes: listener, logging, a few idle connections.
_SPARE_FILE_DESCRIPTORS = 64

logger = logging.getLogger("pop3_exporter")


def parse_listen_address(text: str) -> tuple[str | None, int]:
    """ ":10110" (all interfaces), "127.0.0.1:10110", "[::1]:10110"; port 0 means any
    free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"listen address {text!r} is not HOST:PORT")
    if not 0 <= int(port_text) <= 65535:
        raise ValueError(
            f"listen address {text!r}: port {int(port_text)} is out of range 0-65535"
            " (0: any free port)"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port_text)


def parse_dns_server(text: str) -> tuple[str, int]:
    """ "127.0.0.1:53", "[::1]:5353", or a bare address meaning port 53. Only addresses:
    a name would itself need resolving."""
    if ip_literal(text) is not None:
        return text, DNS_PORT
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif text.startswith("[") and text.endswith("]"):
        host, sep, port_text = text[1:-1], ":", str(DNS_PORT)
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if (
        not sep
        or ip_literal(host) is None
        or not (port_text.isascii() and port_text.isdigit())
        or not 0 < int(port_text) <= 65535
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ADDRESS:PORT with an IP address and a port 1-65535"
        )
    return host, int(port_text)


def duration_flag(text: str) -> float:
    """A flag value in seconds: a Prometheus duration ("15s", "1m") or a plain number."""
    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return seconds


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


EPILOG = """\
probing:
  GET /probe?target=HOST[:PORT]&module=MODULE   metrics of one probe, for Prometheus
  add &debug=true for the transcript of the probe; a target without a port gets the
  module's port. Built-in modules: pop3 (110, plain), pop3_starttls (110, STLS),
  pop3s (995, implicit TLS). The landing page (/) has a form for trying targets.

documentation: README.md and docs/ in the source repository (configuration, metrics
and failure reasons, security, deployment).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pop3_exporter",
        description="Prometheus exporter that probes POP3 servers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        default=None,
        help="YAML file with probe modules (default: only the built-in modules).",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=DEFAULT_LISTEN_ADDRESS,
        help=f"Address to listen on (default {DEFAULT_LISTEN_ADDRESS}).",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        choices=LOG_LEVELS,
        help="Only log messages at this level or above; debug also logs every probe"
        " (default info).",
    )
    parser.add_argument(
        "--log.format",
        dest="log_format",
        default="logfmt",
        choices=LOG_FORMATS,
        help="Log lines as logfmt key=value fields (as Prometheus exporters write them) or"
        " as one JSON object each, with the same fields (default logfmt).",
    )
    parser.add_argument(
        "--timeout-offset",
        dest="timeout_offset",
        type=float,
        default=Settings().timeout_offset,
        help="Seconds subtracted from Prometheus's scrape timeout to get the probe deadline"
        f" (default {Settings().timeout_offset:g}).",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        help="exporter-toolkit web config (tls_server_config, basic_auth_users) for TLS"
        " and basic auth on every endpoint.",
    )
    parser.add_argument(
        "--web.max-concurrent-probes",
        dest="max_concurrent_probes",
        type=non_negative_int,
        default=Settings().max_concurrent_probes,
        help="Probes allowed in flight at once; more get HTTP 503 with Retry-After at once"
        f" (0: no limit; default {Settings().max_concurrent_probes}).",
    )
    parser.add_argument(
        "--web.shutdown-grace",
        dest="shutdown_grace",
        type=duration_flag,
        default=SHUTDOWN_GRACE_SECONDS,
        help="On SIGTERM/SIGINT, how long probes in flight may run on before they are"
        f" cancelled (default {SHUTDOWN_GRACE_SECONDS:g}s).",
    )
    parser.add_argument(
        "--history.limit",
        dest="history_limit",
        type=non_negative_int,
        default=Settings().history_limit,
        metavar="N",
        help="Probes the landing page lists, each with its debug report (0: no history;"
        f" default {Settings().history_limit}). Memory stays under"
        f" {Settings().history_max_bytes // 2**20} MiB however large N is.",
    )
    parser.add_argument(
        "--dns.server",
        dest="dns_server",
        type=parse_dns_server,
        default=None,
        metavar="ADDRESS:PORT",
        help="DNS server to resolve targets with, e.g. 127.0.0.1:53 or [::1]:5353 (a bare"
        " address means port 53); default: the system's resolv.conf and hosts file.",
    )
    parser.add_argument(
        "--state.directory",
        dest="state_directory",
        type=Path,
        default=default_state_directory(),
        metavar="DIR",
        help="Where the exporter keeps state: the key that marks its delivery-probe messages"
        " (delivery.key, made at first start). Default: $STATE_DIRECTORY (systemd's"
        " StateDirectory=) or /var/lib/pop3_exporter.",
    )
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="Check --config.file (and the files it names) and --web.config.file when"
        " given, print every problem found as FILE:LINE: KEY: message, and exit"
        " (0 valid, 1 invalid).",
    )
    parser.add_argument("--version", action="version", version=f"pop3_exporter {__version__}")
    # Imported here: check.py builds on this module's flag types.
    from pop3_exporter.check import add_probe_command

    add_probe_command(parser)
    return parser


def default_state_directory() -> Path:
    # systemd's StateDirectory= sets $STATE_DIRECTORY (a list when several are named).
    configured = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(configured or "/var/lib/pop3_exporter")


def check_config(
    path: str | None, web_config_path: str | None = None, state_directory: Path | None = None
) -> int:
    """--config.check: every problem of both files, one per line on stderr; what is
    valid on stdout. 0 if all is valid, else 1. It creates no file."""
    problems: list[str] = []
    try:
        runtime = load_runtime(path, state_directory, create_keys=False)
    except InvalidConfigError as exc:
        problems += [str(problem) for problem in exc.problems]
    else:
        for warning in runtime.config.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        names = ", ".join(sorted(runtime.config.modules))
        if path is None:
            print(f"no --config.file given: the built-in modules are valid; modules: {names}")
        else:
            print(f"{path}: valid; modules: {names}")
    if web_config_path is not None:
        try:
            check_web_config(web_config_path)
        except ConfigError as exc:
            problems += str(exc).splitlines()
        else:
            print(f"{web_config_path}: valid web configuration")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


async def serve(
    holder: ConfigHolder,
    listen_address: str,
    settings: Settings,
    *,
    ssl_context: ssl.SSLContext | None = None,
    auth: BasicAuth | None = None,
    shutdown_grace: float = SHUTDOWN_GRACE_SECONDS,
    prober: Prober | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully: the listener closes at
    once, probes in flight get ``shutdown_grace`` seconds to finish (new probes on
    kept-alive connections get 503), the rest are cancelled."""
    from aiohttp import web

    from pop3_exporter.http import GATE_KEY, create_app

    host, port = parse_listen_address(listen_address)
    app = create_app(holder, settings=settings, auth=auth, prober=prober)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        # aiohttp treats 0 as "wait forever"; a grace of 0 means "do not wait".
        shutdown_timeout=max(shutdown_grace, 0.001),
    )
    # Signal handlers first: once the listener answers (a health check may pass while
    # site.start() is still running), a SIGTERM must already mean "shut down cleanly".
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, holder.reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    logger.info(
        "listening",
        extra=fields(
            address=listen_address,
            scheme="https" if ssl_context is not None else "http",
            version=__version__,
        ),
    )
    try:
        await stop.wait()
        # Probes in flight get up to grace_seconds to finish.
        logger.info(
            "shutting down",
            extra=fields(probes_in_flight=app[GATE_KEY].active, grace_seconds=shutdown_grace),
        )
    finally:
        await runner.cleanup()
    logger.info("shut down")


def check_web_config(path: str) -> None:
    from pop3_exporter.webconfig import build_server_ssl_context, load_web_config

    """Raise ConfigError if the web config or a file it names does not load."""
    web_config = load_web_config(path)
    if web_config.tls_server_config is not None:
        build_server_ssl_context(web_config.tls_server_config, web_config.source, web_config.lines)


def warn_about_file_limit(max_concurrent_probes: int) -> None:
    """Each probe in flight holds two descriptors; running out of them fails accept()
    and connect() for everyone, which the probe cap is there to prevent."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * max_concurrent_probes + _SPARE_FILE_DESCRIPTORS
    if max_concurrent_probes and soft != resource.RLIM_INFINITY and needed > soft:
        logger.warning(
            "open file limit is low for --web.max-concurrent-probes (each probe needs 2"
            " descriptors); raise it (ulimit -n) or lower the cap",
            extra=fields(limit=soft, needed=needed, max_concurrent_probes=max_concurrent_probes),
        )


def run_command(args: argparse.Namespace, arguments: Sequence[str]) -> int:
    """A subcommand (today only `probe`); the exporter's own flags do not apply to it."""
    from pop3_exporter.check import State, Verdict, render, run_probe_command

    if arguments[:1] != [args.command]:
        # Flags before the command would be parsed as the server's and then ignored.
        message = f"put {args.command} first: pop3_exporter {args.command} TARGET [FLAGS]"
        sys.stdout.write(render(Verdict(State.UNKNOWN, message)))
        return int(State.UNKNOWN)
    return run_probe_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(arguments)
    if args.command is not None:
        return run_command(args, arguments)
    setup_logging(args.log_level, args.log_format)
    if args.config_check:
        return check_config(args.config_file, args.web_config_file, args.state_directory)
    try:
        parse_listen_address(args.listen_address)
    except ValueError as exc:
        logger.error("invalid --web.listen-address", extra=fields(err=str(exc)))
        return 2
    metrics = ExporterMetrics()
    try:
        holder = ConfigHolder(args.config_file, metrics, args.state_directory)
    except InvalidConfigError as exc:
        log_problems(exc.problems)
        logger.error(
            "cannot load configuration",
            extra=fields(file=args.config_file, errors=len(exc.problems)),
        )
        return 1
    from pop3_exporter.webconfig import BasicAuth, build_server_ssl_context, load_web_config

    ssl_context: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    if args.web_config_file is not None:
        try:
            web_config = load_web_config(args.web_config_file)
            if web_config.tls_server_config is not None:
                ssl_context = build_server_ssl_context(
                    web_config.tls_server_config, web_config.source, web_config.lines
                )
        except ConfigError as exc:
            for line in str(exc).splitlines():
                logger.error(
                    "cannot load web configuration",
                    extra=fields(file=args.web_config_file, err=line),
                )
            return 1
        if web_config.basic_auth_users:
            auth = BasicAuth(web_config.basic_auth_users)
            if ssl_context is None:
                logger.warning("basic auth without TLS: passwords cross the network in clear")
    settings = Settings(
        timeout_offset=args.timeout_offset,
        max_concurrent_probes=args.max_concurrent_probes,
        history_limit=args.history_limit,
    )
    warn_about_file_limit(settings.max_concurrent_probes)
    config = holder.runtime.config
    logger.info(
        "starting pop3_exporter",
        extra=fields(version=__version__, config_file=config.source, modules=module_names(config)),
    )
    try:
        asyncio.run(
            serve(
                holder,
                args.listen_address,
                settings,
                ssl_context=ssl_context,
                auth=auth,
                shutdown_grace=args.shutdown_grace,
                prober=Pop3Prober(DnsResolver(args.dns_server)),
            )
        )
    except OSError as exc:
        logger.error("cannot serve", extra=fields(address=args.listen_address, err=str(exc)))
        return 1
    return 0
