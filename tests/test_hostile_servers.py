"""The hostile-server catalogue: each misbehaving server, the exact reason it must
produce, and that the probe ends by its deadline (plus a margin for a noisy machine).

Every case goes through the real prober against a real loopback socket, and checks
the exposition a Prometheus server would scrape: ``probe_success`` and every
``probe_pop3_failure{reason}`` series, exactly one of them 1 on failure.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import tracemalloc
from datetime import datetime

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pop3_exporter.config import Module, TLSConfig, TLSMode
from pop3_exporter.debug import debug_report
from pop3_exporter.metrics import probe_registry, sanitize_label
from pop3_exporter.prober import MAX_CAPA_LINES, QUIT_GRACE_SECONDS, probe_pop3
from pop3_exporter.protocol import MAX_LINE_BYTES, MAX_REPLY_BYTES
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.result import FailureReason, Phase, ProbeResult
from pop3_exporter.target import ProbeTarget
from tests.support.certs import TestPKI
from tests.support.exposition import promtool_check_metrics
from tests.support.fakepop3 import (
    FakePop3Server,
    close_immediately,
    err_greeting,
    reset_immediately,
    server_ssl_context,
    silent,
)
from tests.support.hostile import (
    INJECTED_NAME,
    INJECTED_PLAINTEXT,
    QUIT_BEHAVIOURS,
    Flood,
    FullBacklog,
    Trickle,
    bad_quit,
    bare_lf,
    capa_flood,
    capa_never_terminated,
    hostile_text,
    limited_version_context,
    negotiates,
    split_greeting,
    stls_not_advertised,
    stls_plaintext_instead_of_tls,
    stls_refused,
    stls_refused_quit_ignored,
    stls_with_injection,
)
from tests.support.render import render_probe

# How far past its deadline a probe may end on a loaded machine.
MARGIN = 0.5
# Deadline for cases that must end on their own, long before it.
LONG = 5.0
# "Fast": well before LONG, even on a noisy machine.
FAST = 1.5
RESOLVER = StaticResolver({"localhost": ["127.0.0.1"]})

R = FailureReason


def _module(
    tls: TLSMode = TLSMode.NONE, pki: TestPKI | None = None, min_version: str = "TLS12"
) -> Module:
    ca_file = str(pki.ca_file) if pki is not None else None
    tls_config = TLSConfig(ca_file=ca_file, min_version=min_version)
    return Module(name=f"hostile_{tls}", tls=tls, tls_config=tls_config)


async def _probe(
    port: int,
    module: Module,
    timeout: float,  # noqa: ASYNC109 (passed on to the probe, which reports it)
    *,
    host: str = "127.0.0.1",
    record_transcript: bool = False,
) -> ProbeResult:
    """Probe and check the deadline, both as reported and as seen from outside."""
    loop = asyncio.get_running_loop()
    target = ProbeTarget(host=host, port=port, is_ip_literal=host != "localhost")
    start = loop.time()
    result = await probe_pop3(
        target, module, timeout, resolver=RESOLVER, record_transcript=record_transcript
    )
    elapsed = loop.time() - start
    assert result.duration_seconds <= timeout + MARGIN, result
    assert elapsed <= timeout + MARGIN, (elapsed, result)
    return result


def _samples(result: ProbeResult, module: Module) -> dict[str, list[Sample]]:
    """The probe's exposition as /probe would send it, accepted by promtool and parsed
    back as Prometheus would."""
    body, _ = render_probe(result, module.tls, "")
    text = body.decode()
    promtool_check_metrics(text)
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _names(result: ProbeResult) -> tuple[str, ...]:
    assert result.capabilities is not None, "no CAPA answer recorded"
    return result.capabilities.names


def _value(samples: dict[str, list[Sample]], name: str) -> float:
    (sample,) = samples[name]
    return sample.value


def _check(
    case: str, result: ProbeResult, module: Module, reason: FailureReason | None
) -> dict[str, list[Sample]]:
    """The result and its metrics both say `reason` (None: success), and nothing else."""
    print(f"CATALOGUE {case} -> {reason or 'success'} in {result.duration_seconds:.3f}s")
    assert result.failure_reason is reason, (result.failure_reason, result.failure_detail)
    assert result.success is (reason is None)
    samples = _samples(result, module)
    assert _value(samples, "probe_success") == (1.0 if reason is None else 0.0)
    failures = {s.labels["reason"]: s.value for s in samples["probe_pop3_failure"]}
    assert failures == {r.value: float(r is reason) for r in FailureReason}
    assert sum(failures.values()) == (0.0 if reason is None else 1.0)
    return samples


# ------------------------------------------------------------------ plain TCP


async def test_greeting_split_into_segments_with_pauses() -> None:
    # The CR and the LF arrive in different segments too.
    parts = [b"+O", b"K split ", b"greeting\r", b"\n"]
    async with FakePop3Server(split_greeting(parts, pause=0.15)) as server:
        result = await _probe(server.port, _module(), LONG)
    _check("greeting split into segments", result, _module(), None)
    assert result.greeting == "+OK split greeting"
    assert result.greeting_seconds is not None
    assert result.greeting_seconds >= 3 * 0.15 - 0.02
    assert _names(result) == ("TOP", "USER", "SASL", "UIDL")


async def test_bare_lf_line_endings() -> None:
    async with FakePop3Server(bare_lf) as server:
        result = await _probe(server.port, _module(), LONG)
    _check("bare LF line endings", result, _module(), None)
    assert result.greeting == "+OK bare LF server ready"
    assert _names(result) == ("TOP", "USER", "SASL", "UIDL")
    assert result.plaintext_auth_exposed is True


async def test_err_greeting_fails_fast() -> None:
    async with FakePop3Server(err_greeting) as server:
        result = await _probe(server.port, _module(), LONG)
    _check("-ERR greeting", result, _module(), R.GREETING_ERROR)
    assert result.duration_seconds < FAST
    assert result.greeting == "-ERR fake server unavailable"
    assert result.failed_phase is Phase.GREETING


async def test_silence_after_accept_times_out_at_the_deadline() -> None:
    timeout = 1.0
    async with FakePop3Server(silent) as server:
        result = await _probe(server.port, _module(), timeout)
    _check("silence after accept", result, _module(), R.GREETING_TIMEOUT)
    assert result.duration_seconds >= timeout - 0.05
    assert result.failed_phase is Phase.GREETING


async def test_one_byte_per_second_times_out_at_the_deadline() -> None:
    timeout = 2.2
    trickle = Trickle(interval=1.0)
    async with FakePop3Server(trickle) as server:
        result = await _probe(server.port, _module(), timeout)
    _check("one byte per second", result, _module(), R.GREETING_TIMEOUT)
    assert result.duration_seconds >= timeout - 0.05
    # The server was sending (this is not the silent case), just never a line.
    assert trickle.sent >= 2
    assert result.greeting is None


async def test_megabytes_without_newline_fail_fast_in_bounded_memory() -> None:
    flood = Flood(total=16 * 1024 * 1024)
    async with FakePop3Server(flood) as server:
        tracemalloc.start()
        try:
            result = await _probe(server.port, _module(), LONG)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    _check("megabytes without newline", result, _module(), R.PROTOCOL_ERROR)
    assert result.duration_seconds < FAST
    assert f"{MAX_LINE_BYTES} bytes" in (result.failure_detail or "")
    # The client keeps at most the line cap plus one read (and asyncio's stream
    # buffer); 16 MiB on offer must not turn into 16 MiB held.
    assert peak < 2 * 1024 * 1024, peak


async def test_close_right_after_accept() -> None:
    async with FakePop3Server(close_immediately) as server:
        result = await _probe(server.port, _module(), LONG)
    _check("close right after accept", result, _module(), R.CONNECTION_CLOSED)
    assert result.duration_seconds < FAST


async def test_reset_right_after_accept() -> None:
    async with FakePop3Server(reset_immediately) as server:
        result = await _probe(server.port, _module(), LONG)
    _check("RST right after accept", result, _module(), R.CONNECTION_CLOSED)
    assert result.duration_seconds < FAST


async def test_connect_timeout_on_a_full_backlog() -> None:
    timeout = 1.0
    with FullBacklog() as listener:
        if not listener.drops_syns():
            pytest.skip("this kernel answers SYNs to a listener with a full accept queue")
        result = await _probe(listener.port, _module(), timeout)
    _check("connect timeout (full backlog)", result, _module(), R.CONNECT_TIMEOUT)
    assert result.duration_seconds >= timeout - 0.05
    assert result.failed_phase is Phase.CONNECT


async def test_capa_never_terminated_times_out() -> None:
    timeout = 1.5
    async with FakePop3Server(capa_never_terminated) as server:
        result = await _probe(server.port, _module(), timeout)
    _check("CAPA never terminated", result, _module(), R.TIMEOUT)
    assert result.duration_seconds >= timeout - 0.05
    assert result.failed_phase is Phase.CAPA
    assert result.greeting_match


async def test_thousands_of_capa_lines_are_a_protocol_error() -> None:
    async with FakePop3Server(capa_flood(5000)) as server:
        result = await _probe(server.port, _module(), LONG)
    _check("5000 CAPA lines", result, _module(), R.PROTOCOL_ERROR)
    assert result.duration_seconds < FAST
    assert f"{MAX_CAPA_LINES} lines" in (result.failure_detail or "")
    assert result.failed_phase is Phase.CAPA
    assert result.capabilities is None


async def test_hundreds_of_unknown_capabilities_are_counted_not_labelled() -> None:
    async with FakePop3Server(capa_flood(300)) as server:
        result = await _probe(server.port, _module(), LONG)
    samples = _check("300 unknown capabilities", result, _module(), None)
    labels = {s.labels["capability"]: s.value for s in samples["probe_pop3_capability"]}
    assert len(labels) == 13  # the IANA registry's names, no more
    assert {name for name, value in labels.items() if value} == {"TOP", "UIDL", "USER", "SASL"}
    assert _value(samples, "probe_pop3_capabilities_unregistered") == 300.0


async def test_a_capa_reply_is_capped_as_a_whole_not_only_per_line() -> None:
    # 100 lines of 1 KiB: each line is legal, the reply (100 KiB) is not.
    async with FakePop3Server(capa_flood(100, width=1000)) as server:
        result = await _probe(server.port, _module(), LONG)
    _check("100 KiB CAPA reply", result, _module(), R.PROTOCOL_ERROR)
    assert f"longer than {MAX_REPLY_BYTES} bytes" in (result.failure_detail or "")
    assert result.failed_phase is Phase.CAPA


# ------------------------------------------------------------------ hostile text

# Invalid UTF-8, ANSI escapes, NUL, BEL, DEL, a right-to-left override, a lone CR.
_JUNK = b"\xff\xfe\x1b[2J\x00\x07\x7f\xc3\x28 \xe2\x80\xae evil\rtext"


@pytest.mark.parametrize(
    ("greeting", "reason"),
    [
        pytest.param(b"+OK " + _JUNK + b"\r\n", None, id="ok-with-junk"),
        pytest.param(b"+OK\x1b]0;title\x07\r\n", None, id="ok-with-osc"),
        pytest.param(b"\x00\xff+OK " + _JUNK + b"\r\n", R.GREETING_ERROR, id="junk-first"),
    ],
)
async def test_control_characters_and_invalid_utf8_stay_contained(
    greeting: bytes, reason: FailureReason | None
) -> None:
    capabilities = [b"X-\x1b[31mRED\xff", b"TOP", b"\x7fDEL\x00", b"SASL \x1bPLAIN\x1b LOGIN"]
    module = _module()
    async with FakePop3Server(hostile_text(greeting, capabilities)) as server:
        result = await _probe(server.port, module, LONG, record_transcript=True)
    samples = _check(f"control chars in greeting ({greeting[:6]!r})", result, module, reason)
    assert result.greeting is not None
    if b"\xff" in greeting:
        assert "\ufffd" in result.greeting  # invalid bytes are replaced, not dropped
    assert sanitize_label(result.greeting).isprintable()
    if reason is None:
        # TOP and SASL are registered names; the two others are only counted.
        assert result.capabilities is not None
        assert result.capabilities.names == ("TOP", "SASL")
        assert result.capabilities.unregistered == 2
        advertised = {s.labels["capability"] for s in samples["probe_pop3_capability"] if s.value}
        assert advertised == {"TOP", "SASL"}
        assert _value(samples, "probe_pop3_capabilities_unregistered") == 2.0
    assert all(line.text.isprintable() for line in result.transcript)
    text = generate_latest(probe_registry(result, module.tls)).decode()
    report = debug_report(result, module, text)
    assert "\x1b" not in report
    assert all(line.isprintable() for line in report.split("\n")), report


# ------------------------------------------------------------------ STLS


async def test_stls_not_advertised(pki: TestPKI) -> None:
    module = _module(TLSMode.STARTTLS, pki)
    async with FakePop3Server(stls_not_advertised) as server:
        result = await _probe(server.port, module, LONG, host="localhost")
    _check("STLS not advertised", result, module, R.STLS_UNSUPPORTED)
    assert result.duration_seconds < FAST
    assert result.failed_phase is Phase.STLS
    assert all(b"STLS" not in line for line in server.sessions[0].received)


async def test_stls_answered_err(pki: TestPKI) -> None:
    module = _module(TLSMode.STARTTLS, pki)
    async with FakePop3Server(stls_refused) as server:
        result = await _probe(server.port, module, LONG, host="localhost")
    _check("STLS answered -ERR", result, module, R.STLS_UNSUPPORTED)
    assert result.duration_seconds < FAST
    assert "STLS" in _names(result)
    assert b"STLS\r\n" in server.sessions[0].received


async def test_stls_refused_then_deadline_during_quit_is_still_a_failure(pki: TestPKI) -> None:
    # QUIT after a refusal gets until 10 ms before the deadline. A busy loop that
    # wakes after both timers lets the probe deadline fire inside that QUIT; the
    # refusal found before must still be the result, never "success".
    module = _module(TLSMode.STARTTLS, pki)
    timeout = 0.6
    loop = asyncio.get_running_loop()
    async with FakePop3Server(stls_refused_quit_ignored) as server:
        loop.call_at(loop.time() + timeout - 0.02, time.sleep, 0.05)
        result = await _probe(server.port, module, timeout, host="localhost")
    _check("STLS -ERR, QUIT ignored, deadline in QUIT", result, module, R.STLS_UNSUPPORTED)
    assert result.failed_phase is Phase.STLS
    assert b"QUIT\r\n" in server.sessions[0].received


async def test_stls_ok_then_plaintext_instead_of_tls(pki: TestPKI) -> None:
    module = _module(TLSMode.STARTTLS, pki)
    async with FakePop3Server(stls_plaintext_instead_of_tls) as server:
        result = await _probe(server.port, module, LONG, host="localhost")
    _check("STLS +OK then plaintext", result, module, R.TLS_HANDSHAKE_ERROR)
    assert result.duration_seconds < FAST
    assert result.failed_phase is Phase.TLS
    samples = _samples(result, module)
    assert _value(samples, "probe_tls_valid") == 0.0


async def test_plaintext_injected_after_stls_ok_is_discarded(pki: TestPKI) -> None:
    module = _module(TLSMode.STARTTLS, pki)
    context = server_ssl_context(pki.variants["good"])
    async with FakePop3Server(stls_with_injection(context)) as server:
        result = await _probe(server.port, module, LONG, host="localhost", record_transcript=True)
    samples = _check("plaintext injected after STLS +OK", result, module, None)
    # The capabilities are the ones sent under TLS, not the forged plaintext list.
    assert _names(result) == ("TOP", "USER", "SASL", "UIDL")
    assert result.capabilities is not None and result.capabilities.unregistered == 0
    assert all(INJECTED_NAME not in line.text for line in result.transcript)
    events = [line.text for line in result.transcript if line.direction == "*"]
    assert f"discarded {len(INJECTED_PLAINTEXT)} bytes of plaintext before TLS" in events
    assert result.tls is not None
    assert result.tls.verified
    assert _value(samples, "probe_tls_valid") == 1.0


# ------------------------------------------------------------------ TLS


async def test_greeting_split_across_tls_records(pki: TestPKI) -> None:
    module = _module(TLSMode.IMPLICIT, pki)
    parts = [b"+OK sp", b"lit across ", b"TLS records\r", b"\n"]
    context = server_ssl_context(pki.variants["good"])
    async with FakePop3Server(split_greeting(parts, pause=0.15), ssl_context=context) as server:
        result = await _probe(server.port, module, LONG, host="localhost")
    _check("greeting split across TLS records", result, module, None)
    assert result.greeting == "+OK split across TLS records"
    assert result.greeting_seconds is not None
    assert result.greeting_seconds >= 3 * 0.15 - 0.02
    assert result.tls is not None
    assert result.tls.verified


def _tls11_only(pki: TestPKI) -> tuple[ssl.SSLContext, str]:
    context = limited_version_context(pki.variants["good"], ssl.TLSVersion.TLSv1_1)
    if not negotiates(context, ssl.TLSVersion.TLSv1_1):
        pytest.skip("this OpenSSL build cannot serve TLS 1.1 even at security level 0")
    return context, "TLS12"


def _tls12_only(pki: TestPKI) -> tuple[ssl.SSLContext, str]:
    context = limited_version_context(pki.variants["good"], ssl.TLSVersion.TLSv1_2)
    assert negotiates(context, ssl.TLSVersion.TLSv1_2)
    return context, "TLS13"


@pytest.mark.parametrize(
    "server_side",
    [
        pytest.param(_tls11_only, id="tls11-server-min-tls12"),
        pytest.param(_tls12_only, id="tls12-server-min-tls13"),
    ],
)
async def test_tls_versions_below_the_module_minimum(pki: TestPKI, server_side: object) -> None:
    assert callable(server_side)
    context, min_version = server_side(pki)
    module = _module(TLSMode.IMPLICIT, pki, min_version=min_version)
    async with FakePop3Server(split_greeting([b"+OK old\r\n"], 0), ssl_context=context) as server:
        result = await _probe(server.port, module, LONG, host="localhost")
    samples = _check(f"TLS below minimum {min_version}", result, module, R.TLS_HANDSHAKE_ERROR)
    assert result.duration_seconds < FAST
    assert result.failed_phase is Phase.TLS
    assert result.greeting is None
    assert _value(samples, "probe_tls_valid") == 0.0
    assert server.connections == 0  # the handshake never reached the script


def _timestamp(dt: datetime) -> float:
    return dt.timestamp()


@pytest.mark.parametrize(
    ("variant", "host", "reason"),
    [
        ("good", "localhost", None),
        ("expired", "localhost", R.TLS_CERT_EXPIRED),
        ("not_yet_valid", "localhost", R.TLS_CERT_EXPIRED),
        ("self_signed", "localhost", R.TLS_CERT_UNTRUSTED),
        ("wrong_host", "localhost", R.TLS_HOSTNAME_MISMATCH),
        ("wrong_host", "127.0.0.1", R.TLS_HOSTNAME_MISMATCH),
        ("incomplete_chain", "localhost", R.TLS_CERT_UNTRUSTED),
        ("intermediate_expires_first", "localhost", None),
    ],
)
async def test_certificate_faults(
    pki: TestPKI, variant: str, host: str, reason: FailureReason | None
) -> None:
    cert = pki.variants[variant]
    module = _module(TLSMode.IMPLICIT, pki)
    context = server_ssl_context(cert)
    async with FakePop3Server(split_greeting([b"+OK tls\r\n"], 0), ssl_context=context) as server:
        result = await _probe(server.port, module, LONG, host=host)
    samples = _check(f"certificate {variant} via {host}", result, module, reason)
    assert result.duration_seconds < FAST
    tls = result.tls
    assert tls is not None
    assert tls.verification_enabled
    assert tls.verified is (reason is None)
    # The presented chain is reported even when verification failed.
    assert tls.presented_chain, "no certificates reported"
    leaf = tls.presented_chain[0]
    assert leaf.not_after == _timestamp(cert.leaf_not_after)
    earliest = _timestamp(cert.earliest_not_after)
    assert tls.earliest_presented_expiry == earliest
    assert _value(samples, "probe_ssl_earliest_cert_expiry") == earliest
    assert _value(samples, "probe_tls_valid") == (1.0 if reason is None else 0.0)
    if reason is None:
        assert result.greeting == "+OK tls"
        # Leaf, intermediate and the root the module trusts.
        assert len(tls.verified_chain) == 3
        assert _value(samples, "probe_ssl_last_chain_expiry_timestamp_seconds") == earliest
    else:
        assert result.failed_phase is Phase.TLS
        assert tls.verify_error
        assert "probe_ssl_last_chain_expiry_timestamp_seconds" not in samples
    if variant == "expired":
        assert earliest == _timestamp(cert.leaf_not_after) < time.time()
    if variant == "not_yet_valid":
        assert leaf.not_before > time.time()
    if variant in ("self_signed", "incomplete_chain"):
        assert len(tls.presented_chain) == 1
    if variant == "self_signed":
        assert leaf.subject == leaf.issuer
    if variant == "wrong_host":
        assert leaf.subject_alternative_names == ("DNS:wrong-host.invalid",)
    if variant == "intermediate_expires_first":
        assert earliest < leaf.not_after
        assert earliest == tls.presented_chain[1].not_after


# ------------------------------------------------------------------ QUIT


@pytest.mark.parametrize("kind", sorted(QUIT_BEHAVIOURS))
async def test_a_bad_quit_reply_never_fails_a_good_probe(kind: str) -> None:
    module = _module()
    async with FakePop3Server(bad_quit(kind)) as server:
        result = await _probe(server.port, module, LONG, record_transcript=True)
    _check(f"good probe, QUIT {kind}", result, module, None)
    assert b"QUIT\r\n" in server.sessions[0].received
    quit_seconds = dict(result.phase_durations)[Phase.QUIT]
    # A silent server gets the grace period, no more; the others answer at once.
    if kind == "silent":
        assert QUIT_GRACE_SECONDS - 0.05 <= quit_seconds <= QUIT_GRACE_SECONDS + MARGIN
    else:
        assert quit_seconds < FAST


async def test_a_silent_quit_ends_at_the_deadline_when_that_comes_first() -> None:
    module = _module()
    timeout = 0.5
    async with FakePop3Server(bad_quit("silent")) as server:
        result = await _probe(server.port, module, timeout)
    _check("good probe, QUIT silent, short deadline", result, module, None)
    assert result.duration_seconds <= timeout + MARGIN


async def test_quit_follows_a_refusal_but_not_a_broken_connection(pki: TestPKI) -> None:
    module = _module(TLSMode.STARTTLS, pki)
    async with FakePop3Server(stls_refused) as server:
        await _probe(server.port, module, LONG, host="localhost")
    assert server.sessions[0].received[-1] == b"QUIT\r\n"
    async with FakePop3Server(stls_plaintext_instead_of_tls) as server:
        await _probe(server.port, module, LONG, host="localhost")
    assert b"QUIT\r\n" not in server.sessions[0].received
