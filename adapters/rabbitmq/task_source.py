"""TaskSource on RabbitMQ (pika), declared exactly as the backend declares its queue.

The connection lives on its own thread, which does nothing but I/O: it pumps
``process_data_events`` a few times a second, so heartbeats flow while a generation runs for
minutes on another thread. Deliveries are handed over through an in-process queue; settlements
and consumer changes come back through ``add_callback_threadsafe``.

The queue is the backend's (durable, no arguments), so the worker cannot give it a dead-letter
policy; it dead-letters by itself. A retried message is re-published, with publisher confirms,
to a rung of a ladder of delay queues ``<queue>.retry.<N>s`` (queues of ours whose TTL
dead-letters back to the main queue after N seconds; N = base * 4**k below the cap, then the
cap); a parked one to ``<queue>.parked``. Only then is the original acked; a copy the broker
refuses twice sends the original back to the queue as it is, after a delay (the retry's delay,
at least ``REFUSED_HANDBACK_SECONDS``), so a refusing broker does not turn it into a hot loop.
So does any other failure while publishing the copy: nothing of it may escape onto the I/O
thread, where it would tear the connection down and the broker would deliver the message again,
to fail the same way, forever. Waiting for a confirm happens on the I/O thread inside pika's
BlockingChannel, which keeps servicing the connection meanwhile.

The hold is the channel's prefetch, set with ``global_qos``: a change applies to the running
consumer at once and counts every delivery unsettled on the channel, whichever consumer got it.
Queues that refuse a global QoS (quorum queues: the broker closes the connection with 540
NOT_IMPLEMENTED, as it may when a vhost's default queue type made the backend's queue one) get a
per-consumer prefetch from the next connection on: it applies only to consumers created after
it, so a change of the hold re-creates the consumer, and the broker may then have sent up to the
new hold on top of the deliveries held when it changed (``receive()`` still hands out no more
than the hold).

Nothing a message carries may stop it reaching intake: headers pika cannot decode are replaced
by a marker (``adapters.rabbitmq.header_codec``), and whatever fails while reading the headers we
do decode hands the delivery on as a first one (attempt 0, nothing carried), so its body decides.
A copy whose headers pika cannot encode again (it reads a double of 2**63 or more as an int its
encoder refuses) carries the worker's headers only, and why the original's were dropped.
A message the broker keeps redelivering at the head of the queue would starve every consumer.

A delivery tag is only valid on the connection it came on: each connection has an epoch, and a
settlement of an earlier epoch is dropped (the broker delivers that message again).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import (
    AMQPChannelError,
    AMQPError,
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    NackError,
    UnroutableError,
)

from adapters.rabbitmq.header_codec import (
    ORIGINAL_HEADERS_DROPPED,
    UNDECODABLE_HEADERS,
    encoding_problem,
    install_tolerant_header_decoding,
)
from domain.errors import ErrorCode, FailureReport
from ports.task_source import Delivery, SourceUnavailable

log = logging.getLogger(__name__)

install_tolerant_header_decoding()

ATTEMPT_HEADER = "x-retry-count"
HANDBACK_HEADER = "x-handback-count"
PENDING_FAILURE_HEADER = "x-pending-failure"
"""Legacy: an earlier version carried a decided failure here; read, never written."""
REASON_HEADER = "x-reason"
PARK_REASON_HEADER = "x-park-reason"
DECIDED_OUTCOME_HEADER = "x-decided-outcome"
OUTCOME_TRUNCATED_HEADER = "x-decided-outcome-truncated"
"""Set, to the full size in bytes, when ``x-decided-outcome`` was cut to its limit."""
MAX_REASON_CHARS = 1000
MAX_OUTCOME_BYTES = 16 * 1024
REFUSED_HANDBACK_SECONDS = 5.0
"""The least wait before an original whose copy the broker refused twice goes back to the queue."""


class BrokerUnavailable(SourceUnavailable):
    """The broker cannot be reached at start-up."""


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
class _Tag:
    """Which connection a delivery came on: a tag is only valid on its own channel."""

    epoch: int
    delivery_tag: int
    properties: Any = field(compare=False)


class RabbitMQTaskSource:
    """Implements ``TaskSource``; start() connects, close() settles and disconnects.

    ``prefetch`` is the initial hold and its upper bound; ``retry_delay_seconds`` and
    ``retry_max_delay_seconds`` span the ladder of retry queues (5, 20, 80, 320, 600 by default).
    ``refused_republishes`` counts the deliveries handed back because their copy could not be
    published: the broker refused it twice, or publishing it failed (for metrics; written on the
    I/O thread only).
    """

    def __init__(
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
        heartbeat_seconds: int = 60,
        reconnect_max_seconds: float = 30.0,
        connection_name: str | None = None,
        depth_refresh_seconds: float = 5.0,
    ) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self._parameters = pika.ConnectionParameters(
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
        self.queue_name = queue_name
        self.parked_queue = f"{queue_name}.parked"
        self.retry_delays = retry_ladder(retry_delay_seconds, retry_max_delay_seconds)
        self._prefetch = prefetch
        self._reconnect_max = reconnect_max_seconds
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        # The gate guards the epoch and what the caller holds: tags handed out, not settled.
        self._gate = threading.Condition()
        self._epoch = 0
        self._hold = prefetch
        self._handed_out: set[int] = set()
        self._reserved = 0
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self._want_consume = True
        self._global_qos = True  # False, for good, once the queue refused it
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: BaseException | None = None
        self._depth: int | None = None
        self._depth_checked = 0.0
        self._depth_refresh = depth_refresh_seconds
        self.refused_republishes = 0

    def retry_queue_for(self, delay_seconds: float) -> str:
        """The retry queue for a delay: the largest rung not above it, at least the first."""
        rung = max((d for d in self.retry_delays if d <= delay_seconds), default=None)
        return f"{self.queue_name}.retry.{rung or self.retry_delays[0]}s"

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, *, consume: bool = True, timeout: float = 15.0) -> None:
        """Connect on the I/O thread; ``BrokerUnavailable`` if no connection within ``timeout``.

        With ``consume=False`` the queues are declared but no delivery arrives until
        ``start_consuming()``.
        """
        if self._thread is not None:
            if not self._stop.is_set():
                return
            self._thread.join(timeout=30)
        self._stop, self._last_error = threading.Event(), None
        self._want_consume = consume
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="rabbitmq-io", daemon=True
        )
        self._thread.start()
        if not self._connected.wait(timeout):
            self._stop.set()
            self._thread.join(timeout=10)
            error = self._last_error
            cause = f"{type(error).__name__}: {error}" if error else f"no answer in {timeout:g}s"
            raise BrokerUnavailable(
                f"RabbitMQ at {self._parameters.host}:{self._parameters.port} is not reachable:"
                f" {cause}"
            )

    @property
    def connected(self) -> bool:
        """Whether a connection to the broker is up right now."""
        return self._connected.is_set()

    @property
    def queue_depth(self) -> int | None:
        """Messages ready in the queue at the last passive declare (every few seconds, on the
        I/O thread); None while disconnected. Prefetched and in-flight jobs are not counted."""
        return self._depth if self._connected.is_set() else None

    def start_consuming(self) -> None:
        """Begin (or resume) taking deliveries."""
        self._want_consume = True
        self._call_soon(self._begin_consuming)

    def stop_consuming(self) -> None:
        """Take no more deliveries; those received but not handed out go back to the queue."""
        self._want_consume = False
        self._call_soon(self._cancel_consumer)

    def hold_at_most(self, count: int) -> None:
        """Hold at most ``count`` (capped by ``prefetch``) unsettled deliveries from now on;
        0 takes none. Kept across reconnects."""
        if count < 0:
            raise ValueError(f"hold_at_most needs a count >= 0, got {count}")
        count = min(count, self._prefetch)
        with self._gate:
            if count == self._hold:
                return
            lowered, self._hold = count < self._hold, count
            self._gate.notify_all()
        self._call_soon(lambda: self._apply_hold(lowered))

    def close(self, timeout: float = 30.0) -> None:
        """Settle what was scheduled, return unsettled deliveries to the queue, disconnect."""
        self._want_consume = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- TaskSource --------------------------------------------------------------------------

    def receive(self, timeout: float) -> Delivery | None:
        """The next delivery from the current connection, or None after ``timeout`` seconds;
        none is handed out while the caller holds as many as ``hold_at_most`` allows."""
        deadline = time.monotonic() + timeout
        while True:
            with self._gate:
                while len(self._handed_out) + self._reserved >= self._hold:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._gate.wait(remaining)
                self._reserved += 1
            try:
                delivery: Delivery | None = self._inbox.get(
                    timeout=max(0.0, deadline - time.monotonic())
                )
            except queue.Empty:
                delivery = None
            with self._gate:
                self._reserved -= 1
                self._gate.notify_all()
                if delivery is None:
                    return None
                tag = delivery.tag
                if isinstance(tag, _Tag) and tag.epoch == self._epoch:
                    self._handed_out.add(tag.delivery_tag)
                    return delivery
            # From a connection that died: the broker redelivers it on the new one.

    def still_held(self, delivery: Delivery) -> bool:
        """Whether the delivery's connection is the current one and open."""
        tag = delivery.tag
        with self._gate:
            current = isinstance(tag, _Tag) and tag.epoch == self._epoch
        return current and self._connected.is_set()

    def ack(self, delivery: Delivery) -> None:
        """Ack on the I/O thread (dropped if the delivery's connection is gone)."""
        self._settle(delivery, "ack", lambda channel, tag: channel.basic_ack(tag.delivery_tag))

    def retry(self, delivery: Delivery, *, reason: str, attempt: int, delay_seconds: float) -> None:
        """Re-publish to the retry queue of the delay's rung (confirmed), then ack the original."""
        headers = {
            ATTEMPT_HEADER: attempt,
            HANDBACK_HEADER: delivery.handbacks + 1,
            REASON_HEADER: str(reason)[:MAX_REASON_CHARS],
        }
        # Bounded by the ladder's cap: an unsettled delivery must not outlast the broker's
        # consumer timeout.
        hand_back_after = max(
            REFUSED_HANDBACK_SECONDS, min(float(delay_seconds), float(self.retry_delays[-1]))
        )
        self._republish(
            delivery, "retry", self.retry_queue_for(delay_seconds), headers, hand_back_after
        )

    def release(self, delivery: Delivery) -> None:
        """Nack with requeue on the I/O thread: the message goes back as it is."""
        self._settle(
            delivery,
            "release",
            lambda channel, tag: channel.basic_nack(tag.delivery_tag, requeue=True),
        )

    def park(
        self, delivery: Delivery, reason: str, *, outcome: Mapping[str, Any] | None = None
    ) -> None:
        """Re-publish to the parked queue with the reason and the decided outcome (confirmed),
        then ack the original."""
        headers: dict[str, Any] = {
            PARK_REASON_HEADER: str(reason)[:MAX_REASON_CHARS],
            "x-parked-at": datetime.now(timezone.utc).isoformat(),
            "x-original-queue": self.queue_name,
            ATTEMPT_HEADER: delivery.attempt,
            HANDBACK_HEADER: delivery.handbacks,
        }
        if outcome is not None:
            headers.update(_outcome_headers(outcome))
        self._republish(delivery, "park", self.parked_queue, headers, REFUSED_HANDBACK_SECONDS)

    # --- settling, from any thread -----------------------------------------------------------

    def _call_soon(self, callback: Callable[[], None]) -> bool:
        connection = self._connection
        if connection is None or not connection.is_open:
            return False
        try:
            connection.add_callback_threadsafe(callback)
            return True
        except (AMQPError, OSError):
            return False

    def _settle(
        self, delivery: Delivery, what: str, action: Callable[[BlockingChannel, _Tag], None]
    ) -> None:
        tag = delivery.tag
        if not isinstance(tag, _Tag):
            raise TypeError("not a delivery of this source")
        with self._gate:
            current = tag.epoch == self._epoch
            if current:
                self._handed_out.discard(tag.delivery_tag)
                self._gate.notify_all()

        def run() -> None:
            channel = self._channel
            if tag.epoch != self._epoch or channel is None or not channel.is_open:
                _log_dropped(what, tag)
                return
            action(channel, tag)

        if not current or not self._call_soon(run):
            _log_dropped(what, tag)

    def _republish(
        self,
        delivery: Delivery,
        what: str,
        target: str,
        headers: dict[str, Any],
        hand_back_after: float,
    ) -> None:
        """Publish a copy to ``target`` (confirmed), then ack the original. A copy refused twice
        sends the original back as it is ``hand_back_after`` seconds later: nacked at once, it
        would come straight back and be refused again, many times a second."""

        def action(channel: BlockingChannel, tag: _Tag) -> None:
            # Nothing may escape onto the I/O thread: the connection would be torn down, and the
            # broker would deliver the message again, to fail the same way, forever.
            published = False
            try:
                properties = _copy_properties(tag.properties, headers)
                self._publish_copy(channel, target, delivery.body, properties)
                published = True
                channel.basic_ack(tag.delivery_tag)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                if not published:
                    self._hand_back_later(tag, target, exc, hand_back_after)
                    return
                log.error(
                    "the copy of delivery %s is in %s, but the original could not be acked (%r);"
                    " the broker delivers it again",
                    tag.delivery_tag,
                    target,
                    exc,
                )

        self._settle(delivery, what, action)

    def _publish_copy(
        self, channel: BlockingChannel, target: str, body: bytes, properties: Any
    ) -> None:
        """Publish to ``target``, confirmed; a refused copy is published once more, after
        declaring the queues again (the target may have been deleted). Raises what the second
        refusal or anything else raised."""
        for last_try in (False, True):
            try:
                channel.basic_publish(
                    exchange="",
                    routing_key=target,
                    body=body,
                    properties=properties,
                    mandatory=True,
                )
                return
            except (UnroutableError, NackError) as exc:
                if last_try:
                    raise
                log.warning("the broker refused the copy for %s (%r); again", target, exc)
                self._declare(channel)

    def _hand_back_later(self, tag: _Tag, target: str, exc: Exception, delay: float) -> None:
        """On the I/O thread: nack the original with requeue after ``delay`` seconds (logged
        once, as an error)."""
        if isinstance(exc, (UnroutableError, NackError)):
            log.error(
                "the broker refused the copy of delivery %s for %s twice (%r); the message goes"
                " back as it is in %.0fs",
                tag.delivery_tag,
                target,
                exc,
                delay,
            )
        else:
            log.error(
                "the copy of delivery %s for %s could not be published (%s: %.300s); the message"
                " goes back as it is in %.0fs",
                tag.delivery_tag,
                target,
                type(exc).__name__,
                exc,
                delay,
                exc_info=exc,
            )
        self.refused_republishes += 1  # after the log: whoever sees the count finds the record

        def hand_back() -> None:
            channel = self._channel
            if tag.epoch != self._epoch or channel is None or not channel.is_open:
                _log_dropped("hand-back", tag)
                return
            channel.basic_nack(tag.delivery_tag, requeue=True)

        connection = self._connection
        if connection is not None:
            try:
                connection.call_later(delay, hand_back)
                return
            except Exception:  # pylint: disable=broad-exception-caught
                log.debug("scheduling the hand-back failed", exc_info=True)
        _log_dropped("hand-back", tag)

    # --- the I/O thread ----------------------------------------------------------------------

    def _begin_consuming(self) -> None:
        channel = self._channel
        if (
            self._want_consume
            and self._hold >= 1
            and self._consumer_tag is None
            and channel is not None
            and channel.is_open
        ):
            self._consumer_tag = channel.basic_consume(
                queue=self.queue_name, on_message_callback=self._on_message, auto_ack=False
            )

    def _cancel_consumer(self) -> None:
        channel, consumer_tag = self._channel, self._consumer_tag
        if channel is None or not channel.is_open:
            return
        if consumer_tag is not None:
            channel.basic_cancel(consumer_tag)
            self._consumer_tag = None
        self._return_inbox(channel)

    def _return_inbox(self, channel: BlockingChannel) -> None:
        """Deliveries received but not handed out go straight back to the queue."""
        while True:
            try:
                delivery = self._inbox.get_nowait()
            except queue.Empty:
                return
            tag = delivery.tag
            if isinstance(tag, _Tag) and tag.epoch == self._epoch:
                channel.basic_nack(tag.delivery_tag, requeue=True)

    def _return_surplus(self, channel: BlockingChannel) -> None:
        """Hand back the deliveries received but not handed out beyond what the hold allows
        next to those the caller holds; the first received stay, in order."""
        with self._gate:
            room = max(0, self._hold - len(self._handed_out))
        kept: list[Delivery] = []
        while True:
            try:
                delivery = self._inbox.get_nowait()
            except queue.Empty:
                break
            tag = delivery.tag
            if not isinstance(tag, _Tag) or tag.epoch != self._epoch:
                continue  # from a connection that died: the broker redelivers it
            if len(kept) < room:
                kept.append(delivery)
            else:
                channel.basic_nack(tag.delivery_tag, requeue=True)
        for delivery in kept:
            self._inbox.put(delivery)

    def _apply_hold(self, lowered: bool) -> None:
        """Set the prefetch; a hold of 0 cancels the consumer (a prefetch of 0 would mean no
        limit).

        A global prefetch applies to the running consumer at once and counts every unsettled
        delivery. A per-consumer one applies only to consumers created after it: the consumer
        is re-created (the deliveries it had stay valid: tags are the channel's), and what the
        inbox holds beyond the hold goes back."""
        channel = self._channel
        if channel is None or not channel.is_open:
            return  # applied by the next connection
        if self._hold == 0:
            self._cancel_consumer()
            return
        channel.basic_qos(prefetch_count=self._hold, global_qos=self._global_qos)
        if not self._global_qos and self._consumer_tag is not None:
            # pika nacks, with requeue, what arrives for the old consumer from now on. The new
            # one may be sent up to the hold on top of what the old one left in the inbox, so
            # the inbox is trimmed to the hold even when it was raised.
            channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
            lowered = True
        if lowered:
            self._return_surplus(channel)
        self._begin_consuming()

    def _on_consumer_cancelled(self, method_frame: Any) -> None:
        """The broker cancelled our consumer (the queue was deleted): declare, consume again."""
        if method_frame.method.consumer_tag != self._consumer_tag:
            return
        log.warning("the broker cancelled the consumer of %s; consuming again", self.queue_name)
        self._consumer_tag = None
        channel = self._channel
        if channel is not None and channel.is_open:
            self._declare(channel)
            self._begin_consuming()

    def _on_message(
        self,
        _channel: BlockingChannel,
        method: Any,
        properties: Any,
        body: bytes,
    ) -> None:
        """A pika callback: nothing may escape it (it would tear the connection down, and the
        broker would deliver the same message again, at the head of the queue, forever)."""
        received_at = time.monotonic()
        tag = _Tag(self._epoch, method.delivery_tag, properties)
        try:
            delivery = _read_delivery(body, properties, received_at, tag)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log.warning(
                "the headers of delivery %s cannot be read (%s: %.200s); taken as a first"
                " delivery with nothing carried",
                method.delivery_tag,
                type(exc).__name__,
                exc,
            )
            delivery = Delivery(body=body, received_at=received_at, tag=tag)
        self._inbox.put(delivery)

    def _connect(self) -> None:
        connection = pika.BlockingConnection(self._parameters)
        self._connection = connection  # closed by _drop_connection if the set-up fails
        channel = connection.channel()
        self._declare(channel)
        channel.confirm_delivery()
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.basic_qos(prefetch_count=max(1, self._hold), global_qos=self._global_qos)
        with self._gate:
            self._epoch += 1
            self._handed_out.clear()
        self._channel, self._consumer_tag = channel, None
        self._begin_consuming()

    def _declare(self, channel: BlockingChannel) -> None:
        # Exactly as the backend declares it: durable, no arguments.
        channel.queue_declare(queue=self.queue_name, durable=True)
        channel.queue_declare(queue=self.parked_queue, durable=True)
        for delay in self.retry_delays:
            channel.queue_declare(
                queue=self.retry_queue_for(delay),
                durable=True,
                arguments={
                    "x-message-ttl": delay * 1000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.queue_name,
                },
            )

    def _run(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                self._connect()
                backoff = 0.5
                self._connected.set()
                log.info("connected to RabbitMQ, queue %s", self.queue_name)
                while not stop.is_set():
                    self._connection.process_data_events(time_limit=0.2)  # type: ignore[union-attr]
                    if self._channel is None or not self._channel.is_open:
                        raise AMQPChannelError("the channel was closed")
                    self._refresh_depth()
                self._shutdown()
                return
            except Exception as exc:  # pylint: disable=broad-exception-caught
                # Any failure (not only AMQP's) must end in a reconnect, never a dead I/O thread.
                self._last_error = exc
                self._drop_connection()
                if self._global_qos and _refuses_global_qos(exc):
                    self._global_qos = False
                    log.warning(
                        "queue %s refuses a global QoS (%s); the hold is a per-consumer prefetch"
                        " from now on (a change of it re-creates the consumer); reconnecting",
                        self.queue_name,
                        exc,
                    )
                elif isinstance(exc, (AMQPError, OSError)):
                    log.warning(
                        "RabbitMQ connection lost (%r); reconnecting in %.1fs", exc, backoff
                    )
                else:
                    log.exception("RabbitMQ I/O thread failed; reconnecting in %.1fs", backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, self._reconnect_max)

    def _refresh_depth(self) -> None:
        """Count the ready messages with a passive declare, at most every few seconds."""
        channel = self._channel
        now = time.monotonic()
        if channel is None or now - self._depth_checked < self._depth_refresh:
            return
        self._depth_checked = now
        frame = channel.queue_declare(queue=self.queue_name, passive=True)
        self._depth = frame.method.message_count

    def _forget_deliveries(self) -> None:
        """Deliveries of the connection that ends are stale from now on."""
        with self._gate:
            self._epoch += 1
            self._handed_out.clear()
            self._gate.notify_all()

    def _drop_connection(self) -> None:
        """Forget a broken connection: its deliveries are stale from now on."""
        self._connected.clear()
        self._depth, self._depth_checked = None, 0.0
        self._forget_deliveries()
        connection = self._connection
        self._connection, self._channel, self._consumer_tag = None, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:  # pylint: disable=broad-exception-caught
                log.debug("closing the broken connection failed", exc_info=True)

    def _shutdown(self) -> None:
        """Run the settlements already scheduled, return the rest to the queue, close."""
        connection = self._connection
        if connection is None:
            return
        try:
            connection.process_data_events(time_limit=0)
            self._cancel_consumer()
            connection.process_data_events(time_limit=0)
            connection.close()
        except (AMQPError, OSError) as exc:
            log.warning("RabbitMQ connection closed uncleanly: %r", exc)
        finally:
            self._connected.clear()
            self._forget_deliveries()
            self._connection, self._channel, self._consumer_tag = None, None, None


def _log_dropped(what: str, tag: _Tag) -> None:
    log.warning(
        "%s of delivery %s dropped: its connection is gone; the broker delivers it again",
        what,
        tag.delivery_tag,
    )


def _refuses_global_qos(exc: BaseException) -> bool:
    """Whether the broker closed the connection (or channel) because the queue does not support
    a global QoS (quorum queues: 540 NOT_IMPLEMENTED)."""
    return (
        isinstance(exc, (ConnectionClosedByBroker, ChannelClosedByBroker))
        and exc.reply_code == 540
        and "global qos" in str(exc.reply_text).lower()
    )


def _read_delivery(body: bytes, properties: Any, received_at: float, tag: _Tag) -> Delivery:
    """A delivery with the counts and the failure its headers carry."""
    headers = getattr(properties, "headers", None) or {}
    attempt = _count(headers.get(ATTEMPT_HEADER))
    handbacks = _count(headers.get(HANDBACK_HEADER))
    return Delivery(
        body=body,
        attempt=attempt or 0,
        # Copies retried by an earlier version carry the attempt only; each was a hand-back.
        handbacks=handbacks if handbacks is not None else attempt or 0,
        received_at=received_at,
        tag=tag,
        carried_failure=_carried_failure(headers.get(PENDING_FAILURE_HEADER)),
    )


def _copy_properties(original: Any, headers: Mapping[str, Any]) -> pika.BasicProperties:
    """The original's properties for a re-published copy: persistent, headers merged.

    The marker of undecodable headers is not copied as if it were a header of the message: the
    copy says instead, in ``x-original-headers-dropped``, that the original's were lost and why
    (the copy's own headers decode, so it is an ordinary delivery from then on). So do headers
    that decoded but cannot be encoded again: publishing them would fail."""
    merged = dict(getattr(original, "headers", None) or {})
    merged.pop(PENDING_FAILURE_HEADER, None)
    undecodable = merged.pop(UNDECODABLE_HEADERS, None)
    if undecodable is not None:
        merged[ORIGINAL_HEADERS_DROPPED] = undecodable
    merged.update(headers)
    problem = encoding_problem(merged)
    if problem is not None:
        log.warning("the original's headers are not copied: %s", problem)
        merged = {ORIGINAL_HEADERS_DROPPED: problem, **headers}
    return pika.BasicProperties(
        content_type=getattr(original, "content_type", None) or "application/json",
        content_encoding=getattr(original, "content_encoding", None),
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=getattr(original, "message_id", None),
        correlation_id=getattr(original, "correlation_id", None),
        timestamp=getattr(original, "timestamp", None),
        type=getattr(original, "type", None),
        app_id=getattr(original, "app_id", None),
        headers=merged,
    )


def _outcome_headers(outcome: Mapping[str, Any]) -> dict[str, Any]:
    """``outcome`` as JSON text, cut to MAX_OUTCOME_BYTES (and then said so)."""
    try:
        text = json.dumps(dict(outcome), default=str, ensure_ascii=False)
    except (TypeError, ValueError):  # keys JSON cannot take, a circular reference
        text = json.dumps({"repr": repr(outcome)}, ensure_ascii=False)
    raw = text.encode()
    if len(raw) <= MAX_OUTCOME_BYTES:
        return {DECIDED_OUTCOME_HEADER: text}
    return {
        DECIDED_OUTCOME_HEADER: raw[:MAX_OUTCOME_BYTES].decode(errors="ignore"),
        OUTCOME_TRUNCATED_HEADER: len(raw),
    }


def _count(raw: object) -> int | None:
    """A non-negative integer header, or None."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    return None


def _carried_failure(raw: object) -> FailureReport | None:
    """The legacy ``x-pending-failure`` header, read strictly: anything else is ignored."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)  # type: ignore[arg-type]
        report = FailureReport(
            generation_id=data["generation_id"],
            code=ErrorCode(data["code"]),
            message=data["message"],
            retry_count=data["retry_count"],
            poison=data.get("poison", False),
        )
    # Anything: RecursionError from deeply nested JSON, an error of an odd header type...
    except Exception:  # pylint: disable=broad-exception-caught
        report = None
    if (
        report is None
        or _count(report.generation_id) is None
        or not isinstance(report.message, str)
        or _count(report.retry_count) is None
        or not isinstance(report.poison, bool)
    ):
        log.warning("unreadable %s header ignored: %.200r", PENDING_FAILURE_HEADER, raw)
        return None
    return report
