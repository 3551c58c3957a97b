"""`pop3_exporter probe TARGET`: one probe from the shell, judged as a monitoring plugin.

The probe is the one /probe runs (same module selection, target policy, resolver,
TLS contexts and delivery runtimes); only the verdict is new. It is printed the way
the Monitoring Plugins Development Guidelines ask, so Nagios, Icinga, Checkmk,
Zabbix and cron can use the command as it is:

    POP3 OK - 127.0.0.1:995 (pop3s): greeting after 0.002s, ... | time=0.0123s;;;0;10 ...

then, as long output, configuration warnings, log lines and (``-v``) the debug report.
Exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

Everything goes to stdout: Nagios reads only stdout, and Icinga 2 reads stdout and
stderr as one text, so a line on stderr could take the place of the verdict line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import functools
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from prometheus_client.exposition import generate_latest

from pop3_exporter.cli import default_state_directory, duration_flag, parse_dns_server
from pop3_exporter.config import InvalidConfigError, Module, format_duration, parse_duration
from pop3_exporter.credentials import CredentialError
from pop3_exporter.debug import debug_report
from pop3_exporter.errors import TargetError
from pop3_exporter.logs import LogfmtFormatter
from pop3_exporter.metrics import probe_registry
from pop3_exporter.policy import TargetRefusedError
from pop3_exporter.prober import AddressCheck, Pop3Prober, printable
from pop3_exporter.resolver import DnsResolver
from pop3_exporter.result import CertFacts, ProbeResult
from pop3_exporter.runtime import Runtime, load_runtime
from pop3_exporter.selection import ModuleChoiceError, choose_module
from pop3_exporter.target import ProbeTarget, parse_target

COMMAND = "probe"
SERVICE = "POP3"
DAY_SECONDS = 86400.0
DEFAULT_CERT_WARNING = "21d"
DEFAULT_CERT_CRITICAL = "7d"
DEFAULT_CERT_WARNING_SECONDS = parse_duration(DEFAULT_CERT_WARNING)
DEFAULT_CERT_CRITICAL_SECONDS = parse_duration(DEFAULT_CERT_CRITICAL)
# Log lines kept for the long output: enough for what one probe can log, bounded so
# that a misbehaving library cannot flood the monitoring system.
MAX_LOG_LINES = 20
# Nagios and Icinga read everything after the first "|" as performance data, also in
# the long output; text from the server (a greeting, an error reply) must not add any.
_PERFDATA_SEPARATOR = "|"
_SEPARATOR_ESCAPE = "\\x7c"
# Where the debug report's metrics begin (debug.py); -v stops there, -vv goes on.
METRICS_HEADING = "Metrics that would have been returned:"

logger = logging.getLogger("pop3_exporter")


class State(enum.IntEnum):
    """Monitoring-plugin states; the value is the exit code."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a successful probe is still WARNING or CRITICAL (seconds each)."""

    cert_warning: float = DEFAULT_CERT_WARNING_SECONDS
    cert_critical: float = DEFAULT_CERT_CRITICAL_SECONDS
    greeting_warning: float | None = None
    greeting_critical: float | None = None


@dataclass(frozen=True, slots=True)
class PerfDatum:
    """One performance-data item: 'label'=value[UOM];[warn];[crit];[min];[max]."""

    label: str
    value: float
    unit: str = ""
    warn: str = ""
    crit: str = ""
    minimum: str = ""
    maximum: str = ""

    def __str__(self) -> str:
        # Trailing empty fields may be left out (guidelines), and are.
        fields = f"{self.warn};{self.crit};{self.minimum};{self.maximum}".rstrip(";")
        text = f"{self.label}={number(self.value)}{self.unit}"
        return f"{text};{fields}" if fields else text


@dataclass(frozen=True, slots=True)
class Verdict:
    state: State
    summary: str  # the text after "POP3 STATE - "
    perfdata: tuple[PerfDatum, ...] = ()


