"""The worker loop and its settlement: every guarantee of docs/guarantees.md that
the domain keeps, played with recording fakes (the in-memory source plays the broker)."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import pytest
from dependency_injector import providers

from adapters.memory_task_source import InMemoryTaskSource
from domain.errors import (
    ErrorCode,
    FailureReport,
    GpuOutOfMemory,
    InvalidRequest,
    LoraInvalid,
    NotifyError,
    StorageError,
    WebhookNotFound,
    WebhookRejected,
    WebhookUnauthorized,
)
from domain.ledger import MessageId
from domain.holding import HoldBudget
from ports.storage import StoredOutput
from tests.messages import backend_message
from tests.unit.conftest import Wired
from tests.unit.fakes import AgingSource, FakeClock, FakeImageModel, FakeStorage


def run_all(wired: Wired) -> int:
    """Run until nothing is left that can run now (delayed copies stay queued)."""
    return wired.container.job_runner().run(should_stop=lambda: False, stop_when_idle=True)


def drain(wired: Wired, rounds: int = 20, step: float = 1000.0) -> int:
    """Run, and let every delayed copy come back (moving the clock), until the queue is empty."""
    taken = run_all(wired)
    for _ in range(rounds):
        if len(wired.source) == 0:
            break
        wired.clock.advance(step)
        taken += run_all(wired)
    assert len(wired.source) == 0, "messages left in the queue"
    return taken


def completions(wired: Wired) -> list[int]:
    return [g for kind, g, _ in wired.notifier.sent if kind == "completed"]


def failures(wired: Wired) -> list[int]:
    return [g for kind, g, _ in wired.notifier.sent if kind == "failed"]


def settled_once(source: InMemoryTaskSource) -> None:
    assert source.settled_twice == []


# --- 1. no message can crash or hang a worker -------------------------------------------------

CRASH_BODIES = [
    b'{"type": "image_generation", "data": {"generation_id": ' + b"9" * 5000 + b"}}",
    b"[" * 100_000,
    b'{"type": "image_generation", "data": {"generation_id": 7, "prompt": "\xff\xfe"}}',
    b"\x00\x01 not json at all",
    b"",
]


@pytest.mark.parametrize("body", CRASH_BODIES, ids=["huge-int", "deep", "utf8", "binary", "empty"])
def test_any_bytes_are_parked_and_the_loop_goes_on(wired: Wired, body: bytes) -> None:
    wired.source.put(body)
    wired.source.put(backend_message(8))
    assert run_all(wired) == 2
    ((parked, reason, outcome),) = wired.source.parked
    assert parked.body == body and reason.startswith("INVALID_REQUEST") and outcome is None
    assert completions(wired) == [8] and wired.notifier.of_kind("failed") == []
    settled_once(wired.source)


def test_a_poison_message_naming_a_generation_is_reported_once_and_parked(wired: Wired) -> None:
    message = backend_message(31, aspect_ratio="9:9")
    wired.source.put(message)
    wired.source.put(message)  # the same body published twice
    drain(wired)
    (failure,) = wired.notifier.of_kind("failed")
    assert failure == {
        "code": ErrorCode.INVALID_REQUEST,
        "message": failure["message"],
        "retry_count": 0,
    }
    assert "data.aspect_ratio" in failure["message"]
    assert len(wired.source.parked) == 1 and len(wired.source.acked) == 1
    settled_once(wired.source)


class ExplodingNormalizer:
    def normalize(self, message: object) -> object:
        raise RecursionError(f"validator bug on {type(message).__name__}")


def test_a_crash_while_reading_is_the_message_s_fault(wired: Wired) -> None:
    wired.container.normalizer.override(providers.Object(ExplodingNormalizer()))
    wired.source.put(backend_message(32))
    run_all(wired)
    ((_, reason, _),) = wired.source.parked
    assert reason.startswith("INVALID_REQUEST: message cannot be read: RecursionError")
    assert wired.notifier.of_kind("failed")[0]["code"] is ErrorCode.INVALID_REQUEST


class BrokenFetch(FakeStorage):
    def fetch_signature(self, ref: str) -> bytes:
        raise KeyError("a bug in an adapter")


def test_an_unexpected_error_in_a_stage_is_retried_then_reported(wired: Wired) -> None:
    wired.container.storage.override(providers.Object(BrokenFetch()))
    wired.source.put(backend_message(33, signature_path="s3://media/sig.png"))
    drain(wired)
    assert [attempt for _, _, attempt, _ in wired.source.retried] == [1, 2, 3]
    (failure,) = wired.notifier.of_kind("failed")
    assert failure["code"] is ErrorCode.INTERNAL_ERROR and failure["retry_count"] == 3
    assert "KeyError" in failure["message"]
    settled_once(wired.source)


class RecordsBug(Exception):
    pass


def test_a_bug_in_settling_never_leaves_the_loop(wired: Wired) -> None:
    wired.records.fail_next.extend([RecordsBug("bug")] * 50)  # type: ignore[list-item]
    wired.source.put(backend_message(34))
    wired.source.put(backend_message(35))
    assert run_all(wired) == 2
    assert wired.notifier.of_kind("completed") == []
    assert len(wired.source.retried) == 2  # handed back, never acked, never lost
    settled_once(wired.source)


# --- 2. one outcome per message ---------------------------------------------------------------


def test_the_same_body_published_twice_runs_once_and_is_told_once(wired: Wired) -> None:
    message = backend_message(41)
    wired.source.put(message)
    wired.source.put(message)
    drain(wired)
    assert len(wired.model.calls) == 1
    assert completions(wired) == [41]
    # The copy was handed back while the original was in flight, then acked as a duplicate.
    assert len(wired.source.retried) == 1 and len(wired.source.acked) == 2
    assert wired.telemetry.of("returned") == [{"reason": "in_flight"}]
    settled_once(wired.source)


def test_a_copy_arriving_after_the_outcome_is_acked_silently(wired: Wired) -> None:
    message = backend_message(42)
    wired.source.put(message)
    run_all(wired)
    sent = list(wired.notifier.sent)
    wired.source.put(message)
    run_all(wired)
    assert wired.notifier.sent == sent and len(wired.model.calls) == 1
    assert len(wired.source.acked) == 2


def test_a_told_failure_is_never_followed_by_a_completion_of_the_same_message(
    wired: Wired,
) -> None:
    wired.model.fail_with.append(LoraInvalid("not for this model"))
    message = backend_message(43)
    wired.source.put(message)
    run_all(wired)
    wired.source.put(message)  # a redelivery after a lost ack: the model would succeed now
    run_all(wired)
    assert failures(wired) == [43] and completions(wired) == []
    assert len(wired.model.calls) == 1 and len(wired.source.acked) == 2


def test_a_decided_failure_is_told_as_decided_after_a_backend_outage(wired: Wired) -> None:
    wired.model.fail_with.extend([GpuOutOfMemory("oom")] * 4)
    wired.notifier.fail_failures.append(NotifyError("HTTP 503"))
    wired.source.put(backend_message(44))
    drain(wired)
    assert len(wired.model.calls) == 4  # attempts 0 to 3; never again after the decision
    assert completions(wired) == []
    (failure,) = wired.notifier.of_kind("failed")
    assert failure == {"code": ErrorCode.GPU_OOM, "message": "oom", "retry_count": 3}
    settled_once(wired.source)


def test_a_lost_connection_after_the_outcome_acks_the_redelivery_without_a_webhook(
    wired: Wired,
) -> None:
    class LoseAfterTelling(InMemoryTaskSource):
        lost = False

        def ack(self, delivery: Any) -> None:
            if not self.lost:
                self.lost = True
                self.lose_connection()  # the ack never reaches the broker
            super().ack(delivery)

    source = LoseAfterTelling(clock=wired.clock)
    wired.container.task_source.override(providers.Object(source))
    source.put(backend_message(45))
    wired.container.job_runner().run(should_stop=lambda: False, stop_when_idle=True)
    assert [kind for kind, _ in source.dropped] == ["ack"]
    # The redelivery: acked as a copy of a told message, without a webhook or a render.
    assert completions(wired) == [45] and len(wired.model.calls) == 1
    assert len(source.acked) == 1 and len(source) == 0


class BlockedModel(FakeImageModel):
    """Renders only once ``go`` is set (another worker finishes meanwhile)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.go = threading.Event()
        self.waiting = threading.Event()

    def generate(self, request: Any, lora: Any, on_step: Any) -> Any:
        self.waiting.set()
        assert self.go.wait(timeout=30)
        return super().generate(request, lora, on_step)


