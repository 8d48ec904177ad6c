"""One exception hierarchy with stable error codes.

The backend stores ``error_code`` verbatim and decides on re-queueing from it, so codes are part
of the contract: never rename one. ``retryable`` says whether trying the same job again later can
succeed (a storage outage can pass; a missing LoRA will not appear by itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ErrorCode(str, Enum):
    """Stable codes sent as ``error_code`` in the failure webhook."""

    INVALID_REQUEST = "INVALID_REQUEST"
    UNSUPPORTED_TASK = "UNSUPPORTED_TASK"
    LORA_NOT_FOUND = "LORA_NOT_FOUND"
    LORA_INVALID = "LORA_INVALID"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    GPU_OOM = "GPU_OOM"
    MODEL_ERROR = "MODEL_ERROR"
    STORAGE_ERROR = "STORAGE_ERROR"
    NOTIFY_ERROR = "NOTIFY_ERROR"
    PROVENANCE_ERROR = "PROVENANCE_ERROR"
    INTERNAL_ERROR = "INTERNAL_ERROR"

    @property
    def retryable(self) -> bool:
        """Whether the same job may succeed when tried again later."""
        return self in _RETRYABLE

    @property
    def description(self) -> str:
        """The one wording of the code: for operators and docs/error-codes.md."""
        return _DESCRIPTIONS[self]


_RETRYABLE = frozenset(
    {
        ErrorCode.GPU_OOM,
        ErrorCode.STORAGE_ERROR,
        ErrorCode.NOTIFY_ERROR,
        ErrorCode.PROVENANCE_ERROR,
        ErrorCode.INTERNAL_ERROR,
    }
)

_DESCRIPTIONS = {
    ErrorCode.INVALID_REQUEST: "The message is not JSON, or a field is missing, out of range or"
    " an unreadable reference; `error_message` names the field, e.g."
    " `data.parameters.width: must be a multiple of 8, got 500`.",
    ErrorCode.UNSUPPORTED_TASK: "The message's `type` is not `image_generation`.",
    ErrorCode.LORA_NOT_FOUND: "No LoRA exists at `lora_path`.",
    ErrorCode.LORA_INVALID: "The LoRA is not a safetensors LoRA that fits the base model"
    " (pickles, corrupt files, foreign layers, too large, rank too high).",
    ErrorCode.SIGNATURE_INVALID: "The signature image or `signature_config` cannot be used.",
    ErrorCode.GPU_OOM: "The GPU ran out of memory, even for a single image.",
    ErrorCode.MODEL_ERROR: "The diffusion model failed to load or to generate.",
    ErrorCode.STORAGE_ERROR: "Object storage could not be read or written (or a LoRA left the"
    " worker's disk cache before the model loaded it).",
    ErrorCode.NOTIFY_ERROR: "The backend's webhook endpoint could not be reached.",
    ErrorCode.PROVENANCE_ERROR: "The image could not be marked (content credentials not signed,"
    " e.g. the timestamp authority did not answer, or the invisible mark not written); no"
    " unmarked image is stored.",
    ErrorCode.INTERNAL_ERROR: "An unexpected error in the worker.",
}


class GenerationError(Exception):
    """Base of every error the worker reports to the backend."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def retryable(self) -> bool:
        """Whether the job may succeed when tried again."""
        return self.code.retryable

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


class InvalidRequest(GenerationError):
    """The message cannot be turned into a generation request."""

    code = ErrorCode.INVALID_REQUEST


class UnsupportedTask(GenerationError):
    """The message asks for a task this worker does not run."""

    code = ErrorCode.UNSUPPORTED_TASK


class LoraNotFound(GenerationError):
    """The artist's LoRA does not exist where the message says."""

    code = ErrorCode.LORA_NOT_FOUND


class LoraInvalid(GenerationError):
    """The LoRA exists but is unsafe or does not fit the base model."""

    code = ErrorCode.LORA_INVALID


class SignatureInvalid(GenerationError):
    """The signature image or its placement cannot be used."""

    code = ErrorCode.SIGNATURE_INVALID


class GpuOutOfMemory(GenerationError):
    """The GPU ran out of memory."""

    code = ErrorCode.GPU_OOM


class ModelError(GenerationError):
    """The diffusion model failed."""

    code = ErrorCode.MODEL_ERROR


class StorageError(GenerationError):
    """Object storage failed (transient)."""

    code = ErrorCode.STORAGE_ERROR


class NotifyError(GenerationError):
    """The backend could not be told (transient)."""

    code = ErrorCode.NOTIFY_ERROR


class ProvenanceFailed(GenerationError):
    """A provenance mark could not be written (transient: signing, a timestamp authority)."""

    code = ErrorCode.PROVENANCE_ERROR


class WebhookRejected(NotifyError):
    """The backend refused a webhook in a way retrying cannot change (400, another 4xx).

    The message is parked, with its decided outcome, for an operator.
    """


class WebhookUnauthorized(NotifyError):
    """The backend refused the worker's credentials (401, 403): a misconfiguration, not a bad
    job. The message goes back to the queue and the worker reports itself not ready."""


class WebhookOutcomeUnknown(NotifyError):
    """A failure call was sent but its answer was lost (a read timeout, a dropped connection):
    the backend may have applied it, and refunded the user. Sending it again could refund twice,
    so the message is parked with its outcome for an operator to check."""


class WebhookNotFound(NotifyError):
    """The backend does not know the generation (404), perhaps not yet: it publishes the
    message inside the transaction that creates the generation. Retried for a bounded time."""


class InternalError(GenerationError):
    """Anything unexpected; reported so that no job disappears silently."""

    code = ErrorCode.INTERNAL_ERROR


@dataclass(frozen=True)
class FailureReport:
    """A final failure decided for a generation, kept until the backend has been told.

    Carried with a delivery handed back to the queue, so a failure that could not be delivered is
    delivered later as it was decided, never replaced by a second attempt at the job.
    ``poison`` marks a message that is parked (not acked) once the failure is delivered.
    """

    generation_id: int
    code: ErrorCode
    message: str
    retry_count: int
    poison: bool = False


def as_generation_error(exc: BaseException) -> GenerationError:
    """Map any exception to a reportable error, keeping a ``GenerationError`` as it is."""
    if isinstance(exc, GenerationError):
        return exc
    return InternalError(f"{type(exc).__name__}: {exc}")
