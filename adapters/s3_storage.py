"""Storage on S3 or an S3-compatible server (MinIO) through boto3.

LoRAs go through a ``LoraDiskCache`` keyed by bucket, key and ETag: every fetch costs one HEAD
(or one listing for a PEFT folder) to learn the current version, and a download only when that
version is not on disk yet, so a changed object is fetched again and a warm style costs nothing
more. Pickle formats, non-safetensors files and oversized LoRAs are refused before any download.
Outputs are PNGs with their metadata in a JSON sidecar, because S3 user metadata is limited to
2 KB of ASCII.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters.lora_disk_cache import CachedLora, LoraCacheKey, LoraDiskCache
from adapters.lora_files import DEFAULT_MAX_BYTES, PEFT_CONFIG, PEFT_WEIGHTS, check_lora_file_name
from domain.errors import (
    GenerationError,
    InvalidRequest,
    LoraInvalid,
    LoraNotFound,
    SignatureInvalid,
    StorageError,
)
from ports.storage import LoraArtifact, StoredOutput

log = logging.getLogger(__name__)

NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
ACCESS_DENIED_CODES = frozenset(
    {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
)
METADATA_SIDECAR_SUFFIX = ".metadata.json"
HEADER_METADATA_KEYS = ("generation-id", "content-sha256")
"""Small ASCII entries also stored as ``x-amz-meta-*`` on the PNG; the sidecar holds them all."""
EXTRA_TEXT_SUFFIXES = frozenset({".md", ".txt", ".json"})
"""Besides the two required files, a PEFT folder's small text files (README.md) are downloaded."""
MAX_EXTRA_TEXT_BYTES = 1024 * 1024
DOWNLOAD_CHUNK_BYTES = 1024 * 1024