def test_two_workers_rendering_one_message_tell_one_outcome(wired: Wired) -> None:
    # After a dropped connection, workers A and B both hold the message. B renders while A
    # completes it; B stores nothing new, follows A's decision, and tells the completion again
    # as its last word (its progress calls replaced the metadata the backend stored).
    message = backend_message(46)
    source_a, source_b = InMemoryTaskSource(clock=wired.clock), InMemoryTaskSource(
        clock=wired.clock
    )
    source_a.put(message)
    source_b.put(message)
    blocked = BlockedModel(wired.clock)
    wired.container.task_source.override(providers.Object(source_a))
    wired.container.settlement.reset()
    runner_a = wired.container.job_runner()
    wired.container.image_model.override(providers.Object(blocked))
    wired.container.task_source.override(providers.Object(source_b))
    wired.container.settlement.reset()
    runner_b = wired.container.job_runner()
    worker_b = threading.Thread(
        target=runner_b.run, kwargs={"should_stop": lambda: False, "stop_when_idle": True}
    )
    worker_b.start()
    assert blocked.waiting.wait(timeout=30)
    runner_a.run(should_stop=lambda: False, stop_when_idle=True)
    blocked.go.set()
    worker_b.join(timeout=30)
    assert failures(wired) == [] and completions(wired) == [46, 46]
    first, second = wired.notifier.of_kind("completed")
    assert first == second and wired.notifier.kinds()[-1] == "completed"
    assert len(wired.storage.puts) == 2 and len(wired.storage.outputs) == 1
    assert len(source_a.acked) == 1 and len(source_b.acked) == 1


