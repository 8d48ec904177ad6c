"""LoRA parsing: a LoRA read into host memory in the form diffusers' loaders take.

A single file (diffusers or kohya layout) goes through diffusers, a PEFT folder through peft's
config and safetensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig

from adapters.diffusion.lora.files import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from adapters.diffusion.lora.safetensors_header import read_safetensors
from domain.errors import LoraInvalid

if TYPE_CHECKING:  # importing the pipeline logs: see ``adapters.diffusion.pipeline``
    from diffusers import StableDiffusionPipeline


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA read into host memory in the form diffusers' loaders take (keys ``unet.``...)."""

    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None
    rank: int = 0
    """Its largest layer rank (from the validator's layout)."""

    @property
    def uniform(self) -> bool:
        """One rank and one alpha for every layer.

        peft's hot-swap copies weights but neither ``alpha_pattern`` nor ``rank_pattern``, so
        only such a LoRA may be swapped into the slot in place; another becomes the slot.
        """
        if self.network_alphas and len(set(self.network_alphas.values())) > 1:
            return False
        for key, value in (self.metadata or {}).items():
            if key.endswith(("alpha_pattern", "rank_pattern")) and value:
                return False
        ranks = {
            tensor.shape[0]
            for key, tensor in self.state_dict.items()
            if key.endswith(("lora_A.weight", "lora.down.weight", "lora_down.weight"))
        }
        return len(ranks) <= 1

    @property
    def has_text_encoder(self) -> bool:
        """Whether it adapts the text encoder too."""
        return any(key.startswith("text_encoder.") for key in self.state_dict)

    def metadata_for(self, component: str) -> dict[str, Any] | None:
        """The LoRA's metadata (diffusers' ``lora_adapter_metadata``) if it describes
        ``component``, else None.

        Diffusers would build an empty LoraConfig from metadata that only describes the other
        component; None makes it derive the config from the tensors instead.
        """
        prefix = component + "."
        if self.metadata is None or not any(key.startswith(prefix) for key in self.metadata):
            return None
        return self.metadata


def parse_lora_file(pipeline: StableDiffusionPipeline, path: Path) -> ParsedLora:
    """Read a single-file LoRA (diffusers or kohya layout) as diffusers' loaders take it.

    Read by path, not as a tensor dict, so the diffusers layout keeps ``lora_alpha`` from the
    file's metadata. ``use_safetensors=True`` forbids diffusers' pickle fallback.
    """
    state, alphas, metadata = pipeline.lora_state_dict(
        str(path.parent),
        weight_name=path.name,
        use_safetensors=True,
        local_files_only=True,
        return_lora_metadata=True,
    )
    if not state:
        raise LoraInvalid(f"{path.name} holds no tensors")
    odd = next((key for key in state if "lora" not in key), None)
    if odd is not None:
        raise LoraInvalid(f"{path.name} is not a LoRA: it holds {odd!r}")
    return ParsedLora(dict(state), alphas or None, inference_metadata(metadata))


def inference_metadata(metadata: object) -> dict[str, Any] | None:
    """Diffusers' LoRA metadata (``lora_adapter_metadata``) with dropout off.

    Dropout is a training setting, and peft creates its dropout modules in training mode: a
    LoRA saved with ``lora_dropout`` > 0 would otherwise drop activations at random while
    generating. (It also makes hot-swap configs compatible, which compare dropout.)
    """
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise LoraInvalid("the LoRA's adapter metadata is not a JSON object")
    return {
        key: 0.0 if key.rsplit(".", 1)[-1] == "lora_dropout" else value
        for key, value in metadata.items()
    }


def parse_peft_folder(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT folder's LoRA config (every LoRA field of the file, dropout off) and UNet tensors."""
    config_path = path / PEFT_CONFIG
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoraInvalid(f"{config_path.name} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise LoraInvalid(f"{config_path.name} does not describe a PEFT LoRA")
    # Every LoRA field counts (use_rslora, alpha_pattern, rank_pattern...); initialisation is
    # overwritten by the weights.
    known = {field.name for field in dataclasses.fields(LoraConfig)}
    fields = {k: v for k, v in raw.items() if k in known}
    config = LoraConfig(**{**fields, "lora_dropout": 0.0, "init_lora_weights": False})
    state = {
        key.removeprefix(PEFT_PREFIX).removeprefix("unet."): value
        for key, value in read_safetensors(path / PEFT_WEIGHTS).items()
    }
    return config, state


def parse_peft_as_diffusers(path: Path) -> ParsedLora:
    """A PEFT folder in diffusers' loader form: ``unet.`` keys, its config as LoRA metadata."""
    config, state = parse_peft_folder(path)
    fields = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(LoraConfig)
        if field.init and field.name not in ("peft_type", "task_type", "base_model_name_or_path")
    }
    return ParsedLora(
        {f"unet.{key}": value for key, value in state.items()},
        None,
        {f"unet.{key}": value for key, value in fields.items()},
    )
