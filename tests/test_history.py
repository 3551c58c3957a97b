"""The probe history: its count and byte bounds, the id scheme, the landing page's table
(escaped, under a strict Content-Security-Policy) and the reports behind it."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import hashlib
import re
import sys
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3_exporter.config import Module, builtin_modules
from pop3_exporter.delivery import DeliveryRuntime
from pop3_exporter.history import (
    MAX_ROW_DETAIL_CHARS,
    MIN_ENTRY_BYTES,
    ProbeHistory,
    result_bytes,
)
from pop3_exporter.http import HISTORY_KEY, create_app
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.prober import AddressCheck, Pop3Prober
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.result import (
    AddressesProbed,
    AddressOutcome,
    CertFacts,
    DaneFacts,
    FailureReason,
    Phase,
    ProbeResult,
    TLSFacts,
    TranscriptLine,
)
from pop3_exporter.runtime import ConfigHolder
from pop3_exporter.settings import Settings
from pop3_exporter.target import ProbeTarget
from tests.support.exporter import REPO, ExporterProcess
from tests.support.fakemail import FakeMailServer
from tests.support.fakepop3 import FakePop3Server, dialogue
from tests.support.fakeprober import canned_result

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]

MODULE = builtin_modules()["pop3"]
TARGET = ProbeTarget("127.0.0.1", 110, True)
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">\'&'


def result(lines: int = 0, line_chars: int = 60, **changes: Any) -> ProbeResult:
    transcript = tuple(
        TranscriptLine(i / 1000, "S", f"{i:06d} " + "x" * max(line_chars - 7, 0))
        for i in range(lines)
    )
    return dataclasses.replace(canned_result(TARGET, MODULE), transcript=transcript, **changes)


def cert(index: int, san_count: int = 3) -> CertFacts:
    return CertFacts(
        subject=f"CN=server{index}.example.test,O=Example",
        issuer="CN=Example Intermediate CA,O=Example",
        serial_number=f"{index:040x}",
        fingerprint_sha256=f"{index:064x}",
        subject_alternative_names=tuple(f"name{n}.example.test" for n in range(san_count)),
        not_before=1.7e9,
        not_after=1.8e9 + index,
        key_algorithm="ec",
        key_bits=256 + index,
        signature_algorithm="ecdsa-with-SHA256",
    )


def tls_facts(san_count: int = 3) -> TLSFacts:
    chain = tuple(cert(i, san_count) for i in range(3))
    return TLSFacts(True, True, None, "TLS 1.3", "TLS_AES_256_GCM_SHA384", chain, chain)


def every_address(count: int) -> AddressesProbed:
    outcomes = tuple(
        AddressOutcome(f"2001:db8:1234:5678:9abc:def0:1:{i:x}", 6, False, FailureReason.TIMEOUT, i)
        for i in range(count)
    )
    return AddressesProbed(outcomes, resolved=count + 4)


def dane_facts() -> DaneFacts:
    name = "_995._tcp." + "a" * 200 + ".example.test."
    return DaneFacts(name, 3, True, False, matched="3 1 1", problem="é" * 300)


def deep_size(obj: object, seen: set[int] | None = None) -> int:
    """What ``obj`` and everything it reaches take (each object once; None, booleans
    and enum members are shared by all and not counted)."""
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, bool | enum.Enum) or id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, tuple | list):
        size += sum(deep_size(item, seen) for item in obj)
    elif dataclasses.is_dataclass(obj):
        size += sum(deep_size(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return size


@pytest.mark.parametrize(
    "sample",
    [
        result(),
        result(lines=12),
        result(lines=1000, line_chars=64),
        result(lines=20, tls=tls_facts()),
        result(lines=5, tls=tls_facts(san_count=500)),
        result(lines=3, failure_detail="é" * 300, greeting="+OK " + "ü" * 500),
        result(lines=5, tls=tls_facts(), addresses=every_address(16), dane=dane_facts()),
    ],
    ids=["bare", "plain", "long", "tls", "many-sans", "non-ascii", "every-address-dane"],
)
def test_result_bytes_is_a_close_upper_bound(sample: ProbeResult) -> None:
    real = deep_size(sample)
    estimate = result_bytes(sample)
    assert real <= estimate <= 2 * real + 4096, (real, estimate)


def test_count_bound_keeps_the_newest() -> None:
    history = ProbeHistory(3)
    entries = [history.add(result(lines=2), MODULE, 1000.0 + i) for i in range(5)]
    assert [entry.id for entry in entries if entry is not None] == [1, 2, 3, 4, 5]
    assert [entry.id for entry in history.newest_first()] == [5, 4, 3]
    assert len(history) == 3
    assert history.get(2) is None and history.get(3) is entries[2]
    assert history.size_bytes == sum(entry.size_bytes for entry in history.newest_first())


def test_byte_bound_drops_the_oldest_and_keeps_the_newest() -> None:
    history = ProbeHistory(1000, max_bytes=100_000, max_entry_bytes=40_000)
    for _ in range(20):
        history.add(result(lines=100), MODULE, 1000.0)
        assert history.size_bytes <= 100_000
    kept = history.newest_first()
    assert 2 <= len(kept) < 20
    assert kept[0].id == 20
    assert [entry.id for entry in kept] == list(range(20, 20 - len(kept), -1))
    assert history.size_bytes == sum(entry.size_bytes for entry in kept)


def test_long_transcript_is_cut_to_the_entry_bound_and_the_original_stays() -> None:
    history = ProbeHistory(10, max_bytes=1_000_000, max_entry_bytes=20_000)
    original = result(lines=1000, line_chars=64)
    entry = history.add(original, MODULE, 1000.0)
    assert entry is not None and entry.result is not None
    assert entry.size_bytes <= 20_000
    lines = entry.result.transcript
    assert 10 < len(lines) < 1000
    assert lines[:-1] == original.transcript[: len(lines) - 1]
    assert lines[-1].direction == "!"
    assert (
        lines[-1].text == f"transcript cut to {len(lines) - 1} of 1000 lines for the probe history"
    )
    # The cut copy is a new result; the one /probe answered with keeps every line.
    assert len(original.transcript) == 1000
    assert dataclasses.replace(entry.result, transcript=original.transcript) == original
    # Within its bound by the real measure too, not only by the estimate.
    assert deep_size(entry.result) <= 20_000


def test_result_over_the_entry_bound_without_transcript_keeps_only_the_row() -> None:
    history = ProbeHistory(10, max_bytes=1_000_000, max_entry_bytes=20_000)
    huge = result(lines=5, tls=tls_facts(san_count=2000), success=False)
    entry = history.add(huge, MODULE, 1000.0)
    assert entry is not None and entry.result is None
    assert (entry.target, entry.module_name, entry.success) == (huge.target, "pop3", False)
    assert entry.size_bytes < 2_000


def test_long_failure_detail_is_cut_in_the_row() -> None:
    history = ProbeHistory(10, max_bytes=1_000_000, max_entry_bytes=MIN_ENTRY_BYTES)
    detail = "ü" * 20_000
    huge = result(lines=5, tls=tls_facts(san_count=200), success=False, failure_detail=detail)
    entry = history.add(huge, MODULE, 1000.0)
    assert entry is not None and entry.result is None
    assert entry.failure_detail == "ü" * MAX_ROW_DETAIL_CHARS + "..."
    assert entry.size_bytes <= MIN_ENTRY_BYTES
    assert deep_size(entry) - deep_size(entry.module) <= entry.size_bytes


def test_limit_zero_keeps_nothing() -> None:
    history = ProbeHistory(0)
    assert not history.enabled
    assert history.add(result(), MODULE, 1000.0) is None
    assert len(history) == 0 and history.size_bytes == 0


@pytest.mark.parametrize(
    ("limit", "max_bytes", "max_entry_bytes"),
    [
        (-1, 100_000, 10_000),
        (1, 100_000, MIN_ENTRY_BYTES - 1),
        (1, 100_000, 100_001),
    ],
)
def test_bad_bounds_are_refused(limit: int, max_bytes: int, max_entry_bytes: int) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        ProbeHistory(limit, max_bytes=max_bytes, max_entry_bytes=max_entry_bytes)


@settings(max_examples=50, deadline=None)
@given(
    limit=st.integers(1, 30),
    max_entry_bytes=st.integers(8_000, 60_000),
    extra_bytes=st.integers(0, 200_000),
    sizes=st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 300)), max_size=60),
)
def test_bounds_hold_for_any_sequence(
    limit: int, max_entry_bytes: int, extra_bytes: int, sizes: list[tuple[int, int]]
) -> None:
    history = ProbeHistory(
        limit, max_bytes=max_entry_bytes + extra_bytes, max_entry_bytes=max_entry_bytes
    )
    for number, (lines, chars) in enumerate(sizes, start=1):
        entry = history.add(result(lines=lines, line_chars=chars), MODULE, 1000.0)
        assert entry is not None and entry.id == number
        assert entry.size_bytes <= max_entry_bytes
        kept = history.newest_first()
        assert kept[0] is entry
        assert len(kept) <= limit
        assert history.size_bytes == sum(e.size_bytes for e in kept) <= history.max_bytes
        assert [e.id for e in kept] == list(range(number, number - len(kept), -1))


class ScriptedProber:
    """Returns the results it is given, in turn; notes whether a transcript was asked."""

    def __init__(self, *results: ProbeResult) -> None:
        self.results = list(results)
        self.transcripts_asked: list[bool] = []

    async def __call__(
        self,
        target: ProbeTarget,
        module: Module,
        timeout_seconds: float,
        *,
        ssl_context: object,
        record_transcript: bool,
        address_check: AddressCheck | None = None,
        delivery: DeliveryRuntime | None = None,
    ) -> ProbeResult:
        self.transcripts_asked.append(record_transcript)
        return dataclasses.replace(self.results.pop(0), target=str(target), module_name=module.name)


async def make_client(
    aiohttp_client: ClientFactory,
    prober: object,
    config_path: Path | None = None,
    **settings: Any,
) -> tuple[Client, ConfigHolder]:
    holder = ConfigHolder(str(config_path) if config_path else None, ExporterMetrics())
    app = create_app(holder, prober=prober, settings=Settings(**settings))  # type: ignore[arg-type]
    return await aiohttp_client(app), holder


class Elements(HTMLParser):
    """Every start tag of a page, its attributes, and the cells of table#history."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[list[str]] = []
        self._in_history = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self._in_history = dict(attrs).get("id") == "history"
        elif self._in_history and tag == "tr":
            self.cells.append([])
        elif self._in_history and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._in_history = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> Elements:
    parser = Elements()
    parser.feed(page)
    parser.close()
    return parser


