"""The source's queues: the backend's, the parked one, the ladder of retry queues; declared.

The parked queue is bounded by its arguments (``x-max-length`` with ``x-overflow:
reject-publish``, ``x-message-ttl``). RabbitMQ refuses a declare whose arguments differ from those
of the queue that exists (406 PRECONDITION_FAILED, and it closes the channel), so the parked queue
is declared on a channel of its own: a queue declared by an earlier version (no arguments) or
with other bounds is then used as it is, and the channel that consumes never sees the refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

PRECONDITION_FAILED = 406


def retry_ladder(base_seconds: int, max_seconds: int) -> tuple[int, ...]:
    """The delays of the retry queues: base * 4**k while below the cap, then the cap."""
    if base_seconds < 1 or max_seconds < base_seconds:
        raise ValueError(
            f"retry delays need 1 <= base <= max, got base {base_seconds}s, max {max_seconds}s"
        )
    rungs, delay = [], base_seconds
    while delay < max_seconds:
        rungs.append(delay)
        delay *= 4
    rungs.append(max_seconds)
    return tuple(rungs)


@dataclass(frozen=True)
class Queues:
    """The backend's queue ``name`` (durable, no arguments: the worker cannot give it a
    dead-letter policy), ``<name>.parked``, and a retry queue ``<name>.retry.<N>s`` per delay of
    ``retry_delays``, whose TTL dead-letters back to the backend's queue after N seconds.

    ``parked_max_messages`` and ``parked_ttl_seconds`` (0: none) bound the parked queue; a message
    the full queue refuses goes to ``overflow_queue``, the longest retry queue, and comes back."""

    name: str
    retry_delays: tuple[int, ...]
    parked_max_messages: int | None = None
    parked_ttl_seconds: int = 0

    @property
    def parked(self) -> str:
        """The queue parked messages go to."""
        return f"{self.name}.parked"

    @property
    def parked_arguments(self) -> dict[str, Any]:
        """The arguments of the parked queue: its bounds."""
        return parked_arguments(self.parked_max_messages, self.parked_ttl_seconds)

    @property
    def overflow_queue(self) -> str:
        """Where a message waits when the parked queue is full: the longest retry queue."""
        return self.retry_queue_for(self.retry_delays[-1])

    def retry_queue_for(self, delay_seconds: float) -> str:
        """The retry queue for a delay: the largest rung not above it, at least the first."""
        rung = max((d for d in self.retry_delays if d <= delay_seconds), default=None)
        return f"{self.name}.retry.{rung or self.retry_delays[0]}s"

    def declare(self, channel: BlockingChannel) -> bool:
        """Declare every queue; the backend's exactly as the backend declares it. Whether the
        parked queue has the bounds of ``parked_arguments`` (False: it existed with others)."""
        channel.queue_declare(queue=self.name, durable=True)
        bounded = self.declare_parked(channel.connection)
        for delay in self.retry_delays:
            channel.queue_declare(
                queue=self.retry_queue_for(delay),
                durable=True,
                arguments={
                    "x-message-ttl": delay * 1000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.name,
                },
            )
        return bounded

    def declare_parked(self, connection: Any) -> bool:
        """Declare the parked queue with its bounds, on a channel of its own opened on
        ``connection`` (a ``pika.BlockingConnection``). False when a queue of that name exists
        with other arguments (declared by an earlier version, or with other bounds): it is used
        as it is, and nothing else is affected."""
        return unless_refused(
            connection,
            lambda channel: channel.queue_declare(
                queue=self.parked, durable=True, arguments=self.parked_arguments
            ),
        )


def unless_refused(connection: Any, action: Callable[[BlockingChannel], object]) -> bool:
    """Run ``action`` on a channel of its own opened on ``connection``; False when the broker
    refuses it with 406 PRECONDITION_FAILED (which closes that channel only)."""
    channel = connection.channel()
    try:
        action(channel)
    except ChannelClosedByBroker as exc:
        if exc.reply_code != PRECONDITION_FAILED:
            raise
        return False
    channel.close()
    return True


def parked_arguments(max_messages: int | None, ttl_seconds: int) -> dict[str, Any]:
    """The arguments that bound a parked queue: at most ``max_messages`` (None or 0: no limit; a
    message published beyond it is refused, never the oldest dropped), each kept ``ttl_seconds``
    (0: for ever). Neither: no arguments, the declare of versions before the bounds."""
    arguments: dict[str, Any] = {}
    if max_messages is not None and max_messages < 0:
        raise ValueError(f"the parked queue's length limit must be >= 0, got {max_messages}")
    if max_messages:
        arguments["x-max-length"] = max_messages
        arguments["x-overflow"] = "reject-publish"
    if ttl_seconds < 0:
        raise ValueError(f"the parked messages' TTL must be >= 0 seconds, got {ttl_seconds}")
    if ttl_seconds:
        arguments["x-message-ttl"] = ttl_seconds * 1000
    return arguments
