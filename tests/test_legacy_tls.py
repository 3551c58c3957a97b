"""tls_config.check_legacy_versions: extra handshakes limited to TLS 1.0 and TLS 1.1
(issue 12, item 2).

Real Dovecots that accept TLS 1.0 and 1.1, TLS 1.1 only, or neither (the stock
TLSv1.2 minimum) give the answers; fake servers only for what Dovecot does not do
(hanging after STLS, so that only the deadline ends the extra handshakes).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import warnings
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from pop3_exporter.config import Module, TLSConfig, TLSMode, parse_config
from pop3_exporter.errors import ConfigError
from pop3_exporter.http import create_app
from pop3_exporter.legacytls import LEGACY_CIPHERS
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.prober import Pop3Prober, probe_pop3
from pop3_exporter.result import FailureReason
from pop3_exporter.runtime import ConfigHolder
from pop3_exporter.target import ProbeTarget
from tests.conftest import require_dovecot
from tests.support.certs import TestPKI, client_ssl_context
from tests.support.dovecot import DovecotServer, stop_servers
from tests.support.exposition import (
    Samples,
    labelled,
    parse_samples,
    promtool_check_metrics,
    value,
)
from tests.support.fakepop3 import (
    FakeConnection,
    FakePop3Server,
    dialogue,
    server_ssl_context,
    silent,
)
from tests.support.render import render_probe

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]

LEGACY = "probe_tls_legacy_version_accepted"
# Dovecot's ssl_min_protocol -> what the probe must find.
EXPECTED = {
    "TLSv1": {"TLS 1.0": 1.0, "TLS 1.1": 1.0},
    "TLSv1.1": {"TLS 1.0": 0.0, "TLS 1.1": 1.0},
    "TLSv1.2": {"TLS 1.0": 0.0, "TLS 1.1": 0.0},  # Dovecot's stock setting here
}


@pytest.fixture(scope="module")
def legacy_dovecots(pki: TestPKI, dovecot_workroot: Path) -> Iterator[dict[str, DovecotServer]]:
    """Dovecots allowing TLS 1.0 and up, and TLS 1.1 and up (started in parallel)."""
    require_dovecot()
    servers = {
        protocol: DovecotServer(
            dovecot_workroot / f"legacy-{protocol}",
            pki.variants["good"],
            listen=("127.0.0.1",),
            ssl_min_protocol=protocol,
            ssl_cipher_list="ALL:@SECLEVEL=0",
        )
        for protocol in ("TLSv1", "TLSv1.1")
    }
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            for started in [pool.submit(server.start) for server in servers.values()]:
                started.result()
        yield servers
    finally:
        stop_servers(servers.values())


@pytest.fixture
def servers(
    legacy_dovecots: dict[str, DovecotServer], dovecot: DovecotServer
) -> dict[str, DovecotServer]:
    return {**legacy_dovecots, "TLSv1.2": dovecot}


@pytest.fixture
async def client(aiohttp_client: ClientFactory, pki: TestPKI, tmp_path: Path) -> TestClient:  # type: ignore[type-arg]
    ca = pki.ca_file
    path = tmp_path / "pop3_exporter.yml"
    path.write_text(
        f"""
modules:
  pop3s:
    tls: implicit
    tls_config: {{ca_file: '{ca}', check_legacy_versions: true}}
  pop3_starttls:
    tls: starttls
    tls_config: {{ca_file: '{ca}', check_legacy_versions: true}}
  pop3s_untrusted:
    tls: implicit
    tls_config: {{check_legacy_versions: true}}
  pop3s_unasked:
    tls: implicit
    tls_config: {{ca_file: '{ca}'}}
