"""Settling deliveries on the I/O thread: ack, nack, and the confirmed copy of a retry or park.

A retried message is re-published, with publisher confirms, to its retry queue; a parked one to
the parked queue. Only then is the original acked; a copy the broker refuses twice sends the
original back to the queue as it is, after a delay (the retry's delay, at least
``REFUSED_HANDBACK_SECONDS``), so a refusing broker does not turn it into a hot loop. So does
any other failure while publishing the copy: nothing of it may escape onto the I/O thread, where
it would tear the connection down and the broker would deliver the message again, to fail the
same way, forever. Waiting for a confirm happens on the I/O thread inside pika's
BlockingChannel, which keeps servicing the connection meanwhile.

A parked copy the broker refuses twice (the parked queue is full: it is declared with
``x-overflow: reject-publish``) is not handed back at once: a copy goes, confirmed, to the
overflow queue (the longest retry queue), and the original is acked then. When the copy comes
back after that delay, the source parks it again without handing it out, so a full parked queue
costs one publish per message and delay, never a lost message, a held slot or a second run.

A settlement of a delivery whose connection is gone is dropped (and logged): the broker
delivers that message again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import NackError, UnroutableError

from adapters.rabbitmq.connection import ConnectionThread
from adapters.rabbitmq.delivery_headers import copy_properties
from adapters.rabbitmq.inbox import Inbox, Tag
from adapters.rabbitmq.queues import Queues
from ports.task_source import Delivery

log = logging.getLogger(__package__)  # one logger for the whole adapter: adapters.rabbitmq

REFUSED_HANDBACK_SECONDS = 5.0
"""The least wait before an original whose copy the broker refused twice goes back to the queue."""


@dataclass(frozen=True)
class Overflow:
    """Where a copy its target refuses goes instead, with which headers."""

    queue: str
    headers: dict[str, Any]


class Settler:
    """Carries out settlements, from any thread, on the I/O thread's channel.

    ``refused_republishes`` counts the deliveries handed back because their copy could not be
    published: the broker refused it twice, or publishing it failed; ``overflows`` the copies
    sent to their overflow queue instead (for metrics; both written on the I/O thread only).
    """

    def __init__(self, queues: Queues, inbox: Inbox, io: ConnectionThread) -> None:
        self._queues = queues
        self._inbox = inbox
        self._io = io
        self.refused_republishes = 0
        self.overflows = 0

    def settle(
        self, delivery: Delivery, what: str, action: Callable[[BlockingChannel, Tag], None]
    ) -> None:
        """Run ``action`` on the I/O thread, unless the delivery's connection is gone by then;
        ``what`` names the settlement in the log."""
        tag = delivery.tag
        if not isinstance(tag, Tag):
            raise TypeError("not a delivery of this source")
        current = self._inbox.settled(tag)

        def run() -> None:
            channel = self._io.channel
            if tag.epoch != self._inbox.epoch or channel is None or not channel.is_open:
                _log_dropped(what, tag)
                return
            action(channel, tag)

        if not current or not self._io.call_soon(run):
            _log_dropped(what, tag)

    def republish(
        self,
        delivery: Delivery,
        what: str,
        target: str,
        headers: dict[str, Any],
        hand_back_after: float,
        overflow: Overflow | None = None,
    ) -> None:
        """Publish a copy to ``target`` (confirmed), then ack the original. A copy refused twice
        goes to ``overflow`` when one is given; otherwise, or when that fails too, the original
        goes back as it is ``hand_back_after`` seconds later: nacked at once, it would come
        straight back and be refused again, many times a second."""

        def action(channel: BlockingChannel, tag: Tag) -> None:
            # Nothing may escape onto the I/O thread: the connection would be torn down, and the
            # broker would deliver the message again, to fail the same way, forever.
            published = False
            try:
                properties = copy_properties(tag.properties, headers)
                try:
                    self._publish_copy(channel, target, delivery.body, properties)
                except NackError as refused:
                    if overflow is None:
                        raise
                    self._overflow(channel, tag, delivery.body, target, overflow, refused)
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

        self.settle(delivery, what, action)

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
                self._queues.declare(channel)

    def _overflow(
        self,
        channel: BlockingChannel,
        tag: Tag,
        body: bytes,
        target: str,
        overflow: Overflow,
        refused: NackError,
    ) -> None:
        """Publish the copy to the overflow queue instead of ``target``, which refused it twice;
        raises what publishing it raised."""
        self._publish_copy(
            channel, overflow.queue, body, copy_properties(tag.properties, overflow.headers)
        )
        self.overflows += 1
        log.error(
            "%s refused the copy of delivery %s twice (%r): it is full; the message waits in %s"
            " and is parked again when it comes back (RABBITMQ_PARKED_MAX_MESSAGES;"
            " python -m app parked)",
            target,
            tag.delivery_tag,
            refused,
            overflow.queue,
        )

    def _hand_back_later(self, tag: Tag, target: str, exc: Exception, delay: float) -> None:
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
            channel = self._io.channel
            if tag.epoch != self._inbox.epoch or channel is None or not channel.is_open:
                _log_dropped("hand-back", tag)
                return
            channel.basic_nack(tag.delivery_tag, requeue=True)

        try:
            if self._io.call_later(delay, hand_back):
                return
        except Exception:  # pylint: disable=broad-exception-caught
            log.debug("scheduling the hand-back failed", exc_info=True)
        _log_dropped("hand-back", tag)


def _log_dropped(what: str, tag: Tag) -> None:
    log.warning(
        "%s of delivery %s dropped: its connection is gone; the broker delivers it again",
        what,
        tag.delivery_tag,
    )
