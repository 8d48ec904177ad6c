"""Every metric the worker serves, defined once: name, type, labels and their values, help text.

``PrometheusTelemetry`` registers the pushed metrics from these definitions, the scrape-time
collector builds the pulled ones from them, and ``adapters.prometheus.docs`` renders them as the
table of docs/metrics.md: the help text an operator reads in a scrape and in the documentation
is the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from domain.errors import ErrorCode
from domain.settlement_policy import Settled

PREFIX = "stylelicense"

MetricType = Literal["counter", "gauge", "histogram", "info"]


@dataclass(frozen=True)
class MetricLabel:
    """A label of a metric (for an info metric: a key of the info it reports).

    ``values``: every value it takes, where they are known in advance (a pushed metric whose
    labels all have them starts each series at 0). ``meaning``: what a value is otherwise.
    """

    name: str
    values: tuple[str, ...] = ()
    meaning: str = ""


@dataclass(frozen=True)
class MetricDefinition:
    """One metric: ``name`` as registered (prometheus-client adds ``_total`` to a counter's and
    ``_info`` to an info's exposed name), its type, help text, labels and histogram buckets."""

    name: str
    type: MetricType
    help: str
    labels: tuple[MetricLabel, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exposed_name(self) -> str:
        """The name a scrape shows (a histogram's series add ``_bucket``, ``_sum``, ``_count``)."""
        return self.name + {"counter": "_total", "info": "_info"}.get(self.type, "")

    @property
    def label_names(self) -> tuple[str, ...]:
        """The labels' names, in order."""
        return tuple(label.name for label in self.labels)


GENERATION_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)
"""Seconds of one model call: SD 1.5 takes about 1-10 s per 512x512 image on a GPU (50 steps),
a batch or a large size up to a minute or two; the CPU fallback lands in the top buckets."""

JOB_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
"""Seconds from a delivery's intake to its settlement: generation plus downloads, upload,
webhooks, and the wait behind the jobs held before it (up to MAX_CONCURRENT_GENERATIONS)."""

BATCH_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)
"""Images per model call (MAX_BATCH_SIZE is 4 by default)."""

OUTCOME = MetricLabel("outcome", tuple(settled.value for settled in Settled))
"""How a delivery was settled (``domain.settlement_policy.Settled``)."""
WEBHOOK_KIND = MetricLabel("kind", ("progress", "completed", "failed"))
"""The backend's webhooks."""
CACHE_LEVEL = MetricLabel("level", ("disk", "pipeline"))
"""The LoRA cache: ``disk`` (downloaded files), ``pipeline`` (LoRAs in the diffusers pipeline)."""
GPU = (
    MetricLabel("gpu", meaning="device index, as nvidia-smi numbers it"),
    MetricLabel("name", meaning="product name"),
)

# --- pushed: recorded by PrometheusTelemetry as the worker tells it events ----------------------

