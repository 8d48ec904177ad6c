"""TaskSource on RabbitMQ (pika), declared exactly as the backend declares its queue.

The connection lives on its own thread, which does nothing but I/O: it pumps
``process_data_events`` a few times a second, so heartbeats flow while a generation runs for
minutes on another thread. Deliveries are handed over through an in-process queue; acks,
retries and parking come back through ``add_callback_threadsafe``.

Retries: the queue is the backend's (durable, no arguments), so the worker cannot give it a
dead-letter policy. A retried job is re-published, with publisher confirms, to
``<queue>.retry.<N>s`` (a queue of ours whose TTL dead-letters back to the main queue after N
seconds) with its attempt count (and any decided failure) in headers; only then is the
original acked. Poison messages are re-published to ``<queue>.parked`` with the reason in a
header, then acked. Waiting for those confirms happens on the I/O thread, inside pika's
BlockingChannel, which keeps servicing the connection (heartbeats included) while it waits; it
is one broker round trip per retried or parked job, never per generated one. When the
connection drops, deliveries not yet settled are simply redelivered by the broker to a new
connection; the use case's idempotency makes that harmless.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError, NackError, UnroutableError

from domain.errors import ErrorCode, FailureReport
from ports.task_source import Delivery

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-retry-count"
PENDING_FAILURE_HEADER = "x-pending-failure"
REASON_HEADER = "x-reason"
PARK_REASON_HEADER = "x-park-reason"


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached (start-up check)."""


@dataclass(frozen=True)
class _Tag:
    """Which connection a delivery came on: a tag is only valid on its own channel."""

    epoch: int
    delivery_tag: int
    properties: Any


