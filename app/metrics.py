"""Prometheus metrics of the worker: the ``Telemetry`` port on prometheus-client.

Events (jobs, model calls, webhook attempts) are pushed by the domain through the port; gauges
that can be read at any moment (queue depth, LoRA cache counters, GPU utilization and memory) are
pulled at scrape time from callables given to ``PrometheusTelemetry``. A source that answers None
(or no GPU) makes its metrics absent rather than zero; a source that raises is logged and
skipped, and the rest of the scrape goes on.

Each ``PrometheusTelemetry`` owns its ``CollectorRegistry`` (never the process-global one), so
tests and several workers in one process do not collide. ``METRICS`` lists every metric it can
serve; ``metrics_table()`` renders that list as the README's Markdown table.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from domain.errors import ErrorCode
from domain.settlement_policy import Settled
from ports.telemetry import LoraCacheStats

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

PREFIX = "stylelicense"

GENERATION_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)
"""Seconds of one model call: SD 1.5 takes about 1-10 s per 512x512 image on a GPU (50 steps),
a batch or a large size up to a minute or two; the CPU fallback lands in the top buckets."""

JOB_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
"""Seconds from a delivery's intake to its settlement: generation plus downloads, upload,
webhooks, and the wait behind the jobs held before it (up to MAX_CONCURRENT_GENERATIONS)."""

BATCH_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)
"""Images per model call (MAX_BATCH_SIZE is 4 by default)."""

OUTCOMES = tuple(settled.value for settled in Settled)
"""How deliveries are settled (``domain.settlement_policy.Settled``); each series exists from the start."""

UNDELIVERED_REASONS = ("unreachable", "unauthorized", "not_found", "rejected", "unknown")
"""Why the backend did not take a decided outcome."""

RETURN_REASONS = ("in_flight", "held_too_long", "connection_lost", "backend_refused")
"""Why a delivery went back to the queue without running."""

WEBHOOK_KINDS = ("progress", "completed", "failed")
"""The backend's webhooks; each series exists from the start at 0."""


@dataclass(frozen=True)
class MetricDoc:
    """One metric as the README documents it."""

    name: str
    type: str
    labels: str
    meaning: str


