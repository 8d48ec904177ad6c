"""One HTTP attempt at a webhook: the paths, the message serialized once, the pooled session.

Every request carries the headers of ``signing``, a timeout, and a compact JSON body serialized
once; redirects are never followed, so the token goes nowhere but ``base_url``. Every attempt
at a webhook is reported to telemetry.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from adapters.webhooks.signing import request_headers, signing_key
from ports.telemetry import Telemetry

PROGRESS_PATH = "/api/webhooks/inference/progress"
COMPLETE_PATH = "/api/webhooks/inference/complete"
FAILED_PATH = "/api/webhooks/inference/failed"
WEBHOOK_KINDS = {PROGRESS_PATH: "progress", COMPLETE_PATH: "completed", FAILED_PATH: "failed"}
"""The ``kind`` each path is reported to telemetry as."""
POOL_SIZE = 16
"""Pooled keep-alive connections per host (the worker runs up to 10 generations at once)."""
EXCERPT_CHARS = 120
"""How much of a refusing response's body goes into the error raised (one line)."""
_REDACTED = "***"


@dataclass(frozen=True)
class WebhookMessage:
    """One logical webhook: serialized once, the same bytes and id on every attempt."""

    method: str
    path: str
    generation_id: int
    body: bytes
    message_id: str


class Transport:
    """Sends one attempt at a time to ``base_url``, with the token and, when ``signing_secret`` is
    set, the signature. A session passed in stays its owner's to close; one created here (a
    keep-alive pool) is closed by ``close()``."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        timeout_seconds: float,
        signing_secret: str | None,
        session: requests.Session | None,
        telemetry: Telemetry,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout_seconds
        self._token = token
        self._signing_key = signing_key(signing_secret) if signing_secret else None
        self._secrets = tuple(value for value in (token, signing_secret) if value)
        self._owns_session = session is None
        self._session = session if session is not None else pooled_session()
        self._telemetry = telemetry

    @property
    def signed(self) -> bool:
        """Whether requests are signed."""
        return self._signing_key is not None

    def message(
        self, method: str, path: str, generation_id: int, payload: Mapping[str, Any]
    ) -> WebhookMessage:
        """A webhook with ``payload`` as its body and a fresh message id."""
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str)
        return WebhookMessage(
            method=method,
            path=path,
            generation_id=generation_id,
            body=body.encode("utf-8"),
            message_id="msg_" + uuid.uuid4().hex,
        )

    def send(self, message: WebhookMessage, *, report: bool = True) -> requests.Response:
        """One attempt; the signature (if any) is fresh per attempt, the id is not.

        ``report``: whether the attempt counts as a webhook for telemetry.
        """
        headers = request_headers(self._token, self._signing_key, message.message_id, message.body)
        kind = WEBHOOK_KINDS.get(message.path, message.path)
        session, fresh = self._session, None
        if message.path == FAILED_PATH and self._owns_session:
            # A failure call never rides a pooled connection the backend may have closed while
            # idle: that "connection aborted" would look like a lost answer (answers.never_sent).
            session = fresh = requests.Session()
        try:
            response = session.request(
                message.method,
                self.base_url + message.path,
                data=message.body,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
            )
        except Exception:
            if report:
                self._telemetry.webhook_attempt(kind=kind, ok=False)
            raise
        finally:
            if fresh is not None:
                fresh.close()
        if report:
            self._telemetry.webhook_attempt(kind=kind, ok=200 <= response.status_code < 300)
        return response

    def excerpt(self, response: requests.Response) -> str:
        """The start of a response body, on one line, without the token or signing secret."""
        text = " ".join(response.text[: EXCERPT_CHARS * 4].split())
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."

    def close(self) -> None:
        """Close the session if it was created here."""
        if self._owns_session:
            self._session.close()


def pooled_session() -> requests.Session:
    """A session with a keep-alive pool and no transport-level retries (ours are explicit)."""
    session = requests.Session()
    pool = HTTPAdapter(pool_connections=2, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("http://", pool)
    session.mount("https://", pool)
    return session


def display_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
