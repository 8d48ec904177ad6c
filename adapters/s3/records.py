"""Records on S3, written with conditions: ``If-None-Match: *`` to create, ``If-Match`` to replace.

The outcome of a job is decided once and every worker must see that decision. S3 (AWS, MinIO)
evaluates a conditional ``PutObject`` atomically, so of any number of racing ``create`` calls
for one key exactly one stores its bytes and the others read them, and a ``replace`` from a
stale version is refused. A record's version is its ETag.

Cloud Storage's XML API honours neither ``If-None-Match`` nor ``If-Match`` on uploads (it
documents them for retrieval only): there a record's version is the object's generation (the
``x-goog-generation`` answer header), and the client sends ``x-goog-if-generation-match`` (``0``
to create, the generation to replace), which Cloud Storage evaluates atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from adapters.object_store.records import checked_record_key, create_or_read
from adapters.object_store.references import is_gcs_endpoint
from adapters.s3.client import GCS_GENERATION_HEADER, register_gcs_preconditions
from adapters.s3.errors import is_already_there, is_not_found, is_not_implemented, storage_error
from domain.errors import StorageError
from ports.records import Record


class S3RecordStore:
    """Implements ``RecordStore`` under ``prefix`` (OUTCOME_RECORDS_PREFIX) in ``bucket``.

    ``bucket`` is the output bucket, which the worker writes already; ``client`` comes from
    ``make_s3_client``. On Cloud Storage's endpoint (the client's, as ``make_s3_client`` tells
    it) versions are generations and ``replace`` is conditional on the generation (see the
    module). Raises ``StorageError`` (no endpoint in its message), ``ValueError`` for a malformed
    key or, on Cloud Storage, a version that is not a generation.
    """

    def __init__(self, *, client: Any, bucket: str, prefix: str) -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._gcs = is_gcs_endpoint(getattr(client.meta, "endpoint_url", None))
        if self._gcs:
            register_gcs_preconditions(client)  # already there with make_s3_client's client

    def create(self, key: str, data: bytes) -> Record:
        """Store ``data`` unless a record is there; the record under ``key`` now."""

        def create() -> Record | None:
            version = self._put(key, data, IfNoneMatch="*")
            return None if version is None else Record(data=data, version=version, created=True)

        return create_or_read(key, create, lambda: self.read(key))

    def read(self, key: str) -> Record | None:
        """The record under ``key``, or None."""
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._name(key))
            with response["Body"] as body:
                data = bytes(body.read())
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise storage_error(exc, f"record {key!r}") from exc
        except BotoCoreError as exc:
            raise storage_error(exc, f"record {key!r}") from exc
        return Record(data=data, version=self._version(key, response))

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        """Store ``data`` if the record is still at ``version``; the new version, or None."""
        if self._gcs and not (version.isascii() and version.isdigit()):
            raise ValueError(f"record {key!r}: version {version!r:.40} is not a generation")
        return self._put(key, data, IfMatch=version)

    def _put(self, key: str, data: bytes, **condition: str) -> str | None:
        """The new version, or None when the condition refused the put (412, 409, or 404 for a
        record that is gone)."""
        try:
            response = self._client.put_object(
                Bucket=self._bucket,
                Key=self._name(key),
                Body=data,
                ContentType="application/json",
                **condition,
            )
        except ClientError as exc:
            if is_already_there(exc) or is_not_found(exc):
                return None
            if is_not_implemented(exc):
                raise StorageError(
                    f"record {key!r}: the storage must support conditional writes"
                    " (If-None-Match and If-Match on PutObject)"
                ) from exc
            raise storage_error(exc, f"record {key!r}") from exc
        except BotoCoreError as exc:
            raise storage_error(exc, f"record {key!r}") from exc
        return self._version(key, response)

    def _version(self, key: str, response: Mapping[str, Any]) -> str:
        """The version an answer names: its ETag, or on Cloud Storage its generation."""
        if not self._gcs:
            return str(response["ETag"])
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        generation = str(headers.get(GCS_GENERATION_HEADER, ""))
        if not (generation.isascii() and generation.isdigit()):
            raise StorageError(
                f"record {key!r}: Cloud Storage's answer names no generation"
                f" ({GCS_GENERATION_HEADER}), which conditional replaces need"
            )
        return generation

    def _name(self, key: str) -> str:
        return self._prefix + checked_record_key(key)