METRICS: tuple[MetricDoc, ...] = (
    MetricDoc(
        f"{PREFIX}_generation_seconds",
        "histogram",
        "",
        "Wall time of one model call (a batch of 1 to MAX_BATCH_SIZE images), in seconds.",
    ),
    MetricDoc(
        f"{PREFIX}_generation_batch_size",
        "histogram",
        "",
        "Images produced by one model call: how well batching fills up.",
    ),
    MetricDoc(
        f"{PREFIX}_denoising_steps_per_second",
        "gauge",
        "",
        "Denoising steps per second of the last model call, counted per image"
        " (steps x images / seconds). For the average over a window use"
        f" `rate({PREFIX}_denoising_steps_total[5m]) / rate({PREFIX}_generation_seconds_sum[5m])`.",
    ),
    MetricDoc(
        f"{PREFIX}_denoising_steps_total",
        "counter",
        "",
        "Denoising steps run, counted per image.",
    ),
    MetricDoc(
        f"{PREFIX}_images_generated_total",
        "counter",
        "",
        "Images the model produced (before signing and upload).",
    ),
    MetricDoc(
        f"{PREFIX}_jobs_total",
        "counter",
        "`outcome`: completed, failed, duplicate, retry, returned, parked",
        "Deliveries settled: completed (completion told), failed (failure told, or withheld"
        " because the generation's failure was told), duplicate (a copy of a message already"
        " told: acked, nothing sent), retry (handed back with a back-off), returned (given back"
        " unstarted), parked (set aside for an operator).",
    ),
    MetricDoc(
        f"{PREFIX}_outcomes_undelivered_total",
        "counter",
        "`outcome`: completed, failed; `reason`: unreachable, unauthorized, not_found, rejected,"
        " unknown (a failure call's answer was lost); `parked`: true, false",
        "Decided outcomes the backend did not take: handed back to be told later (`parked`"
        " false) or given up on and parked with the outcome for an operator (`parked` true).",
    ),
    MetricDoc(
        f"{PREFIX}_failures_withheld_total",
        "counter",
        "",
        "Failures recorded but not sent because their generation's failure was already told"
        " (the backend refunds the user on every failure call).",
    ),
    MetricDoc(
        f"{PREFIX}_deliveries_returned_total",
        "counter",
        "`reason`: in_flight, held_too_long, connection_lost, backend_refused",
        "Deliveries given back without running: a copy of the job is in flight here, it"
        " waited longer than MAX_HOLD_SECONDS, its connection died, or the backend refuses the"
        " worker's token.",
    ),
    MetricDoc(
        f"{PREFIX}_job_failures_total",
        "counter",
        "`error_code`: every code of the error table",
        "Jobs that ended without an image, by error code (retried attempts included).",
    ),
    MetricDoc(
        f"{PREFIX}_job_duration_seconds",
        "histogram",
        "`outcome`",
        "Seconds from a delivery's intake to its settlement.",
    ),
    MetricDoc(
        f"{PREFIX}_jobs_in_flight",
        "gauge",
        "",
        "Jobs taken from the queue and not yet settled.",
    ),
    MetricDoc(
        f"{PREFIX}_webhook_attempts_total",
        "counter",
        "`kind`: progress, completed, failed",
        "HTTP attempts of the backend's webhooks (each retry counts).",
    ),
    MetricDoc(
        f"{PREFIX}_webhook_failures_total",
        "counter",
        "`kind`",
        "Webhook attempts that were not accepted (connection error, timeout, non-2xx).",
    ),
    MetricDoc(
        f"{PREFIX}_queue_depth",
        "gauge",
        "",
        "Messages ready in the job queue (passive declare); absent while the broker is away.",
    ),
    MetricDoc(
        f"{PREFIX}_lora_cache_hits_total",
        "counter",
        "`level`: disk, adapter",
        "LoRA lookups served by the cache: `disk` = no download, `adapter` = already loaded"
        " in the pipeline.",
    ),
    MetricDoc(
        f"{PREFIX}_lora_cache_misses_total",
        "counter",
        "`level`",
        "LoRA lookups that had to download (disk) or load into the pipeline (adapter).",
    ),
    MetricDoc(
        f"{PREFIX}_lora_cache_evictions_total",
        "counter",
        "`level`",
        "LoRAs dropped to stay within the cache's cap.",
    ),
    MetricDoc(
        f"{PREFIX}_lora_cache_entries",
        "gauge",
        "`level`",
        "LoRAs held by the cache now.",
    ),
    MetricDoc(
        f"{PREFIX}_lora_cache_bytes",
        "gauge",
        "`level`",
        "Bytes held by the cache now (where the cache counts them: disk).",
    ),
    MetricDoc(
        f"{PREFIX}_lora_cache_max_bytes",
        "gauge",
        "`level`",
        "The cache's cap in bytes (where it has one: disk, `LORA_CACHE_MAX_BYTES`).",
    ),
    MetricDoc(
        f"{PREFIX}_lora_cache_capacity",
        "gauge",
        "`level`",
        "The cache's cap in entries (where it has one: adapter).",
    ),
    MetricDoc(
        f"{PREFIX}_gpu_utilization_percent",
        "gauge",
        "`gpu` (index), `name`",
        "GPU utilization over NVML's last sample period; absent without NVML or a GPU.",
    ),
    MetricDoc(
        f"{PREFIX}_gpu_memory_used_bytes",
        "gauge",
        "`gpu`, `name`",
        "GPU memory in use (all processes); absent without NVML or a GPU.",
    ),
    MetricDoc(
        f"{PREFIX}_gpu_memory_total_bytes",
        "gauge",
        "`gpu`, `name`",
        "GPU memory installed; absent without NVML or a GPU.",
    ),
    MetricDoc(
        f"{PREFIX}_worker_info",
        "gauge (info)",
        "whatever the worker reports, e.g. `model`, `device`, `queue`",
        "Always 1; the labels describe this worker.",
    ),
    MetricDoc(
        "process_*, python_*",
        "various",
        "",
        "prometheus-client's process (CPU seconds, resident memory, open fds) and Python"
        " runtime (GC) metrics.",
    ),
)
"""Every metric ``PrometheusTelemetry`` can serve."""


def metrics_table() -> str:
    """``METRICS`` as a Markdown table (the README's list of metrics)."""
    lines = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for doc in METRICS:
        lines.append(f"| `{doc.name}` | {doc.type} | {doc.labels or '-'} | {doc.meaning} |")
    return "\n".join(lines) + "\n"


class GpuSampleLike(Protocol):
    """One GPU as ``adapters.gpu_monitor.GpuMonitor.sample()`` reports it."""

    @property
    def index(self) -> int:
        """The device index (as NVML numbers it)."""

    @property
    def name(self) -> str:
        """The product name."""

    @property
    def utilization_percent(self) -> float | None:
        """GPU utilization, 0-100; None where the device cannot tell."""

    @property
    def memory_used_bytes(self) -> int | None:
        """Memory in use."""

    @property
    def memory_total_bytes(self) -> int | None:
        """Memory installed."""


