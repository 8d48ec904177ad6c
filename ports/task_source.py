"""TaskSource: where jobs come from and where their deliveries are settled."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from domain.errors import FailureReport


class SourceUnavailable(ConnectionError):
    """The queue cannot be reached at start-up; the message names the host and the cause."""


@dataclass(frozen=True)
class Delivery:
    """One delivery of a queue message.

    ``attempt`` counts earlier deliveries of the same message whose job ended in a retryable
    error (0 on the first); it is what the failure webhook reports as ``retry_count``.
    ``handbacks`` counts every earlier hand-back of the message to the queue, whatever the
    reason (a retryable error, an outcome the backend could not take, a copy deferred): it sets
    the next back-off. ``received_at`` is when the source received it (the source's monotonic
    clock), so a delivery held too long can go back before the broker's consumer timeout.
    ``carried_failure`` is a failure an earlier version of the worker decided and carried in
    the message's headers instead of recording it. ``tag`` is the source's own handle.
    """

    body: bytes
    attempt: int = 0
    handbacks: int = 0
    received_at: float = 0.0
    tag: object = None
    carried_failure: FailureReport | None = None


@runtime_checkable
class TaskSource(Protocol):
    """A queue of jobs; every delivery received is settled exactly once.

    Settling (``ack``, ``retry``, ``release``, ``park``) never raises for a delivery of this
    source: a settlement that cannot reach the queue any more (the connection died) is dropped,
    and the broker delivers the message again.
    """

    def start(self, *, consume: bool) -> None:
        """Connect; ``SourceUnavailable`` naming the cause when the queue cannot be reached.

        With ``consume=False`` nothing is delivered until ``start_consuming()``.
        """

    def start_consuming(self) -> None:
        """Begin (or resume) taking deliveries."""

    def stop_consuming(self) -> None:
        """Take no more deliveries; those received but not handed out go back to the queue."""

    @property
    def connected(self) -> bool:
        """Whether the queue can be reached right now (readiness)."""

    @property
    def queue_depth(self) -> int | None:
        """Messages waiting in the queue at the last look, or None when unknown (metrics)."""

    @property
    def parked_depth(self) -> int | None:
        """Messages set aside for an operator at the last look, or None when unknown
        (metrics)."""

    def hold_at_most(self, count: int) -> None:
        """Hold at most ``count`` unsettled deliveries from now on (the broker's prefetch)."""

    def receive(self, timeout: float) -> Delivery | None:
        """The next delivery, or None if none came within ``timeout`` seconds."""

    def still_held(self, delivery: Delivery) -> bool:
        """Whether settling ``delivery`` can still reach the queue.

        False once its connection is gone: the broker then delivers the message again, so a
        job not yet started for it must not start.
        """

    def ack(self, delivery: Delivery) -> None:
        """The outcome is durable: remove the message from the queue."""

    def retry(self, delivery: Delivery, *, reason: str, attempt: int, delay_seconds: float) -> None:
        """Hand the message back, delivered again after about ``delay_seconds``.

        The next delivery carries ``attempt`` and ``handbacks + 1``. The copy is published
        (confirmed) before the original is acked; if it cannot be published, the original goes
        back to the queue as it is.
        """

    def release(self, delivery: Delivery) -> None:
        """Give the message back as it is, now (a job that was never started)."""

    def park(
        self, delivery: Delivery, reason: str, *, outcome: Mapping[str, Any] | None = None
    ) -> None:
        """Set the message aside for an operator (never delivered again), with the reason and,
        when one was decided but could not be delivered, the outcome."""

    def close(self) -> None:
        """Stop receiving; deliveries not settled go back to the queue."""
