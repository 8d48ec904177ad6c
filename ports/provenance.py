"""ProvenanceMarker: the marks that tie a stored image to its generation, style and artist."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class ProvenanceFacts:
    """What the marks state about one image: how it was made, for which style and artist.

    ``prompt`` and ``negative_prompt`` are the user's texts; whether they are written into the
    file is the marker's setting (the output bucket may be public).
    """

    generation_id: int
    task_id: str
    style_id: int | None
    artist: str | None
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    scheduler: str
    model: str
    lora_checksum: str | None
    lora_scale: float | None


@dataclass(frozen=True)
class MarkedImage:
    """The PNG bytes to store, and what was written into them.

    ``provenance`` goes into the completion metadata as it is: which marks the file carries
    (content credentials with their manifest label, the invisible mark's method and payload,
    the metadata chunks).
    """

    png: bytes
    provenance: Mapping[str, Any]


@runtime_checkable
class ProvenanceMarker(Protocol):
    """Marks the final image (the signature already stamped) and encodes it as PNG.

    Runs in the finish stage, never on the model's thread. A mark that cannot be written
    raises ``ProvenanceFailed``: an image is never stored without the marks it is configured
    to carry.
    """

    @property
    def marks(self) -> tuple[str, ...]:
        """The marks every image gets (for the start-up log and the metrics' info)."""

    def mark(self, image: Image.Image, facts: ProvenanceFacts) -> MarkedImage:
        """The image with its marks, encoded as PNG."""
