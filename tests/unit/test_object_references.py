"""Storage references: every accepted form, every refusal, the allow-list (no network)."""

from __future__ import annotations

import pytest

from adapters.object_store.references import ObjectLocation, ObjectReferences, parse_reference
from domain.errors import ErrorCode, InvalidRequest

MINIO = "http://minio.internal:9000"
GCS = "https://storage.googleapis.com"
CDN = "https://cdn.example.com/images/"


def parse(
    ref: str,
    *,
    default_bucket: str | None = "models",
    endpoint_url: str | None = MINIO,
    public_base_url: str | None = CDN,
) -> tuple[str, str]:
    return parse_reference(
        ref,
        default_bucket=default_bucket,
        endpoint_url=endpoint_url,
        public_base_url=public_base_url,
        output_bucket="outputs",
    )


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("s3://stylelicense-models/styles/123/", ("stylelicense-models", "styles/123/")),
        ("s3://media.example/signatures/77.png", ("media.example", "signatures/77.png")),
        ("s3://media-1/a b/%20literal?x#y", ("media-1", "a b/%20literal?x#y")),
        ("S3://media-1/k", ("media-1", "k")),
        ("styles/123/style.safetensors", ("models", "styles/123/style.safetensors")),
        ("/styles/123/", ("models", "styles/123/")),
        ("https://media-1.s3.amazonaws.com/sig/77.png", ("media-1", "sig/77.png")),
        ("https://media-1.s3.eu-west-3.amazonaws.com/sig/77.png", ("media-1", "sig/77.png")),
        ("https://media-1.s3-eu-west-3.amazonaws.com/sig/77.png", ("media-1", "sig/77.png")),
        ("https://my.media.s3.us-east-1.amazonaws.com/k", ("my.media", "k")),
        ("https://Media-1.S3.AmazonAWS.com/Key.PNG", ("media-1", "Key.PNG")),
        ("http://media-1.s3.amazonaws.com/k", ("media-1", "k")),
        ("https://s3.amazonaws.com/media-1/sig/77.png", ("media-1", "sig/77.png")),
        ("https://s3.eu-west-3.amazonaws.com/media-1/sig/77.png", ("media-1", "sig/77.png")),
        ("https://s3-eu-west-3.amazonaws.com/media-1/sig/77.png", ("media-1", "sig/77.png")),
        (
            "https://media-1.s3.amazonaws.com/sig/a%20b%C3%A9%2Bc.png?X-Amz-Signature=abc&X=1",
            ("media-1", "sig/a bé+c.png"),
        ),
        ("https://media-1.s3.amazonaws.com/a+b#fragment", ("media-1", "a+b")),
        ("http://minio.internal:9000/media-1/sig/77.png", ("media-1", "sig/77.png")),
        ("HTTP://MINIO.INTERNAL:9000/media-1/a%2Fb", ("media-1", "a/b")),
        ("https://cdn.example.com/images/generations/5.png", ("outputs", "generations/5.png")),
        ("https://cdn.example.com:443/images/a%20b.png?v=2", ("outputs", "a b.png")),
    ],
)
def test_accepted_forms(ref: str, expected: tuple[str, str]) -> None:
    assert parse(ref) == expected


def test_endpoint_with_a_path_and_a_default_port() -> None:
    assert parse(
        "https://s3.example.org/storage/media-1/k",
        endpoint_url="https://s3.example.org:443/storage/",
    ) == (
        "media-1",
        "k",
    )


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("gs://stylelicense_media/signatures/77.png", ("stylelicense_media", "signatures/77.png")),
        (
            "https://storage.googleapis.com/stylelicense-media/sig/a%20b.png",
            ("stylelicense-media", "sig/a b.png"),
        ),
        ("https://storage.googleapis.com/bucket_1/a%2Bb?generation=1", ("bucket_1", "a+b")),
        ("s3://bucket_1/k", ("bucket_1", "k")),
    ],
)
def test_cloud_storage_forms_on_its_endpoint(ref: str, expected: tuple[str, str]) -> None:
    assert parse(ref, endpoint_url=GCS) == expected


def refusal(ref: str, **kwargs: object) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse(ref, **kwargs)  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.INVALID_REQUEST and not caught.value.retryable
    return caught.value.message


@pytest.mark.parametrize(
    "ref",
    [
        "ftp://x/y",
        "file:///etc/passwd",
        "https://example.com/media-1/k",
        "http://minio.internal:9001/media-1/k",
        "https://minio.internal:9000/media-1/k",
        "https://cdn.example.com/other/k",
        "",
    ],
)
def test_unknown_forms_say_which_forms_are_accepted(ref: str) -> None:
    message = refusal(ref)
    assert message.startswith(f"{ref!r} is not a storage reference: use s3://bucket/key")
    assert "<AWS_S3_ENDPOINT_URL>/bucket/key" in message and "<S3_PUBLIC_BASE_URL>/key" in message
    assert MINIO not in message and "cdn.example.com/images" not in message


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("s3://media-1/", "'s3://media-1/' names no object"),
        ("s3://media-1", "'s3://media-1' names no object"),
        ("https://media-1.s3.amazonaws.com/", "names no object"),
        ("https://s3.amazonaws.com/media-1", "names no object"),
        ("https://cdn.example.com/images/", "names no object"),
        ("/", "'/' names no object"),
        ("s3://media-1/a/../b", "'..' is not allowed in a key"),
        ("../../etc/passwd", "'..' is not allowed in a key"),
        ("https://s3.amazonaws.com/media-1/a/%2E%2E/b", "'..' is not allowed in a key"),
        ("s3://media-1/a\nb", "control characters are not allowed"),
        ("s3://media-1/" + "k" * 1025, "its key is longer than 1024 bytes"),
        ("s3://media-1/" + "é" * 513, "its key is longer than 1024 bytes"),
        ("http://minio.internal:9000/media-1/%FF", "not percent-encoded UTF-8"),
        ("https://user:secret@s3.amazonaws.com/media-1/k", "must not carry credentials"),
        ("http://minio.internal:notaport/media-1/k", "is not a valid URL"),
    ],
)
def test_malformed_keys_and_urls(ref: str, expected: str) -> None:
    assert expected in refusal(ref)