def number(value: float, places: int = 6) -> str:
    """Fixed point without trailing zeros: perfdata values take no exponent ("1e-05")."""
    text = f"{value:.{places}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _iso_date(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return "?"


def _days(seconds: float) -> str:
    return number(seconds / DAY_SECONDS, 3)


def earliest_certificate(result: ProbeResult) -> CertFacts | None:
    """The certificate of the presented chain that expires first (leaf or not)."""
    if result.tls is None or not result.tls.presented_chain:
        return None
    return min(result.tls.presented_chain, key=lambda cert: cert.not_after)


def perfdata(result: ProbeResult, thresholds: Thresholds, now: float) -> tuple[PerfDatum, ...]:
    items = [
        PerfDatum(
            "time",
            result.duration_seconds,
            "s",
            minimum="0",
            maximum=_limit(result.timeout_seconds),
        )
    ]
    if result.greeting_seconds is not None:
        items.append(
            PerfDatum(
                "greeting",
                result.greeting_seconds,
                "s",
                warn=_limit(thresholds.greeting_warning),
                crit=_limit(thresholds.greeting_critical),
                minimum="0",
            )
        )
    cert = earliest_certificate(result)
    if cert is not None:
        # "21:" is the guidelines' range for "alert when below 21".
        items.append(
            PerfDatum(
                "cert_expiry_days",
                round((cert.not_after - now) / DAY_SECONDS, 3),
                warn=f"{_days(thresholds.cert_warning)}:",
                crit=f"{_days(thresholds.cert_critical)}:",
            )
        )
    if result.mailbox is not None:
        items.append(PerfDatum("messages", result.mailbox.messages, minimum="0"))
        items.append(PerfDatum("mailbox_size", result.mailbox.size_bytes, "B", minimum="0"))
    if result.delivery is not None and result.delivery.seconds is not None:
        items.append(PerfDatum("delivery", result.delivery.seconds, "s", minimum="0"))
    # A value that is not a number has no perfdata syntax; graphs get a gap instead.
    return tuple(item for item in items if math.isfinite(item.value))


def _limit(limit: float | None) -> str:
    return "" if limit is None or not math.isfinite(limit) else number(limit)


def judge(result: ProbeResult, thresholds: Thresholds, now: float) -> Verdict:
    """The verdict on one probe result (pure: ``now`` is the wall clock, in seconds)."""
    data = perfdata(result, thresholds, now)
    where = f"{result.target} ({result.module_name})"
    if not result.success:
        phase = f" in phase {result.failed_phase}" if result.failed_phase else ""
        detail = f": {printable(result.failure_detail)}" if result.failure_detail else ""
        return Verdict(State.CRITICAL, f"{where}: {result.failure_reason}{phase}{detail}", data)

    problems: list[tuple[State, str]] = []
    facts: list[str] = []
    greeting = result.greeting_seconds
    if greeting is not None:
        facts.append(f"greeting after {number(greeting, 3)}s")
        for state, limit, word in (
            (State.CRITICAL, thresholds.greeting_critical, "critical"),
            (State.WARNING, thresholds.greeting_warning, "warning"),
        ):
            if limit is not None and greeting > limit:
                problems.append(
                    (
                        state,
                        f"greeting took {number(greeting, 3)}s ({word} above"
                        f" {format_duration(limit)})",
                    )
                )
                break
    tls = result.tls
    if tls is not None:
        facts.append(tls.version or "TLS")
        if not tls.verification_enabled:
            facts.append("certificate not verified (insecure_skip_verify)")
    cert = earliest_certificate(result)
    if cert is not None:
        remaining = cert.not_after - now
        when = (
            f"expired {_days(-remaining)} days ago"
            if remaining < 0
            else f"expires in {_days(remaining)} days"
        )
        text = f"certificate {printable(cert.subject)!r} {when} ({_iso_date(cert.not_after)})"
        for state, limit, word in (
            (State.CRITICAL, thresholds.cert_critical, "critical"),
            (State.WARNING, thresholds.cert_warning, "warning"),
        ):
            if remaining < limit:
                problems.append((state, f"{text}, {word} below {_days(limit)} days"))
                break
        else:
            facts.append(f"earliest certificate {when}")
    if result.mailbox is not None:
        facts.append(
            f"logged in, {result.mailbox.messages} messages ({result.mailbox.size_bytes} octets)"
        )
    elif result.login_success:
        facts.append("logged in")
    if result.delivery is not None and result.delivery.seconds is not None:
        facts.append(f"delivered in {number(result.delivery.seconds, 3)}s")
    state = max((state for state, _ in problems), default=State.OK)
    parts = [problem for _, problem in problems] + ([", ".join(facts)] if facts else [])
    summary = "; ".join(parts)
    return Verdict(state, f"{where}: {summary}" if summary else where, data)


