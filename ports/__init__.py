"""The interfaces the use case needs; adapters implement them."""

from ports.image_model import BatchItem, ImageModel, StepCallback
from ports.notifier import Notifier
from ports.storage import LoraArtifact, Storage, StoredOutput
from ports.task_source import Delivery, TaskSource
from ports.telemetry import NoTelemetry, Telemetry

__all__ = [
    "BatchItem",
    "Delivery",
    "ImageModel",
    "LoraArtifact",
    "Notifier",
    "StepCallback",
    "Storage",
    "StoredOutput",
    "TaskSource",
    "Telemetry",
    "NoTelemetry",
]
