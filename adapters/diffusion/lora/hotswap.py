"""The hot-swap slot: pipeline LoRAs for a compiled UNet, copied one at a time into a fixed slot.

A compiled UNet recompiles whenever layers are added or removed, so the slot is created once,
primed with zero weights before the first compilation (``enable_lora_hotswap``), and each LoRA is
copied into it in place (diffusers' ``hotswap=True``); its scale is written into the slot's
scaling tensors. Parsed LoRAs stay in a host-memory LRU, so a warm switch reads and parses no
file. A LoRA the slot cannot take (a higher rank, other layers) grows the slot: a recompile, a
few times in a process at most.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.utils.peft_utils import delete_adapter_layers
from peft.tuners.tuners_utils import BaseTunerLayer

from adapters.diffusion.cuda_memory import is_cuda_oom
from adapters.diffusion.lora.load_failures import loading, reading
from adapters.diffusion.lora.parsing import ParsedLora, parse_lora_file, parse_peft_as_diffusers
from adapters.diffusion.lora.peft_layers import lora_layers, lora_names_of
from adapters.diffusion.lora.pipeline_loras import DEFAULT_CAPACITY, LoraCheck, PipelineLoras
from domain.errors import GenerationError, LoraInvalid
from ports.storage import LoraArtifact

if TYPE_CHECKING:  # importing the pipeline logs: see ``adapters.diffusion.pipeline``
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

DEFAULT_HOTSWAP_MAX_RANK = 32
"""Rank the hot-swap slot is padded to: LoRAs up to it swap without recompiling. A higher rank
costs compute on every step (the slot always runs at this rank)."""
DEFAULT_HOTSWAP_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Layers the hot-swap slot covers: the attention projections the platform's trainer adapts."""
HOTSWAP_SLOT = "hotswap_slot"
"""The slot's LoRA name in the pipeline."""


