"""ImageModel: text-to-image with an optional LoRA and a per-step callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from PIL import Image

from domain.request import GenerationRequest
from ports.storage import LoraArtifact

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, total steps)."""


@runtime_checkable
class ImageModel(Protocol):
    """Generates one image per request; raises LORA_INVALID, GPU_OOM or MODEL_ERROR."""

    @property
    def name(self) -> str:
        """The base model's identifier, reported in the completion metadata."""

    def generate(
        self,
        request: GenerationRequest,
        lora: LoraArtifact | None,
        on_step: StepCallback,
    ) -> Image.Image:
        """Denoise and decode; the image is ``request.width`` x ``request.height``."""
