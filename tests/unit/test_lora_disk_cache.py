"""LoraDiskCache on a real folder: LRU by bytes, protect window, restarts, concurrency, failures."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.lora_disk_cache import (
    ENTRY_FILE,
    CachedLora,
    LoraCacheKey,
    LoraDiskCache,
    LoraDiskCacheStats,
    sha256_of,
)


class Clock:
    """A monotonic clock the test moves by hand."""

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
    return sorted(child.name for child in root.iterdir())


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
    threads = [
        threading.Thread(
            target=cache.fetch,
            args=(key(name), downloads.file(b"x", delay=0.5)),
            kwargs={"name": f"{name}.safetensors", "folder": False},
        )
        for name in "abcd"
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(downloads.done) == [f"{name}.safetensors" for name in "abcd"]
    assert time.monotonic() - started < 1.5, "downloads of different keys must not queue"


def test_a_failed_download_leaves_nothing_and_reaches_every_waiter(
    tmp_path: Path, clock: Clock, downloads: Downloads
) -> None:
    cache = open_cache(tmp_path, clock)
    gate = threading.Event()
    errors: list[BaseException] = []

    def broken(target: Path) -> None:
        target.write_bytes(b"half")
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
    time.sleep(0.2)
    assert [p.name.endswith(".part") for p in tmp_path.iterdir()] == [True]
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
