"""FontLoader: the signature font at any pixel size (the domain never touches the disk)."""

from __future__ import annotations

from typing import Protocol

from PIL import ImageFont


class FontLoader(Protocol):
    """Returns a scalable font at a pixel size."""

    def __call__(self, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        """A font ``size`` pixels high."""
