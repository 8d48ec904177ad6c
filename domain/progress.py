"""Progress milestones with an ETA measured from the steps already run."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_MILESTONES = (0, 25, 50, 75, 90)


@dataclass(frozen=True)
class ProgressUpdate:
    """The ``progress`` object of the progress webhook."""

    current_step: int
    total_steps: int
    progress_percent: int
    estimated_seconds: int | None

    def as_payload(self) -> dict[str, int | None]:
        """The JSON object the backend stores as-is."""
        return {
            "current_step": self.current_step,
            "total_steps": self.total_steps,
            "progress_percent": self.progress_percent,
            "estimated_seconds": self.estimated_seconds,
        }


class StepTimeEstimator:
    """Running average of seconds per denoising step per megapixel, shared across jobs.

    It gives the 0 % milestone an ETA before the job has measured anything itself.
    """

    def __init__(self, smoothing: float = 0.3) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must lie within (0, 1], got {smoothing}")
        self._smoothing = smoothing
        self._seconds_per_step_mpx: float | None = None
        self._lock = threading.Lock()

    def record(self, *, steps: int, seconds: float, width: int, height: int) -> None:
        """Fold one finished job's measured denoising time into the average."""
        if steps <= 0 or seconds <= 0 or width <= 0 or height <= 0:
            return
        sample = seconds / steps / (width * height / 1e6)
        with self._lock:
            previous = self._seconds_per_step_mpx
            self._seconds_per_step_mpx = (
                sample if previous is None else previous + self._smoothing * (sample - previous)
            )

    def seconds_per_step(self, *, width: int, height: int) -> float | None:
        """Expected seconds per step at this size, or None before any job finished."""
        with self._lock:
            value = self._seconds_per_step_mpx
        return None if value is None else value * width * height / 1e6


class ProgressMilestones:
    """Turns step callbacks into at most one update per milestone, in order.

    ``clock`` is injected so tests control time. A step that crosses several milestones at once
    reports only the highest one, so the backend never sees stale percentages.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        milestones: Sequence[int] = DEFAULT_MILESTONES,
        clock: Callable[[], float],
        expected_step_seconds: float | None = None,
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if any(not 0 <= m <= 100 for m in milestones):
            raise ValueError(f"milestones must lie within 0-100, got {list(milestones)}")
        self.total_steps = total_steps
        self._pending = sorted(set(milestones))
        self._clock = clock
        self._expected = expected_step_seconds
        self._started = clock()

    def start(self) -> ProgressUpdate | None:
        """The 0 % update, if 0 is a milestone; call before the first step."""
        self._started = self._clock()
        return self._advance(0)

    def step(self, current_step: int) -> ProgressUpdate | None:
        """Record that ``current_step`` steps are done; an update when a milestone is crossed."""
        return self._advance(min(max(current_step, 0), self.total_steps))

    def _advance(self, current_step: int) -> ProgressUpdate | None:
        percent = current_step * 100 // self.total_steps
        crossed = [m for m in self._pending if m <= percent]
        if not crossed:
            return None
        self._pending = [m for m in self._pending if m > percent]
        return ProgressUpdate(
            current_step=current_step,
            total_steps=self.total_steps,
            progress_percent=percent,
            estimated_seconds=self._eta(current_step),
        )

    def _eta(self, current_step: int) -> int | None:
        remaining = self.total_steps - current_step
        if current_step > 0:
            per_step = (self._clock() - self._started) / current_step
        elif self._expected is not None:
            per_step = self._expected
        else:
            return None
        # Rounded first so float noise (5.0000000001) does not add a whole second.
        return max(0, math.ceil(round(remaining * per_step, 6)))
