"""Per-sample LoRA routing (``per_sample_loras``) against peft's own mixed-batch forward.

A small peft model with LoRA Linear, Conv2d and Embedding layers and two LoRAs (one of
which leaves a layer alone): the hooks must give exactly what peft's ``adapter_names`` path
gives, while peft itself only ever sees base-only batches on the Linear and Conv2d layers (its
list indexing waits for the GPU at every layer on CUDA; the hooks index with device tensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from adapters.diffusion.lora.routing import NO_LORA, per_sample_loras


class Toy(torch.nn.Module):
    """Token embedding -> Linear -> Conv2d, like a text encoder feeding a UNet block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.proj = torch.nn.Linear(8, 16)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(self.embed(tokens))  # (batch, 4, 16)
        return self.conv(hidden.reshape(-1, 4, 4, 4))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.fixture()
def toy() -> Iterator[torch.nn.Module]:
    torch.manual_seed(0)
    model = Toy().eval()
    # "a" adapts every layer; "b" leaves the convolution alone and has another scale.
    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=["embed", "proj", "conv"]), model, "a"
    )
    model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=6, target_modules=["embed", "proj"]), model, "b"
    )
    _randomize(model, 1)
    yield model


def _peft_routed(model: torch.nn.Module, tokens: torch.Tensor, names: list[str]) -> torch.Tensor:
    """peft's own mixed batch: ``adapter_names`` passed to every LoRA layer."""

    def inject(
        _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        return args, {**kwargs, "adapter_names": names}

    handles = [
        module.register_forward_pre_hook(inject, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, LoraLayer)
    ]
    try:
        with torch.inference_mode():
            return model(tokens)
    finally:
        for handle in handles:
            handle.remove()


NAMES = ["a", NO_LORA, "b", "a", "b"]


def test_routing_equals_peft_mixed_batches_exactly(toy: torch.nn.Module) -> None:
    tokens = torch.randint(0, 10, (len(NAMES), 4), generator=torch.Generator().manual_seed(2))
    expected = _peft_routed(toy, tokens, NAMES)
    with per_sample_loras([(toy, NAMES)]), torch.inference_mode():
        routed = toy(tokens)
    assert torch.equal(routed, expected)
    # And each sample is what its LoRA gives alone (peft routing a single-sample batch).
    for i, name in enumerate(NAMES):
        alone = _peft_routed(toy, tokens[i : i + 1], [name])
        assert torch.allclose(routed[i : i + 1], alone, atol=1e-6)


def test_peft_sees_only_base_batches_on_linear_and_conv_layers(
    toy: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pylint: disable=protected-access
    seen: dict[str, list[str]] = {}
    original = LoraLayer._mixed_batch_forward
    originals = {
        type(m): type(m)._mixed_batch_forward for m in toy.modules() if isinstance(m, LoraLayer)
    }

    def spy(
        self: LoraLayer, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        seen[type(self).__name__] = list(adapter_names)
        return originals.get(type(self), original)(
            self, x, *args, adapter_names=adapter_names, **kwargs
        )

    for kind in originals:
        monkeypatch.setattr(kind, "_mixed_batch_forward", spy)
    tokens = torch.randint(0, 10, (len(NAMES), 4))
    with per_sample_loras([(toy, NAMES)]), torch.inference_mode():
        toy(tokens)
    assert seen["Linear"] == [NO_LORA] * len(NAMES)
    assert seen["Conv2d"] == [NO_LORA] * len(NAMES)
    assert seen["Embedding"] == NAMES  # another kind of layer keeps peft's own routing


def test_hooks_are_gone_after_the_block_even_on_error(toy: torch.nn.Module) -> None:
    tokens = torch.randint(0, 10, (3, 4))
    with pytest.raises(RuntimeError, match="saw a batch of 3 for 5 names"):
        with per_sample_loras([(toy, NAMES)]), torch.inference_mode():
            toy(tokens)
    for module in toy.modules():
        assert not module._forward_pre_hooks  # pylint: disable=protected-access
        assert not module._forward_hooks  # pylint: disable=protected-access


def test_disabled_adapters_stay_off_as_in_peft(toy: torch.nn.Module) -> None:
    tokens = torch.randint(0, 10, (len(NAMES), 4), generator=torch.Generator().manual_seed(3))
    for module in toy.modules():
        if isinstance(module, LoraLayer):
            module.enable_adapters(False)
    with torch.inference_mode():
        base = toy(tokens)
    with per_sample_loras([(toy, NAMES)]), torch.inference_mode():
        routed = toy(tokens)
    assert torch.equal(routed, base)
    assert torch.equal(routed, _peft_routed(toy, tokens, NAMES))
