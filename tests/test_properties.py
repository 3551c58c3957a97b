"""Property-based tests: the line reader, the reply and CAPA parsers, the target parser.

Arbitrary bytes in arbitrary chunkings must never crash the reader with anything but
our ProbeError subclasses, never yield a line over the cap, always end, and give the
same answer however the bytes were split. Each test is bounded in examples and
time so that the whole file runs in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import socket
import string
from collections.abc import AsyncIterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pop3_exporter.config import Module, TLSConfig, TLSMode
from pop3_exporter.debug import debug_report
from pop3_exporter.errors import (
    ConnectionClosedError,
    LineTooLongError,
    ProbeError,
    ProtocolError,
    TargetError,
)
from pop3_exporter.metrics import probe_registry
from pop3_exporter.prober import exposes_plaintext_auth, parse_capabilities, probe_pop3
from pop3_exporter.protocol import Pop3Connection, Response, SocketStream, decode_line
from pop3_exporter.result import REGISTERED_CAPABILITIES, FailureReason, ProbeResult
from pop3_exporter.target import MAX_TARGET_LENGTH, SCHEMES, ProbeTarget, TargetSpec, parse_target
from tests.support.certs import TestPKI, client_ssl_context
from tests.support.fakepop3 import FakeConnection, FakePop3Server, server_ssl_context
from tests.support.hostile import serve
from tests.support.render import render_probe

# A small cap, so that examples reach it often; the logic does not depend on its size.
CAP = 16
# Every read in these tests ends long before this; reaching it is a hang.
HANG_SECONDS = 5.0

PURE = settings(max_examples=300, deadline=1000)
READER = settings(max_examples=200, deadline=2000)
# Real sockets (and TLS handshakes): fewer examples, generous per-example time.
SOCKETS = settings(
    max_examples=25,
    deadline=10_000,
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------ strategies

# Bytes that matter to a line reader, mixed with arbitrary ones and runs near the cap.
_PIECES = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b".", b"+OK", b"-ERR", b" ", b"a", b"\xff", b"\x00"]
    + [b"x" * n for n in (CAP - 2, CAP - 1, CAP)]
)
_STREAM = st.one_of(
    st.binary(max_size=120),
    st.lists(st.one_of(_PIECES, st.binary(max_size=4)), max_size=40).map(b"".join),
)


@st.composite
def _chunked(
    draw: st.DrawFn, data: st.SearchStrategy[bytes] = _STREAM
) -> tuple[bytes, list[bytes]]:
    """Some bytes and one way of splitting them into reads."""
    payload = draw(data)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(payload)), max_size=12))))
    bounds = [0, *cuts, len(payload)]
    return payload, [payload[a:b] for a, b in itertools.pairwise(bounds)]


# ------------------------------------------------------------------ reader harness


def _reference(data: bytes, cap: int) -> tuple[list[bytes], type[ProbeError]]:
    """What reading `data` line by line to EOF must give, whatever the chunking."""
    lines: list[bytes] = []
    position = 0
    while True:
        newline = data.find(b"\n", position)
        if newline < 0:
            rest = data[position:]
            # Without a line ending yet, up to cap bytes (cap + 1 ending in CR) may
            # still become a valid line; anything longer cannot.
            too_long = len(rest) > cap + 1 or (len(rest) == cap + 1 and not rest.endswith(b"\r"))
            return lines, LineTooLongError if too_long else ConnectionClosedError
        line = data[position:newline]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > cap:
            return lines, LineTooLongError
        lines.append(line)
        position = newline + 1


@contextlib.asynccontextmanager
async def _socket_pair(cap: int = CAP) -> AsyncIterator[tuple[Pop3Connection, socket.socket]]:
    """A connection on the real SocketStream, and the peer socket the test writes to."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    conn = Pop3Connection(SocketStream.wrap(ours), max_line_bytes=cap)
    try:
        yield conn, theirs
    finally:
        conn.close()
        theirs.close()


