"""The S3 Storage adapter against a real S3 HTTP API (MinIO, or moto_server)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.response import StreamingBody
from botocore.stub import Stubber
from urllib3.exceptions import ProtocolError

from adapters.diffusion.lora.disk_cache import LoraDiskCache
from adapters.diffusion.lora.files import sha256_of
from adapters.local import LocalStorage
from adapters.s3 import S3Storage, make_s3_client
from domain.errors import (
    ErrorCode,
    InvalidRequest,
    LoraInvalid,
    LoraNotFound,
    SignatureInvalid,
    StorageError,
)
from domain.job import METADATA_KEY
from tests.integration.s3_clients import client_for
from tests.integration.services import S3Service, free_port

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@dataclass(frozen=True)
class Buckets:
    models: str
    media: str
    output: str


@pytest.fixture(scope="module")
def admin(s3: S3Service) -> Any:
    """A client of its own for arranging objects, never observed by the tests' hooks."""
    return client_for(s3)


@pytest.fixture
def buckets(admin: Any) -> Iterator[Buckets]:
    suffix = uuid.uuid4().hex[:12]
    names = Buckets(f"models-{suffix}", f"media-{suffix}", f"output-{suffix}")
    for name in (names.models, names.media, names.output):
        admin.create_bucket(Bucket=name)
    yield names
    for name in (names.models, names.media, names.output):
        for page in admin.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                admin.delete_object(Bucket=name, Key=item["Key"])
        admin.delete_bucket(Bucket=name)


@pytest.fixture
def client(s3: S3Service) -> Any:
    """The adapter's client, fresh per test so event hooks never leak between tests."""
    return client_for(s3)


@pytest.fixture
def storage(client: Any, buckets: Buckets, s3: S3Service, tmp_path: Path) -> S3Storage:
    return make_storage(client, buckets, s3, tmp_path / "loras")


def make_storage(
    client: Any,
    buckets: Buckets,
    s3: S3Service,
    download_dir: Path,
    cache_bytes: int = 1 << 30,
    protect_seconds: float = 600.0,
    **kwargs: Any,
) -> S3Storage:
    cache = LoraDiskCache(root=download_dir, max_bytes=cache_bytes, protect_seconds=protect_seconds)
    return S3Storage(
        client=client,
        models_bucket=buckets.models,
        media_bucket=buckets.media,
        output_bucket=buckets.output,
        lora_cache=cache,
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        **kwargs,
    )


def calls_of(client: Any, operation: str) -> list[dict[str, Any]]:
    """The parameters of every ``operation`` the client sends, recorded by a botocore hook."""
    seen: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        seen.append(dict(params))

    client.meta.events.register(f"before-parameter-build.s3.{operation}", record)
    return seen


def everything_in(folder: Path) -> list[Path]:
    """Every file and folder under ``folder`` except the LoRA cache's lock files."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if ".locks" not in p.relative_to(folder).parts)


def local_checksum(tmp_path: Path, files: dict[str, bytes]) -> str:
    """LocalStorage's checksum of the same LoRA laid out on disk."""
    root = tmp_path / "local"
    for name, data in files.items():
        path = root / "models" / "lora" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    local = LocalStorage(root=root, models_bucket="models", media_bucket="m", output_bucket="o")
    ref = "lora/" + next(iter(files)) if len(files) == 1 else "lora/"
    return local.fetch_lora(ref).checksum


def put_peft(admin: Any, bucket: str, prefix: str, *, config: bool = True) -> dict[str, bytes]:
    files = {"adapter_model.safetensors": b"peft-weights" * 100, "README.md": b"# style\n"}
    if config:
        files["adapter_config.json"] = b'{"r": 8}'
    for name, data in files.items():
        admin.put_object(Bucket=bucket, Key=prefix + name, Body=data)
    # Neither a pickle nor a nested file belongs to the LoRA: they are never downloaded.
    admin.put_object(Bucket=bucket, Key=prefix + "optimizer.bin", Body=b"pickle")
    admin.put_object(
        Bucket=bucket, Key=prefix + "checkpoint-1/adapter_model.safetensors", Body=b"x"
    )
    return files


