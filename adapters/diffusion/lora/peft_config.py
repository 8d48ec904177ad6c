"""The LoRA fields of a peft config, each checked, and which layers such a config targets.

The config is a PEFT folder's ``adapter_config.json``, or the LoRA metadata of a diffusers-layout
file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adapters.diffusion.lora.safetensors_header import is_int
from domain.errors import LoraInvalid

MAX_LORA_ALPHA = 65_536.0
"""Largest ``lora_alpha`` (or ``alpha_pattern`` value) accepted."""
MAX_MODULE_NAME_CHARS = 300
"""Longest module name accepted in ``target_modules`` and the patterns."""

_SIMPLE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class CheckedLoraConfig:
    """The checked LoRA fields of a PEFT config (or of diffusers' adapter metadata)."""

    rank: int
    targets: tuple[str, ...] | None
    excluded: tuple[str, ...]
    rank_pattern: Mapping[str, int]

    def targets_layer(self, path: str) -> bool:
        """Whether peft would put a LoRA on the layer at ``path`` (list semantics)."""
        if self.targets is None or matches_any(path, self.excluded):
            return False
        return matches_any(path, self.targets)

    def rank_of(self, path: str) -> int:
        """The rank peft gives the layer at ``path``: the first matching pattern, else ``r``."""
        for key, rank in self.rank_pattern.items():
            if path == key or path.endswith("." + key):
                return rank
        return self.rank


def matches_any(path: str, names: Iterable[str]) -> bool:
    """Whether the layer at ``path`` is one of ``names`` or ends with one (peft's list match)."""
    return any(path == name or path.endswith("." + name) for name in names)


def check_lora_config(fields: Mapping[str, Any], where: str, max_rank: int) -> CheckedLoraConfig:
    """The LoRA fields of a peft config, each checked; LORA_INVALID names a bad one."""
    if "peft_type" in fields and fields["peft_type"] != "LORA":
        raise LoraInvalid(f"{where}: peft_type {fields['peft_type']!r} is not LORA")
    rank = fields.get("r")
    if not is_int(rank) or not 1 <= rank <= max_rank:
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
        if not is_int(value) or not 1 <= value <= max_rank:
            raise LoraInvalid(
                f"{where}: rank_pattern[{key!r}]={value!r} is not from 1 to {max_rank}"
            )
    for key, value in _mapping(fields.get("alpha_pattern"), f"{where}: alpha_pattern").items():
        _check_alpha(value, f"{where}: alpha_pattern[{key!r}]")
    return CheckedLoraConfig(
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
