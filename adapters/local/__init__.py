"""A local folder laid out like S3 (``<root>/<bucket>/<key>``): storage and records."""

from adapters.local.records import LocalRecordStore
from adapters.local.storage import LocalStorage

__all__ = ["LocalRecordStore", "LocalStorage"]
