"""The POP3 probe: (target, module, deadline) -> ProbeResult.

It never raises for anything the target does; only programming errors escape.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Sequence

from pop3_exporter.config import IPProtocol, Module, TLSMode
from pop3_exporter.errors import (
    GreetingError,
    GreetingMismatchError,
    ProbeError,
    ResolveError,
    StlsUnsupportedError,
    TLSHandshakeError,
)
from pop3_exporter.protocol import MAX_CAPA_LINES, Pop3Connection, decode_line
from pop3_exporter.resolver import Resolver, SystemResolver
from pop3_exporter.result import FailureReason, Phase, ProbeResult, TLSFacts, TranscriptLine
from pop3_exporter.target import ProbeTarget
from pop3_exporter.tlsinfo import build_ssl_context

# QUIT is a courtesy: a server that does not answer it is not down, so we give it
# at most this long (and never past the deadline) and do not fail the probe for it.
QUIT_GRACE_SECONDS = 1.0
_PLAINTEXT_SASL_MECHANISMS = frozenset({"PLAIN", "LOGIN"})

# Called with (address, port) right before connecting; it raises to stop the probe.
# Whatever it raises (policy.TargetRefusedError) must not be a ProbeError: it leaves
# probe_pop3 as an exception instead of becoming a failed probe, because refusing a
# target is the exporter's decision, not something the target did.
AddressCheck = Callable[[str, int], None]

_TIMEOUT_REASONS = {
    Phase.RESOLVE: FailureReason.DNS_TIMEOUT,
    Phase.CONNECT: FailureReason.CONNECT_TIMEOUT,
    Phase.GREETING: FailureReason.GREETING_TIMEOUT,
}


def printable(text: str) -> str:
    """Escape control and other non-printable characters for logs and debug output."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


