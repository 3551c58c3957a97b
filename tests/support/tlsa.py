"""TLSA record data for the test PKI's chains, computed with cryptography alone (not
with pop3_exporter/dane.py, which the tests check against it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.certs import TestPKI


@dataclass(frozen=True)
class Chain:
    """DER of what a Dovecot variant presents (leaf, intermediate) and of the root."""

    leaf: bytes
    intermediate: bytes
    root: bytes


def chain_of(pki: TestPKI, variant: str) -> Chain:
    presented = x509.load_pem_x509_certificates(pki.variants[variant].cert_path.read_bytes())
    root = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    leaf, intermediate = (cert.public_bytes(serialization.Encoding.DER) for cert in presented)
    return Chain(leaf, intermediate, root.public_bytes(serialization.Encoding.DER))


def spki(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a DER certificate, as cryptography encodes the key."""
    key = x509.load_der_x509_certificate(der).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tlsa(label: str, port: int, record: str) -> str:
    """A zone-file line: the TLSA record of ``label`` (relative to the zone) at port."""
    return f"_{port}._tcp.{label} IN TLSA {record}"
