"""The backend's webhooks over HTTP (CONTRACT.md section 2): retried outcomes, async progress.

Outcomes (``completed``/``failed``) are delivered synchronously with retries, exponential backoff
and full jitter, and raise ``NotifyError`` (transient) or ``WebhookRejected`` (refused for good).
Progress is best effort: handed to one background thread, coalesced per generation, sent once, and
never sent for a generation whose outcome has been reported.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from domain.errors import ErrorCode, NotifyError, WebhookRejected
from domain.progress import ProgressUpdate
from ports.telemetry import NoTelemetry, Telemetry

log = logging.getLogger(__name__)

PROGRESS_PATH = "/api/webhooks/inference/progress"
COMPLETE_PATH = "/api/webhooks/inference/complete"
FAILED_PATH = "/api/webhooks/inference/failed"
REQUEST_SOURCE = "inference-server"
WEBHOOK_KINDS = {PROGRESS_PATH: "progress", COMPLETE_PATH: "completed", FAILED_PATH: "failed"}
"""Value of ``X-Request-Source``; the backend answers 403 to anything else."""
SECRET_PREFIX = "whsec_"
"""A signing secret starting with this prefix carries a base64-encoded key (Standard Webhooks)."""
RETRY_AFTER_STATUSES = frozenset({429, 503})
"""Statuses whose ``Retry-After`` header is honoured."""
FINISHED_MEMORY = 10_000
"""How many finished generation ids are remembered to drop their late progress updates."""
POOL_SIZE = 16
"""Pooled keep-alive connections per host (the worker runs up to 10 generations at once)."""
EXCERPT_CHARS = 200
"""How much of a refusing response's body goes into ``WebhookRejected``."""
_MAX_BACKOFF_EXPONENT = 62
_REDACTED = "***"


@dataclass(frozen=True)
class _Message:
    """One logical webhook: serialized once, the same bytes and id on every attempt."""

    method: str
    path: str
    generation_id: int
    body: bytes
    message_id: str


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


