"""The queue loop: poison messages, retries across redeliveries, and settling each delivery once."""

from __future__ import annotations

import itertools
import json

from dependency_injector import providers

from adapters.memory_task_source import InMemoryTaskSource
from domain.errors import (
    ErrorCode,
    FailureReport,
    GpuOutOfMemory,
    LoraInvalid,
    NotifyError,
    StorageError,
    WebhookRejected,
)
from domain.runner import JobRunner, SettledGenerations
from ports.task_source import Delivery
from tests.messages import backend_message
from tests.unit.conftest import Wired


def run_all(wired: Wired) -> int:
    return wired.container.job_runner().run(should_stop=lambda: False, stop_when_idle=True)


def test_a_good_message_is_generated_and_acked(wired: Wired) -> None:
    wired.source.put(backend_message())
    assert run_all(wired) == 1
    assert len(wired.source.acked) == 1 and wired.source.parked == []
    assert wired.notifier.kinds()[-1] == "completed"
    assert "generations/456.png" in wired.storage.outputs


def test_not_json_is_parked_without_a_webhook(wired: Wired) -> None:
    wired.source.put(b"\x00not json")
    run_all(wired)
    ((_, reason),) = wired.source.parked
    assert reason.startswith("INVALID_REQUEST: message is not valid JSON")
    assert wired.notifier.sent == [] and wired.source.acked == []


def test_invalid_field_is_parked_and_reported_failed(wired: Wired) -> None:
    wired.source.put(backend_message(aspect_ratio="3:4"))
    run_all(wired)
    ((_, reason),) = wired.source.parked
    assert "data.aspect_ratio" in reason
    (failure,) = wired.notifier.of_kind("failed")
    assert failure["code"] is ErrorCode.INVALID_REQUEST and failure["retry_count"] == 0
    assert wired.model.calls == []


def test_other_task_type_is_unsupported(wired: Wired) -> None:
    message = backend_message(789)
    message["type"] = "style_training"
    wired.source.put(json.dumps(message))
    run_all(wired)
    assert len(wired.source.parked) == 1
    assert wired.notifier.of_kind("failed")[0]["code"] is ErrorCode.UNSUPPORTED_TASK
    assert wired.notifier.sent[0][1] == 789


def test_bad_signature_config_is_signature_invalid(wired: Wired) -> None:
    wired.source.put(backend_message(artist_name="Ana", signature_config={"position": "middle"}))
    run_all(wired)
    assert wired.notifier.of_kind("failed")[0]["code"] is ErrorCode.SIGNATURE_INVALID
    assert len(wired.source.parked) == 1


def test_poison_message_is_kept_while_the_backend_cannot_be_told(wired: Wired) -> None:
    wired.notifier.fail_failures.extend([NotifyError("backend down"), NotifyError("still")])
    wired.source.put(backend_message(aspect_ratio="9:9"))
    run_all(wired)
    assert len(wired.source.retried) == 2 and len(wired.source.parked) == 1
    assert wired.source.acked == []
    (failure,) = wired.notifier.of_kind("failed")
    assert failure["code"] is ErrorCode.INVALID_REQUEST and failure["retry_count"] == 0


def test_undelivered_failure_is_resent_as_decided_never_regenerated(wired: Wired) -> None:
    # The failure webhook times out after the backend stored it; the next delivery must not
    # try the job again (a success now would give the generation a second outcome).
    wired.model.fail_with.extend([GpuOutOfMemory("oom")] * 3)
    wired.notifier.fail_failures.append(NotifyError("read timeout"))
    wired.source.put(backend_message())
    run_all(wired)
    assert len(wired.model.calls) == 3  # attempts 0, 1, 2; none after the decided failure
    assert wired.notifier.of_kind("completed") == []
    (failure,) = wired.notifier.of_kind("failed")
    assert failure == {"code": ErrorCode.GPU_OOM, "message": "oom", "retry_count": 2}
    assert len(wired.source.acked) == 1 and wired.source.parked == []


