"""What both record stores share: the rules for record keys and the create-or-read loop."""

from __future__ import annotations

import re
from collections.abc import Callable

from domain.errors import StorageError
from ports.records import Record

MAX_RECORD_KEY_BYTES = 512
"""Longest record key; leaves room for a prefix within S3's 1024-byte key limit."""
CREATE_ATTEMPTS = 2
"""A create refused by a record that is gone when read (deleted in between) is tried again."""

_BAD_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\]")


def checked_record_key(key: str) -> str:
    """``key`` if it is a relative, slash-separated name whose parts are not empty and do not
    start with a dot (no ``..``; hidden names are the stores' own temporary and lock files).

    Keys come from the worker's own code, so a bad one is a bug: ``ValueError``.
    """
    parts = key.split("/") if isinstance(key, str) else [""]
    if any(not part or part.startswith(".") for part in parts) or _BAD_CHARACTERS.search(key):
        raise ValueError(f"record key {key!r:.80} is not a relative slash-separated name")
    if len(key.encode("utf-8")) > MAX_RECORD_KEY_BYTES:
        raise ValueError(f"record key {key!r:.80} is longer than {MAX_RECORD_KEY_BYTES} bytes")
    return key


def create_or_read(
    key: str, create: Callable[[], Record | None], read: Callable[[], Record | None]
) -> Record:
    """The record ``create()`` stored, else the one ``read()`` finds there.

    ``create`` returns None when a record is there already; one that is gone when read was
    deleted in between, so the create is tried again.
    """
    for _ in range(CREATE_ATTEMPTS):
        created = create()
        if created is not None:
            return created
        existing = read()
        if existing is not None:
            return existing
    raise StorageError(
        f"record {key!r}: refused as existing, yet not found {CREATE_ATTEMPTS} times"
    )
