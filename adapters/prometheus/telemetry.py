"""``PrometheusTelemetry``: the ``Telemetry`` port on prometheus-client, one registry per instance.

Events (jobs, model calls, webhook attempts) are pushed by the domain through the port; gauges
that can be read at any moment (queue depth, LoRA cache counters, GPU utilization and memory) are
pulled at scrape time from callables given to ``PrometheusTelemetry`` (``adapters.prometheus
.scrape``). A source that raises is logged and skipped, and the rest of the scrape goes on.

Each ``PrometheusTelemetry`` owns its ``CollectorRegistry`` (never the process-global one), so
tests and several workers in one process do not collide. Every metric it serves is defined in
``adapters.prometheus.definitions``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from adapters.prometheus.definitions import (
    DELIVERIES_RETURNED,
    DENOISING_STEPS,
    DENOISING_STEPS_PER_SECOND,
    FAILURES_WITHHELD,
    GENERATION_BATCH_SIZE,
    GENERATION_SECONDS,
    IMAGES_GENERATED,
    JOB_DURATION_SECONDS,
    JOB_FAILURES,
    JOBS,
    JOBS_IN_FLIGHT,
    OUTCOMES_UNDELIVERED,
    WEBHOOK_ATTEMPTS,
    WEBHOOK_FAILURES,
    WORKER,
    MetricDefinition,
)
from adapters.prometheus.scrape import (
    CacheStatsSource,
    GpuSource,
    QueueDepthSource,
    ScrapeTimeCollector,
    Sources,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")


def _never_raises(method: Callable[P, None]) -> Callable[P, None]:
    """Telemetry must never break a job: log and swallow any error of recording."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:  # pylint: disable=broad-exception-caught
            log.warning("metrics: %s could not be recorded", method.__name__, exc_info=True)

    return guarded


