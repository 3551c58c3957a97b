"""The POP3 probe: (target, module, timeout) -> ProbeResult.

It never raises for anything the target does; only programming errors, cancellation
and a refusal by the target policy (AddressCheck) escape.

The probe reads straight down, like blackbox_exporter's ProbeTCP: every step either
returns or raises the ProbeError that says why the probe failed; that exception (or
the deadline) is turned into the probe's failure in exactly one place, and QUIT, a
courtesy, is said in one place afterwards.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pop3_exporter import dane, fanout
from pop3_exporter.config import (
    AddressSelection,
    DaneMode,
    IPProtocol,
    MailboxConfig,
    Module,
    TLSMode,
)
from pop3_exporter.credentials import Secret
from pop3_exporter.delivery import (
    DeliveryRuntime,
    Scan,
    Token,
    build_message,
    delete,
    make_token,
    new_probe_id,
    scan,
    submit,
    wall_ms,
)
from pop3_exporter.errors import (
    GreetingError,
    GreetingMismatchError,
    MailboxError,
    ProbeError,
    ResolveError,
    StlsUnsupportedError,
    TLSHandshakeError,
)
from pop3_exporter.legacytls import LegacyContexts, check_legacy_versions
from pop3_exporter.protocol import Pop3Connection, decode_line, text_size
from pop3_exporter.resolver import DnsResolver, Resolver
from pop3_exporter.result import (
    REGISTERED_CAPABILITIES,
    AddressesProbed,
    Capabilities,
    DaneFacts,
    DeliveryFacts,
    FailureReason,
    MailboxFacts,
    Phase,
    ProbeResult,
    TranscriptLine,
)
from pop3_exporter.session import login, oldest_message_date, stat
from pop3_exporter.target import ProbeTarget
from pop3_exporter.tlsinfo import ChainFactsCache, Handshake, build_ssl_context

# QUIT is a courtesy: a server that does not answer it is not down, so we give it
# at most this long (and never past the deadline) and do not fail the probe for it.
QUIT_GRACE_SECONDS = 1.0
# More capability lines than this is abuse (RFC 2449 servers send about ten). Memory
# is bounded by the whole reply's byte cap; no capability becomes a label unless the
# IANA registry names it, so the count needs no tighter cap.
MAX_CAPA_LINES = 1024
# SASL mechanisms kept from a CAPA reply: real servers offer a handful.
MAX_SASL_MECHANISMS = 32
MAX_MECHANISM_LENGTH = 64
# The debug transcript is bounded per probe: each line is cut before it is escaped
# (escaping can quadruple it), and lines beyond the caps are dropped with one note.
# The byte cap counts what the escaped lines take in memory (protocol.text_size).
MAX_TRANSCRIPT_LINES = 1000
MAX_TRANSCRIPT_BYTES = 64 * 1024
MAX_TRANSCRIPT_LINE_CHARS = 1024
_PLAINTEXT_SASL_MECHANISMS = frozenset({"PLAIN", "LOGIN"})
_REGISTERED = frozenset(REGISTERED_CAPABILITIES)

# Called with (address, port) right before connecting; it raises to stop the probe.
# Whatever it raises (policy.TargetRefusedError) must not be a ProbeError: it leaves
# probe_pop3 as an exception instead of becoming a failed probe, because refusing a
# target is the exporter's decision, not something the target did.
AddressCheck = Callable[[str, int], None]

# The reason when the deadline fires in a phase; every other phase gives TIMEOUT.
_TIMEOUT_REASONS = {
    Phase.RESOLVE: FailureReason.DNS_TIMEOUT,
    Phase.CONNECT: FailureReason.CONNECT_TIMEOUT,
    Phase.GREETING: FailureReason.GREETING_TIMEOUT,
    # Waiting for the TLSA answer (dane: require): the resolver did not answer in time.
    Phase.DANE: FailureReason.DNS_TIMEOUT,
    Phase.SMTP_CONNECT: FailureReason.SMTP_CONNECT_ERROR,
    Phase.SMTP_TLS: FailureReason.SMTP_TLS_ERROR,
}


def printable(text: str) -> str:
    """Escape control and other non-printable characters for logs and debug output."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a probe failed, and where."""

    reason: FailureReason
    detail: str
    phase: Phase | None
    session_usable: bool  # the server is still in step: say QUIT


