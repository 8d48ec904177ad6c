"""Records in a local folder: an exclusive hard link creates, a locked compare replaces.

For one machine (the demo, ``generate``, a single-host deployment): every worker process that
shares the folder sees the same records. ``create`` is atomic across them (``os.link`` fails
if the name exists); ``replace`` compares and writes under an ``flock`` on ``<root>/.lock``
(local file systems only: ``flock`` is not dependable over NFS). A record's version is the
SHA-256 of its bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.local.atomic_files import create_exclusive, replace_atomically
from adapters.object_store.records import checked_record_key, create_or_read
from domain.errors import StorageError
from ports.records import Record

LOCK_FILE = ".lock"


def records_root(storage_dir: str | os.PathLike, bucket: str, prefix: str) -> str:
    """Where the local storage's records go: under ``prefix`` in ``bucket``, beside the outputs,
    as on S3 (``LOCAL_STORAGE_DIR/<bucket>/<OUTCOME_RECORDS_PREFIX>``)."""
    return str(Path(storage_dir) / bucket / prefix)


class LocalRecordStore:
    """Implements ``RecordStore`` as files under ``root``; keys with ``/`` are sub-folders.

    Raises ``StorageError`` when the folder cannot be read or written, ``ValueError`` for a
    malformed key (``..``, a leading ``/``, a part starting with a dot).
    """

    def __init__(self, *, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()

    def create(self, key: str, data: bytes) -> Record:
        """Store ``data`` unless a record is there; the record under ``key`` now."""
        path = self._path(key)

        def create() -> Record | None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not create_exclusive(path, data):
                    return None
            except OSError as exc:
                raise StorageError(f"cannot write record {key!r}: {exc.strerror}") from exc
            return Record(data=data, version=_version(data), created=True)

        return create_or_read(key, create, lambda: self.read(key))

    def read(self, key: str) -> Record | None:
        """The record under ``key``, or None."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read record {key!r}: {exc.strerror}") from exc
        return Record(data=data, version=_version(data))

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        """Store ``data`` if the record is still at ``version``; the new version, or None."""
        path = self._path(key)
        try:
            with self._locked():
                current = self.read(key)
                if current is None or current.version != version:
                    return None
                replace_atomically(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write record {key!r}: {exc.strerror}") from exc
        return _version(data)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive against every ``replace`` of this folder, in any thread or process."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK_FILE).open("a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _path(self, key: str) -> Path:
        return self.root / checked_record_key(key)


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
