"""The use case with recording fakes: the happy path, idempotency, errors and retries."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from domain.errors import (
    ErrorCode,
    GpuOutOfMemory,
    LoraInvalid,
    ModelError,
    NotifyError,
    StorageError,
)
from domain.job import METADATA_KEY, Outcome
from domain.request import GenerationRequest, SignatureConfig, SignatureSpec
from tests.unit.conftest import Wired, png_bytes


def make_request(**changes: object) -> GenerationRequest:
    values: dict[str, object] = {
        "generation_id": 500,
        "prompt": "watercolor, portrait",
        "width": 512,
        "height": 512,
        "steps": 50,
        "guidance_scale": 7.5,
        "seed": 42,
    }
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def test_completed_job_stores_png_and_reports_every_milestone(wired: Wired) -> None:
    wired.storage.loras["s3://models/styles/1/"] = b"weights"
    request = make_request(lora_ref="s3://models/styles/1/", lora_scale=0.8, style_id=1)

    result = wired.container.generation_job().run(request)

    assert result.outcome is Outcome.COMPLETED
    assert wired.notifier.kinds() == ["progress"] * 5 + ["completed"]
    updates = wired.notifier.of_kind("progress")
    assert [u.progress_percent for u in updates] == [0, 26, 50, 76, 90]
    assert [u.current_step for u in updates] == [0, 13, 25, 38, 45]
    # 0.1 s per step measured on the fake clock: 37 steps left at step 13 -> 3.7 s -> 4.
    assert updates[1].estimated_seconds == 4
    assert updates[-1].estimated_seconds == 1
    (completion,) = wired.notifier.of_kind("completed")
    assert completion["result_url"] == "https://cdn.test/generations/500.png"
    for key, value in {
        "seed": 42,
        "steps": 50,
        "guidance_scale": 7.5,
        "width": 512,
        "height": 512,
        "scheduler": "dpmsolver++",
        "model": "fake/sd15",
        "lora_checksum": "sha-7",
        "lora_scale": 0.8,
        "style_id": 1,
    }.items():
        assert completion[key] == value, key
    assert set(completion["durations"]) == {
        "fetch_seconds",
        "queued_seconds",
        "generation_seconds",
        "encode_seconds",
        "upload_seconds",
        "total_seconds",
    }
    assert completion["durations"]["generation_seconds"] == pytest.approx(5.0)
    data, stored_meta = wired.storage.outputs["generations/500.png"]
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (512, 512)
    assert json.loads(stored_meta[METADATA_KEY])["seed"] == 42
    called_request, lora = wired.model.calls[0]
    assert called_request is request and lora is not None and lora.ref.endswith("styles/1/")


def test_lora_absent_means_base_model_and_no_checksum(wired: Wired) -> None:
    result = wired.container.generation_job().run(make_request())
    assert result.outcome is Outcome.COMPLETED
    assert wired.model.calls[0][1] is None
    assert wired.storage.fetched == []
    assert result.metadata is not None and result.metadata["lora_checksum"] is None


def test_redelivery_reports_existing_output_without_generating(wired: Wired) -> None:
    job = wired.container.generation_job()
    first = job.run(make_request())
    second = wired.container.generation_job().run(make_request(), attempt=1)

    assert second.outcome is Outcome.COMPLETED and second.reused
    assert len(wired.model.calls) == 1
    assert wired.storage.puts == ["generations/500.png"]
    first_completion, second_completion = wired.notifier.of_kind("completed")
    assert second_completion == first_completion | {
        "durations": {
            k: v
            for k, v in first_completion["durations"].items()
            if k not in {"upload_seconds", "total_seconds"}
        }
    }
    assert first.result_url == second.result_url


def test_image_signature_is_stamped_before_storing(wired: Wired) -> None:
    wired.storage.signatures["sig.png"] = png_bytes((100, 50), (255, 0, 0, 255))
    spec = SignatureSpec(
        config=SignatureConfig(position="top-left", size="small", opacity=1.0), image_ref="sig.png"
    )
    wired.container.generation_job().run(make_request(signature=spec))
    data, _ = wired.storage.outputs["generations/500.png"]
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        # 3 % margin = 15 px; small = 15 % of 512 = 77 px wide.
        assert rgb.getpixel((20, 20)) == (255, 0, 0)
        assert rgb.getpixel((300, 300)) == (0, 0, 0)


def test_invalid_signature_fails_before_the_model_runs(wired: Wired) -> None:
    wired.storage.signatures["sig.png"] = b"not an image"
    spec = SignatureSpec(config=SignatureConfig(), image_ref="sig.png")
    result = wired.container.generation_job().run(make_request(signature=spec))
    assert result.outcome is Outcome.FAILED
    assert wired.model.calls == []
    (failure,) = wired.notifier.of_kind("failed")
    assert failure["code"] is ErrorCode.SIGNATURE_INVALID


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (LoraInvalid("pickle refused"), ErrorCode.LORA_INVALID),
        (ModelError("nan"), ErrorCode.MODEL_ERROR),
    ],
)
def test_permanent_errors_are_reported_at_once(
    wired: Wired, error: Exception, code: ErrorCode
) -> None:
    wired.model.fail_with.append(error)
    result = wired.container.generation_job().run(make_request(), attempt=0)
    assert result.outcome is Outcome.FAILED
    (failure,) = wired.notifier.of_kind("failed")
    assert failure == {"code": code, "message": error.message, "retry_count": 0}
    assert wired.storage.outputs == {}


def test_missing_lora_is_lora_not_found(wired: Wired) -> None:
    result = wired.container.generation_job().run(make_request(lora_ref="styles/404/"))
    assert result.outcome is Outcome.FAILED
    assert wired.notifier.of_kind("failed")[0]["code"] is ErrorCode.LORA_NOT_FOUND
    assert wired.model.calls == []


@pytest.mark.parametrize("error", [GpuOutOfMemory("oom"), StorageError("s3 down")])
def test_retryable_errors_retry_until_the_budget_then_fail(wired: Wired, error: Exception) -> None:
    job = wired.container.generation_job()
    wired.model.fail_with.extend([error] * 3)
    outcomes = [job.run(make_request(), attempt=attempt).outcome for attempt in range(3)]
    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.FAILED]
    (failure,) = wired.notifier.of_kind("failed")
    assert failure["code"] is error.code and failure["retry_count"] == 2


def test_storage_outage_while_fetching_inputs_is_retried_then_reported(wired: Wired) -> None:
    wired.storage.loras["styles/1/"] = b"w"
    wired.storage.fail_fetches.extend([StorageError("s3 unreachable")] * 3)
    job = wired.container.generation_job()
    request = make_request(lora_ref="styles/1/")
    outcomes = [job.run(request, attempt=attempt).outcome for attempt in range(3)]
    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.FAILED]
    assert wired.model.calls == []
    (failure,) = wired.notifier.of_kind("failed")
    assert failure["code"] is ErrorCode.STORAGE_ERROR and failure["retry_count"] == 2
    assert job.run(request, attempt=3).outcome is Outcome.COMPLETED


def test_existing_output_with_unreadable_metadata_still_completes(wired: Wired) -> None:
    wired.storage.outputs["generations/500.png"] = (b"png", {METADATA_KEY: "{not json"})
    result = wired.container.generation_job().run(make_request(), attempt=3)
    assert result.outcome is Outcome.COMPLETED and result.reused
    assert wired.notifier.of_kind("completed") == [
        {"result_url": "https://cdn.test/generations/500.png"}
    ]
    assert wired.notifier.of_kind("failed") == [] and wired.model.calls == []


def test_undeliverable_failure_carries_the_decided_report(wired: Wired) -> None:
    wired.model.fail_with.append(LoraInvalid("bad layers"))
    wired.notifier.fail_failures.append(NotifyError("timeout"))
    result = wired.container.generation_job().run(make_request(), attempt=1)
    assert result.outcome is Outcome.RETRY
    assert result.pending_failure is not None
    assert (result.pending_failure.code, result.pending_failure.retry_count) == (
        ErrorCode.LORA_INVALID,
        1,
    )
    assert result.pending_failure.message == "bad layers" and not result.pending_failure.poison


def test_unexpected_exception_becomes_internal_error(wired: Wired) -> None:
    wired.model.fail_with.append(RuntimeError("boom"))
    result = wired.container.generation_job().run(make_request(), attempt=2)
    assert result.outcome is Outcome.FAILED
    failure = wired.notifier.of_kind("failed")[0]
    assert (
        failure["code"] is ErrorCode.INTERNAL_ERROR and "RuntimeError: boom" in failure["message"]
    )


def test_undelivered_completion_is_retried_and_never_turns_into_a_failure(wired: Wired) -> None:
    wired.notifier.fail_completions.extend(
        [NotifyError("backend 503"), ConnectionError("reset"), NotifyError("503"), NotifyError("x")]
    )
    job = wired.container.generation_job()
    outcomes = [job.run(make_request(), attempt=attempt).outcome for attempt in range(4)]
    assert outcomes == [Outcome.RETRY] * 4
    assert wired.notifier.of_kind("failed") == []
    assert len(wired.model.calls) == 1  # the stored image is reused on every redelivery
    assert job.run(make_request(), attempt=4).outcome is Outcome.COMPLETED
    assert len(wired.notifier.of_kind("completed")) == 1


def test_undeliverable_failure_hands_the_job_back(wired: Wired) -> None:
    wired.model.fail_with.append(LoraInvalid("bad"))
    wired.notifier.fail_failures.append(NotifyError("backend down"))
    result = wired.container.generation_job().run(make_request())
    assert result.outcome is Outcome.RETRY


def test_progress_delivery_trouble_never_fails_the_generation(wired: Wired) -> None:
    wired.notifier.fail_progress = True
    result = wired.container.generation_job().run(make_request())
    assert result.outcome is Outcome.COMPLETED
    assert wired.notifier.kinds() == ["completed"]


def test_second_job_gets_an_eta_at_zero_percent_from_the_first(wired: Wired) -> None:
    wired.container.generation_job().run(make_request(generation_id=1))
    first_zero = wired.notifier.of_kind("progress")[0]
    wired.container.generation_job().run(make_request(generation_id=2))
    second_zero = wired.notifier.of_kind("progress")[5]
    assert first_zero.estimated_seconds is None
    assert second_zero.current_step == 0 and second_zero.estimated_seconds == 5


def test_storage_failure_after_generation_is_retried_without_notifying_failure(
    wired: Wired,
) -> None:
    wired.storage.fail_puts.append(StorageError("s3 timeout"))
    job = wired.container.generation_job()
    assert job.run(make_request()).outcome is Outcome.RETRY
    assert job.run(make_request(), attempt=1).outcome is Outcome.COMPLETED
    assert wired.notifier.of_kind("failed") == []
    assert len(wired.model.calls) == 2