class _Recorder:
    """Notes taken during one probe (facts, timings, transcript); frozen into a
    ProbeResult at the end. It holds facts only: the outcome is the Failure that
    _probe returns."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, record_transcript: bool
    ) -> None:
        self.loop = loop
        self.timeout = timeout
        self.start = loop.time()
        self.deadline = self.start + timeout
        self.phase: Phase | None = None
        self.phase_start = self.start
        self.durations: dict[Phase, float] = {}
        self.transcript: list[TranscriptLine] | None = [] if record_transcript else None
        self._transcript_bytes = 0
        self.ip_protocol: int | None = None
        self.address: str | None = None
        self.greeting: str | None = None
        self.greeting_seconds: float | None = None
        self.greeting_match = False
        self.capabilities: Capabilities | None = None
        self.plaintext_auth_exposed: bool | None = None
        self.handshake: Handshake | None = None
        self.logged_in = False
        self.mailbox: MailboxFacts | None = None
        # Delivery probes: when the server accepted the message (loop time), how long
        # until a poll saw it, and what cleaning up found.
        self.accepted_at: float | None = None
        self.delivery_seconds: float | None = None
        self.late_messages = 0
        self.cleanup_failures = 0
        self.legacy_tls_versions: tuple[tuple[str, bool], ...] = ()
        # Modules with dane: the TLSA lookup running beside the probe, and its verdict.
        self.dane_lookup: dane.TLSALookup | None = None
        self.dane: DaneFacts | None = None

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
        transcript = self.transcript
        if transcript is None:
            return
        if len(transcript) >= MAX_TRANSCRIPT_LINES or self._transcript_bytes >= (
            MAX_TRANSCRIPT_BYTES
        ):
            if transcript[-1].direction != "!":
                transcript.append(
                    TranscriptLine(self.loop.time() - self.start, "!", "transcript truncated")
                )
            return
        shown = printable(text[:MAX_TRANSCRIPT_LINE_CHARS])
        if len(text) > MAX_TRANSCRIPT_LINE_CHARS:
            shown += f"... ({len(text)} characters)"
        self._transcript_bytes += text_size(shown)
        transcript.append(TranscriptLine(self.loop.time() - self.start, direction, shown))

    def failure(self, exc: ProbeError | TimeoutError) -> Failure:
        """The one place where what went wrong becomes the probe's failure."""
        phase = self.phase
        if isinstance(exc, ProbeError):
            failure = Failure(exc.reason, str(exc), phase, exc.session_usable)
            if isinstance(exc, TLSHandshakeError) and exc.handshake is not None:
                self.handshake = exc.handshake
        elif self.accepted_at is not None:
            # Sent and not seen by the deadline, whichever step of a poll was running.
            detail = f"message not seen by the deadline (during {phase})"
            failure = Failure(FailureReason.DELIVERY_TIMEOUT, detail, phase, False)
        else:
            reason = _TIMEOUT_REASONS.get(phase or Phase.RESOLVE, FailureReason.TIMEOUT)
            failure = Failure(reason, f"deadline reached during {phase or 'setup'}", phase, False)
        self.note("*", f"probe failed: {failure.reason} ({failure.detail})")
        return failure

    def result(
        self,
        target: ProbeTarget,
        module: Module,
        failure: Failure | None,
        cert_cache: ChainFactsCache,
    ) -> ProbeResult:
        self.end_phase()
        return ProbeResult(
            target=str(target),
            module_name=module.name,
            timeout_seconds=self.timeout,
            duration_seconds=self.loop.time() - self.start,
            success=failure is None,
            failure_reason=failure.reason if failure else None,
            failure_detail=failure.detail if failure else None,
            failed_phase=failure.phase if failure else None,
            phase_durations=tuple(self.durations.items()),
            dns_lookup_seconds=self.durations.get(Phase.RESOLVE),
            ip_protocol=self.ip_protocol,
            address=self.address,
            greeting=self.greeting,
            greeting_seconds=self.greeting_seconds,
            greeting_match=self.greeting_match,
            capabilities=self.capabilities,
            plaintext_auth_exposed=self.plaintext_auth_exposed,
            tls=cert_cache.facts(self.handshake) if self.handshake is not None else None,
            transcript=tuple(self.transcript or ()),
            login_success=self.logged_in if module.auth is not None else None,
            mailbox=self.mailbox,
            delivery=DeliveryFacts(
                success=failure is None,
                seconds=self.delivery_seconds,
                late_messages=self.late_messages,
                cleanup_failures=self.cleanup_failures,
            )
            if module.delivery is not None
            else None,
            legacy_tls_versions=self.legacy_tls_versions,
            dane=self.dane,
        )


