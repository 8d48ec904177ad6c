"""GPU tuning of a loaded StableDiffusionPipeline (SDPA, channels_last, safe QKV fusion, compile).

What ``apply_tuning`` does, and what it deliberately does not:

- SDPA attention (``AttnProcessor2_0``) on the UNet: set at load already, re-asserted here.
- ``channels_last`` for the UNet and the VAE: their convolutions then run NHWC on cuDNN.
- Fused QKV projections on the VAE only. diffusers' ``fuse_qkv_projections`` adds a fused
  ``to_qkv`` (self-attention) or ``to_kv`` (cross-attention) Linear beside the original
  projections and installs ``FusedAttnProcessor2_0``, which reads only the fused layers. Pipeline
  LoRAs are injected by peft into ``to_q``/``to_k``/``to_v``/``to_out.0``, which still exist, so
  ``load_lora_weights`` on a fused UNet succeeds without a word while every self-attention q/k/v
  and every cross-attention k/v delta is bypassed: only ``to_out.0`` and the cross-attention
  ``to_q`` would still carry the artist's LoRA. The VAE is never a LoRA target (SD 1.5 LoRAs load
  into ``unet`` and ``text_encoder`` only), so fusing it is safe; the UNet is never fused.
- Optional ``torch.compile`` of the UNet (``Module.compile``: in place, so the pipeline, peft and
  the LoRA loaders still see a ``UNet2DConditionModel``). Compilation is lazy: it happens at the
  first forward (``warm_up``), so anything added to the UNet between ``apply_tuning`` and that
  call is part of the first graph. A compiled UNet must never change structure afterwards:
  each sample's LoRA is copied into one fixed slot in place (diffusers' LoRA hot-swap), and
  their scale is written into the slot's scaling tensors, never through ``set_adapters`` (which
  swaps a tensor for a float and recompiles; a test proves it).

Order (``DiffusersImageModel.load``): build the pipeline -> ``pipe.to(device, dtype)`` ->
``apply_tuning`` -> with ``compile_unet``, create the LoRA hot-swap slot
(``HotswapSlot``: ``enable_lora_hotswap(target_rank=...)`` and a zero LoRA at that rank, before
any other LoRA and before the first forward) -> ``warm_up``. Nothing here imports the model:
``warm_up`` takes any ``ImageModel``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from domain.errors import GenerationError, ModelError
from domain.request import GenerationRequest
from ports.image_model import BatchItem, ImageModel

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class GpuTuning:
    """Which speed-ups ``apply_tuning`` applies to a loaded pipeline.

    ``compile_mode`` is inductor's. ``default`` compiles fastest and leaves GEMMs and
    convolutions to cuBLAS and cuDNN. The ``max-autotune`` modes benchmark candidate kernels
    for every shape, commonly minutes per shape for a UNet on a cold cache, at start and again
    at each recompile while jobs wait. The CUDA-graph modes (``reduce-overhead``,
    ``max-autotune``) are untried with the hot-swap slot here (diffusers' hot-swap PR #9453
    reported "data pointer changed" errors under ``reduce-overhead``). Measure a mode with
    ``bench.gpu --compile-mode`` before choosing it.

    ``compile_fullgraph`` makes a graph break an error instead of a silent slowdown (the UNet
    with peft LoRA layers traces as one graph: the tests compile with it on). It is off in
    production because under it dynamo's recompile limit is a hard error too: after
    ``torch._dynamo.config.recompile_limit`` graphs of the UNet (shapes, slot re-creations)
    every job needing another graph would fail until a restart, where without it that shape
    runs uncompiled. ``compile_backend`` is ``inductor`` in production; tests use
    ``eager``/``aot_eager`` to check guards without code generation.
    """

    channels_last: bool = True
    fuse_qkv: bool = True
    compile_unet: bool = False
    compile_mode: str = "default"
    compile_fullgraph: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}; got {self.compile_mode!r}"
            )


def apply_tuning(pipe: StableDiffusionPipeline, tuning: GpuTuning) -> list[str]:
    """Apply ``tuning`` to ``pipe`` in place, after ``pipe.to(device)``; what was applied.

    With ``compile_unet`` this must run before any LoRA is loaded (MODEL_ERROR otherwise);
    the UNet is compiled lazily, at its first forward (``warm_up``). Idempotent.
    """
    applied: list[str] = []
    unet, vae = pipe.unet, pipe.vae
    on_cuda = unet.device.type == "cuda"
    if on_cuda:
        # Convolution algorithms are benchmarked once per shape (during warm_up) and reused.
        torch.backends.cudnn.benchmark = True
        applied.append("cudnn.benchmark")
    if not all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values()):
        unet.set_attn_processor(AttnProcessor2_0())
    applied.append("sdpa attention (unet)")
    if tuning.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        applied.append("channels_last (unet, vae)")
    if tuning.fuse_qkv:
        # Never the UNet: its fused layers would bypass the pipeline LoRAs (module docstring).
        pipe.fuse_qkv_projections(unet=False, vae=True)
        applied.append("fused qkv (vae; unet left unfused for its LoRAs)")
    if tuning.compile_unet:
        _compile_unet(unet, tuning, applied)
    log.info("gpu tuning applied: %s", ", ".join(applied))
    return applied


def _compile_unet(unet: torch.nn.Module, tuning: GpuTuning, applied: list[str]) -> None:
    """``Module.compile`` the UNet in place (lazy); record it in ``applied``."""
    if is_compiled(unet):
        applied.append("torch.compile(unet): already compiled")
        return
    if getattr(unet, "peft_config", None):
        raise ModelError(
            "compile the UNet before any LoRA is loaded (then hot-swap LoRAs into one slot);"
            f" LoRAs present: {sorted(unet.peft_config)}"
        )
    options: dict[str, object] = {"fullgraph": tuning.compile_fullgraph}
    if tuning.compile_backend == "inductor":
        options["mode"] = tuning.compile_mode
    unet.compile(backend=tuning.compile_backend, **options)
    applied.append(
        f"torch.compile(unet, backend={tuning.compile_backend}, "
        f"mode={options.get('mode', 'n/a')}, fullgraph={tuning.compile_fullgraph})"
    )


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` was compiled in place (``Module.compile``) or wrapped by torch.compile."""
    return hasattr(module, "_orig_mod") or bool(getattr(module, "_compiled_call_impl", None))