# --- 3. a new message for a generation runs; one failure per generation ------------------------


def test_a_requeued_generation_runs_and_its_completion_is_told(wired: Wired) -> None:
    wired.model.fail_with.append(LoraInvalid("first try"))
    wired.source.put(backend_message(51))
    run_all(wired)
    wired.source.put(backend_message(51))  # the backend re-queues: a new task_id
    run_all(wired)
    assert failures(wired) == [51] and completions(wired) == [51]
    assert len(wired.model.calls) == 2


def test_a_generation_is_reported_failed_once_whatever_its_messages(wired: Wired) -> None:
    wired.model.fail_with.extend([LoraInvalid("bad"), LoraInvalid("still bad")])
    wired.source.put(backend_message(52))
    run_all(wired)
    wired.source.put(backend_message(52))  # re-queued, fails again
    run_all(wired)
    assert failures(wired) == [52]
    assert len(wired.model.calls) == 2 and len(wired.source.acked) == 2
    assert wired.telemetry.of("withheld") == [{}]


def test_a_stored_image_is_reported_never_rendered_again(wired: Wired) -> None:
    wired.source.put(backend_message(53))
    run_all(wired)
    wired.source.put(backend_message(53))  # a new message for a completed generation
    run_all(wired)
    assert len(wired.model.calls) == 1 and completions(wired) == [53, 53]
    first, second = wired.notifier.of_kind("completed")
    # The stored metadata: the same, but for the upload times measured around storing it.
    durations = dict(first["durations"])
    del durations["upload_seconds"], durations["total_seconds"]
    assert second == {**first, "durations": durations}


@pytest.mark.parametrize("metadata", ["[" * 1_100, "not json", "[1, 2]", "null"])
def test_a_stored_image_with_unreadable_metadata_is_still_reported_completed(
    wired: Wired, metadata: str
) -> None:
    # Object metadata can be edited by anyone with access to the bucket: whatever it holds, the
    # stored image is reported (never failed and refunded), with no metadata, and not rendered.
    wired.storage.outputs["generations/54.png"] = (b"png", {"generation-metadata": metadata})
    message = backend_message(54)
    wired.source.put(message)
    run_all(wired)
    assert wired.model.calls == [] and wired.notifier.kinds() == ["completed"]
    assert wired.notifier.of_kind("completed") == [
        {"result_url": "https://cdn.test/generations/54.png"}
    ]
    assert [json.loads(d.body) for d in wired.source.acked] == [message]


def test_a_poison_duplicate_under_a_new_task_is_not_refunded_twice(wired: Wired) -> None:
    wired.source.put(backend_message(54, lora_path="styles/none/"))
    wired.source.put(backend_message(54, lora_path="styles/none/"))
    drain(wired)
    assert failures(wired) == [54]
    assert wired.notifier.of_kind("failed")[0]["code"] is ErrorCode.LORA_NOT_FOUND