QueueDepthSource = Callable[[], "int | None"]
CacheStatsSource = Callable[[], LoraCacheStats | None]
GpuSource = Callable[[], Sequence[GpuSampleLike]]


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
    its adapter cache, exists only once loaded). All methods are thread-safe.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        queue_depth: QueueDepthSource | None = None,
        lora_caches: Mapping[str, CacheStatsSource] | None = None,
        gpus: GpuSource | None = None,
        info: Mapping[str, str] | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._queue_depth = queue_depth
        self._lora_caches: dict[str, CacheStatsSource] = dict(lora_caches or {})
        self._gpus = gpus
        self._failing: set[str] = set()

        def metric(kind: type[T], name: str, doc: str, **kwargs: object) -> T:
            return kind(name, doc, registry=self.registry, **kwargs)  # type: ignore[call-arg]

        self.generation_seconds = metric(
            Histogram,
            f"{PREFIX}_generation_seconds",
            "Wall time of one model call, in seconds.",
            buckets=GENERATION_BUCKETS,
        )
        self.batch_size = metric(
            Histogram,
            f"{PREFIX}_generation_batch_size",
            "Images produced by one model call.",
            buckets=BATCH_BUCKETS,
        )
        self.steps_per_second = metric(
            Gauge,
            f"{PREFIX}_denoising_steps_per_second",
            "Denoising steps per second of the last model call, counted per image.",
        )
        self.steps_total = metric(
            Counter, f"{PREFIX}_denoising_steps", "Denoising steps run, counted per image."
        )
        self.images_total = metric(
            Counter, f"{PREFIX}_images_generated", "Images the model produced."
        )
        self.jobs_total = metric(
            Counter, f"{PREFIX}_jobs", "Deliveries settled, by outcome.", labelnames=("outcome",)
        )
        self.failures_total = metric(
            Counter,
            f"{PREFIX}_job_failures",
            "Jobs that ended without an image, by error code.",
            labelnames=("error_code",),
        )
        self.job_seconds = metric(
            Histogram,
            f"{PREFIX}_job_duration_seconds",
            "Seconds from a delivery's intake to its settlement.",
            labelnames=("outcome",),
            buckets=JOB_BUCKETS,
        )
        self.in_flight = metric(
            Gauge, f"{PREFIX}_jobs_in_flight", "Jobs taken from the queue and not yet settled."
        )
        self.webhook_attempts = metric(
            Counter,
            f"{PREFIX}_webhook_attempts",
            "HTTP attempts of the backend's webhooks.",
            labelnames=("kind",),
        )
        self.webhook_failures = metric(
            Counter,
            f"{PREFIX}_webhook_failures",
            "Webhook attempts that were not accepted.",
            labelnames=("kind",),
        )
        self.undelivered = metric(
            Counter,
            f"{PREFIX}_outcomes_undelivered",
            "Decided outcomes the backend did not take.",
            labelnames=("outcome", "reason", "parked"),
        )
        self.withheld = metric(
            Counter,
            f"{PREFIX}_failures_withheld",
            "Failures not sent because their generation's failure was already told.",
        )
        self.returned = metric(
            Counter,
            f"{PREFIX}_deliveries_returned",
            "Deliveries given back without running.",
            labelnames=("reason",),
        )
        for reason in RETURN_REASONS:
            self.returned.labels(reason=reason)
        for reason in UNDELIVERED_REASONS:
            for verdict in ("completed", "failed"):
                for parked in ("true", "false"):
                    self.undelivered.labels(outcome=verdict, reason=reason, parked=parked)
        for outcome in OUTCOMES:
            self.jobs_total.labels(outcome=outcome)
            self.job_seconds.labels(outcome=outcome)
        for code in ErrorCode:
            self.failures_total.labels(error_code=code.value)
        for kind in WEBHOOK_KINDS:
            self.webhook_attempts.labels(kind=kind)
            self.webhook_failures.labels(kind=kind)
        if info:
            metric(Info, f"{PREFIX}_worker", "This worker.").info(dict(info))
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self.registry.register(_ScrapeTimeCollector(sources=self._sources, scrape=self._scrape))

    # --- scrape-time sources -----------------------------------------------------------------

    def watch_queue_depth(self, source: QueueDepthSource) -> None:
        """Read the queue depth from ``source`` at each scrape (None: absent)."""
        with self._lock:
            self._queue_depth = source

    def watch_lora_cache(self, level: str, source: CacheStatsSource) -> None:
        """Read a LoRA cache's stats at each scrape; ``level`` is ``disk`` or ``adapter``."""
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

    def _sources(
        self,
    ) -> tuple[QueueDepthSource | None, dict[str, CacheStatsSource], GpuSource | None]:
        with self._lock:
            return self._queue_depth, dict(self._lora_caches), self._gpus

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


