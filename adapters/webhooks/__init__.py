"""The backend's webhooks over HTTP: the Notifier that reports progress and outcomes."""

from adapters.webhooks.notifier import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH, HttpNotifier

__all__ = ["COMPLETE_PATH", "FAILED_PATH", "PROGRESS_PATH", "HttpNotifier"]