# --- 4 and 6. no deadlock, no second render, no progress from a copy --------------------------


def test_two_copies_in_flight_at_once_neither_waits_for_the_other(wired: Wired) -> None:
    wired.container.job_runner.add_kwargs(max_batch_size=4)
    wired.model.batch_limit = 4
    message = backend_message(61)
    for _ in range(3):
        wired.source.put(message)
    run_all(wired)  # returns: nothing waits on another delivery
    assert len(wired.model.calls) == 1
    progress = [g for kind, g, _ in wired.notifier.sent if kind == "progress"]
    assert len(progress) == 5  # the original's milestones only
    drain(wired)
    assert completions(wired) == [61] and len(wired.source.acked) == 3
    settled_once(wired.source)


def test_a_job_whose_connection_died_before_render_is_not_rendered(wired: Wired) -> None:
    class DropBeforeRender(FakeStorage):
        def __init__(self, source: InMemoryTaskSource) -> None:
            super().__init__()
            self.source = source
            self.dropped = False

        def find_output(self, key: str) -> StoredOutput | None:
            if not self.dropped:
                self.dropped = True
                self.source.lose_connection()
            return super().find_output(key)

    wired.container.storage.override(providers.Object(DropBeforeRender(wired.source)))
    wired.source.put(backend_message(62))
    drain(wired)
    assert len(wired.model.calls) == 1 and completions(wired) == [62]
    assert {"reason": "connection_lost"} in wired.telemetry.of("returned")


# --- 5. a refused token, a 404, a refusing backend --------------------------------------------


def test_a_rejected_token_hands_back_stops_rendering_and_recovers(wired: Wired) -> None:
    wired.notifier.fail_completions.append(WebhookUnauthorized("HTTP 401"))
    wired.notifier.refuse_access = WebhookUnauthorized("HTTP 401 still")
    wired.source.put(backend_message(71))
    run_all(wired)
    access = wired.container.backend_access()
    assert access.refusal is not None and "401" in access.refusal
    assert wired.source.parked == [] and wired.source.acked == []
    assert len(wired.source.retried) == 1
    wired.source.put(backend_message(72))
    run_all(wired)
    assert len(wired.model.calls) == 1  # not rendered while the backend refuses the token
    assert {"reason": "backend_refused"} in wired.telemetry.of("returned")
    wired.clock.advance(31)  # the next probe is due; still refused
    wired.source.put(backend_message(73))
    run_all(wired)
    assert wired.notifier.probes == 1 and len(wired.model.calls) == 1
    wired.notifier.refuse_access = None  # the token is fixed
    drain(wired)
    assert access.refusal is None
    assert sorted(completions(wired)) == [71, 72, 73] and len(wired.model.calls) == 3
    assert wired.source.parked == []


def test_a_404_is_retried_for_a_while_then_parked_with_the_outcome(wired: Wired) -> None:
    wired.notifier.fail_completions.extend([WebhookNotFound("HTTP 404")] * 100)
    wired.source.put(backend_message(77))
    drain(wired, step=120.0, rounds=10)
    assert len(wired.source.retried) >= 2
    ((_, reason, outcome),) = wired.source.parked
    assert "404" in reason and outcome is not None
    assert outcome["verdict"] == "completed" and outcome["generation_id"] == 77
    assert wired.telemetry.of("undelivered")[-1] == {
        "outcome": "completed",
        "reason": "not_found",
        "parked": True,
    }


def test_a_backend_answering_5xx_is_waited_out_with_growing_delays(wired: Wired) -> None:
    wired.model.fail_with.append(LoraInvalid("bad"))
    wired.notifier.fail_failures.extend([NotifyError("HTTP 500")] * 4)
    wired.source.put(backend_message(74))
    drain(wired)
    assert [delay for _, _, _, delay in wired.source.retried] == [5.0, 20.0, 80.0, 320.0]
    assert failures(wired) == [74] and len(wired.model.calls) == 1


def test_an_outcome_older_than_the_limit_is_parked(wired: Wired) -> None:
    wired.notifier.fail_completions.extend([NotifyError("HTTP 503")] * 1000)
    wired.source.put(backend_message(75))
    drain(wired, step=50_000.0, rounds=5)
    ((_, reason, outcome),) = wired.source.parked
    assert "503" in reason and outcome["verdict"] == "completed"  # type: ignore[index]


