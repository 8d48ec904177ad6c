"""Storage on a local folder laid out like S3: ``<root>/<bucket>/<key>``.

Used by the demo and by ``generate``; ``s3://bucket/key`` references map to the same layout, so
a job written for S3 runs unchanged against files on disk. LoRAs are used where they lie (no
copy, so no disk cache); their checksum is remembered while the files' size and mtime stay the
same, so a style used by every job is not re-hashed for each one.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from adapters.lora_disk_cache import sha256_of
from adapters.lora_files import PEFT_CONFIG, PEFT_WEIGHTS
from domain.errors import InvalidRequest, LoraInvalid, LoraNotFound, SignatureInvalid, StorageError
from ports.storage import LoraArtifact, StoredOutput

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "LocalStorage", "sha256_of"]

MAX_REMEMBERED_CHECKSUMS = 256
"""LoRAs whose checksum is remembered (one small tuple each)."""

_Signature = tuple[tuple[str, int, int, int], ...]


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
        self._lock = threading.Lock()
        self._checksums: OrderedDict[Path, tuple[_Signature, str]] = OrderedDict()

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
            return LoraArtifact(ref=ref, path=str(path), checksum=self._checksum(path))
        except OSError as exc:
            raise StorageError(f"cannot read LoRA {ref!r}: {exc}") from exc

    def _checksum(self, path: Path) -> str:
        """``sha256_of`` the LoRA, reused while its files' names, sizes and mtimes are unchanged."""
        signature = _signature(path)
        with self._lock:
            remembered = self._checksums.get(path)
            if remembered is not None and remembered[0] == signature:
                self._checksums.move_to_end(path)
                return remembered[1]
        checksum = sha256_of(path)
        with self._lock:
            self._checksums[path] = (signature, checksum)
            self._checksums.move_to_end(path)
            while len(self._checksums) > MAX_REMEMBERED_CHECKSUMS:
                self._checksums.popitem(last=False)
        return checksum

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


def _signature(path: Path) -> _Signature:
    """What changes when a file or folder's content may have: each file's name, size, mtime."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    signature = []
    for file in files:
        stat = file.stat()
        signature.append(
            (file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        )
    return tuple(signature)


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
