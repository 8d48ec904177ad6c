"""Both RecordStores: on a real S3 HTTP API (MinIO or moto_server) and on a local folder."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from adapters.local import LocalRecordStore
from adapters.s3 import S3RecordStore, make_s3_client
from adapters.s3.client import GCS_CREATE_ONLY_HEADER
from domain.errors import StorageError
from ports.records import Record, RecordStore
from tests.integration.gcs_stand_in import GcsStandIn
from tests.integration.s3_clients import client_for
from tests.integration.services import S3Service, free_port


@pytest.fixture(scope="module")
def admin(s3: S3Service) -> Any:
    return client_for(s3)


@pytest.fixture
def bucket(admin: Any) -> Iterator[str]:
    name = f"records-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=name)
    yield name
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            admin.delete_object(Bucket=name, Key=item["Key"])
    admin.delete_bucket(Bucket=name)


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RecordStore:
    if request.param == "local":
        return LocalRecordStore(root=tmp_path / "records")
    client = client_for(request.getfixturevalue("s3"))
    return S3RecordStore(
        client=client, bucket=request.getfixturevalue("bucket"), prefix="worker-outcomes/"
    )


def test_both_stores_implement_the_port(store: RecordStore) -> None:
    assert isinstance(store, RecordStore)


def test_create_read_replace(store: RecordStore) -> None:
    assert store.read("outcomes/1.json") is None
    created = store.create("outcomes/1.json", b'{"outcome": "completed"}')
    assert created.created and created.data == b'{"outcome": "completed"}'
    read = store.read("outcomes/1.json")
    assert read == Record(data=b'{"outcome": "completed"}', version=created.version)
    again = store.create("outcomes/1.json", b'{"outcome": "failed"}')
    assert again == Record(data=b'{"outcome": "completed"}', version=created.version)
    newer = store.replace("outcomes/1.json", b'{"delivered": true}', created.version)
    assert newer is not None and newer != created.version
    assert store.read("outcomes/1.json") == Record(data=b'{"delivered": true}', version=newer)
    assert store.replace("outcomes/1.json", b'{"stale": true}', created.version) is None
    assert store.read("outcomes/1.json") == Record(data=b'{"delivered": true}', version=newer)
    assert store.replace("outcomes/2.json", b"{}", created.version) is None
    assert store.read("outcomes/2.json") is None


def race(count: int, action: Callable[[int], Any]) -> dict[int, Any]:
    """``action(n)`` from ``count`` threads released at once; their answers by ``n``."""
    start = threading.Barrier(count)
    answers: dict[int, Any] = {}

    def run(number: int) -> None:
        start.wait()
        answers[number] = action(number)

    threads = [threading.Thread(target=run, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(answers) == count
    return answers


def test_racing_creates_store_exactly_one_record(store: RecordStore) -> None:
    answers = race(8, lambda n: store.create("outcomes/race.json", json.dumps({"by": n}).encode()))
    winners = [number for number, record in answers.items() if record.created]
    assert len(winners) == 1
    kept = answers[winners[0]]
    assert kept.data == json.dumps({"by": winners[0]}).encode()
    assert all(record.data == kept.data for record in answers.values())
    assert all(record.version == kept.version for record in answers.values())
    assert store.read("outcomes/race.json") == Record(data=kept.data, version=kept.version)


def test_racing_replaces_from_one_version_let_exactly_one_through(store: RecordStore) -> None:
    first = store.create("outcomes/cas.json", b'{"state": "decided"}')
    answers = race(
        8,
        lambda n: store.replace(
            "outcomes/cas.json", json.dumps({"sent_by": n}).encode(), first.version
        ),
    )
    winners = [number for number, version in answers.items() if version is not None]
    assert len(winners) == 1
    stored = store.read("outcomes/cas.json")
    assert stored is not None and stored.data == json.dumps({"sent_by": winners[0]}).encode()
    assert stored.version == answers[winners[0]]


@pytest.mark.parametrize(
    "key", ["", "/abs", "a/../b", "..", "a//b", "a/./b", ".lock", "a/.b", "a\\b", "a\nb", "k" * 600]
)
def test_malformed_keys_are_refused(store: RecordStore, key: str) -> None:
    for call in (
        lambda: store.create(key, b"x"),
        lambda: store.read(key),
        lambda: store.replace(key, b"x", "v"),
    ):
        with pytest.raises(ValueError, match="record key"):
            call()


def test_s3_records_live_under_the_prefix(s3: S3Service, bucket: str, admin: Any) -> None:
    store = S3RecordStore(client=client_for(s3), bucket=bucket, prefix="outcomes")
    assert store.create("a/1.json", b"{}").created
    head = admin.head_object(Bucket=bucket, Key="outcomes/a/1.json")
    assert head["ContentType"] == "application/json"


def test_local_records_are_files_in_sub_folders(tmp_path: Path) -> None:
    store = LocalRecordStore(root=tmp_path)
    assert store.create("a/b/1.json", b"{}").created
    assert (tmp_path / "a/b/1.json").read_bytes() == b"{}"
    assert [p.name for p in (tmp_path / "a/b").iterdir()] == ["1.json"], "no temporary left"


def test_a_record_deleted_while_creating_is_created_again(
    s3: S3Service, bucket: str, admin: Any
) -> None:
    client = client_for(s3)
    store = S3RecordStore(client=client, bucket=bucket, prefix="")
    admin.put_object(Bucket=bucket, Key="outcomes/gone.json", Body=b"old")

    def delete_first(**_: Any) -> None:
        client.meta.events.unregister("before-parameter-build.s3.GetObject", delete_first)
        admin.delete_object(Bucket=bucket, Key="outcomes/gone.json")

    client.meta.events.register("before-parameter-build.s3.GetObject", delete_first)
    assert store.create("outcomes/gone.json", b"new").created
    stored = store.read("outcomes/gone.json")
    assert stored is not None and stored.data == b"new"


def test_unreachable_s3_is_a_storage_error_without_the_endpoint() -> None:
    port = free_port()
    client = make_s3_client(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key_id="k",
        secret_access_key="s",
        max_attempts=1,
        connect_timeout=1.0,
    )
    store = S3RecordStore(client=client, bucket="records", prefix="p/")
    for call in (
        lambda: store.create("k.json", b"x"),
        lambda: store.read("k.json"),
        lambda: store.replace("k.json", b"x", '"v"'),
    ):
        with pytest.raises(StorageError, match="unreachable") as caught:
            call()
        assert caught.value.retryable
        assert str(port) not in str(caught.value) and "http://" not in str(caught.value)


def test_an_unwritable_folder_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    store = LocalRecordStore(root=blocker)
    with pytest.raises(StorageError, match="cannot write record"):
        store.create("k.json", b"x")
    with pytest.raises(StorageError, match="cannot read record"):
        store.read("k.json")
    with pytest.raises(StorageError, match="cannot write record"):
        store.replace("k.json", b"x", "v")


# Cloud Storage: a stand-in that plays its XML API (tests/integration/gcs_stand_in.py).


def test_gcs_records_are_versioned_by_generation_and_replaced_conditionally() -> None:
    with GcsStandIn() as gcs:
        store = S3RecordStore(client=gcs.client(), bucket="out", prefix="worker-outcomes/")
        created = store.create("outcomes/1.json", b'{"outcome": "failed"}')
        stored = gcs.objects[("out", "worker-outcomes/outcomes/1.json")]
        assert created.created and created.version == str(stored.generation)
        assert store.read("outcomes/1.json") == Record(b'{"outcome": "failed"}', created.version)
        newer = store.replace("outcomes/1.json", b'{"told": true}', created.version)
        assert newer is not None and int(newer) > int(created.version)
        assert store.replace("outcomes/1.json", b'{"stale": true}', created.version) is None
        assert store.read("outcomes/1.json") == Record(b'{"told": true}', newer)
        assert store.replace("outcomes/2.json", b"{}", created.version) is None
        assert store.read("outcomes/2.json") is None
        again = store.create("outcomes/1.json", b'{"outcome": "completed"}')
        assert again == Record(b'{"told": true}', newer)
        puts = [seen for seen in gcs.requests if seen.method == "PUT"]
    assert [(seen.headers.get(GCS_CREATE_ONLY_HEADER), seen.status) for seen in puts] == [
        ("0", 200),
        (created.version, 200),
        (created.version, 412),
        (created.version, 412),
        ("0", 412),
    ]
    for seen in puts:
        assert GCS_CREATE_ONLY_HEADER in seen.headers["authorization"], "the header is signed"
        assert "if-match" not in seen.headers, "a generation is not an ETag"


def test_gcs_racing_replaces_from_one_generation_let_exactly_one_through() -> None:
    with GcsStandIn() as gcs:
        store = S3RecordStore(client=gcs.client(), bucket="out", prefix="")
        first = store.create("outcomes/cas.json", b'{"state": "decided"}')
        gcs.hold_puts = threading.Barrier(2)  # both uploads in flight before either is checked
        answers = race(
            2,
            lambda n: store.replace(
                "outcomes/cas.json", json.dumps({"told_by": n}).encode(), first.version
            ),
        )
        stored = store.read("outcomes/cas.json")
    winners = [number for number, version in answers.items() if version is not None]
    assert len(winners) == 1
    assert stored == Record(json.dumps({"told_by": winners[0]}).encode(), answers[winners[0]])


def test_gcs_racing_creates_store_exactly_one_record() -> None:
    with GcsStandIn(hold_puts=threading.Barrier(4)) as gcs:
        store = S3RecordStore(client=gcs.client(), bucket="out", prefix="")
        answers = race(4, lambda n: store.create("outcomes/r.json", json.dumps({"by": n}).encode()))
    assert len([record for record in answers.values() if record.created]) == 1
    assert len({(record.data, record.version) for record in answers.values()}) == 1


def test_gcs_replace_refuses_a_version_that_is_not_a_generation() -> None:
    with GcsStandIn() as gcs:
        store = S3RecordStore(client=gcs.client(), bucket="out", prefix="")
        store.create("outcomes/e.json", b"{}")
        with pytest.raises(ValueError, match="not a generation"):
            store.replace("outcomes/e.json", b'{"x": 1}', '"9b2cf535f27731c974343645a3985328"')
        assert not [seen for seen in gcs.requests if seen.headers.get("if-match")]


class _EmptyBody:
    """The raw stream of a canned, empty HTTP answer."""

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield b""


def test_gcs_answer_without_a_generation_is_a_storage_error() -> None:
    """An answer naming no generation leaves nothing to replace on: refused, never guessed."""
    client = make_s3_client(
        endpoint_url="https://storage.googleapis.com",
        region="auto",
        access_key_id="k",
        secret_access_key="s",
        max_attempts=1,
    )
    client.meta.events.register(
        "before-send.s3",
        lambda request, **_: AWSResponse(request.url, 200, {"ETag": '"e"'}, _EmptyBody()),
    )
    store = S3RecordStore(client=client, bucket="out", prefix="")
    with pytest.raises(StorageError, match="names no generation"):
        store.create("outcomes/n.json", b"{}")