def test_lora_file_by_uri_and_by_bare_key(
    storage: S3Storage, admin: Any, client: Any, buckets: Buckets, tmp_path: Path
) -> None:
    data = b"safetensors-bytes" * 1000
    admin.put_object(Bucket=buckets.models, Key="styles/1/style.safetensors", Body=data)
    gets = calls_of(client, "GetObject")
    by_uri = storage.fetch_lora(f"s3://{buckets.models}/styles/1/style.safetensors")
    by_key = storage.fetch_lora("styles/1/style.safetensors")
    assert by_uri.path == by_key.path and by_key.ref == "styles/1/style.safetensors"
    assert Path(by_uri.path).read_bytes() == data
    assert Path(by_uri.path).name == "style.safetensors"
    assert Path(by_uri.path).parent.parent == storage.lora_cache.root
    on_disk = tmp_path / "same.safetensors"
    on_disk.write_bytes(data)
    assert by_uri.checksum == by_key.checksum == sha256_of(on_disk)
    assert by_uri.checksum == local_checksum(tmp_path, {"style.safetensors": data})
    assert len(gets) == 1


@pytest.mark.parametrize("trailing_slash", [True, False])
def test_peft_folder_with_and_without_trailing_slash(
    storage: S3Storage,
    admin: Any,
    client: Any,
    buckets: Buckets,
    tmp_path: Path,
    trailing_slash: bool,
) -> None:
    files = put_peft(admin, buckets.models, "styles/2/")
    gets = calls_of(client, "GetObject")
    ref = f"s3://{buckets.models}/styles/2" + ("/" if trailing_slash else "")
    lora = storage.fetch_lora(ref)
    folder = Path(lora.path)
    assert folder.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert all((folder / name).read_bytes() == data for name, data in files.items())
    assert sorted(call["Key"] for call in gets) == sorted(f"styles/2/{name}" for name in files)
    assert lora.checksum == sha256_of(folder) == local_checksum(tmp_path, files)
    assert storage.fetch_lora("styles/2/").path == lora.path


def test_folder_without_config_is_invalid(storage: S3Storage, admin: Any, buckets: Buckets) -> None:
    put_peft(admin, buckets.models, "styles/3/", config=False)
    with pytest.raises(LoraInvalid, match="adapter_config.json") as caught:
        storage.fetch_lora("styles/3")
    assert caught.value.code is ErrorCode.LORA_INVALID
    assert everything_in(storage.lora_cache.root) == []


@pytest.mark.parametrize(
    "ref", ["styles/404.safetensors", "styles/404/", "s3://{models}/styles/404", "s3://{missing}/x"]
)
def test_missing_lora_is_not_found_and_not_retryable(
    storage: S3Storage, buckets: Buckets, ref: str
) -> None:
    ref = ref.format(models=buckets.models, missing=f"missing-{uuid.uuid4().hex[:12]}")
    with pytest.raises(LoraNotFound, match="no LoRA at") as caught:
        storage.fetch_lora(ref)
    assert caught.value.code is ErrorCode.LORA_NOT_FOUND and not caught.value.retryable


@pytest.mark.parametrize("ref", ["", "/", "s3://", "s3:///styles/1", "s3://bucket", "s3://bucket/"])
def test_malformed_references_are_invalid_requests(
    storage: S3Storage, client: Any, ref: str
) -> None:
    sent = calls_of(client, "*")
    for fetch in (storage.fetch_lora, storage.fetch_signature):
        with pytest.raises(InvalidRequest) as caught:
            fetch(ref)
        assert caught.value.message.startswith(repr(ref))
        assert not caught.value.retryable
    assert not sent, "a malformed reference is refused before any request"


def test_same_version_is_downloaded_once_and_a_new_version_again(
    storage: S3Storage, admin: Any, client: Any, buckets: Buckets, s3: S3Service
) -> None:
    admin.put_object(Bucket=buckets.models, Key="styles/4.safetensors", Body=b"version-1")
    gets, heads = calls_of(client, "GetObject"), calls_of(client, "HeadObject")
    first = storage.fetch_lora("styles/4.safetensors")
    again = storage.fetch_lora("styles/4.safetensors")
    restarted = make_storage(client, buckets, s3, storage.lora_cache.root)
    after_restart = restarted.fetch_lora("styles/4.safetensors")
    assert len(gets) == 1 and len(heads) == 3, "every fetch asks for the version, once"
    assert first == again == after_restart

    admin.put_object(Bucket=buckets.models, Key="styles/4.safetensors", Body=b"version-2")
    changed = storage.fetch_lora("styles/4.safetensors")
    assert len(gets) == 2
    assert changed.path != first.path and Path(changed.path).read_bytes() == b"version-2"
    assert changed.checksum == hashlib.sha256(b"version-2").hexdigest() != first.checksum