"""
    )
    holder = ConfigHolder(str(path), ExporterMetrics())
    return await aiohttp_client(create_app(holder, prober=Pop3Prober()))


async def probe(client: TestClient, target: str, module: str) -> Samples:  # type: ignore[type-arg]
    response = await client.get("/probe", params={"target": target, "module": module})
    text = await response.text()
    assert response.status == 200, text
    promtool_check_metrics(text)
    return parse_samples(text)


@pytest.mark.dovecot
@pytest.mark.parametrize("protocol", sorted(EXPECTED))
@pytest.mark.parametrize("module", ["pop3s", "pop3_starttls"])
async def test_legacy_versions_as_dovecot_allows_them(
    client: TestClient,  # type: ignore[type-arg]
    servers: dict[str, DovecotServer],
    protocol: str,
    module: str,
) -> None:
    server = servers[protocol]
    port = server.pop3s_port if module == "pop3s" else server.pop3_port
    samples = await probe(client, f"localhost:{port}", module)
    assert value(samples, "probe_success") == 1
    assert labelled(samples, LEGACY, "version") == EXPECTED[protocol]
    # The probe's own handshake still takes the best version on offer.
    assert labelled(samples, "probe_tls_version_info", "version") == {"TLS 1.3": 1.0}
    # The extra handshakes are no phase of the dialogue.
    phases = labelled(samples, "probe_pop3_duration_seconds", "phase")
    assert "tls" in phases and phases["tls"] < 1.0


@pytest.mark.dovecot
async def test_answers_do_not_depend_on_the_probe_succeeding(
    client: TestClient,  # type: ignore[type-arg]
    servers: dict[str, DovecotServer],
) -> None:
    """The test CA is not trusted by this module: the probe fails, the question of
    legacy versions is still answered (it never verifies certificates)."""
    samples = await probe(client, f"localhost:{servers['TLSv1'].pop3s_port}", "pop3s_untrusted")
    assert value(samples, "probe_success") == 0
    assert value(samples, "probe_pop3_failure", reason="tls_cert_untrusted") == 1
    assert labelled(samples, LEGACY, "version") == EXPECTED["TLSv1"]


@pytest.mark.dovecot
async def test_not_asked_not_answered(
    client: TestClient,  # type: ignore[type-arg]
    servers: dict[str, DovecotServer],
) -> None:
    samples = await probe(client, f"localhost:{servers['TLSv1'].pop3s_port}", "pop3s_unasked")
    assert value(samples, "probe_success") == 1
    assert not labelled(samples, LEGACY, "version")


@pytest.mark.dovecot
async def test_transcript_tells_each_answer(
    servers: dict[str, DovecotServer], pki: TestPKI
) -> None:
    module = Module(
        name="pop3s",
        tls=TLSMode.IMPLICIT,
        tls_config=TLSConfig(ca_file=str(pki.ca_file), check_legacy_versions=True),
    )
    target = ProbeTarget("127.0.0.1", servers["TLSv1.1"].pop3s_port, is_ip_literal=True)
    result = await probe_pop3(target, module, 10.0, record_transcript=True)
    events = [line.text for line in result.transcript if line.direction == "*"]
    assert any(e.startswith("legacy TLS 1.0 handshake: refused (") for e in events)
    assert any(e.startswith("legacy TLS 1.1 handshake: accepted (TLS 1.1 ") for e in events)


# ---------------------------------------------------------------- fake servers


def legacy_server_context(pki: TestPKI) -> ssl.SSLContext:
    """A server context that speaks TLS 1.0 and up (Python deprecates saying so)."""
    context = server_ssl_context(pki.variants["good"])
    context.set_ciphers(LEGACY_CIPHERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    return context


def starttls_module(timeout: float, pki: TestPKI) -> Module:
    return Module(
        name="pop3_starttls",
        tls=TLSMode.STARTTLS,
        timeout=timeout,
        tls_config=TLSConfig(ca_file=str(pki.ca_file), check_legacy_versions=True),
    )


async def test_deadline_ends_unanswered_handshakes_and_leaves_them_unknown(
    pki: TestPKI,
) -> None:
    """The first connection is a good STARTTLS server; the extra ones get +OK to STLS
    and then silence. Only the probe's deadline ends them: the probe still succeeds,
    on time, and no answer is reported (absent, not 0)."""
    context = legacy_server_context(pki)
    good = dialogue(stls_context=context)

    async def first_good_then_hang(conn: FakeConnection) -> None:
        if server.connections == 1:
            await good(conn)
            return
        await conn.send_line("+OK hanging soon")
        if (await conn.readline()).strip().upper() == b"STLS":
            await conn.send_line("+OK Begin TLS negotiation")
        await silent(conn)

    timeout = 1.5
    async with FakePop3Server(first_good_then_hang) as server:
        target = ProbeTarget("127.0.0.1", server.port, is_ip_literal=True)
        loop = asyncio.get_running_loop()
        began = loop.time()
        result = await probe_pop3(
            target,
            starttls_module(timeout, pki),
            timeout,
            ssl_context=client_ssl_context(pki.ca_file),
        )
        elapsed = loop.time() - began
        # Both extra connections said STLS before they hung.
        assert server.connections == 3
        assert [s.received[:1] for s in server.sessions[1:]] == [[b"STLS\r\n"]] * 2
    assert result.success, result.failure_detail
    assert result.legacy_tls_versions == ()
    # Generous: a shared machine; the deadline itself is the lower bound.
    assert timeout - 0.1 <= elapsed < timeout + 1.0
    assert result.duration_seconds < timeout + 0.5
    body, _ = render_probe(result, TLSMode.STARTTLS, "")
    samples = parse_samples(body.decode())
    assert value(samples, "probe_success") == 1
    assert not labelled(samples, LEGACY, "version")


async def test_fake_starttls_server_allowing_legacy_versions(pki: TestPKI) -> None:
    """Every connection speaks greeting, STLS and a TLS 1.0+ handshake."""
    async with FakePop3Server(dialogue(stls_context=legacy_server_context(pki))) as server:
        target = ProbeTarget("127.0.0.1", server.port, is_ip_literal=True)
        result = await probe_pop3(
            target, starttls_module(10.0, pki), 10.0, ssl_context=client_ssl_context(pki.ca_file)
        )
        assert server.connections == 3
    assert result.success, result.failure_detail
    assert dict(result.legacy_tls_versions) == {"TLS 1.0": True, "TLS 1.1": True}


async def test_no_extra_connection_when_the_probe_could_not_connect(pki: TestPKI) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    target = ProbeTarget("127.0.0.1", port, is_ip_literal=True)
    module = Module(
        name="pop3s", tls=TLSMode.IMPLICIT, tls_config=TLSConfig(check_legacy_versions=True)
    )
    result = await probe_pop3(target, module, 5.0)
    assert result.failure_reason is FailureReason.CONNECT_REFUSED
    assert result.legacy_tls_versions == ()


async def test_plain_module_makes_no_extra_connection() -> None:
    async with FakePop3Server(dialogue()) as server:
        target = ProbeTarget("127.0.0.1", server.port, is_ip_literal=True)
        module = Module(name="pop3", tls_config=TLSConfig(check_legacy_versions=True))
        result = await probe_pop3(target, module, 5.0)
        assert server.connections == 1
    assert result.success and result.legacy_tls_versions == ()


# ---------------------------------------------------------------- configuration


def test_option_parses_and_defaults_to_off() -> None:
    config = parse_config(
        "modules:\n  m:\n    tls: implicit\n    tls_config:\n      check_legacy_versions: true\n"
    )
    assert config.modules["m"].tls_config.check_legacy_versions is True
    for name in ("pop3", "pop3_starttls", "pop3s"):
        assert config.modules[name].tls_config.check_legacy_versions is False


def test_option_must_be_a_boolean() -> None:
    text = "modules:\n  m:\n    tls_config:\n      check_legacy_versions: sometimes\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "exporter.yml")
    message = str(caught.value)
    assert message.startswith("exporter.yml:4:"), message
    assert "modules.m.tls_config.check_legacy_versions" in message
