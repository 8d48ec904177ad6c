"""The metrics read at scrape time: queue depths, LoRA caches, GPUs, each from a callable source.

A source that answers None (or no GPU) makes its metrics absent rather than zero; a source that
raises, or answers something that is not a number, adds nothing and the rest of the scrape goes
on (the caller's ``scrape`` logs it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from adapters.prometheus.definitions import (
    GPU_MEMORY_TOTAL_BYTES,
    GPU_MEMORY_USED_BYTES,
    GPU_UTILIZATION_PERCENT,
    LORA_CACHE_BYTES,
    LORA_CACHE_CAPACITY,
    LORA_CACHE_ENTRIES,
    LORA_CACHE_EVICTIONS,
    LORA_CACHE_HITS,
    LORA_CACHE_MAX_BYTES,
    LORA_CACHE_MISSES,
    PARKED_MESSAGES,
    QUEUE_DEPTH,
    MetricDefinition,
)
from ports.telemetry import LoraCacheStats


class GpuSampleLike(Protocol):
    """One GPU as ``adapters.nvml.GpuMonitor.sample()`` reports it."""

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
Sources = tuple[
    QueueDepthSource | None, QueueDepthSource | None, dict[str, CacheStatsSource], GpuSource | None
]
"""The sources of one scrape: the job queue's depth, the parked queue's, LoRA caches by level,
GPUs."""

CACHE_FIELDS = (
    ("hits", LORA_CACHE_HITS),
    ("misses", LORA_CACHE_MISSES),
    ("evictions", LORA_CACHE_EVICTIONS),
    ("entries", LORA_CACHE_ENTRIES),
    ("bytes", LORA_CACHE_BYTES),
    ("max_bytes", LORA_CACHE_MAX_BYTES),
    ("capacity", LORA_CACHE_CAPACITY),
)
"""A cache stats field and the metric it feeds; a cache's stats may lack any but the first three."""

_FAMILIES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}


class ScrapeTimeCollector:
    """The pulled metrics, read from ``sources()`` at each collect.

    ``scrape(what, step)`` runs each source's part of the scrape and handles its failure.
    """

    def __init__(
        self,
        *,
        sources: Callable[[], Sources],
        scrape: Callable[[str, Callable[[], None]], None],
    ) -> None:
        self._sources = sources
        self._scrape = scrape

    def describe(self) -> Iterable[Metric]:
        """The families this collector may yield (names only, for the registry's checks)."""
        return list(_families().values())

    def collect(self) -> Iterator[Metric]:
        """Read every source now; absent or failing sources give absent metrics."""
        queue_depth, parked_depth, caches, gpus = self._sources()
        families = _families()
        if queue_depth is not None:
            self._scrape("queue depth", lambda: _add_depth(families[QUEUE_DEPTH], queue_depth()))
        if parked_depth is not None:
            self._scrape(
                "parked depth", lambda: _add_depth(families[PARKED_MESSAGES], parked_depth())
            )
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


def _families() -> dict[MetricDefinition, Metric]:
    """An empty family of each pulled metric."""
    pulled = [QUEUE_DEPTH, PARKED_MESSAGES, *(definition for _, definition in CACHE_FIELDS)]
    pulled += [GPU_UTILIZATION_PERCENT, GPU_MEMORY_USED_BYTES, GPU_MEMORY_TOTAL_BYTES]
    return {
        definition: _FAMILIES[definition.type](
            definition.name, definition.help, labels=list(definition.label_names)
        )
        for definition in pulled
    }


def _add_depth(family: Metric, depth: int | None) -> None:
    if depth is not None:
        family.add_metric([], float(depth))


def _add_cache_stats(
    families: dict[MetricDefinition, Metric], level: str, source: CacheStatsSource
) -> None:
    """One cache's snapshot into the families; fields it lacks (or a None snapshot) are left
    out. Values are read before any is added, so a bad snapshot adds nothing."""
    stats = source()
    if stats is None:
        return
    values = [
        (definition, _number(value))
        for field, definition in CACHE_FIELDS
        if (value := getattr(stats, field, None)) is not None
    ]
    for definition, value in values:
        families[definition].add_metric([level], value)


def _add_gpu_samples(
    families: dict[MetricDefinition, Metric], samples: Iterable[GpuSampleLike]
) -> None:
    """Per-GPU gauges; a field the device cannot tell (None) is left out."""
    values = []
    for sample in samples:
        labels = [str(int(sample.index)), str(sample.name)]
        for definition, value in (
            (GPU_UTILIZATION_PERCENT, sample.utilization_percent),
            (GPU_MEMORY_USED_BYTES, sample.memory_used_bytes),
            (GPU_MEMORY_TOTAL_BYTES, sample.memory_total_bytes),
        ):
            if value is not None:
                values.append((definition, labels, _number(value)))
    for definition, labels, value in values:
        families[definition].add_metric(labels, value)


def _number(value: object) -> float:
    """A metric value; anything but a real number is an error of the source."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)