async def test_landing_page_lists_probes_escaped(aiohttp_client: ClientFactory) -> None:
    failed = result(
        lines=3,
        success=False,
        failure_reason=FailureReason.GREETING_ERROR,
        failure_detail=f"greeting is not +OK: {HOSTILE!r}",
        failed_phase=Phase.GREETING,
        duration_seconds=0.0123,
    )
    prober = ScriptedProber(result(lines=3), failed)
    client, _ = await make_client(aiohttp_client, prober)
    for _ in range(2):
        response = await client.get("/probe", params={"target": "127.0.0.1:1110", "module": "pop3"})
        assert response.status == 200
    response = await client.get("/")
    page = await response.text()
    assert response.status == 200
    # Nothing the server sent became markup: the text is there, escaped.
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;&lt;img src=x onerror=" in page
    elements = parse(page)
    assert {tag for tag, _ in elements.tags} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code",
        "form", "label", "input", "select", "option", "ul", "li", "a", "table", "tr", "th", "td",
    }  # fmt: skip
    assert not any(name.startswith("on") for _, attrs in elements.tags for name in attrs)
    first, second = elements.cells[1:]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", first[0])
    assert first[1:] == [
        "127.0.0.1:1110",
        "pop3",
        "failure",
        "greeting_error",
        f"greeting is not +OK: {HOSTILE!r}",
        "12.3 ms",
        "report",
    ]
    assert second[1:6] == ["127.0.0.1:1110", "pop3", "success", "", ""]
    links = [attrs["href"] for tag, attrs in elements.tags if tag == "a"]
    assert links[-2:] == ["probe/history/2", "probe/history/1"]
    # Every probe recorded its transcript for the history, though none asked for debug.
    assert prober.transcripts_asked == [True, True]
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "form-action 'self'" in csp and "style-src 'sha256-" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_style_hash_matches_the_page(aiohttp_client: ClientFactory) -> None:
    client, _ = await make_client(aiohttp_client, ScriptedProber())
    response = await client.get("/")
    page = await response.text()
    style = re.search(r"<style>(.*?)</style>", page, re.DOTALL)
    assert style is not None
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in response.headers["Content-Security-Policy"]


