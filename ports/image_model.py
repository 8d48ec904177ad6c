"""ImageModel: text-to-image with an optional LoRA and a per-step callback, one job or a batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from domain.errors import GenerationError
from domain.request import GenerationRequest
from ports.storage import LoraArtifact
from ports.telemetry import LoraCacheStats

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, total steps)."""


@dataclass(frozen=True)
class BatchItem:
    """One job of a batch: its request, its LoRA (None for the base model) and its progress."""

    request: GenerationRequest
    lora: LoraArtifact | None
    on_step: StepCallback


@runtime_checkable
class ImageModel(Protocol):
    """Generates images; LORA_INVALID, GPU_OOM or MODEL_ERROR, raised or per batch item."""

    @property
    def name(self) -> str:
        """The base model's identifier, reported in the completion metadata."""

    @property
    def max_batch_size(self) -> int:
        """The most items one ``generate_batch`` call runs together (1: no batching)."""

    def generate(
        self,
        request: GenerationRequest,
        lora: LoraArtifact | None,
        on_step: StepCallback,
    ) -> Image.Image:
        """Denoise and decode; the image is ``request.width`` x ``request.height``."""

    def lora_cache_stats(self) -> LoraCacheStats | None:
        """The counters of the LoRAs kept loaded between jobs (metrics), or None without one."""

    def generate_batch(self, items: Sequence[BatchItem]) -> list[Image.Image | GenerationError]:
        """One image, or the error that ended that item alone, per item and in order.

        Each item's image equals (within float tolerance) what ``generate`` gives it alone. The
        caller sends items that share ``domain.request.batch_key``; LoRAs may differ. A failure
        of the whole call (the model gone) is raised.
        """