async def _send(peer: socket.socket, *chunks: bytes, eof: bool = True) -> None:
    """Write each chunk separately (a loop turn apart), then half-close: EOF."""
    loop = asyncio.get_running_loop()
    for chunk in chunks:
        if chunk:
            await loop.sock_sendall(peer, chunk)
        await asyncio.sleep(0)
    if eof:
        peer.shutdown(socket.SHUT_WR)


async def _read_to_end(conn: Pop3Connection, limit: int) -> tuple[list[bytes], type[ProbeError]]:
    """read_line until it raises; bounded by `limit` lines and by HANG_SECONDS."""
    lines: list[bytes] = []
    try:
        async with asyncio.timeout(HANG_SECONDS):
            for _ in range(limit + 1):
                lines.append(await conn.read_line())
    except ProbeError as exc:
        return lines, type(exc)
    raise AssertionError(f"more than {limit} lines from {limit} bytes")


async def _read_chunks(chunks: Sequence[bytes], cap: int = CAP) -> tuple[list[bytes], type]:
    """Write `chunks` one per loop iteration (so reads tend to see them apart), then EOF."""
    async with _socket_pair(cap) as (conn, peer):
        feeder = asyncio.create_task(_send(peer, *chunks))
        try:
            return await _read_to_end(conn, sum(len(c) for c in chunks))
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)


# ------------------------------------------------------------------ line reader


@READER
@given(_chunked())
def test_line_reader_matches_the_reference_whatever_the_chunking(
    case: tuple[bytes, list[bytes]],
) -> None:
    data, chunks = case
    lines, ending = asyncio.run(_read_chunks(chunks))
    assert all(len(line) <= CAP for line in lines)
    assert all(b"\n" not in line for line in lines)
    assert (lines, ending) == _reference(data, CAP)


@READER
@given(_chunked(st.binary(min_size=1, max_size=300)), st.integers(1, 64))
def test_line_reader_arbitrary_bytes_and_caps(case: tuple[bytes, list[bytes]], cap: int) -> None:
    data, chunks = case
    lines, ending = asyncio.run(_read_chunks(chunks, cap))
    assert issubclass(ending, ProbeError)
    assert all(len(line) <= cap for line in lines)
    assert (lines, ending) == _reference(data, cap)


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_a_line_of_exactly_the_cap_is_accepted_however_split(ending: bytes) -> None:
    # Legal at CAP bytes; whether its CR and LF arrive together must not matter.
    line = b"+" * CAP
    data = line + ending + b"+OK next\r\n"
    for cut in range(len(data) + 1):
        lines, end = asyncio.run(_read_chunks([data[:cut], data[cut:]]))
        assert (lines, end) == ([line, b"+OK next"], ConnectionClosedError), cut


# ------------------------------------------------------------------ replies


_STATUS_LINE = st.tuples(
    st.sampled_from([b"", b"+OK", b"-ERR", b"+ok", b"+O", b" +OK", b"-ER", b"\xff+OK"]),
    st.binary(max_size=40),
).map(lambda parts: b"".join(parts).replace(b"\n", b""))


@PURE
@given(_STATUS_LINE)
def test_read_response_classifies_every_status_line(raw: bytes) -> None:
    async def read() -> Response:
        async with _socket_pair(64) as (conn, peer):
            await _send(peer, raw + b"\r\n")
            async with asyncio.timeout(HANG_SECONDS):
                return await conn.read_response()

    text = decode_line(raw)  # only the CR of the CRLF goes, even if raw ends in CR
    if text.startswith(("+OK", "-ERR")):
        assert asyncio.run(read()) == Response(ok=text.startswith("+OK"), text=text)
    else:
        with pytest.raises(ProtocolError, match="neither"):
            asyncio.run(read())


_CAPA_LINE = st.one_of(
    st.binary(max_size=CAP - 2),
    st.text(max_size=6).map(lambda t: t.encode()[: CAP - 2]),
    st.sampled_from([b".", b"..", b". ", b"", b"STLS", b"SASL PLAIN"]),
).filter(lambda b: b"\n" not in b and not b.endswith(b"\r"))