async def test_report_is_what_debug_true_returned(aiohttp_client: ClientFactory) -> None:
    """A real probe of a fake server: /probe?debug=true, then the history's report of
    that same probe, byte for byte."""
    greeting = f"+OK {HOSTILE}\r\n".encode()
    async with FakePop3Server(dialogue(greeting=greeting)) as server:
        client, _ = await make_client(aiohttp_client, Pop3Prober(StaticResolver({})))
        target = f"127.0.0.1:{server.port}"
        response = await client.get(
            "/probe", params={"target": target, "module": "pop3", "debug": "true"}
        )
        debug_text = await response.text()
        assert response.status == 200
    response = await client.get("/probe/history/1")
    assert response.status == 200
    assert await response.text() == debug_text
    assert f"S: +OK {HOSTILE}" in debug_text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp


@pytest.mark.parametrize("path", ["2", "0", "007", "-1", "abc", "1x", "99999999999999999999"])
async def test_unknown_ids_are_404(aiohttp_client: ClientFactory, path: str) -> None:
    client, _ = await make_client(aiohttp_client, ScriptedProber(result()))
    response = await client.get("/probe", params={"target": "127.0.0.1", "module": "pop3"})
    assert response.status == 200
    assert (await client.get("/probe/history/1")).status == 200
    response = await client.get(f"/probe/history/{path}")
    assert response.status == 404


