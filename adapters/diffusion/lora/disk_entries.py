"""The LoRA disk cache's entries on disk: their folder format and atomic file operations.

Each entry is a folder ``<root>/<digest>/`` holding the payload (a ``.safetensors`` file or a
PEFT folder, under a readable name) and ``entry.json`` (the key, the payload's SHA-256 and size);
the mtime of ``entry.json`` is the entry's last use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from adapters.diffusion.lora.file_lock import FileLock

ENTRY_FILE = "entry.json"
PART_SUFFIX = ".part"
EVICTED_SUFFIX = ".evicted"
DIGEST = re.compile(r"[0-9a-f]{32}")
"""An entry folder's name: its key's digest."""
LOCKS_FOLDER = ".locks"
"""The lock files' folder inside the cache folder."""
_ENTRY_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """A sound entry: its folder's name, its payload, and the payload's checksum and size."""

    digest: str
    payload: Path
    checksum: str
    size_bytes: int


def key_lock(root: Path, digest: str) -> FileLock:
    """The lock on entry ``digest`` of the cache folder ``root``: held to download, hand out or
    evict that entry."""
    return FileLock(root / LOCKS_FOLDER / f"{digest}.lock")


def scan(root: Path) -> list[tuple[int, Entry]]:
    """``(last use in ns, entry)`` of every sound entry in ``root``."""
    found = []
    for child in root.iterdir():
        if DIGEST.fullmatch(child.name) and child.is_dir():
            loaded = read_entry(child)
            if loaded is not None:
                found.append(loaded)
    return found


def payload_name(name: str, *, folder: bool) -> str:
    """A safe single path component from ``name`` (never the entry file, never hidden)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name.rstrip("/").rsplit("/", 1)[-1])[-100:]
    cleaned = cleaned.lstrip(".")
    if not cleaned or cleaned == ENTRY_FILE:
        cleaned = "lora" if folder else "lora.safetensors"
    return cleaned


def write_entry_file(
    path: Path,
    *,
    digest: str,
    source: str,
    versions: tuple[tuple[str, str], ...],
    payload: str,
    folder: bool,
    checksum: str,
    size: int,
) -> None:
    """Write ``entry.json``: the key (digest, source, file versions) and the payload's facts."""
    document = {
        "version": _ENTRY_VERSION,
        "digest": digest,
        "source": source,
        "versions": [list(version) for version in versions],
        "payload": payload,
        "folder": folder,
        "sha256": checksum,
        "bytes": size,
    }
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")


def read_entry(folder: Path) -> tuple[int, Entry] | None:
    """``(last use in ns, entry)`` of an entry folder, or None if anything does not add up.

    The payload's size is compared with the recorded one (cheap), its checksum is not
    recomputed: the entry was checksummed when it was downloaded.
    """
    entry_file = folder / ENTRY_FILE
    try:
        document = json.loads(entry_file.read_text(encoding="utf-8"))
        name, is_folder = document["payload"], document["folder"]
        checksum, size = document["sha256"], document["bytes"]
        sound = (
            document.get("version") == _ENTRY_VERSION
            and document.get("digest") == folder.name
            and isinstance(is_folder, bool)
            and isinstance(name, str)
            and payload_name(name, folder=is_folder) == name
            and re.fullmatch(r"[0-9a-f]{64}", checksum) is not None
        )
        payload = folder / name
        if not sound or not (payload.is_dir() if is_folder else payload.is_file()):
            return None
        if tree_bytes(payload) != size:
            return None
        used_ns = entry_file.stat().st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return used_ns, Entry(folder.name, payload, checksum, size)


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (and ``path``), so a rename publishes data."""
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(child)
    fsync_path(path)


def fsync_path(path: Path) -> None:
    """fsync one file or folder; a folder the file system cannot fsync is let be."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems cannot fsync a folder; the data files were synced
    finally:
        os.close(descriptor)


def set_aside(path: Path) -> Path:
    """Rename ``path`` to a hidden ``.evicted`` name (atomic), to be deleted at leisure."""
    target = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{EVICTED_SUFFIX}")
    os.replace(path, target)
    return target


def remove(path: Path) -> None:
    """Delete a file or a folder tree, whatever is left of it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
