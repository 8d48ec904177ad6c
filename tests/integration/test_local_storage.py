"""The local-folder Storage adapter on a real file system."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters import local_storage
from adapters.local_storage import LocalStorage, sha256_of
from domain.errors import ErrorCode, InvalidRequest, LoraInvalid, LoraNotFound, SignatureInvalid


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