class _DroppedConnection:
    """A response stream that delivers ``good`` bytes, then fails like a reset connection."""

    def __init__(self, data: bytes, good: int, on_failure: Callable[[], None]) -> None:
        self._data = data[:good]
        self._on_failure = on_failure

    def read(self, amt: int | None = None) -> bytes:
        if self._data:
            chunk, self._data = self._data[: amt or len(self._data)], self._data[amt or 0 :]
            return chunk
        self._on_failure()
        raise ProtocolError("Connection broken: connection reset by peer")

    def close(self) -> None:
        self._data = b""


@pytest.mark.parametrize("ref", ["styles/5.safetensors", "styles/5/"])
def test_interrupted_download_leaves_no_file_and_is_retryable(
    storage: S3Storage, admin: Any, client: Any, buckets: Buckets, ref: str
) -> None:
    payload = bytes(range(256)) * 12_000  # about 3 MiB: several download chunks
    admin.put_object(Bucket=buckets.models, Key="styles/5.safetensors", Body=payload)
    admin.put_object(Bucket=buckets.models, Key="styles/5/adapter_model.safetensors", Body=payload)
    admin.put_object(Bucket=buckets.models, Key="styles/5/adapter_config.json", Body=payload)
    partial_sizes: list[int] = []

    def record_partial() -> None:
        partial_sizes.extend(
            p.stat().st_size for p in everything_in(storage.lora_cache.root) if p.is_file()
        )

    def drop_connection(parsed: dict[str, Any], **_: Any) -> None:
        data = parsed["Body"].read()
        stream = _DroppedConnection(data, len(data) // 2 + 1, record_partial)
        parsed["Body"] = StreamingBody(stream, len(data))

    client.meta.events.register("after-call.s3.GetObject", drop_connection)
    with pytest.raises(StorageError) as caught:
        storage.fetch_lora(ref)
    assert caught.value.retryable
    assert any(size > 0 for size in partial_sizes), "the failure should come mid-download"
    assert everything_in(storage.lora_cache.root) == []

    client.meta.events.unregister("after-call.s3.GetObject", drop_connection)
    assert Path(storage.fetch_lora(ref).path).exists()


def test_object_replaced_during_download_is_retryable(
    storage: S3Storage, admin: Any, client: Any, buckets: Buckets
) -> None:
    admin.put_object(Bucket=buckets.models, Key="styles/6.safetensors", Body=b"old")

    def replace_first(params: dict[str, Any], **_: Any) -> None:
        client.meta.events.unregister("before-parameter-build.s3.GetObject", replace_first)
        admin.put_object(Bucket=params["Bucket"], Key=params["Key"], Body=b"new")

    client.meta.events.register("before-parameter-build.s3.GetObject", replace_first)
    with pytest.raises(StorageError, match="changed") as caught:
        storage.fetch_lora("styles/6.safetensors")
    assert caught.value.retryable
    assert everything_in(storage.lora_cache.root) == []
    assert Path(storage.fetch_lora("styles/6.safetensors").path).read_bytes() == b"new"


def test_a_cache_hit_costs_one_head_or_listing_and_no_download(
    storage: S3Storage, admin: Any, client: Any, buckets: Buckets
) -> None:
    admin.put_object(Bucket=buckets.models, Key="styles/7.safetensors", Body=b"w" * 100)
    put_peft(admin, buckets.models, "styles/8/")
    storage.fetch_lora("styles/7.safetensors")
    storage.fetch_lora("styles/8/")
    heads, gets = calls_of(client, "HeadObject"), calls_of(client, "GetObject")
    listings = calls_of(client, "ListObjectsV2")
    file_hit, folder_hit = storage.fetch_lora("styles/7.safetensors"), storage.fetch_lora(
        "styles/8/"
    )
    assert (len(heads), len(listings), gets) == (1, 1, [])
    assert Path(file_hit.path).read_bytes() == b"w" * 100 and Path(folder_hit.path).is_dir()
    stats = storage.lora_cache.stats
    assert (stats.hits, stats.misses, stats.entries) == (2, 2, 2)


def test_least_recently_used_loras_are_evicted_by_bytes(
    client: Any, admin: Any, buckets: Buckets, s3: S3Service, tmp_path: Path
) -> None:
    storage = make_storage(client, buckets, s3, tmp_path / "c", cache_bytes=2500, protect_seconds=0)
    for number in range(3):
        key = f"styles/e{number}.safetensors"
        admin.put_object(Bucket=buckets.models, Key=key, Body=bytes([number]) * 1000)
    gets = calls_of(client, "GetObject")
    first = storage.fetch_lora("styles/e0.safetensors")
    second = storage.fetch_lora("styles/e1.safetensors")
    storage.fetch_lora("styles/e0.safetensors")  # e0 is now more recent than e1
    third = storage.fetch_lora("styles/e2.safetensors")
    assert Path(first.path).exists() and Path(third.path).exists()
    assert not Path(second.path).exists()
    assert storage.lora_cache.stats.evictions == 1 and storage.lora_cache.stats.bytes == 2000
    assert storage.fetch_lora("styles/e1.safetensors") == second
    assert [call["Key"] for call in gets] == [
        "styles/e0.safetensors",
        "styles/e1.safetensors",
        "styles/e2.safetensors",
        "styles/e1.safetensors",
    ]


@pytest.mark.parametrize("ref", ["styles/big.safetensors", "styles/big/", "styles/big"])
def test_an_oversize_lora_is_refused_before_download(
    client: Any, admin: Any, buckets: Buckets, s3: S3Service, tmp_path: Path, ref: str
) -> None:
    admin.put_object(Bucket=buckets.models, Key="styles/big.safetensors", Body=b"x" * 5000)
    admin.put_object(
        Bucket=buckets.models, Key="styles/big/adapter_model.safetensors", Body=b"x" * 5000
    )
    admin.put_object(Bucket=buckets.models, Key="styles/big/adapter_config.json", Body=b"{}")
    storage = make_storage(client, buckets, s3, tmp_path / "c", max_lora_bytes=4096)
    gets = calls_of(client, "GetObject")
    with pytest.raises(LoraInvalid, match=r"is 50\d\d bytes; the limit is 4096") as caught:
        storage.fetch_lora(ref)
    assert not caught.value.retryable
    assert not gets and everything_in(storage.lora_cache.root) == []


def test_a_download_longer_than_announced_is_cut_at_the_limit(
    client: Any, admin: Any, buckets: Buckets, s3: S3Service, tmp_path: Path
) -> None:
    admin.put_object(Bucket=buckets.models, Key="styles/grow.safetensors", Body=b"x" * 1000)
    storage = make_storage(client, buckets, s3, tmp_path / "c", max_lora_bytes=1500)

    def inflate(parsed: dict[str, Any], **_: Any) -> None:
        parsed["Body"].close()
        parsed["Body"] = StreamingBody(io.BytesIO(b"x" * 3000), 3000)

    client.meta.events.register("after-call.s3.GetObject", inflate)
    with pytest.raises(LoraInvalid, match="exceeds the 1500-byte limit"):
        storage.fetch_lora("styles/grow.safetensors")
    assert everything_in(storage.lora_cache.root) == []


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("style.ckpt", "pickle formats"),
        ("style.bin", "pickle formats"),
        ("style.PT", "pickle formats"),
        ("style.zip", "only .safetensors LoRA files are accepted"),
    ],
)
def test_non_safetensors_keys_are_refused_before_download(
    storage: S3Storage, admin: Any, client: Any, buckets: Buckets, name: str, match: str
) -> None:
    admin.put_object(Bucket=buckets.models, Key=f"styles/{name}", Body=b"cos\nsystem\n")
    gets = calls_of(client, "GetObject")
    with pytest.raises(LoraInvalid, match=match):
        storage.fetch_lora(f"styles/{name}")
    assert not gets and everything_in(storage.lora_cache.root) == []


