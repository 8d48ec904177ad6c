"""A throwaway certificate chain for signing content credentials in development.

Generated in memory at start-up when no signing certificate is configured, so a developer's worker
signs its PNGs the way production does, with a chain no validator trusts and a subject that says so.

c2pa-rs checks the certificate profile before it signs (found by trying, SDK 0.91): the end-entity
certificate must not be self-signed, must carry key usage digitalSignature and an extended key usage
the SDK's default trust configuration lists (emailProtection here, or timeStamping; documentSigning,
RFC 9336's or Microsoft's, serverAuth, or none at all are refused), and must be inside its validity.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEVELOPMENT_ORGANIZATION = "StyleLicense development"
"""The organisation of every development certificate; how a loaded chain is recognised as one."""

DEVELOPMENT_COMMON_NAME = "StyleLicense worker DEVELOPMENT certificate - not trusted"
"""The signer's name a validator shows for an image signed in development."""

DEVELOPMENT_ROOT_COMMON_NAME = "StyleLicense DEVELOPMENT root - not trusted"

DEFAULT_VALIDITY = datetime.timedelta(days=365)
"""How long a generated chain stays valid; readers check it against the time they read an image."""

_CLOCK_SKEW = datetime.timedelta(hours=1)
"""Validity starts this long before now, so a host whose clock runs behind still accepts it."""


@dataclass(frozen=True)
class DevelopmentChain:
    """A generated signing key and its chain, all PEM: what the signing settings would hold."""

    private_key_pem: bytes
    certificate_chain_pem: bytes
    """The end-entity certificate first, then the root that issued it."""
    root_certificate_pem: bytes
    """The root alone: a trust anchor for tests that want to see a trusted signature."""


def generate_development_chain(validity: datetime.timedelta = DEFAULT_VALIDITY) -> DevelopmentChain:
    """A fresh root and end-entity certificate with an EC P-256 (ES256) key, valid from now."""
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - _CLOCK_SKEW, now + validity
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = _name(DEVELOPMENT_ROOT_COMMON_NAME)
    root = (
        _certificate(root_name, root_name, root_key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(certificate_sign=True), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    signing_key = ec.generate_private_key(ec.SECP256R1())
    end_entity = (
        _certificate(
            _name(DEVELOPMENT_COMMON_NAME),
            root_name,
            signing_key.public_key(),
            not_before,
            not_after,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(certificate_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    return DevelopmentChain(
        private_key_pem=signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain_pem=end_entity.public_bytes(serialization.Encoding.PEM) + root_pem,
        root_certificate_pem=root_pem,
    )


def is_development_certificate(certificate: x509.Certificate) -> bool:
    """Whether a certificate is one of ours, generated for development (by its organisation)."""
    organizations = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return any(attribute.value == DEVELOPMENT_ORGANIZATION for attribute in organizations)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVELOPMENT_ORGANIZATION),
        ]
    )


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    """A certificate builder with what every certificate of the chain shares."""
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


def _key_usage(*, certificate_sign: bool) -> x509.KeyUsage:
    """digitalSignature for the signer; keyCertSign and cRLSign for the root."""
    return x509.KeyUsage(
        digital_signature=not certificate_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certificate_sign,
        crl_sign=certificate_sign,
        encipher_only=False,
        decipher_only=False,
    )
