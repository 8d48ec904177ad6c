"""An in-memory TaskSource: the demo's queue, and a record of how each delivery was settled.

It behaves as the RabbitMQ source does where the domain can tell: a retried copy comes back
with the attempt and hand-back count the broker would carry, only after its delay (on an
injectable clock); a released message goes back to the front as it is; ``hold_at_most`` limits
the deliveries handed out and not settled; ``lose_connection`` plays a dropped connection
(settlements of the deliveries it held are dropped, their messages are delivered again).
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from domain.errors import FailureReport
from ports.task_source import Delivery

_POLL_SECONDS = 0.02
"""How often ``receive`` looks at an injected clock again while a retried copy is delayed."""


@dataclass(frozen=True)
class _Message:
    """A message as the queue holds it (a delivery is made from it when it is handed out)."""

    body: bytes
    attempt: int = 0
    handbacks: int = 0
    carried_failure: FailureReport | None = None


@dataclass(frozen=True)
class _Handle:
    """A delivery's tag: the connection it came on and its number on the source."""

    connection: int
    serial: int


class InMemoryTaskSource:
    """Implements ``TaskSource`` over a deque and records every settlement for tests.

    A delivery built by hand (its tag is not this source's) is treated as held on the current
    connection, so a test can pass one straight to the domain.
    """

    def __init__(
        self,
        messages: Iterable[bytes | str | Mapping[str, Any]] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        prefetch: int | None = None,
    ) -> None:
        self._clock = clock
        self._prefetch = prefetch
        self._hold = prefetch
        self._lock = threading.Condition()
        self._ready: deque[_Message] = deque()
        self._delayed: list[tuple[float, int, _Message]] = []
        self._serials = itertools.count(1)
        self._connection = 1
        self._held: dict[int, tuple[Delivery, _Message]] = {}
        self._settled: set[_Handle] = set()
        self._consuming = True
        self._closed = False
        self.acked: list[Delivery] = []
        self.retried: list[tuple[Delivery, str, int, float]] = []
        """(delivery, reason, attempt, delay_seconds) of each ``retry``."""
        self.released: list[Delivery] = []
        self.parked: list[tuple[Delivery, str, Mapping[str, Any] | None]] = []
        """(delivery, reason, outcome) of each ``park``."""
        self.holds: list[int] = []
        """The count of each ``hold_at_most`` call."""
        self.dropped: list[tuple[str, Delivery]] = []
        """Settlements ("ack", "retry", "release", "park") of deliveries whose connection was
        lost; they had no effect."""
        self.settled_twice: list[tuple[str, Delivery]] = []
        """Settlements of a delivery already settled (a defect of the caller); no effect."""
        for message in messages:
            self.put(message)

    # --- for tests and the demo ----------------------------------------------------------------

    def put(
        self,
        message: bytes | str | Mapping[str, Any],
        attempt: int = 0,
        *,
        handbacks: int = 0,
        carried_failure: FailureReport | None = None,
    ) -> None:
        """Enqueue a message at the back (a mapping is encoded as JSON, as the backend does)."""
        if isinstance(message, Mapping):
            body = json.dumps(message).encode()
        elif isinstance(message, str):
            body = message.encode()
        else:
            body = bytes(message)
        with self._lock:
            self._promote_due()  # copies already due were queued before this one
            self._ready.append(_Message(body, attempt, handbacks, carried_failure))
            self._lock.notify_all()

    def lose_connection(self) -> None:
        """Play a dropped connection: every delivery held goes stale and its message is
        delivered again, first, as a new delivery."""
        with self._lock:
            self._drop_held()
            self._lock.notify_all()

    def __len__(self) -> int:
        """Messages queued, delayed retries included (deliveries held are not counted)."""
        with self._lock:
            return len(self._ready) + len(self._delayed)

    # --- TaskSource --------------------------------------------------------------------------

    def start(self, *, consume: bool = True) -> None:
        """(Re)open the source; with ``consume=False`` nothing is handed out until
        ``start_consuming()``."""
        with self._lock:
            self._closed = False
            self._consuming = consume
            self._lock.notify_all()

    def start_consuming(self) -> None:
        """Begin (or resume) handing out deliveries."""
        with self._lock:
            self._consuming = True
            self._lock.notify_all()

    def stop_consuming(self) -> None:
        """Hand out no more deliveries (nothing is prefetched here, so nothing goes back)."""
        with self._lock:
            self._consuming = False

    @property
    def connected(self) -> bool:
        """True until ``close()``."""
        with self._lock:
            return not self._closed

    @property
    def queue_depth(self) -> int | None:
        """Messages ready to be handed out (delayed retries are not), None once closed."""
        with self._lock:
            if self._closed:
                return None
            self._promote_due()
            return len(self._ready)

    @property
    def parked_depth(self) -> int | None:
        """Messages parked so far, None once closed."""
        with self._lock:
            return None if self._closed else len(self.parked)

    def hold_at_most(self, count: int) -> None:
        """Hand out no more while ``count`` deliveries are held (capped by ``prefetch``)."""
        if count < 0:
            raise ValueError(f"hold_at_most needs a count >= 0, got {count}")
        with self._lock:
            self.holds.append(count)
            self._hold = count if self._prefetch is None else min(count, self._prefetch)
            self._lock.notify_all()

    def receive(self, timeout: float) -> Delivery | None:
        """The next visible message, waiting up to ``timeout`` seconds (of real time) for one
        to arrive, a delayed copy to become due on the clock, or a held delivery to settle."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed:
                    return None
                self._promote_due()
                if self._ready and self._consuming and self._may_hold_more():
                    return self._hand_out(self._ready.popleft())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if self._delayed:
                    due_in = max(0.0, self._delayed[0][0] - self._clock())
                    remaining = min(remaining, due_in, _POLL_SECONDS)
                self._lock.wait(remaining)

    def still_held(self, delivery: Delivery) -> bool:
        """Whether the delivery's connection is the current one (and the source is open)."""
        with self._lock:
            if self._closed:
                return False
            tag = delivery.tag
            return not isinstance(tag, _Handle) or tag.connection == self._connection

    def ack(self, delivery: Delivery) -> None:
        """Record the delivery as done; its message is gone."""
        with self._lock:
            if self._settle("ack", delivery) is not None:
                self.acked.append(delivery)

    def retry(self, delivery: Delivery, *, reason: str, attempt: int, delay_seconds: float) -> None:
        """Queue a copy with ``attempt`` and one more hand-back, visible after the delay."""
        with self._lock:
            message = self._settle("retry", delivery)
            if message is None:
                return
            self.retried.append((delivery, reason, attempt, delay_seconds))
            copy = _Message(message.body, attempt, message.handbacks + 1)
            due = self._clock() + max(0.0, delay_seconds)
            heapq.heappush(self._delayed, (due, next(self._serials), copy))
            self._lock.notify_all()

    def release(self, delivery: Delivery) -> None:
        """Put the message back at the front of the queue, as it is."""
        with self._lock:
            message = self._settle("release", delivery)
            if message is None:
                return
            self.released.append(delivery)
            self._ready.appendleft(message)
            self._lock.notify_all()

    def park(
        self, delivery: Delivery, reason: str, *, outcome: Mapping[str, Any] | None = None
    ) -> None:
        """Record the message as set aside, with its reason and decided outcome."""
        with self._lock:
            if self._settle("park", delivery) is not None:
                self.parked.append((delivery, reason, outcome))

    def close(self) -> None:
        """Stop handing out deliveries; those held go back to the queue (their settlements
        are dropped from now on)."""
        with self._lock:
            self._drop_held()
            self._closed = True
            self._lock.notify_all()

    # --- internals (called with the lock held) -----------------------------------------------

    def _may_hold_more(self) -> bool:
        return self._hold is None or len(self._held) < self._hold

    def _promote_due(self) -> None:
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            self._ready.append(heapq.heappop(self._delayed)[2])

    def _hand_out(self, message: _Message) -> Delivery:
        handle = _Handle(self._connection, next(self._serials))
        delivery = Delivery(
            body=message.body,
            attempt=message.attempt,
            handbacks=message.handbacks,
            received_at=self._clock(),
            tag=handle,
            carried_failure=message.carried_failure,
        )
        self._held[handle.serial] = (delivery, message)
        return delivery

    def _settle(self, kind: str, delivery: Delivery) -> _Message | None:
        """The message a settlement applies to, or None when it must have no effect."""
        tag = delivery.tag
        if not isinstance(tag, _Handle):
            return _Message(
                delivery.body, delivery.attempt, delivery.handbacks, delivery.carried_failure
            )
        if tag in self._settled:
            self.settled_twice.append((kind, delivery))
            return None
        held = self._held.pop(tag.serial, None) if tag.connection == self._connection else None
        if held is None:
            self.dropped.append((kind, delivery))
            return None
        self._settled.add(tag)
        self._lock.notify_all()  # a receive() waiting for the hold to fall may go on
        return held[1]

    def _drop_held(self) -> None:
        for _, message in reversed(list(self._held.values())):
            self._ready.appendleft(message)
        self._held.clear()
        self._connection += 1
