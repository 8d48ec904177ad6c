"""The use case: one generation from request to stored, signed PNG and a delivered outcome."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from PIL import Image

from domain.errors import (
    FailureReport,
    GenerationError,
    NotifyError,
    WebhookRejected,
    as_generation_error,
)
from domain.progress import (
    DEFAULT_MILESTONES,
    ProgressMilestones,
    ProgressUpdate,
    StepTimeEstimator,
)
from domain.request import GenerationRequest, SignatureSpec, output_key
from domain.watermark import Watermarker
from ports.image_model import BatchItem, ImageModel, StepCallback
from ports.notifier import Notifier
from ports.storage import LoraArtifact, Storage, StoredOutput
from ports.telemetry import NoTelemetry, Telemetry

log = logging.getLogger(__name__)

METADATA_KEY = "generation-metadata"
"""Storage metadata entry holding the completion metadata as JSON, reused on redelivery."""
DEFAULT_MAX_RETRIES = 3


class Outcome(str, Enum):
    """How a delivery ended, which decides how it is settled on the queue."""

    COMPLETED = "completed"
    """Image stored and completion delivered: ack."""
    FAILED = "failed"
    """Failure delivered to the backend: ack."""
    RETRY = "retry"
    """Transient trouble and attempts left (or the backend unreachable): deliver again."""
    REJECTED = "rejected"
    """The backend refused the outcome's webhook for good: park the message for an operator."""


@dataclass(frozen=True)
class JobResult:
    """What happened to one request."""

    outcome: Outcome
    generation_id: int
    result_url: str | None = None
    metadata: Mapping[str, Any] | None = None
    error: GenerationError | None = None
    reused: bool = False
    pending_failure: FailureReport | None = None
    """On RETRY: a final failure the backend could not be told; deliver it, do not re-run."""


@dataclass(frozen=True)
class Inputs:
    """What a job needs besides its request, fetched before the model runs."""

    lora: LoraArtifact | None
    signature: Image.Image | None


@dataclass(frozen=True)
class Prepared:
    """A job whose inputs are ready: the model's next piece of work."""

    request: GenerationRequest
    attempt: int
    inputs: Inputs
    started: float
    fetched: float


@dataclass(frozen=True)
class Rendered:
    """A job whose image the model produced, waiting to be signed, stored and reported."""

    prepared: Prepared
    image: Image.Image
    began: float
    generated: float


_Phase = TypeVar("_Phase")


