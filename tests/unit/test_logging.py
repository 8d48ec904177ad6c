"""Log output: JSON lines with the job's ids, readable text, and no secret in any line."""

from __future__ import annotations

import gc
import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

from app.logging_setup import REDACTED, SecretRedactor, configure_logging
from domain.errors import StorageError
from domain.log_context import log_ids

TOKEN = "tok-9f8e7d6c5b4a-internal"
AWS_KEY_ID = "AKIAEXAMPLEKEYID1234"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
RABBIT_PASS = "r4bbit-s3cret"
SIGNING_SECRET = "whsec_c2lnbmluZy1rZXktZXhhbXBsZQ=="
SECRETS = (TOKEN, AWS_KEY_ID, AWS_SECRET, RABBIT_PASS, SIGNING_SECRET)
UNCONFIGURED_BEARER = "eyJhbGciOiJIUzI1NiJ9.payload.sig"

LOG = logging.getLogger("tests.logging")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it all back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    last_resort = logging.lastResort
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
    logging.lastResort = last_resort
    logging.captureWarnings(False)


def setup(fmt: str, **kwargs: object) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(
        "DEBUG", fmt=fmt, secrets=[*SECRETS, None, ""], stream=stream, **kwargs  # type: ignore
    )
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    lines = stream.getvalue().splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]


def test_every_line_is_one_json_object_with_the_job_ids_from_its_thread() -> None:
    stream = setup("json")
    LOG.info("before the job")

    def work() -> None:
        with log_ids(generation_id=456, task_id="660f9511"):
            LOG.info("generated\nin two lines", extra={"duration_seconds": 1.25})
            LOG.warning("upload slow", extra={"error_code": "STORAGE_ERROR", "attempt": 2})

    thread = threading.Thread(target=work, name="job-io_0")
    thread.start()
    thread.join()
    first, generated, slow = json_lines(stream)

    assert first["generation_id"] is None and first["task_id"] is None
    assert first["message"] == "before the job" and first["logger"] == "tests.logging"
    assert generated["message"] == "generated\nin two lines"
    assert (generated["generation_id"], generated["task_id"]) == (456, "660f9511")
    assert generated["thread"] == "job-io_0" and generated["level"] == "INFO"
    assert generated["duration_seconds"] == 1.25
    assert (slow["level"], slow["error_code"], slow["attempt"]) == ("WARNING", "STORAGE_ERROR", 2)
    moment = datetime.fromisoformat(str(generated["time"]).replace("Z", "+00:00"))
    assert str(generated["time"]).endswith("Z") and moment.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - moment) < timedelta(minutes=1)


def test_an_exception_is_a_field_of_the_same_line() -> None:
    stream = setup("json")
    try:
        raise StorageError("bucket unreachable")
    except StorageError:
        LOG.exception("upload failed", extra={"error_code": "STORAGE_ERROR"})
    (line,) = json_lines(stream)
    assert line["message"] == "upload failed" and line["error_code"] == "STORAGE_ERROR"
    assert "Traceback" in str(line["exception"]) and "bucket unreachable" in str(line["exception"])


def test_extra_fields_cannot_overwrite_the_standard_ones() -> None:
    stream = setup("json")
    LOG.info("hello", extra={"time": "forged", "level": "forged"})
    (line,) = json_lines(stream)
    assert line["level"] == "INFO" and line["time"] != "forged"
    assert line["extra_time"] == "forged" and line["extra_level"] == "forged"


