"""A tiny random-weight Stable Diffusion 1.5 look-alike and LoRAs for it, built fully offline.

Used by the tests and the demo in place of the real 4 GB checkpoint: the folder has the same layout
(model_index.json, unet, vae, text_encoder, tokenizer, scheduler) and loads with
``StableDiffusionPipeline.from_pretrained`` without any network access.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from adapters.diffusion.pipeline import route_library_logs

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

TINY_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections (of every attn1 and attn2 in the UNet) that the tiny LoRAs target."""

LoraFormat = Literal["diffusers", "kohya", "peft"]

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_MAX_TOKENS = 77
_TEXT_HIDDEN = 32

# Cross-attention only in the lowest-resolution (16x16 latent) block, the mid block and the first
# up block: self-attention over 64x64 or 32x32 latents is what made earlier prototypes slow.
_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 8,
    "cross_attention_dim": _TEXT_HIDDEN,
}

# Four blocks => three downsamples => vae_scale_factor 8, as in SD 1.5.
_VAE_CONFIG = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "scaling_factor": 0.18215,
}

# SD 1.5's noise schedule, with the DPM-Solver++ (2M) sampler the worker uses.
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _clip_vocab() -> dict[str, int]:
    """CLIP's byte-level BPE base vocabulary (no merges): bytes, bytes + "</w>", two specials."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = [*byte_chars, *(char + "</w>" for char in byte_chars), _BOS, _EOS]
    return {token: index for index, token in enumerate(tokens)}


def _write_tokenizer_files(folder: Path) -> CLIPTokenizer:
    """Write vocab.json and merges.txt into ``folder`` and load them as a CLIPTokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(_clip_vocab(), ensure_ascii=False), encoding="utf-8"
    )
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=_MAX_TOKENS)


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer, 32-wide CLIP text encoder over the tokenizer's vocabulary."""
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": _TEXT_HIDDEN,
        "intermediate_size": 4 * _TEXT_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": _MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()


def _save_pipeline(folder: Path, seed: int) -> None:
    """Build every component with weights drawn from ``seed``; save the pipeline in ``folder``."""
    tokenizer = _write_tokenizer_files(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_UNET_CONFIG)
        vae = AutoencoderKL(**_VAE_CONFIG)
        text_encoder = _text_encoder(tokenizer)
    pipe = assemble_pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def _pipeline_class() -> type[StableDiffusionPipeline]:
    """The pipeline class, imported once the libraries' logs are routed (importing it logs)."""
    route_library_logs()
    from diffusers import StableDiffusionPipeline  # pylint: disable=import-outside-toplevel

    return StableDiffusionPipeline