class GenerationJob:
    """Generate, sign, store and report one request; idempotent across redeliveries.

    ``max_retries`` bounds how often a retryable failure is handed back to the queue before it is
    reported as failed. An undeliverable webhook is always handed back: reporting it is impossible,
    and the stored image makes the next delivery cheap.
    """

    def __init__(
        self,
        *,
        model: ImageModel,
        storage: Storage,
        notifier: Notifier,
        watermarker: Watermarker,
        step_times: StepTimeEstimator,
        milestones: Sequence[int] = DEFAULT_MILESTONES,
        max_retries: int = DEFAULT_MAX_RETRIES,
        output_prefix: str = "generations/",
        clock: Callable[[], float] = time.monotonic,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._model = model
        self._storage = storage
        self._notifier = notifier
        self._watermarker = watermarker
        self._step_times = step_times
        self._milestones = tuple(milestones)
        self._max_retries = max_retries
        self._output_prefix = output_prefix
        self._clock = clock
        self._telemetry = telemetry if telemetry is not None else NoTelemetry()

    @property
    def max_batch_size(self) -> int:
        """The most jobs the model runs in one call."""
        return max(1, self._model.max_batch_size)

    @property
    def telemetry(self) -> Telemetry:
        """Where the job's events go (the runner reports job starts and ends there too)."""
        return self._telemetry

    @property
    def max_retries(self) -> int:
        """Deliveries that may end in a retryable error before the failure is final."""
        return self._max_retries

    def run(self, request: GenerationRequest, *, attempt: int = 0) -> JobResult:
        """Run the request; ``attempt`` counts earlier deliveries that ended in a retry."""
        prepared = self.prepare(request, attempt=attempt)
        if isinstance(prepared, JobResult):
            return prepared
        rendered = self.render(prepared)
        if isinstance(rendered, JobResult):
            return rendered
        return self.finish(rendered)

    def prepare(self, request: GenerationRequest, *, attempt: int = 0) -> Prepared | JobResult:
        """I/O before the model: the idempotency check and the inputs (LoRA, signature).

        A JobResult when the job ends here (output already stored, or an error).
        """
        return self._guarded(request, attempt, lambda: self._prepare(request, attempt))

    def render(self, prepared: Prepared) -> Rendered | JobResult:
        """The model's part: denoise with progress milestones; a JobResult on error."""
        return self._guarded(prepared.request, prepared.attempt, lambda: self._render(prepared))

    def render_batch(self, batch: Sequence[Prepared]) -> list[Rendered | JobResult]:
        """The model's part for jobs sharing ``batch_key``: one model call, one result each.

        An error of one item ends that job alone; an error of the whole call ends every job
        of the batch (each according to its own attempt count).
        """
        if len(batch) == 1:
            return [self.render(batch[0])]
        items = [
            BatchItem(
                request=prepared.request,
                lora=prepared.inputs.lora,
                on_step=self._progress_reporter(prepared.request),
            )
            for prepared in batch
        ]
        began = self._clock()
        try:
            outputs = self._model.generate_batch(items)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            error = as_generation_error(exc)
            return [self._fail(p.request, error, p.attempt) for p in batch]
        generated = self._clock()
        head = batch[0].request
        self._step_times.record(
            steps=head.steps, seconds=generated - began, width=head.width, height=head.height
        )
        results: list[Rendered | JobResult] = []
        for prepared, output in zip(batch, outputs, strict=True):
            if isinstance(output, Image.Image):
                results.append(
                    Rendered(prepared=prepared, image=output, began=began, generated=generated)
                )
            else:
                results.append(self._fail(prepared.request, output, prepared.attempt))
        images = sum(isinstance(result, Rendered) for result in results)
        if images:
            self._telemetry.images_generated(
                count=images, steps=head.steps, seconds=generated - began
            )
        return results

    def finish(self, rendered: Rendered) -> JobResult:
        """I/O after the model: sign, encode, store, deliver the completion."""
        prepared = rendered.prepared
        return self._guarded(prepared.request, prepared.attempt, lambda: self._finish(rendered))

    def _guarded(
        self, request: GenerationRequest, attempt: int, phase: Callable[[], _Phase]
    ) -> _Phase | JobResult:
        """Run one phase; any error becomes the job's outcome (retry or reported failure)."""
        try:
            return phase()
        except GenerationError as exc:
            return self._fail(request, exc, attempt)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log.exception("generation %s: unexpected error", request.generation_id)
            return self._fail(request, as_generation_error(exc), attempt)

    def _prepare(self, request: GenerationRequest, attempt: int) -> Prepared | JobResult:
        started = self._clock()
        existing = self._storage.find_output(self.output_key(request.generation_id))
        if existing is not None:
            return self._report_existing(request.generation_id, existing)
        inputs = self._fetch_inputs(request)
        return Prepared(
            request=request, attempt=attempt, inputs=inputs, started=started, fetched=self._clock()
        )

    def _render(self, prepared: Prepared) -> Rendered:
        request = prepared.request
        on_step = self._progress_reporter(request)
        began = self._clock()
        image = self._model.generate(request, prepared.inputs.lora, on_step)
        generated = self._clock()
        self._step_times.record(
            steps=request.steps,
            seconds=generated - began,
            width=request.width,
            height=request.height,
        )
        self._telemetry.images_generated(count=1, steps=request.steps, seconds=generated - began)
        return Rendered(prepared=prepared, image=image, began=began, generated=generated)

    def _progress_reporter(self, request: GenerationRequest) -> StepCallback:
        """Send the start milestone now; the callback sends the others as steps complete."""
        tracker = ProgressMilestones(
            total_steps=request.steps,
            milestones=self._milestones,
            clock=self._clock,
            expected_step_seconds=self._step_times.seconds_per_step(
                width=request.width, height=request.height
            ),
        )
        self._send_progress(request.generation_id, tracker.start())

        def on_step(step: int, _total: int) -> None:
            self._send_progress(request.generation_id, tracker.step(step))

        return on_step

    def _finish(self, rendered: Rendered) -> JobResult:
        prepared = rendered.prepared
        request = prepared.request
        image = rendered.image
        if request.signature is not None:
            image = self._watermarker.stamp(image, request.signature, prepared.inputs.signature)
        png = encode_png(image)
        encoded = self._clock()
        metadata = self._metadata(request, prepared.inputs.lora)
        metadata["durations"] = {
            "fetch_seconds": round(prepared.fetched - prepared.started, 3),
            "queued_seconds": round(rendered.began - prepared.fetched, 3),
            "generation_seconds": round(rendered.generated - rendered.began, 3),
            "encode_seconds": round(encoded - rendered.generated, 3),
        }
        stored = self._store(request, png, metadata, prepared.started)
        self._deliver_completion(request.generation_id, stored.url, metadata)
        return JobResult(
            outcome=Outcome.COMPLETED,
            generation_id=request.generation_id,
            result_url=stored.url,
            metadata=metadata,
        )

    def report_if_stored(self, generation_id: int) -> JobResult | None:
        """The completion again when the generation's image is stored, else None.

        A stored image settles the outcome: a failure decided on another copy of the message
        (one that raced it after a dropped connection) must then never be sent.
        """
        existing = self._storage.find_output(self.output_key(generation_id))
        if existing is None:
            return None
        return self._guarded_existing(generation_id, existing)

    def _guarded_existing(self, generation_id: int, stored: StoredOutput) -> JobResult:
        try:
            return self._report_existing(generation_id, stored)
        except NotifyError as exc:
            return JobResult(outcome=Outcome.RETRY, generation_id=generation_id, error=exc)

    def output_key(self, generation_id: int) -> str:
        """The object key of a generation's PNG, stable across redeliveries."""
        return output_key(generation_id, self._output_prefix)

    def _report_existing(self, generation_id: int, stored: StoredOutput) -> JobResult:
        """The image exists, so the outcome is settled: only a completion may ever be sent."""
        try:
            metadata = json.loads(stored.metadata.get(METADATA_KEY, "{}"))
        except ValueError:
            log.warning("generation %s: stored metadata unreadable", generation_id)
            metadata = {}
        if not isinstance(metadata, dict):
            metadata = {}
        log.info("generation %s: output exists, reporting it again", generation_id)
        self._deliver_completion(generation_id, stored.url, metadata)
        return JobResult(
            outcome=Outcome.COMPLETED,
            generation_id=generation_id,
            result_url=stored.url,
            metadata=metadata,
            reused=True,
        )

    def _deliver_completion(
        self, generation_id: int, url: str, metadata: Mapping[str, Any]
    ) -> None:
        """Once the image is stored the outcome is settled: any delivery trouble means retry."""
        try:
            self._notifier.completed(generation_id, url, metadata)
        except NotifyError:
            raise
        except Exception as exc:
            raise NotifyError(f"completion not delivered: {type(exc).__name__}: {exc}") from exc

    def _fetch_inputs(self, request: GenerationRequest) -> Inputs:
        lora = self._storage.fetch_lora(request.lora_ref) if request.lora_ref else None
        signature = self._fetch_signature(request.signature)
        return Inputs(lora=lora, signature=signature)

    def _fetch_signature(self, spec: SignatureSpec | None) -> Image.Image | None:
        if spec is None or spec.image_ref is None:
            return None
        return self._watermarker.decode_signature(self._storage.fetch_signature(spec.image_ref))

    def _store(
        self,
        request: GenerationRequest,
        png: bytes,
        metadata: dict[str, Any],
        started: float,
    ) -> StoredOutput:
        """Store the PNG with its metadata, then add the upload and total times to the metadata."""
        before = self._clock()
        stored = self._storage.put_output(
            self.output_key(request.generation_id),
            png,
            {
                METADATA_KEY: json.dumps(metadata, sort_keys=True),
                "generation-id": str(request.generation_id),
                "content-sha256": hashlib.sha256(png).hexdigest(),
            },
        )
        after = self._clock()
        metadata["durations"]["upload_seconds"] = round(after - before, 3)
        metadata["durations"]["total_seconds"] = round(after - started, 3)
        return stored

    def _metadata(self, request: GenerationRequest, lora: LoraArtifact | None) -> dict[str, Any]:
        return {
            "seed": request.seed,
            "seed_was_chosen": request.seed_was_chosen,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "width": request.width,
            "height": request.height,
            "scheduler": request.scheduler,
            "model": self._model.name,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "style_id": request.style_id,
            "task_id": request.task_id,
            "lora_path": request.lora_ref,
            "lora_checksum": lora.checksum if lora else None,
            "lora_scale": request.lora_scale if lora else None,
            "signature": _signature_metadata(request.signature),
        }

    def _send_progress(self, generation_id: int, update: ProgressUpdate | None) -> None:
        if update is None:
            return
        try:
            self._notifier.progress(generation_id, update)
        except Exception:  # pylint: disable=broad-exception-caught
            # Progress is best effort by contract: it must never fail a generation.
            log.warning("generation %s: progress update not delivered", generation_id)

    def _fail(self, request: GenerationRequest, error: GenerationError, attempt: int) -> JobResult:
        generation_id = request.generation_id
        if isinstance(error, WebhookRejected):
            log.error("generation %s: the backend refused the outcome: %s", generation_id, error)
            return JobResult(outcome=Outcome.REJECTED, generation_id=generation_id, error=error)
        if isinstance(error, NotifyError) or (error.retryable and attempt < self._max_retries):
            log.warning(
                "generation %s: %s (attempt %d), handing back for retry",
                generation_id,
                error,
                attempt,
            )
            return JobResult(outcome=Outcome.RETRY, generation_id=generation_id, error=error)
        return self.report_failure(generation_id, error, attempt)

    def report_failure(self, generation_id: int, error: GenerationError, attempt: int) -> JobResult:
        """Deliver a final failure; if the backend cannot be told, hand it back to be re-sent."""
        log.error("generation %s failed: %s", generation_id, error)
        report = FailureReport(
            generation_id=generation_id,
            code=error.code,
            message=error.message,
            retry_count=attempt,
        )
        outcome = self.deliver_failure(report)
        return JobResult(
            outcome=outcome,
            generation_id=generation_id,
            error=error,
            pending_failure=report if outcome is Outcome.RETRY else None,
        )

    def deliver_failure(self, report: FailureReport) -> Outcome:
        """Send a decided failure as it was decided.

        FAILED when delivered, RETRY when the backend cannot be told now, REJECTED when it
        refused the webhook for good.
        """
        try:
            self._notifier.failed(
                report.generation_id, report.code, report.message, report.retry_count
            )
        except WebhookRejected as exc:
            log.error(
                "generation %s: the backend refused the failure: %s", report.generation_id, exc
            )
            return Outcome.REJECTED
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log.warning("generation %s: failure not delivered: %s", report.generation_id, exc)
            return Outcome.RETRY
        return Outcome.FAILED


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of an image (lossless, moderately compressed)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _signature_metadata(spec: SignatureSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {
        "kind": "image" if spec.image_ref else "text",
        "position": spec.config.position,
        "size": spec.config.size,
        "opacity": spec.config.opacity,
    }
