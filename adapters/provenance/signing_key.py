"""The key and certificate chain that sign content credentials, checked as they are loaded.

A bad secret stops the worker at start-up with the setting's name, not at the first job. No
message here ever holds key material: a key is described by its type, never shown.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
"""What the C2PA SDK signs with; each takes one kind of key (all seven tried with c2pa-rs 0.91)."""

_CURVES = {"es256": "secp256r1", "es384": "secp384r1", "es512": "secp521r1"}


class CredentialsConfigError(ValueError):
    """The signing key, certificate chain, algorithm or timestamp URL is unusable; `setting` names
    which, so the worker can stop at start-up and say what to fix."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem

    def moved_to(self, setting: str, origin: Path) -> CredentialsConfigError:
        """The same problem, told about the file the value came from."""
        return CredentialsConfigError(setting, f"{origin} {self.problem}")


@dataclass(frozen=True)
class SigningKey:
    """A key and chain that belong together and suit the algorithm, as PEM the SDK reads."""

    private_key_pem: bytes = field(repr=False)
    """PKCS#8, the one form c2pa-rs reads; SEC1 and PKCS#1 keys are converted to it."""
    certificate_chain_pem: bytes
    """The end-entity certificate first, then the certificates that issued it."""
    algorithm: str
    end_entity: x509.Certificate

    @property
    def signer_name(self) -> str:
        """The end-entity certificate's common name (its organisation when it has none)."""
        return subject_name(self.end_entity)


def load_signing_key(
    private_key_pem: bytes | str, certificate_chain_pem: bytes | str, algorithm: str
) -> SigningKey:
    """The checked key; a `CredentialsConfigError` names the parameter that is wrong."""
    name = _checked_algorithm(algorithm)
    key = _load_private_key(_as_bytes(private_key_pem))
    chain = _load_chain(_as_bytes(certificate_chain_pem))
    _check_key_and_chain(key, chain, name)
    return SigningKey(
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain_pem=b"".join(
            certificate.public_bytes(serialization.Encoding.PEM) for certificate in chain
        ),
        algorithm=name,
        end_entity=chain[0],
    )


def read_pem_file(path: Path, setting: str) -> bytes:
    """The file's bytes, or a `CredentialsConfigError` naming the setting and the path."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CredentialsConfigError(setting, f"cannot read {path}: {error.strerror}") from None


def checked_timestamp_url(url: str | None) -> str | None:
    """An http(s) URL or None (blank means none); whether it answers shows only when signing."""
    if url is None or not url.strip():
        return None
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise CredentialsConfigError("timestamp_url", f"{url!r} is not an http(s) URL")
    return url.strip()


def subject_name(certificate: x509.Certificate) -> str:
    """How a person would name the certificate's subject: common name, else organisation."""
    for oid in (x509.NameOID.COMMON_NAME, x509.NameOID.ORGANIZATION_NAME):
        attributes = certificate.subject.get_attributes_for_oid(oid)
        if attributes:
            return str(attributes[0].value)
    return certificate.subject.rfc4514_string()


def _as_bytes(pem: bytes | str) -> bytes:
    return pem.encode("utf-8") if isinstance(pem, str) else pem


def _checked_algorithm(algorithm: str) -> str:
    name = algorithm.strip().lower()
    if name not in ALGORITHMS:
        raise CredentialsConfigError(
            "algorithm", f"{algorithm!r} is not one of {', '.join(ALGORITHMS)}"
        )
    return name


def _load_private_key(pem: bytes) -> PrivateKeyTypes:
    if b"PRIVATE KEY-----" not in pem:
        swapped = b"CERTIFICATE" in pem
        hint = " (it holds a certificate: are the key and chain swapped?)" if swapped else ""
        raise CredentialsConfigError("private_key_pem", f"is not a PEM private key{hint}")
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise CredentialsConfigError(
            "private_key_pem", "is encrypted; give the key unencrypted (as a mounted secret)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CredentialsConfigError("private_key_pem", f"cannot be loaded: {error}") from None


def _load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as error:
        raise CredentialsConfigError(
            "certificate_chain_pem", f"is not a PEM certificate chain: {error}"
        ) from None
    first = chain[0]
    if not first.not_valid_before_utc <= datetime.datetime.now(datetime.timezone.utc):
        raise CredentialsConfigError(
            "certificate_chain_pem",
            f"starts with {subject_name(first)!r}, valid only from {first.not_valid_before_utc}",
        )
    if first.not_valid_after_utc <= datetime.datetime.now(datetime.timezone.utc):
        raise CredentialsConfigError(
            "certificate_chain_pem",
            f"starts with {subject_name(first)!r}, which expired {first.not_valid_after_utc}",
        )
    return chain


def _check_key_and_chain(
    key: PrivateKeyTypes, chain: list[x509.Certificate], algorithm: str
) -> None:
    """The key must belong to the chain's first certificate and suit the algorithm."""
    public = _public_der(key)
    if public != _public_der(chain[0]):
        position = next((i for i, cert in enumerate(chain) if _public_der(cert) == public), None)
        problem = (
            f"does not match {subject_name(chain[0])!r}, the chain's first certificate"
            if position is None
            else f"matches certificate {position + 1} of the chain: put the end-entity one first"
        )
        raise CredentialsConfigError("private_key_pem", problem)
    if not _key_fits(key, algorithm):
        raise CredentialsConfigError(
            "algorithm", f"{algorithm} cannot sign with this key ({_describe(key)})"
        )


def _key_fits(key: PrivateKeyTypes, algorithm: str) -> bool:
    if algorithm in _CURVES:
        return isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == _CURVES[algorithm]
    if algorithm.startswith("ps"):
        return isinstance(key, rsa.RSAPrivateKey)
    return isinstance(key, ed25519.Ed25519PrivateKey)


def _describe(key: PrivateKeyTypes) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    return type(key).__name__.removeprefix("_").removesuffix("PrivateKey")


def _public_der(item: PrivateKeyTypes | x509.Certificate) -> bytes:
    return item.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