GENERATION_SECONDS = MetricDefinition(
    f"{PREFIX}_generation_seconds",
    "histogram",
    "Wall time of one model call (a batch of 1 to MAX_BATCH_SIZE images), in seconds.",
    buckets=GENERATION_BUCKETS,
)
GENERATION_BATCH_SIZE = MetricDefinition(
    f"{PREFIX}_generation_batch_size",
    "histogram",
    "Images produced by one model call: how well batching fills up.",
    buckets=BATCH_BUCKETS,
)
DENOISING_STEPS_PER_SECOND = MetricDefinition(
    f"{PREFIX}_denoising_steps_per_second",
    "gauge",
    "Denoising steps per second of the last model call, counted per image"
    " (steps x images / seconds). For the average over a window use"
    f" rate({PREFIX}_denoising_steps_total[5m]) / rate({PREFIX}_generation_seconds_sum[5m]).",
)
DENOISING_STEPS = MetricDefinition(
    f"{PREFIX}_denoising_steps", "counter", "Denoising steps run, counted per image."
)
IMAGES_GENERATED = MetricDefinition(
    f"{PREFIX}_images_generated",
    "counter",
    "Images the model produced (before signing and upload).",
)
JOBS = MetricDefinition(
    f"{PREFIX}_jobs",
    "counter",
    "Deliveries settled: completed (completion told), failed (failure told, or withheld"
    " because the generation's failure was told), duplicate (a copy of a message already"
    " told: acked, nothing sent), retry (handed back with a back-off), returned (given back"
    " unstarted), parked (set aside for an operator).",
    labels=(OUTCOME,),
)
OUTCOMES_UNDELIVERED = MetricDefinition(
    f"{PREFIX}_outcomes_undelivered",
    "counter",
    "Decided outcomes the backend did not take: handed back to be told later (parked false)"
    " or given up on and parked with the outcome for an operator (parked true); reason unknown:"
    " a failure call's answer was lost.",
    labels=(
        MetricLabel("outcome", ("completed", "failed")),
        MetricLabel("reason", ("unreachable", "unauthorized", "not_found", "rejected", "unknown")),
        MetricLabel("parked", ("true", "false")),
    ),
)
FAILURES_WITHHELD = MetricDefinition(
    f"{PREFIX}_failures_withheld",
    "counter",
    "Failures recorded but not sent because their generation's failure was already told"
    " (the backend refunds the user on every failure call).",
)
DELIVERIES_RETURNED = MetricDefinition(
    f"{PREFIX}_deliveries_returned",
    "counter",
    "Deliveries given back without running: a copy of the job is in flight here, it waited"
    " longer than MAX_HOLD_SECONDS, its connection died, or the backend refuses the worker's"
    " token.",
    labels=(
        MetricLabel("reason", ("in_flight", "held_too_long", "connection_lost", "backend_refused")),
    ),
)
JOB_FAILURES = MetricDefinition(
    f"{PREFIX}_job_failures",
    "counter",
    "Jobs that ended without an image, by error code (retried attempts included).",
    labels=(MetricLabel("error_code", tuple(code.value for code in ErrorCode)),),
)
JOB_DURATION_SECONDS = MetricDefinition(
    f"{PREFIX}_job_duration_seconds",
    "histogram",
    "Seconds from a delivery's intake to its settlement.",
    labels=(OUTCOME,),
    buckets=JOB_BUCKETS,
)
JOBS_IN_FLIGHT = MetricDefinition(
    f"{PREFIX}_jobs_in_flight", "gauge", "Jobs taken from the queue and not yet settled."
)
WEBHOOK_ATTEMPTS = MetricDefinition(
    f"{PREFIX}_webhook_attempts",
    "counter",
    "HTTP attempts of the backend's webhooks (each retry counts).",
    labels=(WEBHOOK_KIND,),
)
WEBHOOK_FAILURES = MetricDefinition(
    f"{PREFIX}_webhook_failures",
    "counter",
    "Webhook attempts that were not accepted (connection error, timeout, non-2xx).",
    labels=(WEBHOOK_KIND,),
)
WORKER = MetricDefinition(
    f"{PREFIX}_worker",
    "info",
    "Always 1; the labels describe this worker.",
    labels=(
        MetricLabel("model", meaning="MODEL_ID"),
        MetricLabel("device", meaning="MODEL_DEVICE"),
        MetricLabel("queue", meaning="RABBITMQ_QUEUE"),
    ),
)

# --- pulled: read from their sources at each scrape; absent while a source has no answer -------

