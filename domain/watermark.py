"""Stamping the artist's signature onto a generated image (pure image computation)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from domain.errors import SignatureInvalid
from domain.request import SignatureConfig, SignatureSpec
from ports.fonts import FontLoader

ACCEPTED_FORMATS = frozenset({"PNG", "WEBP"})

MAX_SIGNATURE_TEXT_CHARS = 100
"""The longest text signature; the wire bound of ``artist_name`` is the same."""
CHECK_IMAGE_WIDTH = 512
"""``check_text`` lays the text out as ``stamp`` would for an image this wide (the smallest
default size), with the default ``SignatureConfig``."""
PROBE_FONT_PX = 64
MIN_FONT_PX = 6
MAX_FONT_PX = 512
"""A narrow text ("i", ".") would ask for a font over a thousand pixels high; above this size the
mark is drawn at this size and scaled up to its box instead."""


def signature_text(text: str) -> str:
    """``text`` with its whitespace folded, as it is stamped; SIGNATURE_INVALID when it cannot be.

    Refused: an empty text, one over ``MAX_SIGNATURE_TEXT_CHARS``, one holding a control,
    format or other unprintable character (which the font draws as nothing or as a box).
    """
    folded = " ".join(text.split())
    if not folded:
        raise SignatureInvalid("signature text is empty")
    if len(folded) > MAX_SIGNATURE_TEXT_CHARS:
        raise SignatureInvalid(
            f"signature text is {len(folded)} characters, more than {MAX_SIGNATURE_TEXT_CHARS}"
        )
    if not folded.isprintable():
        bad = next(char for char in folded if not char.isprintable())
        raise SignatureInvalid(f"signature text holds an unprintable character U+{ord(bad):04X}")
    return folded


@dataclass(frozen=True)
class _TextLayout:
    """A text measured for drawing: the font, its outline width and the inked box."""

    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    stroke: int
    box: tuple[int, int, int, int]


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
                            f"signature image must be PNG or WebP, got {probe.format}"
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

    def check_text(self, text: str) -> None:
        """Refuse, cheaply and before any model work, a text that ``stamp`` could not draw.

        The rules of ``stamp``: ``signature_text``, then a dry-run layout with the font at the
        size used on a ``CHECK_IMAGE_WIDTH``-wide image; SIGNATURE_INVALID otherwise.
        """
        self._layout(signature_text(text), CHECK_IMAGE_WIDTH, SignatureConfig())

    def render_text(self, text: str, image_width: int, config: SignatureConfig) -> Image.Image:
        """Draw ``text`` as a light mark with a dark outline, sized to the configured width."""
        folded = signature_text(text)
        layout = self._layout(folded, image_width, config)
        left, top, right, bottom = layout.box
        mark = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
        ImageDraw.Draw(mark).text(
            (-left, -top),
            folded,
            font=layout.font,
            fill=(255, 255, 255, 255),
            stroke_width=layout.stroke,
            stroke_fill=(0, 0, 0, 255),
        )
        return mark

    def _layout(self, text: str, image_width: int, config: SignatureConfig) -> _TextLayout:
        """Measure ``text`` at the font size that makes it the configured width of the image."""
        target_width = max(1, round(config.width_fraction * image_width))
        probe_font = self._font_loader(PROBE_FONT_PX)
        left, _, right, _ = self._measure(probe_font, text, 0)
        if right <= left:
            raise SignatureInvalid(f"signature text {text!r} has nothing to draw")
        wanted = round(PROBE_FONT_PX * target_width / (right - left))
        font_size = min(MAX_FONT_PX, max(MIN_FONT_PX, wanted))
        font = self._font_loader(font_size)
        stroke = max(1, font_size // 14)
        box = self._measure(font, text, stroke)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise SignatureInvalid(f"signature text {text!r} has nothing to draw")
        return _TextLayout(font=font, stroke=stroke, box=box)

    @staticmethod
    def _measure(
        font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str, stroke: int
    ) -> tuple[int, int, int, int]:
        """The inked box of ``text``; SIGNATURE_INVALID when the font cannot lay it out."""
        try:
            left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: raqm_layout() failed
            raise SignatureInvalid(
                f"signature text {text!r} cannot be laid out with the signature font: {exc}"
            ) from exc
        return int(left), int(top), int(right), int(bottom)

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
        elif spec.text is not None:
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
