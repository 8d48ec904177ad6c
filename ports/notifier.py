"""Notifier: tells the backend how far a generation got and how it ended."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from domain.errors import ErrorCode
from domain.progress import ProgressUpdate


@runtime_checkable
class Notifier(Protocol):
    """The backend's webhooks (docs/contract.md, "Webhooks").

    ``completed`` and ``failed`` either deliver or raise: ``WebhookUnauthorized`` (401/403: the
    token or the source header is wrong), ``WebhookNotFound`` (404: the backend does not know
    the generation, perhaps not yet), ``WebhookRejected`` (another refusal retrying cannot
    change), ``NotifyError`` (the backend could not be reached or answered 5xx). They retry
    briefly inside the call; longer outages are waited out by handing the message back.
    """

    def progress(self, generation_id: int, update: ProgressUpdate) -> None:
        """Best effort: must never fail or slow the generation. None is sent for a generation
        after ``completed``/``failed`` was called for it, until a new run starts (step 0)."""

    def completed(self, generation_id: int, result_url: str, metadata: Mapping[str, Any]) -> None:
        """Deliver the completion, or raise (see the class)."""

    def failed(self, generation_id: int, code: ErrorCode, message: str, retry_count: int) -> None:
        """Deliver the failure, or raise (see the class)."""

    def check_access(self) -> None:
        """Whether the backend accepts the worker's credentials: ``WebhookUnauthorized`` when it
        refuses them, ``NotifyError`` when it cannot be asked now; changes nothing there."""
