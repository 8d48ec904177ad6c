"""Each stage of the worker loop on its own: every way a delivery leaves intake, render or the
boundary, with what it reports (telemetry by value, timed on the fake clock), what it logs (with
the job's ids) and what it does to the queue; and the in-flight claim given back on every path,
so a later copy of the same generation runs instead of being handed back."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from dependency_injector import providers
from PIL import Image

from adapters.memory_task_source import InMemoryTaskSource
from domain.errors import ErrorCode, FailureReport, GenerationError
from domain.ledger import MessageId
from domain.log_context import LogIdsFilter
from domain.runner import StagedRunner
from ports.image_model import BatchItem
from ports.storage import StoredOutput
from ports.task_source import Delivery
from tests.messages import backend_message
from tests.unit.conftest import Wired
from tests.unit.fakes import AgingSource, FakeClock, FakeImageModel, FakeStorage

HELD_TOO_LONG = "held longer than MAX_HOLD_SECONDS before its job could start"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Log records at INFO and above, stamped with the job's ids as the worker's handler does."""
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(LogIdsFilter())
    return caplog


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[tuple[str, Any, Any]]:
    """(message, generation_id, task_id) of each record of ``logger``."""
    return [
        (record.getMessage(), record.generation_id, record.task_id)  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == logger
    ]


def finished(outcome: str, seconds: float, error_code: str | None = None) -> dict[str, Any]:
    return {"outcome": outcome, "error_code": error_code, "seconds": seconds}


def completions(wired: Wired) -> list[int]:
    return [g for kind, g, _ in wired.notifier.sent if kind == "completed"]


def run_all(runner: StagedRunner) -> int:
    return runner.run(should_stop=lambda: False, stop_when_idle=True)


def quarter_second_steps(wired: Wired) -> None:
    """50 steps of 0.25 s: a render takes exactly 12.5 s on the fake clock."""
    wired.model.seconds_per_step = 0.25


# --- a job that runs ---------------------------------------------------------------------------


def test_a_job_is_timed_from_its_receipt_and_the_hold_follows_it(wired: Wired) -> None:
    quarter_second_steps(wired)
    wired.container.job_runner.add_kwargs(max_hold_seconds=60.0)
    wired.source.put(backend_message(301))
    assert run_all(wired.container.job_runner()) == 1
    assert completions(wired) == [301]
    assert wired.telemetry.of("finished") == [finished("completed", 12.5)]
    assert wired.telemetry.of("returned") == []
    # 12.5 s a job: 1 + 60 // 12.5 = 5 deliveries start within 60 s (not the ceiling of 10).
    assert wired.source.holds == [5]


def test_a_message_without_a_task_id_runs_and_is_known_by_its_body(wired: Wired) -> None:
    quarter_second_steps(wired)
    message = backend_message(303)
    del message["task_id"]
    body = json.dumps(message).encode()
    wired.source.put(body)
    run_all(wired.container.job_runner())
    assert completions(wired) == [303] and len(wired.source.acked) == 1
    key = MessageId.of(303, None, body).key
    assert wired.records.keys(303) == [f"303/{key}.json"]
    assert wired.records.document(f"303/{key}.json")["task_id"] is None
    assert wired.telemetry.of("finished") == [finished("completed", 12.5)]


# --- held too long: at intake, and before render ---------------------------------------------


def aging(wired: Wired, age: float) -> AgingSource:
    quarter_second_steps(wired)
    source = AgingSource(wired.clock, age)
    wired.container.task_source.override(providers.Object(source))
    wired.container.job_runner.add_kwargs(max_hold_seconds=60.0)
    return source


def test_a_delivery_held_exactly_the_limit_at_intake_runs(wired: Wired) -> None:
    source = aging(wired, age=60.0)
    message = backend_message(311)
    source.put(message)
    run_all(wired.container.job_runner())
    assert completions(wired) == [311] and not source.released and not source.retried
    assert wired.telemetry.of("returned") == []
    assert wired.telemetry.of("finished") == [finished("completed", 72.5)]


