"""TLS client contexts and facts about the certificates a server presented."""

from __future__ import annotations

import functools
import hashlib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import (
    dh,
    dsa,
    ec,
    ed448,
    ed25519,
    rsa,
    x448,
    x25519,
)
from cryptography.x509.oid import SignatureAlgorithmOID

from pop3_exporter.config import TLS_VERSIONS, TLSConfig
from pop3_exporter.errors import (
    CertificateError,
    CertificateExpiredError,
    CertificateUntrustedError,
    ConfigError,
    HostnameMismatchError,
)
from pop3_exporter.result import CertFacts, TLSFacts

# OpenSSL X509_V_ERR_* codes that decide the failure reason; every other
# verification error means the chain does not lead to a trusted root.
_EXPIRY_CODES = frozenset({9, 10})  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
_HOSTNAME_CODES = frozenset({62, 63, 64})  # HOSTNAME, EMAIL, IP_ADDRESS mismatch

_TLS_VERSION_LABELS = {
    "TLSv1": "TLS 1.0",
    "TLSv1.1": "TLS 1.1",
    "TLSv1.2": "TLS 1.2",
    "TLSv1.3": "TLS 1.3",
}


# OpenSSL's long names for the signature algorithms of certificates (what
# `openssl x509 -text` prints), by OID; any other algorithm is shown as its dotted OID.
_SIGNATURE_ALGORITHM_NAMES = {
    oid.dotted_string: name
    for oid, name in (
        (SignatureAlgorithmOID.RSA_WITH_MD5, "md5WithRSAEncryption"),
        (SignatureAlgorithmOID.RSA_WITH_SHA1, "sha1WithRSAEncryption"),
        (SignatureAlgorithmOID.RSA_WITH_SHA224, "sha224WithRSAEncryption"),
        (SignatureAlgorithmOID.RSA_WITH_SHA256, "sha256WithRSAEncryption"),
        (SignatureAlgorithmOID.RSA_WITH_SHA384, "sha384WithRSAEncryption"),
        (SignatureAlgorithmOID.RSA_WITH_SHA512, "sha512WithRSAEncryption"),
        (SignatureAlgorithmOID.RSA_WITH_SHA3_224, "RSA-SHA3-224"),
        (SignatureAlgorithmOID.RSA_WITH_SHA3_256, "RSA-SHA3-256"),
        (SignatureAlgorithmOID.RSA_WITH_SHA3_384, "RSA-SHA3-384"),
        (SignatureAlgorithmOID.RSA_WITH_SHA3_512, "RSA-SHA3-512"),
        (SignatureAlgorithmOID.RSASSA_PSS, "rsassaPss"),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA1, "ecdsa-with-SHA1"),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA224, "ecdsa-with-SHA224"),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA256, "ecdsa-with-SHA256"),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA384, "ecdsa-with-SHA384"),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA512, "ecdsa-with-SHA512"),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA3_224, "ecdsa_with_SHA3-224"),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA3_256, "ecdsa_with_SHA3-256"),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA3_384, "ecdsa_with_SHA3-384"),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA3_512, "ecdsa_with_SHA3-512"),
        (SignatureAlgorithmOID.DSA_WITH_SHA1, "dsaWithSHA1"),
        (SignatureAlgorithmOID.DSA_WITH_SHA224, "dsa_with_SHA224"),
        (SignatureAlgorithmOID.DSA_WITH_SHA256, "dsa_with_SHA256"),
        (SignatureAlgorithmOID.DSA_WITH_SHA384, "dsa_with_SHA384"),
        (SignatureAlgorithmOID.DSA_WITH_SHA512, "dsa_with_SHA512"),
        (SignatureAlgorithmOID.ED25519, "ED25519"),
        (SignatureAlgorithmOID.ED448, "ED448"),
    )
}

