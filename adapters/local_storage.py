"""Storage on a local folder laid out like S3: ``<root>/<bucket>/<key>``.

Used by the demo and by ``generate``; ``s3://bucket/key`` references map to the same layout, so
a job written for S3 runs unchanged against files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from domain.errors import InvalidRequest, LoraInvalid, LoraNotFound, SignatureInvalid, StorageError
from ports.storage import LoraArtifact, StoredOutput

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class LocalStorage:
    """Implements ``Storage`` on a folder; writes are atomic (temporary file, then rename)."""

    def __init__(
        self,
        *,
        root: str | os.PathLike,
        models_bucket: str,
        media_bucket: str,
        output_bucket: str,
    ) -> None:
        self.root = Path(root).resolve()
        self._models_bucket = models_bucket
        self._media_bucket = media_bucket
        self._output_bucket = output_bucket

    def path_of(self, ref: str, default_bucket: str) -> Path:
        """Where ``s3://bucket/key`` or a bare key in ``default_bucket`` lives under the root."""
        if ref.startswith("s3://"):
            bucket, _, key = ref[len("s3://") :].partition("/")
        else:
            bucket, key = default_bucket, ref
        path = (self.root / bucket / key.lstrip("/")).resolve()
        if not bucket or not path.is_relative_to(self.root):
            raise InvalidRequest(f"storage reference {ref!r} points outside the storage root")
        return path

    def fetch_lora(self, ref: str) -> LoraArtifact:
        """The LoRA file or PEFT folder at ``ref``, with its checksum."""
        path = self.path_of(ref, self._models_bucket)
        if path.is_dir():
            if not (path / PEFT_WEIGHTS).is_file() or not (path / PEFT_CONFIG).is_file():
                raise LoraInvalid(f"LoRA folder {ref!r} must hold {PEFT_CONFIG} and {PEFT_WEIGHTS}")
        elif not path.is_file():
            raise LoraNotFound(f"no LoRA at {ref!r}")
        try:
            return LoraArtifact(ref=ref, path=str(path), checksum=sha256_of(path))
        except OSError as exc:
            raise StorageError(f"cannot read LoRA {ref!r}: {exc}") from exc

    def fetch_signature(self, ref: str) -> bytes:
        """The signature image's bytes."""
        path = self.path_of(ref, self._media_bucket)
        if not path.is_file():
            raise SignatureInvalid(f"no signature image at {ref!r}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read signature {ref!r}: {exc}") from exc

    def find_output(self, key: str) -> StoredOutput | None:
        """The stored output under ``key`` and its metadata, if it exists."""
        path = self.path_of(key, self._output_bucket)
        if not path.is_file():
            return None
        try:
            metadata = json.loads(self._metadata_path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metadata = {}
        return StoredOutput(key=key, url=path.as_uri(), metadata=metadata)

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        """Write the metadata, then the image, each atomically; the image appearing means done."""
        path = self.path_of(key, self._output_bucket)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self._metadata_path(path), json.dumps(dict(metadata)).encode())
            _write_atomic(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {key!r}: {exc}") from exc
        return StoredOutput(key=key, url=path.as_uri(), metadata=dict(metadata))

    @staticmethod
    def _metadata_path(path: Path) -> Path:
        return path.with_name(path.name + ".metadata.json")


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
