"""The base model's layers a LoRA may adapt: each Linear and Conv2d layer's shape, by path.

torch is imported only inside ``layer_shapes``: importing the validator needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_LORA_MODULE_PARTS = frozenset(
    {
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_dropout",
        "lora_magnitude_vector",
    }
)
"""Sub-modules peft adds inside a wrapped layer; they are not layers of the base model."""
_WRAPPER_PARTS = frozenset({"base_layer", "_orig_mod"})
"""Path parts added by peft (``base_layer``) and ``torch.compile`` (``_orig_mod``)."""


@dataclass(frozen=True)
class LayerShape:
    """The shape a LoRA must fit: a Linear (``kernel`` None) or a Conv2d layer."""

    in_features: int
    out_features: int
    kernel: tuple[int, int] | None = None

    def down_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of lora_down / lora_A for this layer at ``rank``."""
        if self.kernel is None:
            return (rank, self.in_features)
        return (rank, self.in_features, *self.kernel)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of lora_up / lora_B for this layer at ``rank``."""
        if self.kernel is None:
            return (self.out_features, rank)
        return (self.out_features, rank, 1, 1)


def layer_shapes(model: torch.nn.Module) -> dict[str, LayerShape]:
    """The Linear and Conv2d layers of ``model`` by module path.

    Paths are those of the plain model: layers wrapped by peft (``<path>.base_layer``) or by
    ``torch.compile`` (``_orig_mod.<path>``) keep their original path, and the LoRA layers peft
    added are left out, so the index is the same before and after LoRAs are loaded.
    """
    from torch import nn  # pylint: disable=import-outside-toplevel

    shapes: dict[str, LayerShape] = {}
    for name, module in model.named_modules():
        parts = name.split(".") if name else []
        if any(part in _LORA_MODULE_PARTS for part in parts):
            continue
        path = ".".join(part for part in parts if part not in _WRAPPER_PARTS)
        if isinstance(module, nn.Linear):
            shapes[path] = LayerShape(module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            kernel = module.kernel_size
            shapes[path] = LayerShape(
                module.in_channels, module.out_channels, (int(kernel[0]), int(kernel[1]))
            )
    return shapes


def kohya_names(shapes: Mapping[str, LayerShape]) -> dict[str, str | None]:
    """``path.replace('.', '_')`` -> path; None where two paths collide (ambiguous)."""
    names: dict[str, str | None] = {}
    for path in shapes:
        flat = path.replace(".", "_")
        names[flat] = None if flat in names else path
    return names
