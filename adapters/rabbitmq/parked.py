"""The parked queue for an operator: read its messages without taking them, replay or purge some,
one session at a time (docs/parked-messages.md, guarantees 4 to 7).

Messages are read with ``basic.get`` without ack and held on one channel: those neither replayed
nor purged go back in their places when it closes, and the broker returns everything held when
the process dies or its connection drops. Every copy (a replay, a move while migrating) is
published mandatory with publisher confirms, and its original acked only after the confirm.
Declares that may be refused (404, 405, 406 close the channel) are made on throwaway channels.

A session holds ``<queue>.parked.lock``, an exclusive queue of its connection, from ``open()`` to
``close()``: a second session is refused, so no command deletes or empties the parked queue while
another holds some of its messages unacked (a delete ``if_empty`` counts ready messages only). The
broker deletes the lock when the connection closes, however it closes (``kill -9`` included).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError, ChannelClosedByBroker

from adapters.rabbitmq.delivery_headers import (
    ATTEMPT_HEADER,
    DECIDED_OUTCOME_HEADER,
    HANDBACK_HEADER,
    MAX_COUNT,
    OUTCOME_TRUNCATED_HEADER,
    OVERFLOW_HEADER,
    PARK_REASON_HEADER,
    PARKED_AT_HEADER,
    PENDING_FAILURE_HEADER,
    REASON_HEADER,
    carried_headers,
    header_count,
)
from adapters.rabbitmq.header_codec import install_tolerant_header_decoding
from adapters.rabbitmq.queues import Queues

ORIGINAL_QUEUE_HEADER = "x-original-queue"
REPLAYED_AT_HEADER = "x-replayed-at"
REPLAY_COUNT_HEADER = "x-replay-count"
WORKER_HEADERS = frozenset(
    {
        ATTEMPT_HEADER,
        HANDBACK_HEADER,
        REASON_HEADER,
        PENDING_FAILURE_HEADER,
        PARK_REASON_HEADER,
        PARKED_AT_HEADER,
        ORIGINAL_QUEUE_HEADER,
        DECIDED_OUTCOME_HEADER,
        OUTCOME_TRUNCATED_HEADER,
        OVERFLOW_HEADER,
    }
)
"""The headers the worker sets on its copies: a replayed message starts without them."""
COPIED_PROPERTIES = (
    "content_type",
    "content_encoding",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)
"""The properties a replayed copy keeps (all but ``delivery_mode``, always persistent, and the
headers)."""
ID_LENGTH = 12
NOT_FOUND = 404
RESOURCE_LOCKED = 405
BROKER_ERRORS = (AMQPError, OSError)
"""What a failing or unreachable broker raises here."""


def message_id(parked_at: str, body: bytes) -> str:
    """The id of a parked copy: 12 hex digits of sha256 over its ``x-parked-at``, NUL, its body.
    Two copies share one only when the same body was parked at the same instant."""
    digest = hashlib.sha256(parked_at.encode("utf-8", "surrogatepass") + b"\0" + body)
    return digest.hexdigest()[:ID_LENGTH]


def header_text(value: Any) -> str | None:
    """A header's value as text (bytes decoded, anything else ``str``); None when absent."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass(frozen=True)
