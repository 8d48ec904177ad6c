"""Storage on S3 or an S3-compatible server (MinIO, Cloud Storage's XML API) through boto3.

LoRAs go through a ``LoraDiskCache`` keyed by bucket, key and ETag: every fetch costs one HEAD
(or one listing for a PEFT folder) to learn the current version, and a download only when that
version is not on disk yet, so a changed object is fetched again and a warm style costs nothing
more. Pickle formats, non-safetensors files and oversized LoRAs are refused before any download.
References are parsed by ``object_store.references`` (every form the backend stores), failures
mapped by ``s3.errors``; outputs are written once by ``s3.outputs``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from adapters.diffusion.lora.disk_cache import (
    CachedLora,
    LoraCacheKey,
    LoraDiskCache,
    LoraDiskCacheStats,
)
from adapters.diffusion.lora.files import (
    DEFAULT_MAX_BYTES,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    check_lora_file_name,
)
from adapters.object_store.references import ObjectLocation, ObjectReferences
from adapters.s3.errors import error_code, http_status, is_not_found, reading_error, storage_error
from adapters.s3.outputs import S3OutputStore
from domain.errors import (
    GenerationError,
    LoraInvalid,
    LoraNotFound,
    SignatureInvalid,
    StorageError,
)
from ports.storage import LoraArtifact, ReferenceKind, StoredOutput

log = logging.getLogger(__name__)

EXTRA_TEXT_SUFFIXES = frozenset({".md", ".txt", ".json"})
"""Besides the two required files, a PEFT folder's small text files (README.md) are downloaded."""
MAX_EXTRA_TEXT_BYTES = 1024 * 1024
DOWNLOAD_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class _Object:
    """One object of a LoRA: its key, its name relative to the LoRA, and its version."""

    key: str
    name: str
    etag: str


