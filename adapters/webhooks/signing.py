"""The headers of every webhook request: the bearer token, the source, the Standard Webhooks
signature (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``) when a secret is set."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

REQUEST_SOURCE = "inference-server"
"""Value of ``X-Request-Source``; the backend answers 403 to anything else."""
SECRET_PREFIX = "whsec_"
"""A signing secret starting with this prefix carries a base64-encoded key (Standard Webhooks)."""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a signing secret: base64-decoded after ``whsec_``, else its UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("a 'whsec_' signing secret must be base64 after the prefix") from exc
    return secret.encode("utf-8")


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature header value: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def request_headers(token: str, key: bytes | None, message_id: str, body: bytes) -> dict[str, str]:
    """The headers of one attempt; signed with ``key`` (if any) and a fresh timestamp."""
    headers = {
        "Authorization": f"Bearer {token}",
        "X-Request-Source": REQUEST_SOURCE,
        "Content-Type": "application/json",
    }
    if key is not None:
        timestamp = int(time.time())
        headers["webhook-id"] = message_id
        headers["webhook-timestamp"] = str(timestamp)
        headers["webhook-signature"] = sign(key, message_id, timestamp, body)
    return headers
