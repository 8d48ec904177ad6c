"""An invisible mark that carries a generation id through JPEG, resizes and small crops.

The pixels keep a trace of the generation even when the file's metadata is stripped. How it works,
what it promises and what it does not, with measurements: docs/invisible-mark.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from reedsolo import ReedSolomonError, RSCodec

METHOD = "dwt-dct-svd-rs/1"
"""The method and its version; stored in metadata next to the mark. A change of layout, codeword or
keyed patterns is a new version, since old marks would no longer read."""

ID_BITS = 40
"""Generation ids from 0 to 2**40 - 1 (about 10**12): five bytes of the codeword."""

MAGIC = 0xA7
"""The codeword's first byte, fixed per version: a foreign or random word must also match it."""

PARITY_BYTES = 14
"""Reed-Solomon parity: corrects up to 7 byte errors in the 20-byte codeword (magic, 5 id
bytes, 14 parity)."""

MAX_CORRECTED = PARITY_BYTES // 2 - 1
"""Byte errors accepted, one below what the code corrects: a random word decodes far more rarely."""

TILE = 16
"""Cells per side of the tile that repeats over the image; 160 of its 256 cells carry the
codeword, the other 96 a keyed sync pattern that locates the tile after a crop."""

CELL = 2
"""Blocks per side of a cell: neighbouring blocks carry the same bit."""

PERIOD = TILE * CELL
"""Blocks per side of the tile."""

BLOCK_PX = 8
"""A 4x4 block of the haar LL band covers 8x8 pixels."""

TILE_PX = PERIOD * BLOCK_PX

MIN_SIDE = TILE_PX
"""The smallest side embed accepts (256 px): one whole tile, the worker's smallest image. A crop
of an image this small loses cells of the tile; from 512 px on, a 10% crop keeps them all."""

DEFAULT_STRENGTH = 44.0
"""QIM step on each block's largest singular value (imwatermark's scale); about 44 dB PSNR."""

SCALES = (1.0, 4 / 3, 2.0)
"""Upscalings the decoder always tries: the copy as is, a 75% resize and a 50% resize undone."""

ORIGINAL_SIDES = (512, 1024)
"""Sides the worker generates; a copy's side is also tried scaled back to each (a 90% resize)."""

SEARCH_PX = 768
"""Side of the central window where the decoder searches the block grid's offset; it reads one
block per cell there (a quarter of the blocks), which keeps the search fast."""

MIN_SYNC_Z = 6.0
"""Sync correlation peak, in standard deviations of the other shifts, below which no word is
read: unmarked images measure below 5.5 (docs/invisible-mark.md), marks 10 to 12."""

CANDIDATES = 3
"""Best (scale, offset) candidates whose codeword the decoder tries."""

_POWER_STEPS = 3
_CODEWORD_BYTES = 1 + ID_BITS // 8 + PARITY_BYTES
_CODEWORD_BITS = 8 * _CODEWORD_BYTES
_CODEC = RSCodec(PARITY_BYTES)

# BT.601 analog YUV; the mark lives in U (blue difference), which brightness changes leave alone.
_RGB_TO_YUV = np.array(
    [[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]]
)
_U_FROM_RGB = _RGB_TO_YUV[1].astype(np.float32)
_RGB_PER_U = np.linalg.inv(_RGB_TO_YUV)[:, 1].astype(np.float32)
_U_OFFSET = 128.0
HEADROOM = np.array([0.0, 2.0, 8.0], dtype=np.float32)
"""Levels per RGB channel the mark moves a pixel at most (U changes by up to about 3.5 levels:
blue 2.03 and green -0.39 per level, red not at all). A pixel closer than this to 0 or 255 clips
the mark away: a white background reads nothing until ``with_headroom`` makes room."""


@dataclass(frozen=True)
class MarkReading:
    """What decode found: the generation id, or None where no mark could be read."""

    generation_id: int | None
    status: str
    confidence: float
    detail: Mapping[str, Any] = field(default_factory=dict)


