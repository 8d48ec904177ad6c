"""The source's queues: the backend's, the parked one, the ladder of retry queues; declared."""

from __future__ import annotations

from dataclasses import dataclass

from pika.adapters.blocking_connection import BlockingChannel


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
    ``retry_delays``, whose TTL dead-letters back to the backend's queue after N seconds."""

    name: str
    retry_delays: tuple[int, ...]

    @property
    def parked(self) -> str:
        """The queue parked messages go to."""
        return f"{self.name}.parked"

    def retry_queue_for(self, delay_seconds: float) -> str:
        """The retry queue for a delay: the largest rung not above it, at least the first."""
        rung = max((d for d in self.retry_delays if d <= delay_seconds), default=None)
        return f"{self.name}.retry.{rung or self.retry_delays[0]}s"

    def declare(self, channel: BlockingChannel) -> None:
        """Declare every queue; the backend's exactly as the backend declares it."""
        channel.queue_declare(queue=self.name, durable=True)
        channel.queue_declare(queue=self.parked, durable=True)
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
