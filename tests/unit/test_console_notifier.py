"""The console notifier implements the whole port and accepts any access check."""

from __future__ import annotations

import io

from adapters.console_notifier import ConsoleNotifier
from domain.errors import ErrorCode
from domain.progress import ProgressUpdate
from ports.notifier import Notifier


def test_implements_the_port_and_check_access_accepts_silently() -> None:
    stream = io.StringIO()
    notifier = ConsoleNotifier(stream)
    assert isinstance(notifier, Notifier)
    notifier.check_access()
    assert stream.getvalue() == ""


def test_outcomes_are_written_after_an_access_check() -> None:
    stream = io.StringIO()
    notifier = ConsoleNotifier(stream)
    notifier.check_access()
    notifier.progress(5, ProgressUpdate(25, 50, 50, 4))
    notifier.failed(5, ErrorCode.GPU_OOM, "out of memory", 1)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("generation 5 [") and "50% step 25/50, ~4 s left" in lines[0]
    assert lines[1] == "generation 5 FAILED GPU_OOM (retry_count=1): out of memory"
