"""Per-certificate series of the presented chain (issue 12, item 1).

Real Dovecots present generated chains of three (leaf, intermediate, root) with mixed
key types and sizes, an expired intermediate and a not-yet-valid leaf; every series
must say exactly what the test generated, also when verification fails. Pure tests
cover the key types no chain here is served with, the cap on the chain, and that no
certificate can make two series of a family collide.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from pop3_exporter.config import TLSMode
from pop3_exporter.http import create_app
from pop3_exporter.metrics import MAX_CHAIN_CERTS, MAX_LABEL_LENGTH, ExporterMetrics
from pop3_exporter.prober import Pop3Prober
from pop3_exporter.result import CertFacts, FailureReason, Phase, ProbeResult, TLSFacts
from pop3_exporter.runtime import ConfigHolder
from pop3_exporter.tlsinfo import _SIGNATURE_ALGORITHM_NAMES, cert_facts
from tests.conftest import require_dovecot
from tests.support.certs import CHAIN_PLANS, ChainFiles, KeySpec, make_chain, new_private_key
from tests.support.dovecot import DovecotServer, stop_servers
from tests.support.exposition import Samples, parse_samples, promtool_check_metrics, value
from tests.support.probe_results import tls_facts
from tests.support.render import render_probe

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]

PER_CERT_FAMILIES = (
    "probe_tls_cert_not_before_timestamp_seconds",
    "probe_tls_cert_not_after_timestamp_seconds",
    "probe_tls_cert_key_bits",
    "probe_tls_cert_info",
)
# What the probe of each chain must conclude (verification against the chain's root).
OUTCOMES: dict[str, FailureReason | None] = {
    "chain_rsa": None,
    "chain_ed25519": None,
    "chain_expired_intermediate": FailureReason.TLS_CERT_EXPIRED,
    "chain_not_yet_valid": FailureReason.TLS_CERT_EXPIRED,
}


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ChainFiles]:
    directory = tmp_path_factory.mktemp("chains")
    return {name: make_chain(directory, name) for name in CHAIN_PLANS}


@pytest.fixture(scope="module")
def chain_dovecots(
    chains: dict[str, ChainFiles], dovecot_workroot: Path
) -> Iterator[dict[str, DovecotServer]]:
    """One Dovecot per chain, started in parallel."""
    require_dovecot()
    servers = {
        name: DovecotServer(dovecot_workroot / name, chain.files, listen=("127.0.0.1",))
        for name, chain in chains.items()
    }

    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            for started in [pool.submit(server.start) for server in servers.values()]:
                started.result()
        yield servers
    finally:
        stop_servers(servers.values())


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, chains: dict[str, ChainFiles], tmp_path: Path
) -> TestClient:  # type: ignore[type-arg]
    modules = "".join(
        f"  {name}:\n    tls: implicit\n    tls_config: {{ca_file: '{chain.ca_file}'}}\n"
        f"  {name}_starttls:\n    tls: starttls\n    tls_config: {{ca_file: '{chain.ca_file}'}}\n"
        for name, chain in chains.items()
    )
    path = tmp_path / "pop3_exporter.yml"
    path.write_text(f"modules:\n{modules}")
    holder = ConfigHolder(str(path), ExporterMetrics())
    return await aiohttp_client(create_app(holder, prober=Pop3Prober()))


async def probe(client: TestClient, target: str, module: str) -> Samples:  # type: ignore[type-arg]
    response = await client.get("/probe", params={"target": target, "module": module})
    text = await response.text()
    assert response.status == 200, text
    promtool_check_metrics(text)
    return parse_samples(text)


def per_cert(samples: Samples, name: str) -> dict[str, dict[str, str]]:
    """{chain_no: the series' other labels} of one per-certificate family."""
    series: dict[str, dict[str, str]] = {}
    for (sample_name, labels), _ in samples.items():
        if sample_name == name:
            other = dict(labels)
            series[other.pop("chain_no")] = other
    return series


@pytest.mark.dovecot
@pytest.mark.parametrize("name", sorted(CHAIN_PLANS))
@pytest.mark.parametrize("mode", ["implicit", "starttls"])
async def test_every_certificate_of_the_chain_is_reported_as_generated(
    client: TestClient,  # type: ignore[type-arg]
    chains: dict[str, ChainFiles],
    chain_dovecots: dict[str, DovecotServer],
    name: str,
    mode: str,
) -> None:
    server = chain_dovecots[name]
    if mode == "implicit":
        samples = await probe(client, f"localhost:{server.pop3s_port}", name)
    else:
        samples = await probe(client, f"localhost:{server.pop3_port}", f"{name}_starttls")

    outcome = OUTCOMES[name]
    assert value(samples, "probe_success") == float(outcome is None)
    if outcome is not None:
        assert value(samples, "probe_pop3_failure", reason=outcome.value) == 1
    assert value(samples, "probe_tls_valid") == float(outcome is None)

    expected = chains[name].expected
    assert len(expected) == 3
    assert value(samples, "probe_tls_cert_chain_length") == 3
    numbers = {str(n) for n in range(3)}
    for family in PER_CERT_FAMILIES:
        assert set(per_cert(samples, family)) == numbers, family
    for number, cert in enumerate(expected):
        chain_no = str(number)
        assert (
            value(samples, "probe_tls_cert_not_before_timestamp_seconds", chain_no=chain_no)
            == cert.not_before
        )
        assert (
            value(samples, "probe_tls_cert_not_after_timestamp_seconds", chain_no=chain_no)
            == cert.not_after
        )
        assert per_cert(samples, "probe_tls_cert_key_bits")[chain_no] == {
            "key_algorithm": cert.key_algorithm
        }
        assert (
            value(
                samples,
                "probe_tls_cert_key_bits",
                chain_no=chain_no,
                key_algorithm=cert.key_algorithm,
            )
            == cert.key_bits
        )
        assert per_cert(samples, "probe_tls_cert_info")[chain_no] == {
            "subject": cert.subject,
            "issuer": cert.issuer,
            "serial": cert.serial,
            "signature_algorithm": cert.signature_algorithm,
        }
        assert (
            value(
                samples,
                "probe_tls_cert_info",
                chain_no=chain_no,
                **{
                    "subject": cert.subject,
                    "issuer": cert.issuer,
                    "serial": cert.serial,
                    "signature_algorithm": cert.signature_algorithm,
                },
            )
            == 1
        )
    # The older summaries agree with the per-certificate series.
    assert value(samples, "probe_ssl_earliest_cert_expiry") == min(c.not_after for c in expected)


def test_the_chains_cover_the_issue_cases(chains: dict[str, ChainFiles]) -> None:
    """RSA 2048 and 3072, P-256, Ed25519 among the served keys; an expired
    intermediate; a leaf not yet valid."""
    now = datetime.now(UTC).timestamp()
    keys = {(c.key_algorithm, c.key_bits) for chain in chains.values() for c in chain.expected}
    assert {("rsa", 2048), ("rsa", 3072), ("ec", 256), ("ed25519", 256)} <= keys
    assert chains["chain_expired_intermediate"].expected[1].not_after < now
    assert chains["chain_not_yet_valid"].expected[0].not_before > now


# ---------------------------------------------------------------- pure


def _self_signed(spec: KeySpec, signature_hash: hashes.SHA256 | None) -> bytes:
    key = new_private_key(spec)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{spec[0]} {spec[1]}")])
    now = datetime.now(UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0xABCDEF)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, signature_hash)
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("spec", "signature_hash", "signature_algorithm"),
    [
        (("ed448", 456), None, "ED448"),
        (("dsa", 2048), hashes.SHA256(), "dsa_with_SHA256"),
        (("ec", 521), hashes.SHA256(), "ecdsa-with-SHA256"),
        (("rsa", 1024), hashes.SHA256(), "sha256WithRSAEncryption"),
    ],
)
def test_key_types_not_served_are_described(
    spec: KeySpec, signature_hash: hashes.SHA256 | None, signature_algorithm: str
) -> None:
    (facts,) = cert_facts([_self_signed(spec, signature_hash)])
    assert (facts.key_algorithm, facts.key_bits) == spec
    assert facts.signature_algorithm == signature_algorithm
    assert facts.serial_number == "abcdef"


