"""The exporter against a real Dovecot: all three built-in modules and the certificate
variants, through the HTTP endpoint, with the metric values asserted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from pop3_exporter.http import create_app
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.prober import Pop3Prober
from pop3_exporter.resolver import StaticResolver
from pop3_exporter.result import REGISTERED_CAPABILITIES, FailureReason
from pop3_exporter.runtime import ConfigHolder
from tests.conftest import DovecotFactory
from tests.support.certs import TestPKI, make_client_certificate
from tests.support.dovecot import DovecotServer
from tests.support.exposition import (
    Samples,
    labelled,
    names,
    parse_samples,
    promtool_check_metrics,
    value,
)
from tests.support.fakepop3 import FakePop3Server, silent

pytestmark = pytest.mark.dovecot

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]

# "localhost" resolves, in these tests only, to both loopback addresses.
RESOLVER = StaticResolver({"localhost": ["::1", "127.0.0.1"], "pop.test": ["127.0.0.1"]})


def config_text(pki: TestPKI) -> str:
    ca = pki.ca_file
    return f"""
modules:
  pop3_starttls:
    tls: starttls
    tls_config: {{ca_file: '{ca}'}}
  pop3s:
    tls: implicit
    tls_config: {{ca_file: '{ca}'}}
  pop3_outside:
    source_ip_address: 127.0.0.2
    preferred_ip_protocol: ip4
  pop3_starttls_outside:
    tls: starttls
    source_ip_address: 127.0.0.2
    preferred_ip_protocol: ip4
    tls_config: {{ca_file: '{ca}'}}
  pop3_ip4:
    preferred_ip_protocol: ip4
  pop3_ip6_only:
    preferred_ip_protocol: ip6
    ip_protocol_fallback: false
  pop3_ip6_fallback:
    preferred_ip_protocol: ip6
  pop3_dovecot:
    expect_greeting: '^\\+OK Dovecot'
  pop3_courier:
    expect_greeting: 'Courier'
  pop3_no_capa:
    query_capabilities: false
  pop3s_named:
    tls: implicit
    tls_config: {{ca_file: '{ca}', server_name: localhost}}
  pop3s_skip_verify:
    tls: implicit
    tls_config: {{insecure_skip_verify: true}}
  pop3s_tls13:
    tls: implicit
    tls_config: {{ca_file: '{ca}', min_version: TLS13}}
  pop3s_tls12_max:
    tls: implicit
    tls_config: {{ca_file: '{ca}', max_version: TLS12}}
  pop3_short:
    timeout: 1s