def render(verdict: Verdict, details: Sequence[str] = ()) -> str:
    """The plugin output: the verdict line with its perfdata, then the long output."""
    line = f"{SERVICE} {verdict.state.name} - {_escape(verdict.summary)}"
    if verdict.perfdata:
        line += " | " + " ".join(str(item) for item in verdict.perfdata)
    return "".join(f"{text}\n" for text in [line, *(_escape(d) for d in details)])


def _escape(text: str) -> str:
    """One line, with no "|" that a monitoring system could take for perfdata."""
    return printable(text).replace(_PERFDATA_SEPARATOR, _SEPARATOR_ESCAPE)


# ---------------------------------------------------------------- the command line


class ProbeArgumentParser(argparse.ArgumentParser):
    """Bad arguments are UNKNOWN (exit 3) with a verdict line on stdout, not argparse's
    exit 2 on stderr, which a monitoring system would take for CRITICAL."""

    def error(self, message: str) -> NoReturn:
        sys.stdout.write(render(Verdict(State.UNKNOWN, f"{self.prog}: {message}")))
        self.print_usage(sys.stdout)
        sys.exit(State.UNKNOWN)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # As a subcommand, argparse hands unknown arguments back to the top-level
        # parser, which would fail with exit 2; refuse them here instead.
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def cert_duration(text: str) -> float:
    """A certificate threshold: a duration with its unit ("21d"); a bare number would be
    seconds, which nobody means for certificate expiry."""
    if text.replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} needs a unit, e.g. {text}d (days)")
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


PROBE_DESCRIPTION = """\
Run one probe, as /probe would, and print a verdict in the monitoring-plugins format
(Nagios, Icinga, Checkmk, Zabbix, cron):
  POP3 OK - TARGET (MODULE): ... | time=...s;;;0;TIMEOUT greeting=...s ...
Exit codes: 0 OK; 1 WARNING (a certificate of the presented chain expires within
--cert.warning, or the greeting is slower than --greeting.warning); 2 CRITICAL (the
probe failed, a certificate expires within --cert.critical, or the greeting is slower
than --greeting.critical); 3 UNKNOWN (bad arguments, unknown module, unreadable or
invalid configuration, a target the policy refuses, unreadable credentials).
"""


