"""Notifier: tells the backend how far a generation got and how it ended."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from domain.errors import ErrorCode
from domain.progress import ProgressUpdate


@runtime_checkable
class Notifier(Protocol):
    """The backend's webhooks (CONTRACT.md section 2)."""

    def progress(self, generation_id: int, update: ProgressUpdate) -> None:
        """Best effort: must never fail or slow the generation."""

    def completed(self, generation_id: int, result_url: str, metadata: Mapping[str, Any]) -> None:
        """Deliver the completion or raise NotifyError (the job is then retried)."""

    def failed(self, generation_id: int, code: ErrorCode, message: str, retry_count: int) -> None:
        """Deliver the failure or raise NotifyError (the job is then retried)."""
