"""What peft put into a model: its LoRA layers, and the names of the LoRAs it holds."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer


def lora_layers(model: torch.nn.Module | None) -> list[BaseTunerLayer]:
    """The peft LoRA layers inside ``model`` (none for None)."""
    if model is None:
        return []
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def lora_names_of(model: torch.nn.Module | None) -> list[str]:
    """Names of the LoRAs ``model`` holds (its ``peft_config``; none for None)."""
    return list(getattr(model, "peft_config", None) or {})
