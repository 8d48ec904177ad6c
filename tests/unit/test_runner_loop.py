"""The loop's own mechanics: how many deliveries it prepares ahead and holds, its I/O threads and
finish slots, when it polls and beats, which prepared jobs share a model call, and that ``run``
returns only once every finish is settled.

Slow I/O is played by fakes that block on a condition until the test's scenario lets them go;
nothing sleeps. A fake that waits in vain gives up after ``GIVE_UP`` seconds and records it, so
only broken code ever waits that long.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from dependency_injector import providers
from PIL import Image

from adapters.memory_task_source import InMemoryTaskSource
from domain.errors import GenerationError, StorageError
from domain.holding import HoldBudget
from ports.image_model import BatchItem, StepCallback
from ports.storage import LoraArtifact, StoredOutput
from ports.task_source import Delivery
from tests.messages import backend_message
from tests.unit.conftest import Wired
from tests.unit.fakes import FakeClock, FakeImageModel, FakeStorage

GIVE_UP = 5.0
"""Seconds a blocking fake waits for its scenario before it gives up (broken code only)."""

BEAT = 0.001
"""The heartbeat interval of the tests that count beats."""

IDLE_BEATS = 20
"""Beats in a row, with the model idle, that show the loop is waiting (20 ms at ``BEAT``)."""


def completions(wired: Wired) -> list[int]:
    return sorted(g for kind, g, _ in wired.notifier.sent if kind == "completed")


def run_all(wired: Wired, **kwargs: Any) -> int:
    return wired.container.job_runner().run(
        should_stop=lambda: False, stop_when_idle=True, **kwargs
    )


def generation_of(key: str) -> int:
    """The generation of an output key (``generations/<id>.png``)."""
    return int(key.rsplit("/", 1)[-1].removesuffix(".png"))


class Board:
    """What the blocking fakes have seen, under one condition that every change notifies."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[str] = []
        self.beats = 0

    def note(self, event: str) -> None:
        with self.cond:
            self.seen.append(event)
            self.cond.notify_all()

    def has(self, event: str) -> bool:
        return event in self.seen

    def count(self, prefix: str) -> int:
        return sum(event.startswith(prefix) for event in self.seen)

    def beat(self) -> None:
        with self.cond:
            self.beats += 1
            self.cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool]) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout=GIVE_UP)


class GatedStorage(FakeStorage):
    """Look-ups and uploads of the generations given a gate wait until it opens; records the
    threads of all calls, how many gated calls waited at once, and whether each gate opened
    in time."""

    def __init__(self, board: Board) -> None:
        super().__init__()
        self.board = board
        self.lookup_gates: dict[int, Callable[[], bool]] = {}
        self.upload_gates: dict[int, Callable[[], bool]] = {}
        self.on_upload: dict[int, Callable[[], None]] = {}
        self.opened: list[bool] = []
        self.threads: set[str] = set()
        self.busy = 0
        self.most_busy = 0

    def find_output(self, key: str) -> StoredOutput | None:
        generation = generation_of(key)
        self._wait(f"lookup {generation}", self.lookup_gates.get(generation))
        return super().find_output(key)

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        generation = generation_of(key)
        self.on_upload.get(generation, lambda: None)()
        self._wait(f"upload {generation}", self.upload_gates.get(generation))
        return super().put_output(key, data, metadata)

    def _wait(self, event: str, gate: Callable[[], bool] | None) -> None:
        with self.board.cond:
            self.threads.add(threading.current_thread().name)
            if gate is not None:
                self.busy += 1
                self.most_busy = max(self.most_busy, self.busy)
        self.board.note(event)
        if gate is None:
            return
        try:
            self.opened.append(self.board.wait_until(gate))
        finally:
            with self.board.cond:
                self.busy -= 1


class GroupingModel(FakeImageModel):
    """Records the generations of every model call (single ones too) on the board, and whether
    a call is running."""

    def __init__(self, clock: FakeClock, board: Board, batch_limit: int) -> None:
        super().__init__(clock=clock, batch_limit=batch_limit)
        self.board = board
        self.rendering = False

    def generate_batch(self, items: Sequence[BatchItem]) -> list[Image.Image | GenerationError]:
        self._begin([item.request.generation_id for item in items])
        try:
            return super().generate_batch(items)
        finally:
            self.rendering = False

    def generate(self, request: Any, lora: LoraArtifact | None, on_step: StepCallback) -> Any:
        self._begin([request.generation_id])
        self.batches.append([request.generation_id])
        try:
            return super().generate(request, lora, on_step)
        finally:
            self.rendering = False

    def _begin(self, generations: list[int]) -> None:
        self.rendering = True
        for generation in generations:
            self.board.note(f"render {generation}")


