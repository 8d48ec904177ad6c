"""Generated images on S3, each written once: the first writer wins, across processes.

Two workers may render one job (a redelivery after a dropped connection). The PNG is put with
``If-None-Match: *``, so S3 (AWS, MinIO) stores the first and answers 412 to the others, who
then report the stored image and its metadata instead of their own. The metadata sidecar is
named after the PNG's content hash (``object_store.sidecars``) and written, also conditionally,
before the PNG: whichever PNG is kept, its sidecar is there and no other writer replaced it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from botocore.exceptions import BotoCoreError, ClientError

from adapters.object_store.sidecars import (
    CONTENT_SHA256,
    content_sha256,
    decode_metadata,
    encode_metadata,
    is_sha256_hex,
    legacy_sidecar_name,
    sidecar_name,
)
from adapters.s3.errors import (
    is_already_there,
    is_not_found,
    is_not_implemented,
    storage_error,
)
from domain.errors import StorageError
from ports.storage import StoredOutput

log = logging.getLogger(__name__)

HEADER_METADATA_KEYS = ("generation-id",)
"""Small ASCII entries also stored as ``x-amz-meta-*`` on the PNG, besides its content hash."""
CREATE_ATTEMPTS = 3
"""Conditional puts of one output before giving up, when the object refusing it vanishes."""
CREATE_RETRY_SECONDS = 0.2


class S3OutputStore:
    """The output bucket: ``find`` and ``put`` of PNGs with metadata, and their public URLs.

    ``public_base_url`` (S3_PUBLIC_BASE_URL: a CDN, a MinIO public URL) wins over the
    endpoint's (AWS_S3_ENDPOINT_URL) or AWS's URL in ``url``.
    """

    def __init__(
        self,
        *,
        client: Any,
        bucket: str,
        public_base_url: str | None = None,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        self._client = client
        self.bucket = bucket
        self._public_base_url = public_base_url
        self._endpoint_url = endpoint_url
        self._region = region

    def url(self, key: str) -> str:
        """Where a browser opens the output: public base URL, else the endpoint's, else AWS's."""
        quoted = quote(key, safe="/")
        if self._public_base_url:
            return f"{self._public_base_url.rstrip('/')}/{quoted}"
        if self._endpoint_url:
            return f"{self._endpoint_url.rstrip('/')}/{self.bucket}/{quoted}"
        return f"https://{self.bucket}.s3.{self._region}.amazonaws.com/{quoted}"

    def find(self, key: str) -> StoredOutput | None:
        """The PNG under ``key`` with its metadata, or None.

        Metadata: the sidecar named by the PNG's ``content-sha256`` header, else the legacy
        ``<key>.metadata.json``, else the PNG's headers alone.
        """
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise storage_error(exc, f"output {key!r}") from exc
        except BotoCoreError as exc:
            raise storage_error(exc, f"output {key!r}") from exc
        headers = {str(name): str(value) for name, value in head.get("Metadata", {}).items()}
        digest = headers.get(CONTENT_SHA256)
        names = [sidecar_name(key, digest)] if is_sha256_hex(digest) else []
        for name in [*names, legacy_sidecar_name(key)]:
            data = self._read_or_none(name)
            if data is None:
                continue
            document = decode_metadata(data, name)
            return StoredOutput(
                key=key, url=self.url(key), metadata={**headers, **(document or {})}
            )
        return StoredOutput(key=key, url=self.url(key), metadata=headers)

    def put(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        """Store the PNG unless one is there; the stored output, ``created`` False if not ours."""
        digest = content_sha256(data)
        sidecar = sidecar_name(key, digest)
        headers = {
            name: metadata[name]
            for name in HEADER_METADATA_KEYS
            if isinstance(metadata.get(name), str) and metadata[name].isascii()
        }
        headers[CONTENT_SHA256] = digest
        stored_metadata = {**headers, **metadata}
        document = encode_metadata(stored_metadata)
        own_sidecar = self._create(key, sidecar, document, "application/json", {})
        for attempt in range(CREATE_ATTEMPTS):
            if self._create(key, key, data, "image/png", headers):
                if not own_sidecar:
                    # A writer of the same image wrote the sidecar first; the image is ours.
                    self._write(key, sidecar, document)
                return StoredOutput(key=key, url=self.url(key), metadata=stored_metadata)
            stored = self.find(key)
            if stored is not None:
                if own_sidecar and stored.metadata.get(CONTENT_SHA256) != digest:
                    self._delete_quietly(sidecar)
                log.info("output %r was stored by another writer first", key)
                return replace(stored, created=False)
            time.sleep(CREATE_RETRY_SECONDS * (attempt + 1))
        raise StorageError(
            f"output {key!r}: refused as existing, yet not found {CREATE_ATTEMPTS} times"
        )

    def _create(
        self, key: str, name: str, body: bytes, content_type: str, headers: Mapping[str, str]
    ) -> bool:
        """Put ``name`` unless it exists (``If-None-Match: *``); False when it exists."""
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=body,
                ContentType=content_type,
                Metadata=dict(headers),
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if is_already_there(exc):
                return False
            if is_not_implemented(exc):
                raise StorageError(
                    f"output {key!r}: the storage must support conditional writes"
                    " (If-None-Match: * on PutObject), so that one image per job is kept"
                ) from exc
            raise storage_error(exc, f"output {key!r}") from exc
        except BotoCoreError as exc:
            raise storage_error(exc, f"output {key!r}") from exc
        return True

    def _write(self, key: str, name: str, body: bytes) -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=name, Body=body, ContentType="application/json"
            )
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, f"output {key!r}") from exc

    def _read_or_none(self, name: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=name)
            with response["Body"] as body:
                return bytes(body.read())
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise storage_error(exc, f"metadata {name!r}") from exc
        except BotoCoreError as exc:
            raise storage_error(exc, f"metadata {name!r}") from exc

    def _delete_quietly(self, name: str) -> None:
        """Remove a losing writer's sidecar; best effort (an orphan sidecar harms nothing)."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not delete the unused sidecar %r: %s", name, storage_error(exc, ""))