def test_a_refused_outcome_is_parked_at_once(wired: Wired) -> None:
    wired.notifier.fail_completions.append(WebhookRejected("HTTP 400 missing result_url"))
    wired.source.put(backend_message(76))
    run_all(wired)
    ((_, reason, outcome),) = wired.source.parked
    assert "400" in reason and outcome is not None and wired.source.retried == []


# --- 7. nothing waits past the broker's patience ----------------------------------------------


def test_a_delivery_held_too_long_goes_back_unstarted(wired: Wired) -> None:
    source = AgingSource(wired.clock, age=61.0)
    wired.container.task_source.override(providers.Object(source))
    wired.container.job_runner.add_kwargs(max_hold_seconds=60.0)
    source.put(backend_message(81))
    run_all(wired)
    assert len(source.released) == 1 and wired.model.calls[0][0].generation_id == 81
    assert completions(wired) == [81] and len(source.acked) == 1
    assert wired.telemetry.of("returned") == [{"reason": "held_too_long"}]


def test_a_job_waiting_behind_a_slow_one_goes_back_and_the_hold_shrinks(wired: Wired) -> None:
    # 50 steps at 0.1 s: each job takes 5 s on the fake clock; 4 s is the most one may wait.
    wired.container.job_runner.add_kwargs(max_hold_seconds=4.0)
    wired.source.put(backend_message(82))
    wired.source.put(backend_message(83))
    run_all(wired)
    assert [json.loads(d.body)["data"]["generation_id"] for d in wired.source.released] == [83]
    assert wired.source.holds == [1]  # one delivery at a time from now on
    assert sorted(completions(wired)) == [82, 83] and len(wired.model.calls) == 2


def test_the_hold_follows_the_measured_job_time() -> None:
    budget = HoldBudget(max_hold_seconds=600.0, ceiling=10)
    assert budget.count() == 10
    budget.record(jobs=1, seconds=200.0)
    assert budget.count() == 4  # starts at 0, 200, 400, 600 s
    budget.record(jobs=4, seconds=4.0)  # smoothed: 200 + 0.3 * (1 - 200) = 140.3 s a job
    assert budget.count() == 5
    for _ in range(30):
        budget.record(jobs=4, seconds=4.0)
    assert budget.count() == 10  # capped by MAX_CONCURRENT_GENERATIONS
    slow = HoldBudget(max_hold_seconds=600.0, ceiling=10)
    slow.record(jobs=1, seconds=1000.0)
    assert slow.count() == 1


# --- 8. bad input refused at intake -----------------------------------------------------------


def test_an_unreadable_reference_is_invalid_request_naming_the_field(wired: Wired) -> None:
    wired.source.put(backend_message(91, signature_path="ftp://elsewhere/sig.png"))
    run_all(wired)
    (failure,) = wired.notifier.of_kind("failed")
    assert failure["code"] is ErrorCode.INVALID_REQUEST
    assert failure["message"].startswith("data.signature_path: ")
    assert wired.model.calls == [] and len(wired.source.parked) == 1


def test_a_carried_failure_must_name_the_body_s_generation(wired: Wired) -> None:
    wrong = FailureReport(generation_id=999, code=ErrorCode.GPU_OOM, message="x", retry_count=3)
    wired.source.put(backend_message(92), attempt=3, carried_failure=wrong)
    run_all(wired)
    assert failures(wired) == [] and completions(wired) == [92]


def test_a_carried_failure_is_told_as_decided(wired: Wired) -> None:
    report = FailureReport(generation_id=93, code=ErrorCode.GPU_OOM, message="oom", retry_count=3)
    wired.source.put(backend_message(93), attempt=3, carried_failure=report)
    run_all(wired)
    assert wired.model.calls == []
    (failure,) = wired.notifier.of_kind("failed")
    assert failure == {"code": ErrorCode.GPU_OOM, "message": "oom", "retry_count": 3}


def test_a_carried_failure_yields_to_a_stored_image(wired: Wired) -> None:
    wired.source.put(backend_message(94))
    run_all(wired)
    report = FailureReport(generation_id=94, code=ErrorCode.GPU_OOM, message="oom", retry_count=3)
    wired.source.put(backend_message(94), attempt=3, carried_failure=report)
    run_all(wired)
    assert failures(wired) == [] and completions(wired) == [94, 94]


