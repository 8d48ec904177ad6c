"""What the domain tells the operators: job starts and ends, images, failures by code."""

from __future__ import annotations

import json

import pytest
from dependency_injector import providers

from domain.errors import GpuOutOfMemory, LoraInvalid, NotifyError
from ports.task_source import Delivery
from ports.telemetry import NoTelemetry, Telemetry
from tests.messages import backend_message
from tests.unit.conftest import Wired
from tests.unit.fakes import FakeTelemetry
from tests.unit.test_runner import run_all


@pytest.fixture
def telemetry(wired: Wired) -> FakeTelemetry:
    recorder = FakeTelemetry()
    wired.container.telemetry.override(providers.Object(recorder))
    return recorder


def test_a_completed_job_is_one_start_one_end_and_its_image(
    wired: Wired, telemetry: FakeTelemetry
) -> None:
    wired.source.put(backend_message(1))
    run_all(wired)
    assert [event for event, _ in telemetry.events].count("started") == 1
    (finished,) = telemetry.of("finished")
    assert finished["outcome"] == "completed" and finished["error_code"] is None
    assert finished["seconds"] >= 0
    (images,) = telemetry.of("images")
    assert images["count"] == 1 and images["steps"] == 50
    assert images["seconds"] == pytest.approx(50 * wired.model.seconds_per_step)


def test_failures_are_counted_by_code_and_retries_as_retries(
    wired: Wired, telemetry: FakeTelemetry
) -> None:
    wired.model.fail_with.extend([GpuOutOfMemory("oom"), LoraInvalid("bad file")])
    wired.source.put(backend_message(2))
    run_all(wired)
    outcomes = [(e["outcome"], e["error_code"]) for e in telemetry.of("finished")]
    assert outcomes == [("retry", "GPU_OOM"), ("failed", "LORA_INVALID")]
    assert telemetry.of("images") == []


def test_a_poison_message_counts_as_a_failed_job(wired: Wired, telemetry: FakeTelemetry) -> None:
    wired.source.put(backend_message(3, aspect_ratio="3:4"))
    run_all(wired)
    starts = [event for event, _ in telemetry.events].count("started")
    (finished,) = telemetry.of("finished")
    assert starts == 1 and finished["error_code"] == "INVALID_REQUEST"


def test_a_failure_waiting_for_the_backend_counts_once_when_told(
    wired: Wired, telemetry: FakeTelemetry
) -> None:
    wired.model.fail_with.append(LoraInvalid("bad file"))
    wired.notifier.fail_failures.append(NotifyError("backend down"))
    wired.source.put(backend_message(4))
    run_all(wired)
    outcomes = [(e["outcome"], e["error_code"]) for e in telemetry.of("finished")]
    assert outcomes == [("retry", "LORA_INVALID"), ("failed", "LORA_INVALID")]
    starts = [event for event, _ in telemetry.events].count("started")
    assert starts == len(outcomes)


def test_a_redelivery_of_a_told_outcome_is_not_a_job(
    wired: Wired, telemetry: FakeTelemetry
) -> None:
    runner = wired.container.job_runner()
    body = json.dumps(backend_message(5)).encode()
    runner.handle(Delivery(body=body))
    runner.handle(Delivery(body=body, redelivered=True))
    assert len(telemetry.of("finished")) == 1


def test_the_null_telemetry_satisfies_the_port() -> None:
    assert isinstance(NoTelemetry(), Telemetry)
    assert isinstance(FakeTelemetry(), Telemetry)
