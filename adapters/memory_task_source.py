"""An in-memory TaskSource: the demo's queue, and a record of how each delivery was settled."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from domain.errors import FailureReport
from ports.task_source import Delivery


class InMemoryTaskSource:
    """Implements ``TaskSource`` over a deque; ``retry`` puts the job back with ``attempt + 1``."""

    def __init__(self, messages: Iterable[bytes | str | Mapping[str, Any]] = ()) -> None:
        self._queue: deque[Delivery] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.acked: list[Delivery] = []
        self.retried: list[tuple[Delivery, str]] = []
        self.parked: list[tuple[Delivery, str]] = []
        for message in messages:
            self.put(message)

    def put(
        self,
        message: bytes | str | Mapping[str, Any],
        attempt: int = 0,
        *,
        redelivered: bool = False,
    ) -> None:
        """Enqueue a message (a dict is encoded as JSON, as the backend does); ``redelivered``
        plays a broker's redelivery of a message whose first delivery was never settled."""
        if isinstance(message, Mapping):
            body = json.dumps(message).encode()
        elif isinstance(message, str):
            body = message.encode()
        else:
            body = bytes(message)
        with self._ready:
            self._queue.append(Delivery(body=body, attempt=attempt, redelivered=redelivered))
            self._ready.notify()

    def receive(self, timeout: float) -> Delivery | None:
        """The next delivery, waiting up to ``timeout`` seconds."""
        with self._ready:
            if not self._queue and not self._closed:
                self._ready.wait(timeout)
            if self._closed or not self._queue:
                return None
            return self._queue.popleft()

    def ack(self, delivery: Delivery) -> None:
        """Record the delivery as done."""
        with self._ready:
            self.acked.append(delivery)

    def retry(
        self, delivery: Delivery, reason: str, pending_failure: FailureReport | None = None
    ) -> None:
        """Put the job back at the end of the queue, one attempt further."""
        with self._ready:
            self.retried.append((delivery, reason))
            self._queue.append(
                Delivery(
                    body=delivery.body,
                    attempt=delivery.attempt + 1,
                    pending_failure=pending_failure,
                )
            )
            self._ready.notify()

    def park(self, delivery: Delivery, reason: str) -> None:
        """Set the message aside with its reason."""
        with self._ready:
            self.parked.append((delivery, reason))

    def close(self) -> None:
        """Stop handing out deliveries."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def __len__(self) -> int:
        with self._ready:
            return len(self._queue)
