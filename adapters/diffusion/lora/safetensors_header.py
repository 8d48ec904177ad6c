"""The safetensors header, read and checked with strict bounds before any tensor is read.

A safetensors file starts with an 8-byte little-endian length and a JSON header; that header is
read here with a length cap, no duplicate keys, offsets contiguous and inside the file, and byte
counts that match dtype x shape. ``read_safetensors`` reads the tensors of a file that passed.

torch is imported only inside ``read_safetensors``: the validator reads headers alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.diffusion.lora.files import check_lora_file_name
from domain.errors import LoraInvalid

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 4 * 1024 * 1024
"""Largest safetensors JSON header parsed; a full SD 1.5 LoRA with kohya metadata needs < 1 MB."""
MAX_TENSORS = 16_384
MAX_DIMS = 8
MAX_DIM_SIZE = 1 << 31

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
"""Bytes per element of every safetensors dtype this reader understands."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; ``start``/``end`` are offsets in the data part."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's checked header: its tensors, its metadata and its sizes."""

    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    header_bytes: int
    file_bytes: int


class Malformed(ValueError):
    """Why a header (or other JSON read with ``strict_json``) is not valid; the caller turns it
    into LORA_INVALID with the file name."""


def read_safetensors_header(
    path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Read and check the header of ``path`` without reading any tensor; LORA_INVALID if bad.

    At most ``8 + max_header_bytes`` bytes are read, whatever the file claims.
    """
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise Malformed(f"{size} bytes is too short for a safetensors header")
            length = int.from_bytes(prefix, "little")
            if length > max_header_bytes:
                raise Malformed(
                    f"header length {length} exceeds the limit of {max_header_bytes} bytes"
                )
            if length > size - 8:
                raise Malformed(
                    f"header length {length} runs past the end of the file ({size} bytes)"
                )
            raw = stream.read(length)
            if len(raw) != length:
                raise Malformed("the file ended inside its header")
        return _parse_header(raw, size)
    except Malformed as exc:
        raise LoraInvalid(f"{path.name} is not a valid safetensors file: {exc}") from None
    except OSError as exc:
        raise LoraInvalid(f"{path.name} cannot be read: {exc.strerror or exc}") from exc


def _parse_header(raw: bytes, file_bytes: int) -> SafetensorsHeader:
    if not raw.startswith(b"{"):
        raise Malformed("the header is not a JSON object")
    document = strict_json(raw, "the header")
    if not isinstance(document, dict):
        raise Malformed("the header is not a JSON object")
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorEntry] = {}
    for name, entry in document.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(value, str) for value in entry.values()
            ):
                raise Malformed("__metadata__ must map strings to strings")
            metadata = entry
            continue
        if len(tensors) >= MAX_TENSORS:
            raise Malformed(f"more than {MAX_TENSORS} tensors")
        tensors[name] = _tensor_entry(name, entry)
    data_bytes = file_bytes - 8 - len(raw)
    cursor = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start < cursor:
            raise Malformed(
                f"tensor {name!r} overlaps the previous tensor (starts at {entry.start},"
                f" before {cursor})"
            )
        if entry.start > cursor:
            raise Malformed(f"bytes {cursor}..{entry.start} before tensor {name!r} are unused")
        cursor = entry.end
    if cursor > data_bytes:
        raise Malformed(
            f"tensor data ends at byte {cursor} but the file holds {data_bytes} data bytes"
            " (truncated?)"
        )
    if cursor < data_bytes:
        raise Malformed(f"{data_bytes - cursor} bytes after the last tensor are unused")
    return SafetensorsHeader(
        tensors=tensors, metadata=metadata, header_bytes=len(raw), file_bytes=file_bytes
    )


def _tensor_entry(name: str, entry: object) -> TensorEntry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise Malformed(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise Malformed(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(is_int(dim) and 0 <= dim < MAX_DIM_SIZE for dim in shape)
    ):
        raise Malformed(f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(offset) for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise Malformed(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    needed = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - start != needed:
        raise Malformed(
            f"tensor {name!r} spans {end - start} bytes but {dtype} x {shape} needs {needed}"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), start=start, end=end)


def strict_json(raw: bytes, what: str) -> Any:
    """JSON without duplicate keys, NaN or Infinity; any failure is a ``Malformed``."""
    try:
        return json.loads(
            raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as exc:
        raise Malformed(f"{what} is not valid JSON: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def is_int(value: object) -> bool:
    """Whether ``value`` is an int (JSON's integers), a bool not being one."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_safetensors(path: Path) -> SafetensorsHeader:
    """Refuse anything but a well-formed safetensors file with tensors, never unpickling it."""
    check_lora_file_name(path.name)
    header = read_safetensors_header(path)
    if not header.tensors:
        raise LoraInvalid(f"{path.name} holds no tensors")
    return header


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checked safetensors file.

    Read with ``pread``: the default mmap backend of safetensors 0.8 keeps about 55 bytes of
    Python objects per tensor for the life of the process, a slow creep over thousands of loads.
    """
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel

    check_safetensors(path)
    return load_file(str(path), backend="pread")
