"""Safe LoRA files: safetensors only, checked from their header before any tensor is read.

A LoRA comes from an artist's upload, so it is hostile until proven otherwise. Pickle formats
(.bin, .ckpt, .pt, .pth) run code when loaded and are never opened. A safetensors file starts
with an 8-byte little-endian length and a JSON header; that header is read here with strict
bounds (length cap, no duplicate keys, offsets contiguous and inside the file, byte counts that
match dtype x shape), then every tensor name must be a LoRA tensor of a known layout whose
shape fits the base model's layer. Only then may the model load the file.

Layouts accepted (what diffusers and peft can load for SD 1.5):

- diffusers single file: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (also the older
  ``.lora.down.weight`` / ``.lora.up.weight``, ``.lora_linear_layer.*`` and attention-processor
  ``.processor.to_q_lora.down.weight`` names), and the same under ``text_encoder.``;
- kohya single file: ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` and ``lora_te_...``;
- PEFT folder: ``adapter_config.json`` + ``adapter_model.safetensors`` with
  ``base_model.model.<module>.lora_A.weight`` keys (UNet only).

torch is imported only inside the two functions that need it (the layer index and
``read_safetensors``): the storage adapters share the name checks here, and the container must
stay importable without torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from domain.errors import LoraInvalid

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})
SAFETENSORS_SUFFIX = ".safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
"""Largest LoRA accepted (file, or PEFT folder's two files): SD 1.5 LoRAs are 2-300 MB."""
DEFAULT_MAX_RANK = 256
"""Largest LoRA rank accepted; bounds the memory one adapter can take."""
MAX_HEADER_BYTES = 4 * 1024 * 1024
"""Largest safetensors JSON header parsed; a full SD 1.5 LoRA with kohya metadata needs < 1 MB."""
MAX_TENSORS = 16_384
MAX_DIMS = 8
MAX_DIM_SIZE = 1 << 31
MAX_CONFIG_BYTES = 1024 * 1024
"""Largest ``adapter_config.json`` read."""
MAX_LORA_ALPHA = 65_536.0
MAX_MODULE_NAME_CHARS = 300

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
LORA_DTYPES = frozenset({"F16", "BF16", "F32"})
"""What LoRA trainers write. F64 is refused: no trainer emits it, and it would double the
memory of an adapter for nothing; integer and float8 tensors are not LoRA weights."""

LoraFormat = Literal["diffusers", "kohya", "peft"]
Component = Literal["unet", "text_encoder"]

_SIMPLE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
)
_ATTN_PROCESSOR = re.compile(
    r"(?P<parent>.+)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight"
)
_PROCESSOR_PROJECTIONS: dict[str, dict[str, str]] = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_KOHYA = re.compile(
    r"lora_(?P<component>unet|te)_(?P<module>[A-Za-z0-9_]+)"
    r"\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)"
)
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"))
_ADAPTER_MODULE_PARTS = frozenset(
    {
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_dropout",
        "lora_magnitude_vector",
    }
)
"""Sub-modules peft adds inside a wrapped layer; they are not layers of the base model."""
_WRAPPER_PARTS = frozenset({"base_layer", "_orig_mod"})
"""Path parts added by peft (``base_layer``) and ``torch.compile`` (``_orig_mod``)."""


# -- file names -------------------------------------------------------------------------------


