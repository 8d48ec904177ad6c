"""Pipeline LoRAs: the LoRAs kept in a StableDiffusionPipeline between jobs, keyed by content.

Loading a LoRA costs a file read, a parse and new layers injected into the UNet; most jobs reuse
one of a few styles. So LoRAs are kept, keyed by the SHA-256 of their content (stable across
re-downloads), and a job whose LoRA is kept reads no file. ``PipelineLoras`` is what the model
calls; two classes implement it, one chosen when the model loads:

- ``ResidentLoras`` (``resident.py``): up to ``capacity`` LoRAs stay loaded in the pipeline, the
  least recently used deleted;
- ``HotswapSlot`` (``hotswap.py``): for a compiled UNet, one fixed slot that each LoRA is copied
  into, parsed LoRAs kept in host memory.

The pipeline operations both need (inject a parsed LoRA into the UNet and the text encoder,
remove one) are here. Pipeline methods run on the one thread that renders; ``stats`` may be
read from any thread.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.diffusion.lora.parsing import ParsedLora
from adapters.diffusion.lora.peft_layers import lora_names_of
from adapters.diffusion.lora.validation import LoraLayout, LoraValidator
from domain.errors import GenerationError
from ports.storage import LoraArtifact

if TYPE_CHECKING:  # importing the pipeline logs: see ``adapters.diffusion.pipeline``
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 8
"""LoRAs kept (SD 1.5, rank 8 on the attention projections: ~3 MB each in fp16)."""

LoraCheck = Callable[[Path], LoraLayout]
"""Validates a LoRA file or PEFT folder before it is loaded (``LoraValidator.validate``)."""


@dataclass(frozen=True)
class PipelineLoraStats:
    """Counters since start. A hit reads no file; ``entries`` is what is kept now: LoRAs loaded
    in the pipeline (resident), or parsed LoRAs in host memory (hot-swap slot)."""

    hits: int
    misses: int
    evictions: int
    entries: int
    capacity: int


class PipelineLoras(ABC):
    """Up to ``capacity`` LoRAs kept for ``pipeline``; each LoRA is validated before it loads.

    ``activate`` and ``activate_mixed`` return the LoRA names to route samples through (see
    ``adapters.diffusion.lora.routing``).
    """

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        capacity: int = DEFAULT_CAPACITY,
        validator: LoraCheck | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"pipeline LoRAs need a capacity of at least 1; got {capacity}")
        self._pipe = pipeline
        self._capacity = capacity
        self._validate: LoraCheck = (
            validator
            or LoraValidator(unet=pipeline.unet, text_encoder=pipeline.text_encoder).validate
        )
        self._stats_lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0

    @property
    def capacity(self) -> int:
        """The most LoRAs kept at once."""
        return self._capacity

    @property
    @abstractmethod
    def max_active(self) -> int:
        """The most distinct LoRAs that can be active in one batch."""

    @property
    @abstractmethod
    def names(self) -> list[str]:
        """The LoRA names in the pipeline now."""

    @property
    def stats(self) -> PipelineLoraStats:
        """A consistent snapshot of the counters; safe from any thread."""
        with self._stats_lock:
            return PipelineLoraStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=self._entries(),
                capacity=self._capacity,
            )

    @abstractmethod
    def _entries(self) -> int:
        """How many LoRAs are kept now (called with the stats lock held)."""

    @abstractmethod
    def activate(self, lora: LoraArtifact, scale: float) -> str:
        """Make ``lora`` the only active LoRA at ``scale`` (loading it on a miss); its name.

        LORA_INVALID if it cannot be loaded, GPU_OOM if loading ran out of GPU memory,
        STORAGE_ERROR if its file left the disk before it was loaded (see ``load_failures``).
        """

    def activate_mixed(
        self, entries: Sequence[tuple[LoraArtifact, float]]
    ) -> dict[str, str | GenerationError]:
        """Load and activate several LoRAs at once, each at its scale, for a mixed batch.

        Returns, per checksum, the LoRA name, or the error that kept that LoRA out (the others
        stay usable). At most ``max_active`` distinct LoRAs, each with one scale.
        """
        scales: dict[str, float] = {}
        loras: dict[str, LoraArtifact] = {}
        for lora, scale in entries:
            if scales.setdefault(lora.checksum, scale) != scale:
                raise ValueError(f"LoRA {lora.ref!r} asked at two scales in one batch")
            loras[lora.checksum] = lora
        if len(loras) > self.max_active:
            raise ValueError(
                f"{len(loras)} LoRAs in one batch; at most {self.max_active} can be active"
            )
        if not loras:
            self.deactivate()
            return {}
        return self._activate_all(loras, scales)

    @abstractmethod
    def _activate_all(
        self, loras: dict[str, LoraArtifact], scales: dict[str, float]
    ) -> dict[str, str | GenerationError]:
        """``activate_mixed`` once its arguments are checked: LoRAs and scales by checksum."""

    @abstractmethod
    def deactivate(self) -> None:
        """Run the base model: no LoRA active."""

    @abstractmethod
    def clear(self) -> None:
        """Drop every LoRA kept."""

    def close(self) -> None:
        """Let go of the pipeline (the model is shutting down)."""
        self._pipe = None  # type: ignore[assignment]

    # -- pipeline operations --------------------------------------------------------------------

    def _inject(self, parsed: ParsedLora, name: str, *, text_encoder: bool) -> None:
        """``parsed`` as LoRA ``name``: its UNet part, and with ``text_encoder`` that part too."""
        self._load_into_unet(parsed, name)
        if text_encoder and parsed.has_text_encoder:
            self._load_into_text_encoder(parsed, name)

    def _load_into_unet(self, parsed: ParsedLora, name: str, *, hotswap: bool = False) -> None:
        """``parsed``'s UNet part as LoRA ``name`` (copied into it in place with ``hotswap``)."""
        pipe = self._pipe
        pipe.load_lora_into_unet(
            parsed.state_dict,
            network_alphas=parsed.network_alphas,
            unet=pipe.unet,
            adapter_name=name,
            metadata=parsed.metadata_for("unet"),
            _pipeline=pipe,
            hotswap=hotswap,
        )

    def _load_into_text_encoder(self, parsed: ParsedLora, name: str) -> None:
        """``parsed``'s text-encoder part as LoRA ``name``."""
        pipe = self._pipe
        pipe.load_lora_into_text_encoder(
            parsed.state_dict,
            network_alphas=parsed.network_alphas,
            text_encoder=pipe.text_encoder,
            adapter_name=name,
            metadata=parsed.metadata_for("text_encoder"),
            _pipeline=pipe,
        )

    def _remove(self, name: str) -> None:
        """Delete LoRA ``name`` wherever it is; a failure is logged, never raised."""
        pipe = self._pipe
        try:
            if name in lora_names_of(pipe.unet) or name in lora_names_of(pipe.text_encoder):
                pipe.delete_adapters(name)
        except Exception:  # pylint: disable=broad-exception-caught
            log.exception("LoRA %s could not be removed", name)
