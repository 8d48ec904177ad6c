"""LoRA validation against the base model, from the safetensors header, before any tensor loads.

Every tensor must be a LoRA tensor of a known layout whose shape fits the layer it names.
Layouts accepted (what diffusers and peft can load for SD 1.5):

- diffusers single file: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (also the older
  ``.lora.down.weight`` / ``.lora.up.weight``, ``.lora_linear_layer.*`` and attention-processor
  ``.processor.to_q_lora.down.weight`` names), and the same under ``text_encoder.``;
- kohya single file: ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` and ``lora_te_...``;
- PEFT folder: ``adapter_config.json`` + ``adapter_model.safetensors`` with
  ``base_model.model.<module>.lora_A.weight`` keys (UNet only).

Only headers and the small JSON config are read: never a tensor, never a pickle, and no torch
at import (the layer index imports it when built).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from adapters.diffusion.lora.files import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RANK,
    MAX_CONFIG_BYTES,
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    PICKLE_SUFFIXES,
    check_lora_file_name,
)
from adapters.diffusion.lora.layer_shapes import LayerShape, kohya_names, layer_shapes
from adapters.diffusion.lora.peft_config import CheckedLoraConfig, check_lora_config, matches_any
from adapters.diffusion.lora.safetensors_header import (
    MAX_HEADER_BYTES,
    Malformed,
    SafetensorsHeader,
    TensorEntry,
    read_safetensors_header,
    strict_json,
)
from domain.errors import LoraInvalid

if TYPE_CHECKING:
    import torch

LORA_DTYPES = frozenset({"F16", "BF16", "F32"})
"""What LoRA trainers write. F64 is refused: no trainer emits it, and it would double the
memory of a LoRA for nothing; integer and float8 tensors are not LoRA weights."""

LoraFormat = Literal["diffusers", "kohya", "peft"]
Component = Literal["unet", "text_encoder"]

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
        self._kohya = {component: kohya_names(shapes) for component, shapes in self._layers.items()}
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
            document = strict_json(raw.encode("utf-8"), "lora_adapter_metadata")
        except Malformed as exc:
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
                config = check_lora_config(fields, f"{file} lora_adapter_metadata", self.max_rank)
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

    def _peft_config(self, path: Path) -> CheckedLoraConfig:
        try:
            document = strict_json(path.read_bytes(), PEFT_CONFIG)
        except Malformed as exc:
            raise LoraInvalid(f"{path.parent.name}: {exc}") from None
        except OSError as exc:
            raise LoraInvalid(f"{PEFT_CONFIG} cannot be read: {exc.strerror or exc}") from exc
        if not isinstance(document, dict):
            raise LoraInvalid(f"{PEFT_CONFIG} is not a JSON object")
        if document.get("peft_type") != "LORA":
            raise LoraInvalid(
                f"{PEFT_CONFIG} has peft_type {document.get('peft_type')!r}; only LORA is accepted"
            )
        config = check_lora_config(document, PEFT_CONFIG, self.max_rank)
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
        self, file: str, config: CheckedLoraConfig, ranks: Mapping[str, int], component: Component
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
            if not any(matches_any(path, [target]) for path in self._layers[component]):
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
