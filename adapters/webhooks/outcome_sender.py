"""Outcome webhooks (``completed``, ``failed``) sent with brief retries, raising by the answer.

Attempts back off exponentially with full jitter (``uniform(0, min(max, base * 2**attempt))``
seconds) or wait the ``Retry-After`` of a 429/503, capped by the maximum back-off, and give up
with ``NotifyError`` after the last attempt or when the next wait would pass the retry budget:
longer outages are the caller's to wait out (the worker hands the message back to the queue).
What is sent again, and what an answer means, is ``answers``'.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import requests

from adapters.webhooks.answers import (
    CREDENTIAL_STATUSES,
    RETRIED_EXCEPTIONS,
    RETRY_AFTER_STATUSES,
    answer_lost,
    credentials_hint,
    describe,
    never_sent,
    retryable,
    view_may_have_applied,
)
from adapters.webhooks.transport import FAILED_PATH, Transport, WebhookMessage
from domain.errors import (
    NotifyError,
    WebhookNotFound,
    WebhookOutcomeUnknown,
    WebhookRejected,
    WebhookUnauthorized,
)

log = logging.getLogger(__package__)  # one logger for the whole adapter: adapters.webhooks

_MAX_BACKOFF_EXPONENT = 62


class OutcomeSender:
    """Sends an outcome through ``transport`` until a 2xx, a refusal, or the end of the retries.

    ``sleep``, ``clock`` (which measures the retry budget) and ``rng`` are injectable for tests.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        max_attempts: int,
        backoff_base_seconds: float,
        backoff_max_seconds: float,
        retry_budget_seconds: float,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.max_attempts = max_attempts
        self._transport = transport
        self._backoff_base = backoff_base_seconds
        self._backoff_max = backoff_max_seconds
        self._retry_budget = retry_budget_seconds
        self._sleep = sleep
        self._clock = clock
        self._rng = rng

    def send(self, message: WebhookMessage) -> None:
        """The attempts of one outcome; returns once one was answered with a 2xx, else raises."""
        started = self._clock()
        last = "not sent"
        maybe_applied = False
        attempts = 0
        for attempt in range(self.max_attempts):
            attempts = attempt + 1
            retry_after: float | None = None
            try:
                response = self._transport.send(message)
            except requests.RequestException as exc:
                last = describe(exc)
                if message.path == FAILED_PATH and not never_sent(exc):
                    # The backend refunds on every failure call: never send one again blind.
                    raise WebhookOutcomeUnknown(
                        f"{message.path} for generation {message.generation_id} was sent but"
                        f" its answer was lost: the backend may have applied it: {last}"
                    ) from exc
                if not isinstance(exc, RETRIED_EXCEPTIONS):
                    raise NotifyError(
                        f"{message.path} for generation {message.generation_id}: {last}"
                    ) from exc
                maybe_applied = maybe_applied or answer_lost(exc)
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
                if message.path == FAILED_PATH and view_may_have_applied(status):
                    # A gateway answered for the view, which may have committed the refund.
                    log.warning(
                        "generation %s: %s answered %s by a gateway, attempt %d: %s",
                        message.generation_id,
                        message.path,
                        last,
                        attempts,
                        self._transport.excerpt(response),
                    )
                    raise WebhookOutcomeUnknown(
                        f"{message.path} for generation {message.generation_id} was sent but"
                        f" a gateway answered {last}: the backend may have applied it"
                    )
                if not retryable(status, failure=message.path == FAILED_PATH):
                    raise self._refusal(message, response, attempts)
                if status in RETRY_AFTER_STATUSES:
                    retry_after = self._retry_after(response.headers.get("Retry-After"))
            if attempts >= self.max_attempts:
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
        self, message: WebhookMessage, response: requests.Response, attempts: int
    ) -> NotifyError:
        """The error for an answer retrying cannot change, by what the status means."""
        status = response.status_code
        excerpt = self._transport.excerpt(response)
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
            return WebhookUnauthorized(f"{refused}: {credentials_hint(status)}: {excerpt}")
        if status == 404:
            return WebhookNotFound(
                f"{refused}: the backend does not know generation {message.generation_id}"
                f" (perhaps not yet): {excerpt}"
            )
        return WebhookRejected(f"{refused}: {excerpt}")

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
