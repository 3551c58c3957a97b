"""DANE (issue 12, item 3) end to end: real Dovecot presents the test PKI's chains, NSD
serves TLSA records in a signed, an unsigned and a bogus zone, Unbound validates them,
and the prober asks Unbound (DnsResolver with the test bed's address).

Each test adds its own names (labels ``dane-*``) and computes the records it publishes
with cryptography from the certificates the test PKI wrote, independently of
pop3_exporter/dane.py. A scripted DNS server stands in only where no real one will do:
a TLSA query that is never answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pop3_exporter.config import (
    DaneMode,
    InvalidConfigError,
    Module,
    TLSConfig,
    TLSMode,
    parse_config,
)
from pop3_exporter.dane import (
    TLSARecord,
    match_chain,
    names_host,
    subject_public_key_info,
    utc_now,
)
from pop3_exporter.prober import probe_pop3
from pop3_exporter.resolver import DnsResolver
from pop3_exporter.result import FailureReason, Phase, ProbeResult
from pop3_exporter.target import ProbeTarget
from pop3_exporter.tlsinfo import Handshake
from tests.conftest import DovecotFactory
from tests.support.certs import TestPKI
from tests.support.dns import BOGUS_ZONE, SIGNED_ZONE, UNSIGNED_ZONE, Testbed
from tests.support.dovecot import DovecotServer
from tests.support.exporter import REPO, ExporterProcess
from tests.support.exposition import Samples, parse_samples, promtool_check_metrics, value
from tests.support.fakedns import FakeDnsServer
from tests.support.fakepop3 import FakeConnection, FakePop3Server, dialogue, server_ssl_context
from tests.support.render import render_probe
from tests.support.tlsa import chain_of, sha256, spki, tlsa

pytestmark = pytest.mark.dovecot

TIMEOUT = 5.0


def module(
    dane: DaneMode,
    pki: TestPKI,
    *,
    tls: TLSMode = TLSMode.IMPLICIT,
    server_name: str | None = "localhost",
    verify: bool = True,
) -> Module:
    """Verification against the test root as for localhost (the name the test leaves
    carry), unless ``verify`` is off: then DANE is the only check of the chain."""
    return Module(
        name="dane",
        tls=tls,
        dane=dane,
        timeout=TIMEOUT,
        tls_config=TLSConfig(
            ca_file=str(pki.ca_file), server_name=server_name, insecure_skip_verify=not verify
        ),
    )


async def probe(testbed: Testbed, host: str, port: int, mod: Module) -> ProbeResult:
    return await probe_pop3(
        ProbeTarget(host, port, is_ip_literal=False),
        mod,
        TIMEOUT,
        resolver=DnsResolver(testbed.unbound_address),
        record_transcript=True,
    )


def samples_of(result: ProbeResult, mod: Module) -> Samples:
    body, _ = render_probe(result, mod.tls, "")
    text = body.decode()
    promtool_check_metrics(text)
    return parse_samples(text)


def dane_series(result: ProbeResult, mod: Module) -> tuple[float | None, ...]:
    samples = samples_of(result, mod)
    return tuple(
        value(samples, f"probe_tls_dane_{name}") for name in ("records", "secure", "match")
    )


# ---- the four cases of the issue ----------------------------------------------------


async def test_matching_3_1_1_record(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI
) -> None:
    chain = chain_of(pki, "good")
    port = dovecot.pop3s_port
    dns_testbed.add_records(
        SIGNED_ZONE,
        ["dane-ee IN A 127.0.0.1", tlsa("dane-ee", port, f"3 1 1 {sha256(spki(chain.leaf))}")],
    )
    mod = module(DaneMode.REQUIRE, pki)
    result = await probe(dns_testbed, f"dane-ee.{SIGNED_ZONE}", port, mod)
    assert result.success, result.failure_detail
    assert result.dane is not None
    assert (result.dane.records, result.dane.secure, result.dane.match) == (1, True, True)
    assert result.dane.matched == "3 1 1"
    assert result.dane.name == f"_{port}._tcp.dane-ee.{SIGNED_ZONE}"
    assert dane_series(result, mod) == (1.0, 1.0, 1.0)
    assert Phase.DANE in dict(result.phase_durations)
    assert any("record 3 1 1 matches" in line.text for line in result.transcript)


async def test_wrong_digest_is_dane_mismatch_with_require(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI
) -> None:
    port = dovecot.pop3s_port
    wrong = sha256(b"not the key of this server")
    dns_testbed.add_records(
        SIGNED_ZONE, ["dane-wrong IN A 127.0.0.1", tlsa("dane-wrong", port, f"3 1 1 {wrong}")]
    )
    host = f"dane-wrong.{SIGNED_ZONE}"
    required = module(DaneMode.REQUIRE, pki)
    failed = await probe(dns_testbed, host, port, required)
    assert not failed.success
    assert failed.failure_reason is FailureReason.DANE_MISMATCH
    assert failed.failed_phase is Phase.DANE
    assert "none of 1 records matches" in (failed.failure_detail or "")
    # A client that enforces DANE would not talk after the handshake: no greeting read.
    assert failed.greeting is None
    samples = samples_of(failed, required)
    assert value(samples, "probe_pop3_failure", reason="dane_mismatch") == 1.0
    assert value(samples, "probe_tls_dane_match") == 0.0
    assert value(samples, "probe_tls_valid") == 1.0  # PKIX itself is fine

    checked = await probe(dns_testbed, host, port, module(DaneMode.CHECK, pki))
    assert checked.success, checked.failure_detail
    assert dane_series(checked, required) == (1.0, 1.0, 0.0)


async def test_unsigned_zone_is_not_secure_and_dane_insecure_with_require(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI
) -> None:
    chain = chain_of(pki, "good")
    port = dovecot.pop3s_port
    # The right digest: only the missing signature keeps it from counting.
    dns_testbed.add_records(
        UNSIGNED_ZONE,
        [
            "dane-plain IN A 127.0.0.1",
            tlsa("dane-plain", port, f"3 1 1 {sha256(spki(chain.leaf))}"),
        ],
    )
    host = f"dane-plain.{UNSIGNED_ZONE}"
    checked = await probe(dns_testbed, host, port, module(DaneMode.CHECK, pki))
    assert checked.success
    assert checked.dane is not None and not checked.dane.secure
    assert dane_series(checked, module(DaneMode.CHECK, pki)) == (1.0, 0.0, 0.0)

    required = await probe(dns_testbed, host, port, module(DaneMode.REQUIRE, pki))
    assert required.failure_reason is FailureReason.DANE_INSECURE
    assert "not authenticated" in (required.failure_detail or "")


async def test_2_0_1_record_pinning_the_test_ca(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI
) -> None:
    """The root is never presented: it is the anchor of the chain the handshake
    verified with ca_file. The intermediate, which is presented, anchors without
    PKIX, but then the leaf must name the host itself."""
    chain = chain_of(pki, "good")
    port = dovecot.pop3s_port
    dns_testbed.add_records(
        SIGNED_ZONE,
        [
            "dane-ta IN A 127.0.0.1",
            tlsa("dane-ta", port, f"2 0 1 {sha256(chain.root)}"),
            "dane-ta-mid IN A 127.0.0.1",
            tlsa("dane-ta-mid", port, f"2 0 1 {sha256(chain.intermediate)}"),
        ],
    )
    root_pinned = await probe(
        dns_testbed, f"dane-ta.{SIGNED_ZONE}", port, module(DaneMode.REQUIRE, pki)
    )
    assert root_pinned.success, root_pinned.failure_detail
    assert root_pinned.dane is not None and root_pinned.dane.matched == "2 0 1"

    unverified = module(DaneMode.REQUIRE, pki, verify=False)
    # Without PKIX the root is nowhere in sight: nothing to anchor on.
    no_root = await probe(dns_testbed, f"dane-ta.{SIGNED_ZONE}", port, unverified)
    assert no_root.failure_reason is FailureReason.DANE_MISMATCH
    # The presented intermediate anchors; the leaf names localhost (server_name).
    mid = await probe(dns_testbed, f"dane-ta-mid.{SIGNED_ZONE}", port, unverified)
    assert mid.success, mid.failure_detail
    # ... and not without server_name: the leaf does not name dane-ta-mid.signed.test.
    nameless = replace(unverified, tls_config=replace(unverified.tls_config, server_name=None))
    unnamed = await probe(dns_testbed, f"dane-ta-mid.{SIGNED_ZONE}", port, nameless)
    assert unnamed.failure_reason is FailureReason.DANE_MISMATCH


# ---- RFC 7671's semantics of the usages ---------------------------------------------


async def test_dane_ee_ignores_expiry_and_names_dane_ta_does_not(
    dns_testbed: Testbed, dovecot_variant: DovecotFactory, pki: TestPKI
) -> None:
    """An expired leaf for another name: DANE-EE(3) matches its key all the same
    (RFC 7671 section 5.1); DANE-TA(2) requires the leaf to be valid now."""
    expired = dovecot_variant("expired")
    chain = chain_of(pki, "expired")
    port = expired.pop3s_port
    dns_testbed.add_records(
        SIGNED_ZONE,
        [
            "dane-old-ee IN A 127.0.0.1",
            tlsa("dane-old-ee", port, f"3 0 2 {hashlib.sha512(chain.leaf).hexdigest()}"),
            "dane-old-ta IN A 127.0.0.1",
            tlsa("dane-old-ta", port, f"2 1 1 {sha256(spki(chain.intermediate))}"),
        ],
    )
    mod = module(DaneMode.REQUIRE, pki, verify=False, server_name=None)
    ee = await probe(dns_testbed, f"dane-old-ee.{SIGNED_ZONE}", port, mod)
    assert ee.success, ee.failure_detail
    named = replace(mod, tls_config=replace(mod.tls_config, server_name="localhost"))
    ta = await probe(dns_testbed, f"dane-old-ta.{SIGNED_ZONE}", port, named)
    assert ta.failure_reason is FailureReason.DANE_MISMATCH
    # With PKIX verification the expired leaf fails first, and DANE is still reported.
    verified = await probe(
        dns_testbed, f"dane-old-ee.{SIGNED_ZONE}", port, module(DaneMode.CHECK, pki)
    )
    assert verified.failure_reason is FailureReason.TLS_CERT_EXPIRED
    assert verified.dane is not None and verified.dane.match is True


async def test_pkix_usages_need_the_handshake_to_verify(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI
) -> None:
    chain = chain_of(pki, "good")
    port = dovecot.pop3s_port
    dns_testbed.add_records(
        SIGNED_ZONE,
        [
            "dane-pkix-ee IN A 127.0.0.1",
            tlsa("dane-pkix-ee", port, f"1 1 1 {sha256(spki(chain.leaf))}"),
            "dane-pkix-ta IN A 127.0.0.1",
            tlsa("dane-pkix-ta", port, f"0 0 2 {hashlib.sha512(chain.root).hexdigest()}"),
        ],
    )
    for label in ("dane-pkix-ee", "dane-pkix-ta"):
        host = f"{label}.{SIGNED_ZONE}"
        verified = await probe(dns_testbed, host, port, module(DaneMode.REQUIRE, pki))
        assert verified.success, (label, verified.failure_detail)
        skipped = await probe(dns_testbed, host, port, module(DaneMode.REQUIRE, pki, verify=False))
        assert skipped.failure_reason is FailureReason.DANE_MISMATCH, label


async def test_starttls_module(dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI) -> None:
    chain = chain_of(pki, "good")
    port = dovecot.pop3_port
    dns_testbed.add_records(
        SIGNED_ZONE,
        [
            "dane-stls IN A 127.0.0.1",
            tlsa("dane-stls", port, f"3 0 1 {sha256(chain.leaf)}"),
            "dane-stls-bad IN A 127.0.0.1",
            tlsa("dane-stls-bad", port, f"3 0 1 {sha256(chain.intermediate)}"),
        ],
    )
    mod = module(DaneMode.REQUIRE, pki, tls=TLSMode.STARTTLS)
    good = await probe(dns_testbed, f"dane-stls.{SIGNED_ZONE}", port, mod)
    assert good.success, good.failure_detail
    bad = await probe(dns_testbed, f"dane-stls-bad.{SIGNED_ZONE}", port, mod)
    assert bad.failure_reason is FailureReason.DANE_MISMATCH
    assert bad.failed_phase is Phase.DANE
    assert bad.capabilities is not None  # CAPA before STLS went through


async def ip_probe(testbed: Testbed, port: int, mod: Module, server_name: str) -> ProbeResult:
    """A probe of 127.0.0.1, whose TLSA name comes from tls_config.server_name."""
    named = replace(mod, tls_config=replace(mod.tls_config, server_name=server_name))
    return await probe_pop3(
        ProbeTarget("127.0.0.1", port, is_ip_literal=True),
        named,
        TIMEOUT,
        resolver=DnsResolver(testbed.unbound_address),
    )


async def test_no_records_bogus_zone_and_ip_target(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI
) -> None:
    port = dovecot.pop3s_port
    dns_testbed.add_records(SIGNED_ZONE, ["dane-none IN A 127.0.0.1"])
    dns_testbed.add_records(BOGUS_ZONE, [tlsa("dane-bogus", port, f"3 1 1 {sha256(b'x')}")])
    required = module(DaneMode.REQUIRE, pki)
    # An authenticated denial: the name provably has no TLSA records.
    none = await probe(dns_testbed, f"dane-none.{SIGNED_ZONE}", port, required)
    assert none.failure_reason is FailureReason.DANE_MISMATCH
    assert "no records (authenticated denial)" in (none.failure_detail or "")
    assert none.dane is not None and (none.dane.records, none.dane.secure) == (0, True)
    checked = await probe(
        dns_testbed, f"dane-none.{SIGNED_ZONE}", port, module(DaneMode.CHECK, pki)
    )
    assert checked.success
    assert dane_series(checked, required) == (0.0, 1.0, 0.0)
    # Records that fail validation are SERVFAIL at a validating resolver: no answer.
    unverified = module(DaneMode.REQUIRE, pki, verify=False)
    bogus = await ip_probe(dns_testbed, port, unverified, f"dane-bogus.{BOGUS_ZONE}")
    assert bogus.failure_reason is FailureReason.DANE_INSECURE
    assert "SERVFAIL" in (bogus.failure_detail or ""), bogus.failure_detail
    assert dane_series(bogus, required) == (0.0, 0.0, 0.0)
    # An IP address has no TLSA name (unless server_name gives one).
    literal = await ip_probe(dns_testbed, port, required, "127.0.0.1")
    assert literal.failure_reason is FailureReason.DANE_INSECURE
    assert "IP address" in (literal.failure_detail or "")


# ---- the lookup runs beside the connection -------------------------------------------


async def test_lookup_starts_with_the_probe_and_ends_at_its_deadline(pki: TestPKI) -> None:
    """A scripted DNS server that never answers the TLSA query: it has seen the query
    by the time the server accepts the connection (the lookup started before the
    connect, not after the handshake), and with require the probe fails at its
    deadline in the dane phase with dns_timeout."""
    host = "dane-slow.test"
    seen_at_accept: list[int] = []
    inner = dialogue(stls_context=server_ssl_context(pki.variants["good"]))
    fake_dns: FakeDnsServer | None = None

    async def script(conn: FakeConnection) -> None:
        assert fake_dns is not None
        seen_at_accept.append(await asyncio.to_thread(fake_dns.count, tlsa_name))
        await inner(conn)

    async with FakePop3Server(script) as server:
        tlsa_name = f"_{server.port}._tcp.{host}"
        with FakeDnsServer({host: ["127.0.0.1"]}, drop=[tlsa_name], lifetime=60) as fake_dns:
            mod = replace(module(DaneMode.REQUIRE, pki, tls=TLSMode.STARTTLS), timeout=1.5)
            started = time.monotonic()
            result = await probe_pop3(
                ProbeTarget(host, server.port, is_ip_literal=False),
                mod,
                1.5,
                resolver=DnsResolver(fake_dns.address),
            )
            elapsed = time.monotonic() - started
            checked = await probe_pop3(
                ProbeTarget(host, server.port, is_ip_literal=False),
                replace(mod, dane=DaneMode.CHECK),
                1.5,
                resolver=DnsResolver(fake_dns.address),
            )
    assert seen_at_accept and seen_at_accept[0] >= 1, seen_at_accept
    assert result.failure_reason is FailureReason.DNS_TIMEOUT
    assert result.failed_phase is Phase.DANE
    assert result.capabilities is not None  # the dialogue went on until the handshake
    assert 1.4 <= elapsed < 4.0
    # check mode: the probe itself succeeds, and without an answer there are no series.
    assert checked.success and checked.dane is None


# ---- the exporter as a process ------------------------------------------------------


@pytest.fixture(scope="module")
def dane_exporter(
    tmp_path_factory: pytest.TempPathFactory, dns_testbed: Testbed, pki: TestPKI
) -> Iterator[ExporterProcess]:
    workdir = tmp_path_factory.mktemp("dane-exporter")
    config = workdir / "config.yml"
    config.write_text(
        f"""\
