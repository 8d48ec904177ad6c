"""LoraDiskCache on a real folder: LRU by bytes, protect window, restarts, concurrency, failures,
and one folder shared by several real processes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path

import pytest

from adapters.diffusion.lora.disk_cache import (
    CachedLora,
    LoraCacheKey,
    LoraDiskCache,
    LoraDiskCacheStats,
)
from adapters.diffusion.lora.disk_entries import ENTRY_FILE, LOCKS_FOLDER
from adapters.diffusion.lora.files import sha256_of


class Clock:
    """A wall clock (the cache stamps last uses on disk with it) that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingHasher:
    """sha256_of, counting the paths it hashed."""

    def __init__(self) -> None:
        self.hashed: list[Path] = []

    def __call__(self, path: Path) -> str:
        self.hashed.append(path)
        return sha256_of(path)


class Downloads:
    """``fill`` callbacks that write known bytes and record every download."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.lock = threading.Lock()

    def file(self, data: bytes, *, delay: float = 0.0) -> Callable[[Path], None]:
        def fill(target: Path) -> None:
            time.sleep(delay)
            target.write_bytes(data)
            with self.lock:
                self.done.append(target.name)

        return fill

    def folder(self, files: dict[str, bytes]) -> Callable[[Path], None]:
        def fill(target: Path) -> None:
            for name, data in files.items():
                (target / name).write_bytes(data)
            with self.lock:
                self.done.append(target.name)

        return fill


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hasher() -> CountingHasher:
    return CountingHasher()


@pytest.fixture
def downloads() -> Downloads:
    return Downloads()


def key(name: str, etag: str = '"v1"') -> LoraCacheKey:
    return LoraCacheKey.of(f"s3://models/styles/{name}.safetensors", [(name, etag)])


def open_cache(
    root: Path, clock: Clock, hasher: CountingHasher | None = None, **kwargs: float
) -> LoraDiskCache:
    options = {"max_bytes": 250, "protect_seconds": 0.0, **kwargs}
    return LoraDiskCache(
        root=root,
        max_bytes=int(options["max_bytes"]),
        protect_seconds=options["protect_seconds"],
        hasher=hasher or sha256_of,
        clock=clock,
    )


def put(cache: LoraDiskCache, downloads: Downloads, name: str, size: int = 100) -> CachedLora:
    data = name.encode().ljust(size, b".")
    return cache.fetch(key(name), downloads.file(data), name=f"{name}.safetensors", folder=False)


def entries_on_disk(root: Path) -> list[str]:
    """What the folder holds, but the lock files' folder."""
    return sorted(child.name for child in root.iterdir() if child.name != LOCKS_FOLDER)


def test_miss_then_hit_downloads_once(tmp_path: Path, clock: Clock, downloads: Downloads) -> None:
    cache = open_cache(tmp_path, clock)
    first = put(cache, downloads, "a")
    again = put(cache, downloads, "a")
    assert downloads.done == ["a.safetensors"]
    assert not first.hit and again.hit
    assert first.path == again.path and first.path.name == "a.safetensors"
    assert first.path.read_bytes() == b"a".ljust(100, b".")
    assert first.checksum == again.checksum == hashlib.sha256(b"a".ljust(100, b".")).hexdigest()
    assert first.size_bytes == 100
    assert cache.stats == LoraDiskCacheStats(
        hits=1, misses=1, evictions=0, entries=1, bytes=100, max_bytes=250
    )


def test_least_recently_used_is_evicted_when_bytes_exceed_the_cap(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock)
    a, b = put(cache, downloads, "a"), put(cache, downloads, "b")
    assert put(cache, downloads, "a").hit  # a is now more recent than b
    c = put(cache, downloads, "c")
    assert a.path.exists() and c.path.exists()
    assert not b.path.exists()
    assert cache.stats.evictions == 1 and cache.stats.entries == 2 and cache.stats.bytes == 200
    assert not put(cache, downloads, "b").hit  # gone: downloaded again
    assert downloads.done.count("b.safetensors") == 2
    assert len(entries_on_disk(tmp_path)) == 2, "evicted folders are deleted, not just forgotten"


def test_entries_handed_out_recently_are_never_evicted(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock, protect_seconds=600)
    a, b, c = (put(cache, downloads, name) for name in "abc")
    assert all(entry.path.exists() for entry in (a, b, c))
    assert cache.stats.bytes == 300 > cache.max_bytes and cache.stats.evictions == 0

    clock.now += 599
    assert put(cache, downloads, "a").hit  # a handed out again: protected anew
    clock.now += 2  # b and c are out of their window, a is not
    d = put(cache, downloads, "d")
    assert a.path.exists() and d.path.exists()
    assert not b.path.exists() and not c.path.exists()
    assert cache.stats.evictions == 2 and cache.stats.bytes == 200


