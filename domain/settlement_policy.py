"""How settlement ends and when it gives up: the ways a delivery leaves the worker, the
retry back-off, and how long an outcome the backend does not take is kept."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from domain.errors import (
    NotifyError,
    WebhookNotFound,
    WebhookOutcomeUnknown,
    WebhookRejected,
    WebhookUnauthorized,
)

MAX_ERROR_MESSAGE = 1000
"""Characters of an error message sent to the backend (it stores ``error_message``)."""


class Settled(str, Enum):
    """How a delivery left the worker (the ``outcome`` label of the jobs metric)."""

    COMPLETED = "completed"
    """The completion was told (now or before): acked."""
    FAILED = "failed"
    """The failure was told, or withheld because the generation's failure was told: acked."""
    DUPLICATE = "duplicate"
    """A copy of a message whose outcome was already told: acked, nothing sent."""
    RETRY = "retry"
    """Handed back to the queue, to be delivered again after a back-off."""
    RETURNED = "returned"
    """Given back unstarted: a copy of its job runs here, it waited too long, or its
    connection died."""
    PARKED = "parked"
    """Set aside for an operator: a poison message, or an outcome the backend never took."""


@dataclass(frozen=True)
class SettlementPolicy:
    """How long and how often a message is handed back before the worker gives up on it.

    A retryable error is retried ``max_retries`` times, then reported failed. Every hand-back
    waits ``base * factor ** handbacks`` seconds, at most ``max_delay_seconds``. A decided outcome
    the backend cannot take is kept for ``outcome_max_age_seconds`` (``not_found_seconds`` when
    the backend answers 404), then parked with the outcome for an operator.
    """

    max_retries: int = 3
    base_delay_seconds: float = 5.0
    delay_factor: float = 4.0
    max_delay_seconds: float = 600.0
    outcome_max_age_seconds: float = 86400.0
    not_found_seconds: float = 300.0
    telling_lease_seconds: float = 300.0
    """How long another copy waits for the copy telling a failure before taking over (the
    teller is then presumed dead: a live one finishes within the webhook's retry budget)."""

    def delay(self, handbacks: int) -> float:
        """Seconds before a message handed back ``handbacks`` times before comes again."""
        exponent = min(max(0, handbacks), 32)
        return min(self.max_delay_seconds, self.base_delay_seconds * self.delay_factor**exponent)

    def verdict(self, age: float, exc: NotifyError) -> tuple[str, bool]:
        """Why the backend did not take an outcome decided ``age`` seconds ago (the ``reason``
        label of the undelivered metric), and whether to give up on it now."""
        if isinstance(exc, WebhookOutcomeUnknown):
            return "unknown", True
        if isinstance(exc, WebhookUnauthorized):
            return "unauthorized", age > self.outcome_max_age_seconds
        if isinstance(exc, WebhookNotFound):
            return "not_found", age > self.not_found_seconds
        if isinstance(exc, WebhookRejected):
            return "rejected", True
        return "unreachable", age > self.outcome_max_age_seconds


STORAGE_CALL_WORST_SECONDS = 65.0
"""The longest one storage request may take before it gives up (connect plus read timeout)."""


def telling_lease_for(
    *, timeout_seconds: float, attempts: int, budget_seconds: float, storage_attempts: int
) -> float:
    """A telling lease far longer than a live teller can take: the failure call (every
    attempt's timeout plus the back-off budget) four times over, plus recording it twice over
    (every storage attempt timing out), and never under five minutes."""
    call = timeout_seconds * attempts + budget_seconds
    record = storage_attempts * STORAGE_CALL_WORST_SECONDS
    return max(300.0, 4.0 * call + 2.0 * record)