class Pop3Prober:
    """The real prober: probe_pop3 with its resolver and certificate-facts cache bound.

    One per application; the cache is shared by its probes."""

    def __init__(
        self, resolver: Resolver | None = None, cert_cache: ChainFactsCache | None = None
    ) -> None:
        self._resolver = resolver or DnsResolver()
        self._cert_cache = cert_cache or ChainFactsCache()
        self._legacy_contexts = LegacyContexts()

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
    ) -> ProbeResult:
        return await probe_pop3(
            target,
            module,
            timeout_seconds,
            resolver=self._resolver,
            ssl_context=ssl_context,
            record_transcript=record_transcript,
            address_check=address_check,
            cert_cache=self._cert_cache,
            delivery=delivery,
            legacy_contexts=self._legacy_contexts,
        )


async def probe_pop3(
    target: ProbeTarget,
    module: Module,
    timeout_seconds: float,
    *,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
    record_transcript: bool = False,
    address_check: AddressCheck | None = None,
    cert_cache: ChainFactsCache | None = None,
    delivery: DeliveryRuntime | None = None,
    legacy_contexts: LegacyContexts | None = None,
    dane_lookup: dane.TLSALookup | None = None,
) -> ProbeResult:
    """Probe one POP3 server within `timeout_seconds` from now.

    The deadline covers everything but the final QUIT (resolution, connect, TLS, every
    read); when it fires, the phase that was running decides the failure reason.
    ``dane_lookup`` is the TLSA lookup of a probe of every address, shared by the probes
    of its addresses; a module with dane otherwise starts its own.

    A module that logs in reads its secret first (a token file at every probe):
    credentials.CredentialError escapes, since the exporter, not the target, is at fault.
    """
    resolver = resolver or DnsResolver()
    cert_cache = cert_cache or ChainFactsCache(size=0)
    if module.uses_tls and ssl_context is None:
        ssl_context = build_ssl_context(module.tls_config)
    if module.ip_protocol is AddressSelection.ALL and module.delivery is None:
        return await _probe_every_address(
            target,
            module,
            timeout_seconds,
            resolver,
            ssl_context,
            record_transcript,
            address_check,
            cert_cache,
            legacy_contexts,
        )
    recorder = _Recorder(asyncio.get_running_loop(), timeout_seconds, record_transcript)
    secret = module.auth.secret() if module.auth is not None else None
    # Started before anything else so that the answer is usually in by the handshake.
    own_lookup = dane_lookup is None and module.dane is not None
    if own_lookup:
        dane_lookup = _start_tlsa_lookup(target, module, resolver)
    recorder.dane_lookup = dane_lookup
    try:
        if module.delivery is not None:
            if delivery is None:
                raise ValueError(f"module {module.name} needs its DeliveryRuntime")
            assert secret is not None  # a delivery module has auth (checked at load)
            failure = await _round_trip(
                recorder, target, module, resolver, ssl_context, address_check, secret, delivery
            )
        else:
            failure = await _probe(
                recorder, target, module, resolver, ssl_context, address_check, secret
            )
        if recorder.address is not None and (failure is None or failure.phase is not Phase.CONNECT):
            recorder.end_phase()  # the extra handshakes are no phase of the dialogue
            recorder.legacy_tls_versions = await check_legacy_versions(
                target,
                module,
                recorder.address,
                recorder.deadline,
                legacy_contexts or LegacyContexts(size=0),
                note=recorder.note,
            )
        if dane_lookup is not None and recorder.dane is None:
            await _dane_report(recorder, dane_lookup, module)
    finally:
        if own_lookup and dane_lookup is not None:
            dane_lookup.cancel()
    return recorder.result(target, module, failure, cert_cache)


async def _probe(
    recorder: _Recorder,
    target: ProbeTarget,
    module: Module,
    resolver: Resolver,
    ssl_context: ssl.SSLContext | None,
    address_check: AddressCheck | None,
    secret: Secret | None,
) -> Failure | None:
    connection: Pop3Connection | None = None
    try:
        try:
            async with asyncio.timeout_at(recorder.deadline):
                address = await _resolve(recorder, target, module, resolver, address_check)
                connection = await _connect(recorder, address, target, module)
                await _dialogue(recorder, connection, target, module, ssl_context)
                if secret is not None:
                    await _session(recorder, connection, target, module, secret)
        except (ProbeError, TimeoutError) as exc:
            failure: Failure | None = recorder.failure(exc)
        else:
            failure = None
        if connection is not None and (failure is None or failure.session_usable):
            await _quit(recorder, connection)
        return failure
    finally:
        if connection is not None:
            connection.close()


