"""Storage: LoRA and signature inputs, PNG outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from ports.telemetry import LoraCacheStats

ReferenceKind = Literal["lora", "signature"]
"""What a message's reference names: ``data.lora_path`` or ``data.signature_path``."""


@dataclass(frozen=True)
class LoraArtifact:
    """A LoRA made available on the local file system.

    ``path`` is a ``.safetensors`` file or a PEFT folder; ``checksum`` is the SHA-256 of its
    content, reported in the completion metadata so the backend can tell which style ran.
    """

    ref: str
    path: str
    checksum: str


@dataclass(frozen=True)
class StoredOutput:
    """A generated image in storage, with the metadata it was stored with.

    ``created`` is False when ``put_output`` found an image already stored under the key (by
    another copy of the job): the stored image and its metadata are returned, not the caller's.
    """

    key: str
    url: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    created: bool = True


@runtime_checkable
class Storage(Protocol):
    """Object storage; raises INVALID_REQUEST, LORA_NOT_FOUND, LORA_INVALID, SIGNATURE_INVALID or
    STORAGE_ERROR. No error message names an endpoint URL or a credential."""

    def check_reference(self, ref: str, kind: ReferenceKind) -> None:
        """Refuse, without any network call, a reference this storage will not read.

        ``InvalidRequest`` saying why (a form it does not know, a bucket name S3 would refuse,
        a bucket outside the allow-list); the caller names the message field.
        """

    def fetch_lora(self, ref: str) -> LoraArtifact:
        """Make the LoRA at ``ref`` local (``s3://bucket/key``, a public URL of the storage, or
        a key in the models bucket)."""

    def fetch_signature(self, ref: str) -> bytes:
        """The signature image's bytes (the same forms as ``fetch_lora``; keys in the media
        bucket)."""

    def find_output(self, key: str) -> StoredOutput | None:
        """The stored output under ``key``, or None; makes redeliveries idempotent."""

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        """Store a PNG under ``key`` with string metadata unless one is there already (the first
        writer wins, across processes: S3 ``If-None-Match: *``); where a browser opens it."""

    def lora_cache_stats(self) -> LoraCacheStats | None:
        """The counters of the LoRA disk cache (metrics), or None where LoRAs are not copied."""

    def check(self) -> None:
        """Start-up and readiness: every configured bucket is reachable; ``StorageError`` naming
        the bucket and the setting otherwise."""
