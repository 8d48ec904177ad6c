"""The interfaces the use case needs; adapters implement them."""

from ports.fonts import FontLoader
from ports.image_model import BatchItem, ImageModel, StepCallback
from ports.notifier import Notifier
from ports.records import Record, RecordStore
from ports.storage import LoraArtifact, ReferenceKind, Storage, StoredOutput
from ports.task_source import Delivery, SourceUnavailable, TaskSource
from ports.telemetry import NoTelemetry, Telemetry

__all__ = [
    "BatchItem",
    "Delivery",
    "FontLoader",
    "ImageModel",
    "LoraArtifact",
    "Notifier",
    "Record",
    "RecordStore",
    "ReferenceKind",
    "SourceUnavailable",
    "StepCallback",
    "Storage",
    "StoredOutput",
    "TaskSource",
    "Telemetry",
    "NoTelemetry",
]