def test_overflowing_number_is_poison_not_an_endless_retry(wired: Wired) -> None:
    wired.source.put(
        '{"type": "image_generation", "data": {"generation_id": 9, "prompt": "a",'
        ' "artist_name": "Ana", "signature_config": {"opacity": 1' + "0" * 400 + "}}}"
    )
    run_all(wired)
    assert len(wired.source.parked) == 1 and wired.source.retried == []
    assert wired.notifier.of_kind("failed")[0]["code"] is ErrorCode.SIGNATURE_INVALID


class ExplodingNormalizer:
    def normalize(self, message: object) -> object:
        raise RecursionError(f"validator bug on {type(message).__name__}")


def test_any_validation_crash_parks_the_message_as_invalid(wired: Wired) -> None:
    wired.container.normalizer.override(providers.Object(ExplodingNormalizer()))
    wired.source.put(backend_message(31))
    run_all(wired)
    ((_, reason),) = wired.source.parked
    assert reason.startswith("INVALID_REQUEST: message cannot be read: RecursionError")
    assert wired.notifier.of_kind("failed")[0]["code"] is ErrorCode.INVALID_REQUEST


class AckFailingSource(InMemoryTaskSource):
    def ack(self, delivery: Delivery) -> None:
        raise ConnectionResetError("channel closed")


def test_a_crash_while_settling_hands_back_then_parks(wired: Wired) -> None:
    source = AckFailingSource()
    wired.container.task_source.override(providers.Object(source))
    source.put(backend_message())
    assert run_all(wired) == 3  # attempts 0 and 1 handed back, attempt 2 parked (max 2)
    assert [d.attempt for d, _ in source.retried] == [0, 1]
    assert [(d.attempt, "ConnectionResetError" in r) for d, r in source.parked] == [(2, True)]


def test_retryable_failure_is_redelivered_and_counted(wired: Wired) -> None:
    wired.model.fail_with.extend([GpuOutOfMemory("oom"), GpuOutOfMemory("oom")])
    wired.source.put(backend_message())
    assert run_all(wired) == 3
    assert [d.attempt for d, _ in wired.source.retried] == [0, 1]
    assert wired.source.acked[0].attempt == 2
    assert wired.notifier.of_kind("failed") == []
    assert len(wired.notifier.of_kind("completed")) == 1


def test_retry_budget_exhausted_reports_failure_with_retry_count(wired: Wired) -> None:
    wired.model.fail_with.extend([GpuOutOfMemory("oom")] * 5)
    wired.source.put(backend_message())
    run_all(wired)  # max_retries=2 in the fixture's settings
    assert len(wired.source.retried) == 2 and len(wired.source.acked) == 1
    (failure,) = wired.notifier.of_kind("failed")
    assert failure == {"code": ErrorCode.GPU_OOM, "message": "oom", "retry_count": 2}


def test_a_notifier_bug_after_storing_becomes_a_retry_of_the_completion(wired: Wired) -> None:
    wired.notifier.fail_completions.append(RuntimeError("bug in the notifier"))
    wired.source.put(backend_message(1))
    wired.source.put(backend_message(2))
    assert run_all(wired) == 3
    assert sorted(g for k, g, _ in wired.notifier.sent if k == "completed") == [1, 2]
    assert len(wired.model.calls) == 2
    assert wired.notifier.of_kind("failed") == []


def test_stop_flag_stops_taking_work_and_finishes_what_was_taken(wired: Wired) -> None:
    for generation_id in range(1, 6):
        wired.source.put(backend_message(generation_id))
    calls = itertools.chain([False], itertools.repeat(True))
    handled = wired.container.job_runner().run(should_stop=lambda: next(calls))
    assert handled == 2  # the pipeline's lookahead: received before the stop, so finished
    assert len(wired.source) == 3
    assert sorted(d.attempt for d in wired.source.acked) == [0, 0]
    assert sorted(g for k, g, _ in wired.notifier.sent if k == "completed") == [1, 2]


def test_plain_runner_takes_one_delivery_at_a_time(wired: Wired) -> None:
    wired.source.put(backend_message(1))
    wired.source.put(backend_message(2))
    calls = iter([False, True])
    runner = JobRunner(
        source=wired.source,
        job=wired.container.generation_job(),
        normalizer=wired.container.normalizer(),
    )
    assert runner.run(should_stop=lambda: next(calls)) == 1 and len(wired.source) == 1


