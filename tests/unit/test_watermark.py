"""Signature geometry and compositing, checked on pixels."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image, ImageDraw

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
    """A fake font: each character is half the font size wide, the text one size high.

    ``offset`` moves the inked box right and down (a glyph with a left bearing); every
    measurement is appended to ``measured`` as ``(font size, stroke width)``.
    """

    def __init__(
        self,
        size: int,
        *,
        failure: Exception | None = None,
        empty: bool = False,
        offset: int = 0,
        measured: list[tuple[int, int]] | None = None,
    ) -> None:
        self.size = size
        self.failure = failure
        self.empty = empty
        self.offset = offset
        self.measured = measured if measured is not None else []

    def getbbox(self, text: str, stroke_width: int = 0) -> tuple[int, int, int, int]:
        """The inked box of ``text``, or the configured failure."""
        self.measured.append((self.size, stroke_width))
        if self.failure is not None:
            raise self.failure
        if self.empty:
            return (0, 0, 0, 0)
        width = len(text) * self.size // 2 + 2 * stroke_width
        height = self.size + 2 * stroke_width
        return (self.offset, self.offset, self.offset + width, self.offset + height)


class RecordingFonts:
    """A font loader that records every size asked for; ``BoxFont``s unless given another."""

    def __init__(
        self,
        inner: Callable[[int], Any] | None = None,
        *,
        failure: Exception | None = None,
        empty: bool = False,
        offset: int = 0,
    ) -> None:
        self.sizes: list[int] = []
        self.measured: list[tuple[int, int]] = []
        self.inner = inner
        self.failure = failure
        self.empty = empty
        self.offset = offset

    def __call__(self, size: int) -> Any:
        self.sizes.append(size)
        if self.inner is not None:
            return self.inner(size)
        return BoxFont(
            size,
            failure=self.failure,
            empty=self.empty,
            offset=self.offset,
            measured=self.measured,
        )


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


# --- exact geometry, colours and limits ---------------------------------------------------------


@pytest.mark.parametrize(
    ("image_size", "mark_size", "size", "position", "expected"),
    [
        # The smallest image a request may ask for: 3 % of 64 rounds to 2, the 2 px floor.
        ((64, 64), (200, 100), "medium", "bottom-right", Placement(46, 54, 16, 8)),
        # 3 % of 83 rounds to 2, of 84 to 3.
        ((83, 83), (200, 100), "medium", "bottom-right", Placement(60, 71, 21, 10)),
        ((84, 84), (200, 100), "medium", "bottom-right", Placement(60, 71, 21, 10)),
        ((84, 84), (200, 100), "medium", "top-left", Placement(3, 3, 21, 10)),
        ((1024, 768), (200, 100), "small", "bottom-center", Placement(435, 660, 154, 77)),
        # A mark flat enough to round to no height keeps one row.
        ((512, 512), (1000, 1), "medium", "bottom-right", Placement(369, 496, 128, 1)),
        # A mark thin enough to scale to no width keeps one column.
        ((512, 512), (1, 1000), "medium", "bottom-right", Placement(496, 15, 1, 482)),
        # A tiny image: 15 % of 3 px rounds to nothing; the mark keeps one pixel.
        ((3, 3), (10, 5), "small", "bottom-right", Placement(0, 0, 1, 1)),
        # An image lower than its two margins: the mark is scaled to one row.
        ((100, 4), (10, 10), "small", "top-left", Placement(3, 3, 1, 1)),
    ],
)
def test_box_by_value(
    image_size: tuple[int, int],
    mark_size: tuple[int, int],
    size: str,
    position: str,
    expected: Placement,
) -> None:
    config = SignatureConfig(position=position, size=size)
    assert signature_box(image_size, mark_size, config) == expected


def test_empty_text_message_is_exact(watermarker: Watermarker) -> None:
    with pytest.raises(SignatureInvalid) as caught:
        watermarker.check_text(" ")
    assert caught.value.message == "signature text is empty"


def test_stamp_without_image_or_text_names_what_is_missing(watermarker: Watermarker) -> None:
    with pytest.raises(SignatureInvalid) as caught:
        watermarker.stamp(Image.new("RGB", (64, 64)), SignatureSpec(config=SignatureConfig()))
    assert caught.value.message == "signature has neither an image nor a text"


def test_decode_takes_a_signature_of_exactly_the_byte_limit() -> None:
    data = png_bytes((30, 20), (1, 2, 3, 255))
    at_limit = Watermarker(font_loader=SignatureFonts(), max_signature_bytes=len(data))
    assert at_limit.decode_signature(data).size == (30, 20)
    one_under = Watermarker(font_loader=SignatureFonts(), max_signature_bytes=len(data) - 1)
    with pytest.raises(SignatureInvalid) as caught:
        one_under.decode_signature(data)
    assert (
        caught.value.message == f"signature image is {len(data)} bytes, more than {len(data) - 1}"
    )


def test_decode_takes_a_signature_of_exactly_the_pixel_limit() -> None:
    data = png_bytes((200, 100), (0, 0, 0, 255))
    at_limit = Watermarker(font_loader=SignatureFonts(), max_signature_pixels=20_000)
    assert at_limit.decode_signature(data).size == (200, 100)
    one_under = Watermarker(font_loader=SignatureFonts(), max_signature_pixels=19_999)
    with pytest.raises(SignatureInvalid) as caught:
        one_under.decode_signature(data)
    assert caught.value.message == "signature image is 200x100, more than 19999 pixels"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGBA pixels and holds none."""
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def test_decode_refuses_a_decompression_bomb_as_signature_invalid(
    watermarker: Watermarker,
) -> None:
    # 10000 x 10000 is over Pillow's 89 M pixel bomb warning, which is turned into a refusal.
    with pytest.raises(SignatureInvalid) as caught:
        watermarker.decode_signature(png_header_only(10_000, 10_000))
    assert caught.value.message.startswith(
        "signature image cannot be decoded: Image size (100000000 pixels) exceeds limit"
    )


