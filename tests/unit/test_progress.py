"""Progress milestones and their ETA, driven by a hand-advanced clock."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from domain.progress import (
    DEFAULT_MILESTONES,
    ProgressMilestones,
    ProgressUpdate,
    StepTimeEstimator,
)


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _tracker(
    clock: FakeClock,
    total_steps: int = 50,
    milestones: Sequence[int] = DEFAULT_MILESTONES,
    expected_step_seconds: float | None = None,
) -> ProgressMilestones:
    return ProgressMilestones(
        total_steps=total_steps,
        milestones=milestones,
        clock=clock,
        expected_step_seconds=expected_step_seconds,
    )


def _run(
    tracker: ProgressMilestones, clock: FakeClock, step_seconds: float
) -> list[ProgressUpdate]:
    """Start the tracker and run every step, each taking ``step_seconds``; the updates sent."""
    updates = [tracker.start()]
    for step in range(1, tracker.total_steps + 1):
        clock.advance(step_seconds)
        updates.append(tracker.step(step))
    return [update for update in updates if update is not None]


def test_default_milestones_are_the_contracts() -> None:
    assert DEFAULT_MILESTONES == (0, 25, 50, 75, 90)


def test_default_milestones_over_a_50_step_run(clock: FakeClock) -> None:
    updates = _run(_tracker(clock), clock, step_seconds=0.25)

    assert [u.as_payload() for u in updates] == [
        {"current_step": 0, "total_steps": 50, "progress_percent": 0, "estimated_seconds": None},
        {"current_step": 13, "total_steps": 50, "progress_percent": 26, "estimated_seconds": 10},
        {"current_step": 25, "total_steps": 50, "progress_percent": 50, "estimated_seconds": 7},
        # The contract's example payload.
        {"current_step": 38, "total_steps": 50, "progress_percent": 76, "estimated_seconds": 3},
        {"current_step": 45, "total_steps": 50, "progress_percent": 90, "estimated_seconds": 2},
    ]


def test_eta_is_ceil_of_remaining_steps_times_mean_step_time(clock: FakeClock) -> None:
    tracker = _tracker(clock)
    assert tracker.start() is not None
    durations = [0.1, 0.7, 0.2, 0.5, 0.3, 0.4, 0.2, 0.6, 0.1, 0.2, 0.3, 0.5]
    for step, seconds in enumerate(durations, start=1):
        clock.advance(seconds)
        assert tracker.step(step) is None
    clock.advance(0.9)

    update = tracker.step(13)

    assert update is not None
    mean = (sum(durations) + 0.9) / 13
    assert update.estimated_seconds == math.ceil(37 * mean) == 15


def test_eta_ignores_time_before_start(clock: FakeClock) -> None:
    tracker = _tracker(clock)
    clock.advance(120.0)  # e.g. loading the LoRA between construction and the first step
    tracker.start()
    clock.advance(13 * 0.5)

    update = tracker.step(13)

    assert update is not None
    assert update.estimated_seconds == math.ceil(37 * 0.5)


def test_each_milestone_is_reported_once_even_when_steps_repeat(clock: FakeClock) -> None:
    tracker = _tracker(clock)
    assert tracker.start() is not None
    assert tracker.start() is None
    assert tracker.step(0) is None
    assert tracker.step(13) is not None
    assert tracker.step(13) is None
    assert tracker.step(12) is None
    assert tracker.step(25) is not None


def test_big_step_crossing_several_milestones_yields_one_update(clock: FakeClock) -> None:
    tracker = _tracker(clock)
    tracker.start()
    clock.advance(10.0)

    update = tracker.step(40)

    assert update == ProgressUpdate(
        current_step=40, total_steps=50, progress_percent=80, estimated_seconds=3
    )
    assert tracker.step(41) is None  # 75 was passed with the big step: not reported late
    assert tracker.step(45) is not None  # 90 is still ahead


def test_finishing_in_one_step_reports_only_the_highest(clock: FakeClock) -> None:
    tracker = _tracker(clock, total_steps=3)
    tracker.start()
    assert tracker.step(1).progress_percent == 33
    assert tracker.step(2).progress_percent == 66
    last = tracker.step(3)
    assert last is not None
    assert (last.progress_percent, last.estimated_seconds) == (100, 0)
    assert tracker.step(3) is None


def test_steps_after_the_last_milestone_yield_none(clock: FakeClock) -> None:
    tracker = _tracker(clock)
    tracker.start()
    assert tracker.step(45) is not None
    assert [tracker.step(step) for step in range(46, 51)] == [None] * 5


def test_steps_beyond_total_are_clamped(clock: FakeClock) -> None:
    tracker = _tracker(clock, milestones=(100,))
    update = tracker.step(70)
    assert update is not None
    assert (update.current_step, update.progress_percent) == (50, 100)


def test_zero_percent_without_expectation_has_no_eta(clock: FakeClock) -> None:
    update = _tracker(clock).start()
    assert update == ProgressUpdate(
        current_step=0, total_steps=50, progress_percent=0, estimated_seconds=None
    )


@pytest.mark.parametrize("expected, eta", [(0.25, 13), (0.1, 5), (2.0, 100)])
def test_zero_percent_uses_expected_step_seconds(
    clock: FakeClock, expected: float, eta: int
) -> None:
    update = _tracker(clock, expected_step_seconds=expected).start()
    assert update is not None
    assert update.estimated_seconds == eta


def test_measured_time_replaces_the_expectation(clock: FakeClock) -> None:
    tracker = _tracker(clock, expected_step_seconds=10.0)
    tracker.start()
    clock.advance(13 * 0.5)
    assert tracker.step(13).estimated_seconds == math.ceil(37 * 0.5)


def test_without_zero_milestone_start_reports_nothing(clock: FakeClock) -> None:
    tracker = _tracker(clock, total_steps=20, milestones=(50,))
    assert tracker.start() is None
    assert tracker.step(9) is None
    assert tracker.step(10).progress_percent == 50


def test_custom_milestones_unsorted_and_repeated(clock: FakeClock) -> None:
    tracker = _tracker(clock, total_steps=20, milestones=(100, 10, 10, 60))
    updates = _run(tracker, clock, step_seconds=1.0)
    assert [(u.current_step, u.progress_percent) for u in updates] == [
        (2, 10),
        (12, 60),
        (20, 100),
    ]
    assert updates[-1].estimated_seconds == 0


def test_no_milestones_means_no_updates(clock: FakeClock) -> None:
    assert _run(_tracker(clock, milestones=()), clock, step_seconds=1.0) == []


@pytest.mark.parametrize("total_steps", [0, -1])
def test_invalid_total_steps(clock: FakeClock, total_steps: int) -> None:
    with pytest.raises(ValueError, match="total_steps"):
        _tracker(clock, total_steps=total_steps)


@pytest.mark.parametrize("milestones", [(-1,), (101,), (0, 50, 150)])
def test_invalid_milestones(clock: FakeClock, milestones: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="milestones"):
        _tracker(clock, milestones=milestones)


def test_as_payload_has_exactly_the_webhook_keys() -> None:
    update = ProgressUpdate(
        current_step=38, total_steps=50, progress_percent=76, estimated_seconds=3
    )
    payload = update.as_payload()
    assert list(payload) == ["current_step", "total_steps", "progress_percent", "estimated_seconds"]
    assert payload == {
        "current_step": 38,
        "total_steps": 50,
        "progress_percent": 76,
        "estimated_seconds": 3,
    }


# --- StepTimeEstimator -------------------------------------------------------------------------


def test_estimator_knows_nothing_before_a_record() -> None:
    assert StepTimeEstimator().seconds_per_step(width=512, height=512) is None


def test_estimator_scales_with_pixel_count() -> None:
    estimator = StepTimeEstimator()
    estimator.record(steps=50, seconds=10.0, width=512, height=512)

    at_512 = estimator.seconds_per_step(width=512, height=512)
    at_1024 = estimator.seconds_per_step(width=1024, height=1024)
    at_wide = estimator.seconds_per_step(width=1024, height=512)

    assert at_512 == pytest.approx(0.2)
    assert at_1024 == pytest.approx(0.8)
    assert at_wide == pytest.approx(0.4)


def test_estimator_smooths_towards_new_samples() -> None:
    estimator = StepTimeEstimator(smoothing=0.3)
    estimator.record(steps=10, seconds=1.0, width=1000, height=1000)  # 0.1 s/step/Mpx
    estimator.record(steps=10, seconds=2.0, width=1000, height=1000)  # 0.2 s/step/Mpx

    assert estimator.seconds_per_step(width=1000, height=1000) == pytest.approx(0.13)

    estimator.record(steps=10, seconds=2.0, width=1000, height=1000)
    assert estimator.seconds_per_step(width=1000, height=1000) == pytest.approx(0.151)


def test_estimator_first_sample_is_taken_as_is() -> None:
    estimator = StepTimeEstimator(smoothing=0.3)
    estimator.record(steps=20, seconds=5.0, width=2000, height=500)
    assert estimator.seconds_per_step(width=1000, height=1000) == pytest.approx(0.25)


def test_estimator_samples_of_other_sizes_are_normalized() -> None:
    estimator = StepTimeEstimator(smoothing=0.5)
    estimator.record(steps=10, seconds=1.0, width=500, height=500)  # 0.4 s/step/Mpx
    estimator.record(steps=10, seconds=4.0, width=1000, height=1000)  # 0.4 s/step/Mpx
    assert estimator.seconds_per_step(width=1000, height=1000) == pytest.approx(0.4)


@pytest.mark.parametrize("steps, seconds", [(0, 5.0), (-1, 5.0), (10, 0.0), (10, -2.0)])
def test_estimator_ignores_non_positive_steps_or_seconds(steps: int, seconds: float) -> None:
    estimator = StepTimeEstimator()
    estimator.record(steps=steps, seconds=seconds, width=512, height=512)
    assert estimator.seconds_per_step(width=512, height=512) is None

    estimator.record(steps=10, seconds=1.0, width=1000, height=1000)
    estimator.record(steps=steps, seconds=seconds, width=1000, height=1000)
    assert estimator.seconds_per_step(width=1000, height=1000) == pytest.approx(0.1)


@pytest.mark.parametrize("width, height", [(0, 512), (512, 0), (-8, 512), (512, -8)])
def test_estimator_ignores_an_empty_size(width: int, height: int) -> None:
    estimator = StepTimeEstimator()
    estimator.record(steps=10, seconds=1.0, width=width, height=height)
    assert estimator.seconds_per_step(width=512, height=512) is None


@pytest.mark.parametrize(
    "steps, seconds, width, height",
    [(1, 0.5, 1000, 1000), (10, 5.0, 1, 1_000_000), (10, 5.0, 1_000_000, 1)],
)
def test_estimator_counts_the_smallest_real_sample(
    steps: int, seconds: float, width: int, height: int
) -> None:
    # One step, or a one pixel wide or high image: 0.5 s per step per megapixel either way.
    estimator = StepTimeEstimator()
    estimator.record(steps=steps, seconds=seconds, width=width, height=height)
    assert estimator.seconds_per_step(width=1000, height=1000) == 0.5
    assert estimator.seconds_per_step(width=2000, height=500) == 0.5
    assert estimator.seconds_per_step(width=100, height=100) == 0.005


def test_estimator_smoothing_of_1_keeps_only_the_newest_sample() -> None:
    estimator = StepTimeEstimator(smoothing=1.0)
    estimator.record(steps=10, seconds=1.0, width=1000, height=1000)
    estimator.record(steps=10, seconds=3.0, width=1000, height=1000)
    assert estimator.seconds_per_step(width=1000, height=1000) == 0.3


@pytest.mark.parametrize("smoothing", [0.0, -0.1, 1.01, 1.5, 2.0])
def test_estimator_smoothing_outside_0_to_1_is_refused(smoothing: float) -> None:
    with pytest.raises(ValueError) as caught:
        StepTimeEstimator(smoothing=smoothing)
    assert str(caught.value) == f"smoothing must lie within (0, 1], got {smoothing}"


def test_a_single_step_run_reports_start_and_finish(clock: FakeClock) -> None:
    tracker = _tracker(clock, total_steps=1)
    assert tracker.start() == ProgressUpdate(0, 1, 0, None)
    clock.advance(3.0)
    assert tracker.step(1) == ProgressUpdate(1, 1, 100, 0)


@pytest.mark.parametrize("step", [0, -3])
def test_a_step_below_zero_counts_as_none_done(clock: FakeClock, step: int) -> None:
    tracker = _tracker(clock, total_steps=50, expected_step_seconds=0.5)
    assert tracker.step(step) == ProgressUpdate(0, 50, 0, 25)


@pytest.mark.parametrize("elapsed, eta", [(5.0000004, 5), (5.000001, 6)])
def test_eta_ignores_float_noise_under_half_a_microsecond(
    clock: FakeClock, elapsed: float, eta: int
) -> None:
    tracker = _tracker(clock, total_steps=2, milestones=(50,))
    tracker.start()
    clock.advance(elapsed)
    assert tracker.step(1) == ProgressUpdate(1, 2, 50, eta)
