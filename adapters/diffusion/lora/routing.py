"""Per-sample routing: each sample of a batch through its own LoRA (a batch may mix LoRAs).

Hooks on the LoRA layers add each LoRA's delta to its samples only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from adapters.diffusion.lora.peft_layers import lora_layers

NO_LORA = "__base__"
"""peft's name for 'no LoRA' (the base model) in the ``adapter_names`` of a mixed batch."""


@contextmanager
def per_sample_loras(
    routes: Sequence[tuple[torch.nn.Module, Sequence[str]]],
) -> Iterator[None]:
    """Send sample i of every LoRA layer call in a model through its own LoRA, while inside.

    ``routes`` pairs a model with one LoRA name per sample of the batches it sees (``NO_LORA``
    for none). Hooks on every LoRA layer of the model do it; they are removed on exit, whatever
    happens.

    peft's own mixed-batch forward (``adapter_names``) indexes the batch with Python lists: on
    CUDA each such index is a host-to-device copy that waits for the GPU, three per LoRA per
    layer per UNet call, which would stall a mixed batch at every LoRA layer. Here the sample
    indices of each LoRA are put on the model's device once per call; a pre-hook has peft run
    the base layer only (every sample ``NO_LORA``), and a forward hook adds each LoRA's delta
    to its samples with ``index_select``/``index_add_``, which never wait for the GPU. The
    arithmetic is peft's (``lora_B(lora_A(dropout(x))) * scaling`` added to the base output),
    so the images are the same. Layers of another kind (embeddings, LoRA variants) keep peft's
    own routing.
    """
    handles = []
    try:
        for model, names in routes:
            names = list(names)
            groups = _sample_groups(model, names)
            base_only = [NO_LORA] * len(names)
            for layer in lora_layers(model):
                assert isinstance(layer, torch.nn.Module)
                if _routable(layer, groups):
                    handles.append(
                        layer.register_forward_pre_hook(
                            _adapter_names_hook(base_only), with_kwargs=True
                        )
                    )
                    handles.append(
                        layer.register_forward_hook(_add_deltas_hook(groups), with_kwargs=True)
                    )
                else:
                    handles.append(
                        layer.register_forward_pre_hook(
                            _adapter_names_hook(names), with_kwargs=True
                        )
                    )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sample_groups(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Each LoRA of ``names`` (but the base) and the indices of its samples, on the device."""
    device = next(model.parameters()).device
    return {
        lora_name: torch.tensor(
            [i for i, name in enumerate(names) if name == lora_name],
            dtype=torch.long,
            device=device,
        )
        for lora_name in dict.fromkeys(names)
        if lora_name != NO_LORA
    }


def _routable(layer: BaseTunerLayer, groups: Mapping[str, torch.Tensor]) -> bool:
    """Whether the hooks can route ``layer``: a plain LoRA Linear or Conv2d for every LoRA."""
    if not isinstance(layer, (LoraLinear, LoraConv2d)):
        return False
    variants = getattr(layer, "lora_variant", {})
    return not any(lora_name in variants for lora_name in groups)


def _adapter_names_hook(
    names: list[str],
) -> Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], tuple[Any, dict[str, Any]]]:
    def inject(
        _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        batch = args[0].shape[0] if args else None
        if batch != len(names):
            raise RuntimeError(
                f"per-sample LoRAs: a LoRA layer saw a batch of {batch} for {len(names)} names"
            )
        return args, {**kwargs, "adapter_names": names}

    return inject


def _add_deltas_hook(
    groups: Mapping[str, torch.Tensor],
) -> Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any], torch.Tensor], torch.Tensor]:
    def add_deltas(
        module: torch.nn.Module,
        args: tuple[Any, ...],
        _kwargs: dict[str, Any],
        output: torch.Tensor,
    ) -> torch.Tensor:
        if module.disable_adapters:  # peft's forward adds no LoRA then either
            return output
        x = args[0]
        for lora_name, index in groups.items():
            lora_a = module.lora_A[lora_name] if lora_name in module.lora_A else None
            if lora_a is None:  # this layer is not one the LoRA adapts
                continue
            sub_batch = x.index_select(0, index).to(lora_a.weight.dtype)
            delta = (
                module.lora_B[lora_name](lora_a(module.lora_dropout[lora_name](sub_batch)))
                * module.scaling[lora_name]
            )
            output.index_add_(0, index, delta.to(output.dtype))
        return output

    return add_deltas