def test_a_delivery_held_past_the_limit_at_intake_goes_back_at_once(
    wired: Wired, logs: pytest.LogCaptureFixture
) -> None:
    source = aging(wired, age=60.25)
    message = backend_message(312)
    source.put(message)
    run_all(wired.container.job_runner())
    assert [(d.body, d.received_at) for d in source.released] == [
        (json.dumps(message).encode(), 1000.0)
    ]
    assert not source.retried and len(wired.model.calls) == 1
    assert completions(wired) == [312] and len(source.acked) == 1
    assert wired.telemetry.of("returned") == [{"reason": "held_too_long"}]
    assert wired.telemetry.of("finished") == [
        finished("returned", 60.25),
        finished("completed", 12.5),  # the copy that came back, received at 1060.25
    ]
    handed_back = [line for line in lines(logs, "domain.settlement") if "unstarted" in line[0]]
    assert handed_back == [
        (f"delivery handed back unstarted: {HELD_TOO_LONG}", 312, message["task_id"])
    ]


class SlowLookup(FakeStorage):
    """The first lookup of a stored image takes ``seconds`` on the fake clock."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def find_output(self, key: str) -> StoredOutput | None:
        if self.seconds:
            self.clock.advance(self.seconds)
            self.seconds = 0.0
        return super().find_output(key)


def slow_lookup(wired: Wired, seconds: float) -> None:
    quarter_second_steps(wired)
    wired.container.storage.override(providers.Object(SlowLookup(wired.clock, seconds)))
    wired.container.job_runner.add_kwargs(max_hold_seconds=60.0)


def test_a_job_reaching_the_model_exactly_at_the_limit_runs(wired: Wired) -> None:
    slow_lookup(wired, 60.0)
    wired.source.put(backend_message(313))
    run_all(wired.container.job_runner())
    assert completions(wired) == [313] and wired.source.released == []
    assert wired.telemetry.of("returned") == []
    assert wired.telemetry.of("finished") == [finished("completed", 72.5)]


def test_a_job_reaching_the_model_past_the_limit_goes_back_and_its_copy_runs(
    wired: Wired, logs: pytest.LogCaptureFixture
) -> None:
    slow_lookup(wired, 60.25)
    message = backend_message(314)
    wired.source.put(message)
    run_all(wired.container.job_runner())
    assert [(d.body, d.received_at) for d in wired.source.released] == [
        (json.dumps(message).encode(), 1000.0)
    ]
    assert wired.source.retried == []  # back at once, not after a back-off
    # The copy comes back in the same run and runs: the claim of the first was given back.
    assert completions(wired) == [314] and len(wired.model.calls) == 1
    assert wired.telemetry.of("returned") == [{"reason": "held_too_long"}]
    assert wired.telemetry.of("finished") == [
        finished("returned", 60.25),
        finished("completed", 12.5),
    ]
    handed_back = [line for line in lines(logs, "domain.settlement") if "unstarted" in line[0]]
    assert handed_back == [
        (f"delivery handed back unstarted: {HELD_TOO_LONG}", 314, message["task_id"])
    ]


# --- handed back at intake: a refusing backend, a copy in flight -----------------------------


def test_a_refusing_backend_hands_the_delivery_back_after_a_back_off(
    wired: Wired, logs: pytest.LogCaptureFixture
) -> None:
    wired.container.backend_access().refused("HTTP 401")
    message = backend_message(321)
    wired.source.put(message)
    run_all(wired.container.job_runner())
    ((delivery, reason, attempt, delay),) = wired.source.retried
    assert delivery.body == json.dumps(message).encode()
    assert (reason, attempt, delay) == ("the backend refuses us: HTTP 401", 0, 5.0)
    assert wired.model.calls == [] and wired.notifier.sent == []
    assert wired.telemetry.of("returned") == [{"reason": "backend_refused"}]
    assert wired.telemetry.of("finished") == [finished("returned", 0.0)]
    handed_back = [line for line in lines(logs, "domain.settlement") if "unstarted" in line[0]]
    assert handed_back == [
        (
            "delivery handed back unstarted: the backend refuses us: HTTP 401",
            321,
            message["task_id"],
        )
    ]


class SignalsRetries(InMemoryTaskSource):
    """Sets ``handed_back`` once a delivery was handed back for a retry."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.handed_back = threading.Event()

    def retry(self, delivery: Delivery, *, reason: str, attempt: int, delay_seconds: float) -> None:
        super().retry(delivery, reason=reason, attempt=attempt, delay_seconds=delay_seconds)
        self.handed_back.set()