def gated(wired: Wired, batch_limit: int = 1) -> tuple[Board, GatedStorage, GroupingModel]:
    """The board, a gated storage and a grouping model, swapped into the container."""
    board = Board()
    storage = GatedStorage(board)
    model = GroupingModel(wired.clock, board, batch_limit)
    wired.container.storage.override(providers.Object(storage))
    wired.container.image_model.override(providers.Object(model))
    return board, storage, model


# --- how many deliveries to hold ----------------------------------------------------------------


@pytest.mark.parametrize("ceiling", [0, 1])
def test_a_ceiling_below_two_holds_one_delivery(ceiling: int) -> None:
    assert HoldBudget(max_hold_seconds=600.0, ceiling=ceiling).count() == 1


def test_a_call_of_one_second_is_measured_and_one_of_none_is_not() -> None:
    budget = HoldBudget(max_hold_seconds=10.0, ceiling=20)
    budget.record(jobs=1, seconds=0.0)
    assert budget.count() == 20  # nothing measured yet: the ceiling
    budget.record(jobs=1, seconds=1.0)
    assert budget.count() == 11  # starts at 0, 1, ..., 10 s


def test_the_time_of_a_call_is_shared_by_its_jobs() -> None:
    budget = HoldBudget(max_hold_seconds=10.0, ceiling=20)
    budget.record(jobs=4, seconds=10.0)
    assert budget.count() == 5  # 2.5 s a job: starts at 0, 2.5, 5, 7.5 and 10 s


def test_the_jobs_that_fit_are_counted_exactly_not_rounded_up() -> None:
    # The float 0.1 is a little more than a tenth: ten such jobs take longer than 1.0 s, so
    # the eleventh delivery would start past the limit (1.0 / 0.1 rounds to 10.0).
    budget = HoldBudget(max_hold_seconds=1.0, ceiling=20)
    budget.record(jobs=1, seconds=0.1)
    assert budget.count() == 10


@pytest.mark.parametrize("max_held", [1, 10])
def test_the_source_is_told_nothing_while_the_hold_stays_what_it_was(
    wired: Wired, max_held: int
) -> None:
    # Jobs of 5 s within 600 s: the hold stays at MAX_CONCURRENT_GENERATIONS.
    wired.container.job_runner.add_kwargs(max_held=max_held)
    wired.source.put(backend_message(1))
    wired.source.put(backend_message(2))
    assert run_all(wired) == 2
    assert wired.source.holds == []
    assert completions(wired) == [1, 2]


# --- polling, telemetry ---------------------------------------------------------------------------