def _keyed_bytes(label: str, count: int) -> np.ndarray:
    """Deterministic pseudo-random bytes for this method version (sha256, stable forever)."""
    out = bytearray()
    counter = 0
    while len(out) < count:
        out += hashlib.sha256(f"{METHOD}:{label}:{counter}".encode()).digest()
        counter += 1
    return np.frombuffer(bytes(out[:count]), dtype=np.uint8)


def _keyed_permutation(label: str, size: int) -> np.ndarray:
    return np.argsort(_keyed_bytes(label, 4 * size).view(">u4"), kind="stable")


def _sync_pattern() -> np.ndarray:
    """The keyed sync pattern: +1 or -1 on the sync cells (half each), 0 on the codeword cells."""
    pattern = np.zeros(TILE * TILE, dtype=np.float32)
    signs = _keyed_permutation("sync", _SYNC_CELLS.size) % 2 == 0
    pattern[_SYNC_CELLS] = np.where(signs, 1.0, -1.0)
    return pattern.reshape(TILE, TILE)


_CELLS = _keyed_permutation("cells", TILE * TILE)
_PAYLOAD_CELLS = _CELLS[:_CODEWORD_BITS]
_SYNC_CELLS = _CELLS[_CODEWORD_BITS:]
_WHITENING = np.unpackbits(_keyed_bytes("whitening", _CODEWORD_BYTES))
_SYNC = _sync_pattern()
_CELL_SYNC_SPECTRUM = np.conj(np.fft.fft2(_SYNC))
_BLOCK_SYNC_SPECTRUM = np.conj(np.fft.fft2(np.kron(_SYNC, np.ones((CELL, CELL), np.float32))))


def with_headroom(image: Image.Image) -> Image.Image:
    """The image with every channel kept ``HEADROOM`` levels from 0 and 255 (RGB): what a
    saturated picture (white or pure blue backgrounds) needs to carry the mark. Only pixels that
    close to the ends change, by at most 8 levels of blue."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    kept = np.clip(rgb, HEADROOM, np.float32(255) - HEADROOM)
    return Image.fromarray(kept.astype(np.uint8), "RGB")


def _u_plane(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return rgb @ _U_FROM_RGB + np.float32(_U_OFFSET)


def _low_band(plane: np.ndarray) -> np.ndarray:
    """The haar LL band of a plane: each 2x2 pixel square summed, halved (orthonormal haar)."""
    low = plane[..., 0::2, 0::2] + plane[..., 1::2, 0::2] + plane[..., 0::2, 1::2]
    return (low + plane[..., 1::2, 1::2]) * np.float32(0.5)


def _blocks(low: np.ndarray) -> np.ndarray:
    """The 4x4 blocks of an LL band (..., 4 rows, 4 cols), laid out plane by plane as
    (4, 4, ..., rows, cols) so that per-block arithmetic is whole-array arithmetic."""
    rows, cols = low.shape[-2] // 4, low.shape[-1] // 4
    low = low.reshape(*low.shape[:-2], rows, 4, cols, 4)
    return np.ascontiguousarray(np.moveaxis(low, (-3, -1), (0, 1)))


def _unblocks(blocks: np.ndarray) -> np.ndarray:
    """The LL band, (rows * 4, cols * 4), of (4, 4, rows, cols) blocks."""
    rows, cols = blocks.shape[2:]
    return blocks.transpose(2, 0, 3, 1).reshape(rows * 4, cols * 4)


def _top_singular(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Largest singular value and vectors of each 4x4 block, by power iteration.

    A block's DCT has the same singular values (the DCT is orthonormal), so this is the
    DWT-DCT-SVD quantity without the DCT; the U plane's offset keeps the top value dominant, so a
    few steps from the all-ones vector converge.
    """
    gram = np.empty_like(blocks)
    for i in range(4):
        for k in range(i, 4):
            gram[i, k] = gram[k, i] = (blocks[:, i] * blocks[:, k]).sum(axis=0)
    right = gram.sum(axis=1)
    for _ in range(_POWER_STEPS):
        right /= np.sqrt((right * right).sum(axis=0))
        right = _times(gram, right)
    right /= np.sqrt((right * right).sum(axis=0))
    image = _times(blocks, right)
    value = np.sqrt((image * image).sum(axis=0))
    return value, image / value, right


