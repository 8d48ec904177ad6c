"""What the domain tells the operators: job starts and ends, images, failures by code."""

from __future__ import annotations

import pytest

from domain.errors import GpuOutOfMemory, LoraInvalid, NotifyError
from ports.telemetry import NoTelemetry, Telemetry
from tests.messages import backend_message
from tests.unit.conftest import Wired
from tests.unit.fakes import FakeTelemetry
from tests.unit.test_runner import drain, run_all


def test_a_completed_job_is_one_start_one_end_and_its_image(wired: Wired) -> None:
    telemetry = wired.telemetry
    wired.source.put(backend_message(1))
    run_all(wired)
    assert [event for event, _ in telemetry.events].count("started") == 1
    (finished,) = telemetry.of("finished")
    assert finished["outcome"] == "completed" and finished["error_code"] is None
    assert finished["seconds"] >= 0
    (images,) = telemetry.of("images")
    assert images["count"] == 1 and images["steps"] == 50
    assert images["seconds"] == pytest.approx(50 * wired.model.seconds_per_step)


def test_failures_are_counted_by_code_and_retries_as_retries(wired: Wired) -> None:
    wired.model.fail_with.extend([GpuOutOfMemory("oom"), LoraInvalid("bad file")])
    wired.source.put(backend_message(2))
    drain(wired)
    outcomes = [(e["outcome"], e["error_code"]) for e in wired.telemetry.of("finished")]
    assert outcomes == [("retry", "GPU_OOM"), ("failed", "LORA_INVALID")]
    assert wired.telemetry.of("images") == []


def test_a_poison_message_counts_as_a_parked_job(wired: Wired) -> None:
    wired.source.put(backend_message(3, aspect_ratio="3:4"))
    run_all(wired)
    starts = [event for event, _ in wired.telemetry.events].count("started")
    (finished,) = wired.telemetry.of("finished")
    assert starts == 1 and finished["error_code"] == "INVALID_REQUEST"
    assert finished["outcome"] == "parked"


def test_a_failure_waiting_for_the_backend_counts_each_delivery(wired: Wired) -> None:
    wired.model.fail_with.append(LoraInvalid("bad file"))
    wired.notifier.fail_failures.append(NotifyError("backend down"))
    wired.source.put(backend_message(4))
    drain(wired)
    outcomes = [(e["outcome"], e["error_code"]) for e in wired.telemetry.of("finished")]
    assert outcomes == [("retry", "LORA_INVALID"), ("failed", None)]
    starts = [event for event, _ in wired.telemetry.events].count("started")
    assert starts == len(outcomes) == 2
    assert wired.telemetry.of("undelivered") == [
        {"outcome": "failed", "reason": "unreachable", "parked": False}
    ]


def test_a_copy_of_a_told_message_is_a_duplicate(wired: Wired) -> None:
    message = backend_message(5)
    wired.source.put(message)
    run_all(wired)
    wired.source.put(message)
    run_all(wired)
    assert [e["outcome"] for e in wired.telemetry.of("finished")] == ["completed", "duplicate"]
    assert [event for event, _ in wired.telemetry.events].count("started") == 2


def test_the_null_telemetry_satisfies_the_port() -> None:
    assert isinstance(NoTelemetry(), Telemetry)
    assert isinstance(FakeTelemetry(), Telemetry)
