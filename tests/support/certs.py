"""A throw-away PKI for tests: one root, intermediates and server certificates.

Every certificate is generated fresh (ECDSA P-256, fast to make) so that no
test depends on files that expire in the repository. The variants cover the
certificate faults a POP3 probe must tell apart:

========================== ==================================================
``good``                   root -> intermediate -> leaf, valid now
``expired``                leaf expired 2 days ago (chain still valid)
``not_yet_valid``          leaf valid only from 2 days in the future
``self_signed``            self-signed leaf, not issued by the test CA
``wrong_host``             leaf for ``wrong-host.invalid`` only
``incomplete_chain``       leaf issued by the intermediate, served alone
``intermediate_expires_first`` intermediate ends (+5 d) before the leaf (+60 d)
``expires_in_10_days``     leaf valid now, ends in 10 days (check: WARNING)
``expires_in_3_days``      leaf valid now, ends in 3 days (check: CRITICAL)
========================== ==================================================

:func:`make_chain` makes chains of three (leaf, intermediate, root, all presented)
with mixed key types and sizes (RSA 2048/3072, P-256, P-384, Ed25519), an expired
intermediate and a not-yet-valid leaf (:data:`CHAIN_PLANS`), and says what a probe
must report for each certificate (:class:`ExpectedCert`).

All NotBefore/NotAfter values are whole seconds so that tests can compare the
dates a probe reports with ``==``.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VARIANTS: tuple[str, ...] = (
    "good",
    "expired",
    "not_yet_valid",
    "self_signed",
    "wrong_host",
    "incomplete_chain",
    "intermediate_expires_first",
    "expires_in_10_days",
    "expires_in_3_days",
)

# The names a probe of a loopback server may use; "good" leaves carry all three.
LOOPBACK_SANS: tuple[x509.GeneralName, ...] = (
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    x509.IPAddress(ipaddress.IPv6Address("::1")),
)


@dataclass(frozen=True)
class CertFiles:
    """One server certificate variant as files a TLS server can load."""

    name: str
    cert_path: Path  # leaf, then the intermediates the server presents (never the root)
    key_path: Path  # PKCS8 PEM, unencrypted
    leaf_not_after: datetime  # aware, UTC
    earliest_not_after: datetime  # min NotAfter over every certificate in cert_path
    leaf_der: bytes


@dataclass(frozen=True)
class TestPKI:
    """The root clients should trust plus every server variant."""

    # The name starts with "Test": keep pytest from trying to collect it.
    __test__: ClassVar[bool] = False

    ca_file: Path
    variants: Mapping[str, CertFiles]


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> datetime:
    # Whole seconds: X.509 times have no fractions, so tests can compare exactly.
    return datetime.now(UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pop3_exporter tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)

# ECDSA server keys only sign the handshake.
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _make_root(now: datetime) -> _Issuer:
    key = _new_key()
    name = _name("pop3_exporter test root CA")
    cert = (
        _builder(
            name, name, key.public_key(), now - timedelta(days=365), now + timedelta(days=3650)
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return _Issuer(cert, key)


def _make_intermediate(root: _Issuer, common_name: str, not_after: datetime) -> _Issuer:
    key = _new_key()
    cert = (
        _builder(
            _name(common_name),
            root.cert.subject,
            key.public_key(),
            root.cert.not_valid_before_utc,
            not_after,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(_authority_key_id(root.cert), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    return _Issuer(cert, key)


def _make_leaf(
    issuer: _Issuer | None,
    common_name: str,
    sans: Sequence[x509.GeneralName],
    not_before: datetime,
    not_after: datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate; self-signed when ``issuer`` is None."""
    key = _new_key()
    subject = _name(common_name)
    builder = (
        _builder(
            subject,
            issuer.cert.subject if issuer else subject,
            key.public_key(),
            not_before,
            not_after,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    )
    if issuer is None:
        # No KeyUsage here: OpenSSL then treats the certificate as self-issued
        # and reports "self-signed certificate" (18), as for a typical
        # `openssl req -x509` server certificate.
        return builder.sign(key, hashes.SHA256()), key
    builder = builder.add_extension(_LEAF_KEY_USAGE, critical=True).add_extension(
        _authority_key_id(issuer.cert), critical=False
    )
    return builder.sign(issuer.key, hashes.SHA256()), key


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    # World-readable on purpose: servers under test may read them as another user.
    path.chmod(0o644)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _save_variant(
    directory: Path,
    name: str,
    leaf: x509.Certificate,
    key: CertificateIssuerPrivateKeyTypes,
    chain: Sequence[x509.Certificate],
) -> CertFiles:
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    _write(cert_path, b"".join(_pem(c) for c in (leaf, *chain)))
    _write(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return CertFiles(
        name=name,
        cert_path=cert_path,
        key_path=key_path,
        leaf_not_after=leaf.not_valid_after_utc,
        earliest_not_after=min(c.not_valid_after_utc for c in (leaf, *chain)),
        leaf_der=leaf.public_bytes(serialization.Encoding.DER),
    )


@dataclass(frozen=True)
class ClientCertFiles:
    """A client CA (what a server requiring client certificates trusts) and one
    client certificate it issued."""

    ca_path: Path
    cert_path: Path
    key_path: Path


def make_client_certificate(directory: Path) -> ClientCertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    now = _now()
    ca = _make_root(now)
    key = _new_key()
    cert = (
        _builder(
            _name("prometheus"),
            ca.cert.subject,
            key.public_key(),
            now - timedelta(days=1),
            now + timedelta(days=30),
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_authority_key_id(ca.cert), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    files = ClientCertFiles(
        ca_path=directory / "client-ca.crt",
        cert_path=directory / "client.crt",
        key_path=directory / "client.key",
    )
    _write(files.ca_path, _pem(ca.cert))
    _write(files.cert_path, _pem(cert))
    _write(
        files.key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


def make_pki(directory: Path) -> TestPKI:
    """Generate the root CA and every variant in :data:`VARIANTS` under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    # Traversable so that a server dropping privileges can still reach the files.
    directory.chmod(0o755)
    now = _now()
    root = _make_root(now)
    intermediate = _make_intermediate(
        root, "pop3_exporter test intermediate CA", now + timedelta(days=1825)
    )
    short_intermediate = _make_intermediate(
        root, "pop3_exporter test short-lived intermediate CA", now + timedelta(days=5)
    )

    valid_from = now - timedelta(days=1)
    valid_until = now + timedelta(days=90)
    # name -> (issuer, CN, SANs, not_before, not_after, presented chain)
    plans: dict[
        str,
        tuple[_Issuer | None, str, Sequence[x509.GeneralName], datetime, datetime, list[_Issuer]],
    ] = {
        "good": (intermediate, "localhost", LOOPBACK_SANS, valid_from, valid_until, [intermediate]),
        "expired": (
            intermediate,
            "localhost",
            LOOPBACK_SANS,
            now - timedelta(days=30),
            now - timedelta(days=2),
            [intermediate],
        ),
        "not_yet_valid": (
            intermediate,
            "localhost",
            LOOPBACK_SANS,
            now + timedelta(days=2),
            now + timedelta(days=92),
            [intermediate],
        ),
        "self_signed": (None, "localhost", LOOPBACK_SANS, valid_from, valid_until, []),
        "wrong_host": (
            intermediate,
            "wrong-host.invalid",
            (x509.DNSName("wrong-host.invalid"),),
            valid_from,
            valid_until,
            [intermediate],
        ),
        "incomplete_chain": (intermediate, "localhost", LOOPBACK_SANS, valid_from, valid_until, []),
        "intermediate_expires_first": (
            short_intermediate,
            "localhost",
            LOOPBACK_SANS,
            valid_from,
            now + timedelta(days=60),
            [short_intermediate],
        ),
        # Between the check command's default thresholds (21 and 7 days), and below both.
        "expires_in_10_days": (
            intermediate,
            "localhost",
            LOOPBACK_SANS,
            valid_from,
            now + timedelta(days=10),
            [intermediate],
        ),
        "expires_in_3_days": (
            intermediate,
            "localhost",
            LOOPBACK_SANS,
            valid_from,
            now + timedelta(days=3),
            [intermediate],
        ),
    }

    variants: dict[str, CertFiles] = {}
    for name, (issuer, cn, sans, not_before, not_after, chain) in plans.items():
        leaf, key = _make_leaf(issuer, cn, sans, not_before, not_after)
        variants[name] = _save_variant(directory, name, leaf, key, [c.cert for c in chain])

    ca_file = directory / "ca.crt"
    _write(ca_file, _pem(root.cert))
    return TestPKI(ca_file=ca_file, variants=MappingProxyType(variants))


def client_ssl_context(ca_file: Path) -> ssl.SSLContext:
    """A verifying client context that trusts only the test root (no system CAs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=os.fspath(ca_file))
    return ctx


# ---------------------------------------------------------------- chains of three


@dataclass(frozen=True)
class ExpectedCert:
    """What a probe must report for one presented certificate, from the plan that
    made it (not from parsing it back)."""

    subject: str  # RFC 4514, as the exporter prints names
    issuer: str
    serial: str  # lower-case hex
    not_before: float  # unix seconds
    not_after: float
    key_algorithm: str
    key_bits: int
    signature_algorithm: str  # OpenSSL's long name of the issuer's signature


@dataclass(frozen=True)
class ChainFiles:
    """A three-certificate chain (leaf, intermediate, root, all presented) as files."""

    files: CertFiles
    ca_file: Path  # the chain's own root, to trust it
    expected: tuple[ExpectedCert, ...]  # leaf first, in the order presented


# (key algorithm, bits): the keys the chains use.
KeySpec = tuple[str, int]
# (common name, key, hash its issuer signs it with (None when the issuer's key is an
# Edwards key), not_before and not_after in days from now); leaf first, root
# (self-signed) last.
CertPlan = tuple[str, KeySpec, str | None, int, int]

CHAIN_PLANS: Mapping[str, tuple[CertPlan, CertPlan, CertPlan]] = MappingProxyType(
    {
        # All RSA, two sizes, three hashes.
        "chain_rsa": (
            ("localhost", ("rsa", 2048), "sha256", -1, 90),
            ("chain_rsa intermediate", ("rsa", 3072), "sha384", -30, 1000),
            ("chain_rsa root", ("rsa", 3072), "sha512", -30, 3000),
        ),
        # Ed25519 leaf under a P-384 intermediate under an Ed25519 root.
        "chain_ed25519": (
            ("localhost", ("ed25519", 256), "sha384", -1, 90),
            ("chain_ed25519 intermediate", ("ec", 384), None, -30, 1000),
            ("chain_ed25519 root", ("ed25519", 256), None, -30, 3000),
        ),
        # A valid P-256 leaf whose RSA intermediate expired yesterday.
        "chain_expired_intermediate": (
            ("localhost", ("ec", 256), "sha256", -10, 90),
            ("chain_expired_intermediate intermediate", ("rsa", 2048), "sha256", -400, -1),
            ("chain_expired_intermediate root", ("ec", 256), "sha256", -500, 3000),
        ),
        # A leaf valid only from the day after tomorrow.
        "chain_not_yet_valid": (
            ("localhost", ("rsa", 3072), "sha256", 2, 92),
            ("chain_not_yet_valid intermediate", ("ec", 256), "sha256", -30, 1000),
            ("chain_not_yet_valid root", ("rsa", 2048), "sha256", -30, 3000),
        ),
    }
)

# OpenSSL's names (`openssl x509 -text`) for (issuer key algorithm, hash).
_SIGNATURE_NAMES = {
    ("rsa", "sha256"): "sha256WithRSAEncryption",
    ("rsa", "sha384"): "sha384WithRSAEncryption",
    ("rsa", "sha512"): "sha512WithRSAEncryption",
    ("ec", "sha256"): "ecdsa-with-SHA256",
    ("ec", "sha384"): "ecdsa-with-SHA384",
    ("ed25519", None): "ED25519",
}
_HASHES: Mapping[str, hashes.SHA256 | hashes.SHA384 | hashes.SHA512] = MappingProxyType(
    {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
)
_CURVES: Mapping[int, ec.EllipticCurve] = MappingProxyType(
    {256: ec.SECP256R1(), 384: ec.SECP384R1(), 521: ec.SECP521R1()}
)


def new_private_key(spec: KeySpec) -> CertificateIssuerPrivateKeyTypes:
    algorithm, bits = spec
    if algorithm == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if algorithm == "ec":
        return ec.generate_private_key(_CURVES[bits])
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ed448":
        return ed448.Ed448PrivateKey.generate()
    if algorithm == "dsa":
        return dsa.generate_private_key(key_size=bits)
    raise ValueError(f"no key type {algorithm!r}")


def _rfc4514(common_name: str) -> str:
    # _name() lists O then CN; RFC 4514 writes the last RDN first.
    return f"CN={common_name},O=pop3_exporter tests"


def make_chain(directory: Path, name: str) -> ChainFiles:
    """Generate the chain CHAIN_PLANS[name] (root, intermediate, leaf) under
    ``directory``; the leaf carries the loopback names."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    now = _now()
    leaf_plan, intermediate_plan, root_plan = CHAIN_PLANS[name]
    keys = [new_private_key(plan[1]) for plan in (leaf_plan, intermediate_plan, root_plan)]
    issued: list[x509.Certificate] = []
    expected: list[ExpectedCert] = []
    # Root first: each certificate is signed by the next one in the plan.
    issuer_cert: x509.Certificate | None = None
    for index in (2, 1, 0):
        common_name, key_spec, hash_name, starts, ends = CHAIN_PLANS[name][index]
        key = keys[index]
        issuer_key = keys[min(index + 1, 2)]
        issuer_plan = CHAIN_PLANS[name][min(index + 1, 2)]
        serial = x509.random_serial_number()
        not_before = now + timedelta(days=starts)
        not_after = now + timedelta(days=ends)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(issuer_plan[0]))
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if issuer_cert is not None:
            builder = builder.add_extension(_authority_key_id(issuer_cert), critical=False)
        if index == 0:
            builder = (
                builder.add_extension(
                    x509.BasicConstraints(ca=False, path_length=None), critical=True
                )
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
                )
                .add_extension(x509.SubjectAlternativeName(list(LOOPBACK_SANS)), critical=False)
            )
        else:
            builder = builder.add_extension(
                x509.BasicConstraints(ca=True, path_length=index - 1), critical=True
            ).add_extension(_CA_KEY_USAGE, critical=True)
        # The issuer's key and this plan's hash make the signature algorithm.
        cert = builder.sign(issuer_key, _HASHES[hash_name] if hash_name else None)
        issued.insert(0, cert)
        expected.insert(
            0,
            ExpectedCert(
                subject=_rfc4514(common_name),
                issuer=_rfc4514(issuer_plan[0]),
                serial=format(serial, "x"),
                not_before=not_before.timestamp(),
                not_after=not_after.timestamp(),
                key_algorithm=key_spec[0],
                key_bits=key_spec[1],
                signature_algorithm=_SIGNATURE_NAMES[(issuer_plan[1][0], hash_name)],
            ),
        )
        issuer_cert = cert
    leaf, intermediate, root = issued
    files = _save_variant(directory, name, leaf, keys[0], [intermediate, root])
    ca_file = directory / f"{name}-ca.crt"
    _write(ca_file, _pem(root))
    return ChainFiles(files=files, ca_file=ca_file, expected=tuple(expected))
