"""A disk LRU of downloaded LoRAs, keyed by the remote object's identity and ETag, capped in bytes.

Each entry is a folder ``<root>/<digest>/`` holding the payload (a ``.safetensors`` file or a
PEFT folder, under a readable name) and ``entry.json`` (the key, the payload's SHA-256 and size).
A download is assembled in a hidden ``.part`` folder, fsynced, and renamed into place in one
step, so a final name only ever holds a complete entry; leftovers of a crash are swept at start.
The last-use time is the mtime of ``entry.json`` (set explicitly on every hand-out), so a
restarted worker keeps its warm cache in LRU order, and the checksum is computed once per entry.

One cache folder belongs to one worker process: two processes sharing it would evict and sweep
each other's files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
PART_SUFFIX = ".part"
EVICTED_SUFFIX = ".evicted"
DEFAULT_PROTECT_SECONDS = 600.0
"""An entry handed out this recently is never evicted: the model may not have loaded it yet."""
_DIGEST = re.compile(r"[0-9a-f]{32}")
_LEGACY_DOWNLOAD = re.compile(r"[0-9a-f]{32}-.+")
"""Files of the earlier download folder (``<digest>-<name>``), removed when found."""
_ENTRY_VERSION = 1


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


@dataclass(frozen=True)
class LoraCacheKey:
    """One version of a remote LoRA: where it lives and the ETag of each of its files."""

    source: str
    """The object or folder, e.g. ``s3://bucket/styles/1/``."""
    versions: tuple[tuple[str, str], ...]
    """``(file name, ETag)`` of each file, sorted by name."""

    @classmethod
    def of(cls, source: str, versions: Iterable[tuple[str, str]]) -> LoraCacheKey:
        """The key of ``source`` at these file versions (in any order)."""
        return cls(source=source, versions=tuple(sorted(versions)))

    @property
    def digest(self) -> str:
        """A 32-hex-digit name unique to the source and versions: the entry's folder name."""
        digest = hashlib.sha256(self.source.encode())
        for name, etag in self.versions:
            digest.update(f"\0{name}\0{etag}".encode())
        return digest.hexdigest()[:32]


@dataclass(frozen=True)
class CachedLora:
    """A LoRA on local disk, as the cache hands it out."""

    path: Path
    checksum: str
    size_bytes: int
    hit: bool
    """Whether it was served without a download by this call."""