class S3Storage:
    """Implements ``Storage`` on S3; raises INVALID_REQUEST, LORA_NOT_FOUND, LORA_INVALID,
    SIGNATURE_INVALID or STORAGE_ERROR.

    ``client`` comes from ``make_s3_client``; ``lora_cache`` holds the downloaded LoRAs (shared
    with the metrics, which read its ``stats``). ``max_lora_bytes`` refuses a larger LoRA
    before it is downloaded; ``max_signature_bytes`` bounds a signature image before it is
    read. ``models_bucket`` (S3_MODELS_BUCKET) is optional: without it a LoRA is named by
    ``s3://bucket/key`` or a URL. ``allowed_buckets`` (S3_ALLOWED_BUCKETS; None or empty: any)
    limits the buckets a message may name. ``public_base_url`` (S3_PUBLIC_BASE_URL) wins over
    the endpoint's or AWS's URL in ``result_url``, and its URLs name outputs as references.
    """

    def __init__(
        self,
        *,
        client: Any,
        media_bucket: str,
        output_bucket: str,
        lora_cache: LoraDiskCache,
        models_bucket: str | None = None,
        allowed_buckets: Iterable[str] | None = None,
        max_lora_bytes: int = DEFAULT_MAX_BYTES,
        public_base_url: str | None = None,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        max_signature_bytes: int = 5 * 1024 * 1024,
    ) -> None:
        self._client = client
        self.lora_cache = lora_cache
        self._max_lora_bytes = max_lora_bytes
        self._max_signature_bytes = max_signature_bytes
        self._references = ObjectReferences(
            models_bucket=models_bucket,
            media_bucket=media_bucket,
            output_bucket=output_bucket,
            endpoint_url=endpoint_url,
            public_base_url=public_base_url,
            allowed_buckets=allowed_buckets,
        )
        self._outputs = S3OutputStore(
            client=client,
            bucket=output_bucket,
            public_base_url=public_base_url,
            endpoint_url=endpoint_url,
            region=region,
        )
        self._configured: dict[str, str] = {}
        """Each configured bucket and the setting that names it, in the order ``check`` heads."""
        self._configured.setdefault(media_bucket, "AWS_STORAGE_BUCKET_NAME")
        self._configured.setdefault(output_bucket, "S3_OUTPUT_BUCKET")
        if models_bucket:
            self._configured.setdefault(models_bucket, "S3_MODELS_BUCKET")

    # -- references ---------------------------------------------------------------------------

    def check_reference(self, ref: str, kind: ReferenceKind) -> None:
        """Refuse, without any network call, a reference this storage will not read."""
        self._references.resolve(ref, kind)

    def _reading_error(
        self, exc: ClientError | BotoCoreError, where: ObjectLocation, not_found: GenerationError
    ) -> GenerationError:
        return reading_error(
            exc,
            _named(where),
            not_found=not_found,
            configured_bucket=where.bucket in self._configured,
        )

    # -- LoRAs --------------------------------------------------------------------------------

    def fetch_lora(self, ref: str) -> LoraArtifact:
        """The ``.safetensors`` file or PEFT folder at ``ref``, from the disk cache if current."""
        where = self._references.resolve(ref, "lora")
        bucket, key = where.bucket, where.key
        try:
            if key.endswith("/"):
                cached = self._fetch_folder(where, bucket, key)
            else:
                head = self._head_or_none(bucket, key)
                if head is not None:
                    cached = self._fetch_file(where, bucket, key, head)
                else:
                    cached = self._fetch_folder(where, bucket, key + "/")
        except (ClientError, BotoCoreError) as exc:
            missing = LoraNotFound(f"no LoRA at {_named(where)}")
            raise self._reading_error(exc, where, missing) from exc
        except OSError as exc:
            raise StorageError(
                f"cannot store LoRA {_named(where)} locally: {exc.strerror or exc}"
            ) from exc
        if cached.hit:
            log.debug("LoRA %s served from the disk cache", where.uri)
        return LoraArtifact(ref=ref, path=str(cached.path), checksum=cached.checksum)

    def _fetch_file(
        self, where: ObjectLocation, bucket: str, key: str, head: Mapping[str, Any]
    ) -> CachedLora:
        name = key.rsplit("/", 1)[-1]
        check_lora_file_name(name)
        self._check_size(where, int(head.get("ContentLength", 0)))
        obj = _Object(key=key, name=name, etag=head["ETag"])
        return self.lora_cache.fetch(
            LoraCacheKey.of(f"s3://{bucket}/{key}", [(obj.name, obj.etag)]),
            lambda target: self._download(bucket, obj, target),
            name=name,
            folder=False,
        )

    def _fetch_folder(self, where: ObjectLocation, bucket: str, prefix: str) -> CachedLora:
        objects = list(self._list_folder(bucket, prefix))
        if not objects:
            raise LoraNotFound(f"no LoRA at {_named(where)}")
        names = {obj.name for obj, _ in objects}
        if PEFT_WEIGHTS not in names or PEFT_CONFIG not in names:
            raise LoraInvalid(
                f"LoRA folder {_named(where)} must hold {PEFT_CONFIG} and {PEFT_WEIGHTS}"
            )
        wanted = [
            (obj, size)
            for obj, size in objects
            if obj.name in (PEFT_WEIGHTS, PEFT_CONFIG)
            or (
                Path(obj.name).suffix.lower() in EXTRA_TEXT_SUFFIXES
                and size <= MAX_EXTRA_TEXT_BYTES
            )
        ]
        self._check_size(where, sum(size for _, size in wanted))

        def fill(target: Path) -> None:
            for obj, _ in wanted:
                self._download(bucket, obj, target / obj.name)

        return self.lora_cache.fetch(
            LoraCacheKey.of(f"s3://{bucket}/{prefix}", [(o.name, o.etag) for o, _ in wanted]),
            fill,
            name=prefix.rstrip("/").rsplit("/", 1)[-1],
            folder=True,
        )

    def _check_size(self, where: ObjectLocation, size: int) -> None:
        """Refuse a LoRA larger than ``max_lora_bytes`` before downloading any of it."""
        if size > self._max_lora_bytes:
            raise LoraInvalid(
                f"LoRA {_named(where)} is {size} bytes; the limit is {self._max_lora_bytes}"
            )

    def _list_folder(self, bucket: str, prefix: str) -> Iterable[tuple[_Object, int]]:
        """The files directly in the folder (sub-folders are not part of a PEFT LoRA)."""
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
        where = self._references.resolve(ref, "signature")
        try:
            response = self._client.get_object(Bucket=where.bucket, Key=where.key)
            body = response["Body"]
            try:
                size = response.get("ContentLength", 0)
                if size > self._max_signature_bytes:
                    raise SignatureInvalid(
                        f"signature image {_named(where)} is {size} bytes; "
                        f"the limit is {self._max_signature_bytes}"
                    )
                return body.read()
            finally:
                body.close()
        except (ClientError, BotoCoreError) as exc:
            missing = SignatureInvalid(f"no signature image at {_named(where)}")
            raise self._reading_error(exc, where, missing) from exc

    # -- outputs ------------------------------------------------------------------------------

    def find_output(self, key: str) -> StoredOutput | None:
        """The PNG under ``key`` with its metadata (its sidecar, else its headers), or None."""
        return self._outputs.find(key)

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        """Store the PNG unless an image is there already (the first writer wins)."""
        return self._outputs.put(key, data, metadata)

    def result_url(self, key: str) -> str:
        """Where a browser opens the output: public base URL, else the endpoint's, else AWS's."""
        return self._outputs.url(key)

    # -- start-up and readiness ---------------------------------------------------------------

    def lora_cache_stats(self) -> LoraDiskCacheStats:
        """The disk cache's counters (safe from any thread)."""
        return self.lora_cache.stats

    def check(self) -> None:
        """Every configured bucket exists and answers; ``StorageError`` naming the bucket and
        its setting (never the endpoint) otherwise."""
        for bucket, setting in self._configured.items():
            what = f"bucket {bucket!r} ({setting})"
            try:
                self._client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if is_not_found(exc):
                    raise StorageError(f"{what} does not exist") from exc
                raise storage_error(exc, what) from exc
            except BotoCoreError as exc:
                raise storage_error(exc, what) from exc

    def _head_or_none(self, bucket: str, key: str) -> dict[str, Any] | None:
        """The object's headers, or None.

        A refused HEAD has no body, so no error code, and a 4xx needs one: a 403 may be
        AccessDenied (on another's bucket: the message's fault) or InvalidAccessKeyId (ours), a
        400 InvalidArgument or RequestTimeout. A one-byte GET asks for it.
        """
        try:
            return self._client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return None
            status = http_status(exc)
            decided = status == 403 and bucket in self._configured
            if decided or error_code(exc) != str(status) or not 400 <= (status or 0) < 500:
                raise
            try:
                response = self._client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
            except ClientError as explained:
                raise explained from exc
            response["Body"].close()
            raise


def _named(where: ObjectLocation) -> str:
    """How messages name an object: ``'s3://bucket/key'``, shortened, never an endpoint URL."""
    uri = where.uri
    return repr(uri if len(uri) <= 200 else uri[:200] + "...")
