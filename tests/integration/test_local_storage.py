"""The local-folder Storage adapter on a real file system."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from adapters.local import LocalStorage
from adapters.local import storage as local_storage
from adapters.diffusion.lora.files import sha256_of
from domain.errors import (
    ErrorCode,
    InvalidRequest,
    LoraInvalid,
    LoraNotFound,
    SignatureInvalid,
    StorageError,
)
from ports.storage import StoredOutput


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(
        root=tmp_path, models_bucket="models", media_bucket="media", output_bucket="out"
    )


def put(root: Path, relative: str, data: bytes = b"x") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_lora_file_by_uri_and_by_bare_key(storage: LocalStorage, tmp_path: Path) -> None:
    path = put(tmp_path, "models/styles/1.safetensors", b"weights")
    by_uri = storage.fetch_lora("s3://models/styles/1.safetensors")
    by_key = storage.fetch_lora("styles/1.safetensors")
    assert Path(by_uri.path) == path == Path(by_key.path)
    assert by_uri.checksum == by_key.checksum == sha256_of(path)
    assert len(by_uri.checksum) == 64


def test_peft_folder_checksum_covers_names_and_contents(
    storage: LocalStorage, tmp_path: Path
) -> None:
    put(tmp_path, "models/styles/2/adapter_config.json", b"{}")
    put(tmp_path, "models/styles/2/adapter_model.safetensors", b"a")
    first = storage.fetch_lora("s3://models/styles/2/")
    put(tmp_path, "models/styles/2/adapter_model.safetensors", b"b")
    second = storage.fetch_lora("styles/2/")
    assert first.checksum != second.checksum


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path LocalStorage hashes."""
    seen: list[Path] = []

    def counting(path: Path) -> str:
        seen.append(path)
        return sha256_of(path)

    monkeypatch.setattr(local_storage, "sha256_of", counting)
    return seen


def test_checksum_is_remembered_until_the_file_changes(
    storage: LocalStorage, tmp_path: Path, hashed: list[Path]
) -> None:
    path = put(tmp_path, "models/styles/1.safetensors", b"weights")
    first = storage.fetch_lora("styles/1.safetensors")
    assert storage.fetch_lora("styles/1.safetensors") == first
    assert storage.fetch_lora("s3://models/styles/1.safetensors").checksum == first.checksum
    assert hashed == [path]
    path.write_bytes(b"new weights")
    changed = storage.fetch_lora("styles/1.safetensors")
    assert len(hashed) == 2 and changed.checksum == sha256_of(path) != first.checksum


def test_folder_checksum_is_remembered_until_a_file_changes(
    storage: LocalStorage, tmp_path: Path, hashed: list[Path]
) -> None:
    put(tmp_path, "models/styles/2/adapter_config.json", b"{}")
    weights = put(tmp_path, "models/styles/2/adapter_model.safetensors", b"a")
    first = storage.fetch_lora("styles/2/")
    assert storage.fetch_lora("styles/2/").checksum == first.checksum and len(hashed) == 1
    weights.write_bytes(b"b")  # same size: the new mtime tells
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert storage.fetch_lora("styles/2/").checksum != first.checksum and len(hashed) == 2
    put(tmp_path, "models/styles/2/README.md", b"# style")
    storage.fetch_lora("styles/2/")
    assert len(hashed) == 3


def test_missing_lora_and_incomplete_folder(storage: LocalStorage, tmp_path: Path) -> None:
    with pytest.raises(LoraNotFound) as caught:
        storage.fetch_lora("s3://models/styles/404/")
    assert caught.value.code is ErrorCode.LORA_NOT_FOUND and not caught.value.retryable
    put(tmp_path, "models/styles/3/adapter_model.safetensors")
    with pytest.raises(LoraInvalid, match="adapter_config.json"):
        storage.fetch_lora("styles/3/")


@pytest.mark.parametrize("ref", ["../../etc/passwd", "s3://models/../../secret", "s3:///x"])
def test_references_cannot_escape_the_root(storage: LocalStorage, ref: str) -> None:
    with pytest.raises(InvalidRequest):
        storage.fetch_lora(ref)


def test_signature_bytes_and_missing_signature(storage: LocalStorage, tmp_path: Path) -> None:
    put(tmp_path, "media/signatures/77.png", b"png-bytes")
    assert storage.fetch_signature("s3://media/signatures/77.png") == b"png-bytes"
    assert storage.fetch_signature("signatures/77.png") == b"png-bytes"
    with pytest.raises(SignatureInvalid):
        storage.fetch_signature("signatures/78.png")


def test_output_round_trip_with_metadata(storage: LocalStorage, tmp_path: Path) -> None:
    assert storage.find_output("generations/5.png") is None
    stored = storage.put_output("generations/5.png", b"\x89PNG", {"generation-metadata": "{}"})
    assert stored.url == (tmp_path / "out/generations/5.png").as_uri()
    found = storage.find_output("generations/5.png")
    assert found is not None and found.url == stored.url
    assert dict(found.metadata) == {"generation-metadata": "{}"}
    assert (tmp_path / "out/generations/5.png").read_bytes() == b"\x89PNG"
    leftovers = [p.name for p in (tmp_path / "out/generations").iterdir() if p.suffix == ".part"]
    assert leftovers == []