def test_text_format_shows_the_ids_and_the_extra_fields() -> None:
    stream = setup("text")
    LOG.info("idle")
    with log_ids(generation_id=7, task_id="t-7"):
        LOG.info("done in %.1f s", 2.0, extra={"duration_seconds": 2.0})
    idle, done = stream.getvalue().splitlines()
    assert idle.endswith(" INFO tests.logging: idle")
    assert done.endswith(
        " INFO tests.logging [generation 7 task t-7]: done in 2.0 s duration_seconds=2.0"
    )
    assert done[:4].isdigit() and done.split(" ", 1)[0].endswith("Z")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_secret_reaches_the_output_however_it_is_logged(fmt: str) -> None:
    stream = setup(fmt)
    with log_ids(generation_id=1, task_id="t"):
        LOG.info("token is %s", TOKEN)
        # Deliberately: a secret already inside the message text, not passed as an argument.
        LOG.info(f"aws {AWS_KEY_ID} {AWS_SECRET} in the message itself")  # pylint: disable=W1203
        LOG.warning("amqp://stylelicense:%s@broker:5672/", RABBIT_PASS)
        LOG.info("dict arg %s", {"webhook_signing_secret": SIGNING_SECRET})
        LOG.info("mapping args %(token)s", {"token": TOKEN})
        LOG.info("headers", extra={"headers": {"Authorization": f"Bearer {TOKEN}"}})
        LOG.info("plain extra", extra={"secret_access_key": AWS_SECRET})
        LOG.info("sent Authorization: Bearer %s", UNCONFIGURED_BEARER)
        LOG.info("repr {'Authorization': 'Token %s'}", UNCONFIGURED_BEARER)
        try:
            raise ConnectionError(f"login failed with password {RABBIT_PASS}")
        except ConnectionError:
            LOG.exception("broker refused")
        LOG.info("stack", stack_info=True, extra={"note": f"key={AWS_SECRET}"})
    output = stream.getvalue()
    for secret in (*SECRETS, UNCONFIGURED_BEARER):
        assert secret not in output
    assert output.count(REDACTED) >= 11
    assert "login failed with password ***" in output
    assert "amqp://stylelicense:***@broker:5672/" in output
    if fmt == "json":
        assert all(json.loads(line) for line in output.splitlines() if line.startswith("{"))


def test_redaction_keeps_everything_else_and_ignores_tiny_values() -> None:
    redactor = SecretRedactor(["abc", TOKEN, TOKEN[:8]])
    text = f"abc token={TOKEN} prefix={TOKEN[:8]} authorization header missing"
    assert redactor.redact(text) == "abc token=*** prefix=*** authorization header missing"
    assert redactor.redact("Bearer ***") == "Bearer ***"


def test_an_uncaught_thread_exception_becomes_a_redacted_log_line() -> None:
    stream = setup("json")

    def crash() -> None:
        raise RuntimeError(f"token {TOKEN} leaked into an error")

    thread = threading.Thread(target=crash, name="crasher")
    thread.start()
    thread.join()
    (line,) = json_lines(stream)
    assert line["level"] == "ERROR" and "crasher" in str(line["message"])
    assert TOKEN not in json.dumps(line) and "token *** leaked" in str(line["exception"])


