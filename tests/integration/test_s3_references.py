"""S3Storage reading references in every stored form, and what the S3 API's answers become.

The forms run end to end on a real S3 HTTP API (MinIO or moto_server): the reference is parsed,
then the object fetched through the configured client, whatever host the URL names. Answers
moto never gives (403 on a bucket, 400 InvalidArgument, 501 to a conditional write...) come from
``S3Answers``, a tiny HTTP server that answers every request with one S3 error document.
"""

from __future__ import annotations

import http.server
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from adapters.diffusion.lora.disk_cache import LoraDiskCache
from adapters.s3 import S3RecordStore, S3Storage, make_s3_client
from adapters.s3.client import GCS_CREATE_ONLY_HEADER
from domain.errors import (
    ErrorCode,
    GenerationError,
    InvalidRequest,
    LoraNotFound,
    SignatureInvalid,
    StorageError,
)
from tests.integration.local_http import LocalHttpServer
from tests.integration.s3_clients import client_for
from tests.integration.services import S3Service

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
LORA = b"safetensors-bytes" * 10


@pytest.fixture(scope="module")
def admin(s3: S3Service) -> Any:
    return client_for(s3)


@pytest.fixture
def bucket(admin: Any) -> Iterator[str]:
    """One bucket holding a signature and a LoRA, for every role."""
    name = f"refs-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=name)
    admin.put_object(Bucket=name, Key="signatures/a b+é.png", Body=PNG)
    admin.put_object(Bucket=name, Key="styles/1/style.safetensors", Body=LORA)
    yield name
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            admin.delete_object(Bucket=name, Key=item["Key"])
    admin.delete_bucket(Bucket=name)


def storage_on(
    s3: S3Service, bucket: str, tmp_path: Path, client: Any = None, **kwargs: Any
) -> S3Storage:
    options: dict[str, Any] = {"endpoint_url": s3.endpoint_url, "region": s3.region}
    options.update(kwargs)
    return S3Storage(
        client=client or client_for(s3),
        media_bucket=bucket,
        output_bucket=bucket,
        lora_cache=LoraDiskCache(root=tmp_path / "loras", max_bytes=1 << 20),
        **options,
    )


SIGNATURE_FORMS = [
    "s3://{bucket}/signatures/a b+é.png",
    "signatures/a b+é.png",
    "https://{bucket}.s3.amazonaws.com/signatures/a%20b%2B%C3%A9.png",
    "https://{bucket}.s3.eu-west-3.amazonaws.com/signatures/a%20b%2B%C3%A9.png",
    "https://{bucket}.s3-eu-west-3.amazonaws.com/signatures/a%20b%2B%C3%A9.png",
    "https://s3.amazonaws.com/{bucket}/signatures/a%20b%2B%C3%A9.png",
    "https://s3.eu-west-3.amazonaws.com/{bucket}/signatures/a%20b%2B%C3%A9.png",
    "{endpoint}/{bucket}/signatures/a%20b%2B%C3%A9.png",
    "{endpoint}/{bucket}/signatures/a%20b%2B%C3%A9.png?X-Amz-Signature=0&X-Amz-Expires=60",
    "https://cdn.example.com/media/signatures/a%20b%2B%C3%A9.png",
]


@pytest.mark.parametrize("form", SIGNATURE_FORMS)
def test_a_signature_by_every_form_the_backend_stores(
    s3: S3Service, bucket: str, tmp_path: Path, form: str
) -> None:
    storage = storage_on(
        s3, bucket, tmp_path, models_bucket=bucket, public_base_url="https://cdn.example.com/media"
    )
    ref = form.format(bucket=bucket, endpoint=s3.endpoint_url)
    storage.check_reference(ref, "signature")
    assert storage.fetch_signature(ref) == PNG


def test_a_lora_by_its_endpoint_url_and_by_a_presigned_url(
    s3: S3Service, bucket: str, admin: Any, tmp_path: Path
) -> None:
    storage = storage_on(s3, bucket, tmp_path)
    by_url = storage.fetch_lora(f"{s3.endpoint_url}/{bucket}/styles/1/style.safetensors")
    presigned = admin.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "styles/1/style.safetensors"}
    )
    assert "?" in presigned
    by_presigned = storage.fetch_lora(presigned)
    assert Path(by_url.path).read_bytes() == LORA and by_presigned.path == by_url.path


def test_an_output_url_names_the_output(s3: S3Service, bucket: str, tmp_path: Path) -> None:
    storage = storage_on(s3, bucket, tmp_path, public_base_url=f"{s3.endpoint_url}/{bucket}")
    stored = storage.put_output("generations/1 a.png", PNG, {})
    assert stored.url == f"{s3.endpoint_url}/{bucket}/generations/1%20a.png"
    assert storage.fetch_signature(stored.url) == PNG


