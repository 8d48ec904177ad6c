"""The real Stable Diffusion 1.5 architecture with random weights, and LoRAs for it, offline.

The benchmarks need SD 1.5's true layer shapes and sizes (an 860M-parameter UNet, 128 attention
projections that a LoRA targets) without its 4 GB checkpoint, which no machine here can download.
The configs below are those of ``stable-diffusion-v1-5``'s ``unet/``, ``vae/`` and
``text_encoder/`` folders, written out in code; weights are drawn from a seed. LoRAs are written
the way the backend's trainer writes them: a PEFT ``save_pretrained`` folder, rank 8, targeting
``to_q``/``to_k``/``to_v``/``to_out.0``. Importing this module builds nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, get_peft_model
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from adapters.diffusion.tiny_model import (
    assemble_pipeline,
    random_lora_factors,
    write_model_folder,
)

TRAINER_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
"""The layers the backend's trainer puts a LoRA on (every attn1 and attn2 of the UNet)."""

TRAINER_RANK = 8
"""The LoRA rank the backend's trainer uses (alpha equals the rank)."""

SD15_UNET_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }
)
"""``stable-diffusion-v1-5/unet/config.json`` (diffusers' defaults fill in the rest)."""

SD15_UNET_PARAMETERS = 859_520_964
"""Parameter count of the SD 1.5 UNet; a check that the config above is the real one."""

SD15_TEXT_ENCODER_PARAMETERS = 123_060_480
"""Parameter count of SD 1.5's CLIP ViT-L/14 text encoder."""

SD15_VAE_PARAMETERS = 83_653_863
"""Parameter count of SD 1.5's VAE."""

SD15_LORA_LAYERS = 128
"""Linear layers a to_q/to_k/to_v/to_out.0 LoRA targets in the SD 1.5 UNet (16 transformer
blocks x 2 attentions x 4 projections)."""

SMOKE_UNET_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        **SD15_UNET_CONFIG,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
    }
)
"""SD 1.5's kind of UNet in miniature (cross-attention above a plain lowest level, 32 LoRA
layers instead of 128), so that the benchmark's code runs end to end in seconds."""

SD15_VAE_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
    }
)
"""``stable-diffusion-v1-5/vae/config.json``."""

SD15_TEXT_ENCODER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    }
)
"""``stable-diffusion-v1-5/text_encoder/config.json`` (CLIP ViT-L/14's text tower)."""


_MAX_TOKENS = 77
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"

TextAndVae = Literal["full", "small"]


def sd15_unet(
    seed: int = 0, *, config: Mapping[str, Any] = SD15_UNET_CONFIG
) -> UNet2DConditionModel:
    """The SD 1.5 UNet (or ``config``'s) in fp32 on the CPU, weights drawn from ``seed``.

    About 11 s and 3.4 GB for the real size on one CPU thread; the global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
    return unet.eval()


def _ascii_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over printable ASCII (one token per character), written to ``folder``.

    The pipeline pads every prompt to 77 tokens, so the text encoder's work does not depend on
    the vocabulary: a real-size encoder behind this tokenizer costs what SD 1.5's costs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    tokens = [*chars, *(char + "</w>" for char in chars), _BOS, _EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(
        folder, model_max_length=_MAX_TOKENS, unk_token=_EOS, pad_token=_EOS
    )


def _text_encoder(
    tokenizer: CLIPTokenizer, hidden_size: int, text_and_vae: TextAndVae
) -> CLIPTextModel:
    """SD 1.5's CLIP text tower (``full``), or a one-layer encoder of the same width."""
    config = dict(SD15_TEXT_ENCODER_CONFIG, hidden_size=hidden_size, projection_dim=hidden_size)
    if text_and_vae == "small":
        config.update(num_hidden_layers=1, intermediate_size=hidden_size, vocab_size=len(tokenizer))
    config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if config["hidden_size"] % config["num_attention_heads"]:
        config["num_attention_heads"] = 4
    return CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()


