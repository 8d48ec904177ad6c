"""The LoRA disk cache: an LRU of downloaded LoRAs, capped in bytes, shared by a host's workers.

Entries are keyed by the remote object's identity and ETag; the worker processes of one host
(one per GPU) may use the same folder safely.

Each entry is a folder ``<root>/<digest>/`` holding the payload (a ``.safetensors`` file or a
PEFT folder, under a readable name) and ``entry.json`` (the key, the payload's SHA-256 and size).
A download is assembled in a hidden ``.part`` folder, fsynced, and renamed into place in one
step, so a final name only ever holds a complete entry. The last-use time is the mtime of
``entry.json``, stamped on every hand-out by whichever process hands it out: it orders the LRU
across processes and restarts, and the checksum is computed once per entry.

Processes coordinate with ``flock`` locks on files in ``<root>/.locks/`` (Linux, on a local file
system: ``flock`` is not dependable over NFS). The kernel drops a dead process's locks.

- ``<digest>.lock`` is held while a process downloads that key (from creating its ``.part``
  folder to the rename), while it hands the entry out (checks it, stamps its last use) and while
  it evicts it. So a key is downloaded once across processes (the next one waits, then hits), an
  entry is never evicted between another process's check and its stamp, and a ``.part`` folder
  whose key lock is free belongs to a dead process and is swept.
- ``folder.lock`` is held while a process looks at the whole folder: at start (index, sweep
  leftovers) and to evict after each of its downloads. Evicting re-reads every entry's last use
  from disk, so an entry any process handed out within ``protect_seconds`` stays, and an entry
  whose key lock someone holds is skipped.

A process waits for a key lock with nothing else held, and for the folder lock with at most one
key lock held; holding the folder lock it only ever tries key locks without waiting: no deadlock.

The entry format is in ``disk_entries``, the sweep at start in ``disk_sweep``, the lock in
``file_lock``; no torch here (the storage adapters and the container use this cache).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

from adapters.diffusion.lora.disk_entries import (
    ENTRY_FILE,
    LOCKS_FOLDER,
    PART_SUFFIX,
    Entry,
    fsync_path,
    fsync_tree,
    key_lock,
    payload_name,
    read_entry,
    remove,
    scan,
    set_aside,
    tree_bytes,
    write_entry_file,
)
from adapters.diffusion.lora.disk_sweep import sweep
from adapters.diffusion.lora.file_lock import FileLock
from adapters.diffusion.lora.files import sha256_of

log = logging.getLogger(__name__)

DEFAULT_PROTECT_SECONDS = 600.0
"""An entry handed out this recently, by any process, is never evicted: the model may not have
loaded it yet."""
_FOLDER_LOCK = "folder.lock"


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


class LoraDiskCache:
    """Thread- and process-safe LRU of LoRA downloads on disk, capped at ``max_bytes`` in total.

    ``fetch`` returns the entry for a key, calling ``fill`` to download it on a miss; threads and
    processes asking for one key at once share a single download. After a download, the least
    recently used entries of the folder are removed until it is under ``max_bytes``, except
    those any process handed out in the last ``protect_seconds`` and those another process is
    using (the folder may then stay above its cap for a while). ``hasher`` computes an entry's
    checksum once, when it is added; ``clock`` is wall-clock seconds (the last-use times on disk
    are on it, so every process sharing the folder must use the same clock).
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike,
        max_bytes: int,
        protect_seconds: float = DEFAULT_PROTECT_SECONDS,
        hasher: Callable[[Path], str] = sha256_of,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, not {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.protect_seconds = protect_seconds
        self._hasher = hasher
        self._clock = clock
        self._locks = self.root / LOCKS_FOLDER
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._in_flight: dict[str, Future[CachedLora]] = {}
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._last_touch_ns = 0
        self._open()

    # -- public -------------------------------------------------------------------------------

    def fetch(
        self, key: LoraCacheKey, fill: Callable[[Path], None], *, name: str, folder: bool
    ) -> CachedLora:
        """The entry for ``key``; on a miss ``fill(target)`` writes the payload at ``target``.

        ``name`` is the payload's readable name (keep the ``.safetensors`` suffix of a file);
        ``folder`` says whether the payload is a folder (created empty before ``fill``) or a
        file. A failed ``fill`` leaves nothing behind and its exception reaches every thread of
        this process that waited for it (another process waiting for the key downloads it then).
        """
        digest = key.digest
        with self._lock:
            waiting = self._in_flight.get(digest)
            if waiting is None:
                leader: Future[CachedLora] = Future()
                self._in_flight[digest] = leader
        if waiting is not None:
            result = waiting.result()
            with self._lock:
                self._hits += 1
            return replace(result, hit=True)
        try:
            result = self._serve(key, fill, name=name, folder=folder)
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
        """Counters of this process since start; a fetch served without a download is a hit.

        ``entries`` and ``bytes`` are the folder's, as of this process's last look at it (at
        start and after each of its downloads) and its own fetches since.
        """
        with self._lock:
            return LoraDiskCacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=sum(entry.size_bytes for entry in self._entries.values()),
                max_bytes=self.max_bytes,
            )

    # -- hits and misses ----------------------------------------------------------------------

    def _serve(
        self, key: LoraCacheKey, fill: Callable[[Path], None], *, name: str, folder: bool
    ) -> CachedLora:
        """Under the key's lock: the entry if on disk, else a download; then evict if needed."""
        with key_lock(self.root, key.digest):
            served = self._hand_out(key.digest)
            if served is not None:
                with self._lock:
                    self._hits += 1
                return served
            with self._lock:
                self._misses += 1
            served = self._download(key, fill, name=name, folder=folder)
            doomed = self._evict()  # the key's lock is held: this call never evicts its entry
        for path in doomed:
            remove(path)
        return served

    def _hand_out(self, digest: str) -> CachedLora | None:
        """The entry (indexed, or put on disk by another process), stamped as used; or None."""
        with self._lock:
            entry = self._entries.get(digest)
        if entry is None or not entry.payload.exists():
            found = read_entry(self.root / digest)
            with self._lock:
                if found is None:
                    if self._entries.pop(digest, None) is not None:
                        log.info(
                            "LoRA cache entry %s is no longer on disk (evicted by another"
                            " process, or deleted); downloading it again",
                            digest,
                        )
                    return None
                entry = self._entries[digest] = found[1]
        self._mark_used(entry)
        return CachedLora(entry.payload, entry.checksum, entry.size_bytes, hit=True)

    def _mark_used(self, entry: Entry) -> None:
        """Stamp the entry's last use on disk (its entry file's mtime), for every process."""
        with self._lock:
            stamp = max(int(self._clock() * 1e9), self._last_touch_ns + 1)
            self._last_touch_ns = stamp
        try:
            os.utime(self.root / entry.digest / ENTRY_FILE, ns=(stamp, stamp))
        except OSError as exc:
            log.warning("cannot record the use of LoRA cache entry %s: %s", entry.digest, exc)

    def _download(
        self, key: LoraCacheKey, fill: Callable[[Path], None], *, name: str, folder: bool
    ) -> CachedLora:
        """Fill a ``.part`` folder, checksum and fsync it, rename it into place (key lock held)."""
        digest = key.digest
        stored_name = payload_name(name, folder=folder)
        self.root.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{digest}.", suffix=PART_SUFFIX))
        try:
            payload = part / stored_name
            if folder:
                payload.mkdir()
            fill(payload)
            if not (payload.is_dir() if folder else payload.is_file()):
                raise OSError(f"the download of {key.source} produced no {stored_name}")
            size = tree_bytes(payload)
            checksum = self._hasher(payload)
            write_entry_file(
                part / ENTRY_FILE,
                digest=digest,
                source=key.source,
                versions=key.versions,
                payload=stored_name,
                folder=folder,
                checksum=checksum,
                size=size,
            )
            fsync_tree(part)
            final = self.root / digest
            if final.exists():
                # A broken entry of this key (its payload vanished): replace it.
                remove(set_aside(final))
            os.replace(part, final)
            fsync_path(self.root)
        except BaseException:
            remove(part)
            raise
        entry = Entry(digest, final / stored_name, checksum, size)
        with self._lock:
            self._entries[digest] = entry
        self._mark_used(entry)
        log.info("LoRA %s cached as %s (%d bytes)", key.source, digest, size)
        return CachedLora(entry.payload, checksum, size, hit=False)

    # -- the folder ---------------------------------------------------------------------------

    def _folder_lock(self) -> FileLock:
        return FileLock(self._locks / _FOLDER_LOCK)

    def _open(self) -> None:
        """Sweep what dead processes left, index the entries on disk, evict down to the cap."""
        self._locks.mkdir(parents=True, exist_ok=True)
        with self._folder_lock():
            doomed = sweep(self.root)
            found = scan(self.root)
            with self._lock:
                self._entries = {entry.digest: entry for _, entry in found}
                self._last_touch_ns = max((used_ns for used_ns, _ in found), default=0)
            doomed += self._evict_scanned(found)
        for path in doomed:
            remove(path)
        if found:
            stats = self.stats
            log.info(
                "LoRA cache at %s: %d entries, %d bytes", self.root, stats.entries, stats.bytes
            )

    def _evict(self) -> list[Path]:
        """Look at the folder again and evict down to the cap; the set-aside folders to delete."""
        with self._folder_lock():
            found = scan(self.root)
            scanned = {entry.digest: entry for _, entry in found}
            with self._lock:
                # Keep what a thread of this process indexed while the scan ran.
                racing = {
                    digest: entry
                    for digest, entry in self._entries.items()
                    if digest not in scanned and (self.root / digest).is_dir()
                }
                self._entries = {**scanned, **racing}
            return self._evict_scanned(found)

    def _evict_scanned(self, found: list[tuple[int, Entry]]) -> list[Path]:
        """Evict unprotected entries, least recently used first, until under the cap."""
        total = sum(entry.size_bytes for _, entry in found)
        doomed: list[Path] = []
        for used_ns, entry in sorted(found, key=lambda item: (item[0], item[1].digest)):
            if total <= self.max_bytes:
                break
            if self._protected(used_ns):
                continue
            victim = self._evict_entry(entry)
            if victim is not None:
                doomed.append(victim)
                total -= entry.size_bytes
        if total > self.max_bytes:
            log.warning(
                "LoRA cache holds %d bytes, above its %d-byte cap: the rest is in recent use",
                total,
                self.max_bytes,
            )
        return doomed

    def _evict_entry(self, entry: Entry) -> Path | None:
        """Set ``entry`` aside unless in use: its key locked elsewhere, or its last use (read
        again from disk, under its key lock) within the protect window."""
        lock = key_lock(self.root, entry.digest)
        if not lock.acquire(blocking=False):
            return None
        try:
            used_ns = (self.root / entry.digest / ENTRY_FILE).stat().st_mtime_ns
            if self._protected(used_ns):
                return None
            victim = set_aside(self.root / entry.digest)
            lock.unlink()
        except FileNotFoundError:
            return None
        finally:
            lock.release()
        with self._lock:
            self._entries.pop(entry.digest, None)
            self._evictions += 1
        log.info("LoRA cache evicted %s (%d bytes)", entry.digest, entry.size_bytes)
        return victim

    def _protected(self, used_ns: int) -> bool:
        """Whether a last use at ``used_ns`` is within the protect window (0: none is)."""
        if self.protect_seconds <= 0:
            return False
        return self._clock() * 1e9 - used_ns < self.protect_seconds * 1e9
