"""Command line: flags in Prometheus style, logging, signals, serving."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence

from aiohttp import web

from pop3_exporter import __version__
from pop3_exporter.config import load_config
from pop3_exporter.errors import ConfigError
from pop3_exporter.http import ConfigHolder, Settings, build_runtime, create_app
from pop3_exporter.metrics import ExporterMetrics

DEFAULT_LISTEN_ADDRESS = ":10110"
SHUTDOWN_GRACE_SECONDS = 10.0

logger = logging.getLogger("pop3_exporter")


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " " + self.formatException(record.exc_info)
        escaped = message.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        millis = int(record.msecs)
        level = record.levelname.lower().replace("warning", "warn")
        return f'ts={stamp}.{millis:03d}Z level={level} logger={record.name} msg="{escaped}"'


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower().replace("warning", "warn"),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def parse_listen_address(text: str) -> tuple[str | None, int]:
    """ ":10110" (all interfaces), "127.0.0.1:10110", "[::1]:10110"."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pop3_exporter", description="Prometheus exporter that probes POP3 servers."
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
        "--log.level", dest="log_level", default="info", choices=["debug", "info", "warn", "error"]
    )
    parser.add_argument(
        "--log.format", dest="log_format", default="logfmt", choices=["logfmt", "json"]
    )
    parser.add_argument(
        "--timeout-offset",
        dest="timeout_offset",
        type=float,
        default=0.5,
        help="Seconds subtracted from Prometheus's scrape timeout to get the probe deadline.",
    )
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="Validate the configuration file and exit (0 valid, 1 invalid).",
    )
    parser.add_argument("--version", action="version", version=f"pop3_exporter {__version__}")
    return parser


def setup_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    levels = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING}
    logger.setLevel(levels.get(level, logging.ERROR))


def check_config(path: str | None) -> int:
    if path is None:
        print("no --config.file given: the built-in modules are valid", file=sys.stderr)
        return 0
    try:
        runtime = build_runtime(load_config(path))
    except ConfigError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(sorted(runtime.config.modules))
    print(f"{path}: valid; modules: {names}")
    return 0


async def serve(holder: ConfigHolder, listen_address: str, settings: Settings) -> None:
    host, port = parse_listen_address(listen_address)
    app = create_app(holder, settings=settings)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    logger.info("listening on %s (version %s)", listen_address, __version__)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, holder.reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
        logger.info("shutting down")
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.config_check:
        return check_config(args.config_file)
    try:
        parse_listen_address(args.listen_address)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    metrics = ExporterMetrics()
    try:
        holder = ConfigHolder(args.config_file, metrics)
    except ConfigError as exc:
        logger.error("cannot load configuration: %s", exc)
        return 1
    try:
        asyncio.run(
            serve(holder, args.listen_address, Settings(timeout_offset=args.timeout_offset))
        )
    except OSError as exc:
        logger.error("cannot serve: %s", exc)
        return 1
    return 0