def test_storage_down_when_deciding_hands_back_and_tells_nothing(wired: Wired) -> None:
    wired.records.fail_next.extend([StorageError("down")] * 3)
    wired.source.put(backend_message(95))
    run_all(wired)
    assert wired.notifier.of_kind("completed") == [] and len(wired.source.retried) == 1
    drain(wired)
    assert completions(wired) == [95]


# --- 9. liveness from the model's steps -------------------------------------------------------


def test_the_loop_beats_at_every_denoising_step(wired: Wired) -> None:
    beats: list[int] = []
    wired.source.put(backend_message(96))
    wired.container.job_runner().run(
        should_stop=lambda: False, stop_when_idle=True, heartbeat=lambda: beats.append(1)
    )
    assert len(beats) >= 50


# --- the loop's own behaviour -----------------------------------------------------------------


def test_stop_flag_stops_taking_work_and_finishes_what_was_taken(wired: Wired) -> None:
    for generation_id in range(1, 6):
        wired.source.put(backend_message(generation_id))
    calls = iter([False] + [True] * 100)
    taken = wired.container.job_runner().run(should_stop=lambda: next(calls))
    assert taken == 2  # the lookahead: received before the stop, so finished
    assert len(wired.source) == 3
    assert sorted(completions(wired)) == [1, 2]


def test_every_delivery_is_settled_once_under_mixed_outcomes(wired: Wired) -> None:
    wired.storage.loras["s3://models/styles/1/"] = b"w"
    messages: list[Mapping[str, Any] | bytes] = [
        backend_message(1, lora_path="s3://models/styles/1/"),
        b"not json",
        backend_message(2, lora_path="s3://models/styles/404/"),
        backend_message(3),
        backend_message(4, aspect_ratio="7:7"),
        backend_message(5),
    ]
    for message in messages:
        wired.source.put(message)
    assert drain(wired) == 6
    assert len(wired.source.acked) + len(wired.source.parked) == 6
    assert len(wired.source.parked) == 2
    assert sorted(completions(wired)) == [1, 3, 5] and sorted(failures(wired)) == [2, 4]
    settled_once(wired.source)