def check_lora_file_name(name: str) -> None:
    """Refuse a LoRA file name that is not ``*.safetensors`` (pickle formats named as such)."""
    suffix = Path(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LoraInvalid(
            f"{name}: pickle formats (.bin/.ckpt/.pt/.pth) are refused; use .safetensors"
        )
    if suffix != SAFETENSORS_SUFFIX:
        raise LoraInvalid(f"{name}: only .safetensors LoRA files are accepted")


# -- the safetensors header -------------------------------------------------------------------


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


class _Malformed(ValueError):
    """A reason why a header is not valid safetensors; becomes LORA_INVALID with the file name."""


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
                raise _Malformed(f"{size} bytes is too short for a safetensors header")
            length = int.from_bytes(prefix, "little")
            if length > max_header_bytes:
                raise _Malformed(
                    f"header length {length} exceeds the limit of {max_header_bytes} bytes"
                )
            if length > size - 8:
                raise _Malformed(
                    f"header length {length} runs past the end of the file ({size} bytes)"
                )
            raw = stream.read(length)
            if len(raw) != length:
                raise _Malformed("the file ended inside its header")
        return _parse_header(raw, size)
    except _Malformed as exc:
        raise LoraInvalid(f"{path.name} is not a valid safetensors file: {exc}") from None
    except OSError as exc:
        raise LoraInvalid(f"{path.name} cannot be read: {exc.strerror or exc}") from exc


def _parse_header(raw: bytes, file_bytes: int) -> SafetensorsHeader:
    if not raw.startswith(b"{"):
        raise _Malformed("the header is not a JSON object")
    document = _strict_json(raw, "the header")
    if not isinstance(document, dict):
        raise _Malformed("the header is not a JSON object")
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorEntry] = {}
    for name, entry in document.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(value, str) for value in entry.values()
            ):
                raise _Malformed("__metadata__ must map strings to strings")
            metadata = entry
            continue
        if len(tensors) >= MAX_TENSORS:
            raise _Malformed(f"more than {MAX_TENSORS} tensors")
        tensors[name] = _tensor_entry(name, entry)
    data_bytes = file_bytes - 8 - len(raw)
    cursor = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start < cursor:
            raise _Malformed(
                f"tensor {name!r} overlaps the previous tensor (starts at {entry.start},"
                f" before {cursor})"
            )
        if entry.start > cursor:
            raise _Malformed(f"bytes {cursor}..{entry.start} before tensor {name!r} are unused")
        cursor = entry.end
    if cursor > data_bytes:
        raise _Malformed(
            f"tensor data ends at byte {cursor} but the file holds {data_bytes} data bytes"
            " (truncated?)"
        )
    if cursor < data_bytes:
        raise _Malformed(f"{data_bytes - cursor} bytes after the last tensor are unused")
    return SafetensorsHeader(
        tensors=tensors, metadata=metadata, header_bytes=len(raw), file_bytes=file_bytes
    )


