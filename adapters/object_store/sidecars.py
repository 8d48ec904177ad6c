"""Metadata sidecars of stored outputs: named after the image they describe.

S3 user metadata holds 2 KB of ASCII, so an output's full metadata lives in a JSON object beside
the PNG. Two workers may render the same job (a redelivery after a dropped connection) with
different images, e.g. a worker-chosen seed; only the first PNG is kept. A sidecar named
``<key>.<first 16 hex digits of the PNG's SHA-256>.metadata.json`` belongs to one image, so a
losing writer can never replace the winner's metadata, and a reader finds the sidecar from the
stored image's hash. Outputs written before this scheme have ``<key>.metadata.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".metadata.json"
HASH_IN_NAME_CHARS = 16
"""Hex digits of the PNG's SHA-256 in its sidecar's name (64 bits: no collisions per key)."""
CONTENT_SHA256 = "content-sha256"
"""Metadata entry (and ``x-amz-meta-*`` header) holding the PNG's SHA-256."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def content_sha256(data: bytes) -> str:
    """The SHA-256 of an image, hex."""
    return hashlib.sha256(data).hexdigest()


def is_sha256_hex(value: object) -> bool:
    """Whether ``value`` is a SHA-256 in lowercase hex (safe to put in a key)."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def sidecar_name(name: str, digest: str) -> str:
    """The sidecar of the image ``name`` (a key or a file name) whose SHA-256 is ``digest``."""
    return f"{name}.{digest[:HASH_IN_NAME_CHARS]}{SIDECAR_SUFFIX}"


def legacy_sidecar_name(name: str) -> str:
    """The sidecar name used before sidecars were named after their image."""
    return name + SIDECAR_SUFFIX


def encode_metadata(metadata: Mapping[str, str]) -> bytes:
    """A sidecar's bytes."""
    return json.dumps(dict(metadata), sort_keys=True).encode("utf-8")


def decode_metadata(data: bytes, name: str) -> dict[str, str] | None:
    """A sidecar's string entries; None (logged) when it is not a JSON object."""
    try:
        document = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        log.warning("metadata sidecar %r unreadable, using the image's headers: %s", name, exc)
        return None
    if not isinstance(document, dict):
        log.warning("metadata sidecar %r is not a JSON object, using the image's headers", name)
        return None
    return {str(key): value for key, value in document.items() if isinstance(value, str)}
