"""The boto3 S3 client the storage and the record store share, and Cloud Storage's preconditions.

``make_s3_client`` builds one client from the S3 settings (path-style addressing with an endpoint,
boto3's "standard" retries); on Cloud Storage's XML API endpoint it also registers the handler
that turns S3's conditional-put headers into Cloud Storage's own (``register_gcs_preconditions``).
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError

from adapters.object_store.references import is_gcs_endpoint
from adapters.s3.errors import scrubbed
from domain.errors import StorageError

GCS_CREATE_ONLY_HEADER = "x-goog-if-generation-match"
"""Cloud Storage's XML API documents ``If-None-Match`` and ``If-Match`` for reads only; its
preconditions on uploads are ``x-goog-if-generation-match: 0`` (create only, sent beside
``If-None-Match: *``) and ``x-goog-if-generation-match: <generation>`` (replace that generation
only, sent instead of an ``If-Match`` naming the generation)."""
GCS_GENERATION_HEADER = "x-goog-generation"
"""Cloud Storage's answer header naming an object's generation (GET, HEAD and PUT answers)."""
GCS_PRECONDITIONS_HANDLER = "stylelicense-gcs-preconditions"
"""The ``unique_id`` of the handler that adds the precondition header: registered once."""


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
    connection errors, 5xx and throttling with backoff). On Cloud Storage's endpoint, conditional
    puts also carry its own precondition header (``register_gcs_preconditions``), and checksums
    are computed only where an operation requires one: botocore's default sends uploads
    ``aws-chunked`` with a trailing checksum, which Cloud Storage's XML API does not take.
    """
    gcs = is_gcs_endpoint(endpoint_url)
    config = Config(
        region_name=region,
        signature_version="s3v4",
        # botocore's own "max_attempts" counts retries only; "total_max_attempts" counts tries.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": "path"} if endpoint_url else None,
        request_checksum_calculation="when_required" if gcs else None,
        response_checksum_validation="when_required" if gcs else None,
    )
    try:
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )
    except (BotoCoreError, ValueError) as exc:
        raise StorageError(f"cannot create the S3 client: {scrubbed(str(exc))}") from exc
    if gcs:
        register_gcs_preconditions(client)
    return client


def register_gcs_preconditions(client: Any) -> None:
    """Make the client's conditional puts conditional on Cloud Storage too; idempotent.

    Before signing (so the header is signed), a PutObject with ``If-None-Match: *`` also gets
    ``x-goog-if-generation-match: 0``, and one with ``If-Match: <generation>`` (digits: Cloud
    Storage's generation, never an ETag) gets ``x-goog-if-generation-match: <generation>`` in its
    place. Cloud Storage answers 412 when the precondition fails.
    """
    client.meta.events.register(
        "before-sign.s3.PutObject", _gcs_preconditions, unique_id=GCS_PRECONDITIONS_HANDLER
    )


def _gcs_preconditions(request: Any, **_: Any) -> None:
    """Add Cloud Storage's precondition to a create-only put or a put replacing a generation."""
    if request.headers.get("If-None-Match") == "*":
        request.headers[GCS_CREATE_ONLY_HEADER] = "0"
    generation = request.headers.get("If-Match")
    if isinstance(generation, bytes):
        generation = generation.decode("ascii", "replace")
    if isinstance(generation, str) and generation.isascii() and generation.isdigit():
        del request.headers["If-Match"]
        request.headers[GCS_CREATE_ONLY_HEADER] = generation