def test_signature_algorithm_names_are_openssls() -> None:
    """The table of names matches OpenSSL's own long names for the OIDs."""
    for oid, name in _SIGNATURE_ALGORITHM_NAMES.items():
        # ssl._ASN1Object is what ssl.Purpose is built on: OpenSSL's OBJ_txt2obj.
        assert ssl._ASN1Object(oid).longname == name, oid


def _result(chain: tuple[CertFacts, ...]) -> ProbeResult:
    tls = TLSFacts(
        verification_enabled=True,
        verified=False,
        verify_error="unable to get local issuer certificate",
        version="TLS 1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        presented_chain=chain,
        verified_chain=(),
    )
    return ProbeResult(
        target="pop.test:995",
        module_name="pop3s",
        timeout_seconds=10.0,
        duration_seconds=0.1,
        success=False,
        failure_reason=FailureReason.TLS_CERT_UNTRUSTED,
        failure_detail="certificate verify failed",
        failed_phase=Phase.TLS,
        phase_durations=((Phase.CONNECT, 0.001), (Phase.TLS, 0.01)),
        dns_lookup_seconds=None,
        ip_protocol=4,
        address="127.0.0.1",
        greeting=None,
        greeting_seconds=None,
        greeting_match=False,
        capabilities=None,
        plaintext_auth_exposed=None,
        tls=tls,
    )