QUEUE_DEPTH = MetricDefinition(
    f"{PREFIX}_queue_depth",
    "gauge",
    "Messages ready in the job queue (passive declare); absent while the broker is away.",
)
PARKED_MESSAGES = MetricDefinition(
    f"{PREFIX}_parked_messages",
    "gauge",
    "Messages ready in the parked queue `<queue>.parked`, set aside for an operator (passive"
    " declare; `python -m app parked list` shows them); absent while the broker is away or the"
    " queue is missing.",
)
LORA_CACHE_HITS = MetricDefinition(
    f"{PREFIX}_lora_cache_hits",
    "counter",
    "LoRA lookups served by the cache: disk = no download, pipeline = already loaded in the"
    " pipeline.",
    labels=(CACHE_LEVEL,),
)
LORA_CACHE_MISSES = MetricDefinition(
    f"{PREFIX}_lora_cache_misses",
    "counter",
    "LoRA lookups that had to download (disk) or load into the pipeline (pipeline).",
    labels=(CACHE_LEVEL,),
)
LORA_CACHE_EVICTIONS = MetricDefinition(
    f"{PREFIX}_lora_cache_evictions",
    "counter",
    "LoRAs dropped to stay within the cache's cap.",
    labels=(CACHE_LEVEL,),
)
LORA_CACHE_ENTRIES = MetricDefinition(
    f"{PREFIX}_lora_cache_entries",
    "gauge",
    "LoRAs held by the cache now.",
    labels=(CACHE_LEVEL,),
)
LORA_CACHE_BYTES = MetricDefinition(
    f"{PREFIX}_lora_cache_bytes",
    "gauge",
    "Bytes held by the cache now (where the cache counts them: disk).",
    labels=(CACHE_LEVEL,),
)
LORA_CACHE_MAX_BYTES = MetricDefinition(
    f"{PREFIX}_lora_cache_max_bytes",
    "gauge",
    "The cache's cap in bytes (where it has one: disk, LORA_CACHE_MAX_BYTES).",
    labels=(CACHE_LEVEL,),
)
LORA_CACHE_CAPACITY = MetricDefinition(
    f"{PREFIX}_lora_cache_capacity",
    "gauge",
    "The cache's cap in entries (where it has one: pipeline, LORA_PIPELINE_CACHE_SIZE).",
    labels=(CACHE_LEVEL,),
)
GPU_UTILIZATION_PERCENT = MetricDefinition(
    f"{PREFIX}_gpu_utilization_percent",
    "gauge",
    "GPU utilization over NVML's last sample period; absent without NVML or a GPU.",
    labels=GPU,
)
GPU_MEMORY_USED_BYTES = MetricDefinition(
    f"{PREFIX}_gpu_memory_used_bytes",
    "gauge",
    "GPU memory in use (all processes); absent without NVML or a GPU.",
    labels=GPU,
)
GPU_MEMORY_TOTAL_BYTES = MetricDefinition(
    f"{PREFIX}_gpu_memory_total_bytes",
    "gauge",
    "GPU memory installed; absent without NVML or a GPU.",
    labels=GPU,
)

METRICS: tuple[MetricDefinition, ...] = (
    GENERATION_SECONDS,
    GENERATION_BATCH_SIZE,
    DENOISING_STEPS_PER_SECOND,
    DENOISING_STEPS,
    IMAGES_GENERATED,
    JOBS,
    OUTCOMES_UNDELIVERED,
    FAILURES_WITHHELD,
    DELIVERIES_RETURNED,
    JOB_FAILURES,
    JOB_DURATION_SECONDS,
    JOBS_IN_FLIGHT,
    WEBHOOK_ATTEMPTS,
    WEBHOOK_FAILURES,
    QUEUE_DEPTH,
    PARKED_MESSAGES,
    LORA_CACHE_HITS,
    LORA_CACHE_MISSES,
    LORA_CACHE_EVICTIONS,
    LORA_CACHE_ENTRIES,
    LORA_CACHE_BYTES,
    LORA_CACHE_MAX_BYTES,
    LORA_CACHE_CAPACITY,
    GPU_UTILIZATION_PERCENT,
    GPU_MEMORY_USED_BYTES,
    GPU_MEMORY_TOTAL_BYTES,
    WORKER,
)
"""Every metric of the worker's own, in the documentation's order (prometheus-client adds its
``process_*`` and ``python_*`` metrics)."""