async def test_dropped_entries_are_404(aiohttp_client: ClientFactory) -> None:
    prober = ScriptedProber(*(result(lines=1) for _ in range(3)))
    client, _ = await make_client(aiohttp_client, prober, history_limit=2)
    for _ in range(3):
        response = await client.get("/probe", params={"target": "127.0.0.1", "module": "pop3"})
        assert response.status == 200
    response = await client.get("/probe/history/1")
    assert response.status == 404
    assert await response.text() == "probe 1 is not in the history (it keeps the last 2 probes)\n"
    assert (await client.get("/probe/history/3")).status == 200


async def test_report_not_kept_is_404_and_unlinked(aiohttp_client: ClientFactory) -> None:
    huge = result(lines=2, tls=tls_facts(san_count=2000))
    client, _ = await make_client(
        aiohttp_client, ScriptedProber(huge), history_max_entry_bytes=20_000
    )
    response = await client.get("/probe", params={"target": "127.0.0.1", "module": "pop3"})
    assert response.status == 200
    response = await client.get("/probe/history/1")
    assert response.status == 404
    assert "over the history's bound of 20000 bytes per probe" in await response.text()
    elements = parse(await (await client.get("/")).text())
    assert elements.cells[1][-1] == "not kept (over the size bound)"
    assert not any(
        (attrs.get("href") or "").startswith("probe/history/") for _, attrs in elements.tags
    )


