"""Give the parked queue the arguments of the settings, with every worker stopped.

The procedure: docs/parked-messages.md, "Migrating a parked queue declared without bounds".

RabbitMQ cannot change a queue's arguments: the parked queue is emptied into a holding queue,
deleted, declared again and filled back, each message confirmed in its target before it is acked
in its source. Deleting a queue that workers publish to cannot be made safe (a park routed to it
as the delete runs is confirmed to the worker and dropped), so the migration refuses while the job
queue has a consumer, at the start and again before every delete of the parked queue. Another
``parked`` session holding parked messages unacked is excluded by the session lock of
``ParkedQueue``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pika.exceptions import NackError

from adapters.rabbitmq.parked import ParkedQueue
from adapters.rabbitmq.queues import unless_refused


@dataclass(frozen=True)
class MigrationState:
    """Where a migration stands: the parked and holding queues' depths (None: missing), whether
    the parked queue has the arguments of the settings, and the consumers of the job queue."""

    parked: int | None
    bounded: bool
    holding: int | None
    consumers: int

    @property
    def done(self) -> bool:
        """Nothing to do: the parked queue has its arguments (or is missing), nothing is held."""
        return (self.parked is None or self.bounded) and self.holding is None


@dataclass(frozen=True)
class MigrationResult:
    """What the migration did: messages moved to the holding queue and back, and those the
    bounded parked queue refused, left in the holding queue."""

    moved_out: int
    moved_back: int
    left_in_holding: int


class MigrationConflict(Exception):
    """The parked queue was declared again with other arguments while it was being migrated."""


class WorkersRunning(Exception):
    """The job queue has consumers: a worker may park a message into the queue being deleted."""

    def __init__(self, queue: str, consumers: int) -> None:
        super().__init__(
            f"{queue} has {consumers} consumer(s): stop every worker first: scale the Deployment"
            ' to 0 and pause KEDA (annotation autoscaling.keda.sh/paused-replicas: "0"), then'
            " run migrate, then start them"
        )
        self.consumers = consumers


class ParkedMigration:
    """The migration of ``parked``'s queue, on its session (whose lock excludes other sessions)."""

    def __init__(self, parked: ParkedQueue) -> None:
        self._parked = parked
        self._queues = parked.queues

    @property
    def holding_queue(self) -> str:
        """Where the parked messages wait while the parked queue is declared again."""
        return f"{self._queues.parked}.migrating"

    def workers(self) -> int:
        """The consumers of the job queue (0 when it does not exist)."""
        return self._parked.consumers(self._queues.name) or 0

    def state(self) -> MigrationState:
        """Where a migration stands; changes nothing."""
        parked = self._parked.count()
        return MigrationState(
            parked=parked,
            bounded=parked is not None and self._declare_parked(),
            holding=self._parked.count(self.holding_queue),
            consumers=self.workers(),
        )

    def run(self) -> MigrationResult:
        """Move the parked messages to the holding queue, delete the parked queue only while it is
        empty and the job queue has no consumer, declare it with the arguments, move them back.
        A message the bounded queue refuses stops the move back and stays in the holding queue;
        run it again to finish from there. ``WorkersRunning`` when the job queue has a consumer
        (every message is then in the parked or the holding queue: a rerun finishes)."""
        state = self.state()
        if state.done:
            return MigrationResult(0, 0, 0)
        self._refuse_while_workers_run()
        moved_out = 0
        if state.parked is not None and not state.bounded:
            holding = self._parked.connection.channel()
            holding.queue_declare(self.holding_queue, durable=True)
            holding.close()
            while True:
                moved_out += self._move(self._queues.parked, self.holding_queue)
                self._refuse_while_workers_run()
                if self._delete_if_empty(self._queues.parked):
                    break
        if not self._declare_parked():
            raise MigrationConflict(
                f"{self._queues.parked} was declared again with other arguments meanwhile (a"
                f" worker of an earlier version?); the messages wait in {self.holding_queue}"
            )
        moved_back = self._move(self.holding_queue, self._queues.parked)
        left = self._parked.count(self.holding_queue) or 0
        if left == 0:
            self._delete_if_empty(self.holding_queue)
        return MigrationResult(moved_out, moved_back, left)

    def _refuse_while_workers_run(self) -> None:
        consumers = self.workers()
        if consumers:
            raise WorkersRunning(self._queues.name, consumers)

    def _declare_parked(self) -> bool:
        """Declare the parked queue with the arguments of the settings (a no-op when it has
        them; False on a 406 when it has others, on a throwaway channel)."""
        return self._queues.declare_parked(self._parked.connection)

    def _move(self, source: str, target: str) -> int:
        """Move messages one at a time, each confirmed in ``target`` before it is acked in
        ``source``, until ``source`` is empty or ``target`` refuses one (it stays in
        ``source``, in its place). How many moved."""
        moved = 0
        channel = self._parked.connection.channel()
        channel.confirm_delivery()
        while True:
            method, properties, body = channel.basic_get(source, auto_ack=False)
            if method is None:
                channel.close()
                return moved
            try:
                channel.basic_publish("", target, body, properties, mandatory=True)
            except NackError:  # the bounded queue is full
                channel.basic_nack(method.delivery_tag, requeue=True)
                channel.close()
                return moved
            channel.basic_ack(method.delivery_tag)
            moved += 1

    def _delete_if_empty(self, queue: str) -> bool:
        """Delete ``queue`` unless it holds a message (then False)."""
        return unless_refused(
            self._parked.connection, lambda channel: channel.queue_delete(queue, if_empty=True)
        )
