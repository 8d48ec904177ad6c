"""Signature geometry and compositing, checked on pixels."""

from __future__ import annotations

import io

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
