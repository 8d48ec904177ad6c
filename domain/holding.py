"""What the runner holds: a budget of deliveries held ahead of the model, and the generations
in flight in this process."""

from __future__ import annotations

import threading


class HoldBudget:
    """How many deliveries the worker may hold so that each starts within ``max_hold_seconds``.

    Jobs start one model call after another, so the k-th held delivery starts after about
    ``(k - 1) * seconds_per_job``. Before the first measurement the ceiling holds.
    """

    def __init__(self, *, max_hold_seconds: float, ceiling: int, smoothing: float = 0.3) -> None:
        self._max_hold = max_hold_seconds
        self._ceiling = max(1, ceiling)
        self._smoothing = smoothing
        self._seconds_per_job: float | None = None

    def record(self, *, jobs: int, seconds: float) -> None:
        """One model call ran ``jobs`` jobs in ``seconds``."""
        if jobs < 1 or seconds <= 0:
            return
        sample = seconds / jobs
        previous = self._seconds_per_job
        self._seconds_per_job = (
            sample if previous is None else previous + self._smoothing * (sample - previous)
        )

    def count(self) -> int:
        """Deliveries to hold at most: 1 plus those that start within the hold limit."""
        if self._seconds_per_job is None:
            return self._ceiling
        fits = int(self._max_hold // self._seconds_per_job)
        return max(1, min(self._ceiling, 1 + fits))


class InFlight:
    """Generations with a delivery being worked on in this process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generations: set[int] = set()

    def claim(self, generation_id: int) -> bool:
        """Take the generation; False when another delivery of it is in flight here."""
        with self._lock:
            if generation_id in self._generations:
                return False
            self._generations.add(generation_id)
            return True

    def release(self, generation_id: int) -> None:
        """The delivery that claimed the generation is settled."""
        with self._lock:
            self._generations.discard(generation_id)