def test_completion_refused_for_good_parks_the_message(wired: Wired) -> None:
    wired.notifier.fail_completions.append(WebhookRejected("404 unknown generation"))
    wired.source.put(backend_message())
    assert run_all(wired) == 1
    ((_, reason),) = wired.source.parked
    assert "404 unknown generation" in reason
    assert wired.source.acked == [] and wired.source.retried == []
    assert wired.notifier.of_kind("failed") == []


def test_failure_refused_for_good_parks_the_message(wired: Wired) -> None:
    wired.model.fail_with.append(LoraInvalid("bad"))
    wired.notifier.fail_failures.append(WebhookRejected("401 wrong token"))
    wired.source.put(backend_message())
    run_all(wired)
    assert len(wired.source.parked) == 1 and wired.source.acked == []


def test_broker_redelivery_of_a_told_outcome_is_acked_silently(wired: Wired) -> None:
    runner = wired.container.job_runner()
    body = json.dumps(backend_message(77)).encode()
    runner.handle(Delivery(body=body))
    runner.handle(Delivery(body=body, redelivered=True))  # the first ack was lost
    assert len(wired.model.calls) == 1
    assert len(wired.notifier.of_kind("completed")) == 1
    assert len(wired.source.acked) == 2


def test_a_fresh_message_for_a_settled_generation_still_runs(wired: Wired) -> None:
    # The backend may re-queue a failed generation: that is a new message, not a redelivery.
    runner = wired.container.job_runner()
    wired.model.fail_with.append(LoraInvalid("first try"))
    body = json.dumps(backend_message(78)).encode()
    runner.handle(Delivery(body=body))
    runner.handle(Delivery(body=body))
    assert len(wired.model.calls) == 2
    assert wired.notifier.kinds()[-1] == "completed"


def test_settled_generations_forget_the_oldest() -> None:
    settled = SettledGenerations(capacity=2)
    for generation_id in (1, 2, 3):
        settled.add(generation_id)
    assert 1 not in settled and 2 in settled and 3 in settled


def test_a_pending_failure_yields_to_an_image_stored_by_a_racing_copy(wired: Wired) -> None:
    # A dropped connection left two copies: the original (redelivered, it completed) and the
    # retry copy carrying a failure decided earlier. The stored image settles the outcome.
    runner = wired.container.job_runner()
    body = json.dumps(backend_message(91)).encode()
    runner.handle(Delivery(body=body, redelivered=True))
    report = FailureReport(generation_id=91, code=ErrorCode.GPU_OOM, message="oom", retry_count=3)
    runner.handle(Delivery(body=body, attempt=3, pending_failure=report))
    assert wired.notifier.of_kind("failed") == []
    assert wired.notifier.kinds().count("completed") == 2  # told again, never contradicted
    assert len(wired.source.acked) == 2 and len(wired.model.calls) == 1


def test_a_pending_failure_waits_while_storage_cannot_be_checked(wired: Wired) -> None:
    runner = wired.container.job_runner()
    report = FailureReport(generation_id=92, code=ErrorCode.GPU_OOM, message="oom", retry_count=3)
    wired.storage.fail_finds.append(StorageError("endpoint unreachable"))
    runner.handle(
        Delivery(body=json.dumps(backend_message(92)).encode(), attempt=3, pending_failure=report)
    )
    ((_, reason),) = wired.source.retried
    assert "storage unreachable" in reason
    assert wired.notifier.sent == [] and wired.source.acked == []


def test_the_original_redelivered_after_its_told_failure_does_not_run(wired: Wired) -> None:
    # The copy told the failure first; the redelivered original must not add a completion.
    runner = wired.container.job_runner()
    body = json.dumps(backend_message(93)).encode()
    report = FailureReport(generation_id=93, code=ErrorCode.GPU_OOM, message="oom", retry_count=3)
    runner.handle(Delivery(body=body, attempt=3, pending_failure=report))
    runner.handle(Delivery(body=body, redelivered=True))
    assert wired.model.calls == [] and wired.notifier.kinds() == ["failed"]
    assert len(wired.source.acked) == 2
