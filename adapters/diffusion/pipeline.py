"""Pipeline loading: device, dtype, scheduler and attention, the libraries' logs routed first.

diffusers', transformers' and huggingface_hub's log records go through the worker's logging.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import utils as hub_utils
from transformers.utils import logging as transformers_logging

from domain.errors import ModelError

if TYPE_CHECKING:
    # Imported where used: importing the pipeline logs already (transformers' notices), and
    # ``route_library_logs`` must run first.
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

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