async def test_history_off(aiohttp_client: ClientFactory) -> None:
    prober = ScriptedProber(result(), result())
    client, _ = await make_client(aiohttp_client, prober, history_limit=0)
    await client.get("/probe", params={"target": "127.0.0.1", "module": "pop3"})
    await client.get("/probe", params={"target": "127.0.0.1", "module": "pop3", "debug": "true"})
    # No history: a transcript only when debug=true asks for one.
    assert prober.transcripts_asked == [False, True]
    page = await (await client.get("/")).text()
    assert "The probe history is off (--history.limit 0)." in page
    assert (await client.get("/probe/history/1")).status == 404
    assert len(client.app[HISTORY_KEY]) == 0


async def test_report_keeps_the_module_of_its_probe(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    config = tmp_path / "pop3_exporter.yml"
    config.write_text("modules:\n  mine:\n    expect_greeting: '^\\+OK before'\n")
    prober = ScriptedProber(result(), result())
    client, holder = await make_client(aiohttp_client, prober, config)
    await client.get("/probe", params={"target": "127.0.0.1", "module": "mine"})
    config.write_text("modules:\n  mine:\n    expect_greeting: '^\\+OK after'\n")
    assert holder.reload() is None
    await client.get("/probe", params={"target": "127.0.0.1", "module": "mine"})
    first = await (await client.get("/probe/history/1")).text()
    second = await (await client.get("/probe/history/2")).text()
    assert "expect_greeting: ^\\+OK before" in first
    assert "expect_greeting: ^\\+OK after" in second


async def test_no_secret_in_history(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    password = "correct horse battery"
    user = "monitor@example.test"
    secret_file = tmp_path / "password"
    secret_file.write_text(password + "\n")
    secret_file.chmod(0o600)
    server = FakeMailServer(user=user, password=password)
    async with FakePop3Server(server) as fake:
        config = tmp_path / "pop3_exporter.yml"
        config.write_text(
            "modules:\n"
            + "".join(
                f"  {mechanism}:\n    port: {fake.port}\n    auth:\n"
                f"      mechanism: {mechanism}\n      username: {user}\n"
                f"      password_file: {secret_file}\n      allow_plaintext: true\n"
                for mechanism in ("user", "plain", "login")
            )
        )
        client, _ = await make_client(aiohttp_client, Pop3Prober(StaticResolver({})), config)
        for mechanism in ("user", "plain", "login"):
            response = await client.get(
                "/probe", params={"target": "127.0.0.1", "module": mechanism}
            )
            assert "probe_success 1.0" in await response.text()
    texts = [await (await client.get("/")).text()]
    texts += [await (await client.get(f"/probe/history/{n}")).text() for n in (1, 2, 3)]
    assert all("********" in text for text in texts[1:])
    everything = "\n".join(texts)
    forms = [
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(f"\0{user}\0{password}".encode()).decode(),
    ]
    for form in forms:
        assert form not in everything


async def test_history_limit_flag(tmp_path: Path) -> None:
    """--history.limit reaches the running exporter (and a negative one is refused)."""
    refused = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "pop3_exporter", "--history.limit", "-1"),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, stderr = await refused.communicate()
    assert refused.returncode == 2 and b"--history.limit" in stderr
    async with FakePop3Server(dialogue()) as fake:
        with ExporterProcess(tmp_path / "exporter.log", "--history.limit", "2") as exporter:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                for _ in range(3):
                    params = {"target": f"127.0.0.1:{fake.port}", "module": "pop3"}
                    async with session.get(f"{exporter.url}/probe", params=params) as response:
                        assert response.status == 200
                async with session.get(exporter.url + "/") as response:
                    page = await response.text()
                statuses = []
                for entry_id in (1, 2, 3):
                    async with session.get(f"{exporter.url}/probe/history/{entry_id}") as response:
                        statuses.append(response.status)
    assert "The last 2 probes of at most 2" in page
    assert statuses == [404, 200, 200]
