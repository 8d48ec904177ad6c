"""The interfaces the use case needs; adapters implement them."""

from ports.image_model import ImageModel, StepCallback
from ports.notifier import Notifier
from ports.storage import LoraArtifact, Storage, StoredOutput
from ports.task_source import Delivery, TaskSource

__all__ = [
    "Delivery",
    "ImageModel",
    "LoraArtifact",
    "Notifier",
    "StepCallback",
    "Storage",
    "StoredOutput",
    "TaskSource",
]