def test_warnings_become_json_lines_too() -> None:
    stream = setup("json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    (line,) = json_lines(stream)
    assert line["logger"] == "py.warnings" and "deprecated thing" in str(line["message"])
    assert line["level"] == "WARNING"


def test_a_warning_from_a_thread_is_a_redacted_json_line() -> None:
    stream = setup("json")

    def warn() -> None:
        warnings.warn(f"retrying with token {TOKEN}", RuntimeWarning, stacklevel=1)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        thread = threading.Thread(target=warn, name="library-thread")
        thread.start()
        thread.join()
    (line,) = json_lines(stream)
    assert line["logger"] == "py.warnings" and line["thread"] == "library-thread"
    assert "RuntimeWarning: retrying with token ***" in str(line["message"])
    assert TOKEN not in stream.getvalue()


def test_a_secret_in_an_exception_and_its_cause_is_redacted_in_the_json_line() -> None:
    stream = setup("json")
    try:
        try:
            raise PermissionError(f"denied for {AWS_KEY_ID}")
        except PermissionError as cause:
            raise StorageError(f"upload failed, secret {AWS_SECRET}") from cause
    except StorageError:
        LOG.exception("upload failed")
    (line,) = json_lines(stream)
    exception = str(line["exception"])
    assert "Traceback" in exception and "The above exception was the direct cause" in exception
    assert "denied for ***" in exception and "upload failed, secret ***" in exception
    assert AWS_KEY_ID not in stream.getvalue() and AWS_SECRET not in stream.getvalue()


def test_a_secret_in_an_extra_field_is_redacted_and_other_extras_kept() -> None:
    stream = setup("json")
    LOG.info(
        "connecting",
        extra={
            "broker_url": f"amqp://stylelicense:{RABBIT_PASS}@broker:5672/",
            "headers": {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"},
            "bucket": "stylelicense-media",
            "sizes": [512, 768],
        },
    )
    (line,) = json_lines(stream)
    assert line["broker_url"] == "amqp://stylelicense:***@broker:5672/"
    assert line["headers"] == "{'Authorization': '***', 'Accept': 'application/json'}"
    assert line["bucket"] == "stylelicense-media" and line["sizes"] == [512, 768]


def test_a_library_logger_created_later_writes_json() -> None:
    stream = setup("json")
    library = logging.getLogger(f"somelibrary.sub{id(stream)}")
    library.setLevel(logging.DEBUG)
    library.debug("loaded %s with key %s", "weights", AWS_SECRET)
    (line,) = json_lines(stream)
    assert line["logger"] == library.name and line["message"] == "loaded weights with key ***"


def test_a_logger_without_propagation_or_handler_still_writes_json() -> None:
    stream = setup("json")
    isolated = logging.getLogger(f"isolated.library{id(stream)}")
    isolated.propagate = False
    isolated.warning("cannot reach %s", f"amqp://u:{RABBIT_PASS}@broker/")
    (line,) = json_lines(stream)
    assert (
        line["logger"] == isolated.name and line["message"] == "cannot reach amqp://u:***@broker/"
    )


def test_one_handler_only_and_basic_config_adds_none() -> None:
    setup("text")
    stream = setup("json")
    logging.basicConfig(level=logging.DEBUG)
    root = logging.getLogger()
    [handler] = root.handlers
    assert logging.lastResort is handler
    LOG.info("one line")
    assert [line["message"] for line in json_lines(stream)] == ["one line"]


def test_an_unprintable_extra_does_not_break_the_log_call() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    stream = setup("json")
    LOG.info("still logged", extra={"thing": Unprintable()})
    (line,) = json_lines(stream)
    assert (line["message"], line["thing"]) == ("still logged", "<unprintable Unprintable>")


class RefusingStream(io.StringIO):
    """A stream that cannot take one character, as an ASCII-only stderr cannot."""

    def write(self, text: str) -> int:
        if "\u2603" in text:
            raise UnicodeEncodeError("ascii", text, 0, 1, "refused")
        return super().write(text)


def test_a_record_that_cannot_be_written_becomes_a_json_replacement_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = RefusingStream()
    configure_logging("INFO", fmt="json", secrets=SECRETS, stream=stream)
    LOG.info("snowman \u2603 with %s", TOKEN)
    (line,) = json_lines(stream)
    assert line["logger"] == "logging" and line["level"] == "ERROR"
    assert line["message"] == (
        "a log record from tests.logging could not be written: UnicodeEncodeError"
    )
    assert capsys.readouterr().err == ""  # not logging's traceback dump


def test_an_exception_ignored_in_a_finalizer_is_a_redacted_json_line() -> None:
    class Leaky:
        def __del__(self) -> None:
            raise RuntimeError(f"close failed with {TOKEN}")

    stream = setup("json")
    leaky = Leaky()
    del leaky
    gc.collect()
    (line,) = json_lines(stream)
    assert line["logger"] == "uncaught" and line["level"] == "WARNING"
    assert str(line["message"]).startswith("Exception ignored in")
    assert "RuntimeError: close failed with ***" in str(line["exception"])


def test_configuring_again_replaces_the_handler_and_rejects_unknown_formats() -> None:
    first = io.StringIO()
    configure_logging("INFO", fmt="json", stream=first, capture_uncaught=False)
    second = setup("text")
    LOG.info("once")
    LOG.debug("debug shows at DEBUG")
    assert first.getvalue() == "" and len(second.getvalue().splitlines()) == 2
    assert len(logging.getLogger().handlers) == 1
    with pytest.raises(ValueError, match="'yaml'"):
        configure_logging(fmt="yaml")  # type: ignore[arg-type]
