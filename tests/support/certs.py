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
========================== ==================================================

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
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VARIANTS: tuple[str, ...] = (
    "good",
    "expired",
    "not_yet_valid",
    "self_signed",
    "wrong_host",
    "incomplete_chain",
    "intermediate_expires_first",
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
    key: ec.EllipticCurvePrivateKey,
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
