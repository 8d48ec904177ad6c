"""S3 clients of the integration tests, made the way the worker makes its own."""

from __future__ import annotations

from typing import Any

from adapters.s3 import make_s3_client
from tests.integration.services import S3Service


def client_for(s3: S3Service, **kwargs: Any) -> Any:
    """A boto3 S3 client of the test service (``kwargs``: ``make_s3_client``'s options)."""
    return make_s3_client(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
        **kwargs,
    )