def _times(matrices: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Matrix times vector for every block: (4, 4, ...) by (4, ...)."""
    return sum(matrices[:, j] * vectors[j] for j in range(4))


def _fold(soft: np.ndarray, period: int) -> np.ndarray:
    """Mean soft bit per position in the tile, (..., rows, cols) -> (..., period, period); 0 at a
    position the image does not cover."""
    rows, cols = soft.shape[-2:]
    pad = [(0, 0)] * (soft.ndim - 2) + [(0, -rows % period), (0, -cols % period)]
    sums = np.pad(soft, pad)
    counts = np.pad(np.ones((rows, cols), dtype=soft.dtype), pad[-2:])
    shape = (sums.shape[-2] // period, period, sums.shape[-1] // period, period)
    sums = sums.reshape(*soft.shape[:-2], *shape).sum(axis=(-4, -2))
    return sums / np.maximum(counts.reshape(shape).sum(axis=(0, 2)), 1)


def _sync_peak(
    tiles: np.ndarray, spectrum: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cyclic correlation peak of folded tiles with the sync pattern (given as its conjugate
    spectrum), as (z-score against the other shifts, peak value, flat index of the shift)."""
    corr = np.fft.ifft2(np.fft.fft2(tiles) * spectrum).real
    flat = corr.reshape(*tiles.shape[:-2], -1)
    shift = flat.argmax(axis=-1)
    peak = np.take_along_axis(flat, shift[..., None], axis=-1)[..., 0]
    count = flat.shape[-1] - 1
    mean = (flat.sum(axis=-1) - peak) / count
    var = ((flat**2).sum(axis=-1) - peak**2) / count - mean**2
    return (peak - mean) / np.sqrt(np.maximum(var, 1e-12)), peak, shift


def _scales(height: int, width: int) -> list[float]:
    """Upscalings to try for a copy of this size: the fixed ones, then back to an original side."""
    scales = list(SCALES)
    for side in (width, height):
        for original in ORIGINAL_SIDES:
            guess = original / side
            if 1.0 < guess <= max(SCALES) and all(abs(guess / s - 1) > 0.005 for s in scales):
                scales.append(guess)
    return scales


def _rescaled(plane: np.ndarray, scale: float) -> np.ndarray:
    """The plane resized by this factor (bicubic), or itself at 1."""
    if scale == 1.0:
        return plane
    size = (round(plane.shape[1] * scale), round(plane.shape[0] * scale))
    return np.asarray(Image.fromarray(plane, "F").resize(size, Image.Resampling.BICUBIC))


class InvisibleMark:
    """Embeds a generation id in an RGB image's pixels and reads it back from a copy."""

    def __init__(self, *, strength: float = DEFAULT_STRENGTH) -> None:
        if strength <= 0:
            raise ValueError(f"strength must be positive, got {strength!r}")
        self._step = float(strength)

    @property
    def method(self) -> str:
        """The method and version name that metadata records next to the mark."""
        return METHOD

    def payload_bits(self) -> int:
        """How many bits of generation id the mark carries."""
        return ID_BITS

    def embed(self, image: Image.Image, generation_id: int) -> Image.Image:
        """The image with the id marked in it: RGB, same size, the change invisible to the eye."""
        if isinstance(generation_id, bool) or not isinstance(generation_id, int):
            raise ValueError(f"generation_id must be an int, got {generation_id!r}")
        if not 0 <= generation_id < 2**ID_BITS:
            raise ValueError(f"generation_id must be in [0, 2**{ID_BITS}), got {generation_id}")
        if min(image.size) < MIN_SIDE:
            raise ValueError(
                f"image {image.size[0]}x{image.size[1]} is too small for the invisible mark: "
                f"each side needs at least {MIN_SIDE} pixels"
            )
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        height, width = (rgb.shape[0] // BLOCK_PX) * BLOCK_PX, (rgb.shape[1] // BLOCK_PX) * BLOCK_PX
        blocks = _blocks(_low_band(rgb[:height, :width] @ _U_FROM_RGB + np.float32(_U_OFFSET)))
        low = _unblocks(self._quantized(blocks, _tile_bits(generation_id))) * np.float32(0.5)
        plane = np.repeat(np.repeat(low, 2, axis=0), 2, axis=1)
        out = rgb.copy()
        out[:height, :width] += plane[..., None] * _RGB_PER_U
        return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")

    def reads(self, image: Image.Image, generation_id: int) -> bool:
        """Whether an exact copy of a marked image (as embedded: no crop, no resize) reads
        ``generation_id``: the check after embedding, a few milliseconds."""
        found = self._read(_u_plane(image), (0, 0))
        return found is not None and found[0] == generation_id

    def decode(self, image: Image.Image) -> MarkReading:
        """The id marked in the image, or a reading with status "none"; never a wrong id."""
        plane = _u_plane(image)
        tried, best = 0, 0.0
        for scale in _scales(*plane.shape):
            scaled = _rescaled(plane, scale)
            if min(scaled.shape) < TILE_PX // 2:
                continue
            candidates = sorted(self._search(scaled), reverse=True)[:CANDIDATES]
            best = max(best, max(z for _, z, _ in candidates))
            for _, sync_z, offset in candidates:
                if sync_z < MIN_SYNC_Z:
                    continue
                tried += 1
                reading = self._read(scaled, offset)
                if reading is not None:
                    generation_id, confidence, detail = reading
                    detail |= {"scale": scale, "offset": offset, "candidates_tried": tried}
                    return MarkReading(generation_id, "found", confidence, detail)
        return MarkReading(None, "none", 0.0, {"best_sync_z": best, "candidates_tried": tried})

    def _search(self, plane: np.ndarray) -> list[tuple[float, float, tuple[int, int]]]:
        """Sync (peak, z-score, offset) at each of the 64 block-grid offsets, in a central window
        of the plane. The peak ranks offsets (the strongest aligned signal); the z-score, which
        saturates near the true offset, says whether there is a mark at all.

        Reads the first block of every 2x2 group: one block per cell whatever the tile's shift.
        """
        span = 2 * BLOCK_PX
        height, width = (min(side, SEARCH_PX + span) for side in plane.shape)
        top, left = (plane.shape[0] - height) // 2, (plane.shape[1] - width) // 2
        offsets = [(dy, dx) for dy in range(BLOCK_PX) for dx in range(BLOCK_PX)]
        low = _sampled_low_bands(plane[top : top + height, left : left + width], offsets)
        value, _, _ = _top_singular(_blocks(low))
        sync_z, peak, _ = _sync_peak(_fold(self._soft(value), TILE), _CELL_SYNC_SPECTRUM)
        return [
            (float(p), float(z), ((top + dy) % BLOCK_PX, (left + dx) % BLOCK_PX))
            for p, z, (dy, dx) in zip(peak, sync_z, offsets)
        ]

    def _read(
        self, plane: np.ndarray, offset: tuple[int, int]
    ) -> tuple[int, float, dict[str, Any]] | None:
        """The codeword at this block-grid offset, corrected and checked, or None."""
        rows = (plane.shape[0] - offset[0]) // BLOCK_PX * BLOCK_PX
        cols = (plane.shape[1] - offset[1]) // BLOCK_PX * BLOCK_PX
        low = _low_band(plane[offset[0] : offset[0] + rows, offset[1] : offset[1] + cols])
        tile = _fold(self._soft(_top_singular(_blocks(low))[0]), PERIOD)
        sync_z, _, shift = _sync_peak(tile, _BLOCK_SYNC_SPECTRUM)
        aligned = np.roll(tile, (-(int(shift) // PERIOD), -(int(shift) % PERIOD)), axis=(0, 1))
        cells = aligned.reshape(TILE, CELL, TILE, CELL).mean(axis=(1, 3))
        found = _corrected(cells.reshape(-1)[_PAYLOAD_CELLS])
        if found is None:
            return None
        generation_id, confidence, corrected = found
        return generation_id, confidence, {"sync_z": float(sync_z), "corrected_bytes": corrected}

    def _quantized(self, blocks: np.ndarray, tile: np.ndarray) -> np.ndarray:
        """The change to each block that moves its top singular value to the nearest point of
        its bit's lattice (QIM): k + 1/4 steps for a 0, k + 3/4 for a 1."""
        value, left, right = _top_singular(blocks)
        rows, cols = blocks.shape[2:]
        bits = tile[
            np.arange(rows)[:, None] // CELL % TILE, np.arange(cols)[None, :] // CELL % TILE
        ]
        centre = 0.25 + 0.5 * bits
        target = (np.round(value / self._step - centre) + centre) * self._step
        return (target - value) * left[:, None] * right[None, :]

    def _soft(self, value: np.ndarray) -> np.ndarray:
        """Soft bit per block from its QIM residual: +1 at a 1's lattice point, -1 at a 0's."""
        return -np.sin(value * np.float32(2 * np.pi / self._step))


def _sampled_low_bands(window: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Per pixel offset of the block grid, the LL band of the first block of each 2x2 group of
    blocks (one block per tile cell), stacked: (offsets, rows * 4, cols * 4)."""
    span = 2 * BLOCK_PX
    pairs = window[:-1, :-1] + window[1:, :-1] + window[:-1, 1:] + window[1:, 1:]
    pairs *= np.float32(0.5)
    rows, cols = (window.shape[0] - span) // span, (window.shape[1] - span) // span
    return np.stack(
        [
            pairs[dy : dy + rows * span, dx : dx + cols * span]
            .reshape(rows, span, cols, span)[:, 0:BLOCK_PX:2, :, 0:BLOCK_PX:2]
            .reshape(rows * 4, cols * 4)
            for dy, dx in offsets
        ]
    )


def _corrected(soft: np.ndarray) -> tuple[int, float, int] | None:
    """(id, confidence, bytes corrected) from the codeword's soft bits, or None when the word
    does not decode, has the wrong magic, or needed more corrections than accepted.

    The confidence is the soft bits' agreement with the corrected codeword, 0..1.
    """
    word = np.packbits((soft > 0).astype(np.uint8) ^ _WHITENING).tobytes()
    try:
        message, codeword, errata = _CODEC.decode(bytearray(word))
    except ReedSolomonError:
        return None
    if message[0] != MAGIC or len(errata) > MAX_CORRECTED:
        return None
    expected = np.unpackbits(np.frombuffer(bytes(codeword), dtype=np.uint8)) ^ _WHITENING
    agreement = np.where(expected == 1, soft, -soft).sum() / max(np.abs(soft).sum(), 1e-9)
    return int.from_bytes(bytes(message[1:]), "big"), float(np.clip(agreement, 0, 1)), len(errata)


def _tile_bits(generation_id: int) -> np.ndarray:
    """The (TILE, TILE) bits of the tile: whitened codeword cells and sync cells."""
    message = bytes([MAGIC]) + generation_id.to_bytes(ID_BITS // 8, "big")
    codeword = np.frombuffer(bytes(_CODEC.encode(message)), dtype=np.uint8)
    tile = np.zeros(TILE * TILE, dtype=np.float32)
    tile[_PAYLOAD_CELLS] = np.unpackbits(codeword) ^ _WHITENING
    tile[_SYNC_CELLS] = _SYNC.reshape(-1)[_SYNC_CELLS] > 0
    return tile.reshape(TILE, TILE)