def test_concurrent_fetches_of_one_lora_download_it_once(
    storage: S3Storage, admin: Any, client: Any, buckets: Buckets
) -> None:
    payload = bytes(range(256)) * 8_000  # 2 MB: long enough for the fetches to overlap
    admin.put_object(Bucket=buckets.models, Key="styles/hot.safetensors", Body=payload)
    gets = calls_of(client, "GetObject")
    start = threading.Barrier(6)
    paths: list[str] = []

    def fetch() -> None:
        start.wait()
        paths.append(storage.fetch_lora("styles/hot.safetensors").path)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(paths) == 6 and len(set(paths)) == 1 and len(gets) == 1
    assert Path(paths[0]).read_bytes() == payload


def test_signature_bytes_missing_and_too_large(
    storage: S3Storage, admin: Any, client: Any, buckets: Buckets, s3: S3Service, tmp_path: Path
) -> None:
    admin.put_object(Bucket=buckets.media, Key="signatures/77.png", Body=PNG)
    assert storage.fetch_signature(f"s3://{buckets.media}/signatures/77.png") == PNG
    assert storage.fetch_signature("signatures/77.png") == PNG
    for missing in ("signatures/78.png", f"s3://missing-{uuid.uuid4().hex[:12]}/77.png"):
        with pytest.raises(SignatureInvalid, match="no signature image at") as caught:
            storage.fetch_signature(missing)
        assert not caught.value.retryable
    small = make_storage(client, buckets, s3, tmp_path, max_signature_bytes=len(PNG) - 1)
    with pytest.raises(SignatureInvalid, match=f"{len(PNG)} bytes; the limit is {len(PNG) - 1}"):
        small.fetch_signature("signatures/77.png")