def _tensor_entry(name: str, entry: object) -> TensorEntry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _Malformed(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _Malformed(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_is_int(dim) and 0 <= dim < MAX_DIM_SIZE for dim in shape)
    ):
        raise _Malformed(f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(offset) for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _Malformed(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    needed = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - start != needed:
        raise _Malformed(
            f"tensor {name!r} spans {end - start} bytes but {dtype} x {shape} needs {needed}"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), start=start, end=end)


def _strict_json(raw: bytes, what: str) -> Any:
    """JSON without duplicate keys, NaN or Infinity; any failure is a ``_Malformed``."""
    try:
        return json.loads(
            raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as exc:
        raise _Malformed(f"{what} is not valid JSON: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _is_int(value: object) -> bool:
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


# -- the base model's layers ------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """The shape a LoRA must fit: a Linear (``kernel`` None) or a Conv2d layer."""

    in_features: int
    out_features: int
    kernel: tuple[int, int] | None = None

    def down_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of lora_down / lora_A for this layer at ``rank``."""
        if self.kernel is None:
            return (rank, self.in_features)
        return (rank, self.in_features, *self.kernel)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of lora_up / lora_B for this layer at ``rank``."""
        if self.kernel is None:
            return (self.out_features, rank)
        return (self.out_features, rank, 1, 1)


def layer_shapes(model: torch.nn.Module) -> dict[str, LayerShape]:
    """The Linear and Conv2d layers of ``model`` by module path.

    Paths are those of the plain model: layers wrapped by peft (``<path>.base_layer``) or by
    ``torch.compile`` (``_orig_mod.<path>``) keep their original path, and the LoRA layers peft
    added are left out, so the index is the same before and after adapters are loaded.
    """
    from torch import nn  # pylint: disable=import-outside-toplevel

    shapes: dict[str, LayerShape] = {}
    for name, module in model.named_modules():
        parts = name.split(".") if name else []
        if any(part in _ADAPTER_MODULE_PARTS for part in parts):
            continue
        path = ".".join(part for part in parts if part not in _WRAPPER_PARTS)
        if isinstance(module, nn.Linear):
            shapes[path] = LayerShape(module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            kernel = module.kernel_size
            shapes[path] = LayerShape(
                module.in_channels, module.out_channels, (int(kernel[0]), int(kernel[1]))
            )
    return shapes


def _kohya_names(shapes: Mapping[str, LayerShape]) -> dict[str, str | None]:
    """``path.replace('.', '_')`` -> path; None where two paths collide (ambiguous)."""
    names: dict[str, str | None] = {}
    for path in shapes:
        flat = path.replace(".", "_")
        names[flat] = None if flat in names else path
    return names


# -- the validator ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraLayout:
    """What a validated LoRA holds."""

    format: LoraFormat
    ranks: tuple[int, ...]
    """The distinct ranks of its layers, ascending."""
    target_modules: int
    """How many layers of the base model it changes."""
    tensors: int
    total_bytes: int
    """Bytes on disk (the safetensors file, plus adapter_config.json for a PEFT folder)."""
    text_encoder: bool
    """Whether it changes the text encoder too."""

    @property
    def max_rank(self) -> int:
        """The largest rank of its layers."""
        return self.ranks[-1]


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file with what its name means."""

    name: str
    entry: TensorEntry
    component: Component
    module: str
    part: str  # "down", "up" or "alpha"


@dataclass(frozen=True)
class _LoraConfig:
    """The checked LoRA fields of a PEFT config (or of diffusers' adapter metadata)."""

    rank: int
    targets: tuple[str, ...] | None
    excluded: tuple[str, ...]
    rank_pattern: Mapping[str, int]

    def targets_layer(self, path: str) -> bool:
        """Whether peft would put a LoRA on the layer at ``path`` (list semantics)."""
        if self.targets is None or _matches_any(path, self.excluded):
            return False
        return _matches_any(path, self.targets)

    def rank_of(self, path: str) -> int:
        """The rank peft gives the layer at ``path``: the first matching pattern, else ``r``."""
        for key, rank in self.rank_pattern.items():
            if path == key or path.endswith("." + key):
                return rank
        return self.rank


def _matches_any(path: str, names: Iterable[str]) -> bool:
    return any(path == name or path.endswith("." + name) for name in names)


class LoraValidator:
    """Checks a LoRA file or PEFT folder against the base model before anything loads it.

    Reads only headers and the small JSON config: never a tensor, never a pickle. Built once
    per model (it indexes the layer shapes of ``unet`` and ``text_encoder``) and thread-safe
    afterwards (it keeps no state but that index).
    """

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_rank: int = DEFAULT_MAX_RANK,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self._layers: dict[str, dict[str, LayerShape]] = {"unet": layer_shapes(unet)}
        if text_encoder is not None:
            self._layers["text_encoder"] = layer_shapes(text_encoder)
        # Recent transformers flatten CLIPTextModel (no ``text_model.``); diffusers then strips
        # that prefix from LoRA keys, and so does this check.
        self._flat_text_encoder = text_encoder is not None and not hasattr(
            text_encoder, "text_model"
        )
        self._kohya = {
            component: _kohya_names(shapes) for component, shapes in self._layers.items()
        }
        self.max_bytes = max_bytes
        self.max_rank = max_rank
        self._max_header_bytes = max_header_bytes

    def validate(self, path: Path) -> LoraLayout:
        """The layout of the LoRA at ``path``; LORA_INVALID naming the first problem found."""
        path = Path(path)
        if path.is_dir():
            return self._validate_peft_folder(path)
        check_lora_file_name(path.name)
        if not path.is_file():
            raise LoraInvalid(f"{path.name} is not a file")
        self._check_size(path.name, path.stat().st_size)
        header = self._header(path)
        tensors = [
            self._single_file_tensor(path.name, name, entry)
            for name, entry in header.tensors.items()
        ]
        formats = {fmt for fmt, _ in tensors}
        if len(formats) > 1:
            raise LoraInvalid(f"{path.name} mixes the {' and '.join(sorted(formats))} layouts")
        fmt = formats.pop()
        parsed = [tensor for _, tensor in tensors]
        groups = self._check_groups(path.name, parsed)
        if fmt == "diffusers":
            self._check_diffusers_metadata(path.name, header.metadata, groups)
        return _layout(fmt, groups, len(parsed), header.file_bytes)

    # -- shared checks ------------------------------------------------------------------------

    def _check_size(self, what: str, size: int) -> None:
        if size > self.max_bytes:
            raise LoraInvalid(f"{what} is {size} bytes; the limit is {self.max_bytes}")

    def _header(self, path: Path) -> SafetensorsHeader:
        header = read_safetensors_header(path, max_header_bytes=self._max_header_bytes)
        if not header.tensors:
            raise LoraInvalid(f"{path.name} holds no tensors")
        return header

    def _single_file_tensor(
        self, file: str, name: str, entry: TensorEntry
    ) -> tuple[LoraFormat, _Tensor]:
        if name.startswith(PEFT_PREFIX):
            raise LoraInvalid(
                f"{file}: tensor {name!r} is in the PEFT layout, which a single file cannot"
                f" carry; upload a folder with {PEFT_CONFIG} and {PEFT_WEIGHTS}"
            )
        kohya = _KOHYA.fullmatch(name)
        if kohya is not None:
            component: Component = "unet" if kohya["component"] == "unet" else "text_encoder"
            module = self._kohya_module(file, name, component, kohya["module"])
            return "kohya", self._tensor(
                file, name, entry, component, module, _KOHYA_PARTS[kohya["part"]]
            )
        for component in ("unet", "text_encoder"):
            if name.startswith(component + "."):
                rest = name[len(component) + 1 :].replace(".processor.", ".")
                resolved = _diffusers_module(component, rest)
                if resolved is not None:
                    return "diffusers", self._tensor(file, name, entry, component, *resolved)
        raise _unknown(file, name)

    def _kohya_module(self, file: str, name: str, component: Component, flat: str) -> str:
        names = self._kohya.get(component)
        if names is None:
            raise _no_text_encoder(file, name)
        if component == "text_encoder" and self._flat_text_encoder:
            flat = flat.removeprefix("text_model_")
        if flat not in names:
            raise _no_layer(file, name, component)
        module = names[flat]
        if module is None:
            raise LoraInvalid(
                f"{file}: tensor {name!r} could name several layers of the {component}"
            )
        return module

    def _tensor(
        self, file: str, name: str, entry: TensorEntry, component: Component, module: str, part: str
    ) -> _Tensor:
        if entry.dtype not in LORA_DTYPES:
            raise LoraInvalid(
                f"{file}: tensor {name!r} has dtype {entry.dtype};"
                f" LoRA tensors must be {', '.join(sorted(LORA_DTYPES))}"
            )
        layers = self._layers.get(component)
        if layers is None:
            raise _no_text_encoder(file, name)
        if component == "text_encoder" and self._flat_text_encoder:
            module = module.removeprefix("text_model.")
        if module not in layers:
            raise _no_layer(file, name, component)
        return _Tensor(name=name, entry=entry, component=component, module=module, part=part)

    def _check_groups(self, file: str, tensors: list[_Tensor]) -> dict[tuple[Component, str], int]:
        """Pair the tensors by layer and check their shapes; the rank of each layer."""
        grouped: dict[tuple[Component, str], dict[str, _Tensor]] = {}
        for tensor in tensors:
            parts = grouped.setdefault((tensor.component, tensor.module), {})
            if tensor.part in parts:
                raise LoraInvalid(
                    f"{file}: tensors {parts[tensor.part].name!r} and {tensor.name!r} are both"
                    f" the {tensor.part} weight of {tensor.component}.{tensor.module}"
                )
            parts[tensor.part] = tensor
        ranks: dict[tuple[Component, str], int] = {}
        for (component, module), parts in grouped.items():
            ranks[(component, module)] = self._check_pair(
                file, parts, self._layers[component][module], f"{component}.{module}"
            )
        return ranks

    def _check_pair(
        self, file: str, parts: dict[str, _Tensor], layer: LayerShape, where: str
    ) -> int:
        down, up = parts.get("down"), parts.get("up")
        if down is None or up is None:
            present = next(iter(parts.values()))
            missing = "up" if down is not None else "down"
            raise LoraInvalid(f"{file}: layer {where} has {present.name!r} but no {missing} weight")
        rank = down.entry.shape[0] if down.entry.shape else 0
        if not 1 <= rank <= self.max_rank:
            raise LoraInvalid(
                f"{file}: {down.name!r} has rank {rank}; the limit is {self.max_rank}"
            )
        for tensor, expected in ((down, layer.down_shape(rank)), (up, layer.up_shape(rank))):
            if tensor.entry.shape != expected:
                raise LoraInvalid(
                    f"{file}: tensor {tensor.name!r} has shape {list(tensor.entry.shape)} but"
                    f" the base model's {where} needs {list(expected)}"
                    " (a LoRA for another model?)"
                )
        alpha = parts.get("alpha")
        if alpha is not None and alpha.entry.shape not in ((), (1,)):
            raise LoraInvalid(
                f"{file}: alpha {alpha.name!r} must be a scalar, not shape"
                f" {list(alpha.entry.shape)}"
            )
        return rank

    # -- diffusers metadata -------------------------------------------------------------------

    def _check_diffusers_metadata(
        self, file: str, metadata: Mapping[str, str], ranks: Mapping[tuple[Component, str], int]
    ) -> None:
        """diffusers builds its LoraConfig from this metadata when present: it must agree."""
        raw = metadata.get("lora_adapter_metadata")
        if raw is None:
            return
        try:
            document = _strict_json(raw.encode("utf-8"), "lora_adapter_metadata")
        except _Malformed as exc:
            raise LoraInvalid(f"{file}: {exc}") from None
        if not isinstance(document, dict):
            raise LoraInvalid(f"{file}: lora_adapter_metadata is not a JSON object")
        for component in ("unet", "text_encoder"):
            prefix = component + "."
            fields = {k[len(prefix) :]: v for k, v in document.items() if k.startswith(prefix)}
            layer_ranks = {
                module: rank for (comp, module), rank in ranks.items() if comp == component
            }
            if fields and layer_ranks:
                config = _lora_config(fields, f"{file} lora_adapter_metadata", self.max_rank)
                self._check_config_agrees(file, config, layer_ranks, component)

    # -- PEFT folders -------------------------------------------------------------------------

    def _validate_peft_folder(self, folder: Path) -> LoraLayout:
        name = folder.name
        config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
        if not weights_path.is_file():
            pickled = sorted(
                p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES
            )
            hint = f" ({', '.join(pickled)}: pickle formats are refused)" if pickled else ""
            raise LoraInvalid(f"LoRA folder {name} must hold {PEFT_WEIGHTS}{hint}")
        if not config_path.is_file():
            raise LoraInvalid(f"LoRA folder {name} must hold {PEFT_CONFIG}")
        config_bytes = config_path.stat().st_size
        if config_bytes > MAX_CONFIG_BYTES:
            raise LoraInvalid(
                f"{name}/{PEFT_CONFIG} is {config_bytes} bytes; the limit is {MAX_CONFIG_BYTES}"
            )
        weights_bytes = weights_path.stat().st_size
        self._check_size(f"LoRA folder {name}", config_bytes + weights_bytes)
        config = self._peft_config(config_path)
        header = self._header(weights_path)
        tensors = [
            self._peft_tensor(PEFT_WEIGHTS, key, entry) for key, entry in header.tensors.items()
        ]
        ranks = self._check_groups(PEFT_WEIGHTS, tensors)
        layer_ranks = {module: rank for (_, module), rank in ranks.items()}
        self._check_config_agrees(PEFT_WEIGHTS, config, layer_ranks, "unet")
        # Layers the config targets but the file leaves out would keep random weights (the model
        # adapter loads with init_lora_weights=False): refuse rather than draw noise.
        missing = [
            f"{PEFT_PREFIX}{path}.lora_A.weight"
            for path in self._layers["unet"]
            if config.targets_layer(path) and path not in layer_ranks
        ]
        if missing:
            raise LoraInvalid(
                f"PEFT adapter lacks {len(missing)} tensors its config targets,"
                f" e.g. {missing[0]!r}"
            )
        return _layout("peft", ranks, len(tensors), config_bytes + header.file_bytes)

    def _peft_config(self, path: Path) -> _LoraConfig:
        try:
            document = _strict_json(path.read_bytes(), PEFT_CONFIG)
        except _Malformed as exc:
            raise LoraInvalid(f"{path.parent.name}: {exc}") from None
        except OSError as exc:
            raise LoraInvalid(f"{PEFT_CONFIG} cannot be read: {exc.strerror or exc}") from exc
        if not isinstance(document, dict):
            raise LoraInvalid(f"{PEFT_CONFIG} is not a JSON object")
        if document.get("peft_type") != "LORA":
            raise LoraInvalid(
                f"{PEFT_CONFIG} has peft_type {document.get('peft_type')!r}; only LORA is accepted"
            )
        config = _lora_config(document, PEFT_CONFIG, self.max_rank)
        if config.targets is None:
            raise LoraInvalid(f"{PEFT_CONFIG} must list its target_modules")
        return config

    def _peft_tensor(self, file: str, name: str, entry: TensorEntry) -> _Tensor:
        if not name.startswith(PEFT_PREFIX):
            raise _unknown(file, name)
        rest = name[len(PEFT_PREFIX) :].removeprefix("unet.")
        for suffix, part in _PEFT_SUFFIXES:
            if rest.endswith(suffix):
                return self._tensor(file, name, entry, "unet", rest[: -len(suffix)], part)
        raise _unknown(file, name)

    def _check_config_agrees(
        self, file: str, config: _LoraConfig, ranks: Mapping[str, int], component: Component
    ) -> None:
        """Every tensor's layer is targeted at the rank the config gives it; every target exists."""
        for module, rank in ranks.items():
            if config.targets is not None and not config.targets_layer(module):
                raise LoraInvalid(
                    f"{file}: {component}.{module} has LoRA weights but the config's"
                    f" target_modules {list(config.targets)} do not include it"
                )
            expected = config.rank_of(module)
            if rank != expected:
                raise LoraInvalid(
                    f"{file}: {component}.{module} has rank {rank}; the config says {expected}"
                )
        for target in config.targets or ():
            if not any(_matches_any(path, [target]) for path in self._layers[component]):
                raise LoraInvalid(
                    f"{file}: target module {target!r} matches no layer of the base model's"
                    f" {component} (a LoRA for another model?)"
                )


def _diffusers_module(component: str, rest: str) -> tuple[str, str] | None:
    """``(module path, part)`` of a diffusers-layout tensor name without its component prefix."""
    processor = _ATTN_PROCESSOR.fullmatch(rest)
    if processor is not None:
        projection = _PROCESSOR_PROJECTIONS[component][processor["proj"]]
        return f"{processor['parent']}.{projection}", processor["part"]
    for suffix, part in _DIFFUSERS_SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], part
    return None


def _lora_config(fields: Mapping[str, Any], where: str, max_rank: int) -> _LoraConfig:
    """The LoRA fields of a peft config, each checked; LORA_INVALID names a bad one."""
    if "peft_type" in fields and fields["peft_type"] != "LORA":
        raise LoraInvalid(f"{where}: peft_type {fields['peft_type']!r} is not LORA")
    rank = fields.get("r")
    if not _is_int(rank) or not 1 <= rank <= max_rank:
        raise LoraInvalid(f"{where}: r={rank!r} must be an integer from 1 to {max_rank}")
    alpha = fields.get("lora_alpha", rank)
    _check_alpha(alpha, f"{where}: lora_alpha")
    for flag in ("use_dora", "use_rslora"):
        if fields.get(flag) not in (None, True, False):
            raise LoraInvalid(f"{where}: {flag} must be true or false")
    if fields.get("use_dora"):
        raise LoraInvalid(f"{where}: DoRA adapters (use_dora) are not supported")
    for unsupported in ("modules_to_save", "layers_to_transform", "layers_pattern"):
        if fields.get(unsupported) not in (None, [], ""):
            raise LoraInvalid(f"{where}: {unsupported} is not supported")
    targets = fields.get("target_modules")
    if targets is not None:
        targets = _module_names(targets, f"{where}: target_modules")
        if not targets:
            raise LoraInvalid(f"{where}: target_modules is empty")
    excluded = fields.get("exclude_modules")
    rank_pattern = _mapping(fields.get("rank_pattern"), f"{where}: rank_pattern")
    for key, value in rank_pattern.items():
        if not _is_int(value) or not 1 <= value <= max_rank:
            raise LoraInvalid(
                f"{where}: rank_pattern[{key!r}]={value!r} is not from 1 to {max_rank}"
            )
    for key, value in _mapping(fields.get("alpha_pattern"), f"{where}: alpha_pattern").items():
        _check_alpha(value, f"{where}: alpha_pattern[{key!r}]")
    return _LoraConfig(
        rank=rank,
        targets=targets,
        excluded=_module_names(excluded, f"{where}: exclude_modules") if excluded else (),
        rank_pattern=rank_pattern,
    )


def _check_alpha(value: object, what: str) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 < value <= MAX_LORA_ALPHA
    ):
        raise LoraInvalid(
            f"{what}={value!r} must be a number above 0 and at most {MAX_LORA_ALPHA:g}"
        )


def _module_names(value: object, what: str) -> tuple[str, ...]:
    """A list of plain module names; a regular expression (a string) is refused."""
    if isinstance(value, str):
        raise LoraInvalid(
            f"{what} must be a list of module names; a regular expression ({value[:60]!r}) is"
            " not accepted"
        )
    if not isinstance(value, list) or not all(_is_module_name(item) for item in value):
        raise LoraInvalid(f"{what} must be a list of module names like 'to_q' or 'to_out.0'")
    return tuple(value)


def _mapping(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(_is_module_name(key) for key in value):
        raise LoraInvalid(f"{what} must map module names to numbers")
    return value


def _is_module_name(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= MAX_MODULE_NAME_CHARS
        and _SIMPLE_NAME.fullmatch(value) is not None
    )


def _layout(
    fmt: LoraFormat, ranks: Mapping[tuple[Component, str], int], tensors: int, total_bytes: int
) -> LoraLayout:
    return LoraLayout(
        format=fmt,
        ranks=tuple(sorted(set(ranks.values()))),
        target_modules=len(ranks),
        tensors=tensors,
        total_bytes=total_bytes,
        text_encoder=any(component == "text_encoder" for component, _ in ranks),
    )


def _unknown(file: str, name: str) -> LoraInvalid:
    return LoraInvalid(
        f"{file}: unknown tensor name {name!r} (not a LoRA tensor of the diffusers, kohya or"
        " PEFT layout)"
    )


def _no_layer(file: str, name: str, component: str) -> LoraInvalid:
    return LoraInvalid(
        f"{file}: tensor {name!r} names no layer of the base model's {component}"
        " (a LoRA for another model?)"
    )


def _no_text_encoder(file: str, name: str) -> LoraInvalid:
    return LoraInvalid(
        f"{file}: tensor {name!r} is for the text encoder, which this validator was not given"
    )
