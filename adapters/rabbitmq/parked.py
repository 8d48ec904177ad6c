"""The parked queue for an operator: read its messages without taking them, replay or purge some,
and give it the bounds of the settings (docs/parked-messages.md, guarantees 4 to 7).

Messages are read with ``basic.get`` without ack and held on one channel: those neither replayed
nor purged go back in their places when it closes, and the broker returns everything held when
the process dies or its connection drops. Every copy (a replay, a move while migrating) is
published mandatory with publisher confirms, and its original acked only after the confirm.
Declares that may be refused (404, 406 close the channel) are made on throwaway channels.
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
from pika.exceptions import AMQPError, ChannelClosedByBroker, NackError

from adapters.rabbitmq.delivery_headers import (
    ATTEMPT_HEADER,
    DECIDED_OUTCOME_HEADER,
    HANDBACK_HEADER,
    OUTCOME_TRUNCATED_HEADER,
    OVERFLOW_HEADER,
    PARK_REASON_HEADER,
    PENDING_FAILURE_HEADER,
    REASON_HEADER,
)
from adapters.rabbitmq.header_codec import (
    ORIGINAL_HEADERS_DROPPED,
    UNDECODABLE_HEADERS,
    encoding_problem,
    install_tolerant_header_decoding,
)
from adapters.rabbitmq.queues import Queues, unless_refused

PARKED_AT_HEADER = "x-parked-at"
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


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


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
        return _count(self.headers.get(ATTEMPT_HEADER))

    @property
    def handbacks(self) -> int | None:
        """Its ``x-handback-count``."""
        return _count(self.headers.get(HANDBACK_HEADER))

    @property
    def replay_count(self) -> int:
        """How many times it was replayed before (``x-replay-count``, 0 when absent)."""
        return _count(self.headers.get(REPLAY_COUNT_HEADER)) or 0

    @property
    def decided_outcome(self) -> str | None:
        """The decided outcome, JSON text as parked (perhaps cut: see ``outcome_full_size``)."""
        return header_text(self.headers.get(DECIDED_OUTCOME_HEADER))

    @property
    def outcome_full_size(self) -> int | None:
        """The size in bytes of the decided outcome before it was cut, when it was."""
        return _count(self.headers.get(OUTCOME_TRUNCATED_HEADER))

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
    kept = {name: value for name, value in headers.items() if name not in WORKER_HEADERS}
    replay = {
        REPLAYED_AT_HEADER: replayed_at.isoformat(),
        REPLAY_COUNT_HEADER: (_count(headers.get(REPLAY_COUNT_HEADER)) or 0) + 1,
    }
    undecodable = kept.pop(UNDECODABLE_HEADERS, None)
    if undecodable is not None:
        kept[ORIGINAL_HEADERS_DROPPED] = undecodable
    kept.update(replay)
    problem = encoding_problem(kept)
    if problem is not None:
        kept = {ORIGINAL_HEADERS_DROPPED: problem, **replay}
    return kept


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


@dataclass(frozen=True)
class MigrationState:
    """Where a migration stands: the parked and holding queues' depths (None: missing), and
    whether the parked queue has the bounds of the settings."""

    parked: int | None
    bounded: bool
    holding: int | None

    @property
    def done(self) -> bool:
        """Nothing to do: the parked queue is bounded (or missing) and nothing is held."""
        return (self.parked is None or self.bounded) and self.holding is None


@dataclass(frozen=True)
class MigrationResult:
    """What ``migrate`` did: messages moved to the holding queue and back, and those the
    bounded parked queue refused, left in the holding queue."""

    moved_out: int
    moved_back: int
    left_in_holding: int


class MigrationConflict(Exception):
    """The parked queue was declared again with other arguments while it was being migrated."""


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
    def holding_queue(self) -> str:
        """Where ``migrate`` keeps the parked messages while it re-declares the parked queue."""
        return f"{self.queues.parked}.migrating"

    def open(self) -> None:
        """Connect (raises one of ``BROKER_ERRORS`` when the broker cannot be reached)."""
        install_tolerant_header_decoding()
        self._connection = pika.BlockingConnection(self._parameters)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()

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
        channel = self._conn().channel()
        try:
            depth = channel.queue_declare(queue or self.queues.parked, passive=True)
        except ChannelClosedByBroker as exc:
            if exc.reply_code != NOT_FOUND:
                raise
            return None
        channel.close()
        return int(depth.method.message_count)

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
            probe = self._conn().channel()
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
        self._conn().process_data_events(time_limit=seconds)

    def migration_state(self) -> MigrationState:
        """Where a migration stands; changes nothing."""
        parked = self.count()
        holding = self.count(self.holding_queue)
        return MigrationState(
            parked=parked, bounded=parked is not None and self._has_bounds(), holding=holding
        )

    def migrate(self) -> MigrationResult:
        """Give the parked queue the bounds of the settings without losing a message: move its
        messages to the holding queue, delete it only while it is empty, declare it with the
        bounds, move them back. A message the bounded queue refuses stops the move back and
        stays in the holding queue; run it again to finish from there."""
        state = self.migration_state()
        if state.done:
            return MigrationResult(0, 0, 0)
        moved_out = 0
        if state.parked is not None and not state.bounded:
            self._conn().channel().queue_declare(self.holding_queue, durable=True)
            while True:
                moved_out += self._move(self.queues.parked, self.holding_queue)
                if self._delete_if_empty(self.queues.parked):
                    break
        if not self.queues.declare_parked(self._conn()):
            raise MigrationConflict(
                f"{self.queues.parked} was declared again with other arguments meanwhile (a worker"
                f" of an earlier version?); the messages wait in {self.holding_queue}"
            )
        moved_back = self._move(self.holding_queue, self.queues.parked)
        left = self.count(self.holding_queue) or 0
        if left == 0:
            self._delete_if_empty(self.holding_queue)
        return MigrationResult(moved_out, moved_back, left)

    def _has_bounds(self) -> bool:
        """Whether the existing parked queue has the bounds (declaring it with them is a no-op
        then; a 406 otherwise, on a throwaway channel)."""
        return self.queues.declare_parked(self._conn())

    def _move(self, source: str, target: str) -> int:
        """Move messages one at a time, each confirmed in ``target`` before it is acked in
        ``source``, until ``source`` is empty or ``target`` refuses one (it stays in
        ``source``, in its place). How many moved."""
        moved = 0
        channel = self._chan()
        while True:
            method, properties, body = channel.basic_get(source, auto_ack=False)
            if method is None:
                return moved
            try:
                channel.basic_publish("", target, body, properties, mandatory=True)
            except NackError:  # the bounded queue is full
                channel.basic_nack(method.delivery_tag, requeue=True)
                return moved
            channel.basic_ack(method.delivery_tag)
            moved += 1

    def _delete_if_empty(self, queue: str) -> bool:
        """Delete ``queue`` unless it holds a message (then False)."""
        return unless_refused(
            self._conn(), lambda channel: channel.queue_delete(queue, if_empty=True)
        )

    def _settle(self, message: ParkedMessage) -> None:
        self._chan().basic_ack(message.delivery_tag)

    def _conn(self) -> pika.BlockingConnection:
        if self._connection is None:
            raise RuntimeError("the parked queue is not open")
        return self._connection

    def _chan(self) -> BlockingChannel:
        if self._channel is None:
            raise RuntimeError("the parked queue is not open")
        return self._channel