def test_an_entry_larger_than_the_cap_is_served_then_evicted(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock, protect_seconds=60)
    big = put(cache, downloads, "big", size=1000)
    assert big.path.exists() and cache.stats.bytes == 1000
    clock.now += 61
    put(cache, downloads, "small")
    assert not big.path.exists() and cache.stats.bytes == 100


def test_a_restart_keeps_entries_checksums_and_lru_order(
    tmp_path: Path, clock: Clock, hasher: CountingHasher, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock, hasher)
    a, b = put(cache, downloads, "a"), put(cache, downloads, "b")
    assert put(cache, downloads, "a").hit  # order now: b, a
    assert len(hasher.hashed) == 2

    restarted = open_cache(tmp_path, Clock(), hasher)
    assert restarted.stats == LoraDiskCacheStats(
        hits=0, misses=0, evictions=0, entries=2, bytes=200, max_bytes=250
    )
    again = put(restarted, downloads, "a")
    assert again.hit and again.path == a.path and again.checksum == a.checksum
    assert len(hasher.hashed) == 2, "checksums come from the entry file, not from re-hashing"
    put(restarted, downloads, "c")
    assert a.path.exists() and not b.path.exists(), "b was the least recently used before restart"
    assert downloads.done == ["a.safetensors", "b.safetensors", "c.safetensors"]


def test_a_restart_under_a_smaller_cap_evicts_the_oldest(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock, max_bytes=1000)
    a, b, c = (put(cache, downloads, name) for name in "abc")
    smaller = open_cache(tmp_path, clock, max_bytes=150)
    assert smaller.stats.entries == 1 and smaller.stats.evictions == 2
    assert c.path.exists() and not a.path.exists() and not b.path.exists()


def test_checksum_is_computed_once_per_entry(
    tmp_path: Path, clock: Clock, hasher: CountingHasher, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock, hasher)
    first = put(cache, downloads, "a")
    for _ in range(5):
        assert put(cache, downloads, "a").checksum == first.checksum
    assert [path.name for path in hasher.hashed] == ["a.safetensors"]
    entry = json.loads((first.path.parent / ENTRY_FILE).read_text())
    assert entry["sha256"] == first.checksum and entry["bytes"] == 100


def test_a_changed_etag_downloads_again(tmp_path: Path, clock: Clock, downloads: Downloads) -> None:
    cache = open_cache(tmp_path, clock, max_bytes=10_000)
    old = cache.fetch(key("a", '"v1"'), downloads.file(b"one"), name="a.safetensors", folder=False)
    new = cache.fetch(key("a", '"v2"'), downloads.file(b"two"), name="a.safetensors", folder=False)
    assert not new.hit and new.path != old.path
    assert new.path.read_bytes() == b"two" and old.path.read_bytes() == b"one"
    assert new.checksum != old.checksum
    assert len(downloads.done) == 2
    again = cache.fetch(key("a", '"v2"'), downloads.file(b"x"), name="a.safetensors", folder=False)
    assert again.hit and again.path == new.path


def test_concurrent_fetches_of_one_key_download_once(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock, max_bytes=10_000)
    start = threading.Barrier(8)
    results: list[CachedLora] = []

    def fetch() -> None:
        start.wait()
        served = cache.fetch(
            key("shared"), downloads.file(b"x" * 100, delay=0.3), name="s.safetensors", folder=False
        )
        results.append(served)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(results) == 8 and downloads.done == ["s.safetensors"]
    assert len({result.path for result in results}) == 1
    assert sum(not result.hit for result in results) == 1
    assert cache.stats.misses == 1 and cache.stats.hits == 7


