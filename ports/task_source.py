"""TaskSource: where jobs come from and where their deliveries are settled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from domain.errors import FailureReport


@dataclass(frozen=True)
class Delivery:
    """One delivery of a queue message.

    ``attempt`` counts earlier deliveries of the same job that ended in a retry (0 on the first),
    and is what the failure webhook reports as ``retry_count``. ``pending_failure`` is a final
    failure decided on an earlier delivery that the backend has not been told yet.
    ``redelivered`` is the broker's flag: an earlier delivery of this very message was never
    settled (a connection died). ``tag`` is the source's own handle.
    """

    body: bytes
    attempt: int = 0
    tag: object = None
    pending_failure: FailureReport | None = None
    redelivered: bool = False


@runtime_checkable
class TaskSource(Protocol):
    """A queue of jobs; every delivery received is settled exactly once."""

    def receive(self, timeout: float) -> Delivery | None:
        """The next delivery, or None if none came within ``timeout`` seconds."""

    def ack(self, delivery: Delivery) -> None:
        """The outcome is durable: remove the job from the queue."""

    def retry(
        self, delivery: Delivery, reason: str, pending_failure: FailureReport | None = None
    ) -> None:
        """Give the job back, to be delivered again with ``attempt + 1`` and the pending failure."""

    def park(self, delivery: Delivery, reason: str) -> None:
        """Move a poison message aside (never delivered again) with the reason."""

    def close(self) -> None:
        """Stop receiving; deliveries not settled go back to the queue."""
