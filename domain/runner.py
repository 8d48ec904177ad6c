"""Pulls deliveries from a TaskSource, runs them, and settles each one exactly once."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from domain.errors import FailureReport, GenerationError, InvalidRequest, as_generation_error
from domain.job import GenerationJob, JobResult, Outcome
from domain.log_context import job_context
from domain.messages import parse_message, peek_generation_id
from domain.request import GenerationRequest, RequestNormalizer
from ports.task_source import Delivery, TaskSource

log = logging.getLogger(__name__)


class SettledGenerations:
    """Generations whose outcome this process delivered, newest last (bounded).

    When a connection dies after the outcome was delivered but before the ack, the broker
    redelivers the message; recognising it here avoids telling the backend a second time.
    Only broker redeliveries are skipped: a fresh message for the same generation (the backend
    re-queueing a failed one) always runs.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, generation_id: int) -> None:
        """Remember that this generation's outcome was delivered."""
        with self._lock:
            self._ids[generation_id] = None
            self._ids.move_to_end(generation_id)
            while len(self._ids) > self._capacity:
                self._ids.popitem(last=False)

    def __contains__(self, generation_id: object) -> bool:
        with self._lock:
            return generation_id in self._ids


class JobRunner:
    """The loop between a queue and the use case.

    A message that cannot become a request (not JSON, another type, a bad field) is poison: it is
    parked, never retried, and reported as failed when its ``generation_id`` can be read. A
    failure the backend could not be told travels with the handed-back delivery and is re-sent
    as decided, so one generation never gets two different outcomes.
    """

    def __init__(
        self,
        *,
        source: TaskSource,
        job: GenerationJob,
        normalizer: RequestNormalizer,
        settled: SettledGenerations | None = None,
        poll_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._job = job
        self._normalizer = normalizer
        self._settled = settled if settled is not None else SettledGenerations()
        self._poll_seconds = poll_seconds
        self._clock = clock
        self._telemetry = job.telemetry
        # Per delivery taken as a job: when it began and its generation; and per generation,
        # how many of its deliveries are in flight here (a broker redelivery can join the
        # original while the original is still running).
        self._in_flight: dict[int, tuple[float, int]] = {}
        self._running: Counter[int] = Counter()
        self._in_flight_lock = threading.Lock()
        self._running_changed = threading.Condition(self._in_flight_lock)

    def handle(self, delivery: Delivery) -> JobResult | None:
        """Process one delivery and settle it; None when no generation ran."""
        with job_context(generation_id=peek_generation_id(delivery.body)):
            request = self.accept(delivery)
            if request is None:
                return None
            with job_context(generation_id=request.generation_id, task_id=request.task_id):
                result = self._job.run(request, attempt=delivery.attempt)
                self.settle(delivery, result)
                return result

    def accept(self, delivery: Delivery) -> GenerationRequest | None:
        """The request to run, or None when the delivery was settled without running one.

        Settled here: a failure decided earlier (re-sent), a poison message (parked), a broker
        redelivery of an outcome already told (acked).
        """
        if delivery.pending_failure is not None:
            self._settle_pending_failure(delivery, delivery.pending_failure)
            return None
        request = self._request_or_park(delivery)
        if request is None:
            return None
        if delivery.redelivered and request.generation_id in self._settled:
            log.info("generation %s: redelivered after its outcome was told", request.generation_id)
            self._source.ack(delivery)
            return None
        self._job_started(delivery, request.generation_id)
        return request

    def _job_started(self, delivery: Delivery, generation_id: int) -> None:
        with self._in_flight_lock:
            self._in_flight[id(delivery)] = (self._clock(), generation_id)
            self._running[generation_id] += 1
        self._telemetry.job_started()

    def others_in_flight(self, generation_id: int) -> bool:
        """Whether another delivery of this generation is in flight here besides the caller's."""
        with self._in_flight_lock:
            return self._running[generation_id] > 1

    def wait_for_other_deliveries(self, generation_id: int) -> None:
        """Until no other delivery of this generation is in flight here (only the caller's)."""
        with self._running_changed:
            self._running_changed.wait_for(lambda: self._running[generation_id] <= 1)

    def _job_ended(self, delivery: Delivery, outcome: str, error: GenerationError | None) -> None:
        """Report the end of a job that ``accept`` started; nothing for other deliveries."""
        with self._in_flight_lock:
            entry = self._in_flight.pop(id(delivery), None)
            if entry is not None:
                self._running[entry[1]] -= 1
                if self._running[entry[1]] <= 0:
                    del self._running[entry[1]]
                self._running_changed.notify_all()
        if entry is not None:
            began = entry[0]
            self._telemetry.job_finished(
                outcome=outcome,
                error_code=error.code.value if error is not None else None,
                seconds=self._clock() - began,
            )

    def settle(self, delivery: Delivery, result: JobResult) -> None:
        """Ack, hand back or park the delivery according to the job's outcome."""
        reason = str(result.error) if result.error else ""
        if result.outcome in (Outcome.COMPLETED, Outcome.FAILED):
            self._settled.add(result.generation_id)
        self._job_ended(delivery, result.outcome.value, result.error)
        if result.outcome is Outcome.RETRY:
            self._source.retry(delivery, reason, result.pending_failure)
        elif result.outcome is Outcome.REJECTED:
            self._source.park(delivery, reason)
        else:
            self._source.ack(delivery)

    def _request_or_park(self, delivery: Delivery) -> GenerationRequest | None:
        try:
            return self._normalizer.normalize(parse_message(delivery.body))
        except GenerationError as exc:
            error = exc
        except Exception as exc:  # pylint: disable=broad-exception-caught
            # Whatever a message does to validation, it is the message's fault: park it.
            error = InvalidRequest(f"message cannot be read: {type(exc).__name__}: {exc}")
        generation_id = peek_generation_id(delivery.body)
        log.warning("poison message (generation %s): %s", generation_id, error)
        if generation_id is None:
            self._source.park(delivery, str(error))
        else:
            report = FailureReport(
                generation_id=generation_id,
                code=error.code,
                message=error.message,
                retry_count=delivery.attempt,
                poison=True,
            )
            self._settle_failure(delivery, report)
        return None

    def _settle_pending_failure(self, delivery: Delivery, report: FailureReport) -> None:
        """Send a failure decided earlier, unless the image got stored meanwhile.

        After a dropped connection, the broker redelivers the original message while the copy
        carrying the failure is also queued; whichever stores the image first wins.
        """
        if not report.poison:
            try:
                stored = self._job.report_if_stored(report.generation_id)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                log.warning("generation %s: cannot check storage: %s", report.generation_id, exc)
                self._source.retry(delivery, f"storage unreachable: {exc}", report)
                return
            if stored is not None:
                self.settle(delivery, stored)
                return
        self._settle_failure(delivery, report)

    def _settle_failure(self, delivery: Delivery, report: FailureReport) -> None:
        reason = f"{report.code.value}: {report.message}"
        outcome = self._job.deliver_failure(report)
        if outcome is not Outcome.RETRY:
            # A failure that waits for the backend counts once, when it is told (or refused).
            self._telemetry.job_started()
            self._telemetry.job_finished(
                outcome=outcome.value, error_code=report.code.value, seconds=0.0
            )
        if outcome is Outcome.FAILED:
            self._settled.add(report.generation_id)
        if outcome is Outcome.RETRY:
            # The backend is unreachable; keep the message so the failure is told later.
            self._source.retry(delivery, reason, report)
        elif outcome is Outcome.REJECTED or report.poison:
            self._source.park(delivery, reason)
        else:
            self._source.ack(delivery)

    def run(
        self,
        *,
        should_stop: Callable[[], bool],
        stop_when_idle: bool = False,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> int:
        """Handle deliveries until ``should_stop()`` (or the source is idle); return the count.

        ``heartbeat`` is called on every turn of the loop (the liveness probe watches it).
        """
        handled = 0
        timeout = 0.0 if stop_when_idle else self._poll_seconds
        while not should_stop():
            heartbeat()
            delivery = self._source.receive(timeout)
            if delivery is None:
                if stop_when_idle:
                    break
                continue
            try:
                self.handle(delivery)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                self.contain(delivery, as_generation_error(exc))
            handled += 1
        return handled

    def contain(self, delivery: Delivery, error: GenerationError) -> None:
        """A bug while settling: hand the job back, but park it once the retries are spent."""
        log.exception("delivery could not be handled: %s", error)
        try:
            if delivery.attempt >= self._job.max_retries:
                self._job_ended(delivery, Outcome.REJECTED.value, error)
                self._source.park(delivery, str(error))
            else:
                self._job_ended(delivery, Outcome.RETRY.value, error)
                self._source.retry(delivery, str(error), delivery.pending_failure)
        except Exception:  # pylint: disable=broad-exception-caught
            log.exception("delivery could not be settled; the source will redeliver it")
