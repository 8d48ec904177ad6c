"""The LoRA disk cache's sweep at start: what dead processes and earlier versions left behind.

Downloads cut short, set-aside folders, broken entries and unused lock files are removed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from adapters.diffusion.lora.disk_entries import (
    DIGEST,
    EVICTED_SUFFIX,
    LOCKS_FOLDER,
    PART_SUFFIX,
    key_lock,
    read_entry,
    set_aside,
)
from adapters.diffusion.lora.file_lock import FileLock

log = logging.getLogger(__name__)

_PART = re.compile(r"\.([0-9a-f]{32})\..+" + re.escape(PART_SUFFIX))
"""A download's folder, ``.<digest>.<random>.part``."""
_LEGACY_DOWNLOAD = re.compile(r"[0-9a-f]{32}-.+")
"""Files of the earlier download folder (``<digest>-<name>``), removed when found."""


def sweep(root: Path) -> list[Path]:
    """Leftovers in the cache folder ``root`` of dead processes and of earlier versions, set aside
    to be deleted (the caller holds the folder lock)."""
    doomed: list[Path] = []
    for child in root.iterdir():
        name = child.name
        if name == LOCKS_FOLDER:
            continue
        if name.startswith(".") and name.endswith(PART_SUFFIX):
            doomed += _sweep_part(root, child)
        elif name.startswith(".") and name.endswith(EVICTED_SUFFIX):
            log.info("removing the leftover %s from the LoRA cache", name)
            doomed.append(child)
        elif DIGEST.fullmatch(name) and child.is_dir():
            doomed += _sweep_broken_entry(root, child)
        elif _LEGACY_DOWNLOAD.fullmatch(name):
            log.info("removing %s, a download of an earlier version", name)
            doomed.append(child)
        else:
            log.warning("%s in the LoRA cache folder is not a cache entry; left alone", child)
    for lock_file in (root / LOCKS_FOLDER).glob("*.lock"):
        digest = lock_file.name.removesuffix(".lock")
        if DIGEST.fullmatch(digest) and not (root / digest).exists():
            lock = FileLock(lock_file)
            if lock.acquire(blocking=False):
                lock.unlink()  # no entry and no download: a waiter will make a new one
                lock.release()
    return doomed


def _sweep_part(root: Path, part: Path) -> list[Path]:
    """A download's folder, if no live process is downloading that key."""
    match = _PART.fullmatch(part.name)
    lock = key_lock(root, match.group(1)) if match else None
    if lock is not None and not lock.acquire(blocking=False):
        log.info("%s is a download in progress in another process; left alone", part.name)
        return []
    try:
        log.info("removing the leftover %s from the LoRA cache", part.name)
        return [set_aside(part)]
    except FileNotFoundError:
        return []
    finally:
        if lock is not None:
            lock.release()


def _sweep_broken_entry(root: Path, folder: Path) -> list[Path]:
    """An entry folder whose files do not add up, unless another process is at it."""
    if read_entry(folder) is not None:
        return []
    lock = key_lock(root, folder.name)
    if not lock.acquire(blocking=False):
        return []
    try:
        if not folder.exists() or read_entry(folder) is not None:
            return []
        log.warning("removing the broken LoRA cache entry %s", folder.name)
        return [set_aside(folder)]
    finally:
        lock.release()