class PrometheusTelemetry:
    """Implements ``ports.telemetry.Telemetry`` with Prometheus metrics on its own registry.

    Scrape-time sources can be given here or attached later with ``watch_*`` (the model, and so
    its pipeline LoRAs, exists only once loaded). All methods are thread-safe.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        queue_depth: QueueDepthSource | None = None,
        parked_depth: QueueDepthSource | None = None,
        lora_caches: Mapping[str, CacheStatsSource] | None = None,
        gpus: GpuSource | None = None,
        info: Mapping[str, str] | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._queue_depth = queue_depth
        self._parked_depth = parked_depth
        self._lora_caches: dict[str, CacheStatsSource] = dict(lora_caches or {})
        self._gpus = gpus
        self._failing: set[str] = set()

        self.generation_seconds: Histogram = self._register(GENERATION_SECONDS)
        self.batch_size: Histogram = self._register(GENERATION_BATCH_SIZE)
        self.steps_per_second: Gauge = self._register(DENOISING_STEPS_PER_SECOND)
        self.steps_total: Counter = self._register(DENOISING_STEPS)
        self.images_total: Counter = self._register(IMAGES_GENERATED)
        self.jobs_total: Counter = self._register(JOBS)
        self.failures_total: Counter = self._register(JOB_FAILURES)
        self.job_seconds: Histogram = self._register(JOB_DURATION_SECONDS)
        self.in_flight: Gauge = self._register(JOBS_IN_FLIGHT)
        self.webhook_attempts: Counter = self._register(WEBHOOK_ATTEMPTS)
        self.webhook_failures: Counter = self._register(WEBHOOK_FAILURES)
        self.undelivered: Counter = self._register(OUTCOMES_UNDELIVERED)
        self.withheld: Counter = self._register(FAILURES_WITHHELD)
        self.returned: Counter = self._register(DELIVERIES_RETURNED)
        if info:
            worker: Info = self._register(WORKER)
            worker.info(dict(info))
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.registry.register(ScrapeTimeCollector(sources=self._sources, scrape=self._scrape))

    def _register(self, definition: MetricDefinition) -> Any:
        """The metric of ``definition`` on this registry; when every label has its values known,
        each series exists from the start (at 0)."""
        if definition.type == "info":  # its labels are the keys of the info it reports
            return Info(definition.name, definition.help, registry=self.registry)
        kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[definition.type]
        options: dict[str, Any] = {"buckets": definition.buckets} if definition.buckets else {}
        metric = kind(
            definition.name,
            definition.help,
            labelnames=definition.label_names,
            registry=self.registry,
            **options,
        )
        if definition.labels and all(label.values for label in definition.labels):
            for values in itertools.product(*(label.values for label in definition.labels)):
                metric.labels(*values)
        return metric

    # --- scrape-time sources -----------------------------------------------------------------

    def watch_queue_depth(self, source: QueueDepthSource) -> None:
        """Read the queue depth from ``source`` at each scrape (None: absent)."""
        with self._lock:
            self._queue_depth = source

    def watch_parked_depth(self, source: QueueDepthSource) -> None:
        """Read the parked queue's depth from ``source`` at each scrape (None: absent)."""
        with self._lock:
            self._parked_depth = source

    def watch_lora_cache(self, level: str, source: CacheStatsSource) -> None:
        """Read a LoRA cache's stats at each scrape; ``level`` is ``disk`` or ``pipeline``."""
        with self._lock:
            self._lora_caches[level] = source

    def watch_gpus(self, source: GpuSource) -> None:
        """Read GPU samples at each scrape (an empty list: no GPU metrics)."""
        with self._lock:
            self._gpus = source

    # --- the Telemetry port ------------------------------------------------------------------

    @_never_raises
    def job_started(self) -> None:
        """A delivery became a job (jobs in flight +1)."""
        self.in_flight.inc()

    @_never_raises
    def job_finished(self, *, outcome: str, error_code: str | None, seconds: float) -> None:
        """A job ended: its outcome, its error code when it did not complete, its duration."""
        self.in_flight.dec()
        outcome = str(getattr(outcome, "value", outcome))
        self.jobs_total.labels(outcome=outcome).inc()
        self.job_seconds.labels(outcome=outcome).observe(max(0.0, seconds))
        if error_code is not None:
            code = str(getattr(error_code, "value", error_code))
            self.failures_total.labels(error_code=code).inc()

    @_never_raises
    def images_generated(self, *, count: int, steps: int, seconds: float) -> None:
        """One model call produced ``count`` images of ``steps`` steps in ``seconds``."""
        self.generation_seconds.observe(max(0.0, seconds))
        self.batch_size.observe(count)
        self.images_total.inc(count)
        self.steps_total.inc(count * steps)
        if seconds > 0:
            self.steps_per_second.set(count * steps / seconds)

    @_never_raises
    def webhook_attempt(self, *, kind: str, ok: bool) -> None:
        """One HTTP attempt of a webhook and whether the backend accepted it."""
        self.webhook_attempts.labels(kind=kind).inc()
        if not ok:
            self.webhook_failures.labels(kind=kind).inc()

    @_never_raises
    def outcome_undelivered(self, *, outcome: str, reason: str, parked: bool) -> None:
        """A decided outcome the backend did not take; ``parked`` when given up on."""
        self.undelivered.labels(
            outcome=outcome, reason=reason, parked="true" if parked else "false"
        ).inc()

    @_never_raises
    def failure_withheld(self) -> None:
        """A failure not sent: its generation's failure was told before."""
        self.withheld.inc()

    @_never_raises
    def delivery_returned(self, *, reason: str) -> None:
        """A delivery given back without running."""
        self.returned.labels(reason=reason).inc()

    # --- used by the collector ---------------------------------------------------------------

    def _sources(self) -> Sources:
        with self._lock:
            return self._queue_depth, self._parked_depth, dict(self._lora_caches), self._gpus

    def _scrape(self, what: str, step: Callable[[], None]) -> None:
        """Run one source's part of a scrape; on an error log it (at WARNING once, until the
        source recovers) and leave that source's metrics out."""
        try:
            step()
        except Exception:  # pylint: disable=broad-exception-caught
            with self._lock:
                first = what not in self._failing
                self._failing.add(what)
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "metrics: %s unavailable; its metrics are left out of this scrape",
                what,
                exc_info=True,
            )
            return
        with self._lock:
            self._failing.discard(what)
