"""RecordStore: small records every worker sees, the durable memory of decided outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Record:
    """A record's bytes and its version (an S3 ETag; any token that changes with the bytes)."""

    data: bytes
    version: str
    created: bool = False
    """True when the ``create`` call that returned it stored it."""


@runtime_checkable
class RecordStore(Protocol):
    """Durable records under string keys, shared by every worker process and machine.

    ``create`` and ``replace`` are atomic across all of them (S3 ``PutObject`` with
    ``If-None-Match: *`` and ``If-Match: <ETag>``; an exclusive create and a locked compare on a
    local disk): of two racing writers exactly one succeeds. Raises ``StorageError`` when the
    store cannot be reached.
    """

    def create(self, key: str, data: bytes) -> Record:
        """Store ``data`` under ``key`` unless a record is there; the record under ``key`` now:
        this one (``created``) or the one there first."""

    def read(self, key: str) -> Record | None:
        """The record under ``key``, or None."""

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        """Store ``data`` if the record under ``key`` is still at ``version``; its new version,
        or None when it changed (or is gone) meanwhile."""