class RabbitMQTaskSource:
    """Implements ``TaskSource``; start() connects, close() settles and disconnects."""

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
        heartbeat_seconds: int = 60,
        reconnect_max_seconds: float = 30.0,
        connection_name: str | None = None,
        depth_refresh_seconds: float = 5.0,
    ) -> None:
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
        self.retry_queue = f"{queue_name}.retry.{retry_delay_seconds}s"
        self._retry_delay_ms = retry_delay_seconds * 1000
        self._prefetch = prefetch
        self._reconnect_max = reconnect_max_seconds
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._epoch = 0
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self._want_consume = True
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first_error: BaseException | None = None
        self._depth: int | None = None
        self._depth_checked = 0.0
        self._depth_refresh = depth_refresh_seconds

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 15.0, *, consume: bool = True) -> None:
        """Connect on the I/O thread; BrokerUnavailable if no connection within ``timeout``.

        With ``consume=False`` the queues are declared but no delivery arrives until
        ``start_consuming()``.
        """
        if self._thread is not None:
            return
        self._want_consume = consume
        self._thread = threading.Thread(target=self._run, name="rabbitmq-io", daemon=True)
        self._thread.start()
        if not self._connected.wait(timeout):
            reason = self._first_error or "timed out"
            self._stop.set()
            raise BrokerUnavailable(
                f"RabbitMQ at {self._parameters.host}:{self._parameters.port} is not reachable:"
                f" {reason}"
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

    def _begin_consuming(self) -> None:
        channel = self._channel
        if self._want_consume and self._consumer_tag is None and channel is not None:
            self._consumer_tag = channel.basic_consume(
                queue=self.queue_name, on_message_callback=self._on_message, auto_ack=False
            )

    def stop_consuming(self) -> None:
        """Take no more deliveries; those received but not handed out go back to the queue."""
        self._want_consume = False
        self._call_soon(self._cancel_consumer)

    def close(self, timeout: float = 30.0) -> None:
        """Settle what was scheduled, return unsettled deliveries to the queue, disconnect."""
        self._want_consume = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- TaskSource --------------------------------------------------------------------------

    def receive(self, timeout: float) -> Delivery | None:
        """The next delivery from the current connection, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                delivery = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if isinstance(delivery.tag, _Tag) and delivery.tag.epoch == self._epoch:
                return delivery
            # From a connection that died: the broker redelivers it on the new one.

    def ack(self, delivery: Delivery) -> None:
        """Ack on the I/O thread (dropped if the delivery's connection is gone)."""
        self._settle(delivery, lambda channel, tag: channel.basic_ack(tag.delivery_tag))

    def retry(
        self, delivery: Delivery, reason: str, pending_failure: FailureReport | None = None
    ) -> None:
        """Re-publish to the retry queue with attempt + 1 (confirmed), then ack the original."""
        headers = {
            ATTEMPT_HEADER: delivery.attempt + 1,
            REASON_HEADER: reason[:1000],
        }
        if pending_failure is not None:
            headers[PENDING_FAILURE_HEADER] = json.dumps(
                {**asdict(pending_failure), "code": pending_failure.code.value}
            )
        self._republish(delivery, self.retry_queue, headers)

    def park(self, delivery: Delivery, reason: str) -> None:
        """Re-publish to the parked queue with the reason (confirmed), then ack the original."""
        headers = {
            PARK_REASON_HEADER: reason[:1000],
            "x-parked-at": datetime.now(timezone.utc).isoformat(),
            "x-original-queue": self.queue_name,
            ATTEMPT_HEADER: delivery.attempt,
        }
        self._republish(delivery, self.parked_queue, headers)

    # --- the I/O thread ----------------------------------------------------------------------

    def _call_soon(self, callback: Callable[[], None]) -> None:
        connection = self._connection
        if connection is None or not connection.is_open:
            return
        try:
            connection.add_callback_threadsafe(callback)
        except AMQPError:
            log.warning("broker connection closed; the delivery will be redelivered")

    def _settle(self, delivery: Delivery, action: Callable[[BlockingChannel, _Tag], None]) -> None:
        tag = delivery.tag
        if not isinstance(tag, _Tag):
            raise TypeError("not a delivery of this source")

        def run() -> None:
            channel = self._channel
            if tag.epoch != self._epoch or channel is None or not channel.is_open:
                log.warning("delivery %s outlived its connection; redelivered", tag.delivery_tag)
                return
            action(channel, tag)

        self._call_soon(run)

    def _republish(self, delivery: Delivery, target: str, headers: dict[str, Any]) -> None:
        def action(channel: BlockingChannel, tag: _Tag) -> None:
            original = tag.properties
            merged = dict(getattr(original, "headers", None) or {})
            merged.pop(PENDING_FAILURE_HEADER, None)
            merged.update(headers)
            properties = pika.BasicProperties(
                content_type=getattr(original, "content_type", None) or "application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=getattr(original, "message_id", None),
                correlation_id=getattr(original, "correlation_id", None),
                headers=merged,
            )
            for last_try in (False, True):
                try:
                    channel.basic_publish(
                        exchange="",
                        routing_key=target,
                        body=delivery.body,
                        properties=properties,
                        mandatory=True,
                    )
                    break
                except (UnroutableError, NackError) as exc:
                    if last_try:
                        # Never an instant requeue (it would loop): the delivery stays
                        # unsettled and returns to the queue when this connection closes.
                        log.error("could not re-publish to %s (%s); left unsettled", target, exc)
                        return
                    self._declare(channel)  # the target queue may have been deleted
            channel.basic_ack(tag.delivery_tag)

        self._settle(delivery, action)

    def _cancel_consumer(self) -> None:
        channel, consumer_tag = self._channel, self._consumer_tag
        if channel is not None and channel.is_open and consumer_tag is not None:
            channel.basic_cancel(consumer_tag)
            self._consumer_tag = None
        # Deliveries received but not handed out yet go straight back to the queue.
        while True:
            try:
                delivery = self._inbox.get_nowait()
            except queue.Empty:
                break
            tag = delivery.tag
            if isinstance(tag, _Tag) and tag.epoch == self._epoch and channel and channel.is_open:
                channel.basic_nack(tag.delivery_tag, requeue=True)

    def _on_message(
        self,
        _channel: BlockingChannel,
        method: Any,
        properties: Any,
        body: bytes,
    ) -> None:
        headers = getattr(properties, "headers", None) or {}
        attempt = headers.get(ATTEMPT_HEADER, 0)
        delivery = Delivery(
            body=body,
            attempt=attempt if isinstance(attempt, int) and attempt >= 0 else 0,
            tag=_Tag(self._epoch, method.delivery_tag, properties),
            pending_failure=_pending_failure(headers.get(PENDING_FAILURE_HEADER)),
            redelivered=bool(method.redelivered),
        )
        self._inbox.put(delivery)

    def _connect(self) -> None:
        connection = pika.BlockingConnection(self._parameters)
        channel = connection.channel()
        self._declare(channel)
        channel.confirm_delivery()
        channel.basic_qos(prefetch_count=self._prefetch)
        self._epoch += 1
        self._connection, self._channel = connection, channel
        self._consumer_tag = None
        self._begin_consuming()

    def _declare(self, channel: BlockingChannel) -> None:
        # Exactly as the backend declares it: durable, no arguments.
        channel.queue_declare(queue=self.queue_name, durable=True)
        channel.queue_declare(queue=self.parked_queue, durable=True)
        channel.queue_declare(
            queue=self.retry_queue,
            durable=True,
            arguments={
                "x-message-ttl": self._retry_delay_ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue_name,
            },
        )

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._connect()
                backoff = 0.5
                self._connected.set()
                log.info("connected to RabbitMQ, consuming %s", self.queue_name)
                while not self._stop.is_set():
                    self._connection.process_data_events(time_limit=0.2)  # type: ignore[union-attr]
                    self._refresh_depth()
                self._shutdown()
                return
            except Exception as exc:  # pylint: disable=broad-exception-caught
                # Any failure (not only AMQP's) must end in a reconnect, never a dead I/O thread.
                self._first_error = self._first_error or exc
                self._drop_connection()
                if isinstance(exc, (AMQPError, OSError)):
                    log.warning(
                        "RabbitMQ connection lost (%s); reconnecting in %.1fs", exc, backoff
                    )
                else:
                    log.exception("RabbitMQ I/O thread failed; reconnecting in %.1fs", backoff)
                self._stop.wait(backoff)
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

    def _drop_connection(self) -> None:
        """Forget a broken connection: its deliveries are stale from now on."""
        self._connected.clear()
        self._depth, self._depth_checked = None, 0.0
        self._epoch += 1  # receive() stops handing out deliveries of the dead connection
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
            log.warning("RabbitMQ connection closed uncleanly: %s", exc)
        finally:
            self._connected.clear()
            self._connection, self._channel = None, None


def _pending_failure(raw: object) -> FailureReport | None:
    if not isinstance(raw, (str, bytes)):
        return None
    try:
        data = json.loads(raw)
        return FailureReport(
            generation_id=int(data["generation_id"]),
            code=ErrorCode(data["code"]),
            message=str(data["message"]),
            retry_count=int(data["retry_count"]),
            poison=bool(data.get("poison", False)),
        )
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable %s header ignored", PENDING_FAILURE_HEADER)
        return None