def add_probe_command(parser: argparse.ArgumentParser) -> None:
    """Add ``probe`` as a subcommand of the exporter's parser (``command`` is None when
    the exporter is to serve)."""
    # Without a command the exporter serves, as it always has.
    parser.usage = (
        "%(prog)s [FLAGS]                  serve /probe and /metrics\n"
        f"       %(prog)s {COMMAND} TARGET [FLAGS]    one probe, as a monitoring plugin"
        f" ({COMMAND} --help)"
    )
    commands = parser.add_subparsers(
        dest="command", title="commands", metavar="COMMAND", parser_class=ProbeArgumentParser
    )
    probe = commands.add_parser(
        COMMAND,
        prog=f"{parser.prog} {COMMAND}",
        help="run one probe and print a monitoring-plugins verdict (see probe --help)",
        description=PROBE_DESCRIPTION,
        epilog="documentation: docs/check.md in the source repository.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.add_argument(
        "target",
        metavar="TARGET",
        help="HOST, HOST:PORT, [IPv6]:PORT, pop3://HOST[:PORT] or pop3s://HOST[:PORT];"
        " without a port, the module's",
    )
    probe.add_argument(
        "--module",
        dest="module",
        default=None,
        help="module to probe with; required unless TARGET is a pop3:// or pop3s:// URL"
        " (which imply pop3 and pop3s)",
    )
    probe.add_argument(
        "--config.file",
        dest="config_file",
        default=None,
        metavar="FILE",
        help="the exporter's YAML file: modules and policy (default: only the built-in modules)",
    )
    probe.add_argument(
        "--dns.server",
        dest="dns_server",
        type=parse_dns_server,
        default=None,
        metavar="ADDRESS:PORT",
        help="DNS server to resolve TARGET with (default: the system's resolv.conf and hosts file)",
    )
    probe.add_argument(
        "--state.directory",
        dest="state_directory",
        type=Path,
        default=default_state_directory(),
        metavar="DIR",
        help="the exporter's state directory, for the key of delivery modules (default:"
        " $STATE_DIRECTORY or /var/lib/pop3_exporter)",
    )
    probe.add_argument(
        "--timeout",
        dest="timeout",
        type=duration_flag,
        default=None,
        metavar="DURATION",
        help="deadline of the probe, e.g. 10s (default: the module's timeout)",
    )
    probe.add_argument(
        "--cert.warning",
        dest="cert_warning",
        type=cert_duration,
        default=DEFAULT_CERT_WARNING_SECONDS,
        metavar="DURATION",
        help="WARNING when a certificate of the presented chain expires within this"
        f" (default {DEFAULT_CERT_WARNING})",
    )
    probe.add_argument(
        "--cert.critical",
        dest="cert_critical",
        type=cert_duration,
        default=DEFAULT_CERT_CRITICAL_SECONDS,
        metavar="DURATION",
        help="CRITICAL when a certificate of the presented chain expires within this"
        f" (default {DEFAULT_CERT_CRITICAL})",
    )
    probe.add_argument(
        "--greeting.warning",
        dest="greeting_warning",
        type=duration_flag,
        default=None,
        metavar="DURATION",
        help="WARNING when the greeting takes longer than this, e.g. 2s (default: none)",
    )
    probe.add_argument(
        "--greeting.critical",
        dest="greeting_critical",
        type=duration_flag,
        default=None,
        metavar="DURATION",
        help="CRITICAL when the greeting takes longer than this (default: none)",
    )
    probe.add_argument(
        "-v",
        "--verbose",
        dest="verbose",
        action="count",
        default=0,
        help="after the verdict, print the probe's debug report: transcript (secrets"
        " shown as ********), phases, TLS and module; -vv adds the metrics /probe"
        " would have returned",
    )


class UnknownError(Exception):
    """Why the check cannot give a verdict on the target (UNKNOWN); more lines for the
    long output in ``details``."""

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.details = tuple(details)


