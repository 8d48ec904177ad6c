"""Deliveries on their way from the I/O thread to the caller: the in-process queue and the hold.

A delivery tag is only valid on the connection it came on: each connection has an epoch, and a
delivery of an earlier epoch is stale (the broker delivers that message again). The caller
holds the deliveries handed out and not settled; no more are handed out while it holds as many
as the hold allows.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel

from ports.task_source import Delivery


@dataclass(frozen=True)
class Tag:
    """Which connection a delivery came on: a tag is only valid on its own channel."""

    epoch: int
    delivery_tag: int
    properties: Any = field(compare=False)


class Inbox:
    """The deliveries received and not yet handed out, and what the caller holds.

    ``put``, ``next_epoch`` and the ``return_*`` methods run on the I/O thread, ``receive`` and
    ``settled`` on the caller's. ``epoch`` and ``hold`` are read on the I/O thread without the
    gate, as ints.
    """

    def __init__(self, hold: int) -> None:
        self._deliveries: queue.Queue[Delivery] = queue.Queue()
        # The gate guards the epoch and what the caller holds: tags handed out, not settled.
        self._gate = threading.Condition()
        self._epoch = 0
        self._hold = hold
        self._handed_out: set[int] = set()
        self._reserved = 0

    @property
    def epoch(self) -> int:
        """The epoch of the current connection."""
        return self._epoch

    @property
    def hold(self) -> int:
        """How many unsettled deliveries the caller may hold."""
        return self._hold

    def put(self, delivery: Delivery) -> None:
        """A delivery received on the current connection."""
        self._deliveries.put(delivery)

    def receive(self, timeout: float) -> Delivery | None:
        """The next delivery from the current connection, or None after ``timeout`` seconds;
        none is handed out while the caller holds as many as the hold allows."""
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
                delivery: Delivery | None = self._deliveries.get(
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
                if isinstance(tag, Tag) and tag.epoch == self._epoch:
                    self._handed_out.add(tag.delivery_tag)
                    return delivery
            # From a connection that died: the broker redelivers it on the new one.

    def is_current(self, tag: object) -> bool:
        """Whether ``tag`` is a tag of the current connection."""
        with self._gate:
            return isinstance(tag, Tag) and tag.epoch == self._epoch

    def settled(self, tag: Tag) -> bool:
        """The caller holds the delivery no more; whether it came on the current connection."""
        with self._gate:
            current = tag.epoch == self._epoch
            if current:
                self._handed_out.discard(tag.delivery_tag)
                self._gate.notify_all()
        return current

    def set_hold(self, count: int) -> int:
        """Hold at most ``count`` from now on; the hold it replaces."""
        with self._gate:
            previous = self._hold
            if count != previous:
                self._hold = count
                self._gate.notify_all()
        return previous

    def next_epoch(self) -> None:
        """A new connection, or none: the deliveries of the one before are stale from now on."""
        with self._gate:
            self._epoch += 1
            self._handed_out.clear()
            self._gate.notify_all()

    def return_all(self, channel: BlockingChannel) -> None:
        """Deliveries received but not handed out go straight back to the queue."""
        while True:
            try:
                delivery = self._deliveries.get_nowait()
            except queue.Empty:
                return
            tag = delivery.tag
            if isinstance(tag, Tag) and tag.epoch == self._epoch:
                channel.basic_nack(tag.delivery_tag, requeue=True)

    def return_surplus(self, channel: BlockingChannel) -> None:
        """Hand back the deliveries received but not handed out beyond what the hold allows
        next to those the caller holds; the first received stay, in order."""
        with self._gate:
            room = max(0, self._hold - len(self._handed_out))
        kept: list[Delivery] = []
        while True:
            try:
                delivery = self._deliveries.get_nowait()
            except queue.Empty:
                break
            tag = delivery.tag
            if not isinstance(tag, Tag) or tag.epoch != self._epoch:
                continue  # from a connection that died: the broker redelivers it
            if len(kept) < room:
                kept.append(delivery)
            else:
                channel.basic_nack(tag.delivery_tag, requeue=True)
        for delivery in kept:
            self._deliveries.put(delivery)