class PollingSource(InMemoryTaskSource):
    """Records the wait asked of each ``receive``; never waits itself."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.waits: list[float] = []

    def receive(self, timeout: float) -> Delivery | None:
        self.waits.append(timeout)
        return super().receive(0.0)


def test_an_idle_loop_waits_a_second_for_work_and_never_while_it_holds_some(
    wired: Wired,
) -> None:
    source = PollingSource(wired.clock)
    wired.container.task_source.override(providers.Object(source))
    source.put(backend_message(1))
    turns = iter([False, False, True])
    taken = wired.container.job_runner().run(should_stop=lambda: next(turns))
    assert taken == 1 and completions(wired) == [1]
    # Idle: a second; holding one (the lookahead asks for another): no wait; idle again.
    assert source.waits == [1.0, 0.0, 1.0]


def test_a_runner_without_telemetry_runs_and_reports_nothing(wired: Wired) -> None:
    wired.container.job_runner.add_kwargs(telemetry=None)
    wired.source.put(backend_message(1))
    assert run_all(wired) == 1
    assert completions(wired) == [1]
    # Only the job's own telemetry (the container's) reports: the runner's is the no-op one.
    assert [event for event, _ in wired.telemetry.events] == ["images"]


# --- I/O threads ----------------------------------------------------------------------------------


def test_one_io_thread_asked_is_two_and_no_more(wired: Wired) -> None:
    board, storage, _ = gated(wired)
    wired.container.job_runner.add_kwargs(io_threads=1, lookahead=3, liveness_beat_seconds=BEAT)
    marks: list[int] = []

    def two_held_a_while() -> bool:
        # Open once a third look-up runs (too many threads), or once two have been held for
        # IDLE_BEATS beats of the loop waiting for the first intake.
        if board.count("lookup") >= 3:
            return True
        if board.count("lookup") == 2 and not marks:
            marks.append(board.beats)
        return bool(marks) and board.beats - marks[0] >= IDLE_BEATS

    for generation in (1, 2, 3):
        storage.lookup_gates[generation] = two_held_a_while
        wired.source.put(backend_message(generation))
    assert run_all(wired, heartbeat=board.beat) == 3
    assert storage.most_busy == 2 and storage.opened == [True, True, True]
    assert storage.threads == {"job-io_0", "job-io_1"}
    assert completions(wired) == [1, 2, 3]


def test_the_loop_beats_while_it_waits_for_an_intake(wired: Wired) -> None:
    board, storage, _ = gated(wired)
    wired.container.job_runner.add_kwargs(liveness_beat_seconds=BEAT)
    entered: list[int] = []

    def beaten_while_held() -> bool:
        if not entered:
            entered.append(board.beats)
        return board.beats - entered[0] >= IDLE_BEATS

    storage.lookup_gates[1] = beaten_while_held
    wired.source.put(backend_message(1))
    assert run_all(wired, heartbeat=board.beat) == 1
    assert storage.opened == [True] and completions(wired) == [1]


# --- how far ahead the loop prepares --------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_the_loop_takes_its_lookahead_and_at_least_a_batch(wired: Wired, batch: int) -> None:
    wired.model.batch_limit = batch
    wired.container.job_runner.add_kwargs(lookahead=1, max_batch_size=batch)
    for generation in range(1, 6):
        wired.source.put(backend_message(generation))
    turns = iter([False] + [True] * 100)
    taken = wired.container.job_runner().run(should_stop=lambda: next(turns))
    assert taken == batch  # taken in the first turn, then finished after the stop
    assert len(wired.source) == 5 - batch and completions(wired) == list(range(1, batch + 1))


# --- finish slots ---------------------------------------------------------------------------------


def test_four_rendered_jobs_may_wait_for_their_upload_then_the_model_pauses(
    wired: Wired,
) -> None:
    board, storage, model = gated(wired)
    wired.container.job_runner.add_kwargs(io_threads=8, liveness_beat_seconds=BEAT)
    opened_at: list[int] = []
    idle: list[int] = [0, 0]  # beats in a row with the model idle, model calls then

    def beat() -> None:
        with board.cond:
            calls = len(model.batches)
            if model.rendering or calls != idle[1]:
                idle[:] = [0, calls]
            else:
                idle[0] += 1
            if not opened_at and calls >= 5 and idle[0] >= IDLE_BEATS:
                opened_at.append(calls)  # the loop waits for a finish slot
        board.beat()

    for generation in range(1, 8):
        storage.upload_gates[generation] = lambda: bool(opened_at)
        wired.source.put(backend_message(generation))
    assert run_all(wired, heartbeat=beat) == 7
    # Four uploads held the four slots: the fifth job was rendered, the sixth was not.
    assert opened_at == [5] and storage.opened == [True] * 7
    assert completions(wired) == list(range(1, 8))


def test_a_whole_batch_may_wait_for_its_uploads_whatever_the_backlog(wired: Wired) -> None:
    # Batches of 2 and a backlog of 1: two rendered jobs still wait for upload at once (here
    # two jobs of different sizes, each its own model call).
    board, storage, _ = gated(wired, batch_limit=2)
    wired.container.job_runner.add_kwargs(max_batch_size=2, finish_backlog=1)
    storage.upload_gates[1] = storage.upload_gates[2] = lambda: board.count("upload") == 2
    wired.source.put(backend_message(1))
    wired.source.put(backend_message(2, parameters={"steps": 10}))
    assert run_all(wired) == 2
    assert storage.most_busy == 2 and storage.opened == [True, True]
    assert completions(wired) == [1, 2]


# --- the end of a run -----------------------------------------------------------------------------


def test_run_returns_once_uploads_that_overlapped_are_settled(wired: Wired) -> None:
    # Two I/O threads. Job 1's upload waits for job 2's, so both are in the finish stage at
    # once. Job 2's upload puts two messages whose images are stored already; their look-ups
    # wait for each other, so both run only once both uploads returned (two threads).
    # Then nothing is left: run returns.
    board, storage, _ = gated(wired)
    wired.container.job_runner.add_kwargs(io_threads=2, lookahead=2)
    storage.upload_gates[1] = lambda: board.has("upload 2")

    def publish_stored() -> None:
        for generation in (3, 4):
            storage.outputs[f"generations/{generation}.png"] = (b"png", {})
            wired.source.put(backend_message(generation))

    storage.on_upload[2] = publish_stored
    storage.lookup_gates[3] = storage.lookup_gates[4] = lambda: board.has("lookup 3") and board.has(
        "lookup 4"
    )
    wired.source.put(backend_message(1))
    wired.source.put(backend_message(2))
    worker = threading.Thread(target=run_all, args=(wired,), daemon=True)
    worker.start()
    worker.join(timeout=2 * GIVE_UP)
    assert not worker.is_alive(), "run did not return"
    assert storage.opened == [True, True, True]
    assert completions(wired) == [1, 2, 3, 4] and len(wired.source.acked) == 4


def test_a_failed_upload_is_handed_back_with_its_error(wired: Wired) -> None:
    wired.storage.fail_puts.append(StorageError("S3 unreachable"))
    wired.source.put(backend_message(1))
    assert run_all(wired) == 1
    ((delivery, reason, attempt, delay),) = wired.source.retried
    assert (reason, attempt, delay) == ("STORAGE_ERROR: S3 unreachable", 1, 5.0)
    assert delivery.attempt == 0 and wired.source.parked == []
    assert wired.telemetry.of("finished") == [
        {"outcome": "retry", "error_code": "STORAGE_ERROR", "seconds": pytest.approx(5.0)}
    ]


# --- which prepared jobs share a model call -------------------------------------------------------


def batches_of(
    wired: Wired,
    messages: Sequence[Mapping[str, Any] | bytes],
    *,
    batch: int,
    lookahead: int,
    io_threads: int = 2,
    gate_2_on_render_of_1: bool = False,
) -> list[list[int]]:
    """The model calls of one run. Generation 9 (its own size) goes first; generation 1's
    intake ends only once 9 is uploading, which comes after every intake queued before it:
    so when 1 heads the next call, the intakes behind it are done, except 2 when it is gated
    on 1's render."""
    board, storage, model = gated(wired, batch_limit=batch)
    wired.container.job_runner.add_kwargs(
        io_threads=io_threads, lookahead=lookahead, max_batch_size=batch
    )
    storage.lookup_gates[1] = lambda: board.has("upload 9")
    if gate_2_on_render_of_1:
        storage.lookup_gates[2] = lambda: board.has("render 1")
    wired.source.put(backend_message(9, parameters={"steps": 10}))
    for message in messages:
        wired.source.put(message)
    assert run_all(wired) == len(messages) + 1
    assert all(storage.opened)
    return model.batches


