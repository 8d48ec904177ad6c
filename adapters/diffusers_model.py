"""ImageModel on diffusers' StableDiffusionPipeline (SD 1.5 in production, a tiny model in tests).

CUDA when present (fp16, SDPA), fp32 on the CPU. Seeds drive a CPU generator so the same seed
gives the same initial noise on every device. LoRAs are read as safetensors only: a single file
in the diffusers or kohya key layout, or a PEFT folder (``adapter_config.json`` +
``adapter_model.safetensors``), which ``load_lora_weights`` would silently ignore and is
therefore injected through peft directly.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, set_peft_model_state_dict
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

from domain.errors import GenerationError, GpuOutOfMemory, LoraInvalid, ModelError
from domain.request import GenerationRequest
from ports.image_model import StepCallback
from ports.storage import LoraArtifact

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})
PEFT_PREFIX = "base_model.model."


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


class DiffusersImageModel:
    """Implements ``ImageModel``; one generation at a time (the pipeline is stateful)."""

    def __init__(self, pipeline: StableDiffusionPipeline, *, model_id: str) -> None:
        self._pipe = pipeline
        self._model_id = model_id
        self._lock = threading.Lock()
        self._loaded = 0

    @classmethod
    def load(
        cls,
        *,
        model_id: str,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str | None = None,
        local_files_only: bool = False,
    ) -> DiffusersImageModel:
        """Load the pipeline from a hub id or a local diffusers folder; MODEL_ERROR if it cannot."""
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        if device == "auto" and target.type == "cpu":
            log.warning("no CUDA device visible: generating on the CPU in float32 (slow)")
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
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
        pipe.set_progress_bar_config(disable=True)
        log.info("model %s loaded on %s as %s", model_id, target, torch_dtype)
        return cls(pipe, model_id=model_id)

    @property
    def name(self) -> str:
        """The base model's id or folder."""
        return self._model_id

    @property
    def pipeline(self) -> StableDiffusionPipeline:
        """The underlying pipeline (for benchmarks and tuning)."""
        return self._pipe

    def generate(
        self,
        request: GenerationRequest,
        lora: LoraArtifact | None,
        on_step: StepCallback,
    ) -> Image.Image:
        """Generate one image; LORA_INVALID, GPU_OOM or MODEL_ERROR on failure."""
        with self._lock:
            if self._pipe is None:
                raise ModelError("the model has been closed")
            adapter = self._load_lora(lora, request.lora_scale) if lora else None
            try:
                return self._run(request, on_step)
            finally:
                if adapter is not None:
                    self._discard(adapter)

    def _run(self, request: GenerationRequest, on_step: StepCallback) -> Image.Image:
        total = request.steps

        def step_end(
            _pipe: Any, step_index: int, _timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            on_step(step_index + 1, total)
            return callback_kwargs

        generator = torch.Generator("cpu").manual_seed(request.seed)
        try:
            with torch.inference_mode():
                output = self._pipe(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    width=request.width,
                    height=request.height,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    generator=generator,
                    callback_on_step_end=step_end,
                    output_type="pil",
                )
        except torch.cuda.OutOfMemoryError as exc:
            release_memory()
            raise GpuOutOfMemory(f"GPU out of memory at {request.width}x{request.height}") from exc
        except GenerationError:
            raise
        except Exception as exc:
            if is_cuda_oom(exc):
                release_memory()
                raise GpuOutOfMemory(f"GPU out of memory: {exc}") from exc
            raise ModelError(f"generation failed: {type(exc).__name__}: {exc}") from exc
        return output.images[0]

    def _load_lora(self, lora: LoraArtifact, scale: float) -> str:
        """Load a LoRA as a fresh adapter and activate it at ``scale``; its adapter name."""
        self._loaded += 1
        name = f"lora_{self._loaded}"
        path = Path(lora.path)
        try:
            if path.is_dir():
                self._load_peft_folder(path, name)
            else:
                self._load_single_file(path, name)
            if name not in self._pipe.get_list_adapters().get("unet", []):
                raise LoraInvalid(f"LoRA {lora.ref!r} has no weights for this model's UNet")
            self._pipe.set_adapters([name], adapter_weights=[scale])
        except GenerationError:
            self._discard(name)
            raise
        except Exception as exc:
            self._discard(name)
            if is_cuda_oom(exc):
                release_memory()
                raise GpuOutOfMemory(f"GPU out of memory loading LoRA {lora.ref!r}") from exc
            raise LoraInvalid(f"LoRA {lora.ref!r} cannot be loaded: {exc}") from exc
        return name

    def _discard(self, name: str) -> None:
        """Remove an adapter; a failure here must not mask the job's own result."""
        try:
            if name in {a for names in self._pipe.get_list_adapters().values() for a in names}:
                self._pipe.delete_adapters(name)
        except Exception:  # pylint: disable=broad-exception-caught
            log.exception("adapter %s could not be removed", name)

    def _load_single_file(self, path: Path, name: str) -> None:
        check_safetensors(path)
        # By path, not as a tensor dict: the diffusers layout keeps lora_alpha in the file's
        # metadata, which a dict would drop (alpha would silently become the rank).
        self._pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)

    def _load_peft_folder(self, path: Path, name: str) -> None:
        config_path = path / "adapter_config.json"
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LoraInvalid(f"{config_path.name} is not readable JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
            raise LoraInvalid(f"{config_path.name} does not describe a PEFT LoRA")
        # Every LoRA field of the file counts (use_rslora, alpha_pattern, rank_pattern...);
        # dropout is a training-time setting and initialisation is overwritten by the weights.
        known = {field.name for field in dataclasses.fields(LoraConfig)}
        fields = {k: v for k, v in raw.items() if k in known}
        config = LoraConfig(**{**fields, "lora_dropout": 0.0, "init_lora_weights": False})
        state = {
            key.removeprefix(PEFT_PREFIX).removeprefix("unet."): value
            for key, value in read_safetensors(path / "adapter_model.safetensors").items()
        }
        self._pipe.unet.add_adapter(config, adapter_name=name)
        result = set_peft_model_state_dict(self._pipe.unet, state, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise LoraInvalid(
                f"PEFT adapter has {len(unexpected)} tensors for layers this model lacks,"
                f" e.g. {unexpected[0]!r}"
            )
        # Layers the config targets but the file leaves out would keep uninitialised weights.
        missing = [
            key
            for key in getattr(result, "missing_keys", None) or []
            if ".lora_" in key and f".{name}." in key
        ]
        if missing:
            raise LoraInvalid(
                f"PEFT adapter lacks {len(missing)} tensors its config targets,"
                f" e.g. {missing[0]!r}"
            )

    def close(self) -> None:
        """Drop the pipeline (after any generation in flight) and give its memory back."""
        with self._lock:
            self._pipe = None  # type: ignore[assignment]
        release_memory()


def check_safetensors(path: Path) -> None:
    """Refuse anything but a readable safetensors file, without ever unpickling it."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LoraInvalid(
            f"{path.name}: pickle formats (.bin/.ckpt/.pt/.pth) are refused; use .safetensors"
        )
    if suffix != ".safetensors":
        raise LoraInvalid(f"{path.name}: only .safetensors LoRA files are accepted")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if not list(handle.keys()):
                raise LoraInvalid(f"{path.name} holds no tensors")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraInvalid(f"{path.name} is not a valid safetensors file: {exc}") from exc


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checked safetensors file."""
    check_safetensors(path)
    return load_file(str(path))


def is_cuda_oom(exc: BaseException) -> bool:
    """CUDA allocation failures that do not arrive as ``torch.cuda.OutOfMemoryError``."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def release_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