class ParkedMessage:
    """One parked copy as ``basic.get`` returned it; ``delivery_tag`` settles it."""

    id: str
    body: bytes
    properties: pika.BasicProperties
    delivery_tag: int

    @classmethod
    def read(
        cls, body: bytes, properties: pika.BasicProperties, delivery_tag: int
    ) -> ParkedMessage:
        """The message, its id derived from its ``x-parked-at`` and body."""
        headers = properties.headers or {}
        parked_at = header_text(headers.get(PARKED_AT_HEADER)) or ""
        return cls(message_id(parked_at, body), body, properties, delivery_tag)

    @property
    def headers(self) -> dict[str, Any]:
        """Every header, as delivered."""
        return dict(self.properties.headers or {})

    @property
    def property_values(self) -> dict[str, Any]:
        """The properties that are set, headers aside."""
        names = ("delivery_mode", *COPIED_PROPERTIES)
        values = {name: getattr(self.properties, name, None) for name in names}
        return {name: value for name, value in values.items() if value is not None}

    @property
    def parked_at(self) -> str | None:
        """When the worker parked it (ISO 8601), as its header says."""
        return header_text(self.headers.get(PARKED_AT_HEADER))

    @property
    def reason(self) -> str | None:
        """Why it was parked."""
        return header_text(self.headers.get(PARK_REASON_HEADER))

    @property
    def original_queue(self) -> str | None:
        """The queue it was taken from."""
        return header_text(self.headers.get(ORIGINAL_QUEUE_HEADER))

    @property
    def attempts(self) -> int | None:
        """Its ``x-retry-count``."""
        return header_count(self.headers.get(ATTEMPT_HEADER))

    @property
    def handbacks(self) -> int | None:
        """Its ``x-handback-count``."""
        return header_count(self.headers.get(HANDBACK_HEADER))

    @property
    def replay_count(self) -> int:
        """How many times it was replayed before (``x-replay-count``, 0 when absent)."""
        return header_count(self.headers.get(REPLAY_COUNT_HEADER)) or 0

    @property
    def decided_outcome(self) -> str | None:
        """The decided outcome, JSON text as parked (perhaps cut: see ``outcome_full_size``)."""
        return header_text(self.headers.get(DECIDED_OUTCOME_HEADER))

    @property
    def outcome_full_size(self) -> int | None:
        """The size in bytes of the decided outcome before it was cut, when it was."""
        return header_count(self.headers.get(OUTCOME_TRUNCATED_HEADER))

    @property
    def generation_id(self) -> int | None:
        """``data.generation_id`` of a JSON body, when it is an integer."""
        data = self._data().get("data")
        value = data.get("generation_id") if isinstance(data, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def task_id(self) -> str | None:
        """``task_id`` of a JSON body, when it is text."""
        value = self._data().get("task_id")
        return value if isinstance(value, str) else None

    def _data(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
            return {}
        return data if isinstance(data, dict) else {}


def replay_headers(headers: Mapping[str, Any], replayed_at: datetime) -> dict[str, Any]:
    """The headers of a replayed copy: the original's without the worker's own, with when it
    was replayed and how many times (the previous count + 1). Headers that could not be decoded
    or cannot be encoded again are left off, and ``x-original-headers-dropped`` says why."""
    replay = {
        REPLAYED_AT_HEADER: replayed_at.isoformat(),
        REPLAY_COUNT_HEADER: min(
            (header_count(headers.get(REPLAY_COUNT_HEADER)) or 0) + 1, MAX_COUNT
        ),
    }
    return carried_headers(headers, WORKER_HEADERS, replay)


def replay_properties(
    properties: pika.BasicProperties, replayed_at: datetime
) -> pika.BasicProperties:
    """The original's properties, persistent, with the headers of ``replay_headers``."""
    copied = {name: getattr(properties, name, None) for name in COPIED_PROPERTIES}
    return pika.BasicProperties(
        **copied,
        delivery_mode=pika.DeliveryMode.Persistent,
        headers=replay_headers(properties.headers or {}, replayed_at),
    )


class ParkedQueueBusy(Exception):
    """Another session holds the lock of the parked queue: it may hold parked messages."""


class ParkedQueue:
    """``<queue>.parked`` on one connection; ``open()`` connects, ``close()`` gives back every
    message held and neither replayed nor purged."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str,
        vhost: str,
        queues: Queues,
        timeout: float = 10.0,
        heartbeat: int = 60,
    ) -> None:
        self.queues = queues
        self._parameters = pika.ConnectionParameters(
            host=host,
            port=port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(user, password),
            connection_attempts=1,
            socket_timeout=timeout,
            blocked_connection_timeout=timeout,
            heartbeat=heartbeat,
            client_properties={"connection_name": f"stylelicense parked {os.getpid()}"},
        )
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._job_queue_declared = False

    @property
    def parameters(self) -> pika.ConnectionParameters:
        """How it connects (a benchmark opens a plain connection beside it the same way)."""
        return self._parameters

    @property
    def lock_queue(self) -> str:
        """The exclusive queue a session holds while it runs."""
        return f"{self.queues.parked}.lock"

    @property
    def connection(self) -> pika.BlockingConnection:
        """The session's connection (``open()`` first)."""
        if self._connection is None:
            raise RuntimeError("the parked queue is not open")
        return self._connection

    def open(self) -> None:
        """Connect and take the session's lock: ``ParkedQueueBusy`` when another session holds
        it, one of ``BROKER_ERRORS`` when the broker cannot be reached."""
        install_tolerant_header_decoding()
        self._connection = pika.BlockingConnection(self._parameters)
        try:
            self._lock()
        except (ParkedQueueBusy, *BROKER_ERRORS):
            self.close()
            raise
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()

    def _lock(self) -> None:
        channel = self.connection.channel()
        try:
            channel.queue_declare(self.lock_queue, exclusive=True, auto_delete=True)
        except ChannelClosedByBroker as exc:
            if exc.reply_code != RESOURCE_LOCKED:
                raise
            raise ParkedQueueBusy(
                f"another `python -m app parked` command is running on {self.queues.parked}"
                " (only one at a time: it may hold parked messages)"
            ) from exc
        channel.close()

    def close(self) -> None:
        """Give back what is held, then disconnect; quiet when the connection is gone."""
        try:
            self.release()
        finally:
            if self._connection is not None and self._connection.is_open:
                try:
                    self._connection.close()
                except BROKER_ERRORS:
                    pass
            self._connection = self._channel = None

    def __enter__(self) -> ParkedQueue:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def count(self, queue: str | None = None) -> int | None:
        """The messages ready in ``queue`` (the parked queue by default); None when it does
        not exist. Never creates it."""
        declared = self._passive_declare(queue or self.queues.parked)
        return None if declared is None else int(declared.message_count)

    def consumers(self, queue: str) -> int | None:
        """The consumers of ``queue``; None when it does not exist. Never creates it."""
        declared = self._passive_declare(queue)
        return None if declared is None else int(declared.consumer_count)

    def _passive_declare(self, queue: str) -> Any:
        """The broker's ``Queue.DeclareOk`` for ``queue`` (throwaway channel); None on 404."""
        channel = self.connection.channel()
        try:
            declared = channel.queue_declare(queue, passive=True)
        except ChannelClosedByBroker as exc:
            if exc.reply_code != NOT_FOUND:
                raise
            return None
        channel.close()
        return declared.method

    def scan(self, limit: int | None = None) -> list[ParkedMessage]:
        """Take and hold the parked messages, at most ``limit`` and at most as many as were
        parked now (one parked again meanwhile is not taken), oldest first. They stay in the
        queue's hands: ``release()`` (or a dying process) gives them back in their places."""
        available = self.count() or 0
        wanted = available if limit is None else min(limit, available)
        taken: list[ParkedMessage] = []
        while len(taken) < wanted:
            method, properties, body = self._chan().basic_get(self.queues.parked, auto_ack=False)
            if method is None:  # expired meanwhile, or taken by someone else
                break
            taken.append(ParkedMessage.read(body, properties, method.delivery_tag))
        return taken

    def replay(self, message: ParkedMessage) -> None:
        """Publish ``message`` to the job queue (declared as the backend declares it) and, once
        the broker confirmed the copy, ack it here."""
        if not self._job_queue_declared:  # once: a declare per message made 10 000 slow
            probe = self.connection.channel()
            probe.queue_declare(self.queues.name, durable=True)  # the backend's: no arguments
            probe.close()
            self._job_queue_declared = True
        self._chan().basic_publish(
            exchange="",
            routing_key=self.queues.name,
            body=message.body,
            properties=replay_properties(message.properties, datetime.now(timezone.utc)),
            mandatory=True,
        )
        self._settle(message)

    def purge(self, message: ParkedMessage) -> None:
        """Remove ``message`` from the parked queue (ack it)."""
        self._settle(message)

    def release(self) -> None:
        """Give back every message held and not settled, in their places."""
        if self._channel is not None and self._channel.is_open:
            try:
                self._channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            except BROKER_ERRORS:
                pass  # a connection that is gone gave them back already

    def keep_alive(self, seconds: float) -> None:
        """Serve the connection (heartbeats) for ``seconds``, e.g. while a person answers."""
        self.connection.process_data_events(time_limit=seconds)

    def _settle(self, message: ParkedMessage) -> None:
        self._chan().basic_ack(message.delivery_tag)

    def _chan(self) -> BlockingChannel:
        if self._channel is None:
            raise RuntimeError("the parked queue is not open")
        return self._channel
