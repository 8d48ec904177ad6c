"""The parked tool's pure parts: ids, a replayed copy's headers, selection, formatting, usage."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
from datetime import datetime, timezone

import pika
import pytest

from adapters.rabbitmq.delivery_headers import OVERFLOW_HEADER
from adapters.rabbitmq.parked import ParkedMessage, message_id, replay_headers, replay_properties
from app import parked_command
from app.cli import build_parser, main
from app.parked_command import UsageError, match_ids
from app.parked_format import body_fields, describe, to_json, whole

WHEN = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
PARK = {
    "x-park-reason": "INVALID_REQUEST: not JSON",
    "x-parked-at": "2025-02-01T10:00:00+00:00",
    "x-original-queue": "image_generation",
    "x-retry-count": 3,
    "x-handback-count": 2,
    "x-reason": "webhook 503",
    "x-pending-failure": "{}",
    "x-decided-outcome": '{"kind": "failed"}',
    "x-decided-outcome-truncated": 99999,
}


def parked(
    body: bytes, parked_at: str = "2025-02-01T10:00:00+00:00", **headers: object
) -> ParkedMessage:
    properties = pika.BasicProperties(headers={**PARK, "x-parked-at": parked_at, **headers})
    return ParkedMessage.read(body, properties, delivery_tag=1)


def test_the_id_is_sha256_of_parked_at_nul_body() -> None:
    expected = hashlib.sha256(b"2025-02-01T10:00:00+00:00\0body").hexdigest()[:12]
    assert message_id("2025-02-01T10:00:00+00:00", b"body") == expected
    assert parked(b"body").id == expected
    assert parked(b"body", parked_at="2025-02-01T10:00:01+00:00").id != expected
    assert parked(b"body2").id != expected
    no_header = ParkedMessage.read(b"body", pika.BasicProperties(), 1)
    assert no_header.id == hashlib.sha256(b"\0body").hexdigest()[:12]


def test_a_bytes_parked_at_gives_the_same_id_as_text() -> None:
    assert parked(b"b", parked_at=b"2025-01-01").id == message_id("2025-01-01", b"b")  # type: ignore[arg-type]


def test_fields_are_read_leniently_from_body_and_headers() -> None:
    message = parked(json.dumps({"task_id": "t-1", "data": {"generation_id": 42}}).encode())
    assert (message.generation_id, message.task_id) == (42, "t-1")
    assert (message.attempts, message.handbacks, message.outcome_full_size) == (3, 2, 99999)
    assert message.reason == "INVALID_REQUEST: not JSON"
    for body in (b"\xff\xfe", b"[1]", b'{"data": {"generation_id": true}}', b'{"task_id": 5}'):
        assert (parked(body).generation_id, parked(body).task_id) == (None, None), body


def test_a_replayed_copy_loses_the_workers_headers_and_keeps_the_others() -> None:
    headers = replay_headers({**PARK, "traceparent": "00-abc", "x-death": [{"count": 1}]}, WHEN)
    assert headers == {
        "traceparent": "00-abc",
        "x-death": [{"count": 1}],
        "x-replayed-at": WHEN.isoformat(),
        "x-replay-count": 1,
    }
    again = replay_headers({**PARK, "x-replay-count": 4}, WHEN)
    assert again["x-replay-count"] == 5


def test_a_replayed_copy_does_not_carry_the_overflow_mark() -> None:
    """A copy that waited because the parked queue was full is marked; replayed, it starts afresh
    (the worker would otherwise park it again without running it)."""
    assert OVERFLOW_HEADER == "x-park-overflow"
    headers = replay_headers({**PARK, OVERFLOW_HEADER: 2, "traceparent": "00-abc"}, WHEN)
    assert OVERFLOW_HEADER not in headers and headers["traceparent"] == "00-abc"


def test_undecodable_headers_are_said_dropped_on_the_replayed_copy() -> None:
    headers = replay_headers({"x-undecodable-headers": "ValueError: year 10000"}, WHEN)
    assert headers["x-original-headers-dropped"] == "ValueError: year 10000"
    assert "x-undecodable-headers" not in headers and headers["x-replay-count"] == 1


def test_a_replayed_copy_is_persistent_with_the_original_properties() -> None:
    original = pika.BasicProperties(
        content_type="application/json", message_id="m-1", app_id="backend", headers=dict(PARK)
    )
    copy = replay_properties(original, WHEN)
    assert copy.delivery_mode == 2
    assert (copy.content_type, copy.message_id, copy.app_id) == (
        "application/json",
        "m-1",
        "backend",
    )
    assert set(copy.headers) == {"x-replayed-at", "x-replay-count"}


def test_prefixes_select_by_unique_id_and_refuse_unknown_or_ambiguous() -> None:
    one, two = parked(b"1"), parked(b"2")
    three = dataclasses.replace(parked(b"3"), id=one.id[:6] + "000000")
    messages = [one, two, three]
    assert match_ids([two.id[:4]], messages) == [two] or two.id[:4] == one.id[:4]
    assert match_ids([two.id, one.id], messages) == [one, two]  # in queue order
    assert match_ids([one.id[:7]], messages) == [one]
    with pytest.raises(UsageError, match="no parked message") as unknown:
        match_ids(["abcdef123456"], messages)
    assert "abcdef123456" in str(unknown.value)
    with pytest.raises(UsageError, match="ambiguous") as ambiguous:
        match_ids([one.id[:6]], messages)
    assert one.id in str(ambiguous.value) and three.id in str(ambiguous.value)


def test_copies_sharing_an_id_are_all_selected_in_order() -> None:
    same = [parked(b"same"), parked(b"other"), parked(b"same")]
    assert same[0].id == same[2].id
    assert match_ids([same[0].id[:4]], same) == [same[0], same[2]]


def test_a_body_that_is_not_utf8_is_base64_everywhere() -> None:
    body = b"\xff\x00\xfe"
    assert body_fields(body) == {"body_base64": base64.b64encode(body).decode()}
    assert body_fields("é".encode()) == {"body": "é"}
    message = parked(body)
    assert base64.b64decode(whole(message)["body_base64"]) == body and "body" not in whole(message)
    text = describe(message)
    assert text[-2:] == ["body (not UTF-8, base64):", base64.b64encode(body).decode()]


def test_the_whole_message_has_every_header_and_property() -> None:
    properties = pika.BasicProperties(
        content_type="application/json", headers={**PARK, "blob": b"\xff", "when": WHEN}
    )
    fields = json.loads(to_json(whole(ParkedMessage.read(b"{}", properties, 1))))
    assert fields["properties"] == {"content_type": "application/json"}
    assert fields["headers"]["x-park-reason"] == PARK["x-park-reason"]
    assert fields["headers"]["blob"] == {"body_base64": "/w=="}
    assert fields["headers"]["when"] == WHEN.isoformat()
    assert fields["decided_outcome"] == {"kind": "failed"}
    assert fields["decided_outcome_full_size"] == 99999


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "abc"],  # too short
        ["show", "xyz123"],  # not hexadecimal
        ["show", "0123456789abc"],  # too long
        ["list", "--limit", "0"],
        ["replay", "abcd", "--generation-id", "x"],
        ["migrate", "abcd"],
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["parked", *argv])
    assert exited.value.code == 2


@pytest.fixture
def unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings for a broker nobody listens on, and a standard input that is no terminal."""
    monkeypatch.setenv("RABBITMQ_HOST", "127.0.0.1")
    monkeypatch.setenv("RABBITMQ_PORT", "1")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    pika_log = logging.getLogger("pika")
    monkeypatch.setattr(pika_log, "level", pika_log.level)


