"""Pulls deliveries from a TaskSource, runs them, and settles each one exactly once."""

from __future__ import annotations

import logging
from collections.abc import Callable

from domain.errors import GenerationError, as_generation_error
from domain.job import GenerationJob, JobResult, Outcome
from domain.messages import parse_message, peek_generation_id
from domain.request import RequestNormalizer
from ports.task_source import Delivery, TaskSource

log = logging.getLogger(__name__)


class JobRunner:
    """The loop between a queue and the use case.

    A message that cannot become a request (not JSON, another type, a bad field) is poison: it is
    parked, never retried, and reported as failed when its ``generation_id`` can be read.
    """

    def __init__(
        self,
        *,
        source: TaskSource,
        job: GenerationJob,
        normalizer: RequestNormalizer,
        poll_seconds: float = 1.0,
    ) -> None:
        self._source = source
        self._job = job
        self._normalizer = normalizer
        self._poll_seconds = poll_seconds

    def handle(self, delivery: Delivery) -> JobResult | None:
        """Process one delivery and settle it; None for a parked poison message."""
        try:
            request = self._normalizer.normalize(parse_message(delivery.body))
        except GenerationError as exc:
            self._park(delivery, exc)
            return None
        result = self._job.run(request, attempt=delivery.attempt)
        if result.outcome is Outcome.RETRY:
            reason = str(result.error) if result.error else "retry"
            self._source.retry(delivery, reason)
        else:
            self._source.ack(delivery)
        return result

    def _park(self, delivery: Delivery, error: GenerationError) -> None:
        generation_id = peek_generation_id(delivery.body)
        log.warning("poison message parked (generation %s): %s", generation_id, error)
        if generation_id is not None:
            outcome = self._job.report_failure(generation_id, error, delivery.attempt).outcome
            if outcome is Outcome.RETRY:
                # The backend is unreachable; keep the message so the failure is told later.
                self._source.retry(delivery, str(error))
                return
        self._source.park(delivery, str(error))

    def run(self, *, should_stop: Callable[[], bool], stop_when_idle: bool = False) -> int:
        """Handle deliveries until ``should_stop()`` (or the source is idle); return the count."""
        handled = 0
        timeout = 0.0 if stop_when_idle else self._poll_seconds
        while not should_stop():
            delivery = self._source.receive(timeout)
            if delivery is None:
                if stop_when_idle:
                    break
                continue
            try:
                self.handle(delivery)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                # Never lose a job to a bug in settling it: hand it back and keep running.
                log.exception("delivery could not be handled: %s", as_generation_error(exc))
                self._source.retry(delivery, str(as_generation_error(exc)))
            handled += 1
        return handled