async def _round_trip(
    recorder: _Recorder,
    target: ProbeTarget,
    module: Module,
    resolver: Resolver,
    ssl_context: ssl.SSLContext | None,
    address_check: AddressCheck | None,
    secret: Secret,
    runtime: DeliveryRuntime,
) -> Failure | None:
    """Send a marked message over SMTP, then log in over POP3 every poll_interval until
    it is there; delete it, and every overdue message of earlier probes found on the way.

    Each poll is a POP3 session of its own (servers show mail that arrived during a
    session only to the next one), and its QUIT commits the deletions."""
    config = module.delivery
    assert config is not None
    probe_id = new_probe_id()
    seen: set[str] = set()  # messages of other senders, looked at once
    connection: Pop3Connection | None = None
    found: Scan | None = None
    try:
        try:
            async with asyncio.timeout_at(recorder.deadline):
                address = await _resolve(recorder, target, module, resolver, address_check)
                smtp_address = await _resolve_smtp(recorder, module, resolver, runtime)
                sent = time.time()
                remaining = recorder.deadline - recorder.loop.time()
                token = Token(probe_id, int(sent * 1000), int((sent + remaining) * 1000))
                await submit(
                    config.smtp,
                    smtp_address,
                    runtime.smtp_ssl_context,
                    config.smtp.auth.password if config.smtp.auth is not None else None,
                    config.from_address,
                    config.to,
                    build_message(
                        config, make_token(runtime.key, token, config.to), probe_id, sent
                    ),
                    recorder.begin,
                    recorder.note,
                )
                recorder.accepted_at = recorder.loop.time()
                while True:
                    connection = await _connect(recorder, address, target, module)
                    found = await _poll(
                        recorder,
                        connection,
                        target,
                        module,
                        ssl_context,
                        secret,
                        runtime.key,
                        probe_id,
                        seen,
                    )
                    if found.own is not None:
                        break
                    # Nothing of ours yet: commit the overdue deletions, wait, poll again.
                    await _commit(recorder, connection, found)
                    connection.close()
                    connection = None
                    recorder.begin(Phase.DELIVERY_WAIT)
                    await asyncio.sleep(config.poll_interval)
        except (ProbeError, TimeoutError) as exc:
            failure: Failure | None = recorder.failure(exc)
        else:
            failure = None
        if connection is not None and failure is None and found is not None:
            # Outside the deadline's scope: the message was seen, whatever QUIT does.
            await _commit(recorder, connection, found)
        elif connection is not None and failure is not None and failure.session_usable:
            await _quit(recorder, connection)
        return failure
    finally:
        if connection is not None:
            connection.close()


async def _resolve_smtp(
    recorder: _Recorder, module: Module, resolver: Resolver, runtime: DeliveryRuntime
) -> str:
    """The submission server's address, checked against the target policy."""
    assert module.delivery is not None
    host, port, is_ip = module.delivery.smtp.endpoint()
    recorder.begin(Phase.RESOLVE)
    if is_ip:
        address = host
    else:
        smtp_target = ProbeTarget(host, port, is_ip_literal=False)
        _, address = _choose_address(smtp_target, module, await resolver.resolve(host))
        recorder.note("*", f"resolved SMTP server {host} to {address}")
    if runtime.smtp_address_check is not None:
        runtime.smtp_address_check(address, port)
    return address


async def _poll(
    recorder: _Recorder,
    conn: Pop3Connection,
    target: ProbeTarget,
    module: Module,
    ssl_context: ssl.SSLContext | None,
    secret: Secret,
    key: bytes,
    probe_id: str,
    seen: set[str],
) -> Scan:
    """One POP3 session up to the deletions (DELE of ours and overdue ones)."""
    assert module.delivery is not None
    await _dialogue(recorder, conn, target, module, ssl_context)
    await _login(recorder, conn, target, module, secret)
    capabilities = recorder.capabilities
    if capabilities is not None and not {"TOP", "UIDL"} <= set(capabilities.names):
        # Without them the probe could never see its message: say so, not a timeout.
        raise MailboxError("the server does not offer TOP and UIDL, which delivery needs")
    recorder.begin(Phase.TOP)
    found = await scan(conn, key, module.delivery.to, probe_id, seen, wall_ms)
    if found.own is not None and recorder.accepted_at is not None:
        recorder.delivery_seconds = recorder.loop.time() - recorder.accepted_at
        recorder.note("*", f"message {probe_id} is there: number {found.own}")
    doomed = [*found.late, *([found.own] if found.own is not None else [])]
    if doomed:
        refused = await delete(conn, doomed)
        recorder.cleanup_failures += refused
        found.deleted = len(doomed) - refused
    return found