@dataclass(frozen=True)
class LoraDiskCacheStats:
    """A snapshot of the cache's counters, pulled by the metrics adapter."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int


@dataclass
class _Entry:
    digest: str
    payload: Path
    checksum: str
    size_bytes: int
    handed_out: float | None
    """When this process last handed it out (on the cache's clock); None since a restart."""


class LoraDiskCache:
    """Thread-safe LRU of LoRA downloads on disk, capped at ``max_bytes`` in total.

    ``fetch`` returns the entry for a key, calling ``fill`` to download it on a miss; several
    threads asking for one key at once share a single download. When the total exceeds
    ``max_bytes``, the least recently used entries are removed, except those handed out in the
    last ``protect_seconds`` (the cache may then stay above its cap for a while). ``hasher``
    computes an entry's checksum once, when it is added; ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike,
        max_bytes: int,
        protect_seconds: float = DEFAULT_PROTECT_SECONDS,
        hasher: Callable[[Path], str] = sha256_of,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, not {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.protect_seconds = protect_seconds
        self._hasher = hasher
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._in_flight: dict[str, Future[CachedLora]] = {}
        self._total = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._last_touch_ns = 0
        self._load()

    # -- public -------------------------------------------------------------------------------

    def fetch(
        self, key: LoraCacheKey, fill: Callable[[Path], None], *, name: str, folder: bool
    ) -> CachedLora:
        """The entry for ``key``; on a miss ``fill(target)`` writes the payload at ``target``.

        ``name`` is the payload's readable name (keep the ``.safetensors`` suffix of a file);
        ``folder`` says whether the payload is a folder (created empty before ``fill``) or a
        file. A failed ``fill`` leaves nothing behind and its exception reaches every caller
        that waited for it.
        """
        digest = key.digest
        with self._lock:
            served = self._hit_locked(digest)
            if served is not None:
                return served
            waiting = self._in_flight.get(digest)
            if waiting is None:
                self._misses += 1
                leader: Future[CachedLora] = Future()
                self._in_flight[digest] = leader
        if waiting is not None:
            result = waiting.result()
            with self._lock:
                self._hits += 1
                entry = self._entries.get(digest)
                if entry is not None:
                    entry.handed_out = self._clock()
            return CachedLora(result.path, result.checksum, result.size_bytes, hit=True)
        try:
            result = self._download(key, fill, name=name, folder=folder)
        except BaseException as exc:
            with self._lock:
                del self._in_flight[digest]
            leader.set_exception(exc)
            raise
        with self._lock:
            del self._in_flight[digest]
        leader.set_result(result)
        return result

    @property
    def stats(self) -> LoraDiskCacheStats:
        """Counters since start; ``entries`` and ``bytes`` include entries found on disk.

        A fetch that waited for another thread's download of the same key counts as a hit.
        """
        with self._lock:
            return LoraDiskCacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._total,
                max_bytes=self.max_bytes,
            )

    # -- hits and misses ----------------------------------------------------------------------

    def _hit_locked(self, digest: str) -> CachedLora | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if not entry.payload.exists():
            log.warning("LoRA cache entry %s vanished from disk; downloading it again", digest)
            del self._entries[digest]
            self._total -= entry.size_bytes
            return None
        self._hits += 1
        self._mark_used_locked(entry)
        return CachedLora(entry.payload, entry.checksum, entry.size_bytes, hit=True)

    def _mark_used_locked(self, entry: _Entry) -> None:
        """Most recently used, here and on disk (the entry file's mtime), and protected."""
        self._entries.move_to_end(entry.digest)
        entry.handed_out = self._clock()
        stamp = max(time.time_ns(), self._last_touch_ns + 1)
        self._last_touch_ns = stamp
        try:
            os.utime(self.root / entry.digest / ENTRY_FILE, ns=(stamp, stamp))
        except OSError as exc:
            log.warning("cannot record the use of LoRA cache entry %s: %s", entry.digest, exc)

    def _download(
        self, key: LoraCacheKey, fill: Callable[[Path], None], *, name: str, folder: bool
    ) -> CachedLora:
        """Fill a ``.part`` folder, checksum and fsync it, rename it into place, then evict."""
        digest = key.digest
        payload_name = _payload_name(name, folder=folder)
        self.root.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{digest}.", suffix=PART_SUFFIX))
        try:
            payload = part / payload_name
            if folder:
                payload.mkdir()
            fill(payload)
            if not (payload.is_dir() if folder else payload.is_file()):
                raise OSError(f"the download of {key.source} produced no {payload_name}")
            size = _tree_bytes(payload)
            checksum = self._hasher(payload)
            _write_entry_file(part / ENTRY_FILE, key, payload_name, folder, checksum, size)
            _fsync_tree(part)
            final = self.root / digest
            if final.exists():
                # Left by an entry dropped from the index (its payload vanished): replace it.
                _remove(_set_aside(final))
            os.replace(part, final)
            _fsync_path(self.root)
        except BaseException:
            _remove(part)
            raise
        entry = _Entry(digest, final / payload_name, checksum, size, handed_out=None)
        with self._lock:
            self._entries[digest] = entry
            self._total += size
            self._mark_used_locked(entry)
            doomed = self._evict_locked()
        for path in doomed:
            _remove(path)
        log.info("LoRA %s cached as %s (%d bytes)", key.source, digest, size)
        return CachedLora(entry.payload, checksum, size, hit=False)

    def _evict_locked(self) -> list[Path]:
        """Drop unprotected LRU entries until under the cap; the set-aside folders to delete."""
        doomed: list[Path] = []
        now = self._clock()
        for digest, entry in list(self._entries.items()):
            if self._total <= self.max_bytes:
                break
            if entry.handed_out is not None and now - entry.handed_out < self.protect_seconds:
                continue
            del self._entries[digest]
            self._total -= entry.size_bytes
            self._evictions += 1
            try:
                doomed.append(_set_aside(self.root / digest))
            except FileNotFoundError:
                pass
            log.info("LoRA cache evicted %s (%d bytes)", digest, entry.size_bytes)
        if self._total > self.max_bytes:
            log.warning(
                "LoRA cache holds %d bytes, above its %d-byte cap: the rest is in recent use",
                self._total,
                self.max_bytes,
            )
        return doomed

    # -- start-up -----------------------------------------------------------------------------

    def _load(self) -> None:
        """Index the entries on disk in LRU order; sweep partial downloads and broken entries."""
        self.root.mkdir(parents=True, exist_ok=True)
        found: list[tuple[int, _Entry]] = []
        for child in self.root.iterdir():
            name = child.name
            if name.startswith(".") and name.endswith((PART_SUFFIX, EVICTED_SUFFIX)):
                log.info("removing the leftover %s from the LoRA cache", name)
                _remove(child)
            elif _DIGEST.fullmatch(name) and child.is_dir():
                loaded = _read_entry(child)
                if loaded is None:
                    log.warning("removing the broken LoRA cache entry %s", name)
                    _remove(child)
                else:
                    found.append(loaded)
            elif _LEGACY_DOWNLOAD.fullmatch(name):
                log.info("removing %s, a download of an earlier version", name)
                _remove(child)
            else:
                log.warning("%s in the LoRA cache folder is not a cache entry; left alone", child)
        for used_ns, entry in sorted(found, key=lambda item: (item[0], item[1].digest)):
            self._entries[entry.digest] = entry
            self._total += entry.size_bytes
            self._last_touch_ns = max(self._last_touch_ns, used_ns)
        doomed = self._evict_locked() if self._total > self.max_bytes else []
        for path in doomed:
            _remove(path)
        if self._entries:
            log.info(
                "LoRA cache at %s: %d entries, %d bytes", self.root, len(self._entries), self._total
            )


def _payload_name(name: str, *, folder: bool) -> str:
    """A safe single path component from ``name`` (never the entry file, never hidden)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name.rstrip("/").rsplit("/", 1)[-1])[-100:]
    cleaned = cleaned.lstrip(".")
    if not cleaned or cleaned == ENTRY_FILE:
        cleaned = "lora" if folder else "lora.safetensors"
    return cleaned


def _write_entry_file(
    path: Path, key: LoraCacheKey, payload: str, folder: bool, checksum: str, size: int
) -> None:
    document = {
        "version": _ENTRY_VERSION,
        "digest": key.digest,
        "source": key.source,
        "versions": [list(version) for version in key.versions],
        "payload": payload,
        "folder": folder,
        "sha256": checksum,
        "bytes": size,
    }
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")


def _read_entry(folder: Path) -> tuple[int, _Entry] | None:
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
            and _payload_name(name, folder=is_folder) == name
            and re.fullmatch(r"[0-9a-f]{64}", checksum) is not None
        )
        payload = folder / name
        if not sound or not (payload.is_dir() if is_folder else payload.is_file()):
            return None
        if _tree_bytes(payload) != size:
            return None
        used_ns = entry_file.stat().st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return used_ns, _Entry(folder.name, payload, checksum, size, handed_out=None)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (and ``path``), so a rename publishes data."""
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync_path(child)
    _fsync_path(path)


def _fsync_path(path: Path) -> None:
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


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to a hidden ``.evicted`` name (atomic), to be deleted at leisure."""
    target = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{EVICTED_SUFFIX}")
    os.replace(path, target)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
