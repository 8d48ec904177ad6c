"""FontLoader on Pillow: DejaVu Sans Bold from the system, else Pillow's scalable default."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from PIL import ImageFont

DEJAVU_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/TTF/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf",
    "/usr/local/share/fonts/DejaVuSans-Bold.ttf",
)
STARTUP_PROBE_PX = 64


def find_font(explicit: str | os.PathLike | None = None) -> Path | None:
    """The configured font file, else the first DejaVu found; None when there is none."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"SIGNATURE_FONT_PATH: no font file at {path}")
        return path
    for candidate in DEJAVU_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


class SignatureFonts:
    """The ``FontLoader`` port: loads the signature font at any pixel size, caching each size.

    The font is loaded once on construction, so a file that is not a font fails at startup
    rather than on the first text signature.
    """

    def __init__(self, font_path: str | os.PathLike | None = None) -> None:
        self.path = find_font(font_path)
        self._load = functools.lru_cache(maxsize=64)(self._load_uncached)
        self._load(STARTUP_PROBE_PX)

    def __call__(self, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        """A TrueType font of ``size`` pixels."""
        return self._load(size)

    def _load_uncached(self, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        if self.path is None:
            return ImageFont.load_default(size=size)
        try:
            return ImageFont.truetype(str(self.path), size=size)
        except OSError as exc:
            raise OSError(
                f"SIGNATURE_FONT_PATH: {self.path} cannot be read as a font: {exc}"
            ) from exc
