"""The connection to RabbitMQ on its own I/O thread: connect, consume, hold, reconnect, close.

The thread does nothing but I/O: it pumps ``process_data_events`` a few times a second, so
heartbeats flow while a generation runs for minutes on another thread. Deliveries go to the
``Inbox``; settlements and consumer changes come back through ``call_soon``
(``add_callback_threadsafe``). Any failure on the thread ends in a reconnect, with a back-off,
never in a dead thread; each connection starts a new epoch of the inbox.

The hold is the channel's prefetch, set with ``global_qos``: a change applies to the running
consumer at once and counts every delivery unsettled on the channel, whichever consumer got it.
Queues that refuse a global QoS (quorum queues: the broker closes the connection with 540
NOT_IMPLEMENTED, as it may when a vhost's default queue type made the backend's queue one) get a
per-consumer prefetch from the next connection on: it applies only to consumers created after
it, so a change of the hold re-creates the consumer, and the broker may then have sent up to the
new hold on top of the deliveries held when it changed (``receive()`` still hands out no more
than the hold).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import (
    AMQPChannelError,
    AMQPError,
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
)

from adapters.rabbitmq.delivery_headers import overflows, read_delivery
from adapters.rabbitmq.header_codec import install_tolerant_header_decoding
from adapters.rabbitmq.inbox import Inbox, Tag
from adapters.rabbitmq.queues import Queues
from ports.task_source import Delivery, SourceUnavailable

log = logging.getLogger(__package__)  # one logger for the whole adapter: adapters.rabbitmq

install_tolerant_header_decoding()


class BrokerUnavailable(SourceUnavailable):
    """The broker cannot be reached at start-up."""


class ConnectionThread:
    """The I/O thread and the connection, channel and consumer it keeps up.

    ``start()`` and ``close()`` run on the caller's thread; ``call_soon`` and ``call_later``
    schedule work on the I/O thread, where everything else runs.
    """

    def __init__(
        self,
        parameters: pika.ConnectionParameters,
        queues: Queues,
        inbox: Inbox,
        *,
        reconnect_max_seconds: float,
        depth_refresh_seconds: float,
    ) -> None:
        self._parameters = parameters
        self._queues = queues
        self._inbox = inbox
        self._reconnect_max = reconnect_max_seconds
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
        self._parked_depth: int | None = None
        self._side: BlockingChannel | None = None  # for looks that may fail: never consumes
        self._depth_checked = 0.0
        self._depth_refresh = depth_refresh_seconds
        self.on_overflowed: Callable[[Delivery], bool] = _not_parked
        """Called on the I/O thread with a delivery that waited for room in the parked queue
        (its park was decided: it does not run again); True when it took it, so it is not
        handed out."""

    # --- from the caller's thread ------------------------------------------------------------

    def start(self, *, consume: bool, timeout: float) -> None:
        """Connect on the I/O thread; ``BrokerUnavailable`` if no connection within ``timeout``."""
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
        """Messages ready in the queue at the last passive declare; None while disconnected."""
        return self._depth if self._connected.is_set() else None

    @property
    def parked_depth(self) -> int | None:
        """Messages ready in the parked queue at the last look; None while disconnected or
        while the queue is missing."""
        return self._parked_depth if self._connected.is_set() else None

    @property
    def channel(self) -> BlockingChannel | None:
        """The current channel (use it on the I/O thread only), None between connections."""
        return self._channel

    def start_consuming(self) -> None:
        """Begin (or resume) taking deliveries."""
        self._want_consume = True
        self.call_soon(self._begin_consuming)

    def stop_consuming(self) -> None:
        """Take no more deliveries; those received but not handed out go back to the queue."""
        self._want_consume = False
        self.call_soon(self._cancel_consumer)

    def close(self, timeout: float) -> None:
        """Run the settlements scheduled, return unsettled deliveries to the queue, disconnect."""
        self._want_consume = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the I/O thread; False when there is no connection to run it."""
        connection = self._connection
        if connection is None or not connection.is_open:
            return False
        try:
            connection.add_callback_threadsafe(callback)
            return True
        except (AMQPError, OSError):
            return False

    # --- on the I/O thread -------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the I/O thread ``delay`` seconds from now; False when there is no
        connection (what pika raises while scheduling it propagates)."""
        connection = self._connection
        if connection is None:
            return False
        connection.call_later(delay, callback)
        return True

    def apply_hold(self, lowered: bool) -> None:
        """Set the prefetch to the inbox's hold; a hold of 0 cancels the consumer (a prefetch of
        0 would mean no limit).

        A global prefetch applies to the running consumer at once and counts every unsettled
        delivery. A per-consumer one applies only to consumers created after it: the consumer
        is re-created (the deliveries it had stay valid: tags are the channel's), and what the
        inbox holds beyond the hold goes back."""
        channel = self._channel
        if channel is None or not channel.is_open:
            return  # applied by the next connection
        if self._inbox.hold == 0:
            self._cancel_consumer()
            return
        channel.basic_qos(prefetch_count=self._inbox.hold, global_qos=self._global_qos)
        if not self._global_qos and self._consumer_tag is not None:
            # pika nacks, with requeue, what arrives for the old consumer from now on. The new
            # one may be sent up to the hold on top of what the old one left in the inbox, so
            # the inbox is trimmed to the hold even when it was raised.
            channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
            lowered = True
        if lowered:
            self._inbox.return_surplus(channel)
        self._begin_consuming()

    def _begin_consuming(self) -> None:
        channel = self._channel
        if (
            self._want_consume
            and self._inbox.hold >= 1
            and self._consumer_tag is None
            and channel is not None
            and channel.is_open
        ):
            self._consumer_tag = channel.basic_consume(
                queue=self._queues.name, on_message_callback=self._on_message, auto_ack=False
            )

    def _cancel_consumer(self) -> None:
        channel, consumer_tag = self._channel, self._consumer_tag
        if channel is None or not channel.is_open:
            return
        if consumer_tag is not None:
            channel.basic_cancel(consumer_tag)
            self._consumer_tag = None
        self._inbox.return_all(channel)

    def _on_consumer_cancelled(self, method_frame: Any) -> None:
        """The broker cancelled our consumer (the queue was deleted): declare, consume again."""
        if method_frame.method.consumer_tag != self._consumer_tag:
            return
        log.warning("the broker cancelled the consumer of %s; consuming again", self._queues.name)
        self._consumer_tag = None
        channel = self._channel
        if channel is not None and channel.is_open:
            self._queues.declare(channel)
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
        tag = Tag(self._inbox.epoch, method.delivery_tag, properties)
        try:
            delivery = read_delivery(body, properties, received_at, tag)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log.warning(
                "the headers of delivery %s cannot be read (%s: %.200s); taken as a first"
                " delivery with nothing carried",
                method.delivery_tag,
                type(exc).__name__,
                exc,
            )
            delivery = Delivery(body=body, received_at=received_at, tag=tag)
        if self._parks_now(delivery):
            return
        self._inbox.put(delivery)

    def _parks_now(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` waited for room in the parked queue and is parked now (by
        ``on_overflowed``); a failure to do so hands it out instead."""
        try:
            return overflows(delivery) is not None and self.on_overflowed(delivery)
        except Exception:  # pylint: disable=broad-exception-caught
            log.exception("parking a delivery that waited for room failed; it is handed out")
            return False

    def _connect(self) -> None:
        connection = pika.BlockingConnection(self._parameters)
        self._connection = connection  # closed by _drop_connection if the set-up fails
        channel = connection.channel()
        if not self._queues.declare(channel):
            log.warning(
                "the parked queue %s exists with other arguments than RABBITMQ_PARKED_MAX_MESSAGES"
                " and RABBITMQ_PARKED_TTL_SECONDS ask for (%s); it is used as it is. To give it"
                " them, stop every worker and run `python -m app parked migrate`"
                " (docs/parked-messages.md)",
                self._queues.parked,
                self._queues.parked_arguments,
            )
        channel.confirm_delivery()
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.basic_qos(prefetch_count=max(1, self._inbox.hold), global_qos=self._global_qos)
        self._inbox.next_epoch()
        self._channel, self._consumer_tag = channel, None
        self._begin_consuming()

    def _run(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                self._connect()
                backoff = 0.5
                self._connected.set()
                log.info("connected to RabbitMQ, queue %s", self._queues.name)
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
                        self._queues.name,
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
        """Count the ready messages with a passive declare, at most every few seconds: the job
        queue's on the consuming channel, the parked queue's on a side channel (an operator may
        delete it; the broker closes a channel that declares a missing queue)."""
        channel = self._channel
        now = time.monotonic()
        if channel is None or now - self._depth_checked < self._depth_refresh:
            return
        self._depth_checked = now
        frame = channel.queue_declare(queue=self._queues.name, passive=True)
        self._depth = frame.method.message_count
        self._parked_depth = self._look_at_parked()

    def _look_at_parked(self) -> int | None:
        """The parked queue's ready messages, None when it is missing."""
        side = self._side
        if side is None or not side.is_open:
            side = self._side = self._connection.channel()  # type: ignore[union-attr]
        try:
            return side.queue_declare(queue=self._queues.parked, passive=True).method.message_count
        except ChannelClosedByBroker:
            self._side = None
            return None

    def _drop_connection(self) -> None:
        """Forget a broken connection: its deliveries are stale from now on."""
        self._connected.clear()
        self._depth, self._parked_depth, self._depth_checked = None, None, 0.0
        self._side = None
        self._inbox.next_epoch()
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
            self._inbox.next_epoch()
            self._connection, self._channel, self._consumer_tag = None, None, None
            self._side = None


def _not_parked(_delivery: Delivery) -> bool:
    """No one parks deliveries that waited for room: they are handed out."""
    return False


def _refuses_global_qos(exc: BaseException) -> bool:
    """Whether the broker closed the connection (or channel) because the queue does not support
    a global QoS (quorum queues: 540 NOT_IMPLEMENTED)."""
    return (
        isinstance(exc, (ConnectionClosedByBroker, ChannelClosedByBroker))
        and exc.reply_code == 540
        and "global qos" in str(exc.reply_text).lower()
    )
