"""PrometheusTelemetry: pushed events move the right series, pulled sources appear or are absent."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.prometheus import PrometheusTelemetry
from adapters.prometheus.definitions import METRICS
from adapters.prometheus.docs import REGENERATE, metrics_page, metrics_table
from domain.errors import ErrorCode
from ports.telemetry import Telemetry


@dataclass(frozen=True)
class DiskStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int = 2**30


@dataclass(frozen=True)
class PipelineLoraStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    capacity: int = 8


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization_percent: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None


def value(telemetry: PrometheusTelemetry, metric: str, /, **labels: str) -> float | None:
    return telemetry.registry.get_sample_value(metric, labels)


def names_served(telemetry: PrometheusTelemetry) -> set[str]:
    """The metric names as exposed (counters end in _total, info metrics in _info)."""
    suffixes = {"counter": "_total", "info": "_info"}
    return {family.name + suffixes.get(family.type, "") for family in telemetry.registry.collect()}


def test_it_implements_the_port_and_starts_every_known_series_at_zero() -> None:
    telemetry = PrometheusTelemetry()
    assert isinstance(telemetry, Telemetry)
    for outcome in ("completed", "failed", "duplicate", "retry", "returned", "parked"):
        assert value(telemetry, "stylelicense_jobs_total", outcome=outcome) == 0
    for reason in ("in_flight", "held_too_long", "connection_lost", "backend_refused"):
        assert value(telemetry, "stylelicense_deliveries_returned_total", reason=reason) == 0
    for reason in ("unreachable", "unauthorized", "not_found", "rejected", "unknown"):
        for parked in ("true", "false"):
            labels = {"outcome": "failed", "reason": reason, "parked": parked}
            assert value(telemetry, "stylelicense_outcomes_undelivered_total", **labels) == 0
    assert value(telemetry, "stylelicense_failures_withheld_total") == 0
    for code in ErrorCode:
        assert value(telemetry, "stylelicense_job_failures_total", error_code=code.value) == 0
    for kind in ("progress", "completed", "failed"):
        assert value(telemetry, "stylelicense_webhook_attempts_total", kind=kind) == 0
    assert value(telemetry, "stylelicense_jobs_in_flight") == 0
    assert value(telemetry, "process_cpu_seconds_total") is not None


def test_settlement_events_move_their_counters() -> None:
    telemetry = PrometheusTelemetry(process_metrics=False)
    telemetry.outcome_undelivered(outcome="completed", reason="not_found", parked=False)
    telemetry.outcome_undelivered(outcome="completed", reason="not_found", parked=False)
    telemetry.outcome_undelivered(outcome="failed", reason="unknown", parked=True)
    telemetry.failure_withheld()
    telemetry.delivery_returned(reason="in_flight")
    undelivered = "stylelicense_outcomes_undelivered_total"
    labels = {"outcome": "completed", "reason": "not_found"}
    assert value(telemetry, undelivered, **labels, parked="false") == 2
    assert value(telemetry, undelivered, **labels, parked="true") == 0
    assert value(telemetry, undelivered, outcome="failed", reason="unknown", parked="true") == 1
    assert value(telemetry, "stylelicense_failures_withheld_total") == 1
    assert value(telemetry, "stylelicense_deliveries_returned_total", reason="in_flight") == 1
    assert value(telemetry, "stylelicense_deliveries_returned_total", reason="held_too_long") == 0


def test_job_events_move_the_counters_by_the_right_amounts() -> None:
    telemetry = PrometheusTelemetry(process_metrics=False)
    for _ in range(3):
        telemetry.job_started()
    assert value(telemetry, "stylelicense_jobs_in_flight") == 3
    telemetry.job_finished(outcome="completed", error_code=None, seconds=12.0)
    telemetry.job_finished(outcome="retry", error_code=ErrorCode.GPU_OOM, seconds=3.0)
    telemetry.job_finished(outcome="failed", error_code="LORA_NOT_FOUND", seconds=0.5)
    assert value(telemetry, "stylelicense_jobs_in_flight") == 0
    assert value(telemetry, "stylelicense_jobs_total", outcome="completed") == 1
    assert value(telemetry, "stylelicense_jobs_total", outcome="retry") == 1
    assert value(telemetry, "stylelicense_jobs_total", outcome="failed") == 1
    assert value(telemetry, "stylelicense_job_failures_total", error_code="GPU_OOM") == 1
    assert value(telemetry, "stylelicense_job_failures_total", error_code="LORA_NOT_FOUND") == 1
    assert value(telemetry, "stylelicense_job_failures_total", error_code="MODEL_ERROR") == 0
    histogram = "stylelicense_job_duration_seconds_bucket"
    assert value(telemetry, histogram, outcome="completed", le="10.0") == 0
    assert value(telemetry, histogram, outcome="completed", le="20.0") == 1
    assert value(telemetry, "stylelicense_job_duration_seconds_sum", outcome="retry") == 3.0


def test_a_model_call_records_its_time_images_and_steps_per_second() -> None:
    telemetry = PrometheusTelemetry(process_metrics=False)
    telemetry.images_generated(count=1, steps=50, seconds=2.5)
    telemetry.images_generated(count=4, steps=25, seconds=5.0)
    assert value(telemetry, "stylelicense_images_generated_total") == 5
    assert value(telemetry, "stylelicense_denoising_steps_total") == 50 + 100
    assert value(telemetry, "stylelicense_denoising_steps_per_second") == 20.0  # the last call
    assert value(telemetry, "stylelicense_generation_seconds_count") == 2
    assert value(telemetry, "stylelicense_generation_seconds_sum") == 7.5
    assert value(telemetry, "stylelicense_generation_seconds_bucket", le="2.0") == 0
    assert value(telemetry, "stylelicense_generation_seconds_bucket", le="3.0") == 1
    assert value(telemetry, "stylelicense_generation_seconds_bucket", le="5.0") == 2
    assert value(telemetry, "stylelicense_generation_batch_size_bucket", le="1.0") == 1
    telemetry.images_generated(count=1, steps=10, seconds=0.0)  # no division by zero
    assert value(telemetry, "stylelicense_denoising_steps_per_second") == 20.0


def test_webhook_attempts_and_failures_by_kind() -> None:
    telemetry = PrometheusTelemetry(process_metrics=False)
    telemetry.webhook_attempt(kind="completed", ok=False)
    telemetry.webhook_attempt(kind="completed", ok=True)
    telemetry.webhook_attempt(kind="progress", ok=True)
    assert value(telemetry, "stylelicense_webhook_attempts_total", kind="completed") == 2
    assert value(telemetry, "stylelicense_webhook_failures_total", kind="completed") == 1
    assert value(telemetry, "stylelicense_webhook_attempts_total", kind="progress") == 1
    assert value(telemetry, "stylelicense_webhook_failures_total", kind="progress") == 0


def test_recording_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = PrometheusTelemetry(process_metrics=False)
    with caplog.at_level(logging.WARNING, logger="adapters.prometheus.telemetry"):
        telemetry.images_generated(count=-1, steps=10, seconds=1.0)  # a counter cannot go down
    assert "images_generated could not be recorded" in caplog.text


def test_scrape_time_sources_are_read_at_each_scrape() -> None:
    depth = {"value": 3, "parked": 2}
    telemetry = PrometheusTelemetry(
        process_metrics=False,
        queue_depth=lambda: depth["value"],
        parked_depth=lambda: depth["parked"],
        lora_caches={
            "disk": lambda: DiskStats(hits=5, misses=2, evictions=1, entries=4, bytes=4096),
            "pipeline": lambda: PipelineLoraStats(hits=9, misses=3, evictions=2, entries=4),
        },
        gpus=lambda: [
            GpuSample(0, "NVIDIA H200", 87.0, 20 * 2**30, 141 * 2**30),
            GpuSample(1, "NVIDIA H200", None, 2**30, 141 * 2**30),
        ],
    )
    assert value(telemetry, "stylelicense_queue_depth") == 3
    assert value(telemetry, "stylelicense_parked_messages") == 2
    depth["value"], depth["parked"] = 8, 0
    assert value(telemetry, "stylelicense_queue_depth") == 8
    assert value(telemetry, "stylelicense_parked_messages") == 0
    assert value(telemetry, "stylelicense_lora_cache_hits_total", level="disk") == 5
    assert value(telemetry, "stylelicense_lora_cache_misses_total", level="pipeline") == 3
    assert value(telemetry, "stylelicense_lora_cache_evictions_total", level="pipeline") == 2
    assert value(telemetry, "stylelicense_lora_cache_entries", level="pipeline") == 4
    assert value(telemetry, "stylelicense_lora_cache_bytes", level="disk") == 4096
    assert value(telemetry, "stylelicense_lora_cache_bytes", level="pipeline") is None
    assert value(telemetry, "stylelicense_lora_cache_max_bytes", level="disk") == 2**30
    assert value(telemetry, "stylelicense_lora_cache_capacity", level="pipeline") == 8
    assert value(telemetry, "stylelicense_lora_cache_capacity", level="disk") is None
    gpu0 = {"gpu": "0", "name": "NVIDIA H200"}
    gpu1 = {"gpu": "1", "name": "NVIDIA H200"}
    assert value(telemetry, "stylelicense_gpu_utilization_percent", **gpu0) == 87.0
    assert value(telemetry, "stylelicense_gpu_utilization_percent", **gpu1) is None
    assert value(telemetry, "stylelicense_gpu_memory_used_bytes", **gpu1) == 2**30
    assert value(telemetry, "stylelicense_gpu_memory_total_bytes", **gpu0) == 141 * 2**30


def test_absent_sources_give_absent_metrics_not_zeros() -> None:
    telemetry = PrometheusTelemetry(
        process_metrics=False,
        queue_depth=lambda: None,
        parked_depth=lambda: None,
        lora_caches={"pipeline": lambda: None},
        gpus=list,
    )
    served = names_served(telemetry)
    for name in (
        "queue_depth",
        "parked_messages",
        "lora_cache_hits_total",
        "lora_cache_entries",
        "gpu_memory_used_bytes",
    ):
        assert f"stylelicense_{name}" not in served
    assert "stylelicense_jobs_total" in served


def test_sources_can_be_attached_after_construction() -> None:
    telemetry = PrometheusTelemetry(process_metrics=False)
    assert value(telemetry, "stylelicense_lora_cache_hits_total", level="pipeline") is None
    telemetry.watch_lora_cache("pipeline", lambda: PipelineLoraStats(1, 0, 0, 1))
    telemetry.watch_queue_depth(lambda: 0)
    telemetry.watch_parked_depth(lambda: 4)
    telemetry.watch_gpus(lambda: [GpuSample(0, "RTX 4090", 10.0, 1, 2)])
    assert value(telemetry, "stylelicense_lora_cache_hits_total", level="pipeline") == 1
    assert value(telemetry, "stylelicense_queue_depth") == 0
    assert value(telemetry, "stylelicense_parked_messages") == 4
    assert value(telemetry, "stylelicense_gpu_utilization_percent", gpu="0", name="RTX 4090") == 10


def test_a_failing_source_is_skipped_logged_once_and_the_scrape_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = {"on": True}

    def queue_depth() -> int:
        if broken["on"]:
            raise ConnectionError("broker gone")
        return 2

    telemetry = PrometheusTelemetry(
        process_metrics=False,
        queue_depth=queue_depth,
        gpus=lambda: [GpuSample(0, "H200", "busy", 1, 2)],  # type: ignore[arg-type]
        lora_caches={"disk": lambda: DiskStats(1, 2, 3, 4, 5)},
    )
    with caplog.at_level(logging.DEBUG, logger="adapters.prometheus.telemetry"):
        served = names_served(telemetry)
        names_served(telemetry)
    assert "stylelicense_queue_depth" not in served
    assert "stylelicense_gpu_utilization_percent" not in served
    assert "stylelicense_gpu_memory_used_bytes" not in served  # nothing half-added
    assert value(telemetry, "stylelicense_lora_cache_hits_total", level="disk") == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(r.getMessage().split(" unavailable")[0] for r in warnings) == [
        "metrics: GPU samples",
        "metrics: queue depth",
    ]
    broken["on"] = False
    assert value(telemetry, "stylelicense_queue_depth") == 2


def test_each_instance_has_its_own_registry() -> None:
    first, second = PrometheusTelemetry(), PrometheusTelemetry()
    first.job_started()
    assert value(first, "stylelicense_jobs_in_flight") == 1
    assert value(second, "stylelicense_jobs_in_flight") == 0


def test_every_metric_served_is_documented_in_the_table() -> None:
    telemetry = PrometheusTelemetry(
        queue_depth=lambda: 1,
        parked_depth=lambda: 0,
        lora_caches={
            "disk": lambda: DiskStats(1, 1, 1, 1, 1),
            "pipeline": lambda: PipelineLoraStats(1, 1, 1, 1),
        },
        gpus=lambda: [GpuSample(0, "H200", 1.0, 1, 2)],
        info={"model": "sd15", "device": "cuda"},
    )
    documented = {metric.exposed_name for metric in METRICS}
    served = {name for name in names_served(telemetry) if name.startswith("stylelicense_")}
    assert served == documented
    table = metrics_table()
    assert all(f"| `{name}` |" in table for name in documented)
    assert value(telemetry, "stylelicense_worker_info", model="sd15", device="cuda") == 1


def test_the_real_snapshots_of_the_disk_cache_and_the_gpu_monitor_fit() -> None:
    # pylint: disable=import-outside-toplevel
    from adapters.diffusion.lora.disk_cache import LoraDiskCacheStats
    from adapters.nvml import GpuSample as MonitorSample

    stats = LoraDiskCacheStats(hits=3, misses=1, evictions=0, entries=1, bytes=10, max_bytes=100)
    telemetry = PrometheusTelemetry(
        process_metrics=False,
        lora_caches={"disk": lambda: stats},
        gpus=lambda: [MonitorSample(0, "NVIDIA H200", None, 5, 9)],
    )
    assert value(telemetry, "stylelicense_lora_cache_hits_total", level="disk") == 3
    assert value(telemetry, "stylelicense_lora_cache_entries", level="disk") == 1
    assert value(telemetry, "stylelicense_lora_cache_max_bytes", level="disk") == 100
    labels = {"gpu": "0", "name": "NVIDIA H200"}
    assert value(telemetry, "stylelicense_gpu_memory_used_bytes", **labels) == 5
    assert value(telemetry, "stylelicense_gpu_utilization_percent", **labels) is None


def test_docs_metrics_md_is_the_rendering_of_the_definitions() -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    assert page.read_text(encoding="utf-8") == metrics_page(), f"regenerate it: {REGENERATE}"
