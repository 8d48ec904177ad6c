"""``RabbitMQTaskSource``: the TaskSource on pika, declared exactly as the backend declares it.

It puts together the I/O thread (``connection``), the deliveries handed out and the hold
(``inbox``), the queues (``queues``), the worker's headers (``delivery_headers``) and the
settlements (``settling``); every method here runs on the caller's thread.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

import pika

from adapters.rabbitmq.connection import ConnectionThread
from adapters.rabbitmq.delivery_headers import (
    overflow_headers,
    overflows,
    park_headers,
    retry_headers,
)
from adapters.rabbitmq.inbox import Inbox
from adapters.rabbitmq.queues import Queues, retry_ladder
from adapters.rabbitmq.settling import REFUSED_HANDBACK_SECONDS, Overflow, Settler
from ports.task_source import Delivery

log = logging.getLogger(__package__)  # one logger for the whole adapter: adapters.rabbitmq


class RabbitMQTaskSource:
    """Implements ``TaskSource``; start() connects, close() settles and disconnects.

    ``prefetch`` is the initial hold and its upper bound; ``retry_delay_seconds`` and
    ``retry_max_delay_seconds`` span the ladder of retry queues (5, 20, 80, 320, 600 by default).
    ``parked_max_messages`` (None or 0: unbounded) and ``parked_ttl_seconds`` (0: for ever)
    bound the parked queue; a message parked while it is full waits in the longest retry queue.
    ``refused_republishes`` counts the deliveries handed back because their copy could not be
    published: the broker refused it twice, or publishing it failed (for metrics; written on the
    I/O thread only).
    """

    def __init__(  # pylint: disable=too-many-locals; one keyword per setting
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str,
        vhost: str = "/",
        queue_name: str = "image_generation",
        prefetch: int = 10,
        retry_delay_seconds: int = 5,
        retry_max_delay_seconds: int = 600,
        parked_max_messages: int | None = 10_000,
        parked_ttl_seconds: int = 0,
        heartbeat_seconds: int = 60,
        reconnect_max_seconds: float = 30.0,
        connection_name: str | None = None,
        depth_refresh_seconds: float = 5.0,
    ) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        parameters = pika.ConnectionParameters(
            host=host,
            port=port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(user, password),
            heartbeat=heartbeat_seconds,
            blocked_connection_timeout=300,
            connection_attempts=1,
            socket_timeout=5,
            client_properties={
                "connection_name": connection_name
                or f"stylelicense-worker {socket.gethostname()} pid {os.getpid()}"
            },
        )
        self._queues = Queues(
            queue_name,
            retry_ladder(retry_delay_seconds, retry_max_delay_seconds),
            parked_max_messages=parked_max_messages,
            parked_ttl_seconds=parked_ttl_seconds,
        )
        self._prefetch = prefetch
        self._inbox = Inbox(hold=prefetch)
        self._io = ConnectionThread(
            parameters,
            self._queues,
            self._inbox,
            reconnect_max_seconds=reconnect_max_seconds,
            depth_refresh_seconds=depth_refresh_seconds,
        )
        self._settler = Settler(self._queues, self._inbox, self._io)
        self._io.on_overflowed = self._park_overflowed

    @property
    def queue_name(self) -> str:
        """The backend's queue."""
        return self._queues.name

    @property
    def parked_queue(self) -> str:
        """The queue parked messages go to."""
        return self._queues.parked

    @property
    def retry_delays(self) -> tuple[int, ...]:
        """The delays of the retry queues, in seconds, shortest first."""
        return self._queues.retry_delays

    @property
    def park_overflows(self) -> int:
        """Parked copies the full parked queue refused, sent to the longest retry queue."""
        return self._settler.overflows

    @property
    def parked_depth(self) -> int | None:
        """Messages ready in the parked queue at the last look (every few seconds, on the I/O
        thread); None while disconnected or while the queue is missing."""
        return self._io.parked_depth

    @property
    def refused_republishes(self) -> int:
        """Deliveries handed back because their copy could not be published."""
        return self._settler.refused_republishes

    def retry_queue_for(self, delay_seconds: float) -> str:
        """The retry queue for a delay: the largest rung not above it, at least the first."""
        return self._queues.retry_queue_for(delay_seconds)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, *, consume: bool = True, timeout: float = 15.0) -> None:
        """Connect on the I/O thread; ``BrokerUnavailable`` if no connection within ``timeout``.

        With ``consume=False`` the queues are declared but no delivery arrives until
        ``start_consuming()``.
        """
        self._io.start(consume=consume, timeout=timeout)

    @property
    def connected(self) -> bool:
        """Whether a connection to the broker is up right now."""
        return self._io.connected

    @property
    def queue_depth(self) -> int | None:
        """Messages ready in the queue at the last passive declare (every few seconds, on the
        I/O thread); None while disconnected. Prefetched and in-flight deliveries are not
        counted."""
        return self._io.queue_depth

    def start_consuming(self) -> None:
        """Begin (or resume) taking deliveries."""
        self._io.start_consuming()

    def stop_consuming(self) -> None:
        """Take no more deliveries; those received but not handed out go back to the queue."""
        self._io.stop_consuming()

    def hold_at_most(self, count: int) -> None:
        """Hold at most ``count`` (capped by ``prefetch``) unsettled deliveries from now on;
        0 takes none. Kept across reconnects."""
        if count < 0:
            raise ValueError(f"hold_at_most needs a count >= 0, got {count}")
        count = min(count, self._prefetch)
        previous = self._inbox.set_hold(count)
        if count == previous:
            return
        lowered = count < previous
        self._io.call_soon(lambda: self._io.apply_hold(lowered))

    def close(self, timeout: float = 30.0) -> None:
        """Settle what was scheduled, return unsettled deliveries to the queue, disconnect."""
        self._io.close(timeout)

    # --- TaskSource --------------------------------------------------------------------------

    def receive(self, timeout: float) -> Delivery | None:
        """The next delivery from the current connection, or None after ``timeout`` seconds;
        none is handed out while the caller holds as many as ``hold_at_most`` allows."""
        return self._inbox.receive(timeout)

    def still_held(self, delivery: Delivery) -> bool:
        """Whether the delivery's connection is the current one and open."""
        return self._inbox.is_current(delivery.tag) and self._io.connected

    def ack(self, delivery: Delivery) -> None:
        """Ack on the I/O thread (dropped if the delivery's connection is gone)."""
        self._settler.settle(
            delivery, "ack", lambda channel, tag: channel.basic_ack(tag.delivery_tag)
        )

    def retry(self, delivery: Delivery, *, reason: str, attempt: int, delay_seconds: float) -> None:
        """Re-publish to the retry queue of the delay's rung (confirmed), then ack the original."""
        headers = retry_headers(delivery, reason=reason, attempt=attempt)
        # Bounded by the ladder's cap: an unsettled delivery must not outlast the broker's
        # consumer timeout.
        hand_back_after = max(
            REFUSED_HANDBACK_SECONDS, min(float(delay_seconds), float(self.retry_delays[-1]))
        )
        self._settler.republish(
            delivery, "retry", self.retry_queue_for(delay_seconds), headers, hand_back_after
        )

    def release(self, delivery: Delivery) -> None:
        """Nack with requeue on the I/O thread: the message goes back as it is."""
        self._settler.settle(
            delivery,
            "release",
            lambda channel, tag: channel.basic_nack(tag.delivery_tag, requeue=True),
        )

    def _park_overflowed(self, delivery: Delivery) -> bool:
        """On the I/O thread: a copy that waited because the parked queue was full is parked
        now, with the headers of its park, as decided; it is not handed out, so it never runs
        again, and no outcome is told again. Still full: it waits once more. True: taken."""
        log.info(
            "a message that waited for room in %s (refused %s times) is parked now",
            self.parked_queue,
            overflows(delivery),
        )
        overflow = Overflow(self._queues.overflow_queue, overflow_headers(delivery, {}))
        self._settler.republish(
            delivery, "park", self.parked_queue, {}, REFUSED_HANDBACK_SECONDS, overflow
        )
        return True

    def park(
        self, delivery: Delivery, reason: str, *, outcome: Mapping[str, Any] | None = None
    ) -> None:
        """Re-publish to the parked queue with the reason and the decided outcome (confirmed),
        then ack the original. While the parked queue is full the copy waits in the longest
        retry queue instead, and is parked again when it comes back."""
        headers = park_headers(delivery, reason, self.queue_name, outcome)
        overflow = Overflow(self._queues.overflow_queue, overflow_headers(delivery, headers))
        self._settler.republish(
            delivery, "park", self.parked_queue, headers, REFUSED_HANDBACK_SECONDS, overflow
        )