async def _commit(recorder: _Recorder, conn: Pop3Connection, found: Scan) -> None:
    """QUIT, which commits the deletions; without its +OK none of them happened."""
    committed = await _quit(recorder, conn)
    if committed:
        recorder.late_messages += len(found.late)
    else:
        recorder.cleanup_failures += found.deleted


async def _connect(
    recorder: _Recorder, address: str, target: ProbeTarget, module: Module
) -> Pop3Connection:
    recorder.begin(Phase.CONNECT)
    connection = await Pop3Connection.connect(
        address,
        target.port,
        source_address=module.source_ip_address,
        transcript=recorder.note if recorder.transcript is not None else None,
    )
    recorder.note("*", f"connected to {address} port {target.port}")
    return connection


async def _resolve(
    recorder: _Recorder,
    target: ProbeTarget,
    module: Module,
    resolver: Resolver,
    address_check: AddressCheck | None,
) -> str:
    """The address to connect to, after the target policy's address rules passed it."""
    recorder.begin(Phase.RESOLVE)
    if target.is_ip_literal:
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        address = target.host
    else:
        family, address = _choose_address(target, module, await resolver.resolve(target.host))
        recorder.note("*", f"resolved {target.host} to {address}")
    recorder.ip_protocol = 6 if family == socket.AF_INET6 else 4
    recorder.address = address
    if address_check is not None:
        address_check(address, target.port)
    return address


def _choose_address(
    target: ProbeTarget, module: Module, answers: Sequence[tuple[socket.AddressFamily, str]]
) -> tuple[socket.AddressFamily, str]:
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


async def _dialogue(
    recorder: _Recorder,
    conn: Pop3Connection,
    target: ProbeTarget,
    module: Module,
    ssl_context: ssl.SSLContext | None,
) -> None:
    """Everything from the TLS handshake or greeting on; raises why it failed."""
    server_name = module.tls_config.server_name or target.host
    if module.tls is TLSMode.IMPLICIT:
        assert ssl_context is not None
        recorder.begin(Phase.TLS)
        recorder.handshake = await conn.start_tls(ssl_context, server_name)
        await _dane_required(recorder, module)

    recorder.begin(Phase.GREETING)
    greeting = decode_line(await conn.read_line())
    # When the greeting arrived (by the kernel's clock where there is one), not when this
    # task got to run again: a busy exporter must not report its own queueing.
    latency = conn.line_latency()
    recorder.greeting_seconds = (
        latency if latency is not None else recorder.loop.time() - recorder.start
    )
    recorder.greeting = greeting
    if not greeting.startswith("+OK"):
        raise GreetingError(f"greeting is not +OK: {printable(greeting[:80])!r}")
    if not module.expect_greeting.search(greeting):
        raise GreetingMismatchError(f"greeting does not match {module.expect_greeting.pattern!r}")
    recorder.greeting_match = True

    if module.query_capabilities:
        recorder.begin(Phase.CAPA)
        lines = await _capa(conn)
        if lines is not None:
            recorder.capabilities = parse_capabilities(lines)
            if module.tls is not TLSMode.IMPLICIT:
                recorder.plaintext_auth_exposed = exposes_plaintext_auth(recorder.capabilities)

    if module.tls is TLSMode.STARTTLS:
        assert ssl_context is not None
        recorder.begin(Phase.STLS)
        if recorder.capabilities is not None and "STLS" not in recorder.capabilities.names:
            raise StlsUnsupportedError("server does not advertise STLS")
        reply = await conn.command("STLS")
        if not reply.ok:
            raise StlsUnsupportedError(f"server refused STLS: {printable(reply.text[:80])!r}")
        recorder.begin(Phase.TLS)
        recorder.handshake = await conn.start_tls(ssl_context, server_name)
        await _dane_required(recorder, module)
        if module.query_capabilities:
            # What the server offers inside TLS replaces what it said in the clear.
            recorder.begin(Phase.CAPA)
            lines = await _capa(conn)
            recorder.capabilities = parse_capabilities(lines) if lines is not None else None