"""


@pytest.fixture
async def client(aiohttp_client: ClientFactory, pki: TestPKI, tmp_path: Path) -> TestClient:  # type: ignore[type-arg]
    path = tmp_path / "pop3_exporter.yml"
    path.write_text(config_text(pki))
    holder = ConfigHolder(str(path), ExporterMetrics())
    return await aiohttp_client(create_app(holder, prober=Pop3Prober(RESOLVER)))


async def probe(client: TestClient, target: str, module: str) -> Samples:  # type: ignore[type-arg]
    response = await client.get("/probe", params={"target": target, "module": module})
    text = await response.text()
    assert response.status == 200, text
    promtool_check_metrics(text)
    return parse_samples(text)


def failure_reasons(samples: Samples) -> dict[str, float]:
    reasons = labelled(samples, "probe_pop3_failure", "reason")
    # The whole fixed set is always present, whatever happened.
    assert set(reasons) == {reason.value for reason in FailureReason}
    return reasons


def assert_failed_with(samples: Samples, reason: FailureReason) -> None:
    assert value(samples, "probe_success") == 0
    reasons = failure_reasons(samples)
    assert reasons[reason.value] == 1, reasons
    assert sum(reasons.values()) == 1


def assert_succeeded(samples: Samples) -> None:
    reasons = failure_reasons(samples)
    assert value(samples, "probe_success") == 1, reasons
    assert sum(reasons.values()) == 0


async def test_pop3_plain_full_metric_set(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    samples = await probe(client, f"127.0.0.1:{dovecot.pop3_port}", "pop3")
    assert_succeeded(samples)
    assert value(samples, "probe_pop3_greeting_match") == 1
    greeting = value(samples, "probe_pop3_greeting_seconds")
    duration = value(samples, "probe_duration_seconds")
    assert greeting is not None and duration is not None and 0 < greeting <= duration
    assert value(samples, "probe_timeout_seconds") == 10.0
    assert value(samples, "probe_ip_protocol") == 4
    assert value(samples, "probe_dns_lookup_time_seconds") is not None
    phases = labelled(samples, "probe_pop3_duration_seconds", "phase")
    assert set(phases) == {"resolve", "connect", "greeting", "capa", "quit"}
    capabilities = labelled(samples, "probe_pop3_capability", "capability")
    advertised = {name for name, value in capabilities.items() if value == 1.0}
    registered = {"TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "STLS", "USER"}
    assert advertised == registered | {"SASL"}
    assert set(capabilities) == set(REGISTERED_CAPABILITIES)
    # Dovecot also lists "CAPA", which the IANA registry does not name.
    assert samples[("probe_pop3_capabilities_unregistered", ())] == 1.0
    # 127.0.0.1 -> 127.0.0.1 counts as secured for Dovecot, so it offers USER in the clear.
    assert value(samples, "probe_pop3_plaintext_auth_exposed") == 1
    assert "probe_tls_valid" not in names(samples)
    assert "probe_ssl_earliest_cert_expiry" not in names(samples)


async def test_pop3_from_outside_address_sees_no_plaintext_auth(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    samples = await probe(client, f"pop.test:{dovecot.pop3_port}", "pop3_outside")
    assert_succeeded(samples)
    # disable_plaintext_auth=yes: an outside client is offered no USER and no SASL PLAIN.
    assert value(samples, "probe_pop3_plaintext_auth_exposed") == 0
    assert labelled(samples, "probe_pop3_capability", "capability")["USER"] == 0.0


async def test_pop3_starttls_full_metric_set(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
    pki: TestPKI,
) -> None:
    samples = await probe(client, f"localhost:{dovecot.pop3_port}", "pop3_starttls")
    assert_succeeded(samples)
    phases = labelled(samples, "probe_pop3_duration_seconds", "phase")
    assert set(phases) == {"resolve", "connect", "greeting", "capa", "stls", "tls", "quit"}
    assert value(samples, "probe_tls_valid") == 1
    assert value(samples, "probe_ip_protocol") == 6  # ip6 preferred by default
    good = pki.variants["good"]
    assert value(samples, "probe_ssl_earliest_cert_expiry") == good.earliest_not_after.timestamp()
    verified_expiry = value(samples, "probe_ssl_last_chain_expiry_timestamp_seconds")
    assert verified_expiry is not None and verified_expiry <= good.leaf_not_after.timestamp()
    assert labelled(samples, "probe_tls_version_info", "version") == {"TLS 1.3": 1.0}
    assert len(labelled(samples, "probe_tls_cipher_info", "cipher")) == 1
    (chain_info,) = [labels for (n, labels) in samples if n == "probe_ssl_last_chain_info"]
    info = dict(chain_info)
    assert info["subject"].startswith("CN=localhost")
    assert "DNS:localhost" in info["subjectalternative"]
    assert len(info["fingerprint_sha256"]) == 64
    # After STLS the capabilities are the ones Dovecot offers inside TLS: no STLS again.
    capabilities = labelled(samples, "probe_pop3_capability", "capability")
    assert capabilities["STLS"] == 0.0 and capabilities["USER"] == 1.0


async def test_pop3_starttls_from_outside_reports_plaintext_state_before_tls(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    samples = await probe(client, f"localhost:{dovecot.pop3_port}", "pop3_starttls_outside")
    assert_succeeded(samples)
    assert value(samples, "probe_pop3_plaintext_auth_exposed") == 0
    # Inside TLS the outside client is offered USER.
    assert "USER" in labelled(samples, "probe_pop3_capability", "capability")


async def test_pop3s_full_metric_set(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
    pki: TestPKI,
) -> None:
    samples = await probe(client, f"[::1]:{dovecot.pop3s_port}", "pop3s")
    assert_succeeded(samples)
    phases = labelled(samples, "probe_pop3_duration_seconds", "phase")
    assert set(phases) == {"resolve", "connect", "tls", "greeting", "capa", "quit"}
    greeting = value(samples, "probe_pop3_greeting_seconds")
    # On implicit TLS the greeting time includes the handshake. It is when the greeting
    # reached the kernel (from just before the TCP connect), which can be before the
    # probe finished processing the handshake's last flight (TLS 1.3 sends both
    # together), and whose start differs from the connect phase's by the scheduling of
    # a loaded machine: so within the connect, TLS and greeting phases, with a margin.
    assert greeting is not None
    assert 0 < greeting <= phases["connect"] + phases["tls"] + phases["greeting"] + 0.005
    assert value(samples, "probe_tls_valid") == 1
    assert value(samples, "probe_ip_protocol") == 6
    good = pki.variants["good"]
    assert value(samples, "probe_ssl_earliest_cert_expiry") == good.earliest_not_after.timestamp()
    assert "probe_pop3_plaintext_auth_exposed" not in names(samples)


async def test_pop3s_target_url_selects_module(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    response = await client.get(
        "/probe", params={"target": f"pop3s://localhost:{dovecot.pop3s_port}"}
    )
    samples = parse_samples(await response.text())
    assert_succeeded(samples)
    assert value(samples, "probe_tls_valid") == 1


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("expired", FailureReason.TLS_CERT_EXPIRED),
        ("not_yet_valid", FailureReason.TLS_CERT_EXPIRED),
        ("self_signed", FailureReason.TLS_CERT_UNTRUSTED),
        ("wrong_host", FailureReason.TLS_HOSTNAME_MISMATCH),
    ],
)
@pytest.mark.parametrize("module", ["pop3s", "pop3_starttls"])
async def test_bad_certificates_fail_with_reason_and_still_report_expiry(
    client: TestClient,  # type: ignore[type-arg]
    dovecot_variant: DovecotFactory,
    pki: TestPKI,
    variant: str,
    reason: FailureReason,
    module: str,
) -> None:
    server = dovecot_variant(variant)
    port = server.pop3s_port if module == "pop3s" else server.pop3_port
    samples = await probe(client, f"localhost:{port}", module)
    assert_failed_with(samples, reason)
    assert value(samples, "probe_tls_valid") == 0
    cert = pki.variants[variant]
    assert value(samples, "probe_ssl_earliest_cert_expiry") == cert.earliest_not_after.timestamp()
    # Nothing verified, so no verified-chain expiry (and never a bogus one).
    assert "probe_ssl_last_chain_expiry_timestamp_seconds" not in names(samples)
    assert len([n for n, _ in samples if n == "probe_ssl_last_chain_info"]) == 1


async def test_insecure_skip_verify_accepts_self_signed(
    client: TestClient,  # type: ignore[type-arg]
    dovecot_variant: DovecotFactory,
    pki: TestPKI,
) -> None:
    server = dovecot_variant("self_signed")
    samples = await probe(client, f"localhost:{server.pop3s_port}", "pop3s_skip_verify")
    assert_succeeded(samples)
    # Nothing was verified, so validity is not claimed either way.
    assert "probe_tls_valid" not in names(samples)
    expiry = pki.variants["self_signed"].leaf_not_after.timestamp()
    assert value(samples, "probe_ssl_earliest_cert_expiry") == expiry


async def test_server_name_overrides_target_for_verification(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    # By IP the certificate would still match (it has IP SANs), so use a name that is
    # not in it as the target and let server_name fix the check.
    samples = await probe(client, f"pop.test:{dovecot.pop3s_port}", "pop3s_named")
    assert_succeeded(samples)
    samples = await probe(client, f"pop.test:{dovecot.pop3s_port}", "pop3s")
    assert_failed_with(samples, FailureReason.TLS_HOSTNAME_MISMATCH)


async def test_tls_version_bounds(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    samples = await probe(client, f"localhost:{dovecot.pop3s_port}", "pop3s_tls13")
    assert labelled(samples, "probe_tls_version_info", "version") == {"TLS 1.3": 1.0}
    samples = await probe(client, f"localhost:{dovecot.pop3s_port}", "pop3s_tls12_max")
    assert_succeeded(samples)
    assert labelled(samples, "probe_tls_version_info", "version") == {"TLS 1.2": 1.0}


async def test_expect_greeting(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    samples = await probe(client, f"127.0.0.1:{dovecot.pop3_port}", "pop3_dovecot")
    assert_succeeded(samples)
    samples = await probe(client, f"127.0.0.1:{dovecot.pop3_port}", "pop3_courier")
    assert_failed_with(samples, FailureReason.GREETING_MISMATCH)
    assert value(samples, "probe_pop3_greeting_match") == 0
    assert value(samples, "probe_pop3_greeting_seconds") is not None


async def test_query_capabilities_false_skips_capa(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    samples = await probe(client, f"127.0.0.1:{dovecot.pop3_port}", "pop3_no_capa")
    assert_succeeded(samples)
    assert "capa" not in labelled(samples, "probe_pop3_duration_seconds", "phase")
    assert labelled(samples, "probe_pop3_capability", "capability") == {}
    # Without CAPA the exporter cannot know, so it does not claim either way.
    assert "probe_pop3_plaintext_auth_exposed" not in names(samples)


@pytest.mark.parametrize(
    ("module", "protocol"),
    [("pop3_ip4", 4), ("pop3_ip6_fallback", 6), ("pop3", 6)],
)
async def test_preferred_ip_protocol(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
    module: str,
    protocol: int,
) -> None:
    samples = await probe(client, f"localhost:{dovecot.pop3_port}", module)
    assert_succeeded(samples)
    assert value(samples, "probe_ip_protocol") == protocol


async def test_ip_protocol_fallback(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    # pop.test has only an IPv4 address.
    samples = await probe(client, f"pop.test:{dovecot.pop3_port}", "pop3_ip6_fallback")
    assert_succeeded(samples)
    assert value(samples, "probe_ip_protocol") == 4
    samples = await probe(client, f"pop.test:{dovecot.pop3_port}", "pop3_ip6_only")
    assert_failed_with(samples, FailureReason.DNS_ERROR)


async def test_unknown_name_is_dns_error(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    samples = await probe(client, "nowhere.test:110", "pop3")
    assert_failed_with(samples, FailureReason.DNS_ERROR)
    assert "probe_pop3_greeting_seconds" not in names(samples)


async def test_closed_port_is_refused_fast(
    client: TestClient,  # type: ignore[type-arg]
    dovecot: DovecotServer,
) -> None:
    # A port Dovecot does not listen on; bind-and-close picks one nobody holds.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    samples = await probe(client, f"127.0.0.1:{port}", "pop3")
    assert_failed_with(samples, FailureReason.CONNECT_REFUSED)
    duration = value(samples, "probe_duration_seconds")
    assert duration is not None and duration < 0.5


async def test_stopped_dovecot_is_refused(
    client: TestClient,  # type: ignore[type-arg]
    pki: TestPKI,
    dovecot_workroot: Path,
) -> None:
    server = DovecotServer(dovecot_workroot / "stopped", pki.variants["good"])
    server.start()
    samples = await probe(client, f"127.0.0.1:{server.pop3_port}", "pop3")
    assert_succeeded(samples)
    await asyncio.to_thread(server.stop)
    samples = await probe(client, f"127.0.0.1:{server.pop3_port}", "pop3")
    assert_failed_with(samples, FailureReason.CONNECT_REFUSED)


async def test_server_that_never_greets_times_out_at_the_deadline(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    async with FakePop3Server(silent) as server:
        samples = await probe(client, f"127.0.0.1:{server.port}", "pop3_short")
    assert_failed_with(samples, FailureReason.GREETING_TIMEOUT)
    duration = value(samples, "probe_duration_seconds")
    # Deadline 1 s: it must end there, not at some later read timeout.
    assert duration is not None and 0.95 <= duration < 1.5
    assert "probe_pop3_greeting_seconds" not in names(samples)
    assert "greeting" in labelled(samples, "probe_pop3_duration_seconds", "phase")


async def test_scrape_timeout_header_shortens_the_deadline(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    async with FakePop3Server(silent) as server:
        response = await client.get(
            "/probe",
            params={"target": f"127.0.0.1:{server.port}", "module": "pop3"},
            headers={"X-Prometheus-Scrape-Timeout-Seconds": "1.5"},
        )
        samples = parse_samples(await response.text())
    assert value(samples, "probe_timeout_seconds") == pytest.approx(1.0, abs=0.05)
    duration = value(samples, "probe_duration_seconds")
    assert duration is not None and 0.95 <= duration < 1.5


async def test_client_certificate_is_presented(
    aiohttp_client: ClientFactory, pki: TestPKI, tmp_path: Path
) -> None:
    """cert_file/key_file: a server that requires a client certificate accepts ours."""
    import ssl

    from tests.support.fakepop3 import dialogue, server_ssl_context

    client_cert = make_client_certificate(tmp_path / "client")
    cert_path, key_path = client_cert.cert_path, client_cert.key_path
    config = tmp_path / "mtls.yml"
    config.write_text(
        "modules:\n"
        "  mtls:\n    tls: implicit\n    tls_config:\n"
        f"      ca_file: '{pki.ca_file}'\n      cert_file: '{cert_path}'\n"
        f"      key_file: '{key_path}'\n"
        f"  no_client_cert:\n    tls: implicit\n    tls_config: {{ca_file: '{pki.ca_file}'}}\n"
    )
    holder = ConfigHolder(str(config), ExporterMetrics())
    client = await aiohttp_client(create_app(holder, prober=Pop3Prober(RESOLVER)))
    server_context = server_ssl_context(pki.variants["good"])
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(cafile=str(client_cert.ca_path))
    async with FakePop3Server(dialogue(), ssl_context=server_context) as server:
        samples = await probe(client, f"127.0.0.1:{server.port}", "mtls")
        assert_succeeded(samples)
        samples = await probe(client, f"127.0.0.1:{server.port}", "no_client_cert")
    # Without a client certificate the server drops the session: with TLS 1.3 the client
    # learns it only when reading the greeting.
    assert value(samples, "probe_success") == 0
    assert value(samples, "probe_pop3_greeting_match") == 0