@pytest.mark.parametrize(
    "bucket",
    [
        "ab",
        "a" * 64,
        "Media",
        "media_1",
        "-media",
        "media-",
        ".media",
        "me..dia",
        "192.168.1.10",
        "me dia",
        "",
    ],
)
def test_bucket_names_s3_would_refuse(bucket: str) -> None:
    message = refusal(f"s3://{bucket}/key")
    assert f"{bucket!r} is not a valid bucket name" in message
    assert "underscores" not in message


def test_bucket_names_of_an_endpoint_url_are_checked() -> None:
    assert "is not a valid bucket name" in refusal("http://minio.internal:9000/Bad/k")
    assert "is not a valid bucket name" in refusal("http://minio.internal:9000//k")


def test_cloud_storage_allows_underscores_but_not_other_characters() -> None:
    assert parse("gs://my_bucket_1/k", endpoint_url=GCS) == ("my_bucket_1", "k")
    message = refusal("gs://My_Bucket/k", endpoint_url=GCS)
    assert "'My_Bucket' is not a valid bucket name" in message and "underscores" in message
    assert "is not a valid bucket name" in refusal("gs://_bucket/k", endpoint_url=GCS)


def test_cloud_storage_forms_need_its_endpoint() -> None:
    message = refusal("gs://media-1/k")
    assert message.startswith("'gs://media-1/k': gs:// references need AWS_S3_ENDPOINT_URL=")
    assert "https://storage.googleapis.com" in message
    message = refusal("https://storage.googleapis.com/media-1/k", endpoint_url=None)
    assert "need AWS_S3_ENDPOINT_URL=https://storage.googleapis.com" in message


def test_a_bare_key_needs_a_default_bucket() -> None:
    message = refusal("styles/1.safetensors", default_bucket=None)
    assert message == (
        "'styles/1.safetensors' is a bare key: a bare key needs S3_MODELS_BUCKET,"
        " or send s3://bucket/key"
    )
    assert parse("s3://models-b/styles/1.safetensors", default_bucket=None) == (
        "models-b",
        "styles/1.safetensors",
    )


def test_a_huge_reference_gives_a_short_message() -> None:
    for ref in ("ftp://" + "x" * 1_000_000, "s3://media-1/" + "k" * 1_000_000, "k" * 1_000_000):
        message = refusal(ref)
        assert len(message) < 400


def test_a_refused_url_is_echoed_without_its_query_or_credentials() -> None:
    message = refusal("https://user:pw@example.com/k?X-Amz-Signature=secret-signature")
    assert message.startswith("'https://example.com/k'")
    assert "secret" not in message and "pw" not in message


def references(allowed: frozenset[str] | None, models: str | None = "models-b") -> ObjectReferences:
    return ObjectReferences(
        models_bucket=models,
        media_bucket="media-b",
        output_bucket="outputs-b",
        endpoint_url=None,
        public_base_url="https://cdn.example.com/",
        allowed_buckets=allowed,
    )


def test_default_buckets_per_kind() -> None:
    refs = references(None)
    assert refs.resolve("styles/1/", "lora") == ObjectLocation("models-b", "styles/1/")
    assert refs.resolve("sig/77.png", "signature") == ObjectLocation("media-b", "sig/77.png")
    assert refs.resolve("s3://other-b/x", "lora").uri == "s3://other-b/x"
    with pytest.raises(InvalidRequest, match="needs S3_MODELS_BUCKET"):
        references(None, models=None).resolve("styles/1/", "lora")


@pytest.mark.parametrize("allowed", [None, frozenset()])
def test_without_an_allow_list_any_bucket_may_be_named(allowed: frozenset[str] | None) -> None:
    assert references(allowed).resolve("s3://anything-b/k", "lora").bucket == "anything-b"


def test_the_allow_list_refuses_other_buckets() -> None:
    refs = references(frozenset({"styles-b"}))
    assert refs.resolve("s3://styles-b/k", "lora").bucket == "styles-b"
    assert refs.resolve("https://styles-b.s3.amazonaws.com/k", "signature").bucket == "styles-b"
    assert refs.resolve("k", "lora").bucket == "models-b"
    assert refs.resolve("s3://media-b/k", "signature").bucket == "media-b"
    with pytest.raises(InvalidRequest) as caught:
        refs.resolve("https://s3.amazonaws.com/other-b/k", "lora")
    assert caught.value.message == (
        "'https://s3.amazonaws.com/other-b/k': bucket 'other-b' is not in S3_ALLOWED_BUCKETS"
    )
    with pytest.raises(InvalidRequest, match="'outputs-b' is not in S3_ALLOWED_BUCKETS"):
        refs.resolve("https://cdn.example.com/generations/1.png", "signature")
