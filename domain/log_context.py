"""Which generation a log line belongs to: ``generation_id`` and ``task_id`` on each of its lines.

The ids live in a ``contextvars.ContextVar``, so they follow the code that runs a job on any
thread (each thread, and each ``contextvars`` context, sees its own value) without being passed
through every call. ``LogIdsFilter`` copies them onto each ``logging.LogRecord``; outside a
job they are None. Work handed to another thread carries the ids along when it is wrapped with
``carry_log_ids`` (a new thread starts with an empty context).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

LOG_ID_FIELDS = ("generation_id", "task_id")
"""The record attributes the filter sets."""


@dataclass(frozen=True)
class LogIds:
    """The ids of the generation being worked on; None where unknown."""

    generation_id: int | None = None
    task_id: str | None = None


_CURRENT: contextvars.ContextVar[LogIds | None] = contextvars.ContextVar(
    "stylelicense_log_ids", default=None
)


def current_log_ids() -> LogIds | None:
    """The ids of the generation this code works on, or None outside a job."""
    return _CURRENT.get()


@contextmanager
def log_ids(*, generation_id: int | None = None, task_id: str | None = None) -> Iterator[LogIds]:
    """Mark the code inside as working on a job (restored on exit, also on an exception).

    Nested inside other log ids, an id left as None keeps the outer value.
    """
    outer = _CURRENT.get()
    context = LogIds(
        generation_id=(
            generation_id if generation_id is not None else (outer.generation_id if outer else None)
        ),
        task_id=task_id if task_id is not None else (outer.task_id if outer else None),
    )
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def carry_log_ids(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` bound to the caller's current context, for another thread to run.

    ``executor.submit(carry_log_ids(upload), key)`` logs the upload with the ids of the job
    that submitted it.
    """
    context = contextvars.copy_context()

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return context.copy().run(function, *args, **kwargs)

    return run


class LogIdsFilter(logging.Filter):
    """Stamps ``generation_id`` and ``task_id`` on every record (None outside a job).

    Attach it to a handler, not a logger: handler filters see the records of every logger.
    A value passed explicitly with ``extra=`` is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the ids; never drops a record."""
        context = _CURRENT.get()
        if getattr(record, "generation_id", None) is None:
            record.generation_id = context.generation_id if context else None
        if getattr(record, "task_id", None) is None:
            record.task_id = context.task_id if context else None
        return True