def warm_up(model: ImageModel, *, shapes: Sequence[tuple[int, int]], steps: int) -> float:
    """Base-model generations that compile the UNet and autotune cuDNN before the first job.

    At the first (width, height) of ``shapes``: one single image, then (when the model
    batches) one full batch; the second batch size makes dynamo mark the batch dimension
    dynamic, so later batch sizes do not recompile either. Then one image at each further
    shape: a height and a width that changed turn dynamic too, so a job at any of the shapes
    (and at most others) neither compiles nor autotunes while it runs. The guidance scale is
    the production default (7.5), so classifier-free guidance doubles the UNet batch as it
    will in real jobs. A failure at the first shape is raised (the model cannot serve); one
    at a further shape is logged and that shape skipped. Returns the seconds it took.
    """
    if not shapes:
        raise ValueError("warm_up needs at least one (width, height)")
    start = time.perf_counter()
    (width, height), *others = shapes
    model.generate(_warm_up_request(0, width, height, steps), None, _ignore_step)
    batch = model.max_batch_size
    if batch > 1:
        items = [
            BatchItem(
                request=_warm_up_request(i, width, height, steps), lora=None, on_step=_ignore_step
            )
            for i in range(batch)
        ]
        for result in model.generate_batch(items):
            if isinstance(result, GenerationError):
                raise result
    for other_width, other_height in others:
        try:
            model.generate(
                _warm_up_request(0, other_width, other_height, steps), None, _ignore_step
            )
        except GenerationError as error:  # e.g. 1024x1024 out of memory on a small card
            log.warning(
                "warm-up at %dx%d failed, skipped (a job at that size compiles when it runs,"
                " or fails as this did): %s",
                other_width,
                other_height,
                error,
            )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    log.info(
        "warm-up at %s, %d steps, batch 1 and %d at the first: %.1f s",
        ", ".join(f"{w}x{h}" for w, h in shapes),
        steps,
        batch,
        seconds,
    )
    return seconds


def _warm_up_request(seed: int, width: int, height: int, steps: int) -> GenerationRequest:
    return GenerationRequest(
        generation_id=0,
        prompt="warm-up",
        width=width,
        height=height,
        steps=steps,
        guidance_scale=7.5,
        seed=seed,
    )


def _ignore_step(_done: int, _total: int) -> None:
    """Warm-up progress goes nowhere."""


__all__ = ["COMPILE_MODES", "GpuTuning", "apply_tuning", "is_compiled", "warm_up"]