@PURE
@given(st.lists(_CAPA_LINE, max_size=12), st.integers(0, 10))
def test_read_multiline_round_trips_dot_stuffing(lines: list[bytes], max_lines: int) -> None:
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)

    async def read() -> list[str]:
        async with _socket_pair() as (conn, peer):
            await _send(peer, stuffed + b".\r\n+OK after\r\n")
            async with asyncio.timeout(HANG_SECONDS):
                body = await conn.read_multiline(max_lines)
                # The terminator was consumed, and nothing after it.
                assert (await conn.read_response()).text == "+OK after"
                return body

    if len(lines) > max_lines:
        with pytest.raises(ProtocolError, match=f"longer than {max_lines} lines"):
            asyncio.run(read())
    else:
        assert asyncio.run(read()) == [decode_line(line) for line in lines]


@READER
@given(_chunked(), st.integers(0, 8))
def test_read_multiline_on_arbitrary_bytes(case: tuple[bytes, list[bytes]], max_lines: int) -> None:
    _, chunks = case

    async def read() -> list[str] | None:
        async with _socket_pair() as (conn, peer):
            await _send(peer, *chunks)
            try:
                async with asyncio.timeout(HANG_SECONDS):
                    return await conn.read_multiline(max_lines)
            except ProbeError:
                return None

    body = asyncio.run(read())
    if body is not None:
        assert len(body) <= max_lines
        assert all(len(line.encode()) <= 3 * CAP for line in body)  # U+FFFD is 3 bytes


_CAPA_TEXT = st.text(
    st.characters(codec="utf-8", exclude_characters="\n"), max_size=30
) | st.sampled_from(["USER", "user", "SASL PLAIN", "sasl  login x", "SASL", " USER", "\tSTLS"])


@PURE
@given(st.lists(_CAPA_TEXT | st.sampled_from(REGISTERED_CAPABILITIES), max_size=15))
def test_capabilities_keep_registered_names_and_count_the_rest(lines: list[str]) -> None:
    capabilities = parse_capabilities(lines)
    firsts = {line.split()[0].upper() for line in lines if line.split()}
    registered = firsts & set(REGISTERED_CAPABILITIES)
    # Registry names only, each once, in the registry's order.
    assert capabilities.names == tuple(n for n in REGISTERED_CAPABILITIES if n in registered)
    assert capabilities.unregistered == len(firsts - registered)


@PURE
@given(st.lists(_CAPA_TEXT, max_size=15), st.integers(0, 15))
def test_plaintext_auth_needs_user_or_plain_sasl(lines: list[str], position: int) -> None:
    capabilities = parse_capabilities(lines)
    exposed = exposes_plaintext_auth(capabilities)
    if exposed:
        assert "USER" in capabilities.names or "SASL" in capabilities.names
    if "USER" in capabilities.names:
        assert exposed
    # Adding USER (anywhere) always exposes; removing USER and SASL lines never does.
    assert exposes_plaintext_auth(
        parse_capabilities([*lines[:position], "USER", *lines[position:]])
    )
    kept = [
        line
        for line in lines
        if not line.split() or line.split()[0].upper() not in ("USER", "SASL")
    ]
    assert not exposes_plaintext_auth(parse_capabilities(kept))


_ARBITRARY_CAPA = st.lists(
    st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=20)
    | st.sampled_from(["X\x01", "X\x02", "x\x01", "TOP", "top", "SASL PLAIN", "STLS\x00"]),
    max_size=40,
)