class _ScrapeTimeCollector:
    """The pulled metrics: queue depth, LoRA caches, GPUs."""

    def __init__(
        self,
        *,
        sources: Callable[
            [], tuple[QueueDepthSource | None, dict[str, CacheStatsSource], GpuSource | None]
        ],
        scrape: Callable[[str, Callable[[], None]], None],
    ) -> None:
        self._sources = sources
        self._scrape = scrape

    def describe(self) -> Iterable[Metric]:
        """The families this collector may yield (names only, for the registry's checks)."""
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        """Read every source now; absent or failing sources give absent metrics."""
        queue_depth, caches, gpus = self._sources()
        families = self._families()
        if queue_depth is not None:
            self._scrape("queue depth", lambda: _add_queue_depth(families, queue_depth()))
        for level, source in sorted(caches.items()):
            self._scrape(
                f"LoRA cache ({level})",
                functools.partial(_add_cache_stats, families, level, source),
            )
        if gpus is not None:
            self._scrape("GPU samples", lambda: _add_gpu_samples(families, gpus()))
        for family in families.values():
            if family.samples:
                yield family

    @staticmethod
    def _families() -> dict[str, Metric]:
        gpu_labels = ["gpu", "name"]
        return {
            "queue_depth": GaugeMetricFamily(
                f"{PREFIX}_queue_depth", "Messages ready in the job queue."
            ),
            "hits": CounterMetricFamily(
                f"{PREFIX}_lora_cache_hits", "LoRA lookups served by the cache.", labels=["level"]
            ),
            "misses": CounterMetricFamily(
                f"{PREFIX}_lora_cache_misses",
                "LoRA lookups that had to download or load.",
                labels=["level"],
            ),
            "evictions": CounterMetricFamily(
                f"{PREFIX}_lora_cache_evictions",
                "LoRAs dropped to stay within the cap.",
                labels=["level"],
            ),
            "entries": GaugeMetricFamily(
                f"{PREFIX}_lora_cache_entries", "LoRAs held by the cache now.", labels=["level"]
            ),
            "bytes": GaugeMetricFamily(
                f"{PREFIX}_lora_cache_bytes", "Bytes held by the cache now.", labels=["level"]
            ),
            "max_bytes": GaugeMetricFamily(
                f"{PREFIX}_lora_cache_max_bytes", "The cache's cap in bytes.", labels=["level"]
            ),
            "capacity": GaugeMetricFamily(
                f"{PREFIX}_lora_cache_capacity", "The cache's cap in entries.", labels=["level"]
            ),
            "gpu_utilization_percent": GaugeMetricFamily(
                f"{PREFIX}_gpu_utilization_percent", "GPU utilization.", labels=gpu_labels
            ),
            "gpu_memory_used_bytes": GaugeMetricFamily(
                f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use.", labels=gpu_labels
            ),
            "gpu_memory_total_bytes": GaugeMetricFamily(
                f"{PREFIX}_gpu_memory_total_bytes", "GPU memory installed.", labels=gpu_labels
            ),
        }


def _add_queue_depth(families: dict[str, Metric], depth: int | None) -> None:
    if depth is not None:
        families["queue_depth"].add_metric([], float(depth))


def _add_cache_stats(families: dict[str, Metric], level: str, source: CacheStatsSource) -> None:
    """One cache's snapshot into the families; fields it lacks (or a None snapshot) are left
    out. Values are read before any is added, so a bad snapshot adds nothing."""
    stats = source()
    if stats is None:
        return
    entries = getattr(stats, "entries", None)
    if entries is None:
        entries = getattr(stats, "loaded", None)
    values = [
        (key, _number(value))
        for key, value in (
            ("hits", getattr(stats, "hits", None)),
            ("misses", getattr(stats, "misses", None)),
            ("evictions", getattr(stats, "evictions", None)),
            ("entries", entries),
            ("bytes", getattr(stats, "bytes", None)),
            ("max_bytes", getattr(stats, "max_bytes", None)),
            ("capacity", getattr(stats, "capacity", None)),
        )
        if value is not None
    ]
    for key, value in values:
        families[key].add_metric([level], value)


def _add_gpu_samples(families: dict[str, Metric], samples: Iterable[GpuSampleLike]) -> None:
    """Per-GPU gauges; a field the device cannot tell (None) is left out."""
    values = []
    for sample in samples:
        labels = [str(int(sample.index)), str(sample.name)]
        for key, value in (
            ("gpu_utilization_percent", sample.utilization_percent),
            ("gpu_memory_used_bytes", sample.memory_used_bytes),
            ("gpu_memory_total_bytes", sample.memory_total_bytes),
        ):
            if value is not None:
                values.append((key, labels, _number(value)))
    for key, labels, value in values:
        families[key].add_metric(labels, value)


def _number(value: object) -> float:
    """A metric value; anything but a real number is an error of the source."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)