def _vae(text_and_vae: TextAndVae) -> AutoencoderKL:
    """SD 1.5's VAE (``full``), or one with the same 8x downscale at toy width."""
    config = dict(SD15_VAE_CONFIG)
    if text_and_vae == "small":
        config.update(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    return AutoencoderKL(**config).eval()


def sd15_pipeline(
    seed: int = 0,
    *,
    text_and_vae: TextAndVae = "full",
    unet_config: Mapping[str, Any] = SD15_UNET_CONFIG,
    tokenizer_dir: str | os.PathLike | None = None,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with SD 1.5's architecture and seeded random weights, fp32, CPU.

    ``text_and_vae="full"`` gives SD 1.5's VAE and text encoder too (for timing whole
    generations); ``"small"`` keeps the real UNet but a one-layer text encoder and a toy VAE, for
    benchmarks that only exercise the UNet's LoRA path. The tokenizer is a printable-ASCII CLIP
    tokenizer (prompts are padded to 77 tokens either way); its files go to ``tokenizer_dir``, or
    to a temporary folder removed once loaded.
    """
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _ascii_tokenizer(Path(tokenizer_dir or scratch))
        unet = sd15_unet(seed, config=unet_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            text_encoder = _text_encoder(tokenizer, unet.config.cross_attention_dim, text_and_vae)
            vae = _vae(text_and_vae)
    pipe = assemble_pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sd15_model(
    dest: str | os.PathLike,
    *,
    seed: int = 0,
    text_and_vae: TextAndVae = "full",
    unet_config: Mapping[str, Any] = SD15_UNET_CONFIG,
) -> Path:
    """Write an SD 1.5-architecture diffusers folder at ``dest`` (about 4 GB in fp32 when full).

    Loads with ``StableDiffusionPipeline.from_pretrained`` (and so with the worker's
    ``MODEL_ID``); a no-op if ``dest`` already holds a model. Assembled beside ``dest`` and
    renamed, so never seen half-written.
    """

    def write(staging: Path) -> None:
        pipe = sd15_pipeline(
            seed,
            text_and_vae=text_and_vae,
            unet_config=unet_config,
            tokenizer_dir=staging / "tokenizer-src",
        )
        pipe.save_pretrained(staging, safe_serialization=True)
        shutil.rmtree(staging / "tokenizer-src")

    return write_model_folder(dest, write)


def lora_factors(
    unet: UNet2DConditionModel, *, seed: int, rank: int = TRAINER_RANK, strength: float = 0.5
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded non-zero (lora_A, lora_B) for every trainer-targeted Linear of ``unet``, by path.

    lora_A ~ N(0, 1/in_features), lora_B ~ N(0, strength^2/rank): the update B @ A is a
    ``strength``-sized change of each layer, like a trained style LoRA rather than peft's
    zero-initialised lora_B (which would change nothing and so prove nothing).
    """
    factors = random_lora_factors(
        unet, seed=seed, rank=rank, strength=strength, targets=TRAINER_TARGET_MODULES
    )
    if not factors:
        raise ValueError("the UNet has no to_q/to_k/to_v/to_out.0 Linear layers")
    return factors


def trainer_lora_config(rank: int = TRAINER_RANK) -> LoraConfig:
    """The trainer's LoraConfig: rank ``rank``, alpha = rank, attention projections only."""
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TRAINER_TARGET_MODULES))


def write_peft_lora(
    unet: UNet2DConditionModel,
    folder: str | os.PathLike,
    seed: int,
    rank: int = TRAINER_RANK,
    *,
    strength: float = 0.5,
) -> Path:
    """Write a LoRA for ``unet`` as the backend's trainer does: peft's ``save_pretrained``.

    ``folder`` gets ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_A.weight``, metadata ``format=pt``) + peft's README.md.
    peft's own writer runs on a weightless (meta-device) copy of the UNet built from
    ``unet.config``, so ``unet`` is left untouched and no second 3.4 GB copy is made.
    """
    folder = Path(folder)
    with torch.device("meta"):
        skeleton = UNet2DConditionModel.from_config(unet.config)
    factors = lora_factors(skeleton, seed=seed, rank=rank, strength=strength)
    peft_model = get_peft_model(skeleton, trainer_lora_config(rank))
    for path, (down, up) in factors.items():
        layer = peft_model.base_model.model.get_submodule(path)
        layer.lora_A["default"].weight = torch.nn.Parameter(down, requires_grad=False)
        layer.lora_B["default"].weight = torch.nn.Parameter(up, requires_grad=False)
    peft_model.save_pretrained(
        os.fspath(folder), safe_serialization=True, save_embedding_layers=False
    )
    return folder


def write_diffusers_lora(
    unet: UNet2DConditionModel,
    file: str | os.PathLike,
    seed: int,
    rank: int = TRAINER_RANK,
    *,
    strength: float = 0.5,
) -> Path:
    """The same LoRA as ``write_peft_lora`` (same seed, same numbers) as one diffusers file.

    Diffusers' own writer (``save_lora_weights``): ``unet.<module>.lora_A.weight`` keys, the
    LoraConfig (alpha included) in the safetensors metadata; what ``load_lora_weights`` reads.
    """
    file = Path(file)
    with torch.device("meta"):
        skeleton = UNet2DConditionModel.from_config(unet.config)
    layers = {}
    for path, (down, up) in lora_factors(skeleton, seed=seed, rank=rank, strength=strength).items():
        layers[f"{path}.lora_A.weight"] = down
        layers[f"{path}.lora_B.weight"] = up
    metadata = {
        key: sorted(value) if isinstance(value, set) else value
        for key, value in trainer_lora_config(rank).to_dict().items()
    }
    StableDiffusionPipeline.save_lora_weights(
        file.parent,
        unet_lora_layers=layers,
        weight_name=file.name,
        safe_serialization=True,
        unet_lora_adapter_metadata=metadata,
    )
    return file