class HttpNotifier:
    """Implements ``Notifier`` with the backend's webhooks, to ``base_url`` only.

    Every request carries ``Authorization: Bearer <token>``, ``X-Request-Source: inference-server``
    and ``Content-Type: application/json``, a timeout, and a compact JSON body serialized once.

    When ``signing_secret`` is set (``None`` or empty: unsigned), requests are also signed the
    Standard Webhooks way: ``webhook-id`` (one per logical message, kept across its retries),
    ``webhook-timestamp`` (Unix seconds, per attempt) and ``webhook-signature: v1,<sig>`` where sig
    is the base64 HMAC-SHA256 of ``f"{id}.{timestamp}."`` followed by the exact body bytes. A secret
    starting with ``whsec_`` carries the key base64-encoded after the prefix; any other secret is
    used as its UTF-8 bytes.

    ``completed``/``failed`` retry connection errors, timeouts, 5xx, 408 and 429 with exponential
    backoff and full jitter (``uniform(0, min(backoff_max, backoff_base * 2**attempt))``), or the
    ``Retry-After`` of a 429/503 capped by ``backoff_max_seconds``. They give up with
    ``NotifyError`` after ``max_attempts`` or when the next wait would pass
    ``retry_budget_seconds`` (measured with ``clock``); any other non-2xx (4xx, an unexpected
    redirect) raises ``WebhookRejected`` at once. Every HTTP attempt is reported to ``telemetry``.
    ``sleep``, ``clock`` and ``rng`` are injectable for tests. Redirects are never followed, so
    the token goes nowhere but ``base_url``.

    ``progress`` never blocks or raises: one daemon thread sends the newest pending update per
    generation, once. Once a generation's outcome is being reported its queued progress is dropped,
    an in-flight one is awaited (up to about ``timeout_seconds``), and later ones are ignored.
    A session passed in stays its owner's to close; one created here is closed by ``close()``.
    """

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        timeout_seconds: float = 10.0,
        max_attempts: int = 6,
        backoff_base_seconds: float = 0.5,
        backoff_max_seconds: float = 30.0,
        retry_budget_seconds: float = 120.0,
        signing_secret: str | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if urlsplit(base_url).scheme not in {"http", "https"} or not urlsplit(base_url).netloc:
            raise ValueError(f"base_url must be an http(s) URL, got {_display_url(base_url)!r}")
        if not token:
            raise ValueError("token must not be empty (the backend answers 401 without it)")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if backoff_base_seconds < 0 or backoff_max_seconds < 0 or retry_budget_seconds < 0:
            raise ValueError("backoff and budget seconds must not be negative")
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout_seconds
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base_seconds
        self._backoff_max = backoff_max_seconds
        self._retry_budget = retry_budget_seconds
        self._signing_key = signing_key(signing_secret) if signing_secret else None
        self._owns_session = session is None
        self._session = session if session is not None else _pooled_session()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._telemetry = telemetry if telemetry is not None else NoTelemetry()

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._pending: OrderedDict[int, ProgressUpdate] = OrderedDict()
        self._finished: OrderedDict[int, None] = OrderedDict()
        self._in_flight: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"HttpNotifier(base_url={_display_url(self._base_url)!r}, "
            f"signed={self._signing_key is not None}, max_attempts={self._max_attempts}, "
            f"timeout_seconds={self._timeout})"
        )

    def __enter__(self) -> HttpNotifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # The port.

    def progress(self, generation_id: int, update: ProgressUpdate) -> None:
        """Queue the update for the background thread; never blocks, never raises."""
        try:
            with self._lock:
                if update.current_step == 0:
                    # A new run of the generation starts (the backend re-queued it): progress
                    # is its own again. Progress of a finished run is never at step 0.
                    self._finished.pop(generation_id, None)
                if self._closed or generation_id in self._finished:
                    return
                # Assigning to an existing key replaces the stale update in its queue position.
                self._pending[generation_id] = update
                self._start_thread()
                self._work.notify()
        except Exception:  # pylint: disable=broad-exception-caught
            log.warning("generation %s: progress update not queued", generation_id, exc_info=True)

    def completed(self, generation_id: int, result_url: str, metadata: Mapping[str, Any]) -> None:
        """Deliver the completion, or raise ``NotifyError``/``WebhookRejected``."""
        payload = {
            "generation_id": generation_id,
            "result_url": result_url,
            "metadata": dict(metadata),
        }
        self._deliver(self._message("POST", COMPLETE_PATH, generation_id, payload))

    def failed(self, generation_id: int, code: ErrorCode, message: str, retry_count: int) -> None:
        """Deliver the failure, or raise ``NotifyError``/``WebhookRejected``."""
        payload = {
            "generation_id": generation_id,
            "error_message": message,
            "error_code": ErrorCode(code).value,
            "retry_count": retry_count,
        }
        self._deliver(self._message("POST", FAILED_PATH, generation_id, payload))

    def close(self) -> None:
        """Stop the progress thread (pending progress is dropped) and close an owned session."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
            self._work.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._timeout + 1.0)
        if self._owns_session:
            self._session.close()

    # Outcomes.

    def _message(
        self, method: str, path: str, generation_id: int, payload: Mapping[str, Any]
    ) -> _Message:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str)
        return _Message(
            method=method,
            path=path,
            generation_id=generation_id,
            body=body.encode("utf-8"),
            message_id="msg_" + uuid.uuid4().hex,
        )

    def _deliver(self, message: _Message) -> None:
        """Send an outcome with retries; the generation's progress is settled first."""
        self._finish(message.generation_id)
        if self._closed:
            raise NotifyError(f"{message.path} for generation {message.generation_id}: closed")
        started = self._clock()
        last = "not sent"
        attempts = 0
        for attempt in range(self._max_attempts):
            attempts = attempt + 1
            retry_after: float | None = None
            try:
                response = self._send(message)
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                last = _describe(exc)
            except requests.RequestException as exc:
                raise NotifyError(
                    f"{message.path} for generation {message.generation_id}: {_describe(exc)}"
                ) from exc
            else:
                status = response.status_code
                if 200 <= status < 300:
                    log.info(
                        "generation %s: %s %s delivered, status %d, attempt %d",
                        message.generation_id,
                        message.method,
                        message.path,
                        status,
                        attempts,
                    )
                    return
                if not _retryable(status):
                    excerpt = self._excerpt(response)
                    log.warning(
                        "generation %s: %s refused, status %d, attempt %d: %s",
                        message.generation_id,
                        message.path,
                        status,
                        attempts,
                        excerpt,
                    )
                    raise WebhookRejected(
                        f"{message.path} for generation {message.generation_id} refused: "
                        f"HTTP {status} {response.reason}: {excerpt}"
                    )
                last = f"HTTP {status} {response.reason}"
                if status in RETRY_AFTER_STATUSES:
                    retry_after = self._retry_after(response.headers.get("Retry-After"))
            if attempts >= self._max_attempts:
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            if self._clock() - started + delay > self._retry_budget:
                log.warning(
                    "generation %s: %s retry budget of %.1f s spent",
                    message.generation_id,
                    message.path,
                    self._retry_budget,
                )
                break
            log.warning(
                "generation %s: %s failed (%s), attempt %d, retrying in %.2f s",
                message.generation_id,
                message.path,
                last,
                attempts,
                delay,
            )
            self._sleep(delay)
        raise NotifyError(
            f"{message.path} for generation {message.generation_id} not delivered after "
            f"{attempts} attempt(s): {last}"
        )

    def _send(self, message: _Message) -> requests.Response:
        """One attempt; the signature (if any) is fresh per attempt, the id is not."""
        headers = {
            "Authorization": f"Bearer {self._token}",
            "X-Request-Source": REQUEST_SOURCE,
            "Content-Type": "application/json",
        }
        if self._signing_key is not None:
            timestamp = int(time.time())
            headers["webhook-id"] = message.message_id
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = sign(
                self._signing_key, message.message_id, timestamp, message.body
            )
        kind = WEBHOOK_KINDS.get(message.path, message.path)
        try:
            response = self._session.request(
                message.method,
                self._base_url + message.path,
                data=message.body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except Exception:
            self._telemetry.webhook_attempt(kind=kind, ok=False)
            raise
        self._telemetry.webhook_attempt(kind=kind, ok=200 <= response.status_code < 300)
        return response

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform over [0, min(max, base * 2**attempt)]."""
        ceiling = self._backoff_base * 2 ** min(attempt, _MAX_BACKOFF_EXPONENT)
        return self._rng.uniform(0.0, min(self._backoff_max, ceiling))

    def _retry_after(self, value: str | None) -> float | None:
        """Seconds to wait from a ``Retry-After`` (seconds or HTTP date), capped; None if absent."""
        if not value:
            return None
        try:
            seconds = float(value.strip())
        except ValueError:
            try:
                when = parsedate_to_datetime(value.strip())
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        if not math.isfinite(seconds):
            return None
        return min(max(seconds, 0.0), self._backoff_max)

    def _excerpt(self, response: requests.Response) -> str:
        """The start of a response body, on one line, without the token."""
        text = " ".join(response.text[: EXCERPT_CHARS * 2].split())
        return text.replace(self._token, _REDACTED)[:EXCERPT_CHARS]

    # Progress.

    def _finish(self, generation_id: int) -> None:
        """No progress for this generation may reach the backend from now on."""
        with self._lock:
            self._finished[generation_id] = None
            self._finished.move_to_end(generation_id)
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
            self._pending.pop(generation_id, None)
            settled = self._idle.wait_for(
                lambda: self._in_flight != generation_id, timeout=self._timeout + 1.0
            )
        if not settled:
            log.warning("generation %s: a progress update is still in flight", generation_id)

    def _start_thread(self) -> None:
        """Start the progress thread once; the caller holds the lock."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._progress_loop, name="http-notifier-progress", daemon=True
            )
            self._thread.start()

    def _progress_loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                generation_id, update = self._pending.popitem(last=False)
                self._in_flight = generation_id
            try:
                self._send_progress(generation_id, update)
            except Exception:  # pylint: disable=broad-exception-caught
                log.warning("generation %s: progress update failed", generation_id, exc_info=True)
            finally:
                with self._lock:
                    self._in_flight = None
                    self._idle.notify_all()

    def _send_progress(self, generation_id: int, update: ProgressUpdate) -> None:
        """One attempt, no retries: a lost milestone is superseded by the next one."""
        payload = {"generation_id": generation_id, "progress": update.as_payload()}
        message = self._message("PATCH", PROGRESS_PATH, generation_id, payload)
        try:
            response = self._send(message)
        except requests.RequestException as exc:
            log.debug(
                "generation %s: %s not sent: %s", generation_id, PROGRESS_PATH, _describe(exc)
            )
            return
        if 200 <= response.status_code < 300:
            log.debug(
                "generation %s: %s %d%% sent, status %d",
                generation_id,
                PROGRESS_PATH,
                update.progress_percent,
                response.status_code,
            )
        else:
            log.warning(
                "generation %s: %s dropped, status %d: %s",
                generation_id,
                PROGRESS_PATH,
                response.status_code,
                self._excerpt(response),
            )


def _pooled_session() -> requests.Session:
    """A session with a keep-alive pool and no transport-level retries (ours are explicit)."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _retryable(status: int) -> bool:
    return status >= 500 or status in {408, 429}


def _describe(exc: BaseException) -> str:
    """An exception on one short line (requests' messages name the URL, never the headers)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _display_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