def test_deciding_is_atomic_across_racing_threads(wired: Wired) -> None:
    # Many copies of one message settle at once on different threads: one verdict is told.
    settlement = wired.container.settlement()
    body = json.dumps(backend_message(97)).encode()
    message = MessageId.of(97, "t", body)
    gate = threading.Barrier(6)

    def settle(index: int) -> None:
        wired.source.put(body)
        delivery = wired.source.receive(0)
        assert delivery is not None
        gate.wait()
        if index % 2:
            settlement.failed(delivery, message, InvalidRequest("bad"))
        else:
            from domain.job import Completion  # pylint: disable=import-outside-toplevel

            settlement.completed(delivery, message, Completion("https://x/97.png", {}))

    threads = [threading.Thread(target=settle, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    told = {kind for kind, _, _ in wired.notifier.sent}
    assert len(told) == 1


# --- review findings: a failure is never told twice -------------------------------------------


class RecordsFailingAfterTelling:
    """Wraps the records: the write that marks a message told fails (storage went away)."""

    def __init__(self, inner: Any, error: Exception) -> None:
        self.inner, self.error = inner, error

    def create(self, key: str, data: bytes) -> Any:
        return self.inner.create(key, data)

    def read(self, key: str) -> Any:
        return self.inner.read(key)

    def replace(self, key: str, data: bytes, version: str) -> Any:
        if b'"told":{' in data:
            raise self.error
        return self.inner.replace(key, data, version)


@pytest.mark.parametrize("error", [StorageError("S3 unreachable"), KeyError("ETag")])
def test_a_failure_told_but_not_recorded_is_never_sent_again(
    wired: Wired, error: Exception
) -> None:
    class LoseFirstAck(InMemoryTaskSource):
        lost = False

        def ack(self, delivery: Any) -> None:
            if not self.lost:
                self.lost = True
                self.lose_connection()
            super().ack(delivery)

    source = LoseFirstAck(clock=wired.clock)
    wired.container.task_source.override(providers.Object(source))
    wired.container.records.override(
        providers.Object(RecordsFailingAfterTelling(wired.records, error))
    )
    wired.model.fail_with.append(LoraInvalid("bad"))
    source.put(backend_message(101))
    wired.container.job_runner().run(should_stop=lambda: False, stop_when_idle=True)
    for _ in range(6):  # the redelivery waits for the teller's lease, then gives up on it
        wired.clock.advance(400)
        wired.container.job_runner().run(should_stop=lambda: False, stop_when_idle=True)
    assert failures(wired) == [101] and len(wired.model.calls) == 1
    assert len(source.parked) == 1
    _, reason, outcome = source.parked[0]
    assert "stopped while sending" in reason and outcome["verdict"] == "failed"  # type: ignore[index]
    assert {"outcome": "failed", "reason": "unknown", "parked": True} in wired.telemetry.of(
        "undelivered"
    )


def test_a_stalled_teller_s_failure_is_parked_not_resent(wired: Wired) -> None:
    # Copy A marked the failure as being sent, then stalled past its lease: copy B cannot know
    # whether the backend has it, so it parks it for an operator instead of sending it again.
    settlement = wired.container.settlement()
    ledger = wired.container.ledger()
    body = json.dumps(backend_message(102)).encode()
    message = MessageId.of(102, "t-102", body)
    report = FailureReport(
        generation_id=102, code=ErrorCode.LORA_INVALID, message="x", retry_count=0
    )
    decision = settlement._failure(message, report)  # pylint: disable=protected-access
    entry = ledger.decide(message, decision, teller="copy-a")
    assert ledger.failure_owner(message) == message.key
    assert ledger.mark_sending(message, entry) is not None
    wired.source.put(body)
    delivery = wired.source.receive(0)
    assert delivery is not None
    assert settlement.known(delivery, message, lambda: None).value == "retry"  # lease held
    wired.clock.advance(10_000)
    wired.source.put(body)
    delivery = wired.source.receive(0)
    assert delivery is not None
    assert settlement.known(delivery, message, lambda: None).value == "parked"
    assert wired.notifier.of_kind("failed") == []


def test_a_retryable_error_of_a_copy_follows_a_completion_decided_meanwhile(
    wired: Wired,
) -> None:
    # Worker B's copy fails (retryable) after worker A told the completion: B tells the
    # completion again as its last word instead of handing back (its progress erased it).
    message = backend_message(103)
    wired.source.put(message)
    run_all(wired)
    wired.model.fail_with.append(GpuOutOfMemory("oom"))
    settlement = wired.container.settlement()
    body = json.dumps(message).encode()
    wired.source.put(body)
    delivery = wired.source.receive(0)
    assert delivery is not None
    identity = MessageId.of(103, message["task_id"], body)
    settled = settlement.failed(delivery, identity, GpuOutOfMemory("oom"))
    assert settled.value == "completed" and wired.notifier.kinds()[-1] == "completed"
    assert completions(wired) == [103, 103]


def test_fewer_than_three_retries_are_refused() -> None:
    from app.settings import SettingsError, load_settings  # pylint: disable=import-outside-toplevel

    with pytest.raises(SettingsError, match="MAX_RETRIES"):
        load_settings(max_retries=2)
    assert load_settings(max_retries=3).max_retries == 3


class UploadWaitingForBeats(FakeStorage):
    """The first upload returns only once the loop has beaten twice more (or fails after 10 s)."""

    def __init__(self, beats: list[int]) -> None:
        super().__init__()
        self.beats = beats
        self.waited = threading.Event()

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        if not self.waited.is_set():
            self.waited.set()
            start = len(self.beats)
            deadline = threading.Event()
            for _ in range(1000):
                if len(self.beats) >= start + 2:
                    break
                deadline.wait(0.01)
            assert len(self.beats) >= start + 2, "no heartbeat while waiting for a finish slot"
        return super().put_output(key, data, metadata)


def test_the_loop_beats_while_it_waits_for_a_finish_slot(wired: Wired) -> None:
    beats: list[int] = []
    storage = UploadWaitingForBeats(beats)
    wired.container.storage.override(providers.Object(storage))
    wired.container.job_runner.add_kwargs(finish_backlog=1, liveness_beat_seconds=0.01)
    for generation_id in (104, 105):
        wired.source.put(backend_message(generation_id))
    wired.container.job_runner().run(
        should_stop=lambda: False, stop_when_idle=True, heartbeat=lambda: beats.append(1)
    )
    assert sorted(completions(wired)) == [104, 105]


# --- second review: a failure parked as "unknown" stays parked, a lost answer to a record write,
# --- a re-telling that fails, ownership of a failure given up, the lease ------------------------


def test_every_copy_of_a_failure_perhaps_applied_is_parked_never_acked(wired: Wired) -> None:
    from domain.errors import WebhookOutcomeUnknown  # pylint: disable=import-outside-toplevel

    message = backend_message(111)
    wired.model.fail_with.append(LoraInvalid("bad"))
    wired.notifier.fail_failures.append(WebhookOutcomeUnknown("answer lost after sending"))
    wired.source.put(message)
    run_all(wired)
    wired.source.put(message)  # the park's copy was lost; the message comes back
    run_all(wired)
    assert len(wired.source.parked) == 2 and wired.source.acked == []
    assert len(wired.notifier.fail_failures) == 0 and wired.notifier.of_kind("failed") == []


class LosesAnswersOfSendingMarks:
    """The write that marks a failure as being sent lands, but its answer is lost (the store's
    retry finds its own change and reports a conflict)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create(self, key: str, data: bytes) -> Any:
        return self.inner.create(key, data)

    def read(self, key: str) -> Any:
        return self.inner.read(key)

    def replace(self, key: str, data: bytes, version: str) -> Any:
        version = self.inner.replace(key, data, version)
        return None if b'"sending":true' in data else version


def test_a_sending_mark_whose_answer_is_lost_still_sends_the_failure(wired: Wired) -> None:
    wired.container.records.override(providers.Object(LosesAnswersOfSendingMarks(wired.records)))
    wired.model.fail_with.append(LoraInvalid("bad"))
    wired.source.put(backend_message(112))
    run_all(wired)
    assert failures(wired) == [112] and wired.source.parked == []
    assert len(wired.source.acked) == 1


def test_a_failed_re_telling_of_a_completion_is_tried_again(wired: Wired) -> None:
    message = backend_message(113)
    wired.source.put(message)
    run_all(wired)  # worker A told it
    settlement = wired.container.settlement()
    body = json.dumps(message).encode()
    identity = MessageId.of(113, message["task_id"], body)
    wired.notifier.fail_completions.append(NotifyError("HTTP 503"))
    wired.source.put(body)
    delivery = wired.source.receive(0)
    assert delivery is not None
    # Worker B rendered a copy: its re-telling meets a 503 and is handed back.
    assert settlement.failed(delivery, identity, GpuOutOfMemory("oom")).value == "retry"
    drain(wired)  # the copy comes back and tells it again, it is not acked as told
    assert completions(wired) == [113, 113] and wired.notifier.kinds()[-1] == "completed"


def test_a_failure_given_up_undelivered_leaves_the_generation_to_the_next_message(
    wired: Wired,
) -> None:
    wired.model.fail_with.extend([LoraInvalid("bad"), LoraInvalid("still bad")])
    wired.notifier.fail_failures.append(WebhookRejected("HTTP 400"))
    wired.source.put(backend_message(114))
    run_all(wired)  # parked: the backend refused it, it does not have it
    assert len(wired.source.parked) == 1 and failures(wired) == []
    wired.source.put(backend_message(114))  # a new message for the generation fails too
    run_all(wired)
    assert failures(wired) == [114] and wired.telemetry.of("withheld") == []


def test_an_operator_replay_of_a_failure_given_up_tells_it(wired: Wired) -> None:
    message = backend_message(115)
    wired.model.fail_with.append(LoraInvalid("bad"))
    wired.notifier.fail_failures.append(WebhookRejected("HTTP 400"))
    wired.source.put(message)
    run_all(wired)
    wired.source.put(message)  # replayed once the backend is fixed
    run_all(wired)
    assert failures(wired) == [115] and len(wired.model.calls) == 1


def test_the_telling_lease_outlasts_a_live_teller() -> None:
    # pylint: disable-next=import-outside-toplevel
    from domain.settlement_policy import telling_lease_for

    assert (
        telling_lease_for(timeout_seconds=10, attempts=3, budget_seconds=10, storage_attempts=5)
        == 4 * 40 + 2 * 5 * 65
    )
    assert (
        telling_lease_for(timeout_seconds=1, attempts=1, budget_seconds=0, storage_attempts=1)
        == 300.0
    )