# Distinct certificate chains whose parsed facts a ChainFactsCache keeps. A target
# presents the same chain probe after probe, and parsing it (x509, names, SANs,
# SHA-256) cost about a fifth of a TLS probe's CPU; the facts depend on the DER bytes
# alone. Chains above the byte cap (typical ones are 1-5 KiB) are parsed every time,
# so that the cache stays below about 2048 * 2 * 8 KiB whatever targets present.
CERT_FACTS_CACHE_SIZE = 2048
CERT_FACTS_CACHE_MAX_CHAIN_BYTES = 8192


@dataclass(frozen=True, slots=True)
class Handshake:
    """What one TLS handshake showed, as raw as OpenSSL gives it (no parsing yet)."""

    verification_enabled: bool
    verified: bool
    verify_error: str | None  # OpenSSL's message when the chain was rejected
    version: str | None  # "TLS 1.3"
    cipher: str | None
    presented_der: tuple[bytes, ...]  # leaf first; also after a failed verification
    verified_der: tuple[bytes, ...]  # leaf to trust anchor; empty unless verified


def handshake_record(
    tls: ssl.SSLObject,
    context: ssl.SSLContext,
    *,
    verified: bool,
    error: ssl.SSLCertVerificationError | None = None,
) -> Handshake:
    cipher = tls.cipher()
    return Handshake(
        verification_enabled=context.verify_mode != ssl.CERT_NONE,
        verified=verified,
        verify_error=error.verify_message if error is not None else None,
        version=tls_version_label(tls.version()),
        cipher=cipher[0] if cipher else None,
        presented_der=tuple(presented_chain_der(tls)),
        verified_der=tuple(verified_chain_der(tls)) if verified else (),
    )


class ChainFactsCache:
    """Parsed certificate facts by the chain's DER bytes (facts are immutable).

    One per prober, shared by its probes; the exporter's memory for it is bounded by
    CERT_FACTS_CACHE_SIZE chains of at most CERT_FACTS_CACHE_MAX_CHAIN_BYTES each.
    """

    def __init__(self, size: int = CERT_FACTS_CACHE_SIZE) -> None:
        self._cached = functools.lru_cache(maxsize=size)(cert_facts)

    def chain(self, der: tuple[bytes, ...]) -> tuple[CertFacts, ...]:
        if sum(map(len, der)) > CERT_FACTS_CACHE_MAX_CHAIN_BYTES:
            return cert_facts(der)
        return self._cached(der)

    def facts(self, handshake: Handshake) -> TLSFacts:
        return TLSFacts(
            verification_enabled=handshake.verification_enabled,
            verified=handshake.verified,
            verify_error=handshake.verify_error,
            version=handshake.version,
            cipher=handshake.cipher,
            presented_chain=self.chain(handshake.presented_der),
            verified_chain=self.chain(handshake.verified_der) if handshake.verified_der else (),
        )


def build_ssl_context(tls_config: TLSConfig) -> ssl.SSLContext:
    """Build the client context for a module once; reused by every probe of it.

    Raises ConfigError when a file named in tls_config cannot be loaded, so that
    `--config.check` and reloads catch it instead of every probe failing later.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = TLS_VERSIONS[tls_config.min_version]
    if tls_config.max_version is not None:
        context.maximum_version = TLS_VERSIONS[tls_config.max_version]
    if tls_config.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        if tls_config.ca_file is not None:
            context.load_verify_locations(cafile=tls_config.ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if tls_config.cert_file is not None and tls_config.key_file is not None:
            context.load_cert_chain(tls_config.cert_file, tls_config.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_config: cannot load certificates: {exc}") from exc
    return context


def tls_version_label(version: str | None) -> str | None:
    if version is None:
        return None
    return _TLS_VERSION_LABELS.get(version, version)


def presented_chain_der(tls: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, leaf first, as DER; also after failed verification.

    Python 3.13 made `SSLObject.get_unverified_chain()` public. On 3.10-3.12 the same
    C method exists on the private `_sslobj` (it is what 3.13 exposes). Using it is safe
    here because: it is a read-only accessor of OpenSSL's peer chain (SSL_get_peer_cert_chain);
    we feature-detect it and fall back to the public leaf-only `getpeercert()`; and the
    result is only reported, never trusted: the trust decision is OpenSSL's, made during
    the handshake. With OpenSSL 3 the peer chain is kept when verification fails, which is
    what lets us report the expiry of an expired or untrusted certificate.
    """
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:
        return [bytes(cert) for cert in public() or ()]
    inner: Any = getattr(tls, "_sslobj", None)
    private = getattr(inner, "get_unverified_chain", None)
    if private is not None:
        return [_certificate_der(cert) for cert in private() or ()]
    try:
        leaf = tls.getpeercert(binary_form=True)
    except ValueError:
        return []
    return [leaf] if leaf else []