def test_decode_takes_a_png_whose_animation_chunk_pillow_ignores(
    watermarker: Watermarker,
) -> None:
    # An acTL chunk announcing 0 frames: Pillow warns and reads the plain PNG image.
    plain = png_bytes((30, 20), (10, 20, 30, 255))
    header_end = 8 + 8 + 13 + 4  # signature, then IHDR's length, type, data and CRC
    animated = (
        plain[:header_end] + png_chunk(b"acTL", struct.pack(">II", 0, 0)) + plain[header_end:]
    )
    with pytest.warns(UserWarning, match="Invalid APNG"):
        image = watermarker.decode_signature(animated)
    assert (image.mode, image.size, image.getpixel((29, 19))) == (
        "RGBA",
        (30, 20),
        (10, 20, 30, 255),
    )


@pytest.mark.parametrize("mode", ["RGB", "L", "P"])
def test_decode_gives_rgba_whatever_the_png_mode(watermarker: Watermarker, mode: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 4), (255, 255, 255)).convert(mode).save(buffer, format="PNG")
    image = watermarker.decode_signature(buffer.getvalue())
    assert (image.mode, image.size, image.getpixel((7, 3))) == ("RGBA", (8, 4), (255,) * 4)


def test_stamp_takes_an_rgb_signature_as_opaque(watermarker: Watermarker) -> None:
    config = SignatureConfig(position="top-left", size="large", opacity=1.0)
    mark = Image.new("RGB", (10, 10), (255, 0, 0))
    stamped = watermarker.stamp(Image.new("RGB", (200, 200), BLACK), SignatureSpec(config), mark)
    # large = 70 px on 200, margin 6.
    assert stamped.getpixel((40, 40)) == (255, 0, 0)
    assert stamped.getpixel((5, 40)) == BLACK and stamped.getpixel((76, 40)) == BLACK


def test_mark_is_resampled_with_lanczos(watermarker: Watermarker) -> None:
    # A 10 px mark, white then black, scaled up 7 times: Lanczos's values across the edge.
    mark = Image.new("RGBA", (10, 10), (255, 255, 255, 255))
    mark.paste((0, 0, 0, 255), (5, 0, 10, 10))
    config = SignatureConfig(position="top-left", size="large", opacity=1.0)
    stamped = watermarker.stamp(
        Image.new("RGB", (200, 200), (0, 0, 255)), SignatureSpec(config), mark
    )
    row = [stamped.getpixel((x, 20)) for x in range(38, 44)]
    assert row == [(value, value, value) for value in (228, 192, 150, 105, 63, 27)]


# --- text layout: font size, outline and the inked box ------------------------------------------


@pytest.mark.parametrize(
    ("text", "font_px", "stroke"),
    [
        ("x", 256, 18),  # 256 // 14
        ("x" * 9, 28, 2),  # 2 px from 28 px on
        ("x" * 10, 26, 1),
        ("x" * 18, 14, 1),
        ("x" * 19, 13, 1),  # under 14 px: the 1 px floor
    ],
)
def test_outline_is_a_fourteenth_of_the_font_size_at_least_1_px(
    text: str, font_px: int, stroke: int
) -> None:
    fonts = RecordingFonts()
    Watermarker(font_loader=fonts).check_text(text)
    # Probe at 64 px without outline (32 px a character), then the sized font with its outline.
    assert fonts.measured == [(64, 0), (font_px, stroke)]


def test_font_size_follows_the_inked_width_not_the_right_edge() -> None:
    fonts = RecordingFonts(offset=10)  # the ink starts 10 px right of the origin
    Watermarker(font_loader=fonts).check_text("ab")
    assert fonts.sizes == [64, 128]