@PURE
@given(_ARBITRARY_CAPA, st.sampled_from(["", "application/openmetrics-text;version=1.0.0"]))
def test_no_capa_reply_can_make_duplicate_or_unbounded_series(
    lines: list[str], accept: str
) -> None:
    """Whatever CAPA says: at most the registry's labels plus one count, each series once
    (names that differ only in unprintable characters used to collide)."""
    result = ProbeResult(
        target="t:110",
        module_name="pop3",
        timeout_seconds=10.0,
        duration_seconds=0.1,
        success=True,
        failure_reason=None,
        failure_detail=None,
        failed_phase=None,
        phase_durations=(),
        dns_lookup_seconds=None,
        ip_protocol=4,
        address="127.0.0.1",
        greeting="+OK",
        greeting_seconds=0.01,
        greeting_match=True,
        capabilities=parse_capabilities(lines),
        plaintext_auth_exposed=None,
        tls=None,
    )
    body, _ = render_probe(result, TLSMode.NONE, accept)
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    capability_series = 0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in seen, key
            seen.add(key)
            if sample.name == "probe_pop3_capability":
                capability_series += 1
                assert sample.labels["capability"] in REGISTERED_CAPABILITIES
    assert capability_series == len(REGISTERED_CAPABILITIES)
    assert ("probe_pop3_capabilities_unregistered", ()) in seen


# ------------------------------------------------------------------ over real sockets


@SOCKETS
@given(_chunked(st.lists(st.one_of(_PIECES, st.binary(max_size=6)), max_size=30).map(b"".join)))
def test_line_reader_over_tls_records(pki: TestPKI, case: tuple[bytes, list[bytes]]) -> None:
    """Each chunk is its own TLS record; the lines must not depend on where records end."""
    data, chunks = case

    async def script(conn: FakeConnection) -> None:
        for chunk in chunks:
            if chunk:
                await conn.send(chunk)
                await asyncio.sleep(0.001)
        # Returning closes the session with a TLS close_notify.

    async def run() -> tuple[list[bytes], type]:
        context = server_ssl_context(pki.variants["good"])
        async with FakePop3Server(script, ssl_context=context) as server:
            async with asyncio.timeout(HANG_SECONDS):
                conn = await Pop3Connection.connect("127.0.0.1", server.port, max_line_bytes=CAP)
            async with conn:
                async with asyncio.timeout(HANG_SECONDS):
                    await conn.start_tls(client_ssl_context(pki.ca_file), "localhost")
                return await _read_to_end(conn, len(data))

    lines, ending = asyncio.run(run())
    assert all(len(line) <= CAP for line in lines)
    assert (lines, ending) == _reference(data, CAP)


_GREETING = st.one_of(
    st.binary(max_size=60).map(lambda b: b"+OK " + b),
    st.binary(max_size=60),
).map(lambda b: b.replace(b"\n", b"") + b"\r\n")
_RAW_CAPA = st.lists(
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    max_size=8,
)


@SOCKETS
@given(_GREETING, _RAW_CAPA)
def test_probe_of_arbitrary_greeting_and_capa_stays_safe(
    greeting: bytes, capa: list[bytes]
) -> None:
    """Whatever a server says: a known reason, parseable metrics, a printable report."""
    module = Module(name="prop", tls=TLSMode.NONE, tls_config=TLSConfig())

    async def script(conn: FakeConnection) -> None:
        await serve(conn, greeting=greeting, capabilities=capa)

    async def run() -> ProbeResult:
        async with FakePop3Server(script) as server:
            target = ProbeTarget("127.0.0.1", server.port, is_ip_literal=True)
            return await probe_pop3(target, module, HANG_SECONDS, record_transcript=True)

    result = asyncio.run(run())
    greeted = greeting.startswith(b"+OK")
    expected = None if greeted else FailureReason.GREETING_ERROR
    assert result.failure_reason is expected, result.failure_detail
    if greeted:
        # The names are those of the lines up to a lone ".", unstuffed and decoded.
        body: list[str] = []
        for line in capa:
            if line == b".":
                break
            body.append(decode_line(line[1:] if line.startswith(b".") else line))
        assert result.capabilities == parse_capabilities(body)
    text = generate_latest(probe_registry(result, module.tls)).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["probe_success"].samples[0].value == float(result.success)
    capability = families.get("probe_pop3_capability")
    assert (capability is not None) is (result.capabilities is not None)
    if capability is not None:
        labels = [sample.labels["capability"] for sample in capability.samples]
        assert labels == list(REGISTERED_CAPABILITIES)
    report = debug_report(result, module, text)
    assert all(line.isprintable() for line in report.split("\n"))


