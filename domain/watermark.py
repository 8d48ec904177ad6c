"""Stamping the artist's signature onto a generated image (pure image computation)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from domain.errors import SignatureInvalid
from domain.request import SignatureConfig, SignatureSpec

FontLoader = Callable[[int], ImageFont.FreeTypeFont | ImageFont.ImageFont]
"""Returns a scalable font at a pixel size; injected so the domain never touches the disk."""

ACCEPTED_FORMATS = frozenset({"PNG", "WEBP"})


@dataclass(frozen=True)
class Placement:
    """Where a signature of ``size`` lands on an image: its top-left corner."""

    left: int
    top: int
    width: int
    height: int


def signature_box(
    image_size: tuple[int, int], mark_size: tuple[int, int], config: SignatureConfig
) -> Placement:
    """Scale the mark to the configured fraction of the image width and place it with a margin.

    The margin is 3 % of the image width; a mark too tall for the image is scaled down to fit.
    """
    image_w, image_h = image_size
    mark_w, mark_h = mark_size
    margin = max(2, round(0.03 * image_w))
    width = max(1, round(config.width_fraction * image_w))
    height = max(1, round(mark_h * width / mark_w))
    max_height = max(1, image_h - 2 * margin)
    if height > max_height:
        width = max(1, round(width * max_height / height))
        height = max_height
    vertical, horizontal = config.position.split("-")
    left = {
        "left": margin,
        "center": (image_w - width) // 2,
        "right": image_w - margin - width,
    }[horizontal]
    top = margin if vertical == "top" else image_h - margin - height
    return Placement(left=left, top=top, width=width, height=height)


class Watermarker:
    """Validates signature images and stamps them (or a text signature) onto images."""

    def __init__(
        self,
        *,
        font_loader: FontLoader,
        max_signature_bytes: int = 5 * 1024 * 1024,
        max_signature_pixels: int = 4096 * 4096,
    ) -> None:
        self._font_loader = font_loader
        self._max_bytes = max_signature_bytes
        self._max_pixels = max_signature_pixels

    def decode_signature(self, data: bytes) -> Image.Image:
        """Decode a signature image safely (size and pixel caps); SIGNATURE_INVALID otherwise."""
        if len(data) > self._max_bytes:
            raise SignatureInvalid(
                f"signature image is {len(data)} bytes, more than {self._max_bytes}"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as probe:
                    if probe.format not in ACCEPTED_FORMATS:
                        raise SignatureInvalid(
                            f"signature image must be PNG or WebP, got {probe.format or 'unknown'}"
                        )
                    width, height = probe.size
                    if width * height > self._max_pixels:
                        raise SignatureInvalid(
                            f"signature image is {width}x{height}, more than"
                            f" {self._max_pixels} pixels"
                        )
                    probe.load()
                    return probe.convert("RGBA")
        except (
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombWarning,
            Image.DecompressionBombError,
        ) as exc:
            raise SignatureInvalid(f"signature image cannot be decoded: {exc}") from exc

    def render_text(self, text: str, image_width: int, config: SignatureConfig) -> Image.Image:
        """Draw ``text`` as a light mark with a dark outline, sized to the configured width."""
        target_width = max(1, round(config.width_fraction * image_width))
        probe_size = 64
        probe_font = self._font_loader(probe_size)
        left, _, right, _ = probe_font.getbbox(text)
        font_size = max(6, round(probe_size * target_width / max(1, right - left)))
        font = self._font_loader(font_size)
        stroke = max(1, font_size // 14)
        left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
        mark = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
        ImageDraw.Draw(mark).text(
            (-left, -top),
            text,
            font=font,
            fill=(255, 255, 255, 255),
            stroke_width=stroke,
            stroke_fill=(0, 0, 0, 255),
        )
        return mark

    def stamp(
        self,
        image: Image.Image,
        spec: SignatureSpec,
        signature_image: Image.Image | None = None,
    ) -> Image.Image:
        """An RGB copy of ``image`` with the signature composited at the configured opacity."""
        config = spec.config
        if signature_image is not None:
            mark = signature_image.convert("RGBA")
        elif spec.text:
            mark = self.render_text(spec.text, image.width, config)
        else:
            raise SignatureInvalid("signature has neither an image nor a text")
        box = signature_box(image.size, mark.size, config)
        mark = mark.resize((box.width, box.height), Image.Resampling.LANCZOS)
        if config.opacity < 1.0:
            alpha = mark.getchannel("A").point(lambda value: round(value * config.opacity))
            mark.putalpha(alpha)
        canvas = image.convert("RGBA")
        canvas.alpha_composite(mark, dest=(box.left, box.top))
        return canvas.convert("RGB")