def sidecars_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".metadata.json"))


def test_the_sidecar_is_named_after_the_image(storage: LocalStorage, tmp_path: Path) -> None:
    png = b"\x89PNG-one"
    stored = storage.put_output("generations/6.png", png, {"seed": "1"})
    digest = hashlib.sha256(png).hexdigest()
    assert stored.created
    folder = tmp_path / "out/generations"
    assert sidecars_of(folder) == [f"6.png.{digest[:16]}.metadata.json"]
    assert json.loads((folder / sidecars_of(folder)[0]).read_text()) == {"seed": "1"}


def test_a_second_writer_gets_the_first_image_and_its_metadata(
    storage: LocalStorage, tmp_path: Path
) -> None:
    first = storage.put_output("generations/7.png", b"\x89PNG-first", {"seed": "1"})
    second = storage.put_output("generations/7.png", b"\x89PNG-second", {"seed": "2"})
    assert first.created and not second.created
    assert dict(second.metadata) == {"seed": "1"} and second.url == first.url
    assert (tmp_path / "out/generations/7.png").read_bytes() == b"\x89PNG-first"
    first_digest = hashlib.sha256(b"\x89PNG-first").hexdigest()
    assert sidecars_of(tmp_path / "out/generations") == [
        f"7.png.{first_digest[:16]}.metadata.json"
    ], "the losing writer removed its own sidecar"
    found = storage.find_output("generations/7.png")
    assert found is not None and dict(found.metadata) == {"seed": "1"}


def test_racing_writers_keep_one_image_with_its_own_metadata(
    storage: LocalStorage, tmp_path: Path
) -> None:
    start = threading.Barrier(8)
    results: list[StoredOutput] = []

    def write(number: int) -> None:
        start.wait()
        results.append(
            storage.put_output("generations/8.png", b"png-%d" % number, {"seed": str(number)})
        )

    threads = [threading.Thread(target=write, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [result for result in results if result.created]
    assert len(results) == 8 and len(winners) == 1
    seed = winners[0].metadata["seed"]
    assert {dict(result.metadata)["seed"] for result in results} == {seed}
    assert (tmp_path / "out/generations/8.png").read_bytes() == b"png-" + seed.encode()
    assert len(sidecars_of(tmp_path / "out/generations")) == 1
    found = storage.find_output("generations/8.png")
    assert found is not None and dict(found.metadata) == {"seed": seed}


def test_the_same_image_written_twice_keeps_the_winners_metadata(
    storage: LocalStorage, tmp_path: Path
) -> None:
    """A writer of the same bytes may write the sidecar first; the image's writer owns it."""
    folder = tmp_path / "out/generations"
    folder.mkdir(parents=True)
    digest = hashlib.sha256(b"same").hexdigest()
    (folder / f"9.png.{digest[:16]}.metadata.json").write_text('{"seed": "other"}')
    stored = storage.put_output("generations/9.png", b"same", {"seed": "mine"})
    found = storage.find_output("generations/9.png")
    assert stored.created and found is not None and dict(found.metadata) == {"seed": "mine"}


def test_an_output_of_the_previous_layout_keeps_its_metadata(
    storage: LocalStorage, tmp_path: Path
) -> None:
    put(tmp_path, "out/generations/10.png", b"old")
    put(tmp_path, "out/generations/10.png.metadata.json", b'{"seed": "3"}')
    found = storage.find_output("generations/10.png")
    assert found is not None and dict(found.metadata) == {"seed": "3"}
    put(tmp_path, "out/generations/11.png", b"no sidecar")
    found = storage.find_output("generations/11.png")
    assert found is not None and not found.metadata


def test_check_creates_the_root_and_fails_when_it_cannot(tmp_path: Path) -> None:
    root = tmp_path / "new" / "storage"
    LocalStorage(root=root, media_bucket="media", output_bucket="out").check()
    assert root.is_dir() and not any(root.iterdir())
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="LOCAL_STORAGE_DIR") as caught:
        LocalStorage(root=blocker / "storage", media_bucket="media", output_bucket="out").check()
    assert caught.value.retryable


def test_references_take_the_storage_forms_and_the_allow_list(tmp_path: Path) -> None:
    storage = LocalStorage(
        root=tmp_path,
        media_bucket="media",
        output_bucket="out",
        allowed_buckets=frozenset({"styles", "out"}),
        public_base_url="https://cdn.example.com/",
    )
    put(tmp_path, "styles/1.safetensors", b"w")
    put(tmp_path, "out/generations/1.png", b"png")
    assert storage.fetch_lora("https://styles.s3.amazonaws.com/1.safetensors").checksum
    assert storage.fetch_signature("https://cdn.example.com/generations/1.png") == b"png"
    storage.check_reference("s3://styles/1.safetensors", "lora")
    with pytest.raises(InvalidRequest, match="'others' is not in S3_ALLOWED_BUCKETS"):
        storage.check_reference("s3://others/1.safetensors", "lora")
    with pytest.raises(InvalidRequest, match="'others' is not in S3_ALLOWED_BUCKETS"):
        storage.fetch_lora("s3://others/1.safetensors")
    with pytest.raises(InvalidRequest, match="a bare key needs S3_MODELS_BUCKET"):
        storage.fetch_lora("1.safetensors")
