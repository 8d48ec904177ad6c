"""Resident pipeline LoRAs: up to ``capacity`` LoRAs stay loaded in the pipeline, an LRU.

A job whose LoRA is loaded only switches: the active LoRA and its scale are set on each LoRA
layer (what ``set_adapters`` does, without its walk over every module). The least recently used
LoRA is deleted with ``delete_adapters``, which removes it from every peft layer dict and from
``peft_config``: memory stays flat over any number of swaps (the growth reported in
diffusers#8532 and peft#1639 came from LoRAs that were never deleted, or that a load moved back
to the GPU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from peft import set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from adapters.diffusion.lora.load_failures import loading
from adapters.diffusion.lora.parsing import parse_lora_file, parse_peft_folder
from adapters.diffusion.lora.peft_layers import lora_layers, lora_names_of
from adapters.diffusion.lora.pipeline_loras import DEFAULT_CAPACITY, LoraCheck, PipelineLoras
from domain.errors import GenerationError, LoraInvalid
from ports.storage import LoraArtifact

if TYPE_CHECKING:  # importing the pipeline logs: see ``adapters.diffusion.pipeline``
    from diffusers import StableDiffusionPipeline

LORA_NAME_PREFIX = "lora_"
"""Resident LoRAs are named ``lora_1``, ``lora_2``... in the order they were loaded."""


class ResidentLoras(PipelineLoras):
    """Up to ``capacity`` LoRAs loaded in ``pipeline``, least recently used deleted first."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        capacity: int = DEFAULT_CAPACITY,
        validator: LoraCheck | None = None,
    ) -> None:
        super().__init__(pipeline, capacity=capacity, validator=validator)
        # checksum -> LoRA name, least recently used first.
        self._names: OrderedDict[str, str] = OrderedDict()
        self._created = 0
        # What is active: LoRA name -> scale ({} = LoRA off, None = unknown), and the LoRA
        # layers of the UNet and text encoder (None = to be listed again).
        self._active: dict[str, float] | None = None
        self._layers: list[BaseTunerLayer] | None = None

    @property
    def max_active(self) -> int:
        """Every resident LoRA can be active in one batch."""
        return self._capacity

    @property
    def names(self) -> list[str]:
        """The LoRA names in the pipeline now, least recently used first."""
        return list(self._names.values())

    def _entries(self) -> int:
        return len(self._names)

    def activate(self, lora: LoraArtifact, scale: float) -> str:
        name = self._ensure_loaded(lora, keep=())
        self._set_active({name: scale})
        return name

    def _activate_all(
        self, loras: dict[str, LoraArtifact], scales: dict[str, float]
    ) -> dict[str, str | GenerationError]:
        outcome: dict[str, str | GenerationError] = {}
        active: dict[str, float] = {}
        for checksum, lora in loras.items():
            try:
                name = self._ensure_loaded(lora, keep=loras.keys())
            except GenerationError as error:
                outcome[checksum] = error
                continue
            outcome[checksum] = name
            active[name] = scales[checksum]
        self._set_active(active)
        return outcome

    def deactivate(self) -> None:
        """Run the base model: LoRA layers off."""
        if self._names and self._active != {}:
            for layer in self._tuner_layers():
                layer.enable_adapters(False)
            self._active = {}

    def clear(self) -> None:
        """Delete every resident LoRA (not counted as evictions)."""
        for checksum in list(self._names):
            self._evict(checksum, counted=False)

    def close(self) -> None:
        with self._stats_lock:
            self._names.clear()
        super().close()

    def _ensure_loaded(self, lora: LoraArtifact, *, keep: Collection[str]) -> str:
        """The LoRA name of ``lora``, loading it (after making room) on a miss."""
        name = self._names.get(lora.checksum)
        if name is not None:
            with self._stats_lock:
                self._names.move_to_end(lora.checksum)
                self._hits += 1
            return name
        with self._stats_lock:
            self._misses += 1
        while len(self._names) >= self._capacity:
            victim = next((c for c in self._names if c not in keep), None)
            if victim is None:
                raise ValueError("every resident LoRA is needed by this batch")
            self._evict(victim)
        self._created += 1
        name = f"{LORA_NAME_PREFIX}{self._created}"
        self._load(lora, name)
        with self._stats_lock:
            self._names[lora.checksum] = name
        return name

    def _evict(self, checksum: str, *, counted: bool = True) -> None:
        with self._stats_lock:
            name = self._names.pop(checksum)
            self._evictions += int(counted)
        self._remove(name)

    def _load(self, lora: LoraArtifact, name: str) -> None:
        """Validate and inject ``lora`` as LoRA ``name``; nothing of it remains on failure."""
        self._layers_changed()
        path = Path(lora.path)
        with loading(lora, undo=lambda: self._remove(name)):
            self._validate(path)
            if path.is_dir():
                self._load_peft_folder(path, name)
            else:
                self._inject(parse_lora_file(self._pipe, path), name, text_encoder=True)
            if name not in lora_names_of(self._pipe.unet):
                raise LoraInvalid(f"LoRA {lora.ref!r} has no weights for this model's UNet")

    def _load_peft_folder(self, path: Path, name: str) -> None:
        """A PEFT folder through peft directly (``load_lora_weights`` would ignore it)."""
        config, state = parse_peft_folder(path)
        unet = self._pipe.unet
        unet.add_adapter(config, adapter_name=name)
        result = set_peft_model_state_dict(unet, state, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise LoraInvalid(
                f"PEFT adapter has {len(unexpected)} tensors for layers this model lacks,"
                f" e.g. {unexpected[0]!r}"
            )
        # Layers the config targets but the file leaves out would keep uninitialised weights.
        missing = [
            key
            for key in getattr(result, "missing_keys", None) or []
            if ".lora_" in key and f".{name}." in key
        ]
        if missing:
            raise LoraInvalid(
                f"PEFT adapter lacks {len(missing)} tensors its config targets,"
                f" e.g. {missing[0]!r}"
            )

    def _remove(self, name: str) -> None:
        """Delete LoRA ``name`` (the LoRA layers are listed again after)."""
        self._layers_changed()
        super()._remove(name)

    def _set_active(self, scales: Mapping[str, float]) -> None:
        """Activate exactly these LoRAs at these scales, layer by layer.

        What ``pipe.set_adapters`` + ``enable_lora`` do, without walking every module of the
        UNet and text encoder on each call (the LoRA layers are listed once per load or
        eviction); nothing at all when they are already active as asked. This is the whole cost
        of a warm switch.
        """
        if not scales:
            self.deactivate()
            return
        wanted = dict(scales)
        if self._active == wanted:
            return
        names = list(wanted)
        for layer in self._tuner_layers():
            if layer.disable_adapters:
                layer.enable_adapters(True)
            # What the layer's forward reads. peft's set_adapter also flips requires_grad on
            # every LoRA's weights (a training concern: generation runs under inference_mode)
            # and that loop was most of a warm switch's cost.
            layer._active_adapter = names  # pylint: disable=protected-access
            for name, scale in wanted.items():
                layer.set_scale(name, scale)
        self._active = wanted

    def _tuner_layers(self) -> list[BaseTunerLayer]:
        if self._layers is None:
            self._layers = lora_layers(self._pipe.unet) + lora_layers(self._pipe.text_encoder)
        return self._layers

    def _layers_changed(self) -> None:
        """LoRAs were added or removed: list the layers again, assume nothing is active."""
        self._layers = None
        self._active = None
