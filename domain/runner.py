"""The worker's loop: three stages around one model thread, and one settlement per delivery.

- intake (I/O threads): read the message, settle it at once when its outcome is known (a copy of
  a told message, an image already stored, a poison message), else fetch its LoRA and signature.
- render (the thread that calls ``run``): the model, one call at a time in arrival order; a call
  takes the next job plus prepared jobs that share its ``batch_key``, up to ``max_batch_size``.
- finish (I/O threads): sign, encode, store, then the settlement tells the outcome and acks.

Each stage has one boundary that turns any exception into that delivery's settlement, so no
message can end the loop. Nothing waits for another delivery: a copy of a job already in flight
here is handed back to the queue (it comes back after a back-off and finds the outcome
recorded). A delivery that would wait here longer than ``max_hold_seconds`` before its job
starts goes back to the queue, and the number of deliveries held follows the measured job time,
so none outlives the broker's consumer timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

from domain.errors import GenerationError, InvalidRequest, as_generation_error
from domain.holding import HoldBudget, InFlight
from domain.job import GenerationJob, Prepared, Rendered
from domain.ledger import MessageId
from domain.log_context import log_ids
from domain.messages import parse_message, peek_identity
from domain.request import GenerationRequest, RequestNormalizer, batch_key
from domain.settlement import Settlement
from domain.settlement_policy import Settled
from ports.task_source import Delivery, TaskSource
from ports.telemetry import NoTelemetry, Telemetry

log = logging.getLogger(__name__)

LIVENESS_BEAT_SECONDS = 1.0
"""How often the loop proves it is alive while it waits for an intake or a finish slot (the
runner's default ``liveness_beat_seconds``)."""


@dataclass(frozen=True)
class _Ready:
    """A delivery ready to render: its message identity and its prepared inputs."""

    delivery: Delivery
    message: MessageId
    prepared: Prepared

    @property
    def request(self) -> GenerationRequest:
        """The job's request."""
        return self.prepared.request


class StagedRunner:  # pylint: disable=too-many-instance-attributes
    """Takes deliveries from a ``TaskSource`` and runs each through intake, render and finish.

    ``lookahead`` jobs are prepared ahead of the model (at least a batch's worth);
    ``finish_backlog`` jobs may wait for their upload before the model pauses;
    ``max_held`` (the broker's prefetch, MAX_CONCURRENT_GENERATIONS) caps what is held;
    ``liveness_beat_seconds`` is how often the loop beats while it waits for an intake or a finish
    slot.
    """

    def __init__(
        self,
        *,
        source: TaskSource,
        job: GenerationJob,
        normalizer: RequestNormalizer,
        settlement: Settlement,
        io_threads: int,
        lookahead: int,
        max_batch_size: int,
        max_held: int,
        max_hold_seconds: float,
        telemetry: Telemetry | None = None,
        finish_backlog: int = 4,
        poll_seconds: float = 1.0,
        liveness_beat_seconds: float = LIVENESS_BEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._job = job
        self._normalizer = normalizer
        self._settlement = settlement
        self._telemetry = telemetry if telemetry is not None else NoTelemetry()
        self._batch = max(1, min(max_batch_size, job.max_batch_size))
        self._io_threads = max(2, io_threads)
        # A batch is drawn from jobs already prepared, so look ahead at least a batch's worth
        # (the batch is at least 1, so are these).
        self._lookahead = max(lookahead, self._batch)
        self._finish_slots = threading.BoundedSemaphore(max(finish_backlog, self._batch))
        self._finishing = 0
        self._finishing_changed = threading.Condition()
        self._hold = HoldBudget(max_hold_seconds=max_hold_seconds, ceiling=max_held)
        self._held_limit = max(1, max_held)
        self._max_hold = max_hold_seconds
        self._poll_seconds = poll_seconds
        self._liveness_beat_seconds = liveness_beat_seconds
        self._clock = clock
        self._in_flight = InFlight()

    # --- the loop ----------------------------------------------------------------------------

    def run(
        self,
        *,
        should_stop: Callable[[], bool],
        stop_when_idle: bool = False,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> int:
        """Run until ``should_stop()`` (or, with ``stop_when_idle``, until nothing is left to
        do); every delivery taken is settled before it returns. The number taken.

        ``heartbeat`` is called on every turn and at every denoising step (liveness).
        """
        taken = 0
        pending: deque[Future[_Ready | None]] = deque()
        with ThreadPoolExecutor(self._io_threads, thread_name_prefix="job-io") as pool:
            while True:
                heartbeat()
                stopping = should_stop()
                while not stopping and len(pending) < min(self._lookahead, self._hold.count()):
                    wait_seconds = 0.0 if pending or stop_when_idle else self._poll_seconds
                    delivery = self._source.receive(wait_seconds)
                    if delivery is None:
                        break
                    taken += 1
                    self._telemetry.job_started()
                    pending.append(pool.submit(self._intake, delivery))
                if not pending:
                    if stopping:
                        break
                    if stop_when_idle and not self._wait_for_finishing():
                        break
                    continue
                job = self._next(pending.popleft(), heartbeat)
                if job is not None:
                    batch = [job, *self._companions(job, pending)]
                    self._render(pool, batch, heartbeat)
        return taken

    def _next(self, intake: Future[_Ready | None], heartbeat: Callable[[], None]) -> _Ready | None:
        """The intake's job, proving liveness while it downloads."""
        while not intake.done():
            wait([intake], timeout=self._liveness_beat_seconds)
            heartbeat()
        return intake.result()  # the intake's boundary leaves nothing to raise

    def _companions(self, head: _Ready, pending: deque[Future[_Ready | None]]) -> list[_Ready]:
        """Prepared jobs that can share the head's model call, taken out of ``pending``.

        Only jobs whose intake is done are taken: the model never waits to fill a batch.
        """
        companions: list[_Ready] = []
        if self._batch == 1:
            return companions
        key = batch_key(head.request)
        for intake in list(pending):
            if len(companions) + 1 >= self._batch:
                break
            if not intake.done():
                continue
            job = intake.result()
            if job is None or batch_key(job.request) != key:
                continue
            pending.remove(intake)
            companions.append(job)
        return companions

    def _wait_for_finishing(self) -> bool:
        """Wait until no job is in the finish stage; whether any was."""
        with self._finishing_changed:
            busy = self._finishing > 0
            self._finishing_changed.wait_for(lambda: self._finishing == 0)
        return busy

    # --- intake ------------------------------------------------------------------------------

    def _intake(self, delivery: Delivery) -> _Ready | None:
        """Read, dedupe and prepare one delivery; None when it was settled here."""
        generation_id, task_id = peek_identity(delivery.body)
        message = MessageId.of(generation_id, task_id, delivery.body) if generation_id else None
        with log_ids(generation_id=generation_id, task_id=task_id):
            claimed: MessageId | None = None
            try:
                returned = self._turn_away(delivery)
                if returned is not None:
                    self._ended(delivery, returned)
                    return None
                try:
                    request = self._read(delivery)
                except GenerationError as exc:
                    self._ended(delivery, self._settlement.poison(delivery, message, exc), exc)
                    return None
                message = MessageId.of(request.generation_id, request.task_id, delivery.body)
                if not self._in_flight.claim(message.generation_id):
                    self._telemetry.delivery_returned(reason="in_flight")
                    reason = "a delivery of its generation is in flight here"
                    self._ended(delivery, self._settlement.returned(delivery, reason))
                    return None
                claimed = message
                settled = self._known(delivery, message)
                if settled is not None:
                    self._ended(delivery, settled)
                    return None
                job = _Ready(
                    delivery=delivery, message=message, prepared=self._job.prepare(request)
                )
                claimed = None  # the job owns the claim from here
                return job
            except Exception as exc:  # pylint: disable=broad-exception-caught
                self._fail(delivery, message, exc)
                return None
            finally:
                if claimed is not None:
                    self._in_flight.release(claimed.generation_id)

    def _turn_away(self, delivery: Delivery) -> Settled | None:
        """Hand a delivery back before reading it: held too long, or the backend refuses us."""
        if self._clock() - delivery.received_at > self._max_hold:
            self._telemetry.delivery_returned(reason="held_too_long")
            return self._settlement.returned(
                delivery,
                "held longer than MAX_HOLD_SECONDS before its job could start",
                requeue_now=True,
            )
        refusal = self._settlement.backend_refusal()
        if refusal is not None:
            self._telemetry.delivery_returned(reason="backend_refused")
            return self._settlement.returned(delivery, f"the backend refuses us: {refusal}")
        return None

    def _read(self, delivery: Delivery) -> GenerationRequest:
        """The request of a delivery; any failure to read it is the message's (poison)."""
        try:
            request = self._normalizer.normalize(parse_message(delivery.body))
            self._job.check(request)
            return request
        except GenerationError:
            raise
        except Exception as exc:
            detail = " ".join(str(exc).split())[:300]
            raise InvalidRequest(f"message cannot be read: {type(exc).__name__}: {detail}") from exc

    def _known(self, delivery: Delivery, message: MessageId) -> Settled | None:
        """Settle a delivery whose outcome is known or was carried by an older worker."""
        settled = self._settlement.known(
            delivery, message, lambda: self._job.stored(message.generation_id)
        )
        if settled is not None:
            return settled
        carried = delivery.carried_failure
        if carried is None:
            return None
        if carried.generation_id != message.generation_id:
            log.warning(
                "ignoring a carried failure of generation %s on a message of generation %s",
                carried.generation_id,
                message.generation_id,
            )
            return None
        return self._settlement.carried(delivery, message, carried)

    # --- render ------------------------------------------------------------------------------

    def _render(
        self, pool: ThreadPoolExecutor, batch: list[_Ready], heartbeat: Callable[[], None]
    ) -> None:
        """One model call for the jobs still worth running; then each moves on to finish."""
        runnable = [job for job in batch if self._still_worth_running(job)]
        if not runnable:
            return
        head = runnable[0].request if len(runnable) == 1 else None
        with log_ids(
            generation_id=head.generation_id if head else None,
            task_id=head.task_id if head else None,
        ):
            if head is None:
                ids = [job.request.generation_id for job in runnable]
                log.info(
                    "batch of %d: generations %s", len(ids), ids, extra={"generation_ids": ids}
                )
            began = self._clock()
            try:
                results = self._job.render_batch(
                    [job.prepared for job in runnable], pulse=heartbeat
                )
                if len(results) != len(runnable):
                    raise RuntimeError(
                        f"the render stage returned {len(results)} results"
                        f" for {len(runnable)} jobs"
                    )
            except Exception as exc:  # pylint: disable=broad-exception-caught
                log.exception("the render stage failed")
                results = [as_generation_error(exc) for _ in runnable]
            self._hold.record(jobs=len(runnable), seconds=self._clock() - began)
            self._adjust_hold()
        for job, result in zip(runnable, results):  # one result per job, checked above
            with self._context(job):
                if isinstance(result, Rendered):
                    self._to_finish(pool, job, result, heartbeat)
                else:
                    self._fail(job.delivery, job.message, result)
                    self._in_flight.release(job.message.generation_id)

    def _adjust_hold(self) -> None:
        """Tell the source how many deliveries to hold, when the measured job time changes it."""
        count = self._hold.count()
        if count != self._held_limit:
            log.info("holding at most %d deliveries (MAX_HOLD_SECONDS %.0f)", count, self._max_hold)
            self._held_limit = count
            self._source.hold_at_most(count)

    def _still_worth_running(self, job: _Ready) -> bool:
        """False (and the delivery settled) for a job whose delivery should not run now."""
        with self._context(job):
            if not self._source.still_held(job.delivery):
                # The broker delivers the message again: this copy must not run as well.
                log.info("its connection is gone; the broker delivers it again")
                self._telemetry.delivery_returned(reason="connection_lost")
                self._ended(job.delivery, Settled.RETURNED)
            elif self._clock() - job.delivery.received_at > self._max_hold:
                self._telemetry.delivery_returned(reason="held_too_long")
                reason = "held longer than MAX_HOLD_SECONDS before its job could start"
                settled = self._settlement.returned(job.delivery, reason, requeue_now=True)
                self._ended(job.delivery, settled)
            else:
                return True
            self._in_flight.release(job.message.generation_id)
            return False

    def _to_finish(
        self,
        pool: ThreadPoolExecutor,
        job: _Ready,
        rendered: Rendered,
        heartbeat: Callable[[], None],
    ) -> None:
        # Back-pressure: the model waits if uploads pile up (released by _finish), beating
        # meanwhile: slow uploads are not a stuck worker.
        while not self._finish_slots.acquire(  # pylint: disable=consider-using-with
            timeout=self._liveness_beat_seconds
        ):
            heartbeat()
        with self._finishing_changed:
            self._finishing += 1
        pool.submit(self._finish, job, rendered)

    # --- finish ------------------------------------------------------------------------------

    def _finish(self, job: _Ready, rendered: Rendered) -> None:
        try:
            with self._context(job):
                try:
                    completion = self._job.finish(rendered)
                    settled = self._settlement.completed(job.delivery, job.message, completion)
                except Exception as exc:  # pylint: disable=broad-exception-caught
                    self._fail(job.delivery, job.message, exc)
                else:
                    self._ended(job.delivery, settled)
        finally:
            self._in_flight.release(job.message.generation_id)
            self._finish_slots.release()
            with self._finishing_changed:
                self._finishing -= 1
                self._finishing_changed.notify_all()

    # --- the boundary ------------------------------------------------------------------------

    def _fail(self, delivery: Delivery, message: MessageId | None, exc: BaseException) -> None:
        """Any exception of a stage becomes its delivery's settlement; nothing escapes."""
        error = as_generation_error(exc)
        if not isinstance(exc, GenerationError):
            log.error("unexpected error", exc_info=exc)
        try:
            if message is None:
                settled = self._settlement.poison(delivery, None, error)
            else:
                settled = self._settlement.failed(delivery, message, error)
        except Exception as inner:  # pylint: disable=broad-exception-caught
            log.error("settling the delivery failed", exc_info=inner)
            settled = self._settlement.contain(delivery, as_generation_error(inner))
        self._ended(delivery, settled, error)

    def _ended(
        self, delivery: Delivery, settled: Settled, error: GenerationError | None = None
    ) -> None:
        self._telemetry.job_finished(
            outcome=settled.value,
            error_code=error.code.value if error is not None else None,
            seconds=max(0.0, self._clock() - delivery.received_at),
        )

    @staticmethod
    @contextmanager
    def _context(job: _Ready) -> Iterator[None]:
        with log_ids(generation_id=job.request.generation_id, task_id=job.request.task_id):
            yield
