"""ImageModel on diffusers' StableDiffusionPipeline (SD 1.5 in production, a tiny model in tests).

CUDA when present (fp16, SDPA), fp32 on the CPU. Seeds drive CPU generators, one per image, so
the same seed gives the same initial noise on every device and in any batch. LoRAs stay loaded
between jobs as pipeline LoRAs (``PipelineLoras``); a batch may mix LoRAs, each sample routed
through its own LoRA (``per_sample_loras``). A CUDA out-of-memory error splits the batch in
halves down to single images before an image fails with GPU_OOM.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from adapters.diffusion.batching import (
    DEFAULT_MAX_BATCH_SIZE,
    Sample,
    SampleProgress,
    plan_batches,
)
from adapters.diffusion.cuda_memory import forget_frames, is_cuda_oom, release_memory
from adapters.diffusion.lora.files import DEFAULT_MAX_BYTES as DEFAULT_LORA_MAX_BYTES
from adapters.diffusion.lora.files import DEFAULT_MAX_RANK as DEFAULT_LORA_MAX_RANK
from adapters.diffusion.lora.hotswap import DEFAULT_HOTSWAP_MAX_RANK, HotswapSlot
from adapters.diffusion.lora.peft_layers import lora_names_of
from adapters.diffusion.lora.pipeline_loras import (
    DEFAULT_CAPACITY,
    LoraCheck,
    PipelineLoras,
    PipelineLoraStats,
)
from adapters.diffusion.lora.resident import ResidentLoras
from adapters.diffusion.lora.routing import NO_LORA, per_sample_loras
from adapters.diffusion.lora.validation import LoraValidator
from adapters.diffusion.pipeline import load_pipeline
from adapters.diffusion.tuning import GpuTuning, apply_tuning
from domain.errors import GenerationError, GpuOutOfMemory, ModelError
from domain.request import GenerationRequest
from ports.image_model import BatchItem, StepCallback
from ports.storage import LoraArtifact

if TYPE_CHECKING:
    # Imported where used: importing the pipeline logs already (transformers' notices), and
    # ``route_library_logs`` must run first.
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)


class DiffusersImageModel:
    """Implements ``ImageModel``; one pipeline call at a time (the pipeline is stateful)."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        model_id: str,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        lora_pipeline_cache_size: int = DEFAULT_CAPACITY,
        mixed_lora_batches: bool = True,
        lora_hotswap: bool = False,
        hotswap_max_rank: int = DEFAULT_HOTSWAP_MAX_RANK,
        lora_validator: LoraCheck | None = None,
    ) -> None:
        """``lora_hotswap`` chooses the pipeline LoRAs: a ``HotswapSlot`` (for a compiled UNet)
        rather than ``ResidentLoras``; ``lora_pipeline_cache_size`` is their capacity."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1; got {max_batch_size}")
        if hotswap_max_rank < 1:
            raise ValueError(f"hotswap_max_rank must be at least 1; got {hotswap_max_rank}")
        self._pipe = pipeline
        self._pipe.set_progress_bar_config(disable=True)  # tqdm lines are not log lines
        self._model_id = model_id
        self._lock = threading.Lock()
        self._max_batch_size = max_batch_size
        self._loras: PipelineLoras
        if lora_hotswap:
            self._loras = HotswapSlot(
                pipeline,
                capacity=lora_pipeline_cache_size,
                validator=lora_validator,
                max_rank=hotswap_max_rank,
            )
        else:
            self._loras = ResidentLoras(
                pipeline, capacity=lora_pipeline_cache_size, validator=lora_validator
            )
        # One fixed slot cannot hold two LoRAs at once: hot-swap batches one LoRA per call.
        self._mixed = mixed_lora_batches and not lora_hotswap

    @classmethod
    def load(
        cls,
        *,
        model_id: str,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str | None = None,
        local_files_only: bool = False,
        tuning: GpuTuning | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        lora_pipeline_cache_size: int = DEFAULT_CAPACITY,
        mixed_lora_batches: bool = True,
        hotswap_max_rank: int = DEFAULT_HOTSWAP_MAX_RANK,
        lora_max_bytes: int = DEFAULT_LORA_MAX_BYTES,
        lora_max_rank: int = DEFAULT_LORA_MAX_RANK,
    ) -> DiffusersImageModel:
        """Load the pipeline from a hub id or a local diffusers folder; MODEL_ERROR if it cannot.

        ``tuning`` applies the GPU speed-ups; with ``compile_unet`` LoRAs are hot-swapped into
        one slot, so that switching them never recompiles the UNet. Every LoRA is validated
        against this model's layers, ``lora_max_bytes`` and ``lora_max_rank`` before it loads.
        """
        pipe = load_pipeline(
            model_id=model_id,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        if tuning is not None:
            applied = apply_tuning(pipe, tuning)
            log.info("GPU tuning applied: %s", ", ".join(applied) or "nothing")
        # torch.compile is lazy: the hot-swap slot created here is in the first compiled graph.
        return cls(
            pipe,
            model_id=model_id,
            max_batch_size=max_batch_size,
            lora_pipeline_cache_size=lora_pipeline_cache_size,
            mixed_lora_batches=mixed_lora_batches,
            lora_hotswap=tuning is not None and tuning.compile_unet,
            hotswap_max_rank=hotswap_max_rank,
            lora_validator=LoraValidator(
                unet=pipe.unet,
                text_encoder=pipe.text_encoder,
                max_bytes=lora_max_bytes,
                max_rank=lora_max_rank,
            ).validate,
        )

    @property
    def name(self) -> str:
        """The base model's id or folder."""
        return self._model_id

    @property
    def pipeline(self) -> StableDiffusionPipeline:
        """The underlying pipeline (for benchmarks and tuning)."""
        return self._pipe

    @property
    def max_batch_size(self) -> int:
        """The most samples one pipeline call runs together."""
        return self._max_batch_size

    @property
    def pipeline_loras(self) -> PipelineLoras:
        """The LoRAs kept in the pipeline between jobs (``stats`` may be read from any thread)."""
        return self._loras

    def lora_cache_stats(self) -> PipelineLoraStats:
        """The counters of the pipeline LoRAs (safe from any thread)."""
        return self._loras.stats

    def generate(
        self,
        request: GenerationRequest,
        lora: LoraArtifact | None,
        on_step: StepCallback,
    ) -> Image.Image:
        """Generate one image; LORA_INVALID, GPU_OOM or MODEL_ERROR on failure."""
        (outcome,) = self.generate_batch([BatchItem(request=request, lora=lora, on_step=on_step)])
        if isinstance(outcome, GenerationError):
            raise outcome
        return outcome

    def generate_batch(self, items: Sequence[BatchItem]) -> list[Image.Image | GenerationError]:
        """One image, or the error that ended that sample alone, per item and in order.

        Samples are grouped by ``batch_key`` and run ``max_batch_size`` at a time; each sample's
        image equals its single run within float tolerance. MODEL_ERROR is raised only when the
        model is closed.
        """
        samples = [
            Sample(
                request=item.request,
                lora=item.lora,
                progress=SampleProgress(item.on_step, item.request.generation_id),
            )
            for item in items
        ]
        results: dict[int, Image.Image | GenerationError] = {}
        with self._lock:
            if self._pipe is None:
                raise ModelError("the model has been closed")
            plans = plan_batches(
                items,
                max_size=self._max_batch_size,
                max_loras=self._loras.max_active,
                mixed=self._mixed,
            )
            for indices in plans:
                outcomes = self._run_splitting([samples[index] for index in indices])
                results.update(zip(indices, outcomes))
        return [results[index] for index in range(len(samples))]

    def _run_splitting(self, samples: list[Sample]) -> list[Image.Image | GenerationError]:
        """Run ``samples``; on a CUDA OOM, retry them in halves, down to single images."""
        outcome = self._attempt(samples)
        if outcome is not None:
            return outcome
        if len(samples) == 1:
            request = samples[0].request
            return [
                GpuOutOfMemory(
                    f"GPU out of memory at {request.width}x{request.height},"
                    f" {request.steps} steps, even alone"
                )
            ]
        half = (len(samples) + 1) // 2
        log.warning("GPU out of memory on a batch of %d: retrying it in halves", len(samples))
        return self._run_splitting(samples[:half]) + self._run_splitting(samples[half:])

    def _attempt(self, samples: list[Sample]) -> list[Image.Image | GenerationError] | None:
        """The outcome per sample, or None after a CUDA OOM (memory released by then)."""
        try:
            return self._run(samples)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            if not is_cuda_oom(exc):
                log.exception("generation of a batch of %d failed", len(samples))
                forget_frames(exc)
                message = f"generation failed: {type(exc).__name__}: {exc}"
                return [ModelError(message) for _ in samples]
            # Nothing may keep the failed call's tensors: the traceback's frames hold them.
            forget_frames(exc)
        release_memory()
        return None

    def _run(self, samples: list[Sample]) -> list[Image.Image | GenerationError]:
        """Activate the samples' LoRAs and run one pipeline call; LoRA failures stay per sample."""
        outcome: dict[str, str | GenerationError] = self._loras.activate_mixed(
            [
                (sample.lora, sample.request.lora_scale)
                for sample in samples
                if sample.lora is not None
            ]
        )
        results: list[Image.Image | GenerationError | None] = [None] * len(samples)
        live: list[int] = []
        names: list[str] = []
        for index, sample in enumerate(samples):
            lora_name = outcome[sample.lora.checksum] if sample.lora is not None else NO_LORA
            if isinstance(lora_name, GenerationError):
                results[index] = lora_name
            else:
                live.append(index)
                names.append(lora_name)
        if live:
            images = self._call_routed([samples[index] for index in live], names)
            if len(images) != len(live):
                raise RuntimeError(f"the pipeline gave {len(images)} images for {len(live)}")
            for index, image in zip(live, images):
                results[index] = image
        return [result for result in results if result is not None]

    def _call_routed(self, samples: list[Sample], names: list[str]) -> list[Image.Image]:
        """One pipeline call with sample i through LoRA ``names[i]``."""
        distinct = set(names)
        if distinct == {NO_LORA}:
            self._loras.deactivate()
            return self._denoise(samples)
        if len(distinct) == 1:  # one LoRA for all: the active LoRA, plain forward
            return self._denoise(samples)
        pipe = self._pipe
        guided = (
            samples[0].request.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        )
        # With guidance the pipeline runs the UNet on [unconditional..., conditional...].
        routes: list[tuple[torch.nn.Module, Sequence[str]]] = [
            (pipe.unet, names * 2 if guided else names)
        ]
        if distinct & set(lora_names_of(pipe.text_encoder)):
            routes.append((pipe.text_encoder, names))
        with per_sample_loras(routes):
            return self._denoise(samples)

    def _denoise(self, samples: list[Sample]) -> list[Image.Image]:
        """The pipeline call for samples sharing a batch key, with their LoRAs already set."""
        first = samples[0].request
        total = first.steps

        def step_end(
            _pipe: Any, step_index: int, _timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            for sample in samples:
                sample.progress(step_index + 1, total)
            return callback_kwargs

        generators = [torch.Generator("cpu").manual_seed(s.request.seed) for s in samples]
        try:
            with torch.inference_mode():
                output = self._pipe(
                    prompt=[sample.request.prompt for sample in samples],
                    negative_prompt=[sample.request.negative_prompt or "" for sample in samples],
                    width=first.width,
                    height=first.height,
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance_scale,
                    generator=generators,
                    callback_on_step_end=step_end,
                    output_type="pil",
                )
        finally:
            self._forget_scheduler_state()
        return list(output.images)

    def _forget_scheduler_state(self) -> None:
        """Multistep schedulers keep the last model outputs (batch-sized tensors) between calls."""
        outputs = getattr(self._pipe.scheduler, "model_outputs", None)
        if isinstance(outputs, list):
            self._pipe.scheduler.model_outputs = [None] * len(outputs)

    def close(self) -> None:
        """Drop the pipeline (after any generation in flight) and give its memory back."""
        with self._lock:
            self._pipe = None  # type: ignore[assignment]
            self._loras.close()
        release_memory()