class _LogLines(logging.Handler):
    """Keeps log lines for the long output instead of writing them to stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(LogfmtFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < MAX_LOG_LINES:
            self.lines.append(self.format(record))


def run_probe_command(args: argparse.Namespace) -> int:
    """`pop3_exporter probe`: print the verdict (and long output), return the exit code."""
    details: list[str] = []
    report: list[str] = []
    with _collected_logs() as log_lines:
        try:
            thresholds = _thresholds(args)
            runtime = _load(args.config_file, args.state_directory)
            details += [f"configuration warning: {w}" for w in runtime.config.warnings]
            target, module = _select(runtime, args.target, args.module)
            result = asyncio.run(_probe(args, runtime, target, module))
        except UnknownError as exc:
            verdict = Verdict(State.UNKNOWN, str(exc))
            details[:0] = exc.details
        else:
            verdict = judge(result, thresholds, time.time())
            if args.verbose:
                report = ["", *_report(result, module, with_metrics=args.verbose > 1)]
    details += [f"log: {line}" for line in log_lines]
    sys.stdout.write(render(verdict, [*details, *report]))
    sys.stdout.flush()
    return int(verdict.state)


@contextlib.contextmanager
def _collected_logs() -> Iterator[list[str]]:
    """Log lines (warn and above) kept for the long output instead of going to stderr;
    the logging setup is as before afterwards."""
    handler = _LogLines()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logger.level)
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logger.setLevel(logging.WARNING)
    try:
        yield handler.lines
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logger.setLevel(saved[2])


def _report(result: ProbeResult, module: Module, *, with_metrics: bool) -> list[str]:
    """The debug report's lines; without metrics, it ends before their section."""
    registry = probe_registry(result, module.tls)
    lines = debug_report(result, module, generate_latest(registry).decode()).splitlines()
    if not with_metrics and METRICS_HEADING in lines:
        lines = lines[: lines.index(METRICS_HEADING)]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _thresholds(args: argparse.Namespace) -> Thresholds:
    if args.cert_critical > args.cert_warning:
        raise UnknownError(
            f"--cert.critical ({_days(args.cert_critical)} days) is longer than"
            f" --cert.warning ({_days(args.cert_warning)} days)"
        )
    warning, critical = args.greeting_warning, args.greeting_critical
    if warning is not None and critical is not None and warning > critical:
        raise UnknownError(
            f"--greeting.warning ({format_duration(warning)}) is longer than"
            f" --greeting.critical ({format_duration(critical)})"
        )
    if args.timeout is not None and args.timeout <= 0:
        raise UnknownError("--timeout must be above zero")
    return Thresholds(args.cert_warning, args.cert_critical, warning, critical)


def _load(config_file: str | None, state_directory: Path) -> Runtime:
    try:
        return load_runtime(config_file, state_directory)
    except InvalidConfigError as exc:
        problems = [str(problem) for problem in exc.problems]
        count = f" ({len(problems)} problems)" if len(problems) > 1 else ""
        raise UnknownError(f"invalid configuration{count}: {problems[0]}", problems[1:]) from None


def _select(
    runtime: Runtime, raw_target: str, module_name: str | None
) -> tuple[ProbeTarget, Module]:
    """The target and module, by /probe's rules (http.py), checked against the policy
    before any name is resolved."""
    try:
        spec = parse_target(raw_target)
    except TargetError as exc:
        raise UnknownError(f"bad target: {exc}") from None
    config = runtime.config
    if module_name is None and spec.scheme is None:
        raise UnknownError(
            "--module is required unless TARGET is a pop3:// or pop3s:// URL;"
            f" known modules: {', '.join(sorted(config.modules))}"
        )
    try:
        module = choose_module(config, spec, module_name)
    except ModuleChoiceError as exc:
        raise UnknownError(str(exc)) from None
    target = ProbeTarget(spec.host, spec.port or module.port, spec.is_ip_literal)
    try:
        config.policy.check_target(target.host, target.port, is_ip_literal=target.is_ip_literal)
    except TargetRefusedError as exc:
        raise UnknownError(f"{target}: target refused by policy: {exc}") from None
    return target, module


async def _probe(
    args: argparse.Namespace, runtime: Runtime, target: ProbeTarget, module: Module
) -> ProbeResult:
    policy = runtime.config.policy
    extra: dict[str, AddressCheck] = {}
    if policy.uses_addresses:
        host = None if target.is_ip_literal else target.host
        extra["address_check"] = functools.partial(policy.check_address, host)
    prober = Pop3Prober(DnsResolver(args.dns_server))
    try:
        result = await prober(
            target,
            module,
            args.timeout if args.timeout is not None else module.timeout,
            ssl_context=runtime.ssl_contexts.get(module.name),
            record_transcript=args.verbose,
            delivery=runtime.deliveries.get(module.name),
            **extra,
        )
    except TargetRefusedError as exc:
        raise UnknownError(f"{target}: target refused by policy: {exc}") from None
    except CredentialError as exc:
        raise UnknownError(f"module {module.name}: cannot read credentials: {exc}") from None
    return result
