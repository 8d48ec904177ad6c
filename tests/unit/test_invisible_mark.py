"""The invisible mark: the id comes back from marked copies, and never from unmarked images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from adapters.provenance.invisible_mark import (
    ID_BITS,
    METHOD,
    MIN_SIDE,
    InvisibleMark,
    MarkReading,
)

GENERATION_ID = 734_129_884_017
MIN_PSNR_DB = 40.0
"""docs/invisible-mark.md: the default strength measures about 42.5 dB on photographs."""


def smooth_scene(size: int, seed: int) -> Image.Image:  # pylint: disable=too-many-locals
    """A generated picture: a gradient, low-frequency texture and a few soft-edged shapes."""
    rng = np.random.default_rng(seed)
    grid_y, grid_x = np.mgrid[0:size, 0:size] / size
    start, down, across = rng.uniform(30, 225, size=(3, 3))
    base = start + grid_y[..., None] * (down - start) + 0.3 * grid_x[..., None] * (across - start)
    coarse = Image.fromarray(rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8))
    texture = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    picture = Image.fromarray(np.clip(base + 0.35 * (texture - 128), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(5):
        x, y = rng.uniform(0, size, 2)
        radius = rng.uniform(size / 16, size / 4)
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius),
            fill=tuple(rng.integers(0, 256, 3).tolist()),
        )
    return picture.filter(ImageFilter.GaussianBlur(size / 200))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def psnr(original: Image.Image, marked: Image.Image) -> float:
    error = np.asarray(original, dtype=np.float64) - np.asarray(marked, dtype=np.float64)
    return float(10 * np.log10(255.0**2 / np.mean(error**2)))


@pytest.fixture(scope="module")
def mark() -> InvisibleMark:
    return InvisibleMark()


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    return smooth_scene(512, seed=3)


@pytest.fixture(scope="module")
def marked(mark: InvisibleMark, scene: Image.Image) -> Image.Image:
    return mark.embed(scene, GENERATION_ID)


def test_names_the_method_and_carries_forty_bits(mark: InvisibleMark) -> None:
    assert mark.method == METHOD == "dwt-dct-svd-rs/1"
    assert mark.payload_bits() == ID_BITS == 40


def test_round_trip_reads_the_exact_id(
    mark: InvisibleMark, scene: Image.Image, marked: Image.Image
) -> None:
    reading = mark.decode(marked)
    assert reading.generation_id == GENERATION_ID
    assert reading.status == "found"
    assert reading.confidence > 0.9
    assert reading.detail["corrected_bytes"] == 0
    assert marked.mode == "RGB" and marked.size == scene.size


@pytest.mark.parametrize("generation_id", [0, 1, 2**40 - 1])
def test_ids_at_the_ends_of_the_range_round_trip(mark: InvisibleMark, generation_id: int) -> None:
    image = smooth_scene(256, seed=generation_id % 7)
    assert mark.decode(mark.embed(image, generation_id)).generation_id == generation_id


@pytest.mark.parametrize(
    "copy",
    [
        pytest.param(lambda image: jpeg(image, 80), id="jpeg-80"),
        pytest.param(
            lambda image: image.resize((256, 256), Image.Resampling.BICUBIC), id="resize-50%"
        ),
        pytest.param(lambda image: image.crop((26, 26, 487, 487)), id="crop-10%-centre"),
        pytest.param(lambda image: jpeg(image.resize((384, 384)), 90), id="resize-75%-jpeg-90"),
    ],
)
def test_a_copy_still_reads_the_exact_id(mark: InvisibleMark, marked: Image.Image, copy) -> None:
    reading = mark.decode(copy(marked))
    assert (reading.generation_id, reading.status) == (GENERATION_ID, "found")


def test_invisible_enough(scene: Image.Image, marked: Image.Image) -> None:
    assert psnr(scene, marked) > MIN_PSNR_DB


def test_noise_and_an_unmarked_scene_read_none(mark: InvisibleMark, scene: Image.Image) -> None:
    noise = Image.fromarray(
        np.random.default_rng(5).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    )
    for image in (noise, scene):
        assert mark.decode(image) == MarkReading(None, "none", 0.0, mark.decode(image).detail)
        assert mark.decode(image).generation_id is None


def test_two_hundred_unmarked_images_never_read_an_id(mark: InvisibleMark) -> None:
    rng = np.random.default_rng(17)
    read = []
    for index in range(200):
        if index % 2:
            image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
        else:
            image = smooth_scene(256, seed=1000 + index)
        reading = mark.decode(image)
        if reading.generation_id is not None or reading.status != "none":
            read.append((index, reading))
    assert not read, read


def test_re_marking_replaces_the_id(mark: InvisibleMark, marked: Image.Image) -> None:
    # Every block's singular value is quantized again, onto the new id's lattice.
    remarked = mark.embed(marked, 42)
    assert mark.decode(remarked).generation_id == 42
    assert mark.decode(jpeg(remarked, 80)).generation_id == 42


def test_other_modes_are_converted_to_rgb(mark: InvisibleMark, scene: Image.Image) -> None:
    out = mark.embed(scene.convert("RGBA"), 7)
    assert (out.mode, out.size) == ("RGB", scene.size)
    assert mark.decode(out).generation_id == 7


@pytest.mark.parametrize("generation_id", [-1, 2**40, 2**64])
def test_an_id_out_of_range_is_refused_naming_it(
    mark: InvisibleMark, scene: Image.Image, generation_id: int
) -> None:
    with pytest.raises(ValueError, match=str(generation_id)):
        mark.embed(scene, generation_id)


@pytest.mark.parametrize("generation_id", [True, 3.0, "7"])
def test_an_id_that_is_not_an_int_is_refused(
    mark: InvisibleMark, scene: Image.Image, generation_id: object
) -> None:
    with pytest.raises(ValueError, match="generation_id must be an int"):
        mark.embed(scene, generation_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [(MIN_SIDE - 1, 512), (512, MIN_SIDE - 8)])
def test_an_image_too_small_for_the_tile_is_refused_naming_the_minimum(
    mark: InvisibleMark, size: tuple[int, int]
) -> None:
    with pytest.raises(ValueError, match=rf"{size[0]}x{size[1]} .* at least {MIN_SIDE} pixels"):
        mark.embed(Image.new("RGB", size, (90, 120, 200)), 1)


def test_the_smallest_accepted_image_round_trips(mark: InvisibleMark) -> None:
    image = smooth_scene(MIN_SIDE, seed=9)
    assert mark.decode(mark.embed(image, 99)).generation_id == 99


def test_strength_must_be_positive() -> None:
    with pytest.raises(ValueError, match="-1"):
        InvisibleMark(strength=-1)