def _start_tlsa_lookup(target: ProbeTarget, module: Module, resolver: Resolver) -> dane.TLSALookup:
    host = dane.base_host(target.host, target.is_ip_literal, module.tls_config.server_name)
    return dane.TLSALookup.start(resolver, host, target.port)


async def _dane_required(recorder: _Recorder, module: Module) -> None:
    """dane: require decides right after the handshake, as a client that enforces DANE
    would: raises DaneInsecureError or DaneMismatchError."""
    lookup = recorder.dane_lookup
    if lookup is None or module.dane is not DaneMode.REQUIRE:
        return
    recorder.begin(Phase.DANE)
    outcome = await lookup.outcome()
    recorder.dane = dane.evaluate(
        lookup.name, outcome, recorder.handshake, _dane_names(lookup, module), dane.utc_now()
    )
    recorder.note("*", dane.describe(recorder.dane))
    dane.enforce(recorder.dane)


def _dane_names(lookup: dane.TLSALookup, module: Module) -> tuple[str, ...]:
    return dane.reference_names(lookup.host, module.tls_config.server_name)


async def _dane_report(recorder: _Recorder, lookup: dane.TLSALookup, module: Module) -> None:
    """The verdict once the dialogue is over (dane: check, or a probe that ended before
    its handshake). It never fails the probe: with a chain to compare, the answer is
    awaited until the deadline; without one, it is taken only if it is already in."""
    handshake = recorder.handshake
    if not lookup.done():
        if handshake is None or not handshake.presented_der:
            return
        recorder.begin(Phase.DANE)
        try:
            async with asyncio.timeout_at(recorder.deadline):
                outcome = await lookup.outcome()
        except TimeoutError:
            recorder.note("*", f"TLSA {lookup.name}: no answer by the deadline")
            return
        finally:
            recorder.end_phase()
    else:
        outcome = await lookup.outcome()
    names = _dane_names(lookup, module)
    recorder.dane = dane.evaluate(lookup.name, outcome, handshake, names, dane.utc_now())
    recorder.note("*", dane.describe(recorder.dane))


async def _probe_every_address(
    target: ProbeTarget,
    module: Module,
    timeout_seconds: float,
    resolver: Resolver,
    ssl_context: ssl.SSLContext | None,
    record_transcript: bool,
    address_check: AddressCheck | None,
    cert_cache: ChainFactsCache,
    legacy_contexts: LegacyContexts | None,
) -> ProbeResult:
    """ip_protocol: all: resolve once, then probe every address (up to the cap) at once,
    each as an IP-literal target with the name kept for TLS, within the one deadline;
    fanout.merge makes one result of theirs. Every address passes ``address_check``
    before any is connected to."""
    recorder = _Recorder(asyncio.get_running_loop(), timeout_seconds, record_transcript)
    lookup = _start_tlsa_lookup(target, module, resolver) if module.dane is not None else None
    try:
        try:
            async with asyncio.timeout_at(recorder.deadline):
                recorder.begin(Phase.RESOLVE)
                if target.is_ip_literal:
                    family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
                    answers = [(family, target.host)]
                else:
                    answers = await resolver.resolve(target.host)
                    if not answers:
                        raise ResolveError(f"{target.host!r} has no addresses")
        except (ProbeError, TimeoutError) as exc:
            failure = recorder.failure(exc)
            result = recorder.result(target, module, failure, cert_cache)
            return replace(result, addresses=AddressesProbed((), 0))
        recorder.end_phase()
        chosen, resolved = fanout.choose(answers)
        recorder.note(
            "*",
            f"{target.host} has {resolved} addresses; probing "
            + ", ".join(address for _, address in chosen),
        )
        if address_check is not None:
            for _, address in chosen:
                address_check(address, target.port)
        single = fanout.single_address_module(module, target.host)

        async def probe_address(address: str) -> ProbeResult:
            return await probe_pop3(
                ProbeTarget(address, target.port, is_ip_literal=True),
                single,
                recorder.deadline - recorder.loop.time(),
                resolver=resolver,
                ssl_context=ssl_context,
                record_transcript=record_transcript,
                address_check=address_check,
                cert_cache=cert_cache,
                legacy_contexts=legacy_contexts,
                dane_lookup=lookup,
            )

        launched = recorder.loop.time() - recorder.start
        results = await fanout.run_all([address for _, address in chosen], probe_address)
        base = recorder.result(target, module, None, cert_cache)
        return fanout.merge(
            base, chosen, results, resolved, launched, recorder.loop.time() - recorder.start
        )
    finally:
        if lookup is not None:
            lookup.cancel()