@pytest.mark.parametrize(
    "form",
    [
        "gs://{bucket}/signatures/a b+é.png",
        "https://storage.googleapis.com/{bucket}/signatures/a%20b%2B%C3%A9.png",
    ],
)
def test_cloud_storage_forms_on_its_endpoint(
    s3: S3Service, bucket: str, tmp_path: Path, form: str
) -> None:
    """What ``blob.public_url`` stores, read through the client (moto stands in for GCS)."""
    storage = storage_on(s3, bucket, tmp_path, endpoint_url="https://storage.googleapis.com")
    assert storage.fetch_signature(form.format(bucket=bucket)) == PNG
    elsewhere = storage_on(s3, bucket, tmp_path)
    with pytest.raises(InvalidRequest, match="need AWS_S3_ENDPOINT_URL=https://storage.goog"):
        elsewhere.fetch_signature(form.format(bucket=bucket))


def sent_requests(client: Any) -> list[str]:
    seen: list[str] = []
    client.meta.events.register("before-send.s3", lambda **kwargs: seen.append("sent"))
    return seen


def test_the_allow_list_refuses_other_buckets_before_any_request(
    s3: S3Service, bucket: str, tmp_path: Path
) -> None:
    client = client_for(s3)
    storage = storage_on(
        s3, bucket, tmp_path, client=client, allowed_buckets=frozenset({"styles-only"})
    )
    sent = sent_requests(client)
    assert storage.fetch_signature("signatures/a b+é.png") == PNG, "the default bucket is allowed"
    sent.clear()
    refs = [
        "s3://other-bucket/signatures/a b+é.png",
        "https://other-bucket.s3.amazonaws.com/signatures/x.png",
    ]
    calls: list[Callable[[str], object]] = [
        lambda ref: storage.check_reference(ref, "lora"),
        storage.fetch_lora,
        storage.fetch_signature,
    ]
    for ref in refs:
        for call in calls:
            with pytest.raises(InvalidRequest, match="'other-bucket' is not in S3_ALLOWED_BUCKETS"):
                call(ref)
    assert not sent


def test_a_bare_lora_key_needs_the_models_bucket(
    s3: S3Service, bucket: str, tmp_path: Path
) -> None:
    storage = storage_on(s3, bucket, tmp_path)
    with pytest.raises(InvalidRequest, match="a bare key needs S3_MODELS_BUCKET"):
        storage.check_reference("styles/1/style.safetensors", "lora")
    with pytest.raises(InvalidRequest, match="a bare key needs S3_MODELS_BUCKET"):
        storage.fetch_lora("styles/1/style.safetensors")
    lora = storage.fetch_lora(f"s3://{bucket}/styles/1/style.safetensors")
    assert Path(lora.path).read_bytes() == LORA


# -- answers moto does not give ----------------------------------------------------------------


