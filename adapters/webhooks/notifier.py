"""The backend's webhooks over HTTP (docs/contract.md, "Webhooks"): retried outcomes, async
progress.

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

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import requests

from adapters.webhooks.answers import CREDENTIAL_STATUSES, credentials_hint, describe
from adapters.webhooks.outcome_sender import OutcomeSender
from adapters.webhooks.progress_sender import RESEND_MARGIN_SECONDS, ProgressSender
from adapters.webhooks.transport import (
    COMPLETE_PATH,
    FAILED_PATH,
    PROGRESS_PATH,
    Transport,
    WebhookMessage,
    display_url,
)
from domain.errors import ErrorCode, NotifyError, WebhookUnauthorized
from domain.progress import ProgressUpdate
from ports.telemetry import NoTelemetry, Telemetry

log = logging.getLogger(__package__)  # one logger for the whole adapter: adapters.webhooks

ACCESS_CHECK_GENERATION_ID = 0
"""The generation ``check_access`` names: it never exists, so the view answers 404 and changes
nothing once the middleware has let the request through."""
ACCESS_ACCEPTED_STATUSES = frozenset({400, 404})
"""Answers to ``check_access`` that only a view gives, so the middleware accepted the credentials
(2xx counts too)."""


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
    and 500, 503, 429 and 408 (``answers.FAILURE_RETRY_STATUSES``). Other answers raise at once:
    401/403 ``WebhookUnauthorized`` (the token or the source header; a misconfiguration, not a
    fault of the generation), 404 ``WebhookNotFound`` (the generation is unknown, perhaps not yet
    committed), any other non-2xx (400, 409, 410, 422, an unexpected redirect)
    ``WebhookRejected``. No message names the token; a refusal carries at most
    ``transport.EXCERPT_CHARS`` of the answer's body.
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
            raise ValueError(f"base_url must be an http(s) URL, got {display_url(base_url)!r}")
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
        self._transport = Transport(
            base_url=base_url,
            token=token,
            timeout_seconds=timeout_seconds,
            signing_secret=signing_secret,
            session=session,
            telemetry=telemetry if telemetry is not None else NoTelemetry(),
        )
        self._outcomes = OutcomeSender(
            self._transport,
            max_attempts=max_attempts,
            backoff_base_seconds=backoff_base_seconds,
            backoff_max_seconds=backoff_max_seconds,
            retry_budget_seconds=retry_budget_seconds,
            sleep=sleep,
            clock=clock,
            rng=rng if rng is not None else random.Random(),
        )
        self._progress = ProgressSender(
            self._transport,
            self._outcomes,
            timeout_seconds=timeout_seconds,
            resend_delay_seconds=(
                timeout_seconds + RESEND_MARGIN_SECONDS
                if resend_delay_seconds is None
                else resend_delay_seconds
            ),
        )

    @classmethod
    def resource(cls, **options: Any) -> Iterator[HttpNotifier]:
        """A notifier made of ``options`` for as long as the generator runs, closed when it ends
        (its progress thread, the completions waiting to be sent again, an owned session): the
        composition root's Resource provider, released on shutdown."""
        with cls(**options) as notifier:
            yield notifier

    def __repr__(self) -> str:
        return (
            f"HttpNotifier(base_url={display_url(self._transport.base_url)!r}, "
            f"signed={self._transport.signed}, max_attempts={self._outcomes.max_attempts}, "
            f"timeout_seconds={self._transport.timeout})"
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
        self._progress.submit(generation_id, update)

    def completed(self, generation_id: int, result_url: str, metadata: Mapping[str, Any]) -> None:
        """Deliver the completion, or raise (``WebhookUnauthorized``, ``WebhookNotFound``,
        ``WebhookRejected``, ``NotifyError``; see the class). Sent once more later when a
        progress call of the generation got no answer."""
        payload = {
            "generation_id": generation_id,
            "result_url": result_url,
            "metadata": dict(metadata),
        }
        message = self._transport.message("POST", COMPLETE_PATH, generation_id, payload)
        self._send_outcome(message)
        self._progress.resend_after_late_progress(message)

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
        self._send_outcome(self._transport.message("POST", FAILED_PATH, generation_id, payload))

    def check_access(self) -> None:
        """Ask the backend whether it accepts the worker's credentials; changes nothing there.

        One progress PATCH for generation ``ACCESS_CHECK_GENERATION_ID`` (which never exists),
        with the usual headers, signature and timeout, no retry, not counted as a webhook. The
        backend's middleware answers 401/403 for a wrong token or ``X-Request-Source`` before any
        view runs; past it, the view answers 404 for the unknown generation. So 2xx, 400 and 404
        return (accepted); 401/403 raise ``WebhookUnauthorized`` naming INTERNAL_API_TOKEN and the
        status; no answer, 5xx or anything else raise ``NotifyError`` (cannot tell now).
        """
        if self._progress.closed:
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
        message = self._transport.message(
            "PATCH", PROGRESS_PATH, ACCESS_CHECK_GENERATION_ID, payload
        )
        try:
            response = self._transport.send(message, report=False)
        except requests.RequestException as exc:
            raise NotifyError(f"backend access check: no answer: {describe(exc)}") from exc
        status = response.status_code
        if 200 <= status < 300 or status in ACCESS_ACCEPTED_STATUSES:
            log.debug("backend access check: credentials accepted (status %d)", status)
            return
        if status in CREDENTIAL_STATUSES:
            raise WebhookUnauthorized(
                f"backend access check: HTTP {status} {response.reason}: "
                f"{credentials_hint(status)}"
            )
        excerpt = self._transport.excerpt(response)
        raise NotifyError(
            f"backend access check: HTTP {status} {response.reason}: "
            f"cannot tell whether the backend accepts the credentials: {excerpt}"
        )

    def close(self) -> None:
        """Stop the progress thread (pending progress is dropped), send the completions waiting
        to be sent again at once (one attempt each), and close an owned session."""
        if self._progress.close():
            self._transport.close()

    def _send_outcome(self, message: WebhookMessage) -> None:
        """Send an outcome with retries; the generation's progress is settled first."""
        self._progress.finish(message.generation_id)
        if self._progress.closed:
            raise NotifyError(f"{message.path} for generation {message.generation_id}: closed")
        self._outcomes.send(message)