def assemble_pipeline(
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
) -> StableDiffusionPipeline:
    """A pipeline from its parts, with the worker's sampler and no safety checker."""
    return _pipeline_class()(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_model(dest: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a tiny seeded StableDiffusionPipeline folder at ``dest``; a no-op if already built.

    The libraries' logs go through the root logger (``route_library_logs``) from here on.
    """
    route_library_logs()
    return write_model_folder(dest, lambda folder: _save_pipeline(folder, seed))


def write_model_folder(dest: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have ``write`` fill a diffusers model folder at ``dest``; a no-op if one is there.

    It is written in a temporary folder beside ``dest`` and renamed, so never seen half-written.
    """
    dest = Path(dest)
    if (dest / "model_index.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        write(staging)
        try:
            os.replace(staging, dest)
        except OSError as err:
            # Either another process won the race, or dest is a non-empty folder of something else.
            if not (dest / "model_index.json").is_file():
                raise FileExistsError(f"{dest} exists and is not a model folder") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _unet_config(model_dir: str | os.PathLike) -> dict:
    """The UNet config of the local model at ``model_dir`` (never looked up on the Hub)."""
    if not Path(model_dir, "unet", "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder: no unet/config.json")
    return UNet2DConditionModel.load_config(model_dir, subfolder="unet", local_files_only=True)


def _lora_factors(
    model_dir: str | os.PathLike, *, seed: int, rank: int, strength: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded (lora_A, lora_B) for every targeted Linear of the UNet, keyed by module path."""
    config = _unet_config(model_dir)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return random_lora_factors(
        unet, seed=seed, rank=rank, strength=strength, targets=TINY_TARGET_MODULES
    )


def random_lora_factors(
    unet: torch.nn.Module, *, seed: int, rank: int, strength: float, targets: tuple[str, ...]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded non-zero (lora_A, lora_B) for every Linear of ``unet`` named ``*.<target>``.

    lora_A ~ N(0, 1/in_features), lora_B ~ N(0, strength^2/rank): the update B @ A changes each
    layer by about ``strength``, like a trained style (peft's zero lora_B would prove nothing).
    """
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    suffixes = tuple("." + target for target in targets)
    for path, module in unet.named_modules():
        if path.endswith(suffixes) and isinstance(module, torch.nn.Linear):
            down = torch.randn(rank, module.in_features, generator=generator)
            down /= module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=generator)
            up *= strength / rank**0.5
            factors[path] = (down, up)
    return factors


def _save_diffusers(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: LoraConfig, dest: Path
) -> None:
    """Diffusers' own writer: ``unet.<path>.lora_A.weight`` keys, the LoraConfig as metadata."""
    layers = {}
    for path, (down, up) in factors.items():
        layers[f"{path}.lora_A.weight"] = down
        layers[f"{path}.lora_B.weight"] = up
    metadata = {
        key: sorted(value) if isinstance(value, set) else value
        for key, value in config.to_dict().items()
    }
    _pipeline_class().save_lora_weights(
        dest.parent,
        unet_lora_layers=layers,
        weight_name=dest.name,
        safe_serialization=True,
        unet_lora_adapter_metadata=metadata,
    )


def _save_kohya(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: LoraConfig, dest: Path
) -> None:
    """``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    tensors = {}
    for path, (down, up) in factors.items():
        name = "lora_unet_" + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(float(config.lora_alpha)),
    }
    save_file(tensors, dest, metadata=metadata)


def _save_peft(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: LoraConfig,
    model_dir: str | os.PathLike,
    dest: Path,
) -> None:
    """Peft's own writer (``PeftModel.save_pretrained``): adapter_config.json + safetensors."""
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel.from_config(_unet_config(model_dir))
        peft_model = get_peft_model(unet, config)
    peft_model.peft_config["default"].base_model_name_or_path = os.fspath(model_dir)
    with torch.no_grad():
        for path, (down, up) in factors.items():
            layer = peft_model.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(down)
            layer.lora_B["default"].weight.copy_(up)
    peft_model.save_pretrained(
        os.fspath(dest), safe_serialization=True, save_embedding_layers=False
    )


def build_tiny_lora(
    model_dir: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    fmt: LoraFormat,
    seed: int = 1,
    rank: int = 4,
    alpha: float | None = None,
    strength: float = 2.0,
) -> Path:
    """Write a seeded LoRA for the tiny UNet's attention: one .safetensors file, or a peft folder.

    alpha defaults to rank; strength scales lora_B. Same seed and rank: same numbers in every fmt.
    The libraries' logs go through the root logger (``route_library_logs``) from here on.
    """
    route_library_logs()
    if fmt not in ("diffusers", "kohya", "peft"):
        raise ValueError(f"unknown LoRA format {fmt!r}; expected 'diffusers', 'kohya' or 'peft'")
    dest = Path(dest)
    factors = _lora_factors(model_dir, seed=seed, rank=rank, strength=strength)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=list(TINY_TARGET_MODULES),
    )
    if fmt == "peft":
        _save_peft(factors, config, model_dir, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(handle)
    staging = Path(name)
    try:
        if fmt == "diffusers":
            _save_diffusers(factors, config, staging)
        else:
            _save_kohya(factors, config, staging)
        os.replace(staging, dest)
    finally:
        staging.unlink(missing_ok=True)
    return dest