def verified_chain_der(tls: ssl.SSLObject) -> list[bytes]:
    """The chain OpenSSL verified (leaf to trust anchor), as DER; see presented_chain_der."""
    public = getattr(tls, "get_verified_chain", None)
    if public is not None:
        return [bytes(cert) for cert in public() or ()]
    inner: Any = getattr(tls, "_sslobj", None)
    private = getattr(inner, "get_verified_chain", None)
    if private is not None:
        return [_certificate_der(cert) for cert in private() or ()]
    return []


def _certificate_der(cert: Any) -> bytes:
    if isinstance(cert, bytes):
        return cert
    der = cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
    return bytes(der)


def cert_facts(chain: Iterable[bytes]) -> tuple[CertFacts, ...]:
    """Parse DER certificates; one that cannot be parsed is skipped, not fatal."""
    facts: list[CertFacts] = []
    for der in chain:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            continue
        facts.append(_describe(cert, der))
    return tuple(facts)


def _describe(cert: x509.Certificate, der: bytes) -> CertFacts:
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        sans = tuple(
            [f"DNS:{name}" for name in san_ext.value.get_values_for_type(x509.DNSName)]
            + [f"IP:{ip}" for ip in san_ext.value.get_values_for_type(x509.IPAddress)]
        )
    except (x509.ExtensionNotFound, ValueError):
        sans = ()
    key_algorithm, key_bits = key_facts(cert)
    signature_oid = cert.signature_algorithm_oid.dotted_string
    return CertFacts(
        subject=_rfc4514(cert.subject),
        issuer=_rfc4514(cert.issuer),
        serial_number=format(cert.serial_number, "x"),
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
        subject_alternative_names=sans,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        key_algorithm=key_algorithm,
        key_bits=key_bits,
        signature_algorithm=_SIGNATURE_ALGORITHM_NAMES.get(signature_oid, signature_oid),
    )


def key_facts(cert: x509.Certificate) -> tuple[str, int | None]:
    """(algorithm, bits) of the certificate's public key; ("unknown", None) for a key
    type cryptography does not load.

    Bits are the RSA/DSA/DH modulus, the EC curve's size, and for the fixed-size
    Edwards and Montgomery keys the length of the raw public key (Ed25519 256, Ed448
    456), so that every known key has a size.
    """
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return "unknown", None
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec", key.curve.key_size
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519", 256
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448", 456
    if isinstance(key, dsa.DSAPublicKey):
        return "dsa", key.key_size
    if isinstance(key, dh.DHPublicKey):
        return "dh", key.key_size
    if isinstance(key, x25519.X25519PublicKey):
        return "x25519", 256
    if isinstance(key, x448.X448PublicKey):
        return "x448", 448
    return "unknown", None


def _rfc4514(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except ValueError:
        return name.public_bytes(serialization.Encoding.DER).hex()


def verification_error(exc: ssl.SSLCertVerificationError) -> type[CertificateError]:
    """Map OpenSSL's verify code to our error type."""
    code = exc.verify_code
    if code in _EXPIRY_CODES:
        return CertificateExpiredError
    if code in _HOSTNAME_CODES:
        return HostnameMismatchError
    return CertificateUntrustedError
