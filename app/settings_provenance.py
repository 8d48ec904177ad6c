"""Settings of the provenance marks: PNG metadata, C2PA content credentials, the invisible mark
(fields of ``app.settings.Settings``; docs/configuration.md is rendered from them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

SigningAlgorithm = Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"]


class ProvenanceSettings(BaseModel):
    """What every stored image carries about its origin (docs/provenance.md)."""

    provenance_include_prompt: bool = Field(
        default=False,
        description="Write the prompt and negative prompt into the PNG's `parameters` chunk"
        " (off by default: the output bucket may be public, and a prompt is the user's). The"
        " other parameters (steps, sampler, CFG scale, seed, size, model, style, generation)"
        " are always written.",
    )
    provenance_invisible_mark: bool = Field(
        default=True,
        description="Hide the generation id in the pixels (after the signature is stamped), so"
        " a copy stripped of its metadata can still be traced (docs/invisible-mark.md).",
    )
    c2pa_signing_key_file: str | None = Field(
        default=None,
        description="PEM private key that signs the C2PA content credentials (a mounted"
        " secret); set together with `C2PA_CERTIFICATE_FILE`.",
    )
    c2pa_certificate_file: str | None = Field(
        default=None,
        description="PEM certificate chain of the signing key, end-entity certificate first.",
    )
    c2pa_signing_algorithm: SigningAlgorithm = Field(
        default="es256",
        description="Signature algorithm of the key (`es256`: ECDSA P-256 with SHA-256).",
    )
    c2pa_timestamp_url: str | None = Field(
        default=None,
        description="RFC 3161 timestamp authority the signature is countersigned by, so it"
        " stays valid after the certificate expires; unset: no timestamp.",
    )
    c2pa_without_certificate: Literal["development", "unsigned"] = Field(
        default="development",
        description="Without a configured key and certificate: `development` signs with a"
        " certificate generated at start (its subject says it is one; readers report it"
        " untrusted), `unsigned` writes no content credentials. The start-up log says which.",
    )
    c2pa_thumbnail: bool = Field(
        default=False,
        description="Embed a thumbnail in the C2PA manifest (off: the manifest stays a few"
        " kilobytes).",
    )