def test_output_round_trip_with_large_non_ascii_metadata(
    storage: S3Storage, admin: Any, client: Any, buckets: Buckets
) -> None:
    key = "generations/500.png"
    completion = {"prompt": "aquarelle, café, ☕, 水彩 " * 100, "seed": 42, "steps": 50}
    metadata = {
        METADATA_KEY: json.dumps(completion, sort_keys=True),
        "generation-id": "500",
        "content-sha256": hashlib.sha256(PNG).hexdigest(),
        "artist": "Zoë Ångström",
    }
    assert len(metadata[METADATA_KEY]) > 2048
    puts = calls_of(client, "PutObject")

    assert storage.find_output(key) is None
    stored = storage.put_output(key, PNG, metadata)
    found = storage.find_output(key)

    sidecar_key = f"{key}.{hashlib.sha256(PNG).hexdigest()[:16]}.metadata.json"
    assert [call["Key"] for call in puts] == [sidecar_key, key]
    assert [call["IfNoneMatch"] for call in puts] == ["*", "*"]
    assert stored.created
    assert stored.url == storage.result_url(key) == f"{storage.result_url('')}{key}"
    assert found is not None and found.url == stored.url and found.key == key
    assert dict(found.metadata) == metadata == dict(stored.metadata)
    assert json.loads(found.metadata[METADATA_KEY]) == completion
    head = admin.head_object(Bucket=buckets.output, Key=key)
    assert head["ContentType"] == "image/png"
    assert head["Metadata"] == {
        "generation-id": "500",
        "content-sha256": hashlib.sha256(PNG).hexdigest(),
    }
    sidecar = admin.get_object(Bucket=buckets.output, Key=sidecar_key)
    assert sidecar["ContentType"] == "application/json"
    assert json.loads(sidecar["Body"].read()) == metadata

    # A browser can open the result URL once the bucket is public (MinIO enforces this policy).
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": ["*"]},
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{buckets.output}/*"],
            }
        ],
    }
    admin.put_bucket_policy(Bucket=buckets.output, Policy=json.dumps(policy))
    response = requests.get(stored.url, timeout=10)
    assert response.status_code == 200 and response.content == PNG
    assert response.headers["Content-Type"] == "image/png"


@pytest.mark.parametrize("sidecar", [None, b"{not json", b'["a list"]'])
def test_output_without_a_readable_sidecar_keeps_the_header_metadata(
    storage: S3Storage, admin: Any, buckets: Buckets, sidecar: bytes | None
) -> None:
    key = "generations/9.png"
    if sidecar is not None:
        admin.put_object(Bucket=buckets.output, Key=f"{key}.metadata.json", Body=sidecar)
    admin.put_object(Bucket=buckets.output, Key=key, Body=PNG, Metadata={"generation-id": "9"})
    found = storage.find_output(key)
    assert found is not None and dict(found.metadata) == {"generation-id": "9"}


def sidecar_keys(admin: Any, bucket: str, key: str) -> list[str]:
    listing = admin.list_objects_v2(Bucket=bucket, Prefix=key + ".")
    return sorted(item["Key"] for item in listing.get("Contents", []))


def output_metadata(png: bytes, seed: str) -> dict[str, str]:
    return {
        METADATA_KEY: json.dumps({"seed": seed}),
        "generation-id": "600",
        "content-sha256": hashlib.sha256(png).hexdigest(),
    }


def in_parallel(*actions: Callable[[], Any]) -> list[Any]:
    """The actions' results, the actions released at once from threads of their own."""
    start = threading.Barrier(len(actions))
    results: dict[int, Any] = {}

    def run(number: int) -> None:
        start.wait()
        results[number] = actions[number]()

    threads = [threading.Thread(target=run, args=(number,)) for number in range(len(actions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return [results[number] for number in range(len(actions))]


def test_racing_workers_keep_one_output_with_its_own_metadata(
    admin: Any, buckets: Buckets, s3: S3Service, tmp_path: Path
) -> None:
    """Two workers (two clients) render one job with different seeds: one image is kept."""
    key = "generations/600.png"
    workers = [make_storage(client_for(s3), buckets, s3, tmp_path / str(n)) for n in range(2)]
    images = [PNG + b"worker-0", PNG + b"worker-1"]
    results = in_parallel(
        *(
            lambda n=n: workers[n].put_output(key, images[n], output_metadata(images[n], str(n)))
            for n in range(2)
        )
    )
    assert sorted(result.created for result in results) == [False, True]
    winner = next(number for number, result in enumerate(results) if result.created)
    expected = output_metadata(images[winner], seed=str(winner))
    assert [dict(result.metadata) for result in results] == [expected, expected]
    assert results[0].url == results[1].url == workers[0].result_url(key)
    stored = admin.get_object(Bucket=buckets.output, Key=key)
    assert stored["Body"].read() == images[winner]
    digest = hashlib.sha256(images[winner]).hexdigest()
    assert stored["Metadata"]["content-sha256"] == digest
    sidecar = f"{key}.{digest[:16]}.metadata.json"
    assert sidecar_keys(admin, buckets.output, key) == [sidecar], "the loser removed its own"
    body = admin.get_object(Bucket=buckets.output, Key=sidecar)["Body"].read()
    assert json.loads(body) == expected
    found = workers[0].find_output(key)
    assert found is not None and dict(found.metadata) == expected


def test_a_later_writer_reports_the_stored_output(
    storage: S3Storage, client: Any, buckets: Buckets, admin: Any
) -> None:
    key = "generations/601.png"
    first = storage.put_output(key, PNG, output_metadata(PNG, seed="1"))
    puts = calls_of(client, "PutObject")
    later = storage.put_output(key, PNG + b"other", output_metadata(PNG + b"other", seed="2"))
    assert first.created and not later.created
    assert dict(later.metadata) == dict(first.metadata) and later.url == first.url
    assert all(call["IfNoneMatch"] == "*" for call in puts)
    assert admin.get_object(Bucket=buckets.output, Key=key)["Body"].read() == PNG
    assert sidecar_keys(admin, buckets.output, key) == [
        f"{key}.{hashlib.sha256(PNG).hexdigest()[:16]}.metadata.json"
    ]


def test_the_writer_of_the_image_owns_its_sidecar(
    storage: S3Storage, admin: Any, buckets: Buckets
) -> None:
    """A writer of the same bytes (same seed) lost the image race after writing the sidecar."""
    key = "generations/602.png"
    sidecar = f"{key}.{hashlib.sha256(PNG).hexdigest()[:16]}.metadata.json"
    admin.put_object(Bucket=buckets.output, Key=sidecar, Body=b'{"seed": "other writer"}')
    mine = output_metadata(PNG, seed="mine")
    stored = storage.put_output(key, PNG, mine)
    found = storage.find_output(key)
    assert stored.created and found is not None and dict(found.metadata) == mine


def test_find_output_prefers_the_sidecar_of_the_stored_image(
    storage: S3Storage, admin: Any, buckets: Buckets
) -> None:
    key = "generations/603.png"
    digest = hashlib.sha256(PNG).hexdigest()
    admin.put_object(Bucket=buckets.output, Key=key, Body=PNG, Metadata={"content-sha256": digest})
    admin.put_object(Bucket=buckets.output, Key=f"{key}.metadata.json", Body=b'{"seed": "old"}')
    found = storage.find_output(key)
    assert found is not None and found.metadata["seed"] == "old", "the legacy sidecar"
    admin.put_object(
        Bucket=buckets.output, Key=f"{key}.{digest[:16]}.metadata.json", Body=b'{"seed": "new"}'
    )
    found = storage.find_output(key)
    assert found is not None and dict(found.metadata) == {"content-sha256": digest, "seed": "new"}


def test_a_sidecar_that_cannot_be_read_now_is_a_retryable_error(tmp_path: Path) -> None:
    """Completing with the headers alone would report an image without its metadata."""
    client = make_s3_client(
        endpoint_url=None, region="us-east-1", access_key_id="k", secret_access_key="s"
    )
    storage = S3Storage(
        client=client,
        media_bucket="media",
        output_bucket="output",
        lora_cache=LoraDiskCache(root=tmp_path, max_bytes=0),
    )
    digest = hashlib.sha256(PNG).hexdigest()
    with Stubber(client) as stubber:
        stubber.add_response("head_object", {"Metadata": {"content-sha256": digest}})
        stubber.add_client_error("get_object", service_error_code="SlowDown", http_status_code=503)
        with pytest.raises(StorageError, match="S3 error SlowDown") as caught:
            storage.find_output("generations/1.png")
        stubber.assert_no_pending_responses()
    assert caught.value.retryable


def test_result_url_in_the_three_modes(tmp_path: Path) -> None:
    client = make_s3_client(
        endpoint_url=None, region="eu-west-3", access_key_id="k", secret_access_key="s"
    )
    common: dict[str, Any] = {
        "client": client,
        "models_bucket": "m",
        "media_bucket": "m",
        "output_bucket": "out",
        "lora_cache": LoraDiskCache(root=tmp_path, max_bytes=0),
        "region": "eu-west-3",
    }
    key = "generations/a b/é#1.png"
    quoted = "generations/a%20b/%C3%A9%231.png"
    cdn = S3Storage(**common, public_base_url="https://cdn.example.com/img/")
    minio = S3Storage(**common, endpoint_url="http://minio:9000/")
    aws = S3Storage(**common)
    assert cdn.result_url(key) == f"https://cdn.example.com/img/{quoted}"
    assert minio.result_url(key) == f"http://minio:9000/out/{quoted}"
    assert aws.result_url(key) == f"https://out.s3.eu-west-3.amazonaws.com/{quoted}"


def test_client_configuration() -> None:
    minio = make_s3_client(
        endpoint_url="http://minio:9000",
        region="us-east-1",
        access_key_id="k",
        secret_access_key="s",
        max_attempts=3,
        connect_timeout=2.0,
        read_timeout=7.0,
    )
    aws = make_s3_client(
        endpoint_url=None, region="eu-west-1", access_key_id="k", secret_access_key="s"
    )
    assert minio.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert (minio.meta.config.connect_timeout, minio.meta.config.read_timeout) == (2.0, 7.0)
    assert minio.meta.config.s3 == {"addressing_style": "path"}
    assert minio.meta.config.signature_version == "s3v4"
    assert minio.meta.endpoint_url == "http://minio:9000"
    assert aws.meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com"


OPERATIONS: dict[str, Callable[[S3Storage], object]] = {
    "fetch_lora": lambda storage: storage.fetch_lora("styles/1.safetensors"),
    "fetch_signature": lambda storage: storage.fetch_signature("signatures/1.png"),
    "find_output": lambda storage: storage.find_output("generations/1.png"),
    "put_output": lambda storage: storage.put_output("generations/1.png", PNG, {}),
    "check": lambda storage: storage.check(),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_unreachable_endpoint_is_a_fast_retryable_storage_error(
    tmp_path: Path, operation: str
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    client = make_s3_client(
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id="k",
        secret_access_key="s",
        max_attempts=2,
        connect_timeout=1.0,
        read_timeout=1.0,
    )
    attempts: list[str] = []
    client.meta.events.register("before-send.s3", lambda **kwargs: attempts.append("sent"))
    storage = S3Storage(
        client=client,
        models_bucket="models",
        media_bucket="media",
        output_bucket="output",
        lora_cache=LoraDiskCache(root=tmp_path, max_bytes=1 << 20),
        endpoint_url=endpoint,
    )
    started = time.monotonic()
    with pytest.raises(StorageError, match="unreachable") as caught:
        OPERATIONS[operation](storage)
    assert time.monotonic() - started < 5
    assert len(attempts) == 2, "max_attempts counts every try, the first one included"
    assert caught.value.code is ErrorCode.STORAGE_ERROR and caught.value.retryable
    assert everything_in(tmp_path) == []
    for shown in (caught.value.message, str(caught.value)):
        assert "http://" not in shown and "127.0.0.1" not in shown
        assert endpoint.rsplit(":", 1)[1] not in shown, "the port is part of the endpoint"


def test_check_heads_the_configured_buckets_only(
    client: Any, buckets: Buckets, s3: S3Service, tmp_path: Path
) -> None:
    """The backend's environment names one bucket: the worker starts with that one alone."""
    heads = calls_of(client, "HeadBucket")
    media_only = S3Storage(
        client=client,
        media_bucket=buckets.media,
        output_bucket=buckets.media,
        lora_cache=LoraDiskCache(root=tmp_path, max_bytes=0),
        endpoint_url=s3.endpoint_url,
    )
    media_only.check()
    assert [call["Bucket"] for call in heads] == [buckets.media]
    heads.clear()
    make_storage(client, buckets, s3, tmp_path).check()
    assert sorted(call["Bucket"] for call in heads) == sorted(
        [buckets.models, buckets.media, buckets.output]
    )


@pytest.mark.parametrize(
    ("missing_one", "setting"),
    [
        ("media", "AWS_STORAGE_BUCKET_NAME"),
        ("output", "S3_OUTPUT_BUCKET"),
        ("models", "S3_MODELS_BUCKET"),
    ],
)
def test_check_names_a_missing_bucket_and_its_setting(
    client: Any, buckets: Buckets, s3: S3Service, tmp_path: Path, missing_one: str, setting: str
) -> None:
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    names = {"models": buckets.models, "media": buckets.media, "output": buckets.output}
    names[missing_one] = missing
    broken = make_storage(client, Buckets(**names), s3, tmp_path)
    with pytest.raises(StorageError) as caught:
        broken.check()
    assert caught.value.message == f"bucket {missing!r} ({setting}) does not exist"
    assert caught.value.retryable
    assert s3.endpoint_url not in str(caught.value)


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDenied", 403, "access denied"),
        ("403", 403, "access denied"),
        ("SlowDown", 503, "S3 error SlowDown"),
        ("InternalError", 500, "S3 error InternalError"),
    ],
)
def test_service_errors_become_storage_errors(
    tmp_path: Path, code: str, status: int, expected: str
) -> None:
    client = make_s3_client(
        endpoint_url=None, region="us-east-1", access_key_id="k", secret_access_key="s"
    )
    storage = S3Storage(
        client=client,
        models_bucket="models",
        media_bucket="media",
        output_bucket="output",
        lora_cache=LoraDiskCache(root=tmp_path, max_bytes=1 << 20),
    )
    with Stubber(client) as stubber:
        for operation in ("head_object", "get_object", "head_object", "put_object", "head_bucket"):
            stubber.add_client_error(operation, service_error_code=code, http_status_code=status)
        for call in ("fetch_lora", "fetch_signature", "find_output", "put_output", "check"):
            with pytest.raises(StorageError, match=expected) as caught:
                OPERATIONS[call](storage)
            assert caught.value.retryable
        stubber.assert_no_pending_responses()