def make_s3_client(
    *,
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    max_attempts: int = 5,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> Any:
    """A boto3 S3 client; path-style addressing with an endpoint (MinIO), default chain if no keys.

    ``max_attempts`` counts the first try (boto3's "standard" retry mode, which retries
    connection errors, 5xx and throttling with backoff).
    """
    config = Config(
        region_name=region,
        signature_version="s3v4",
        # botocore's own "max_attempts" counts retries only; "total_max_attempts" counts tries.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    try:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )
    except (BotoCoreError, ValueError) as exc:
        raise StorageError(f"cannot create the S3 client: {exc}") from exc


@dataclass(frozen=True)
class _Object:
    """One object of a LoRA: its key, its name relative to the LoRA, and its version."""

    key: str
    name: str
    etag: str


class S3Storage:
    """Implements ``Storage`` on S3; raises LORA_NOT_FOUND, LORA_INVALID, SIGNATURE_INVALID or
    STORAGE_ERROR.

    ``client`` comes from ``make_s3_client``; ``lora_cache`` holds the downloaded LoRAs (shared
    with the metrics, which read its ``stats``). ``max_lora_bytes`` refuses a larger LoRA
    before it is downloaded. ``public_base_url`` (a CDN, or a MinIO public URL) wins over the
    endpoint's or AWS's URL in ``result_url``; ``max_signature_bytes`` bounds a signature image
    before it is read.
    """

    def __init__(
        self,
        *,
        client: Any,
        models_bucket: str,
        media_bucket: str,
        output_bucket: str,
        lora_cache: LoraDiskCache,
        max_lora_bytes: int = DEFAULT_MAX_BYTES,
        public_base_url: str | None = None,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        max_signature_bytes: int = 5 * 1024 * 1024,
    ) -> None:
        self._client = client
        self._models_bucket = models_bucket
        self._media_bucket = media_bucket
        self._output_bucket = output_bucket
        self.lora_cache = lora_cache
        self._max_lora_bytes = max_lora_bytes
        self._public_base_url = public_base_url
        self._endpoint_url = endpoint_url
        self._region = region
        self._max_signature_bytes = max_signature_bytes

    # -- references ---------------------------------------------------------------------------

    @staticmethod
    def parse_ref(ref: str, default_bucket: str) -> tuple[str, str]:
        """``(bucket, key)`` of ``s3://bucket/key`` or of a bare key in ``default_bucket``."""
        if ref.startswith("s3://"):
            bucket, _, key = ref[len("s3://") :].partition("/")
        else:
            bucket, key = default_bucket, ref.lstrip("/")
        if not bucket or not key or key == "/":
            raise InvalidRequest(f"storage reference {ref!r} needs a bucket and a key")
        return bucket, key

    # -- LoRAs --------------------------------------------------------------------------------

    def fetch_lora(self, ref: str) -> LoraArtifact:
        """The ``.safetensors`` file or PEFT folder at ``ref``, from the disk cache if current."""
        bucket, key = self.parse_ref(ref, self._models_bucket)
        try:
            if key.endswith("/"):
                cached = self._fetch_folder(ref, bucket, key)
            else:
                head = self._head_or_none(bucket, key)
                if head is not None:
                    cached = self._fetch_file(ref, bucket, key, head)
                else:
                    cached = self._fetch_folder(ref, bucket, key + "/")
        except (ClientError, BotoCoreError) as exc:
            raise _mapped(
                exc, f"LoRA {ref!r}", not_found=LoraNotFound(f"no LoRA at {ref!r}")
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot store LoRA {ref!r} locally: {exc}") from exc
        if cached.hit:
            log.debug("LoRA %s served from the disk cache", ref)
        return LoraArtifact(ref=ref, path=str(cached.path), checksum=cached.checksum)

    def _fetch_file(self, ref: str, bucket: str, key: str, head: Mapping[str, Any]) -> CachedLora:
        name = key.rsplit("/", 1)[-1]
        check_lora_file_name(name)
        self._check_size(ref, int(head.get("ContentLength", 0)))
        obj = _Object(key=key, name=name, etag=head["ETag"])
        return self.lora_cache.fetch(
            LoraCacheKey.of(f"s3://{bucket}/{key}", [(obj.name, obj.etag)]),
            lambda target: self._download(bucket, obj, target),
            name=name,
            folder=False,
        )

    def _fetch_folder(self, ref: str, bucket: str, prefix: str) -> CachedLora:
        objects = list(self._list_folder(bucket, prefix))
        if not objects:
            raise LoraNotFound(f"no LoRA at {ref!r}")
        names = {obj.name for obj, _ in objects}
        if PEFT_WEIGHTS not in names or PEFT_CONFIG not in names:
            raise LoraInvalid(f"LoRA folder {ref!r} must hold {PEFT_CONFIG} and {PEFT_WEIGHTS}")
        wanted = [
            (obj, size)
            for obj, size in objects
            if obj.name in (PEFT_WEIGHTS, PEFT_CONFIG)
            or (
                Path(obj.name).suffix.lower() in EXTRA_TEXT_SUFFIXES
                and size <= MAX_EXTRA_TEXT_BYTES
            )
        ]
        self._check_size(ref, sum(size for _, size in wanted))

        def fill(target: Path) -> None:
            for obj, _ in wanted:
                self._download(bucket, obj, target / obj.name)

        return self.lora_cache.fetch(
            LoraCacheKey.of(f"s3://{bucket}/{prefix}", [(o.name, o.etag) for o, _ in wanted]),
            fill,
            name=prefix.rstrip("/").rsplit("/", 1)[-1],
            folder=True,
        )

    def _check_size(self, ref: str, size: int) -> None:
        """Refuse a LoRA larger than ``max_lora_bytes`` before downloading any of it."""
        if size > self._max_lora_bytes:
            raise LoraInvalid(f"LoRA {ref!r} is {size} bytes; the limit is {self._max_lora_bytes}")

    def _list_folder(self, bucket: str, prefix: str) -> Iterable[tuple[_Object, int]]:
        """The files directly in the folder (sub-folders are not part of a PEFT adapter)."""
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if name and "/" not in name:
                    yield _Object(key=item["Key"], name=name, etag=item["ETag"]), item["Size"]

    def _download(self, bucket: str, obj: _Object, target: Path) -> None:
        """Stream one object version to ``target``; a newer version fails with 412 (retryable).

        The byte count is capped again while streaming, in case the listing understated it.
        """
        log.info("downloading s3://%s/%s", bucket, obj.key)
        response = self._client.get_object(Bucket=bucket, Key=obj.key, IfMatch=obj.etag)
        body = response["Body"]
        written = 0
        try:
            with target.open("wb") as stream:
                for chunk in body.iter_chunks(DOWNLOAD_CHUNK_BYTES):
                    written += len(chunk)
                    if written > self._max_lora_bytes:
                        raise LoraInvalid(
                            f"s3://{bucket}/{obj.key} exceeds the {self._max_lora_bytes}-byte limit"
                        )
                    stream.write(chunk)
        finally:
            body.close()

    # -- signatures ---------------------------------------------------------------------------

    def fetch_signature(self, ref: str) -> bytes:
        """The signature image's bytes, refused unread when larger than ``max_signature_bytes``."""
        bucket, key = self.parse_ref(ref, self._media_bucket)
        try:
            response = self._client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                size = response.get("ContentLength", 0)
                if size > self._max_signature_bytes:
                    raise SignatureInvalid(
                        f"signature image {ref!r} is {size} bytes; "
                        f"the limit is {self._max_signature_bytes}"
                    )
                return body.read()
            finally:
                body.close()
        except (ClientError, BotoCoreError) as exc:
            missing = SignatureInvalid(f"no signature image at {ref!r}")
            raise _mapped(exc, f"signature {ref!r}", not_found=missing) from exc

    # -- outputs ------------------------------------------------------------------------------

    def find_output(self, key: str) -> StoredOutput | None:
        """The PNG under ``key`` with its metadata (sidecar, else the PNG's headers), or None."""
        try:
            head = self._head_or_none(self._output_bucket, key)
        except (ClientError, BotoCoreError) as exc:
            raise _mapped(exc, f"output {key!r}") from exc
        if head is None:
            return None
        metadata: dict[str, str] = dict(head.get("Metadata", {}))
        metadata.update(self._read_sidecar(key))
        return StoredOutput(key=key, url=self.result_url(key), metadata=metadata)

    def _read_sidecar(self, key: str) -> dict[str, str]:
        """The sidecar's string entries; empty (never an error) when missing or unreadable."""
        try:
            response = self._client.get_object(
                Bucket=self._output_bucket, Key=key + METADATA_SIDECAR_SUFFIX
            )
            with response["Body"] as body:
                document = json.loads(body.read().decode("utf-8"))
        except (ClientError, BotoCoreError, ValueError) as exc:
            log.warning("metadata of %r unreadable, using the image's headers: %s", key, exc)
            return {}
        if not isinstance(document, dict):
            log.warning("metadata of %r is not a JSON object, using the image's headers", key)
            return {}
        return {str(name): value for name, value in document.items() if isinstance(value, str)}

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        """Store the metadata sidecar, then the PNG; the PNG existing means the job is done."""
        headers = {
            name: metadata[name]
            for name in HEADER_METADATA_KEYS
            if isinstance(metadata.get(name), str) and metadata[name].isascii()
        }
        try:
            self._client.put_object(
                Bucket=self._output_bucket,
                Key=key + METADATA_SIDECAR_SUFFIX,
                Body=json.dumps(dict(metadata)).encode("utf-8"),
                ContentType="application/json",
            )
            self._client.put_object(
                Bucket=self._output_bucket,
                Key=key,
                Body=data,
                ContentType="image/png",
                Metadata=headers,
            )
        except (ClientError, BotoCoreError) as exc:
            raise _mapped(exc, f"output {key!r}") from exc
        return StoredOutput(key=key, url=self.result_url(key), metadata=dict(metadata))

    def result_url(self, key: str) -> str:
        """Where a browser opens the output: public base URL, else the endpoint's, else AWS's."""
        quoted = quote(key, safe="/")
        if self._public_base_url:
            return f"{self._public_base_url.rstrip('/')}/{quoted}"
        if self._endpoint_url:
            return f"{self._endpoint_url.rstrip('/')}/{self._output_bucket}/{quoted}"
        return f"https://{self._output_bucket}.s3.{self._region}.amazonaws.com/{quoted}"

    # -- start-up -----------------------------------------------------------------------------

    def check_buckets(self) -> None:
        """Fail fast at start-up if a bucket is missing, forbidden or unreachable."""
        for bucket in dict.fromkeys((self._models_bucket, self._media_bucket, self._output_bucket)):
            try:
                self._client.head_bucket(Bucket=bucket)
            except (ClientError, BotoCoreError) as exc:
                raise _mapped(exc, f"bucket {bucket!r}", missing="does not exist") from exc

    def _head_or_none(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            return self._client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in NOT_FOUND_CODES:
                return None
            raise


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _mapped(
    exc: ClientError | BotoCoreError,
    what: str,
    *,
    not_found: GenerationError | None = None,
    missing: str = "not found",
) -> GenerationError:
    """The domain error for a boto3 failure; never carries credentials."""
    if isinstance(exc, BotoCoreError):
        return StorageError(f"{what}: S3 unreachable: {exc}")
    code = _error_code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in NOT_FOUND_CODES:
        if not_found is not None:
            return not_found
        return StorageError(f"{what}: {missing} ({code})")
    if code in ACCESS_DENIED_CODES or status == 403:
        return StorageError(f"{what}: access denied ({code})")
    if status == 412:
        return StorageError(f"{what}: changed while being downloaded ({code})")
    return StorageError(f"{what}: S3 error {code} (HTTP {status})")