# ------------------------------------------------------------------ targets


def _check_spec(raw: str, spec: TargetSpec) -> None:
    assert 0 < len(raw) <= MAX_TARGET_LENGTH
    assert spec.host
    assert spec.host.isprintable()
    assert not any(ch.isspace() for ch in spec.host)
    assert spec.port is None or 1 <= spec.port <= 65535
    assert spec.scheme is None or spec.scheme in SCHEMES
    try:
        ipaddress.ip_address(spec.host)
    except ValueError:
        assert not spec.is_ip_literal
        assert spec.host.isascii()
    else:
        assert spec.is_ip_literal
    # A second parse of the canonical form (as ProbeTarget prints it) agrees.
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    again = parse_target(host if spec.port is None else f"{host}:{spec.port}")
    assert (again.host, again.port, again.is_ip_literal) == (
        spec.host,
        spec.port,
        spec.is_ip_literal,
    )


def _parse_or_error(raw: str) -> TargetSpec | None:
    try:
        return parse_target(raw)
    except TargetError:
        return None


_TARGET_ALPHABET = "[]:/.@?#%0123456789abcdefABCDEF-_xnpos3 \t\x00\x7fé\u200b"


@PURE
@given(
    st.one_of(
        st.text(max_size=60),
        st.text(alphabet=_TARGET_ALPHABET, max_size=40),
        st.from_regex(r"(pop3s?://)?\[?[0-9a-f:.%]{0,20}\]?(:[0-9]{0,6})?/?", fullmatch=True),
        st.text(min_size=MAX_TARGET_LENGTH - 2, max_size=MAX_TARGET_LENGTH + 2, alphabet="ab."),
    )
)
def test_parse_target_gives_a_consistent_spec_or_target_error(raw: str) -> None:
    spec = _parse_or_error(raw)  # anything but TargetError propagates and fails
    if spec is not None:
        _check_spec(raw, spec)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_HOSTNAME = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_IPV4 = st.ip_addresses(v=4).map(str)
_IPV6 = st.ip_addresses(v=6).map(str)


@PURE
@given(
    st.one_of(_HOSTNAME, _IPV4, _IPV6),
    st.none() | st.integers(1, 65535),
    st.none() | st.sampled_from(SCHEMES),
    st.booleans(),
)
def test_parse_target_round_trips_valid_targets(
    host: str, port: int | None, scheme: str | None, slash: bool
) -> None:
    bracketed = f"[{host}]" if ":" in host else host
    authority = bracketed if port is None else f"{bracketed}:{port}"
    raw = authority if scheme is None else f"{scheme}://{authority}{'/' if slash else ''}"
    spec = parse_target(raw)
    assert (spec.host, spec.port, spec.scheme) == (host, port, scheme)
    _check_spec(raw, spec)


@PURE
@given(st.integers(min_value=-(10**6), max_value=10**7))
def test_parse_target_ports_in_range_only(port: int) -> None:
    spec = _parse_or_error(f"mail.example.test:{port}")
    assert (spec is not None) is (1 <= port <= 65535)
    if spec is not None:
        assert spec.port == port


_SCOPE_ID = st.text(alphabet=string.ascii_letters + string.digits + "]-_.", min_size=1, max_size=6)


@PURE
@given(_IPV6, _SCOPE_ID)
def test_parse_target_ipv6_scope_ids(address: str, scope: str) -> None:
    raw = f"{address}%{scope}"
    spec = _parse_or_error(raw)
    if spec is not None:
        assert spec.host == raw
        assert spec.port is None
        assert spec.is_ip_literal


def test_scoped_ipv6_targets_can_be_printed_and_parsed_again() -> None:
    spec = parse_target("fe80::1%eth0")
    printed = str(ProbeTarget(spec.host, 110, spec.is_ip_literal))
    again = parse_target(printed)
    assert (again.host, again.port) == (spec.host, 110)
    # A scope id that could not be bracketed again is refused up front.
    with pytest.raises(TargetError):
        parse_target("fe80::1%]")
