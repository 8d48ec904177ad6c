"""Telemetry: what the worker tells its operators (Prometheus in production, nothing in tests).

Events are pushed here as they happen; gauges that can be read at any time (queue depth, cache
sizes, GPU memory) are pulled by the metrics adapter itself and never pass through the domain.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class LoraCacheStats(Protocol):
    """A LoRA cache's counters for the metrics (the disk cache's and the pipeline LoRAs' own
    snapshot types provide them; each may add ``bytes``, ``max_bytes`` or ``capacity``)."""

    @property
    def hits(self) -> int:
        """Lookups served by the cache."""

    @property
    def misses(self) -> int:
        """Lookups that had to download or load."""

    @property
    def evictions(self) -> int:
        """Entries dropped to stay within the cache's cap."""

    @property
    def entries(self) -> int:
        """LoRAs the cache holds now."""


@runtime_checkable
class Telemetry(Protocol):
    """Receives the worker's events; implementations must be thread-safe and never raise."""

    def job_started(self) -> None:
        """A delivery became a job the worker is working on (jobs in flight +1)."""

    def job_finished(self, *, outcome: str, error_code: str | None, seconds: float) -> None:
        """A job ended (jobs in flight -1): ``outcome`` is completed/failed/retry/rejected,
        ``error_code`` the ErrorCode value when it did not complete, ``seconds`` the time from
        intake to its settlement."""

    def images_generated(self, *, count: int, steps: int, seconds: float) -> None:
        """One model call produced ``count`` images of ``steps`` denoising steps in ``seconds``."""

    def webhook_attempt(self, *, kind: str, ok: bool) -> None:
        """One HTTP attempt of a webhook (progress/completed/failed) and whether it was accepted."""

    def outcome_undelivered(self, *, outcome: str, reason: str, parked: bool) -> None:
        """A decided outcome (completed/failed) the backend could not take: ``reason`` is
        unreachable, unauthorized, not_found, rejected or unknown (a failure call's answer was
        lost); ``parked`` when the worker gave up on it and parked the message for an operator,
        else the message went back to the queue."""

    def failure_withheld(self) -> None:
        """A failure not sent because its generation's failure was already told (the backend
        refunds on every failure call)."""

    def delivery_returned(self, *, reason: str) -> None:
        """A delivery handed back without running: ``reason`` is in_flight (a copy of its job is
        running here), held_too_long (it waited past MAX_HOLD_SECONDS), connection_lost (its
        connection died before it started) or backend_refused (the backend refuses the token)."""


class NoTelemetry:
    """Telemetry that records nothing: the default where no metrics are served."""

    def job_started(self) -> None:
        """Nothing to record."""

    def job_finished(self, *, outcome: str, error_code: str | None, seconds: float) -> None:
        """Nothing to record."""

    def images_generated(self, *, count: int, steps: int, seconds: float) -> None:
        """Nothing to record."""

    def webhook_attempt(self, *, kind: str, ok: bool) -> None:
        """Nothing to record."""

    def outcome_undelivered(self, *, outcome: str, reason: str, parked: bool) -> None:
        """Nothing to record."""

    def failure_withheld(self) -> None:
        """Nothing to record."""

    def delivery_returned(self, *, reason: str) -> None:
        """Nothing to record."""
