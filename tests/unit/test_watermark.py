"""Signature geometry and compositing, checked on pixels."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from adapters.fonts import SignatureFonts
from domain.errors import ErrorCode, SignatureInvalid
from domain.request import SIGNATURE_POSITIONS, SignatureConfig, SignatureSpec
from domain.watermark import Placement, Watermarker, signature_box
from tests.unit.conftest import png_bytes

BLACK = (0, 0, 0)


@pytest.fixture(scope="module")
def watermarker() -> Watermarker:
    return Watermarker(font_loader=SignatureFonts(), max_signature_bytes=200_000)


def red_mark(size: tuple[int, int] = (200, 100)) -> Image.Image:
    return Image.new("RGBA", size, (255, 0, 0, 255))


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        ("top-left", (15, 15)),
        ("top-center", (192, 15)),
        ("top-right", (369, 15)),
        ("bottom-left", (15, 433)),
        ("bottom-center", (192, 433)),
        ("bottom-right", (369, 433)),
    ],
)
def test_box_for_each_position(position: str, expected: tuple[int, int]) -> None:
    box = signature_box((512, 512), (200, 100), SignatureConfig(position=position, size="medium"))
    # medium = 25 % of 512 = 128 wide, aspect kept -> 64 high; margin 3 % = 15.
    assert (box.width, box.height) == (128, 64)
    assert (box.left, box.top) == expected


@pytest.mark.parametrize(("size", "width"), [("small", 77), ("medium", 128), ("large", 179)])
def test_size_is_a_fraction_of_the_image_width(size: str, width: int) -> None:
    box = signature_box((512, 1024), (400, 100), SignatureConfig(size=size))
    assert box.width == width and box.height == round(100 * width / 400)


def test_tall_mark_is_scaled_down_to_fit() -> None:
    box = signature_box((1024, 256), (50, 400), SignatureConfig(size="large"))
    assert box.height == 256 - 2 * 31 and box.top >= 0 and box.top + box.height <= 256
    assert box.width == round(358 * box.height / round(400 * 358 / 50))


@pytest.mark.parametrize("position", SIGNATURE_POSITIONS)
def test_stamp_lands_where_the_box_says_at_the_opacity(
    watermarker: Watermarker, position: str
) -> None:
    config = SignatureConfig(position=position, size="small", opacity=0.5)
    image = Image.new("RGB", (512, 768), BLACK)
    stamped = watermarker.stamp(image, SignatureSpec(config=config), red_mark())
    box: Placement = signature_box(image.size, (200, 100), config)
    centre = (box.left + box.width // 2, box.top + box.height // 2)
    red, green, blue = stamped.getpixel(centre)
    assert abs(red - 128) <= 1 and green == 0 and blue == 0
    # Everything outside the box is untouched.
    diff = [
        (x, y)
        for x in range(0, 512, 8)
        for y in range(0, 768, 8)
        if stamped.getpixel((x, y)) != BLACK
    ]
    assert diff and all(
        box.left <= x < box.left + box.width and box.top <= y < box.top + box.height
        for x, y in diff
    )
    assert image.getpixel(centre) == BLACK  # the input is not modified


@pytest.mark.parametrize("opacity", [0.0, 0.3, 1.0])
def test_opacity_scales_the_mark(watermarker: Watermarker, opacity: float) -> None:
    config = SignatureConfig(position="top-left", size="large", opacity=opacity)
    stamped = watermarker.stamp(
        Image.new("RGB", (256, 256), (0, 0, 255)), SignatureSpec(config=config), red_mark()
    )
    red, _, blue = stamped.getpixel((40, 30))
    assert abs(red - round(255 * opacity)) <= 1 and abs(blue - round(255 * (1 - opacity))) <= 1


def test_transparent_pixels_of_the_mark_leave_the_image_alone(watermarker: Watermarker) -> None:
    mark = Image.new("RGBA", (100, 100), (255, 0, 0, 0))
    mark.paste((255, 0, 0, 255), (0, 0, 50, 100))  # left half opaque, right half clear
    config = SignatureConfig(position="top-left", size="large", opacity=1.0)
    stamped = watermarker.stamp(Image.new("RGB", (400, 400), BLACK), SignatureSpec(config), mark)
    # large = 140 px, margin 12: opaque left half spans x 12..82, clear right half 82..152.
    assert stamped.getpixel((40, 60)) == (255, 0, 0)
    assert stamped.getpixel((120, 60)) == BLACK


def test_text_signature_is_drawn_in_its_box(watermarker: Watermarker) -> None:
    config = SignatureConfig(position="bottom-left", size="medium", opacity=1.0)
    spec = SignatureSpec(config=config, text="Ana Rivera")
    image = Image.new("RGB", (512, 512), (128, 128, 128))
    stamped = watermarker.stamp(image, spec)
    mark = watermarker.render_text("Ana Rivera", 512, config)
    box = signature_box(image.size, mark.size, config)
    changed = [
        (x, y)
        for x in range(512)
        for y in range(0, 512, 2)
        if stamped.getpixel((x, y)) != (128, 128, 128)
    ]
    assert len(changed) > 300  # light glyphs and dark outline were drawn
    xs = [x for x, _ in changed]
    ys = [y for _, y in changed]
    assert box.left <= min(xs) and max(xs) < box.left + box.width
    assert box.top <= min(ys) and max(ys) < box.top + box.height
    assert abs(box.width - 128) <= 1
    colors = {stamped.getpixel(p) for p in changed}
    assert any(sum(c) > 600 for c in colors) and any(sum(c) < 100 for c in colors)


def test_decode_accepts_png_with_alpha(watermarker: Watermarker) -> None:
    image = watermarker.decode_signature(png_bytes((30, 20), (1, 2, 3, 128)))
    assert image.mode == "RGBA" and image.size == (30, 20)
    assert image.getpixel((0, 0)) == (1, 2, 3, 128)


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "cannot be decoded"),
        (b"\x89PNG\r\n\x1a\n broken", "cannot be decoded"),
        (b"GIF89a" + b"\0" * 20, "cannot be decoded"),
        (jpeg_bytes(), "must be PNG or WebP, got JPEG"),
        (b"\0" * 300_000, "more than 200000"),
    ],
)
def test_decode_rejects_bad_images(watermarker: Watermarker, data: bytes, fragment: str) -> None:
    with pytest.raises(SignatureInvalid) as caught:
        watermarker.decode_signature(data)
    assert caught.value.code is ErrorCode.SIGNATURE_INVALID and not caught.value.retryable
    assert fragment in caught.value.message


def test_decode_rejects_too_many_pixels() -> None:
    small_cap = Watermarker(font_loader=SignatureFonts(), max_signature_pixels=10_000)
    with pytest.raises(SignatureInvalid, match="200x100, more than 10000 pixels"):
        small_cap.decode_signature(png_bytes((200, 100), (0, 0, 0, 255)))


def test_stamp_without_image_or_text_is_signature_invalid(watermarker: Watermarker) -> None:
    with pytest.raises(SignatureInvalid):
        watermarker.stamp(Image.new("RGB", (64, 64)), SignatureSpec(config=SignatureConfig()))


# --- text signatures: one set of rules for check_text and stamp --------------------------------


class BoxFont:
    """A fake font: each character is half the font size wide, the text one size high."""

    def __init__(self, size: int, *, failure: Exception | None = None, empty: bool = False):
        self.size = size
        self.failure = failure
        self.empty = empty

    def getbbox(self, text: str, stroke_width: int = 0) -> tuple[int, int, int, int]:
        """The inked box of ``text``, or the configured failure."""
        if self.failure is not None:
            raise self.failure
        if self.empty:
            return (0, 0, 0, 0)
        return (0, 0, len(text) * self.size // 2 + 2 * stroke_width, self.size + 2 * stroke_width)


class RecordingFonts:
    """A font loader that records every size asked for; ``BoxFont``s unless given another."""

    def __init__(
        self,
        inner: Callable[[int], Any] | None = None,
        *,
        failure: Exception | None = None,
        empty: bool = False,
    ) -> None:
        self.sizes: list[int] = []
        self.inner = inner
        self.failure = failure
        self.empty = empty

    def __call__(self, size: int) -> Any:
        self.sizes.append(size)
        if self.inner is not None:
            return self.inner(size)
        return BoxFont(size, failure=self.failure, empty=self.empty)


@pytest.mark.parametrize(
    "text",
    [
        "Ana Rivera",
        "  Ada \t Lovelace\n",
        "x" * 100,
        "x" * 50 + "    " + "x" * 49,
        "Zoë Ñandú",
        "i",
    ],
)
def test_check_text_accepts_what_stamp_draws(watermarker: Watermarker, text: str) -> None:
    watermarker.check_text(text)
    spec = SignatureSpec(config=SignatureConfig(opacity=1.0), text=text)
    stamped = watermarker.stamp(Image.new("RGB", (512, 512), BLACK), spec)
    assert stamped.getbbox() is not None  # something was drawn


BAD_TEXTS = [
    pytest.param("", "empty", id="empty"),
    pytest.param(" \t\n ", "empty", id="blank"),
    pytest.param("x" * 101, "101 characters, more than 100", id="101-chars"),
    pytest.param("x" * 50 + " " + "x" * 50, "101 characters", id="101-chars-folded"),
    pytest.param("Ana\x00", "U+0000", id="nul"),
    pytest.param("Ana\x07", "U+0007", id="bell"),
    pytest.param("Ana\x1b[31m", "U+001B", id="escape"),
    pytest.param("Ana\x7f", "U+007F", id="delete"),
    pytest.param("Ana\u200b", "U+200B", id="zero-width-space"),
    pytest.param("Ana\u202eavir", "U+202E", id="right-to-left-override"),
    pytest.param("Ana\ud800", "U+D800", id="lone-surrogate"),
    pytest.param("Ana\U000f0000", "U+F0000", id="private-use"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_TEXTS)
def test_check_text_refuses_what_cannot_be_stamped(
    watermarker: Watermarker, text: str, fragment: str
) -> None:
    with pytest.raises(SignatureInvalid) as caught:
        watermarker.check_text(text)
    assert caught.value.code is ErrorCode.SIGNATURE_INVALID and not caught.value.retryable
    assert fragment in caught.value.message


@pytest.mark.parametrize(("text", "fragment"), BAD_TEXTS)
def test_stamp_refuses_by_the_same_rules(
    watermarker: Watermarker, text: str, fragment: str
) -> None:
    spec = SignatureSpec(config=SignatureConfig(), text=text)
    with pytest.raises(SignatureInvalid) as caught:
        watermarker.stamp(Image.new("RGB", (512, 512)), spec)
    assert fragment in caught.value.message


def test_check_text_sizes_the_font_for_a_512_wide_image() -> None:
    fonts = RecordingFonts()
    Watermarker(font_loader=fonts).check_text("ab")
    # "ab" is 64 px wide at the 64 px probe; medium on 512 is 128 px wide: a 128 px font.
    assert fonts.sizes == [64, 128]


def test_check_text_measures_as_stamp_does_on_a_512_wide_image() -> None:
    fonts = RecordingFonts(SignatureFonts())
    marker = Watermarker(font_loader=fonts)
    marker.check_text("Ana Rivera")
    checked = list(fonts.sizes)
    fonts.sizes.clear()
    marker.stamp(Image.new("RGB", (512, 512)), SignatureSpec(SignatureConfig(), text="Ana Rivera"))
    assert fonts.sizes == checked and len(checked) == 2
    fonts.sizes.clear()
    marker.stamp(Image.new("RGB", (1024, 512)), SignatureSpec(SignatureConfig(), text="Ana Rivera"))
    assert fonts.sizes[1] > checked[1]


def test_font_size_stays_between_6_and_512_pixels() -> None:
    fonts = RecordingFonts(SignatureFonts())
    marker = Watermarker(font_loader=fonts)
    large = SignatureSpec(SignatureConfig(size="large"), text="i")
    stamped = marker.stamp(Image.new("RGB", (1024, 1024)), large)  # "i" would ask for ~1000 px
    assert fonts.sizes[-1] == 512 and stamped.size == (1024, 1024)
    marker.check_text("x" * 100)  # would ask for ~2 px
    assert fonts.sizes[-1] == 6


@pytest.mark.parametrize(
    "failure",
    [OSError("raster overflow"), ValueError("bad text"), RuntimeError("raqm_layout() failed.")],
)
def test_text_the_font_cannot_lay_out_is_signature_invalid(failure: Exception) -> None:
    marker = Watermarker(font_loader=RecordingFonts(failure=failure))
    with pytest.raises(SignatureInvalid, match="cannot be laid out") as caught:
        marker.check_text("Ana")
    assert str(failure) in caught.value.message


def test_text_with_nothing_to_draw_is_signature_invalid() -> None:
    marker = Watermarker(font_loader=RecordingFonts(empty=True))
    with pytest.raises(SignatureInvalid, match="nothing to draw"):
        marker.check_text("Ana")


def test_a_font_that_cannot_load_is_not_blamed_on_the_text() -> None:
    # A broken font file is the worker's fault: it must not become SIGNATURE_INVALID.
    def broken_loader(size: int) -> BoxFont:
        raise OSError(f"cannot open the font at {size} px")

    marker = Watermarker(font_loader=broken_loader)
    with pytest.raises(OSError, match="cannot open the font"):
        marker.check_text("Ana")


def test_narrow_text_on_a_large_image_stays_in_its_box(watermarker: Watermarker) -> None:
    config = SignatureConfig(position="top-right", size="large", opacity=1.0)
    image = Image.new("RGB", (1024, 512), BLACK)
    stamped = watermarker.stamp(image, SignatureSpec(config=config, text="."))
    box = signature_box(image.size, watermarker.render_text(".", 1024, config).size, config)
    inked = stamped.getbbox()
    assert inked is not None
    assert box.left <= inked[0] and inked[2] <= box.left + box.width
    assert box.top <= inked[1] and inked[3] <= box.top + box.height
