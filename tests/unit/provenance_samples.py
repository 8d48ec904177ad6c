"""What the provenance tests share: a generation's facts, a smooth picture, and PNG chunk surgery
(as an attacker would edit a signed file: chunks rewritten with correct CRCs)."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from collections.abc import Callable

from PIL import Image

from ports.provenance import ProvenanceFacts

BASE_FACTS = ProvenanceFacts(
    generation_id=456,
    task_id="t-1",
    style_id=123,
    artist="Ada Lovelace",
    prompt="watercolor, portrait",
    negative_prompt="blurry",
    steps=30,
    guidance_scale=7.5,
    seed=42,
    width=512,
    height=512,
    scheduler="dpmsolver++",
    model="tiny/sd15",
    lora_checksum="cd" * 32,
    lora_scale=1.0,
)


def facts(**changes: object) -> ProvenanceFacts:
    """A generation's facts, with ``changes``."""
    return dataclasses.replace(BASE_FACTS, **changes)  # type: ignore[arg-type]


def scene(size: int = 256) -> Image.Image:
    """A smooth picture (gradients), like a generated one rather than noise."""
    gradient = Image.linear_gradient("L").resize((size, size))
    return Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180)))


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) of each chunk of a PNG."""
    found, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        found.append((png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return found


def assemble(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, each with its length and a correct CRC."""
    body = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in parts
    )
    return b"\x89PNG\r\n\x1a\n" + body


def with_chunk_edited(png: bytes, kind: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    """The PNG with the first chunk of this type edited and its CRC fixed."""
    parts = chunks(png)
    index = next(i for i, (found, _) in enumerate(parts) if found == kind)
    parts[index] = (kind, edit(parts[index][1]))
    return assemble(parts)


def flip_middle_byte(data: bytes) -> bytes:
    """``data`` with one bit of its middle byte flipped."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def one_pixel_changed(png: bytes, at: tuple[int, int] = (10, 20)) -> bytes:
    """``png`` with one pixel inverted in red and its image data re-encoded; every other chunk
    (the manifest and the text chunks) kept byte for byte: a file that still decodes."""
    with Image.open(io.BytesIO(png)) as image:
        pixels = image.convert("RGB")
    red, green, blue = pixels.getpixel(at)  # type: ignore[misc]
    pixels.putpixel(at, (red ^ 0xFF, green, blue))
    buffer = io.BytesIO()
    pixels.save(buffer, "PNG")
    image_data = [part for part in chunks(buffer.getvalue()) if part[0] == b"IDAT"]
    kept = [part for part in chunks(png) if part[0] not in (b"IDAT", b"IEND")]
    return assemble(kept + image_data + [(b"IEND", b"")])
