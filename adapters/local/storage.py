"""Storage on a local folder laid out like S3: ``<root>/<bucket>/<key>``.

Used by the demo and by ``generate``; references take the same forms as on S3 (``s3://`` URIs,
bare keys, the storage's URLs; see ``object_store.references``) and map to the same layout, so a job
written for S3 runs unchanged against files on disk. LoRAs are used where they lie (no copy, so
no disk cache); their checksum is remembered while the files' size and mtime stay the same, so a
style used by every job is not re-hashed for each one. Outputs are written once, the first
writer winning across processes (an exclusive hard link), with a sidecar named after the image.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

from adapters.diffusion.lora.files import PEFT_CONFIG, PEFT_WEIGHTS, sha256_of
from adapters.local.atomic_files import create_exclusive, replace_atomically
from adapters.object_store.references import ObjectLocation, ObjectReferences
from adapters.object_store.sidecars import (
    content_sha256,
    decode_metadata,
    encode_metadata,
    legacy_sidecar_name,
    sidecar_name,
)
from domain.errors import InvalidRequest, LoraInvalid, LoraNotFound, SignatureInvalid, StorageError
from ports.storage import LoraArtifact, ReferenceKind, StoredOutput

log = logging.getLogger(__name__)

MAX_REMEMBERED_CHECKSUMS = 256
"""LoRAs whose checksum is remembered (one small tuple each)."""

_Signature = tuple[tuple[str, int, int, int], ...]


class LocalStorage:
    """Implements ``Storage`` on a folder; every write is atomic, outputs are written once.

    The buckets and ``allowed_buckets`` mean what they mean for ``S3Storage``;
    ``endpoint_url`` and ``public_base_url`` only let references in those URL forms map to
    the folder (result URLs are ``file://`` URLs).
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike,
        media_bucket: str,
        output_bucket: str,
        models_bucket: str | None = None,
        allowed_buckets: Iterable[str] | None = None,
        endpoint_url: str | None = None,
        public_base_url: str | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self._output_bucket = output_bucket
        self._references = ObjectReferences(
            media_bucket=media_bucket,
            output_bucket=output_bucket,
            models_bucket=models_bucket,
            allowed_buckets=allowed_buckets,
            endpoint_url=endpoint_url,
            public_base_url=public_base_url,
        )
        self._lock = threading.Lock()
        self._checksums: OrderedDict[Path, tuple[_Signature, str]] = OrderedDict()

    def check_reference(self, ref: str, kind: ReferenceKind) -> None:
        """Refuse a reference this storage will not read (no file system access)."""
        self._references.resolve(ref, kind)

    def path_of(self, ref: str, default_bucket: str | None) -> Path:
        """Where a reference (a bare key in ``default_bucket``, ``s3://bucket/key``...) lives."""
        return self._path(self._references.locate(ref, default_bucket), ref)

    def _path(self, where: ObjectLocation, ref: str) -> Path:
        path = (self.root / where.bucket / where.key.lstrip("/")).resolve()
        if not path.is_relative_to(self.root / where.bucket):
            raise InvalidRequest(f"{ref!r} points outside the storage root")
        return path

    def fetch_lora(self, ref: str) -> LoraArtifact:
        """The LoRA file or PEFT folder at ``ref``, with its checksum."""
        where = self._references.resolve(ref, "lora")
        path = self._path(where, ref)
        if path.is_dir():
            if not (path / PEFT_WEIGHTS).is_file() or not (path / PEFT_CONFIG).is_file():
                raise LoraInvalid(
                    f"LoRA folder {where.uri!r} must hold {PEFT_CONFIG} and {PEFT_WEIGHTS}"
                )
        elif not path.is_file():
            raise LoraNotFound(f"no LoRA at {where.uri!r}")
        try:
            return LoraArtifact(ref=ref, path=str(path), checksum=self._checksum(path))
        except OSError as exc:
            raise StorageError(f"cannot read LoRA {where.uri!r}: {exc.strerror}") from exc

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
        where = self._references.resolve(ref, "signature")
        path = self._path(where, ref)
        if not path.is_file():
            raise SignatureInvalid(f"no signature image at {where.uri!r}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read signature {where.uri!r}: {exc.strerror}") from exc

    def _output_path(self, key: str) -> Path:
        return self.path_of(key, self._output_bucket)

    def find_output(self, key: str) -> StoredOutput | None:
        """The stored output under ``key`` with the metadata of its sidecar, if it exists.

        The sidecar is the one named after the stored image's hash, else the legacy one.
        """
        found = self._find(key, self._output_path(key))
        return found[0] if found is not None else None

    def _find(self, key: str, path: Path) -> tuple[StoredOutput, str] | None:
        """The stored output and its image's hash."""
        try:
            digest = content_sha256(path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read output {key!r}: {exc.strerror}") from exc
        metadata: dict[str, str] = {}
        for name in (sidecar_name(path.name, digest), legacy_sidecar_name(path.name)):
            try:
                document = path.with_name(name).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot read the metadata of {key!r}: {exc.strerror}") from exc
            metadata = decode_metadata(document, name) or {}
            break
        return StoredOutput(key=key, url=path.as_uri(), metadata=metadata), digest

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        """Write the image's sidecar, then the image unless one is there (first writer wins)."""
        path = self._output_path(key)
        digest = content_sha256(data)
        sidecar = path.with_name(sidecar_name(path.name, digest))
        document = encode_metadata(metadata)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            own_sidecar = create_exclusive(sidecar, document)
            if create_exclusive(path, data):
                if not own_sidecar:
                    # A writer of the same image wrote the sidecar first; the image is ours.
                    replace_atomically(sidecar, document)
                return StoredOutput(key=key, url=path.as_uri(), metadata=dict(metadata))
        except OSError as exc:
            raise StorageError(f"cannot write output {key!r}: {exc.strerror}") from exc
        found = self._find(key, path)
        if found is None:
            raise StorageError(f"output {key!r} was removed while being written")
        stored, winner = found
        if own_sidecar and winner != digest:
            try:
                sidecar.unlink(missing_ok=True)
            except OSError as exc:  # best effort: an orphan sidecar harms nothing
                log.warning("could not remove the unused sidecar %s: %s", sidecar, exc.strerror)
        return StoredOutput(key=key, url=stored.url, metadata=stored.metadata, created=False)

    def lora_cache_stats(self) -> None:
        """None: local LoRAs are used where they lie, not copied into a cache."""
        return None

    def check(self) -> None:
        """The root folder can be created and written; ``StorageError`` otherwise."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-check-{os.getpid()}-{threading.get_ident()}"
            replace_atomically(probe, b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(
                f"storage folder (LOCAL_STORAGE_DIR) is not writable: {exc.strerror}"
            ) from exc


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
