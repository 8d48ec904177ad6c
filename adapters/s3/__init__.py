"""S3 and S3-compatible servers (MinIO, Cloud Storage's XML API) through boto3: storage, records."""

from adapters.s3.client import make_s3_client
from adapters.s3.records import S3RecordStore
from adapters.s3.storage import S3Storage

__all__ = ["S3RecordStore", "S3Storage", "make_s3_client"]
