"""The backend's webhooks over HTTP: the Notifier that reports progress and outcomes.

``HttpNotifier`` (``notifier``) is the adapter; its parts:

- ``transport``: one HTTP attempt: the paths, the message serialized once, the session;
- ``signing``: the headers of every request, the Standard Webhooks signature;
- ``outcome_sender``: ``completed`` and ``failed`` with brief retries, raising by the answer;
- ``answers``: what an answer or a transport error means (send again, maybe applied, refused);
- ``progress_sender``: progress on a background thread, completions resent over late progress.

Every module logs as ``adapters.webhooks``.
"""

from adapters.webhooks.notifier import HttpNotifier
from adapters.webhooks.transport import COMPLETE_PATH, FAILED_PATH, PROGRESS_PATH

__all__ = ["COMPLETE_PATH", "FAILED_PATH", "PROGRESS_PATH", "HttpNotifier"]