class HotswapSlot(PipelineLoras):
    """One LoRA at a time in a fixed slot of ``pipeline``; up to ``capacity`` parsed LoRAs kept
    in host memory, least recently used dropped first."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        capacity: int = DEFAULT_CAPACITY,
        validator: LoraCheck | None = None,
        max_rank: int = DEFAULT_HOTSWAP_MAX_RANK,
        targets: Sequence[str] = DEFAULT_HOTSWAP_TARGETS,
    ) -> None:
        super().__init__(pipeline, capacity=capacity, validator=validator)
        if max_rank < 1:
            raise ValueError(f"hotswap_max_rank must be at least 1; got {max_rank}")
        # checksum -> parsed LoRA in host memory, least recently used first.
        self._parsed: OrderedDict[str, ParsedLora] = OrderedDict()
        self._in_slot: str | None = None
        self._slot_rank = max_rank
        self._slot_shapes: dict[str, torch.Size] = {}
        self._unit_scaling: list[tuple[BaseTunerLayer, float]] = []
        self._slot_scale: float | None = None
        suffixes = tuple("." + target for target in targets)
        self._slot_paths = {
            path
            for path, module in self._unet_layers().items()
            if path.endswith(suffixes) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        }
        if not self._slot_paths:
            raise ValueError(f"no UNet layer matches the hot-swap targets {targets}")
        self._prime_slot()

    @property
    def max_active(self) -> int:
        """One slot: one LoRA per batch."""
        return 1

    @property
    def names(self) -> list[str]:
        """The slot."""
        return [HOTSWAP_SLOT]

    def _entries(self) -> int:
        return len(self._parsed)

    def activate(self, lora: LoraArtifact, scale: float) -> str:
        self._into_slot(lora)
        self._set_slot_scale(scale)
        return HOTSWAP_SLOT

    def _activate_all(
        self, loras: dict[str, LoraArtifact], scales: dict[str, float]
    ) -> dict[str, str | GenerationError]:
        checksum, lora = next(iter(loras.items()))
        try:
            return {checksum: self.activate(lora, scales[checksum])}
        except GenerationError as error:
            self.deactivate()
            return {checksum: error}

    def deactivate(self) -> None:
        """Run the base model: the slot at scale 0 (no recompile)."""
        if HOTSWAP_SLOT not in lora_names_of(self._pipe.unet):
            # A failed load whose undo ran out of memory too left no slot: rebuild it.
            self._prime_slot()
        self._set_slot_scale(0.0)

    def clear(self) -> None:
        """Empty the slot and forget the parsed LoRAs."""
        with self._stats_lock:
            self._parsed.clear()
        self._zero_slot()

    def close(self) -> None:
        with self._stats_lock:
            self._parsed.clear()
        self._unit_scaling = []
        super().close()

    def _prime_slot(self) -> None:
        """(Re)create the slot: zero LoRA weights at the slot rank on every slot layer."""
        layers = self._unet_layers()
        rank = self._slot_rank
        primer: dict[str, torch.Tensor] = {}
        for path in sorted(self._slot_paths):
            base = layers[path]
            if isinstance(base, torch.nn.Conv2d):
                down = base.weight.new_zeros(rank, base.in_channels, *base.kernel_size)
                up = base.weight.new_zeros(base.out_channels, rank, 1, 1)
            else:
                down = base.weight.new_zeros(rank, base.in_features)
                up = base.weight.new_zeros(base.out_features, rank)
            primer[f"unet.{path}.lora_A.weight"] = down
            primer[f"unet.{path}.lora_B.weight"] = up
        self._remove(HOTSWAP_SLOT)
        # Pads later LoRAs to the slot rank and turns scalings into tensors, so that neither a
        # new rank nor a new scale changes what a compiled graph depends on.
        self._pipe.enable_lora_hotswap(target_rank=rank, check_compiled="ignore")
        self._inject(ParsedLora(primer, None, None, rank=rank), HOTSWAP_SLOT, text_encoder=False)
        self._after_slot_change()
        self._in_slot = None
        self._set_slot_scale(0.0)

    def _unet_layers(self) -> dict[str, torch.nn.Module]:
        """The UNet's modules by plain path (no ``_orig_mod.``), peft wrappers unwrapped."""
        return {
            path.removeprefix("_orig_mod."): (
                module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            )
            for path, module in self._pipe.unet.named_modules()
        }

    def _into_slot(self, lora: LoraArtifact) -> None:
        """Put ``lora`` in the slot: nothing to do if there, a copy if parsed, else a read."""
        checksum = lora.checksum
        if checksum == self._in_slot:
            with self._stats_lock:
                self._hits += 1
                if checksum in self._parsed:
                    self._parsed.move_to_end(checksum)
            return
        parsed = self._parsed.get(checksum)
        with self._stats_lock:
            if parsed is None:
                self._misses += 1
            else:
                self._hits += 1
                self._parsed.move_to_end(checksum)
        if parsed is None:
            parsed = self._read(lora)
        self._swap_in(lora, parsed)
        if checksum not in self._parsed:
            with self._stats_lock:
                self._parsed[checksum] = parsed
                while len(self._parsed) > self._capacity:
                    self._parsed.popitem(last=False)
                    self._evictions += 1

    def _read(self, lora: LoraArtifact) -> ParsedLora:
        """Validate and parse ``lora`` into host memory (the one file read of a miss)."""
        path = Path(lora.path)
        with reading(lora):
            layout = self._validate(path)
            if path.is_dir():
                parsed = parse_peft_as_diffusers(path)
            else:
                parsed = parse_lora_file(self._pipe, path)
        return dataclasses.replace(parsed, rank=layout.max_rank)

    def _swap_in(self, lora: LoraArtifact, parsed: ParsedLora) -> None:
        """Copy ``parsed`` into the slot; grow the slot first when it cannot take it."""
        self._in_slot = None
        with loading(lora, undo=self._zero_slot):
            fits = parsed.rank <= self._slot_rank and parsed.uniform
            if fits:
                try:
                    self._hotswap_unet(parsed)
                    fits = self._slot_shapes == self._current_slot_shapes()
                except (ValueError, RuntimeError) as exc:
                    if is_cuda_oom(exc):
                        raise
                    log.info("LoRA %s does not fit the hot-swap slot: %s", lora.ref, exc)
                    fits = False
            if not fits:
                self._grow_slot(lora, parsed)
            self._swap_text_encoder(parsed)
        self._after_slot_change()
        self._in_slot = lora.checksum

    def _hotswap_unet(self, parsed: ParsedLora) -> None:
        self._load_into_unet(parsed, HOTSWAP_SLOT, hotswap=True)

    def _grow_slot(self, lora: LoraArtifact, parsed: ParsedLora) -> None:
        """Re-create the slot over its layers and this LoRA's, at a rank that fits it, then swap
        the LoRA in. The slot only grows, so this happens a few times in a process at most; a
        compiled UNet recompiles each time."""
        self._remove(HOTSWAP_SLOT)
        try:  # loaded once on its own: diffusers resolves every layout to the layers it adapts
            self._inject(parsed, HOTSWAP_SLOT, text_encoder=False)
            adapted = {
                path.removeprefix("_orig_mod."): int(module.r[HOTSWAP_SLOT])
                for path, module in self._pipe.unet.named_modules()
                if isinstance(module, BaseTunerLayer) and HOTSWAP_SLOT in module.r
            }
        finally:
            self._remove(HOTSWAP_SLOT)
        if not adapted:
            raise LoraInvalid(f"LoRA {lora.ref!r} has no weights for this model's UNet")
        self._slot_paths |= adapted.keys()
        self._slot_rank = max(self._slot_rank, *adapted.values())
        log.warning(
            "hot-swap slot re-created for LoRA %s: %d layers at rank %d (a compiled UNet"
            " recompiles once)",
            lora.ref,
            len(self._slot_paths),
            self._slot_rank,
        )
        self._prime_slot()
        try:
            self._hotswap_unet(parsed)
        except (ValueError, RuntimeError) as exc:
            if is_cuda_oom(exc):
                raise
            # A config the slot's cannot match (use_rslora, per-layer alphas): the LoRA itself
            # becomes the slot, padded to its rank; the next plain LoRA grows it back.
            log.warning("LoRA %s becomes the hot-swap slot itself: %s", lora.ref, exc)
            self._remove(HOTSWAP_SLOT)
            self._pipe.enable_lora_hotswap(target_rank=self._slot_rank, check_compiled="ignore")
            self._inject(parsed, HOTSWAP_SLOT, text_encoder=False)

    def _swap_text_encoder(self, parsed: ParsedLora) -> None:
        """The text encoder is not compiled: its part of the LoRA is reloaded, not hot-swapped."""
        text_encoder = self._pipe.text_encoder
        if HOTSWAP_SLOT in lora_names_of(text_encoder):
            delete_adapter_layers(text_encoder, HOTSWAP_SLOT)
        if parsed.has_text_encoder:
            self._load_into_text_encoder(parsed, HOTSWAP_SLOT)

    def _zero_slot(self) -> None:
        """Leave the slot holding nothing: zero weights at scale 0 (its layers stay)."""
        self._in_slot = None
        text_encoder = self._pipe.text_encoder
        if HOTSWAP_SLOT in lora_names_of(text_encoder):
            delete_adapter_layers(text_encoder, HOTSWAP_SLOT)
        if HOTSWAP_SLOT not in lora_names_of(self._pipe.unet):
            self._prime_slot()
            return
        with torch.no_grad():
            for layer in lora_layers(self._pipe.unet):
                for factors in (layer.lora_A, layer.lora_B):
                    if HOTSWAP_SLOT in factors:
                        factors[HOTSWAP_SLOT].weight.zero_()
        self._after_slot_change()
        self._set_slot_scale(0.0)

    def _after_slot_change(self) -> None:
        """Record the slot's shapes and each layer's scaling at scale 1 (alpha / rank)."""
        self._slot_shapes = self._current_slot_shapes()
        self._unit_scaling = [
            (layer, float(layer.scaling[HOTSWAP_SLOT]))
            for layer in lora_layers(self._pipe.unet)
            if HOTSWAP_SLOT in layer.scaling
        ]
        self._slot_scale = None

    def _current_slot_shapes(self) -> dict[str, torch.Size]:
        marker = f".{HOTSWAP_SLOT}."
        return {
            name: param.shape
            for name, param in self._pipe.unet.named_parameters()
            if marker in name
        }

    def _set_slot_scale(self, scale: float) -> None:
        """Scale the slot in place: scalings are tensors, so a compiled UNet does not recompile."""
        if scale == self._slot_scale:
            return
        with torch.no_grad():
            for layer, unit in self._unit_scaling:
                current = layer.scaling[HOTSWAP_SLOT]
                if isinstance(current, torch.Tensor):
                    current.fill_(unit * scale)
                else:
                    layer.scaling[HOTSWAP_SLOT] = unit * scale
        text_encoder = self._pipe.text_encoder
        if HOTSWAP_SLOT in lora_names_of(text_encoder):
            set_adapters_for_text_encoder([HOTSWAP_SLOT], text_encoder, [scale])
        self._slot_scale = scale
