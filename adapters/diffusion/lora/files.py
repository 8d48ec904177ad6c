"""LoRA file rules: the accepted names and layouts on disk, the size limits, the content checksum.

A LoRA comes from an artist's upload, so it is hostile until proven otherwise. Pickle formats
(.bin, .ckpt, .pt, .pth) run code when loaded and are never opened: a LoRA is one
``.safetensors`` file or a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

No torch here: the storage adapters (which fetch LoRAs) and the container use these rules, and
the container must stay importable without torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from domain.errors import LoraInvalid

PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})
SAFETENSORS_SUFFIX = ".safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
"""The weights file of a PEFT folder (peft's name)."""
PEFT_CONFIG = "adapter_config.json"
"""The config file of a PEFT folder (peft's name)."""
PEFT_PREFIX = "base_model.model."
"""The prefix of every tensor name in a PEFT folder's weights."""

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
"""Largest LoRA accepted (file, or PEFT folder's two files): SD 1.5 LoRAs are 2-300 MB."""
DEFAULT_MAX_RANK = 256
"""Largest LoRA rank accepted; bounds the memory one LoRA can take."""
MAX_CONFIG_BYTES = 1024 * 1024
"""Largest ``adapter_config.json`` read."""


def check_lora_file_name(name: str) -> None:
    """Refuse a LoRA file name that is not ``*.safetensors`` (pickle formats named as such)."""
    suffix = Path(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LoraInvalid(
            f"{name}: pickle formats (.bin/.ckpt/.pt/.pth) are refused; use .safetensors"
        )
    if suffix != SAFETENSORS_SUFFIX:
        raise LoraInvalid(f"{name}: only .safetensors LoRA files are accepted")


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
