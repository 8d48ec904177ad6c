"""The use case: one generation from request to a stored, signed PNG."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from domain.errors import GenerationError, InvalidRequest, as_generation_error
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
from ports.provenance import ProvenanceFacts, ProvenanceMarker
from ports.storage import LoraArtifact, Storage, StoredOutput
from ports.telemetry import Telemetry

log = logging.getLogger(__name__)

METADATA_KEY = "generation-metadata"
"""Storage metadata entry holding the completion metadata as JSON, reused on redelivery."""


@dataclass(frozen=True)
class Completion:
    """A stored image as the backend is told it: where a browser opens it, and its metadata."""

    result_url: str
    metadata: Mapping[str, Any]
    reused: bool = False
    """True when the image was stored before (by an earlier run or another copy of the job)."""


@dataclass(frozen=True)
class Inputs:
    """What a job needs besides its request, fetched before the model runs."""

    lora: LoraArtifact | None
    signature: Image.Image | None


@dataclass(frozen=True)
class Prepared:
    """A job whose inputs are ready: the model's next piece of work."""

    request: GenerationRequest
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


class GenerationJob:
    """One generation from request to a stored, signed PNG, in three steps for the runner's
    three stages: ``prepare`` (I/O), ``render_batch`` (the model), ``finish`` (I/O).

    Each step raises a ``GenerationError`` (or returns one per batch item) and never decides what
    the backend hears: that is the settlement's. Progress milestones are sent from the model's
    step callback.
    """

    def __init__(
        self,
        *,
        model: ImageModel,
        storage: Storage,
        notifier: Notifier,
        watermarker: Watermarker,
        provenance: ProvenanceMarker,
        step_times: StepTimeEstimator,
        output_prefix: str,
        telemetry: Telemetry,
        milestones: Sequence[int] = DEFAULT_MILESTONES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._model = model
        self._storage = storage
        self._notifier = notifier
        self._watermarker = watermarker
        self._provenance = provenance
        self._step_times = step_times
        self._milestones = tuple(milestones)
        self._output_prefix = output_prefix
        self._clock = clock
        self._telemetry = telemetry

    @property
    def max_batch_size(self) -> int:
        """The most jobs the model runs in one call."""
        return max(1, self._model.max_batch_size)

    def output_key(self, generation_id: int) -> str:
        """The object key of a generation's PNG, stable across redeliveries."""
        return output_key(generation_id, self._output_prefix)

    def check(self, request: GenerationRequest) -> None:
        """Refuse, before any download or model work, what storage or the signature cannot take:
        ``InvalidRequest``/``SignatureInvalid`` naming the field."""
        for name, ref, kind in (
            ("data.lora_path", request.lora_ref, "lora"),
            (
                "data.signature_path",
                request.signature.image_ref if request.signature else None,
                "signature",
            ),
        ):
            if ref is None:
                continue
            try:
                self._storage.check_reference(ref, kind)  # type: ignore[arg-type]
            except InvalidRequest as exc:
                raise InvalidRequest(f"{name}: {exc.message}") from exc
        signature = request.signature
        if signature is not None and signature.image_ref is None and signature.text:
            self._watermarker.check_text(signature.text)

    def stored(self, generation_id: int) -> Completion | None:
        """The generation's image if it is stored already, as its completion."""
        existing = self._storage.find_output(self.output_key(generation_id))
        return None if existing is None else _completion_of(existing, reused=True)

    def prepare(self, request: GenerationRequest) -> Prepared:
        """I/O before the model: the LoRA and the signature image, decoded and checked."""
        started = self._clock()
        lora = self._storage.fetch_lora(request.lora_ref) if request.lora_ref else None
        signature = self._fetch_signature(request.signature)
        return Prepared(
            request=request,
            inputs=Inputs(lora=lora, signature=signature),
            started=started,
            fetched=self._clock(),
        )

    def render_batch(
        self, batch: Sequence[Prepared], *, pulse: Callable[[], None] = lambda: None
    ) -> list[Rendered | GenerationError]:
        """The model's part for jobs sharing ``batch_key``: one call, one result per job, in
        order. A failure of the whole call is every job's error. ``pulse`` is called at every
        denoising step (the liveness probe watches it)."""
        items = [
            BatchItem(
                request=prepared.request,
                lora=prepared.inputs.lora,
                on_step=self._progress_reporter(prepared.request, pulse),
            )
            for prepared in batch
        ]
        began = self._clock()
        try:
            if len(items) == 1:
                item = items[0]
                outputs: list[Image.Image | GenerationError] = [
                    self._model.generate(item.request, item.lora, item.on_step)
                ]
            else:
                outputs = self._model.generate_batch(items)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            # The model's boundary: whatever it raised ends each job of the call.
            if not isinstance(exc, GenerationError):
                log.exception("the model failed unexpectedly")
            error = as_generation_error(exc)
            return [error for _ in batch]
        generated = self._clock()
        head = batch[0].request
        self._step_times.record(
            steps=head.steps, seconds=generated - began, width=head.width, height=head.height
        )
        results: list[Rendered | GenerationError] = []
        for prepared, output in zip(batch, outputs, strict=True):
            if isinstance(output, Image.Image):
                results.append(
                    Rendered(prepared=prepared, image=output, began=began, generated=generated)
                )
            else:
                results.append(output)
        images = sum(isinstance(result, Rendered) for result in results)
        if images:
            self._telemetry.images_generated(
                count=images, steps=head.steps, seconds=generated - began
            )
        return results

    def finish(self, rendered: Rendered) -> Completion:
        """I/O after the model: sign, mark, encode, store (the first stored image of the
        generation wins); the completion to tell."""
        prepared = rendered.prepared
        request = prepared.request
        image = rendered.image
        if request.signature is not None:
            image = self._watermarker.stamp(image, request.signature, prepared.inputs.signature)
        stamped = self._clock()
        metadata = self._metadata(request, prepared.inputs.lora)
        marked = self._provenance.mark(image, provenance_facts(metadata, request))
        png = marked.png
        encoded = self._clock()
        metadata["provenance"] = dict(marked.provenance)
        metadata["durations"] = {
            "fetch_seconds": round(prepared.fetched - prepared.started, 3),
            "queued_seconds": round(rendered.began - prepared.fetched, 3),
            "generation_seconds": round(rendered.generated - rendered.began, 3),
            "provenance_seconds": round(encoded - stamped, 3),
            "encode_seconds": round(encoded - rendered.generated, 3),
        }
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
        if not stored.created:
            log.info(
                "generation %s: an image was stored first; reporting it", request.generation_id
            )
            return _completion_of(stored, reused=True)
        after = self._clock()
        metadata["durations"]["upload_seconds"] = round(after - before, 3)
        metadata["durations"]["total_seconds"] = round(after - prepared.started, 3)
        return Completion(result_url=stored.url, metadata=metadata)

    def _progress_reporter(
        self, request: GenerationRequest, pulse: Callable[[], None]
    ) -> StepCallback:
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
            pulse()
            self._send_progress(request.generation_id, tracker.step(step))

        return on_step

    def _fetch_signature(self, spec: SignatureSpec | None) -> Image.Image | None:
        if spec is None or spec.image_ref is None:
            return None
        return self._watermarker.decode_signature(self._storage.fetch_signature(spec.image_ref))

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


def _completion_of(stored: StoredOutput, *, reused: bool) -> Completion:
    """The completion of a stored image, with the metadata stored beside it."""
    try:
        metadata = json.loads(stored.metadata.get(METADATA_KEY, "{}"))
    except (ValueError, RecursionError):  # object metadata is not ours alone: any text may be there
        log.warning("output %s: stored metadata unreadable", stored.key)
    else:
        if isinstance(metadata, dict):
            return Completion(result_url=stored.url, metadata=metadata, reused=reused)
    return Completion(result_url=stored.url, metadata={}, reused=reused)


def provenance_facts(metadata: Mapping[str, Any], request: GenerationRequest) -> ProvenanceFacts:
    """What the marks state, read from the completion metadata: the file and the backend are
    told the same seed, model and checksum."""
    return ProvenanceFacts(
        generation_id=request.generation_id,
        task_id=request.task_id or "",
        style_id=request.style_id,
        artist=request.artist_name,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or "",
        steps=metadata["steps"],
        guidance_scale=metadata["guidance_scale"],
        seed=metadata["seed"],
        width=metadata["width"],
        height=metadata["height"],
        scheduler=metadata["scheduler"],
        model=metadata["model"],
        lora_checksum=metadata["lora_checksum"],
        lora_scale=metadata["lora_scale"],
    )


def _signature_metadata(spec: SignatureSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {
        "kind": "image" if spec.image_ref else "text",
        "position": spec.config.position,
        "size": spec.config.size,
        "opacity": spec.config.opacity,
    }
