"""ImageModel on diffusers' StableDiffusionPipeline (SD 1.5 in production, a tiny model in tests).

CUDA when present (fp16, SDPA), fp32 on the CPU. Seeds drive CPU generators, one per image, so
the same seed gives the same initial noise on every device and in any batch. LoRAs stay loaded
between jobs in a ``LoraAdapterCache``; a batch may mix LoRAs, each sample routed through its
own adapter (``per_sample_adapters``). A CUDA out-of-memory error splits the batch in halves
down to single images before an image fails with GPU_OOM.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import utils as hub_utils
from PIL import Image
from transformers.utils import logging as transformers_logging

from adapters.lora_adapters import (
    AdapterCacheStats,
    BASE_ADAPTER,
    DEFAULT_CAPACITY,
    DEFAULT_HOTSWAP_MAX_RANK,
    LoraAdapterCache,
    LoraCheck,
    adapters_of,
    forget_frames,
    is_cuda_oom,
    per_sample_adapters,
    release_memory,
)
from adapters.lora_files import DEFAULT_MAX_BYTES as DEFAULT_LORA_MAX_BYTES
from adapters.lora_files import DEFAULT_MAX_RANK as DEFAULT_LORA_MAX_RANK
from adapters.lora_files import LoraValidator
from domain.errors import GenerationError, GpuOutOfMemory, ModelError
from domain.request import BatchKey, GenerationRequest, batch_key
from ports.image_model import BatchItem, StepCallback
from ports.storage import LoraArtifact

if TYPE_CHECKING:
    # Imported where used: importing the pipeline logs already (transformers' notices), and
    # ``route_library_logs`` must run first.
    from diffusers import StableDiffusionPipeline

    from adapters.gpu_tuning import GpuTuning

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 4

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "LIBRARY_LOGGERS",
    "DiffusersImageModel",
    "is_cuda_oom",
    "plan_batches",
    "release_memory",
    "resolve_device",
    "resolve_dtype",
    "route_library_logs",
]

LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub")
"""The libraries that give their root logger a stderr handler of their own."""


def route_library_logs() -> None:
    """Send diffusers', transformers' and huggingface_hub's log records through the root
    logger (the worker's JSON formatter and secret redaction), and turn their progress bars off.

    On first use those libraries give their root logger a stderr handler of their own, and
    diffusers and transformers stop propagation: their warnings would reach stderr as plain
    text. tqdm bars on stderr are not log lines either. Idempotent; call it before they log
    (before importing a pipeline, which logs already). peft logs through plain ``logging``
    loggers and ``warnings``, which the worker's logging setup captures.
    """
    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        if type(handler) is logging.StreamHandler:  # pylint: disable=unidiomatic-typecheck
            hub.removeHandler(handler)  # its own; a subclass (a FileHandler) is someone else's
    hub.propagate = True
    hub_utils.disable_progress_bars()


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA and fp32 elsewhere (fp16 on a CPU is slow and lossy)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def load_pipeline(
    *, model_id: str, device: str, dtype: str, cache_dir: str | None, local_files_only: bool
) -> StableDiffusionPipeline:
    """The pipeline with DPM-Solver++ (2M) and SDPA, on its device; MODEL_ERROR if it cannot.

    The libraries' logs are routed first (``route_library_logs``), so that what they say while
    importing and loading the pipeline goes through the worker's logging.
    """
    route_library_logs()
    # pylint: disable-next=import-outside-toplevel
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if device == "auto" and target.type == "cpu":
        log.warning("no CUDA device visible: generating on the CPU in float32 (slow)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            model_id,
            dtype=torch_dtype,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except Exception as exc:
        raise ModelError(f"cannot load MODEL_ID={model_id!r}: {exc}") from exc
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if target.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipe.to(target)
    log.info("model %s loaded on %s as %s", model_id, target, torch_dtype)
    return pipe


def _tune(pipe: StableDiffusionPipeline, tuning: GpuTuning) -> None:
    """Apply the GPU speed-ups (imported here: the tuning module imports the pipeline)."""
    from adapters.gpu_tuning import apply_tuning  # pylint: disable=import-outside-toplevel

    applied = apply_tuning(pipe, tuning)
    log.info("GPU tuning applied: %s", ", ".join(applied) or "nothing")


class _Progress:
    """One item's step callback: monotonic across OOM retries, and never fatal to the batch."""

    def __init__(self, on_step: StepCallback, generation_id: int) -> None:
        self._on_step = on_step
        self._generation_id = generation_id
        self._reported = 0
        self._failed = False

    def __call__(self, step: int, total: int) -> None:
        if step <= self._reported:  # a retry after an OOM replays steps already reported
            return
        self._reported = step
        try:
            self._on_step(step, total)
        except Exception:  # pylint: disable=broad-exception-caught
            if not self._failed:  # progress never fails an image, nor the others of its batch
                self._failed = True
                log.exception("progress callback of generation %s failed", self._generation_id)


@dataclass(frozen=True)
class _Job:
    """An item of a batch as the model runs it."""

    request: GenerationRequest
    lora: LoraArtifact | None
    progress: _Progress


@dataclass
class _Plan:
    """Items planned into one pipeline call."""

    key: BatchKey
    indices: list[int] = field(default_factory=list)
    loras: dict[str, float] = field(default_factory=dict)  # checksum -> scale
    has_base: bool = False


def plan_batches(
    items: Sequence[BatchItem], *, max_size: int, max_loras: int, mixed: bool
) -> list[list[int]]:
    """Group item indices into pipeline calls, first fit, keeping each call's items in order.

    A call holds at most ``max_size`` items sharing one ``batch_key``. With ``mixed`` it holds
    up to ``max_loras`` distinct LoRAs and base-model items together, a LoRA at one scale only
    (an adapter has one scale); without, one LoRA at one scale, or only base-model items.
    """
    plans: list[_Plan] = []
    for index, item in enumerate(items):
        key = batch_key(item.request)
        lora = item.lora
        scale = item.request.lora_scale
        for plan in plans:
            if plan.key != key or len(plan.indices) >= max_size:
                continue
            if lora is None:
                fits = mixed or not plan.loras
            elif lora.checksum in plan.loras:
                fits = plan.loras[lora.checksum] == scale
            elif mixed:
                fits = len(plan.loras) < max_loras
            else:
                fits = not plan.loras and not plan.has_base
            if fits:
                break
        else:
            plan = _Plan(key=key)
            plans.append(plan)
        plan.indices.append(index)
        if lora is None:
            plan.has_base = True
        else:
            plan.loras[lora.checksum] = scale
    return [plan.indices for plan in plans]


class DiffusersImageModel:
    """Implements ``ImageModel``; one pipeline call at a time (the pipeline is stateful)."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        model_id: str,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        adapter_cache_size: int = DEFAULT_CAPACITY,
        mixed_lora_batches: bool = True,
        lora_hotswap: bool = False,
        hotswap_max_rank: int = DEFAULT_HOTSWAP_MAX_RANK,
        lora_validator: LoraCheck | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1; got {max_batch_size}")
        self._pipe = pipeline
        self._pipe.set_progress_bar_config(disable=True)  # tqdm lines are not log lines
        self._model_id = model_id
        self._lock = threading.Lock()
        self._max_batch_size = max_batch_size
        self._adapters = LoraAdapterCache(
            pipeline,
            capacity=adapter_cache_size,
            validator=lora_validator,
            hotswap=lora_hotswap,
            hotswap_max_rank=hotswap_max_rank,
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
        adapter_cache_size: int = DEFAULT_CAPACITY,
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
            _tune(pipe, tuning)
        # torch.compile is lazy: the hot-swap slot created here is in the first compiled graph.
        return cls(
            pipe,
            model_id=model_id,
            max_batch_size=max_batch_size,
            adapter_cache_size=adapter_cache_size,
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
        """The most items one pipeline call runs together."""
        return self._max_batch_size

    @property
    def adapter_cache(self) -> LoraAdapterCache:
        """The LoRAs kept loaded between jobs (its ``stats`` may be read from any thread)."""
        return self._adapters

    def lora_cache_stats(self) -> AdapterCacheStats:
        """The counters of the LoRAs kept loaded (safe from any thread)."""
        return self._adapters.stats

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
        """One image, or the error that ended that item alone, per item and in order.

        Items are grouped by ``batch_key`` and run ``max_batch_size`` at a time; each item's
        image equals its single run within float tolerance. MODEL_ERROR is raised only when the
        model is closed.
        """
        jobs = [
            _Job(
                request=item.request,
                lora=item.lora,
                progress=_Progress(item.on_step, item.request.generation_id),
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
                max_loras=self._adapters.max_active,
                mixed=self._mixed,
            )
            for indices in plans:
                outcomes = self._run_splitting([jobs[index] for index in indices])
                results.update(zip(indices, outcomes))
        return [results[index] for index in range(len(jobs))]

    def _run_splitting(self, jobs: list[_Job]) -> list[Image.Image | GenerationError]:
        """Run ``jobs``; on a CUDA OOM, retry them in halves, down to single images."""
        outcome = self._attempt(jobs)
        if outcome is not None:
            return outcome
        if len(jobs) == 1:
            request = jobs[0].request
            return [
                GpuOutOfMemory(
                    f"GPU out of memory at {request.width}x{request.height},"
                    f" {request.steps} steps, even alone"
                )
            ]
        half = (len(jobs) + 1) // 2
        log.warning("GPU out of memory on a batch of %d: retrying it in halves", len(jobs))
        return self._run_splitting(jobs[:half]) + self._run_splitting(jobs[half:])

    def _attempt(self, jobs: list[_Job]) -> list[Image.Image | GenerationError] | None:
        """The outcome per job, or None after a CUDA OOM (memory released by then)."""
        try:
            return self._run(jobs)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            if not is_cuda_oom(exc):
                log.exception("generation of a batch of %d failed", len(jobs))
                forget_frames(exc)
                message = f"generation failed: {type(exc).__name__}: {exc}"
                return [ModelError(message) for _ in jobs]
            # Nothing may keep the failed call's tensors: the traceback's frames hold them.
            forget_frames(exc)
        release_memory()
        return None

    def _run(self, jobs: list[_Job]) -> list[Image.Image | GenerationError]:
        """Activate the jobs' adapters and run one pipeline call; LoRA failures stay per job."""
        outcome: dict[str, str | GenerationError] = self._adapters.activate_mixed(
            [(job.lora, job.request.lora_scale) for job in jobs if job.lora is not None]
        )
        results: list[Image.Image | GenerationError | None] = [None] * len(jobs)
        live: list[int] = []
        names: list[str] = []
        for index, job in enumerate(jobs):
            adapter = outcome[job.lora.checksum] if job.lora is not None else BASE_ADAPTER
            if isinstance(adapter, GenerationError):
                results[index] = adapter
            else:
                live.append(index)
                names.append(adapter)
        if live:
            images = self._call_routed([jobs[index] for index in live], names)
            if len(images) != len(live):
                raise RuntimeError(f"the pipeline gave {len(images)} images for {len(live)}")
            for index, image in zip(live, images):
                results[index] = image
        return [result for result in results if result is not None]

    def _call_routed(self, jobs: list[_Job], names: list[str]) -> list[Image.Image]:
        """One pipeline call with sample i through adapter ``names[i]``."""
        distinct = set(names)
        if distinct == {BASE_ADAPTER}:
            self._adapters.deactivate()
            return self._denoise(jobs)
        if len(distinct) == 1:  # one LoRA for all: the active adapter, plain forward
            return self._denoise(jobs)
        pipe = self._pipe
        guided = jobs[0].request.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        # With guidance the pipeline runs the UNet on [unconditional..., conditional...].
        routes: list[tuple[torch.nn.Module, Sequence[str]]] = [
            (pipe.unet, names * 2 if guided else names)
        ]
        if distinct & set(adapters_of(pipe.text_encoder)):
            routes.append((pipe.text_encoder, names))
        with per_sample_adapters(routes):
            return self._denoise(jobs)

    def _denoise(self, jobs: list[_Job]) -> list[Image.Image]:
        """The pipeline call for jobs sharing a batch key, with the adapters already set."""
        first = jobs[0].request
        total = first.steps

        def step_end(
            _pipe: Any, step_index: int, _timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            for job in jobs:
                job.progress(step_index + 1, total)
            return callback_kwargs

        generators = [torch.Generator("cpu").manual_seed(job.request.seed) for job in jobs]
        try:
            with torch.inference_mode():
                output = self._pipe(
                    prompt=[job.request.prompt for job in jobs],
                    negative_prompt=[job.request.negative_prompt or "" for job in jobs],
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
            self._adapters.close()
        release_memory()
