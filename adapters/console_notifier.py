"""A Notifier that prints progress bars and outcomes, for the demo and ``generate``."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

from domain.errors import ErrorCode
from domain.progress import ProgressUpdate

BAR_WIDTH = 30


def progress_bar(percent: int, width: int = BAR_WIDTH) -> str:
    """``[#########---------]`` filled to ``percent``."""
    filled = round(width * max(0, min(100, percent)) / 100)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class ConsoleNotifier:
    """Implements ``Notifier`` by writing to a stream; never fails, so no backend is involved
    and ``check_access`` always accepts."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
        stream = self._stream or sys.stderr
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def progress(self, generation_id: int, update: ProgressUpdate) -> None:
        """One bar per milestone."""
        eta = "" if update.estimated_seconds is None else f", ~{update.estimated_seconds} s left"
        self._write(
            f"generation {generation_id} {progress_bar(update.progress_percent)}"
            f" {update.progress_percent:3d}% step {update.current_step}/{update.total_steps}{eta}"
        )

    def completed(self, generation_id: int, result_url: str, metadata: Mapping[str, Any]) -> None:
        """The result URL and the metadata the backend would store."""
        self._write(f"generation {generation_id} {progress_bar(100)} 100% done: {result_url}")
        self._write(json.dumps(dict(metadata), indent=2, sort_keys=True, default=str))

    def failed(self, generation_id: int, code: ErrorCode, message: str, retry_count: int) -> None:
        """The error code and message."""
        self._write(
            f"generation {generation_id} FAILED {code.value} (retry_count={retry_count}): {message}"
        )

    def check_access(self) -> None:
        """Accepts: there is no backend to refuse credentials (nothing is written)."""