class S3Answers(LocalHttpServer):
    """Answers every request with ``status`` and an S3 error document naming ``code``."""

    def __init__(self, status: int, code: str) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        answers = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                answers.requests.append((self.command, dict(self.headers)))
                body = (
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    "<Message>refused</Message><RequestId>1</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_DELETE = do_POST = _answer

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(Handler)

    def storage(self, tmp_path: Path) -> S3Storage:
        """A storage whose models and media buckets are ``models-b`` and ``media-b``."""
        client = make_s3_client(
            endpoint_url=self.endpoint_url,
            region="us-east-1",
            access_key_id="k",
            secret_access_key="s",
            max_attempts=1,
        )
        return S3Storage(
            client=client,
            models_bucket="models-b",
            media_bucket="media-b",
            output_bucket="media-b",
            lora_cache=LoraDiskCache(root=tmp_path / "loras", max_bytes=1 << 20),
            endpoint_url=self.endpoint_url,
        )


def raised(call: Callable[[], object]) -> GenerationError:
    with pytest.raises(GenerationError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    ("status", "code", "bucket", "expected"),
    [
        (403, "AccessDenied", "media-b", ErrorCode.STORAGE_ERROR),
        (403, "AccessDenied", "models-b", ErrorCode.STORAGE_ERROR),
        (403, "AccessDenied", "someone-elses", ErrorCode.INVALID_REQUEST),
        (403, "InvalidAccessKeyId", "someone-elses", ErrorCode.STORAGE_ERROR),
        (403, "SignatureDoesNotMatch", "someone-elses", ErrorCode.STORAGE_ERROR),
        (400, "InvalidBucketName", "someone-elses", ErrorCode.INVALID_REQUEST),
        (400, "InvalidArgument", "media-b", ErrorCode.INVALID_REQUEST),
        (411, "MissingContentLength", "media-b", ErrorCode.INVALID_REQUEST),
        (414, "RequestURITooLong", "media-b", ErrorCode.INVALID_REQUEST),
        (400, "RequestTimeout", "media-b", ErrorCode.STORAGE_ERROR),
        (429, "SlowDown", "media-b", ErrorCode.STORAGE_ERROR),
        (503, "SlowDown", "media-b", ErrorCode.STORAGE_ERROR),
        (500, "InternalError", "someone-elses", ErrorCode.STORAGE_ERROR),
    ],
)
def test_answers_to_reading_a_reference(
    tmp_path: Path, status: int, code: str, bucket: str, expected: ErrorCode
) -> None:
    with S3Answers(status, code) as server:
        storage = server.storage(tmp_path)
        for call in (
            lambda: storage.fetch_signature(f"s3://{bucket}/signatures/1.png"),
            lambda: storage.fetch_lora(f"s3://{bucket}/styles/1.safetensors"),
        ):
            error = raised(call)
            assert error.code is expected, str(error)
            assert f"'s3://{bucket}/" in error.message
            assert server.endpoint_url.rsplit(":", 1)[1] not in str(error)
            assert "http://" not in str(error)
        assert server.requests, "the answers came from the server"


def test_a_missing_object_keeps_its_codes(tmp_path: Path) -> None:
    with S3Answers(404, "NoSuchKey") as server:
        storage = server.storage(tmp_path)
        assert isinstance(raised(lambda: storage.fetch_signature("sig.png")), SignatureInvalid)
        assert isinstance(raised(lambda: storage.fetch_lora("styles/1/")), LoraNotFound)


def test_a_storage_without_conditional_writes_is_named(tmp_path: Path) -> None:
    with S3Answers(501, "NotImplemented") as server:
        storage = server.storage(tmp_path)
        error = raised(lambda: storage.put_output("generations/1.png", PNG, {}))
        assert isinstance(error, StorageError)
        assert "must support conditional writes (If-None-Match" in error.message
        assert [headers.get("If-None-Match") for _, headers in server.requests] == ["*"]
        records = S3RecordStore(client=storage_client(server), bucket="media-b", prefix="r/")
        error = raised(lambda: records.create("outcomes/1.json", b"{}"))
        assert isinstance(error, StorageError)
        assert "must support conditional writes" in error.message


def storage_client(server: S3Answers) -> Any:
    return make_s3_client(
        endpoint_url=server.endpoint_url,
        region="us-east-1",
        access_key_id="k",
        secret_access_key="s",
        max_attempts=1,
    )


def test_check_names_the_setting_of_a_forbidden_bucket(tmp_path: Path) -> None:
    with S3Answers(403, "AccessDenied") as server:
        error = raised(server.storage(tmp_path).check)
        assert isinstance(error, StorageError) and error.retryable
        assert error.message == "bucket 'media-b' (AWS_STORAGE_BUCKET_NAME): access denied (403)"


class _Raw:
    """The raw stream of a canned, empty HTTP answer."""

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield b""


def test_create_only_puts_carry_the_cloud_storage_precondition() -> None:
    """Cloud Storage's XML API documents If-None-Match for reads only; x-goog-if-generation-match
    is its create-only condition. The requests are answered here, never sent."""
    headers_sent: list[dict[str, str]] = []

    def answer(request: Any, **_: Any) -> AWSResponse:
        headers_sent.append(
            {
                name.lower(): value.decode() if isinstance(value, bytes) else value
                for name, value in request.headers.items()
            }
        )
        return AWSResponse(request.url, 200, {"ETag": '"e"'}, _Raw())

    for endpoint in ("https://storage.googleapis.com", "http://minio:9000"):
        client = make_s3_client(
            endpoint_url=endpoint, region="auto", access_key_id="k", secret_access_key="s"
        )
        client.meta.events.register("before-send.s3", answer)
        client.put_object(Bucket="b-1", Key="k", Body=b"x", IfNoneMatch="*")
        client.put_object(Bucket="b-1", Key="k", Body=b"x")
    assert len(headers_sent) == 4
    gcs_create = headers_sent[0]
    assert gcs_create[GCS_CREATE_ONLY_HEADER] == "0" and gcs_create["if-none-match"] == "*"
    assert GCS_CREATE_ONLY_HEADER in gcs_create["authorization"], "the header is signed"
    assert [GCS_CREATE_ONLY_HEADER in headers for headers in headers_sent[1:]] == [False] * 3