def test_concurrent_fetches_of_different_keys_run_in_parallel(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock, max_bytes=10_000)
    # Each download waits until all four are downloading at once: if downloads of different
    # keys queued behind each other, the barrier would break and no file would be written.
    together = threading.Barrier(4, timeout=10)

    def fill(target: Path) -> None:
        together.wait()
        downloads.file(b"x")(target)

    threads = [
        threading.Thread(
            target=cache.fetch,
            args=(key(name), fill),
            kwargs={"name": f"{name}.safetensors", "folder": False},
        )
        for name in "abcd"
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not together.broken, "downloads of different keys must not queue"
    assert sorted(downloads.done) == [f"{name}.safetensors" for name in "abcd"]


def test_a_failed_download_leaves_nothing_and_reaches_every_waiter(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock)
    gate = threading.Event()
    errors: list[BaseException] = []

    downloading = threading.Event()

    def broken(target: Path) -> None:
        target.write_bytes(b"half")
        downloading.set()
        gate.wait(5)
        raise ConnectionError("connection reset")

    def fetch() -> None:
        try:
            cache.fetch(key("a"), broken, name="a.safetensors", folder=False)
        except ConnectionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert downloading.wait(5)
    assert [name.endswith(".part") for name in entries_on_disk(tmp_path)] == [True]
    gate.set()
    for thread in threads:
        thread.join(timeout=10)
    assert len(errors) == 3
    assert entries_on_disk(tmp_path) == []
    assert cache.stats.entries == 0 and cache.stats.bytes == 0
    assert not put(cache, downloads, "a").hit  # the next fetch tries again


def test_a_fill_that_writes_nothing_is_an_error(tmp_path: Path, clock: Clock) -> None:
    cache = open_cache(tmp_path, clock)
    with pytest.raises(OSError, match="produced no a.safetensors"):
        cache.fetch(key("a"), lambda target: None, name="a.safetensors", folder=False)
    assert entries_on_disk(tmp_path) == []


def test_folders_are_cached_whole(tmp_path: Path, clock: Clock, downloads: Downloads) -> None:
    cache = open_cache(tmp_path, clock, max_bytes=10_000)
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w" * 50}
    folder_key = LoraCacheKey.of(
        "s3://models/styles/9/",
        [("adapter_model.safetensors", '"w"'), ("adapter_config.json", "c")],
    )
    served = cache.fetch(folder_key, downloads.folder(files), name="styles/9/", folder=True)
    assert served.path.is_dir() and served.path.name == "9"
    assert sorted(p.name for p in served.path.iterdir()) == sorted(files)
    assert served.size_bytes == 52 and served.checksum == sha256_of(served.path)
    assert cache.fetch(folder_key, downloads.folder({}), name="9", folder=True).hit
    restarted = open_cache(tmp_path, clock, max_bytes=10_000)
    assert restarted.stats.entries == 1 and restarted.stats.bytes == 52


def test_stale_parts_and_broken_entries_are_swept_at_start(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock, max_bytes=10_000)
    kept = put(cache, downloads, "kept")
    broken = put(cache, downloads, "broken")
    (broken.path.parent / ENTRY_FILE).write_text("{not json")
    resized = put(cache, downloads, "resized")
    resized.path.write_bytes(b"tampered")
    (tmp_path / ".0123.abc.part").mkdir()
    (tmp_path / ".0123.abc.part" / "x.safetensors").write_bytes(b"half")
    (tmp_path / ".4567.def.part").write_bytes(b"half")
    (tmp_path / ".89ab.12345678.evicted").mkdir()
    (tmp_path / ("f" * 32 + "-old.safetensors")).write_bytes(b"earlier layout")
    (tmp_path / "notes.txt").write_text("an operator's file")

    restarted = open_cache(tmp_path, clock, max_bytes=10_000)
    assert entries_on_disk(tmp_path) == sorted([kept.path.parent.name, "notes.txt"])
    assert restarted.stats.entries == 1 and restarted.stats.bytes == 100
    assert put(restarted, downloads, "kept").hit
    assert not put(restarted, downloads, "broken").hit


def test_an_entry_deleted_behind_the_cache_is_downloaded_again(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock)
    first = put(cache, downloads, "a")
    first.path.unlink()
    again = put(cache, downloads, "a")
    assert not again.hit and again.path.exists() and cache.stats.bytes == 100
    assert downloads.done == ["a.safetensors", "a.safetensors"]


def test_lock_files_go_with_their_entries(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock)
    for name in "abc":  # a is evicted for c
        put(cache, downloads, name)

    def broken(_target: Path) -> None:
        raise ConnectionError("connection reset")

    with pytest.raises(ConnectionError):
        cache.fetch(key("x"), broken, name="x.safetensors", folder=False)

    def lock_files() -> set[str]:
        return {path.name for path in (tmp_path / LOCKS_FOLDER).iterdir()}

    assert f"{key('a').digest}.lock" not in lock_files()
    assert {f"{key(name).digest}.lock" for name in "bcx"} <= lock_files()
    open_cache(tmp_path, clock)  # a start prunes the lock of a key with no entry
    assert lock_files() == {"folder.lock"} | {f"{key(name).digest}.lock" for name in "bc"}


@pytest.mark.parametrize("name", ["../../escape.safetensors", "/etc/passwd", ".hidden", ""])
def test_payload_names_stay_inside_the_entry(
    tmp_path: Path, clock: Clock, downloads: Downloads, name: str
) -> None:
    cache = open_cache(tmp_path / "cache", clock)
    served = cache.fetch(key("a"), downloads.file(b"x"), name=name, folder=False)
    assert served.path.parent.parent == tmp_path / "cache"
    assert not served.path.name.startswith(".") and served.path.name != ENTRY_FILE
    assert entries_on_disk(tmp_path) == ["cache"]


def test_keys_differ_by_source_and_versions() -> None:
    base = LoraCacheKey.of("s3://b/k/", [("a", "1"), ("b", "2")])
    assert base == LoraCacheKey.of("s3://b/k/", [("b", "2"), ("a", "1")])
    assert base.digest == LoraCacheKey.of("s3://b/k/", [("b", "2"), ("a", "1")]).digest
    others = [
        LoraCacheKey.of("s3://b/k2/", [("a", "1"), ("b", "2")]),
        LoraCacheKey.of("s3://b/k/", [("a", "1"), ("b", "3")]),
        LoraCacheKey.of("s3://b/k/", [("a", "1")]),
    ]
    assert len({base.digest, *(other.digest for other in others)}) == 4
    assert all(len(other.digest) == 32 for other in others)


# -- one folder, several processes -------------------------------------------------------------
#
# The children are started with 'spawn' (a fresh interpreter, as a second worker would be) and
# run the module-level functions below. Each reports ("ok", path, checksum, hit) or ("error",
# traceback) on a queue, so a failure in a child fails the test with its traceback.

SPAWN = multiprocessing.get_context("spawn")
CHILD_SECONDS = 60.0
"""The longest a test waits for a child (they take well under a second each)."""


def logged_fill(log: str, data: bytes, *, delay: float = 0.0) -> Callable[[Path], None]:
    """A ``fill`` that appends a line to the file ``log`` for every download, in any process."""

    def fill(target: Path) -> None:
        time.sleep(delay)
        target.write_bytes(data)
        with open(log, "a", encoding="utf-8") as downloads_log:
            downloads_log.write(f"{os.getpid()}\n")

    return fill


def report(results: Queue, action: Callable[[], CachedLora]) -> None:
    """Run ``action`` and put its outcome on ``results``."""
    try:
        served = action()
    except BaseException:  # pylint: disable=broad-exception-caught
        results.put(("error", traceback.format_exc()))
    else:
        results.put(("ok", str(served.path), served.checksum, served.hit))


def child_fetch_together(root: str, log: str, start: Barrier, results: Queue) -> None:
    """Open the cache, wait for the other process, fetch one key with a slow download."""
    cache = LoraDiskCache(root=root, max_bytes=10_000, protect_seconds=600)
    start.wait(CHILD_SECONDS)
    fill = logged_fill(log, b"s" * 100, delay=0.5)
    report(results, lambda: cache.fetch(key("shared"), fill, name="s.safetensors", folder=False))


def child_download_held(root: str, started: Event, proceed: Event, results: Queue) -> None:
    """Download a key, stopping halfway until ``proceed`` is set."""
    cache = LoraDiskCache(root=root, max_bytes=10_000, protect_seconds=600)

    def fill(target: Path) -> None:
        target.write_bytes(b"half")
        started.set()
        if not proceed.wait(CHILD_SECONDS):
            raise TimeoutError("never told to proceed")
        target.write_bytes(b"l" * 100)

    report(results, lambda: cache.fetch(key("live"), fill, name="l.safetensors", folder=False))


def child_die_downloading(root: str) -> None:
    """Crash halfway through a download, leaving its ``.part`` folder behind."""
    cache = LoraDiskCache(root=root, max_bytes=10_000, protect_seconds=600)

    def fill(target: Path) -> None:
        target.write_bytes(b"half")
        os._exit(3)  # pylint: disable=protected-access

    cache.fetch(key("dead"), fill, name="d.safetensors", folder=False)


def child_hand_out(root: str, name: str, results: Queue) -> None:
    """Open the cache with a large cap and hand out an entry that is on disk."""
    cache = LoraDiskCache(root=root, max_bytes=10_000, protect_seconds=600)

    def fill(_target: Path) -> None:
        raise AssertionError(f"{name} is on disk: no download expected")

    report(results, lambda: cache.fetch(key(name), fill, name=f"{name}.safetensors", folder=False))


def child_evict_later(root: str, opened: Event, go: Event, results: Queue) -> None:
    """Open the cache (a 250-byte cap), wait for ``go``, then download c and d."""
    cache = LoraDiskCache(root=root, max_bytes=250, protect_seconds=600)
    opened.set()
    if not go.wait(CHILD_SECONDS):
        results.put(("error", "never told to go"))
        return
    for name in "cd":
        report(results, lambda name=name: put(cache, Downloads(), name))  # type: ignore[misc]
    results.put(("stats", cache.stats.evictions, cache.stats.bytes))


def outcomes(results: Queue, count: int) -> list[tuple]:
    """``count`` reports from children; fails with a child's traceback if one failed."""
    received = [results.get(timeout=CHILD_SECONDS) for _ in range(count)]
    errors = [item[1] for item in received if item[0] == "error"]
    assert not errors, "a child process failed:\n" + "\n".join(errors)
    return received


def run_to_end(process: BaseProcess) -> int | None:
    process.join(CHILD_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode


def parts_of(root: Path, name: str) -> list[str]:
    """The ``.part`` folders of ``key(name)``'s downloads."""
    return [
        child
        for child in entries_on_disk(root)
        if child.startswith(f".{key(name).digest}.") and child.endswith(".part")
    ]


def test_processes_fetching_one_key_together_download_it_once(tmp_path: Path) -> None:
    root, log = tmp_path / "cache", tmp_path / "downloads.log"
    start, results = SPAWN.Barrier(2), SPAWN.Queue()
    children = [
        SPAWN.Process(target=child_fetch_together, args=(str(root), str(log), start, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    served = outcomes(results, 2)
    assert [run_to_end(child) for child in children] == [0, 0]
    assert len(log.read_text().splitlines()) == 1, "the second process must wait, then hit"
    assert len({(path, checksum) for _, path, checksum, _ in served}) == 1
    assert sorted(hit for *_, hit in served) == [False, True]
    assert Path(served[0][1]).read_bytes() == b"s" * 100
    assert served[0][2] == hashlib.sha256(b"s" * 100).hexdigest()


def test_a_starting_process_sweeps_dead_downloads_but_not_live_ones(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    dead = SPAWN.Process(target=child_die_downloading, args=(str(root),))
    dead.start()
    assert run_to_end(dead) == 3
    assert len(parts_of(root, "dead")) == 1, "the crash leaves its download folder"

    started, proceed, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    live = SPAWN.Process(target=child_download_held, args=(str(root), started, proceed, results))
    live.start()
    try:
        assert started.wait(CHILD_SECONDS), "the live download never started"
        assert len(parts_of(root, "live")) == 1

        starting = LoraDiskCache(root=root, max_bytes=10_000)
        assert parts_of(root, "dead") == [], "a dead process's leftover is swept"
        assert len(parts_of(root, "live")) == 1, "a live process's download is left alone"
        assert starting.stats.entries == 0
    finally:
        proceed.set()
    ((_, path, checksum, hit),) = outcomes(results, 1)
    assert run_to_end(live) == 0
    assert not hit and Path(path).read_bytes() == b"l" * 100
    assert [name for name in entries_on_disk(root) if name.endswith(".part")] == []
    again = put(starting, Downloads(), "live")
    assert again.hit and again.checksum == checksum


def hand_out_in_another_process(root: Path, name: str) -> Path:
    """Have a fresh process fetch ``name``, which must be a hit; its path."""
    results = SPAWN.Queue()
    other = SPAWN.Process(target=child_hand_out, args=(str(root), name, results))
    other.start()
    ((_, path, _, hit),) = outcomes(results, 1)
    assert run_to_end(other) == 0 and hit
    return Path(path)


def test_eviction_in_one_process_spares_an_entry_another_just_handed_out(
    tmp_path: Path, downloads: Downloads
) -> None:
    root = tmp_path / "cache"
    an_hour_ago = LoraDiskCache(
        root=root, max_bytes=10_000, protect_seconds=600, clock=lambda: time.time() - 3600
    )
    a, b = put(an_hour_ago, downloads, "a"), put(an_hour_ago, downloads, "b")  # a is the LRU

    opened, go, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    evictor = SPAWN.Process(target=child_evict_later, args=(str(root), opened, go, results))
    evictor.start()
    try:
        assert opened.wait(CHILD_SECONDS)  # it has indexed a and b as used an hour ago
        assert hand_out_in_another_process(root, "a") == a.path
    finally:
        go.set()
    *fetched, (_, evictions, total) = outcomes(results, 3)
    assert run_to_end(evictor) == 0
    assert [hit for *_, hit in fetched] == [False, False]
    assert a.path.exists(), "a was handed out by another process a moment ago"
    assert not b.path.exists(), "b, unused for an hour, makes room"
    assert all(Path(path).exists() for _, path, _, _ in fetched)
    assert evictions == 1 and total == 300
