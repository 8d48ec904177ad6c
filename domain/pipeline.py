"""The worker loop that keeps the model busy: I/O before and after each generation overlaps it.

Three stages, one thread for the model:

- intake (I/O threads): validate the delivery, check for a stored output, fetch the LoRA and
  signature. Up to ``lookahead`` jobs are prepared ahead of the model.
- render (the calling thread): the model, one call at a time, in arrival order; a call takes the
  next job plus up to ``max_batch_size - 1`` already-prepared jobs that share its ``batch_key``.
- finish (I/O threads): stamp the signature, encode the PNG, upload, deliver the completion,
  settle the delivery. At most ``finish_backlog`` jobs wait here; the model pauses beyond that.

Each delivery is still settled exactly once, by whichever stage ends its job. On stop, no new
delivery is taken; jobs already received are finished and settled before ``run`` returns.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from domain.errors import as_generation_error
from domain.job import GenerationJob, JobResult, Prepared, Rendered
from domain.log_context import job_context
from domain.messages import peek_generation_id
from domain.request import RequestNormalizer, batch_key
from domain.runner import JobRunner, SettledGenerations
from ports.task_source import Delivery, TaskSource

log = logging.getLogger(__name__)


class PipelinedRunner(JobRunner):
    """A JobRunner whose model never waits on storage, webhooks or PNG encoding."""

    def __init__(
        self,
        *,
        source: TaskSource,
        job: GenerationJob,
        normalizer: RequestNormalizer,
        settled: SettledGenerations | None = None,
        poll_seconds: float = 1.0,
        io_threads: int = 4,
        lookahead: int = 2,
        finish_backlog: int = 4,
        max_batch_size: int = 1,
    ) -> None:
        super().__init__(
            source=source,
            job=job,
            normalizer=normalizer,
            settled=settled,
            poll_seconds=poll_seconds,
        )
        self._batch = max(1, min(max_batch_size, job.max_batch_size))
        self._io_threads = max(2, io_threads)
        # A batch is drawn from jobs already prepared, so look ahead at least a batch's worth.
        self._lookahead = max(1, lookahead, self._batch)
        self._finish_slots = threading.BoundedSemaphore(max(1, finish_backlog, self._batch))
        self._finishing = 0
        self._finishing_changed = threading.Condition()

    def run(
        self,
        *,
        should_stop: Callable[[], bool],
        stop_when_idle: bool = False,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> int:
        """Run the pipeline until ``should_stop()`` (or idle); the number of deliveries taken.

        ``heartbeat`` is called on every turn of the loop (the liveness probe watches it).
        """
        handled = 0
        pending: deque[tuple[Delivery, Future[Prepared | None]]] = deque()
        with ThreadPoolExecutor(self._io_threads, thread_name_prefix="job-io") as pool:
            while True:
                heartbeat()
                stopping = should_stop()
                while not stopping and len(pending) < self._lookahead:
                    wait = 0.0 if pending or stop_when_idle else self._poll_seconds
                    delivery = self._source.receive(wait)
                    if delivery is None:
                        break
                    handled += 1
                    pending.append((delivery, pool.submit(self._intake, delivery)))
                if not pending:
                    if stopping:
                        break
                    if stop_when_idle:
                        # Jobs still finishing may hand deliveries back; idle means none left.
                        if not self._wait_for_finishing():
                            break
                    continue
                delivery, intake = pending.popleft()
                prepared = intake.result()
                if prepared is not None:
                    self._render(pool, [(delivery, prepared), *self._companions(prepared, pending)])
        return handled

    def _companions(
        self, head: Prepared, pending: deque[tuple[Delivery, Future[Prepared | None]]]
    ) -> list[tuple[Delivery, Prepared]]:
        """Prepared jobs that can share the head's model call, taken out of ``pending``.

        Only jobs whose intake is already done are taken: the model never waits to fill a batch.
        """
        companions: list[tuple[Delivery, Prepared]] = []
        if self._batch == 1:
            return companions
        key = batch_key(head.request)
        for entry in list(pending):
            if len(companions) + 1 >= self._batch:
                break
            delivery, intake = entry
            if not intake.done() or intake.exception() is not None:
                continue
            prepared = intake.result()
            if prepared is None or batch_key(prepared.request) != key:
                continue
            if delivery.redelivered and self.others_in_flight(prepared.request.generation_id):
                continue  # never ahead of its own original: see _finish
            pending.remove(entry)
            companions.append((delivery, prepared))
        return companions

    def _wait_for_finishing(self) -> bool:
        """Wait until no job is in the finish stage; whether any was."""
        with self._finishing_changed:
            busy = self._finishing > 0
            self._finishing_changed.wait_for(lambda: self._finishing == 0)
        return busy

    def _intake(self, delivery: Delivery) -> Prepared | None:
        """Validate and fetch; None when the delivery was settled here."""
        with job_context(generation_id=peek_generation_id(delivery.body)):
            try:
                request = self.accept(delivery)
                if request is None:
                    return None
                with job_context(generation_id=request.generation_id, task_id=request.task_id):
                    prepared = self._job.prepare(request, attempt=delivery.attempt)
                    if isinstance(prepared, JobResult):
                        self.settle(delivery, prepared)
                        return None
                    return prepared
            except Exception as exc:  # pylint: disable=broad-exception-caught
                self.contain(delivery, as_generation_error(exc))
                return None

    def _render(self, pool: ThreadPoolExecutor, batch: list[tuple[Delivery, Prepared]]) -> None:
        """One model call for the batch; each job then settles or moves on to the finish stage."""
        requests = [prepared.request for _, prepared in batch]
        head = requests[0] if len(requests) == 1 else None
        with job_context(
            generation_id=head.generation_id if head else None,
            task_id=head.task_id if head else None,
        ):
            if head is None:
                log.info(
                    "batch of %d: generations %s",
                    len(requests),
                    [request.generation_id for request in requests],
                    extra={"generation_ids": [request.generation_id for request in requests]},
                )
            try:
                results = self._job.render_batch([prepared for _, prepared in batch])
            except Exception as exc:  # pylint: disable=broad-exception-caught
                for delivery, _ in batch:
                    self.contain(delivery, as_generation_error(exc))
                return
        for (delivery, prepared), rendered in zip(batch, results, strict=True):
            with job_context(
                generation_id=prepared.request.generation_id, task_id=prepared.request.task_id
            ):
                self._after_render(pool, delivery, rendered)

    def _after_render(
        self, pool: ThreadPoolExecutor, delivery: Delivery, rendered: Rendered | JobResult
    ) -> None:
        try:
            if isinstance(rendered, JobResult):
                self.settle(delivery, rendered)
                return
        except Exception as exc:  # pylint: disable=broad-exception-caught
            self.contain(delivery, as_generation_error(exc))
            return
        # Back-pressure: the model waits if uploads pile up; released by _finish.
        self._finish_slots.acquire()  # pylint: disable=consider-using-with
        with self._finishing_changed:
            self._finishing += 1
        pool.submit(self._finish, delivery, rendered)

    def _finish(self, delivery: Delivery, rendered: Rendered) -> None:
        request = rendered.prepared.request
        try:
            with job_context(generation_id=request.generation_id, task_id=request.task_id):
                if delivery.redelivered:
                    # The broker may have redelivered it while the original was still in flight
                    # here. The original rendered first (arrival order; _companions never takes
                    # a redelivery ahead of it), so its finish was queued first on this FIFO
                    # pool and is running or done: waiting for it cannot starve the pool.
                    self.wait_for_other_deliveries(request.generation_id)
                if delivery.redelivered and request.generation_id in self._settled:
                    # The original told the outcome meanwhile: never a second completion.
                    log.info("generation %s: told while redelivered, acked", request.generation_id)
                    self._job_ended(delivery, "completed", None)
                    self._source.ack(delivery)
                    return
                self.settle(delivery, self._job.finish(rendered))
        except Exception as exc:  # pylint: disable=broad-exception-caught
            self.contain(delivery, as_generation_error(exc))
        finally:
            self._finish_slots.release()
            with self._finishing_changed:
                self._finishing -= 1
                self._finishing_changed.notify_all()