modules:
  pop3s_dane:
    tls: implicit
    dane: require
    tls_config:
      ca_file: '{pki.ca_file}'
      server_name: localhost
"""
    )
    exporter = ExporterProcess(
        workdir / "exporter.log",
        "--config.file",
        str(config),
        "--dns.server",
        dns_testbed.unbound_flag,
    )
    exporter.start()
    try:
        yield exporter
    finally:
        exporter.kill()


async def test_probe_endpoint_with_dns_server_flag(
    dns_testbed: Testbed, dovecot: DovecotServer, pki: TestPKI, dane_exporter: ExporterProcess
) -> None:
    chain = chain_of(pki, "good")
    port = dovecot.pop3s_port
    dns_testbed.add_records(
        SIGNED_ZONE,
        [
            "dane-http IN A 127.0.0.1",
            tlsa("dane-http", port, f"3 1 1 {sha256(spki(chain.leaf))}"),
            tlsa("dane-http", port, f"3 1 1 {sha256(b'a stale key')}"),
        ],
    )
    url = f"{dane_exporter.url}/probe"
    params = {"target": f"dane-http.{SIGNED_ZONE}:{port}", "module": "pop3s_dane"}
    async with aiohttp.ClientSession() as session, session.get(url, params=params) as response:
        assert response.status == 200
        text = await response.text()
    promtool_check_metrics(text)
    samples = parse_samples(text)
    assert value(samples, "probe_success") == 1.0
    assert value(samples, "probe_tls_dane_records") == 2.0
    assert value(samples, "probe_tls_dane_secure") == 1.0
    assert value(samples, "probe_tls_dane_match") == 1.0
    for reason in ("dane_mismatch", "dane_insecure"):
        assert value(samples, "probe_pop3_failure", reason=reason) == 0.0


# ---- the matching rules on their own --------------------------------------------------


def test_subject_public_key_info_is_the_certificates_own_bytes(pki: TestPKI) -> None:
    for variant in ("good", "expired", "wrong_host"):
        chain = chain_of(pki, variant)
        for der in (chain.leaf, chain.intermediate, chain.root):
            found = subject_public_key_info(der)
            assert found == spki(der)
            assert found is not None and found in der
    assert subject_public_key_info(b"") is None
    assert subject_public_key_info(b"\x30\x03\x02\x01\x01") is None
    assert subject_public_key_info(chain_of(pki, "good").leaf[:100]) is None


def test_unusable_records_match_nothing(pki: TestPKI) -> None:
    chain = chain_of(pki, "good")
    handshake = Handshake(True, True, None, "TLS 1.3", "x", (chain.leaf, chain.intermediate), ())
    digest = hashlib.sha256(spki(chain.leaf)).digest()
    good = TLSARecord(3, 1, 1, digest)
    assert match_chain([good], handshake, ["localhost"], utc_now()) == good
    for bad in (
        TLSARecord(4, 1, 1, digest),  # unknown usage
        TLSARecord(3, 2, 1, digest),  # unknown selector
        TLSARecord(3, 1, 3, digest),  # unknown matching type
        TLSARecord(3, 1, 2, digest),  # SHA-512 type with a SHA-256 digest
        TLSARecord(3, 1, 1, digest[:31]),
        TLSARecord(3, 1, 0, b""),
    ):
        assert not bad.usable
        assert match_chain([bad], handshake, ["localhost"], utc_now()) is None
    # The PKIX usages never match a handshake that did not verify.
    unverified = replace(handshake, verified=False)
    assert match_chain([TLSARecord(1, 1, 1, digest)], unverified, [], utc_now()) is None


def test_names_host_wildcards(pki: TestPKI) -> None:
    leaf = x509.load_der_x509_certificate(chain_of(pki, "good").leaf)
    assert names_host(leaf, "localhost") and names_host(leaf, "LOCALHOST.")
    assert not names_host(leaf, "other.localhost") and not names_host(leaf, "127.0.0.1")


# ---- configuration --------------------------------------------------------------------


def test_dane_config_values_and_refusals() -> None:
    config = parse_config(
        "modules:\n  a:\n    tls: implicit\n    dane: check\n"
        "  b:\n    tls: starttls\n    dane: require\n"
    )
    assert config.modules["a"].dane is DaneMode.CHECK
    assert config.modules["b"].dane is DaneMode.REQUIRE
    assert config.modules["pop3s"].dane is None
    with pytest.raises(InvalidConfigError) as caught:
        parse_config(
            "modules:\n  c:\n    dane: require\n  d:\n    tls: implicit\n    dane: always\n"
        )
    text = str(caught.value)
    assert "<string>:3: modules.c.dane: DANE checks the certificate of a TLS handshake" in text
    assert "<string>:6: modules.d.dane: must be one of check, require" in text


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    san: str | None = None,
) -> bytes:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
        )
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_dane_ta_checks_signatures_and_ca_flags() -> None:
    """Offline chains: an anchor with the issuer's name but another key, or one that is
    no CA, does not anchor the leaf."""
    ca_key, other_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    anchor = _cert("Anchor", ca_key, "Anchor", ca_key, ca=True)
    impostor = _cert("Anchor", other_key, "Anchor", other_key, ca=True)
    not_ca = _cert("Anchor", ca_key, "Anchor", ca_key, ca=False)
    leaf = _cert("mail", leaf_key, "Anchor", ca_key, ca=False, san="*.example.net")

    def verdict(top: bytes, host: str = "pop.example.net") -> TLSARecord | None:
        handshake = Handshake(False, False, None, "TLS 1.3", "x", (leaf, top), ())
        record = TLSARecord(2, 0, 1, hashlib.sha256(top).digest())
        return match_chain([record], handshake, [host], utc_now())

    assert verdict(anchor) is not None
    assert verdict(impostor) is None  # same name, the leaf's signature does not verify
    assert verdict(not_ca) is None
    assert verdict(anchor, host="a.b.example.net") is None  # wildcard: one label only
    assert verdict(anchor, host="example.net") is None


def test_dns_docs_name_every_dane_metric_reason_and_alert() -> None:
    docs = (REPO / "docs" / "dns.md").read_text(encoding="utf-8")
    for name in (
        "probe_tls_dane_records",
        "probe_tls_dane_secure",
        "probe_tls_dane_match",
        "dane_insecure",
        "dane_mismatch",
        "Pop3DaneMismatch",
        "Pop3DaneInsecure",
    ):
        assert f"`{name}`" in docs, name