def test_a_long_chain_is_cut_at_the_cap_and_counted() -> None:
    """Twelve identical certificates: ten series per family, distinct by chain_no,
    and the length says twelve."""
    (cert,) = cert_facts([_self_signed(("ec", 256), hashes.SHA256())])
    body, _ = render_probe(_result((cert,) * 12), TLSMode.IMPLICIT, "")
    samples = parse_samples(body.decode())
    assert value(samples, "probe_tls_cert_chain_length") == 12
    for family in PER_CERT_FAMILIES:
        numbers = [dict(labels)["chain_no"] for (n, labels) in samples if n == family]
        assert sorted(numbers, key=int) == [str(n) for n in range(MAX_CHAIN_CERTS)], family


def test_unknown_key_size_leaves_out_only_the_key_series() -> None:
    (cert,) = cert_facts([_self_signed(("ec", 256), hashes.SHA256())])
    unknown = replace(cert, key_algorithm="unknown", key_bits=None)
    body, _ = render_probe(_result((cert, unknown)), TLSMode.IMPLICIT, "")
    samples = parse_samples(body.decode())
    keys = [dict(labels)["chain_no"] for (n, labels) in samples if n == "probe_tls_cert_key_bits"]
    assert keys == ["0"]
    assert value(samples, "probe_tls_cert_not_after_timestamp_seconds", chain_no="1") == (
        cert.not_after
    )


@settings(max_examples=200, deadline=None, database=None)
@given(
    tls_facts.filter(lambda tls: bool(tls.presented_chain)),
    st.sampled_from(["", "application/openmetrics-text;version=1.0.0"]),
)
def test_no_certificate_can_make_duplicate_or_unbounded_series(tls: TLSFacts, accept: str) -> None:
    """Whatever the certificates say: each per-certificate family has one series per
    chain_no below the cap, every label value printable and capped."""
    body, _ = render_probe(replace(_result(()), tls=tls), TLSMode.IMPLICIT, accept)
    shown = min(len(tls.presented_chain), MAX_CHAIN_CERTS)
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    for name in PER_CERT_FAMILIES:
        if name == "probe_tls_cert_key_bits" and name not in families:
            continue  # no certificate had a known key size
        samples = families[name].samples
        numbers = [sample.labels["chain_no"] for sample in samples]
        assert len(numbers) == len(set(numbers)) <= shown, name
        for sample in samples:
            for label_value in sample.labels.values():
                assert label_value.isprintable() and len(label_value) <= MAX_LABEL_LENGTH