@pytest.mark.parametrize(
    "argv",
    [["replay"], ["replay", "abcd", "--all"], ["purge", "--all", "--generation-id", "3"]],
)
def test_not_exactly_one_selection_is_a_usage_error(argv: list[str], unreachable: None) -> None:
    del unreachable
    with pytest.raises(SystemExit) as exited:
        main(["parked", *argv])
    assert exited.value.code == 2


@pytest.mark.parametrize("argv", [["replay", "--all"], ["purge", "abcd", "--discard"], ["migrate"]])
def test_without_a_terminal_and_yes_a_change_is_refused_before_connecting(
    argv: list[str], unreachable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    del unreachable
    assert main(["parked", *argv]) == 2  # 1 if it had tried the broker
    assert "no terminal to confirm on; add --yes" in capsys.readouterr().err


def test_an_unreachable_broker_is_one_line_naming_it(
    unreachable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    del unreachable
    assert main(["parked", "replay", "--all", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RabbitMQ at 127.0.0.1:1 is not reachable" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["purge", "--all", "--yes"],  # neither --save nor --discard
        ["purge", "--all", "--yes", "--save", "kept.jsonl", "--discard"],  # both
    ],
)
def test_purge_needs_exactly_one_of_save_and_discard(
    argv: list[str], unreachable: None, capsys: pytest.CaptureFixture[str]
) -> None:
    del unreachable
    with pytest.raises(SystemExit) as exited:
        main(["parked", *argv])
    assert exited.value.code == 2
    assert "--save" in capsys.readouterr().err


def test_a_purge_dry_run_needs_neither(unreachable: None) -> None:
    del unreachable
    assert main(["parked", "purge", "--all", "--dry-run"]) == 1  # it went on to the broker


@pytest.mark.parametrize("where", ["missing/purged.jsonl", "."])
def test_a_save_file_that_cannot_be_opened_is_refused_before_connecting(
    where: str,
    unreachable: None,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    del unreachable
    path = tmp_path / where
    assert main(["parked", "purge", "--all", "--yes", "--save", str(path)]) == 2  # 1: broker
    err = capsys.readouterr().err
    assert f"cannot open {path}" in err and "not reachable" not in err
    assert not (tmp_path / "missing").exists()


def test_a_save_file_must_be_a_regular_file(tmp_path: pathlib.Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    reader = os.open(tmp_path / "pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(OSError, match="not a regular file"):
            parked_command.SaveFile(str(tmp_path / "pipe"))
    finally:
        os.close(reader)


def test_a_fifo_without_a_reader_is_refused_without_waiting(tmp_path: pathlib.Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError):  # ENXIO at once: opening it blocking would wait for ever
        parked_command.SaveFile(str(tmp_path / "pipe"))


def test_a_line_cut_by_a_failed_write_is_taken_back_and_the_file_stays_whole_lines(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "purged.jsonl"
    saved = parked_command.SaveFile(str(path))
    saved.save('{"n": 1}')
    write = os.write

    def half_then_full(descriptor: int, data: bytes) -> int:
        write(descriptor, data[: len(data) // 2])
        raise OSError(27, "File too large")

    monkeypatch.setattr(parked_command.os, "write", half_then_full)
    with pytest.raises(parked_command.SaveFailed, match="File too large"):
        saved.save('{"n": 2, "padding": "' + "x" * 100 + '"}')
    monkeypatch.undo()
    saved.save('{"n": 3}')
    saved.close()
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 3]


def test_a_file_left_with_a_cut_last_line_is_ended_before_the_next(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "purged.jsonl"
    path.write_text('{"n": 1}\n{"n": 2, "cut')  # a run killed while the disk was full
    saved = parked_command.SaveFile(str(path))
    saved.save('{"n": 3}')
    saved.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"n": 1}' and json.loads(lines[-1]) == {"n": 3} and len(lines) == 3


def test_a_save_that_fails_is_said_as_such_never_as_the_broker(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = parked_command.SaveFile(str(tmp_path / "purged.jsonl"))
    saved.save('{"n": 1}')
    assert (tmp_path / "purged.jsonl").read_text() == '{"n": 1}\n'

    def no_space(_descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(parked_command.os, "fsync", no_space)
    with pytest.raises(parked_command.SaveFailed, match="could not save .*No space left"):
        saved.save('{"n": 2}')
    saved.close()