class GatedModel(FakeImageModel):
    """Renders (without moving the clock) only once ``gate`` is set."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__(seconds_per_step=0.0)
        self.gate = gate

    def generate(self, request: Any, lora: Any, on_step: Any) -> Any:
        assert self.gate.wait(timeout=10)
        return super().generate(request, lora, on_step)


def test_a_copy_of_a_generation_in_flight_is_handed_back_after_a_back_off(
    wired: Wired, logs: pytest.LogCaptureFixture
) -> None:
    source = SignalsRetries(wired.clock)
    wired.container.task_source.override(providers.Object(source))
    model = GatedModel(source.handed_back)  # the original renders once the copy went back
    wired.container.image_model.override(providers.Object(model))
    message = backend_message(322)
    body = json.dumps(message).encode()
    source.put(body)
    source.put(body)
    run_all(wired.container.job_runner())
    assert [(d.body, reason, attempt, delay) for d, reason, attempt, delay in source.retried] == [
        (body, "a delivery of its generation is in flight here", 0, 5.0)
    ]
    assert len(model.calls) == 1 and completions(wired) == [322] and len(source.acked) == 1
    assert wired.telemetry.of("returned") == [{"reason": "in_flight"}]
    assert sorted(wired.telemetry.of("finished"), key=lambda event: event["outcome"]) == [
        finished("completed", 0.0),
        finished("returned", 0.0),
    ]
    handed_back = [line for line in lines(logs, "domain.settlement") if "unstarted" in line[0]]
    assert handed_back == [
        (
            "delivery handed back unstarted: a delivery of its generation is in flight here",
            322,
            message["task_id"],
        )
    ]
    assert not source.settled_twice


# --- the in-flight claim is given back on every path -----------------------------------------


def test_a_copy_settled_at_intake_gives_its_claim_back(wired: Wired) -> None:
    runner = wired.container.job_runner()  # one runner: one set of claims
    message = backend_message(331)
    for _ in range(3):  # the original, then two copies acked as told
        wired.source.put(message)
        run_all(runner)
    assert completions(wired) == [331] and len(wired.model.calls) == 1
    assert len(wired.source.acked) == 3 and wired.source.retried == []
    assert wired.telemetry.of("returned") == []
    assert [event["outcome"] for event in wired.telemetry.of("finished")] == [
        "completed",
        "duplicate",
        "duplicate",
    ]


def test_a_job_failing_in_render_gives_its_claim_back_and_its_retry_runs(
    wired: Wired, logs: pytest.LogCaptureFixture
) -> None:
    quarter_second_steps(wired)
    runner = wired.container.job_runner()
    wired.model.fail_with.append(RuntimeError("cuda bug"))
    message = backend_message(332)
    wired.source.put(message)
    run_all(runner)
    ((delivery, reason, attempt, delay),) = wired.source.retried
    assert delivery.body == json.dumps(message).encode()
    assert (reason, attempt, delay) == ("INTERNAL_ERROR: RuntimeError: cuda bug", 1, 5.0)
    # The model's failure is logged with the job's ids; a single job is no batch.
    assert (
        "the model failed unexpectedly",
        332,
        message["task_id"],
    ) in lines(logs, "domain.job")
    # A GenerationError by the time it reaches the boundary: no "unexpected error" logged.
    assert [r for r in logs.records if r.getMessage() == "unexpected error"] == []
    wired.clock.advance(5.0)
    run_all(runner)
    assert completions(wired) == [332] and wired.telemetry.of("returned") == []
    assert wired.telemetry.of("finished") == [
        finished("retry", 0.0, "INTERNAL_ERROR"),
        finished("completed", 12.5),
    ]


# --- the boundary: unreadable messages, bugs, a failing settlement ---------------------------


class ExplodingNormalizer:
    def normalize(self, message: object) -> object:
        raise ValueError("line one\n\n  line two\t" + "y" * 400)


def test_an_unreadable_message_is_reported_with_its_cause_cut_and_parked(wired: Wired) -> None:
    wired.container.normalizer.override(providers.Object(ExplodingNormalizer()))
    message = backend_message(341)
    wired.source.put(message)
    run_all(wired.container.job_runner())
    text = "message cannot be read: ValueError: line one line two " + "y" * 282
    assert wired.notifier.of_kind("failed") == [
        {"code": ErrorCode.INVALID_REQUEST, "message": text, "retry_count": 0}
    ]
    key = MessageId.of(341, message["task_id"], b"").key  # a task id names the message
    assert wired.records.keys(341) == [f"341/{key}.json", "341/failure.json"]
    assert wired.records.document(f"341/{key}.json")["task_id"] == message["task_id"]
    assert wired.telemetry.of("finished") == [finished("parked", 0.0, "INVALID_REQUEST")]


class BuggyProbe(Exception):
    pass


@pytest.mark.parametrize(
    ("body", "parked"),
    [(b"not json at all", True), (json.dumps(backend_message(342)).encode(), False)],
    ids=["unnamed", "named"],
)
def test_a_bug_before_the_message_is_read_is_settled_by_the_boundary(
    wired: Wired, logs: pytest.LogCaptureFixture, body: bytes, parked: bool
) -> None:
    wired.container.backend_access().refused("HTTP 401")
    wired.clock.advance(30.0)  # a probe is due, and the probe itself has a bug
    wired.notifier.refuse_access = BuggyProbe("probe bug")
    wired.source.put(body)
    run_all(wired.container.job_runner())
    reason = "INTERNAL_ERROR: BuggyProbe: probe bug"
    if parked:  # nothing names a generation: it can only be set aside
        assert [(d.body, why, outcome) for d, why, outcome in wired.source.parked] == [
            (body, reason, None)
        ]
        assert wired.source.retried == []
        assert wired.telemetry.of("finished") == [finished("parked", 0.0, "INTERNAL_ERROR")]
    else:
        assert [(d.body, why, n, delay) for d, why, n, delay in wired.source.retried] == [
            (body, reason, 1, 5.0)
        ]
        assert wired.source.parked == []
        assert wired.telemetry.of("finished") == [finished("retry", 0.0, "INTERNAL_ERROR")]
    unexpected = [r for r in logs.records if r.getMessage() == "unexpected error"]
    assert [(r.name, r.levelno, r.exc_info[1]) for r in unexpected] == [  # type: ignore[index]
        ("domain.runner", logging.ERROR, wired.notifier.refuse_access)
    ]


class RecordsBug(Exception):
    pass


def test_a_settlement_that_fails_is_contained_and_the_claim_given_back(wired: Wired) -> None:
    runner = wired.container.job_runner()
    wired.records.fail_next.extend(
        [RecordsBug("read failed"), RecordsBug("read failed again")]  # type: ignore[list-item]
    )
    message = backend_message(351)
    wired.source.put(message)
    run_all(runner)
    ((delivery, reason, attempt, delay),) = wired.source.retried
    assert delivery.body == json.dumps(message).encode()
    assert (reason, attempt, delay) == (
        "could not be settled: INTERNAL_ERROR: RecordsBug: read failed again",
        1,
        5.0,
    )
    assert wired.telemetry.of("finished") == [finished("retry", 0.0, "INTERNAL_ERROR")]
    wired.clock.advance(5.0)
    run_all(runner)
    assert completions(wired) == [351] and wired.telemetry.of("returned") == []


def test_a_carried_failure_is_told_and_its_delivery_acked(wired: Wired) -> None:
    report = FailureReport(generation_id=352, code=ErrorCode.GPU_OOM, message="oom", retry_count=3)
    message = backend_message(352)
    wired.source.put(message, attempt=3, carried_failure=report)
    run_all(wired.container.job_runner())
    assert wired.model.calls == []
    assert [d.body for d in wired.source.acked] == [json.dumps(message).encode()]
    assert wired.telemetry.of("finished") == [finished("failed", 0.0)]


# --- batches ---------------------------------------------------------------------------------


class FirstWaitsForThird(FakeStorage):
    """The lookup of generation 361 waits until generation 363's starts. With two I/O threads,
    363's intake starts only once 362's is done: the head finds its companion prepared."""

    def __init__(self) -> None:
        super().__init__()
        self.third = threading.Event()

    def find_output(self, key: str) -> StoredOutput | None:
        if key.endswith("/363.png"):
            self.third.set()
        elif key.endswith("/361.png"):
            assert self.third.wait(timeout=10)
        return super().find_output(key)


def batch_of_two(wired: Wired, model: FakeImageModel) -> list[dict[str, Any]]:
    """Generations 361 and 362 in one model call, then 363 alone."""
    model.batch_limit = 2
    wired.container.image_model.override(providers.Object(model))
    wired.container.storage.override(providers.Object(FirstWaitsForThird()))
    wired.container.job_runner.add_kwargs(io_threads=2, lookahead=3, max_batch_size=2)
    messages = [backend_message(generation_id) for generation_id in (361, 362, 363)]
    for message in messages:
        wired.source.put(message)
    run_all(wired.container.job_runner())
    return messages


def test_a_batch_is_logged_with_its_generations(
    wired: Wired, logs: pytest.LogCaptureFixture
) -> None:
    batch_of_two(wired, wired.model)
    assert wired.model.batches == [[361, 362]]
    assert [request.generation_id for request, _ in wired.model.calls] == [361, 362, 363]
    assert sorted(completions(wired)) == [361, 362, 363]
    batches = [r for r in logs.records if r.getMessage().startswith("batch of")]
    assert [
        (r.getMessage(), r.generation_ids, r.generation_id, r.task_id)  # type: ignore[attr-defined]
        for r in batches
    ] == [("batch of 2: generations [361, 362]", [361, 362], None, None)]


class ShortBatchModel(FakeImageModel):
    """Returns one image fewer than the jobs of a batch."""

    def generate_batch(self, items: Sequence[BatchItem]) -> list[Image.Image | GenerationError]:
        return super().generate_batch(items)[:-1]


def test_a_render_stage_failing_fails_each_job_of_the_call(
    wired: Wired, logs: pytest.LogCaptureFixture
) -> None:
    messages = batch_of_two(wired, ShortBatchModel(seconds_per_step=0.0))
    reason = "INTERNAL_ERROR: ValueError: zip() argument 2 is shorter than argument 1"
    assert sorted(
        (json.loads(d.body)["task_id"], why, n, delay) for d, why, n, delay in wired.source.retried
    ) == sorted((message["task_id"], reason, 1, 5.0) for message in messages[:2])
    assert completions(wired) == [363]
    assert ("the render stage failed", None, None) in lines(logs, "domain.runner")
    assert sorted(
        (event["outcome"], event["error_code"]) for event in wired.telemetry.of("finished")
    ) == [("completed", None), ("retry", "INTERNAL_ERROR"), ("retry", "INTERNAL_ERROR")]


class LosesResults:
    """A render stage that breaks its contract: it returns no result for the jobs it ran."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def render_batch(self, batch: Sequence[Any], *, pulse: Any) -> list[Any]:
        self.inner.render_batch(batch, pulse=pulse)
        return []


def test_a_result_missing_from_the_render_stage_fails_its_job_and_the_loop_goes_on(
    wired: Wired,
) -> None:
    # Never a delivery left unsettled in silence, never the loop ended: the job is retried.
    runner = wired.container.job_runner(job=LosesResults(wired.container.generation_job()))
    message = backend_message(371)
    wired.source.put(message)
    assert run_all(runner) == 1
    assert len(wired.model.calls) == 1 and wired.notifier.of_kind("completed") == []
    reason = "INTERNAL_ERROR: RuntimeError: the render stage returned 0 results for 1 jobs"
    assert [(json.loads(d.body)["task_id"], why, n) for d, why, n, _ in wired.source.retried] == [
        (message["task_id"], reason, 1)
    ]
    assert [(e["outcome"], e["error_code"]) for e in wired.telemetry.of("finished")] == [
        ("retry", "INTERNAL_ERROR")
    ]
    assert wired.source.settled_twice == []
