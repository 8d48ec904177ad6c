"""Storage: LoRA and signature inputs, PNG outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


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
    """A generated image in storage, with the metadata it was stored with."""

    key: str
    url: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Storage(Protocol):
    """Object storage; raises LORA_NOT_FOUND, SIGNATURE_INVALID or STORAGE_ERROR."""

    def fetch_lora(self, ref: str) -> LoraArtifact:
        """Make the LoRA at ``ref`` (``s3://bucket/key`` or a key in the models bucket) local."""

    def fetch_signature(self, ref: str) -> bytes:
        """The signature image's bytes (``s3://bucket/key`` or a key in the media bucket)."""

    def find_output(self, key: str) -> StoredOutput | None:
        """The stored output under ``key``, or None; makes redeliveries idempotent."""

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        """Store a PNG under ``key`` with string metadata; return where a browser can open it."""