async def _session(
    recorder: _Recorder,
    conn: Pop3Connection,
    target: ProbeTarget,
    module: Module,
    secret: Secret,
) -> None:
    """Log in, then look at the maildrop; raises why it failed."""
    await _login(recorder, conn, target, module, secret)
    mailbox = module.mailbox or MailboxConfig()
    if not mailbox.stat:
        return
    recorder.begin(Phase.STAT)
    messages, size = await stat(conn)
    recorder.mailbox = MailboxFacts(messages=messages, size_bytes=size)
    if mailbox.oldest_message and messages:
        recorder.begin(Phase.TOP)
        oldest = await oldest_message_date(conn)
        recorder.mailbox = MailboxFacts(messages, size, oldest_message_timestamp=oldest)


async def _login(
    recorder: _Recorder, conn: Pop3Connection, target: ProbeTarget, module: Module, secret: Secret
) -> None:
    auth = module.auth
    assert auth is not None
    if not conn.tls_active and not auth.allow_plaintext:
        # Config loading refuses such modules; a Module built in code must not slip by.
        raise RuntimeError("refusing to send credentials without TLS")
    recorder.begin(Phase.LOGIN)
    await login(
        conn,
        auth,
        secret,
        recorder.capabilities,
        recorder.greeting or "",
        module.tls_config.server_name or target.host,
        target.port,
    )
    recorder.logged_in = True


async def _capa(conn: Pop3Connection) -> list[str] | None:
    """Capability lines, or None when the server does not implement CAPA (-ERR)."""
    reply = await conn.command("CAPA")
    if not reply.ok:
        return None
    return await conn.read_multiline(MAX_CAPA_LINES)


def parse_capabilities(lines: Sequence[str]) -> Capabilities:
    """Reduce CAPA lines to registered names, a count of the rest, SASL and LOGIN-DELAY."""
    names: set[str] = set()
    others: set[str] = set()
    mechanisms: dict[str, None] = {}
    login_delay: int | None = None
    for line in lines:
        words = line.split()
        if not words:
            continue
        name = words[0].upper()
        if name not in _REGISTERED:
            others.add(name)
            continue
        names.add(name)
        if name == "SASL":
            for word in words[1:]:
                if len(mechanisms) < MAX_SASL_MECHANISMS:
                    mechanisms[word.upper()[:MAX_MECHANISM_LENGTH]] = None
        elif name == "LOGIN-DELAY" and len(words) > 1:
            # RFC 2449 section 6.8: seconds, possibly followed by "USER" after login.
            argument = words[1]
            if argument.isascii() and argument.isdigit() and len(argument) <= 9:
                login_delay = int(argument)
    return Capabilities(
        names=tuple(name for name in REGISTERED_CAPABILITIES if name in names),
        unregistered=len(others),
        sasl_mechanisms=tuple(mechanisms),
        login_delay_seconds=login_delay,
    )


def exposes_plaintext_auth(capabilities: Capabilities) -> bool:
    """True if a client could send a password before TLS: USER, or SASL PLAIN/LOGIN."""
    return "USER" in capabilities.names or bool(
        _PLAINTEXT_SASL_MECHANISMS.intersection(capabilities.sasl_mechanisms)
    )


async def _quit(recorder: _Recorder, conn: Pop3Connection) -> bool:
    """Say goodbye politely; True if the server answered +OK. Never fails the probe.

    It runs after the probe's outcome is decided and outside the deadline's scope, with
    a budget of its own that ends at the deadline at the latest."""
    recorder.begin(Phase.QUIT)
    budget = min(QUIT_GRACE_SECONDS, recorder.deadline - recorder.loop.time())
    answered = False
    if budget > 0:
        try:
            async with asyncio.timeout(budget):
                answered = (await conn.command("QUIT")).ok
        except TimeoutError:
            recorder.note("*", "no QUIT reply in time")
        except ProbeError as exc:
            recorder.note("*", f"QUIT failed: {exc}")
    recorder.end_phase()
    return answered