def test_a_call_takes_prepared_jobs_of_its_kind_up_to_the_batch_size(wired: Wired) -> None:
    messages = [backend_message(generation) for generation in (1, 2, 3)]
    assert batches_of(wired, messages, batch=2, lookahead=4) == [[9], [1, 2], [3]]
    assert completions(wired) == [1, 2, 3, 9]


def test_a_lookahead_below_the_batch_size_still_fills_a_batch(wired: Wired) -> None:
    messages = [backend_message(generation) for generation in (1, 2)]
    assert batches_of(wired, messages, batch=3, lookahead=1) == [[9], [1, 2]]


def test_a_call_never_waits_for_an_intake_and_takes_one_done_behind_it(wired: Wired) -> None:
    messages = [backend_message(generation) for generation in (1, 2, 3)]
    batches = batches_of(
        wired, messages, batch=2, lookahead=4, io_threads=3, gate_2_on_render_of_1=True
    )
    assert batches == [[9], [1, 3], [2]]


@pytest.mark.parametrize(
    "other",
    [backend_message(2, parameters={"steps": 20}), b"not json"],
    ids=["another-kind", "settled-at-intake"],
)
def test_a_call_passes_over_a_job_it_cannot_take(
    wired: Wired, other: Mapping[str, Any] | bytes
) -> None:
    messages = [backend_message(1), other, backend_message(3)]
    batches = batches_of(wired, messages, batch=2, lookahead=4)
    assert batches == ([[9], [1, 3], [2]] if isinstance(other, Mapping) else [[9], [1, 3]])