class _Recorder:
    """Mutable notes taken during one probe; frozen into a ProbeResult at the end."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deadline: float, record_transcript: bool
    ) -> None:
        self.loop = loop
        self.deadline = deadline
        self.start = loop.time()
        self.phase: Phase | None = None
        self.phase_start = self.start
        self.durations: dict[Phase, float] = {}
        self.transcript: list[TranscriptLine] | None = [] if record_transcript else None
        self.ip_protocol: int | None = None
        self.address: str | None = None
        self.greeting: str | None = None
        self.greeting_seconds: float | None = None
        self.greeting_match = False
        self.capabilities: tuple[str, ...] = ()
        self.plaintext_auth_exposed: bool | None = None
        self.tls: TLSFacts | None = None
        # A failure found before the polite QUIT (see _quit): reported whatever QUIT does.
        self.failed_before_quit: tuple[Phase | None, ProbeError] | None = None

    def begin(self, phase: Phase) -> None:
        self.end_phase()
        self.phase = phase
        self.phase_start = self.loop.time()

    def end_phase(self) -> None:
        if self.phase is not None:
            elapsed = self.loop.time() - self.phase_start
            self.durations[self.phase] = self.durations.get(self.phase, 0.0) + elapsed
            self.phase = None

    def note(self, direction: str, text: str) -> None:
        if self.transcript is not None:
            offset = self.loop.time() - self.start
            self.transcript.append(TranscriptLine(offset, direction, printable(text)))


async def probe_pop3(
    target: ProbeTarget,
    module: Module,
    deadline: float,
    *,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
    record_transcript: bool = False,
    address_check: AddressCheck | None = None,
) -> ProbeResult:
    """Probe one POP3 server. `deadline` is an absolute time on the running loop's clock.

    The deadline covers everything (resolution, connect, TLS, every read); when it
    fires, the phase that was running decides the failure reason.
    """
    loop = asyncio.get_running_loop()
    recorder = _Recorder(loop, deadline, record_transcript)
    if module.uses_tls and ssl_context is None:
        ssl_context = build_ssl_context(module.tls_config)
    failure: FailureReason | None = None
    detail: str | None = None
    failed_phase: Phase | None = None
    # Filled by _dialogue once connected, so that the socket is closed whatever happens.
    connection: list[Pop3Connection] = []
    try:
        async with asyncio.timeout_at(deadline):
            await _dialogue(
                recorder,
                target,
                module,
                resolver or SystemResolver(),
                ssl_context,
                connection,
                address_check,
            )
    except TimeoutError:
        failed_phase = recorder.phase
        if recorder.failed_before_quit is not None:
            # The deadline can fire at the end of a QUIT that came after a failure.
            failed_phase, error = recorder.failed_before_quit
            failure = error.reason
            detail = str(error)
        elif failed_phase is Phase.QUIT:
            # Only QUIT was left (see _quit): the server did all the module requires.
            failed_phase = None
            recorder.note("*", "deadline reached while waiting for the QUIT reply")
        else:
            failure = _TIMEOUT_REASONS.get(failed_phase or Phase.RESOLVE, FailureReason.TIMEOUT)
            detail = f"deadline reached during {failed_phase or 'setup'}"
    except ProbeError as exc:
        failed_phase = recorder.phase
        if recorder.failed_before_quit is not None:
            failed_phase = recorder.failed_before_quit[0]
        failure = exc.reason
        detail = str(exc)
        if isinstance(exc, TLSHandshakeError) and exc.facts is not None:
            recorder.tls = exc.facts
    finally:
        for conn in connection:
            conn.close_now()
    recorder.end_phase()
    if failure is not None:
        recorder.note("*", f"probe failed: {failure} ({detail})")
    duration = loop.time() - recorder.start
    return ProbeResult(
        target=str(target),
        module_name=module.name,
        timeout_seconds=max(0.0, deadline - recorder.start),
        duration_seconds=duration,
        success=failure is None,
        failure_reason=failure,
        failure_detail=detail,
        failed_phase=failed_phase,
        phase_durations=tuple(recorder.durations.items()),
        dns_lookup_seconds=recorder.durations.get(Phase.RESOLVE),
        ip_protocol=recorder.ip_protocol,
        address=recorder.address,
        greeting=recorder.greeting,
        greeting_seconds=recorder.greeting_seconds,
        greeting_match=recorder.greeting_match,
        capabilities=recorder.capabilities,
        plaintext_auth_exposed=recorder.plaintext_auth_exposed,
        tls=recorder.tls,
        transcript=tuple(recorder.transcript or ()),
    )


async def _dialogue(
    recorder: _Recorder,
    target: ProbeTarget,
    module: Module,
    resolver: Resolver,
    ssl_context: ssl.SSLContext | None,
    connection: list[Pop3Connection],
    address_check: AddressCheck | None = None,
) -> None:
    loop = recorder.loop
    recorder.begin(Phase.RESOLVE)
    family, address = await _resolve(target, module, resolver)
    recorder.ip_protocol = 6 if family == socket.AF_INET6 else 4
    recorder.address = address
    recorder.note("*", f"resolved {target.host} to {address}")
    if address_check is not None:
        address_check(address, target.port)

    recorder.begin(Phase.CONNECT)
    connect_start = recorder.phase_start
    conn = await Pop3Connection.connect(
        address,
        target.port,
        source_address=module.source_ip_address,
        transcript=recorder.note if recorder.transcript is not None else None,
    )
    connection.append(conn)
    recorder.note("*", f"connected to {address} port {target.port}")
    server_name = module.tls_config.server_name or target.host

    if module.tls is TLSMode.IMPLICIT:
        assert ssl_context is not None
        recorder.begin(Phase.TLS)
        recorder.tls = await conn.start_tls(ssl_context, server_name)

    recorder.begin(Phase.GREETING)
    greeting = decode_line(await conn.read_line())
    # When the greeting arrived (by the kernel's clock where there is one), not when this
    # task got to run again: a busy exporter must not report its own queueing.
    latency = conn.line_latency()
    recorder.greeting_seconds = latency if latency is not None else loop.time() - connect_start
    recorder.greeting = greeting
    if not greeting.startswith("+OK"):
        raise GreetingError(f"greeting is not +OK: {printable(greeting[:80])!r}")
    if not module.expect_greeting.search(greeting):
        mismatch = GreetingMismatchError(
            f"greeting does not match {module.expect_greeting.pattern!r}"
        )
        await _quit(recorder, conn, mismatch)
        raise mismatch
    recorder.greeting_match = True

    capabilities: list[str] | None = None
    if module.query_capabilities:
        recorder.begin(Phase.CAPA)
        capabilities = await _capa(conn)
        if capabilities is not None:
            recorder.capabilities = _capability_names(capabilities)
            if module.tls is not TLSMode.IMPLICIT:
                recorder.plaintext_auth_exposed = _exposes_plaintext_auth(capabilities)

    if module.tls is TLSMode.STARTTLS:
        assert ssl_context is not None
        recorder.begin(Phase.STLS)
        if capabilities is not None and "STLS" not in recorder.capabilities:
            unsupported = StlsUnsupportedError("server does not advertise STLS")
            await _quit(recorder, conn, unsupported)
            raise unsupported
        reply = await conn.command("STLS")
        if not reply.ok:
            refused = StlsUnsupportedError(f"server refused STLS: {printable(reply.text[:80])!r}")
            await _quit(recorder, conn, refused)
            raise refused
        recorder.begin(Phase.TLS)
        recorder.tls = await conn.start_tls(ssl_context, server_name)
        if module.query_capabilities:
            recorder.begin(Phase.CAPA)
            after_tls = await _capa(conn)
            recorder.capabilities = _capability_names(after_tls or [])

    await _quit(recorder, conn)
    recorder.end_phase()


async def _resolve(
    target: ProbeTarget, module: Module, resolver: Resolver
) -> tuple[socket.AddressFamily, str]:
    if target.is_ip_literal:
        return (socket.AF_INET6 if ":" in target.host else socket.AF_INET), target.host
    answers = await resolver.resolve(target.host)
    preferred = (
        socket.AF_INET6 if module.preferred_ip_protocol is IPProtocol.IP6 else socket.AF_INET
    )
    for family, address in answers:
        if family == preferred:
            return family, address
    if module.ip_protocol_fallback and answers:
        return answers[0]
    raise ResolveError(
        f"{target.host!r} has no {module.preferred_ip_protocol} address"
        + ("" if answers else " (no addresses at all)")
    )


async def _capa(conn: Pop3Connection) -> list[str] | None:
    """Capability lines, or None when the server does not implement CAPA (-ERR)."""
    reply = await conn.command("CAPA")
    if not reply.ok:
        return None
    return await conn.read_multiline(MAX_CAPA_LINES)


def _capability_names(lines: Sequence[str]) -> tuple[str, ...]:
    names: list[str] = []
    for line in lines:
        words = line.split()
        if words and words[0].upper() not in names:
            names.append(words[0].upper())
    return tuple(names)


def _exposes_plaintext_auth(lines: Sequence[str]) -> bool:
    """True if a client could send a password before TLS: USER, or SASL PLAIN/LOGIN."""
    for line in lines:
        words = line.upper().split()
        if not words:
            continue
        if words[0] == "USER":
            return True
        if words[0] == "SASL" and _PLAINTEXT_SASL_MECHANISMS.intersection(words[1:]):
            return True
    return False


async def _quit(
    recorder: _Recorder, conn: Pop3Connection, failure: ProbeError | None = None
) -> None:
    """Say goodbye politely; failures here never fail the probe.

    `failure` is what the caller raises next; it is recorded first, with its phase,
    so that a deadline firing during QUIT cannot turn it into a success.
    """
    if failure is not None:
        recorder.failed_before_quit = (recorder.phase, failure)
    recorder.begin(Phase.QUIT)
    # Stop a little before the probe deadline so that a silent QUIT ends here, not there.
    budget = min(QUIT_GRACE_SECONDS, recorder.deadline - recorder.loop.time() - 0.01)
    if budget > 0:
        with contextlib.suppress(ProbeError, TimeoutError, OSError):
            async with asyncio.timeout(budget):
                await conn.command("QUIT")
    recorder.end_phase()