class OnePixelFont(BoxFont):
    """A fake font whose text is one pixel wide (plus its outline) and inked all over."""

    def getbbox(self, text: str, stroke_width: int = 0) -> tuple[int, int, int, int]:
        return (0, 0, 1 + 2 * stroke_width, self.size)

    def getmask(self, text: str, *args: Any, **kwargs: Any) -> Any:
        """The ink of ``text`` for ``ImageDraw``: a solid box."""
        del text, args, kwargs
        return Image.new("L", (1, self.size), 255).im


@pytest.mark.parametrize(
    ("image_width", "font_px"),
    [
        (3, 64),  # 15 % of 3 px rounds to nothing: still a 1 px target, 64 px for 1 px ink
        (9, 64),  # 15 % of 9 px rounds to 1 px
        (10, 128),  # 15 % of 10 px rounds to 2 px
    ],
)
def test_a_tiny_image_still_asks_for_a_one_pixel_wide_text(image_width: int, font_px: int) -> None:
    fonts = RecordingFonts(OnePixelFont)
    mark = Watermarker(font_loader=fonts).render_text(
        "i", image_width, SignatureConfig("top-left", "small")
    )
    assert fonts.sizes == [64, font_px] and mark.size == (1 + 2 * (font_px // 14), font_px)


class FixedBoxFont:
    """A fake font whose inked box is always ``box``."""

    def __init__(self, box: tuple[int, int, int, int]) -> None:
        self.box = box

    def getbbox(self, text: str, stroke_width: int = 0) -> tuple[int, int, int, int]:
        """``box``, whatever the text."""
        del text, stroke_width
        return self.box


def probe_then(box: tuple[int, int, int, int]) -> Callable[[int], Any]:
    """Fonts that measure normally at the 64 px probe and give ``box`` at the drawing size."""
    return lambda size: BoxFont(size) if size == 64 else FixedBoxFont(box)


@pytest.mark.parametrize(
    "box", [(5, 0, 5, 10), (0, 5, 10, 5), (5, 5, 4, 10), (0, 5, 10, 4)], ids=str
)
def test_text_with_no_ink_at_its_drawing_size_is_signature_invalid(
    box: tuple[int, int, int, int],
) -> None:
    marker = Watermarker(font_loader=RecordingFonts(probe_then(box)))
    with pytest.raises(SignatureInvalid) as caught:
        marker.check_text("Ana")
    assert caught.value.message == "signature text 'Ana' has nothing to draw"


def test_text_with_one_pixel_of_ink_at_its_drawing_size_is_accepted() -> None:
    fonts = RecordingFonts(probe_then((7, 7, 8, 8)))
    Watermarker(font_loader=fonts).check_text("Ana")
    assert fonts.sizes == [64, 85]  # "Ana" is 96 px at the probe: 64 * 128 / 96


def reference_drawing(text: str, font: Any, stroke: int) -> Image.Image:
    """``text`` drawn with room to spare, light with a dark outline, cropped to its ink."""
    canvas = Image.new("RGBA", (2000, 1000), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (500, 300),
        text,
        font=font,
        fill=(255, 255, 255, 255),
        stroke_width=stroke,
        stroke_fill=(0, 0, 0, 255),
    )
    return canvas.crop(canvas.getbbox())


@pytest.mark.parametrize(
    ("text", "image_width", "size"),
    [("Ana Rivera", 512, "small"), ("Ana Rivera", 1024, "large"), ("lj", 512, "medium")],
)
def test_text_mark_is_the_fonts_inked_box_with_all_the_ink(
    text: str, image_width: int, size: str
) -> None:
    fonts = RecordingFonts(SignatureFonts())
    mark = Watermarker(font_loader=fonts).render_text(text, image_width, SignatureConfig(size=size))
    font = SignatureFonts()(fonts.sizes[-1])
    stroke = max(1, fonts.sizes[-1] // 14)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    assert mark.size == (right - left, bottom - top)
    inked = mark.crop(mark.getbbox())
    assert inked.tobytes() == reference_drawing(text, font, stroke).tobytes()


def test_text_mark_is_white_with_a_black_outline_on_clear_pixels(
    watermarker: Watermarker,
) -> None:
    mark = watermarker.render_text("Ana Rivera", 512, SignatureConfig(size="large"))
    pixels = [mark.getpixel((x, y)) for x in range(mark.width) for y in range(mark.height)]
    assert (255, 255, 255, 255) in pixels and (0, 0, 0, 255) in pixels
    assert all(red == green == blue for red, green, blue, _ in pixels)  # no colour cast
    clear = [pixel for pixel in pixels if pixel[3] == 0]
    assert clear and set(clear) == {(0, 0, 0, 0)}
