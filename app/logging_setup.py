"""Logging for the CLI and the worker: JSON lines or text, generation ids, secrets redacted.

``LOG_FORMAT=json`` writes one JSON object per line (what log shippers parse): ``time`` (ISO-8601
UTC), ``level``, ``logger``, ``message``, ``generation_id``, ``task_id``, ``thread``, every field
passed with ``extra=`` (``duration_seconds``, ``error_code``...) and ``exception`` when there is
one. ``LOG_FORMAT=text`` writes the same on one readable line. Either way a redaction filter
replaces the configured secret values, ``Bearer <token>`` and ``Authorization:`` header values
with ``***`` in the message, its arguments, extra fields and exception text before anything is
formatted: the code must never log a secret, and this is the second line of defence.

Whatever reaches the root logger goes through that one handler: records of any logger that
propagates (also those libraries create later), Python warnings, uncaught exceptions of any
thread and "exception ignored" reports. It is also logging's last resort, used for a logger that
neither propagates nor has a handler, so no record leaves in another format. (Libraries that
install their own stderr handler, such as diffusers and transformers, are pointed at the root
logger where they are loaded.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterable
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Literal, TextIO

from domain.log_context import LOG_ID_FIELDS, LogIdsFilter

LogFormat = Literal["json", "text"]

REDACTED = "***"
MIN_SECRET_CHARS = 4
"""Shorter configured values are not redacted: a 1-3 character 'secret' would mangle every line
that happens to contain it, and protects nothing."""

NOISY_LOGGERS = (
    "diffusers",
    "transformers",
    "huggingface_hub",
    "peft",
    "urllib3",
    "PIL",
    "pika",
    "botocore",
    "boto3",
    "s3transfer",
)
"""Third-party loggers kept at WARNING or above: their INFO lines are chatter for operators."""

_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    *LOG_ID_FIELDS,
}
"""Attributes every LogRecord has: anything else on a record came from ``extra=``."""

_PLAIN_TYPES = (int, float, bool, type(None))

_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*")
_AUTHORIZATION = re.compile(
    r"(?i)\b((?:proxy-)?authorization)(['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n,;}]+"
)

_OWNED = "_stylelicense_handler"


class SecretRedactor:
    """Replaces secret values and bearer credentials in text with ``***``."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        values = sorted(
            {value for value in secrets if value and len(value) >= MIN_SECRET_CHARS},
            key=len,
            reverse=True,  # the longest first, so a secret containing another goes whole
        )
        self._secrets = (
            re.compile("|".join(re.escape(value) for value in values)) if values else None
        )

    def redact(self, text: str) -> str:
        """``text`` without any secret value or credential."""
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        text = _AUTHORIZATION.sub(rf"\1\2{REDACTED}", text)
        return _BEARER.sub(rf"\1 {REDACTED}", text)


class RedactingFilter(logging.Filter):
    """Redacts a record in place before any handler formats it.

    The message is rendered with its arguments first (so a secret passed as an argument is
    caught too) and the record keeps the redacted text with no arguments. Exception and stack
    text are rendered and redacted once; formatters use that cached text.
    """

    def __init__(self, redactor: SecretRedactor) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact; never drops a record."""
        redact = self._redactor.redact
        record.msg = redact(_rendered_message(record))
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key in _RECORD_ATTRIBUTES or isinstance(value, _PLAIN_TYPES):
                continue
            try:
                text = value if isinstance(value, str) else str(value)
            except Exception:  # pylint: disable=broad-exception-caught
                setattr(record, key, f"<unprintable {type(value).__name__}>")
                continue
            cleaned = redact(text)
            if cleaned != text:
                setattr(record, key, cleaned)
        return True


class _RootHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler ``configure_logging`` installs.

    A record that cannot be written becomes a short line in the same format naming its logger
    and the error, instead of logging's default: a traceback and the record's text on stderr.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        """Write a replacement line; never raises."""
        kind = sys.exc_info()[0]
        try:
            replacement = logging.LogRecord(
                name="logging",
                level=logging.ERROR,
                pathname=__file__,
                lineno=0,
                msg="a log record from %s could not be written: %s",
                args=(record.name, kind.__name__ if kind is not None else "unknown error"),
                exc_info=None,
            )
            self.stream.write(self.format(replacement) + self.terminator)
            self.flush()
        except Exception:  # pylint: disable=broad-exception-caught
            pass  # the stream itself is broken: nothing left to write to


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single-line JSON object."""
        payload: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "generation_id": getattr(record, "generation_id", None),
            "task_id": getattr(record, "task_id", None),
            "thread": record.threadName,
        }
        for key, value in extra_fields(record).items():
            payload[key if key not in payload else f"extra_{key}"] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exception"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        return json.dumps(payload, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``<UTC time> LEVEL logger [generation 456 task abc]: message key=value ...``."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line with the job's ids and the extra fields."""
        job = []
        generation_id = getattr(record, "generation_id", None)
        task_id = getattr(record, "task_id", None)
        if generation_id is not None:
            job.append(f"generation {generation_id}")
        if task_id is not None:
            job.append(f"task {task_id}")
        line = f"{record.asctime} {record.levelname} {record.name}"
        line += f" [{' '.join(job)}]: {record.message}" if job else f": {record.message}"
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        return line


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call added with ``extra=``."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


def configure_logging(
    level: str = "INFO",
    *,
    fmt: LogFormat = "text",
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
    capture_uncaught: bool = True,
) -> logging.Handler:
    """Send every logger's records to ``stream`` (stderr) in ``fmt``; the handler installed.

    Replaces the root logger's handlers (as ``basicConfig(force=True)`` does) and logging's last
    resort with one handler, stamps job ids, redacts ``secrets`` (the values of
    INTERNAL_API_TOKEN, AWS keys, RABBITMQ_PASS, WEBHOOK_SIGNING_SECRET...) and credentials, routes
    ``warnings`` through logging and, with ``capture_uncaught``, logs uncaught exceptions of any
    thread and "exception ignored" reports through it too, so even a crash stays one redacted
    JSON line.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if getattr(old, _OWNED, False):
            old.close()
    handler = _RootHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _OWNED, True)
    handler.addFilter(LogIdsFilter())
    handler.addFilter(RedactingFilter(SecretRedactor(secrets)))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # A logger that neither propagates nor has a handler would write plain text through this.
    logging.lastResort = handler

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.captureWarnings(True)
    if capture_uncaught:
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
        sys.unraisablehook = _log_unraisable
    return handler


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("uncaught").critical(
        "uncaught %s", kind.__name__, exc_info=(kind, value, traceback)
    )


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("uncaught").error(
        "uncaught %s in thread %s",
        args.exc_type.__name__,
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _log_unraisable(unraisable: Any) -> None:
    """An exception Python could not raise (in ``__del__``, a finalizer...): logged, not printed."""
    try:
        where = repr(unraisable.object)
    except Exception:  # pylint: disable=broad-exception-caught
        where = f"<unprintable {type(unraisable.object).__name__}>"
    logging.getLogger("uncaught").warning(
        "%s: %s",
        unraisable.err_msg or "Exception ignored in",
        where,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


def _rendered_message(record: logging.LogRecord) -> str:
    """``record.getMessage()``; a message whose arguments do not fit is kept, not lost."""
    try:
        return record.getMessage()
    except Exception:  # pylint: disable=broad-exception-caught
        return f"{record.msg} (unformattable arguments: {record.args!r})"


def _utc_iso(created: float) -> str:
    moment = datetime.fromtimestamp(created, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
