"""The backend's webhooks over HTTP (README, "Webhooks"): retried outcomes, async progress.

Outcomes (``completed``/``failed``) are delivered synchronously with brief retries (exponential
backoff, full jitter) and raise by what the answer means: ``WebhookUnauthorized`` (401/403, the
credentials), ``WebhookNotFound`` (404, the generation is unknown, perhaps not yet),
``WebhookRejected`` (another refusal retrying cannot change), ``WebhookOutcomeUnknown`` (a failure
the backend may have applied: never sent again) or ``NotifyError`` (unreachable, 5xx).
Progress is best effort: handed to one background thread, coalesced per generation, sent once, and
never sent for a generation whose outcome has been reported; a completion whose generation had a
progress call without an answer is sent once more later, over any late-applied progress.
``check_access`` asks the backend whether it accepts the worker's credentials without changing
anything there.
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
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.exceptions import ProxyError as Urllib3ProxyError

from domain.errors import (
    ErrorCode,
    NotifyError,
    WebhookNotFound,
    WebhookOutcomeUnknown,
    WebhookRejected,
    WebhookUnauthorized,
)
from domain.progress import ProgressUpdate
from ports.telemetry import NoTelemetry, Telemetry

log = logging.getLogger(__name__)

PROGRESS_PATH = "/api/webhooks/inference/progress"
COMPLETE_PATH = "/api/webhooks/inference/complete"
FAILED_PATH = "/api/webhooks/inference/failed"
REQUEST_SOURCE = "inference-server"
"""Value of ``X-Request-Source``; the backend answers 403 to anything else."""
WEBHOOK_KINDS = {PROGRESS_PATH: "progress", COMPLETE_PATH: "completed", FAILED_PATH: "failed"}
"""The ``kind`` each path is reported to telemetry as."""
SECRET_PREFIX = "whsec_"
"""A signing secret starting with this prefix carries a base64-encoded key (Standard Webhooks)."""
RETRY_AFTER_STATUSES = frozenset({429, 503})
"""Statuses whose ``Retry-After`` header is honoured."""
FAILURE_RETRY_STATUSES = frozenset({408, 429, 500, 503})
"""The only statuses a ``failed`` call is sent again after: the view did not apply it (a 500 from
the view means its transaction rolled back; 503, 429 and 408 are answered before it runs). Any
other 5xx (a gateway's 502 or 504: the view behind it may have committed) means the failure may
have been applied, and the backend refunds on every call."""
NOT_APPLIED_5XX = frozenset({500, 503})
"""Server errors after which the call was not applied; any other 5xx may hide an applied call."""
RESEND_MARGIN_SECONDS = 1.0
"""Added to ``timeout_seconds``: how long after a completion it is sent again when a progress call
of its generation got no answer (the backend may apply that call late, replacing the metadata)."""
FINISHED_MEMORY = 10_000
"""How many finished generation ids are remembered to drop their late progress updates (and how
many generations with an unanswered progress call)."""
POOL_SIZE = 16
"""Pooled keep-alive connections per host (the worker runs up to 10 generations at once)."""
EXCERPT_CHARS = 120
"""How much of a refusing response's body goes into the error raised (one line)."""
CREDENTIAL_STATUSES = frozenset({401, 403})
"""The backend's middleware answers these for a wrong token or ``X-Request-Source``."""
ACCESS_CHECK_GENERATION_ID = 0
"""The generation ``check_access`` names: it never exists, so the view answers 404 and changes
nothing once the middleware has let the request through."""
ACCESS_ACCEPTED_STATUSES = frozenset({400, 404})
"""Answers to ``check_access`` that only a view gives, so the middleware accepted the credentials
(2xx counts too)."""
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

    ``completed`` retries connection errors, timeouts, 5xx, 408 and 429 briefly, with
    exponential backoff and full jitter (``uniform(0, min(max, base * 2**attempt))`` seconds)
    or the ``Retry-After`` of a 429/503 capped by ``backoff_max_seconds``, and gives up with
    ``NotifyError`` after ``max_attempts`` or when the next wait would pass
    ``retry_budget_seconds`` (measured with ``clock``): longer outages are the caller's to wait
    out (the worker hands the message back to the queue). ``failed`` retries the same way only
    what cannot have been applied: a connection refused or a connect timeout (nothing was sent),
    and 500, 503, 429 and 408 (``FAILURE_RETRY_STATUSES``). Other answers raise at once:
    401/403 ``WebhookUnauthorized`` (the token or the source header; a misconfiguration, not a bad
    job), 404 ``WebhookNotFound`` (the generation is unknown, perhaps not yet committed), any
    other non-2xx (400, 409, 410, 422, an unexpected redirect) ``WebhookRejected``. No message
    names the token; a refusal carries at most ``EXCERPT_CHARS`` of the answer's body.
    Every HTTP attempt of a webhook is reported to ``telemetry``. ``sleep``, ``clock`` and
    ``rng`` are injectable for tests. Redirects are never followed, so the token goes nowhere but
    ``base_url``.

    A ``failed`` the backend may have applied is never sent again: it raises
    ``WebhookOutcomeUnknown`` at once when its answer is lost after the request went out (a read
    timeout, a dropped connection, a body that cannot be decoded: any ``RequestException`` but a
    connection refused or a connect timeout) or when a gateway answers for the view (502, 504,
    any 5xx but 500 and 503). A ``completed`` whose answer was lost is retried (repeating it is
    harmless); the ``NotifyError`` says "an answer was lost" when that happened.

    ``progress`` never blocks or raises: one daemon thread sends the newest pending update per
    generation, once. Once a generation's outcome is being reported its queued progress is dropped,
    an in-flight one is awaited (up to about ``timeout_seconds``), and later ones are ignored.
    A progress call that got no answer (a timeout, a connection dropped after sending, a
    gateway's 502/504) or that was still in flight when the outcome went out may still be applied
    by the backend, after the completion, replacing the metadata the completion stored: a
    completion delivered for such a generation is sent once more, on a timer thread,
    ``resend_delay_seconds`` later (default ``timeout_seconds + RESEND_MARGIN_SECONDS``; best
    effort, logged; ``close()`` sends pending ones at once, one attempt each). Never a failure.
    A session passed in stays its owner's to close; one created here is closed by ``close()``.
    """

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        timeout_seconds: float = 10.0,
        max_attempts: int = 3,
        backoff_base_seconds: float = 0.5,
        backoff_max_seconds: float = 30.0,
        retry_budget_seconds: float = 10.0,
        signing_secret: str | None = None,
        session: requests.Session | None = None,
        resend_delay_seconds: float | None = None,
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
        if resend_delay_seconds is not None and resend_delay_seconds < 0:
            raise ValueError(
                f"resend_delay_seconds must not be negative, got {resend_delay_seconds}"
            )
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout_seconds
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base_seconds
        self._backoff_max = backoff_max_seconds
        self._retry_budget = retry_budget_seconds
        self._resend_delay = (
            timeout_seconds + RESEND_MARGIN_SECONDS
            if resend_delay_seconds is None
            else resend_delay_seconds
        )
        self._signing_key = signing_key(signing_secret) if signing_secret else None
        self._secrets = tuple(value for value in (token, signing_secret) if value)
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
        self._unanswered: OrderedDict[int, None] = OrderedDict()
        """Generations with a progress call the backend may still apply (no answer came)."""
        self._resends: dict[int, tuple[threading.Timer, _Message]] = {}
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
        """Deliver the completion, or raise (``WebhookUnauthorized``, ``WebhookNotFound``,
        ``WebhookRejected``, ``NotifyError``; see the class). Sent once more later when a
        progress call of the generation got no answer."""
        payload = {
            "generation_id": generation_id,
            "result_url": result_url,
            "metadata": dict(metadata),
        }
        message = self._message("POST", COMPLETE_PATH, generation_id, payload)
        self._deliver(message)
        self._resend_after_late_progress(message)

    def failed(self, generation_id: int, code: ErrorCode, message: str, retry_count: int) -> None:
        """Deliver the failure, or raise (``WebhookUnauthorized``, ``WebhookNotFound``,
        ``WebhookRejected``, ``WebhookOutcomeUnknown`` when it may have been applied,
        ``NotifyError``; see the class)."""
        payload = {
            "generation_id": generation_id,
            "error_message": message,
            "error_code": ErrorCode(code).value,
            "retry_count": retry_count,
        }
        self._deliver(self._message("POST", FAILED_PATH, generation_id, payload))

    def check_access(self) -> None:
        """Ask the backend whether it accepts the worker's credentials; changes nothing there.

        One progress PATCH for generation ``ACCESS_CHECK_GENERATION_ID`` (which never exists),
        with the usual headers, signature and timeout, no retry, not counted as a webhook. The
        backend's middleware answers 401/403 for a wrong token or ``X-Request-Source`` before any
        view runs; past it, the view answers 404 for the unknown generation. So 2xx, 400 and 404
        return (accepted); 401/403 raise ``WebhookUnauthorized`` naming INTERNAL_API_TOKEN and the
        status; no answer, 5xx or anything else raise ``NotifyError`` (cannot tell now).
        """
        if self._closed:
            raise NotifyError("backend access check: the notifier is closed")
        payload = {
            "generation_id": ACCESS_CHECK_GENERATION_ID,
            "progress": {
                "current_step": 0,
                "total_steps": 1,
                "progress_percent": 0,
                "estimated_seconds": None,
            },
        }
        message = self._message("PATCH", PROGRESS_PATH, ACCESS_CHECK_GENERATION_ID, payload)
        try:
            response = self._send(message, report=False)
        except requests.RequestException as exc:
            raise NotifyError(f"backend access check: no answer: {_describe(exc)}") from exc
        status = response.status_code
        if 200 <= status < 300 or status in ACCESS_ACCEPTED_STATUSES:
            log.debug("backend access check: credentials accepted (status %d)", status)
            return
        if status in CREDENTIAL_STATUSES:
            raise WebhookUnauthorized(
                f"backend access check: HTTP {status} {response.reason}: "
                f"{_credentials_hint(status)}"
            )
        raise NotifyError(
            f"backend access check: HTTP {status} {response.reason}: "
            f"cannot tell whether the backend accepts the credentials: {self._excerpt(response)}"
        )

    def close(self) -> None:
        """Stop the progress thread (pending progress is dropped), send the completions waiting
        to be sent again at once (one attempt each), and close an owned session."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
            self._work.notify_all()
            thread = self._thread
            resends = list(self._resends.values())
            self._resends.clear()
        for timer, _ in resends:
            timer.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._timeout + 1.0)
        for _, message in resends:
            self._resend_once(message)
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
        self._attempts(message)

    def _attempts(self, message: _Message) -> None:
        """The attempts of one outcome; returns once one was answered with a 2xx, else raises."""
        started = self._clock()
        last = "not sent"
        maybe_applied = False
        attempts = 0
        for attempt in range(self._max_attempts):
            attempts = attempt + 1
            retry_after: float | None = None
            try:
                response = self._send(message)
            except requests.RequestException as exc:
                last = _describe(exc)
                if message.path == FAILED_PATH and not _never_sent(exc):
                    # The backend refunds on every failure call: never send one again blind.
                    raise WebhookOutcomeUnknown(
                        f"{message.path} for generation {message.generation_id} was sent but"
                        f" its answer was lost: the backend may have applied it: {last}"
                    ) from exc
                if not isinstance(exc, _RETRIED_EXCEPTIONS):
                    raise NotifyError(
                        f"{message.path} for generation {message.generation_id}: {last}"
                    ) from exc
                maybe_applied = maybe_applied or _answer_lost(exc)
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
                last = f"HTTP {status} {response.reason}"
                if message.path == FAILED_PATH and _view_may_have_applied(status):
                    # A gateway answered for the view, which may have committed the refund.
                    log.warning(
                        "generation %s: %s answered %s by a gateway, attempt %d: %s",
                        message.generation_id,
                        message.path,
                        last,
                        attempts,
                        self._excerpt(response),
                    )
                    raise WebhookOutcomeUnknown(
                        f"{message.path} for generation {message.generation_id} was sent but"
                        f" a gateway answered {last}: the backend may have applied it"
                    )
                if not _retryable(status, failure=message.path == FAILED_PATH):
                    raise self._refusal(message, response, attempts)
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
        lost = " (an answer was lost: the backend may have applied it)" if maybe_applied else ""
        raise NotifyError(
            f"{message.path} for generation {message.generation_id} not delivered after "
            f"{attempts} attempt(s){lost}: {last}"
        )

    def _refusal(
        self, message: _Message, response: requests.Response, attempts: int
    ) -> NotifyError:
        """The error for an answer retrying cannot change, by what the status means."""
        status = response.status_code
        excerpt = self._excerpt(response)
        log.warning(
            "generation %s: %s refused, status %d, attempt %d: %s",
            message.generation_id,
            message.path,
            status,
            attempts,
            excerpt,
        )
        refused = (
            f"{message.path} for generation {message.generation_id} refused: "
            f"HTTP {status} {response.reason}"
        )
        if status in CREDENTIAL_STATUSES:
            return WebhookUnauthorized(f"{refused}: {_credentials_hint(status)}: {excerpt}")
        if status == 404:
            return WebhookNotFound(
                f"{refused}: the backend does not know generation {message.generation_id}"
                f" (perhaps not yet): {excerpt}"
            )
        return WebhookRejected(f"{refused}: {excerpt}")

    def _send(self, message: _Message, *, report: bool = True) -> requests.Response:
        """One attempt; the signature (if any) is fresh per attempt, the id is not.

        ``report``: whether the attempt counts as a webhook for ``telemetry``.
        """
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
        session, fresh = self._session, None
        if message.path == FAILED_PATH and self._owns_session:
            # A failure call never rides a pooled connection the backend may have closed while
            # idle: that "connection aborted" would look like a lost answer (see _never_sent).
            session = fresh = requests.Session()
        try:
            response = session.request(
                message.method,
                self._base_url + message.path,
                data=message.body,
                headers=headers,
                timeout=self._timeout,
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
        """The start of a response body, on one line, without the token or signing secret."""
        text = " ".join(response.text[: EXCERPT_CHARS * 4].split())
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."

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
                self._remember_unanswered(generation_id)
        if not settled:
            log.warning("generation %s: a progress update is still in flight", generation_id)

    def _remember_unanswered(self, generation_id: int) -> None:
        """Note that the backend may still apply a progress call of this generation; lock held."""
        self._unanswered[generation_id] = None
        self._unanswered.move_to_end(generation_id)
        while len(self._unanswered) > FINISHED_MEMORY:
            self._unanswered.popitem(last=False)

    def _resend_after_late_progress(self, message: _Message) -> None:
        """After a delivered completion: when a progress call of its generation got no answer,
        send the completion again once ``resend_delay_seconds`` have passed, on a timer thread."""
        generation_id = message.generation_id
        with self._lock:
            if self._closed or generation_id not in self._unanswered:
                return
            del self._unanswered[generation_id]
            again = replace(message, message_id="msg_" + uuid.uuid4().hex)
            timer = threading.Timer(self._resend_delay, self._resend, args=(again,))
            timer.daemon = True
            timer.name = f"http-notifier-resend-{generation_id}"
            previous = self._resends.get(generation_id)
            self._resends[generation_id] = (timer, again)
            timer.start()
        if previous is not None:
            previous[0].cancel()
        log.info(
            "generation %s: a progress call got no answer and may be applied late: the"
            " completion is sent again in %.1f s",
            generation_id,
            self._resend_delay,
        )

    def _resend(self, message: _Message) -> None:
        """The timer's work: the completion again, with retries; logged, never raised."""
        with self._lock:
            entry = self._resends.get(message.generation_id)
            if entry is None or entry[1] is not message:
                return  # close() took it, or a newer completion replaced it
            del self._resends[message.generation_id]
        try:
            self._attempts(message)
        except Exception:  # pylint: disable=broad-exception-caught
            log.warning(
                "generation %s: completion not sent again over late progress",
                message.generation_id,
                exc_info=True,
            )

    def _resend_once(self, message: _Message) -> None:
        """One attempt at a completion that was to be sent again later (at close); logged."""
        try:
            response = self._send(message)
        except requests.RequestException as exc:
            log.warning(
                "generation %s: completion not sent again at close: %s",
                message.generation_id,
                _describe(exc),
            )
            return
        log.info(
            "generation %s: completion sent again at close, status %d",
            message.generation_id,
            response.status_code,
        )

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
            if not _never_sent(exc):
                with self._lock:
                    self._remember_unanswered(generation_id)
            log.debug(
                "generation %s: %s not sent: %s", generation_id, PROGRESS_PATH, _describe(exc)
            )
            return
        if _view_may_have_applied(response.status_code):
            with self._lock:
                self._remember_unanswered(generation_id)
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


_RETRIED_EXCEPTIONS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
"""Transport errors an outcome is sent again after (a failure only when nothing was sent)."""
_NEVER_SENT_EXCEPTIONS = (
    requests.ConnectTimeout,
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidHeader,
    requests.exceptions.URLRequired,
)
"""Raised before any byte of the request left: a connect timeout, or a request never built."""


def _retryable(status: int, *, failure: bool = False) -> bool:
    """Whether an outcome answered ``status`` is sent again (a failure only when not applied)."""
    if failure:
        return status in FAILURE_RETRY_STATUSES
    return status >= 500 or status in {408, 429}


def _view_may_have_applied(status: int) -> bool:
    """A server error that may hide an applied call: a gateway's (502, 504...), not the view's
    own 500 (its transaction rolled back) nor a 503 (nothing ran)."""
    return status >= 500 and status not in NOT_APPLIED_5XX


def _never_sent(exc: BaseException) -> bool:
    """Whether the request surely never reached the backend: a connect timeout, a connection
    refused (or a name not resolved: urllib3's ``NewConnectionError``, also behind a proxy), or a
    request that could not be built. Anything else may have been sent, and perhaps applied."""
    if isinstance(exc, _NEVER_SENT_EXCEPTIONS):
        return True
    if not isinstance(exc, requests.ConnectionError) or isinstance(
        exc, requests.exceptions.SSLError
    ):
        return False
    reason: object = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    if isinstance(reason, Urllib3ProxyError):
        reason = reason.original_error
    return isinstance(reason, NewConnectionError)


def _credentials_hint(status: int) -> str:
    """What a 401/403 from the backend's middleware means, naming the settings to check."""
    if status == 401:
        return (
            "the backend refuses the worker's token: INTERNAL_API_TOKEN must equal the backend's"
            " (and WEBHOOK_SIGNING_SECRET its secret, when set)"
        )
    return (
        "the backend refuses the worker's request source (X-Request-Source) or"
        " INTERNAL_API_TOKEN's permissions"
    )


def _answer_lost(exc: BaseException) -> bool:
    """Whether the request may have reached the backend before the failure (not a connect error)."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.ProxyError)):
        return False
    if isinstance(exc, (requests.ReadTimeout, requests.exceptions.ChunkedEncodingError)):
        return True
    text = str(exc)
    return "RemoteDisconnected" in text or "Connection aborted" in text


def _describe(exc: BaseException) -> str:
    """An exception on one short line (requests' messages name the URL, never the headers)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _display_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
