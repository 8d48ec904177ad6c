"""``python -m app parked`` against the broker on this machine (docs/parked-messages.md,
guarantees 4 to 7): nothing it reads is lost, whatever happens to the tool."""

from __future__ import annotations

import json
import os
import pty
import signal
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from adapters.rabbitmq import RabbitMQTaskSource
from adapters.rabbitmq.parked import ParkedQueue
from adapters.rabbitmq.parked_migration import ParkedMigration, WorkersRunning
from adapters.rabbitmq.queues import Queues, parked_arguments
from app import parked_command
from app.cli import main
from tests.integration.services import RabbitService
from tests.integration.test_rabbitmq_task_source import connect, eventually, rabbitmqctl, ready

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def queue_name(rabbit: RabbitService) -> Iterator[str]:
    """A fresh job queue name; every queue of its family is deleted afterwards."""
    name = f"parked_test_{uuid.uuid4().hex[:8]}"
    yield name
    family = [name, f"{name}.parked", f"{name}.parked.migrating", f"{name}.parked.lock"]
    family += [f"{name}.retry.{delay}s" for delay in (1, 4, 5, 20, 80, 320, 600)]
    with connect(rabbit) as connection:
        for queue in family:
            try:  # a lock still held by a session that outlived its test is refused (405)
                connection.channel().queue_delete(queue)
            except ChannelClosedByBroker:
                pass


def park(rabbit: RabbitService, queue: str, bodies: list[bytes], **headers: Any) -> None:
    """Publish park-like copies to ``<queue>.parked`` (declared without bounds when missing)."""
    with connect(rabbit) as connection:
        channel = connection.channel()
        channel.queue_declare(f"{queue}.parked", durable=True, passive=False)
        for number, body in enumerate(bodies):
            channel.basic_publish(
                "",
                f"{queue}.parked",
                body,
                pika.BasicProperties(
                    delivery_mode=2,
                    content_type="application/json",
                    headers={
                        "x-park-reason": f"INVALID_REQUEST: number {number}",
                        "x-parked-at": f"2025-01-01T00:00:{number:02d}+00:00",
                        "x-original-queue": queue,
                        "x-retry-count": 2,
                        "x-handback-count": 1,
                        "x-decided-outcome": json.dumps({"kind": "failed", "n": number}),
                        "traceparent": f"00-{number}",
                        **headers,
                    },
                ),
            )


def job(generation_id: int) -> bytes:
    return json.dumps(
        {
            "task_id": str(uuid.uuid4()),
            "type": "image_generation",
            "data": {"generation_id": generation_id},
        }
    ).encode()


def drain(rabbit: RabbitService, queue: str) -> list[tuple[dict[str, Any], bytes]]:
    """Take every message of ``queue``: headers and body, in order."""
    taken = []
    with connect(rabbit) as connection:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((dict(properties.headers or {}), body))


def peek(rabbit: RabbitService, queue: str) -> list[bytes]:
    """The bodies of ``queue`` in order, left where they are."""
    with connect(rabbit) as connection:
        channel = connection.channel()
        bodies = []
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            bodies.append(body)
        channel.basic_nack(0, multiple=True, requeue=True)
    return bodies


def environment(rabbit: RabbitService, queue: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RABBITMQ_HOST": rabbit.host,
        "RABBITMQ_PORT": str(rabbit.port),
        "RABBITMQ_USER": rabbit.user,
        "RABBITMQ_PASS": rabbit.password,
        "RABBITMQ_VHOST": rabbit.vhost,
        "RABBITMQ_QUEUE": queue,
        "RABBITMQ_RETRY_DELAY_SECONDS": "1",
        "RABBITMQ_RETRY_MAX_DELAY_SECONDS": "4",
        **extra,
    }


def tool(
    rabbit: RabbitService, queue: str, *argv: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "parked", *argv],
        cwd=ROOT,
        env=environment(rabbit, queue, **extra),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def listed(rabbit: RabbitService, queue: str) -> list[dict[str, Any]]:
    done = tool(rabbit, queue, "list", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def adapter(rabbit: RabbitService, queue: str, max_messages: int = 10_000) -> ParkedQueue:
    return ParkedQueue(
        host=rabbit.host,
        port=rabbit.port,
        user=rabbit.user,
        password=rabbit.password,
        vhost=rabbit.vhost,
        queues=Queues(queue, (1, 4), parked_max_messages=max_messages, parked_ttl_seconds=0),
    )


def worker_source(rabbit: RabbitService, queue: str, prefetch: int) -> RabbitMQTaskSource:
    """The worker's own source on ``queue``, with the ladder of ``environment``."""
    return RabbitMQTaskSource(
        host=rabbit.host,
        port=rabbit.port,
        user=rabbit.user,
        password=rabbit.password,
        vhost=rabbit.vhost,
        queue_name=queue,
        prefetch=prefetch,
        retry_delay_seconds=1,
        retry_max_delay_seconds=4,
    )


def test_list_and_show_show_every_field_and_leave_the_queue_as_it_was(
    rabbit: RabbitService, queue_name: str
) -> None:
    bodies = [job(7), b"\xff not utf-8", job(9)]
    park(rabbit, queue_name, bodies)
    done = tool(rabbit, queue_name, "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"3 parked in {queue_name}.parked"
    assert "7" in lines[2] and "failed" in lines[2] and "INVALID_REQUEST: number 0" in lines[2]
    entries = listed(rabbit, queue_name)
    assert [e["generation_id"] for e in entries] == [7, None, 9]
    assert entries[0]["task_id"] == json.loads(bodies[0])["task_id"]
    assert entries[0]["attempts"] == 2 and entries[0]["decided_outcome"] == {
        "kind": "failed",
        "n": 0,
    }
    shown = tool(rabbit, queue_name, "show", entries[1]["id"][:5], "--json")
    assert shown.returncode == 0, shown.stderr
    whole = json.loads(shown.stdout)
    assert whole["body_base64"] and "body" not in whole
    assert whole["headers"]["traceparent"] == "00-1" and whole["original_queue"] == queue_name
    text = tool(rabbit, queue_name, "show", entries[0]["id"]).stdout
    assert bodies[0].decode() in text and "x-decided-outcome" in text and "traceparent" in text
    assert peek(rabbit, f"{queue_name}.parked") == bodies  # the same, in the same order


def test_replay_one_by_id_sends_the_same_message_afresh(
    rabbit: RabbitService, queue_name: str
) -> None:
    bodies = [job(1), job(2)]
    park(rabbit, queue_name, bodies)
    second = listed(rabbit, queue_name)[1]["id"]
    done = tool(rabbit, queue_name, "replay", second[:6], "--yes")
    assert done.returncode == 0, done.stderr
    replayed = drain(rabbit, queue_name)
    assert len(replayed) == 1
    headers, body = replayed[0]
    assert body == bodies[1]
    assert headers["traceparent"] == "00-1" and headers["x-replay-count"] == 1
    assert "x-replayed-at" in headers
    for worker_header in ("x-park-reason", "x-parked-at", "x-retry-count", "x-decided-outcome"):
        assert worker_header not in headers
    assert peek(rabbit, f"{queue_name}.parked") == [bodies[0]]


def test_a_dry_run_changes_nothing_and_no_terminal_means_no_change(
    rabbit: RabbitService, queue_name: str
) -> None:
    bodies = [job(1), job(2)]
    park(rabbit, queue_name, bodies)
    dry = tool(rabbit, queue_name, "replay", "--all", "--dry-run")
    assert dry.returncode == 0 and "would replay" in dry.stderr
    refused = tool(rabbit, queue_name, "replay", "--all")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    refused = tool(rabbit, queue_name, "purge", "--all")
    assert refused.returncode == 2
    assert peek(rabbit, f"{queue_name}.parked") == bodies
    with adapter(rabbit, queue_name) as queue:
        assert queue.count(queue_name) is None  # the job queue was not even declared


def test_the_same_body_parked_twice_is_two_entries(rabbit: RabbitService, queue_name: str) -> None:
    park(rabbit, queue_name, [b"same"], **{"x-parked-at": "2025-01-01T00:00:00+00:00"})
    park(rabbit, queue_name, [b"same"], **{"x-parked-at": "2025-01-02T00:00:00+00:00"})
    ids = [entry["id"] for entry in listed(rabbit, queue_name)]
    assert len(ids) == 2 and ids[0] != ids[1]


def test_purge_by_generation_saves_what_it_removes(
    rabbit: RabbitService, queue_name: str, tmp_path: Path
) -> None:
    bodies = [job(1), job(2), job(1), job(3)]
    park(rabbit, queue_name, bodies)
    saved = tmp_path / "purged.jsonl"
    saved.write_text('{"kept": "from before"}\n')
    done = tool(rabbit, queue_name, "purge", "--generation-id", "1", "--yes", "--save", str(saved))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # nothing on standard output: a reader that stops early loses nothing
    removed = [json.loads(line) for line in saved.read_text().splitlines()[1:]]  # appended
    assert [entry["body"].encode() for entry in removed] == [bodies[0], bodies[2]]
    assert removed[0]["headers"]["x-park-reason"] == "INVALID_REQUEST: number 0"
    assert peek(rabbit, f"{queue_name}.parked") == [bodies[1], bodies[3]]
    unknown = tool(rabbit, queue_name, "purge", "--generation-id", "99", "--yes", "--discard")
    assert unknown.returncode == 2 and peek(rabbit, f"{queue_name}.parked") == [
        bodies[1],
        bodies[3],
    ]


def test_replay_all_takes_only_what_was_parked_at_the_start(
    rabbit: RabbitService, queue_name: str
) -> None:
    """A consumer parks every replayed copy again at once: --all still ends, after N."""
    bodies = [job(n) for n in range(5)]
    park(rabbit, queue_name, bodies)
    with connect(rabbit) as connection:
        channel = connection.channel()
        channel.queue_declare(queue_name, durable=True)

        def repark(chan: Any, method: Any, properties: Any, body: bytes) -> None:
            chan.basic_publish("", f"{queue_name}.parked", body, properties)
            chan.basic_ack(method.delivery_tag)

        channel.basic_consume(queue_name, repark)
        process = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-m", "app", "parked", "replay", "--all", "--yes"],
            cwd=ROOT,
            env=environment(rabbit, queue_name),
            stderr=subprocess.PIPE,
            text=True,
        )
        while process.poll() is None:
            connection.process_data_events(time_limit=0.05)
        connection.process_data_events(time_limit=0.5)
        assert process.returncode == 0, process.stderr.read() if process.stderr else ""
        assert "replayed 5 of 5" in (process.stderr.read() if process.stderr else "")
    assert sorted(peek(rabbit, f"{queue_name}.parked")) == sorted(bodies)


def waiting_at_the_prompt(
    rabbit: RabbitService, queue: str, *argv: str
) -> tuple[subprocess.Popen[bytes], int]:
    """The tool started on a terminal, holding the messages it read, asking for confirmation."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", "app", "parked", *argv],
        cwd=ROOT,
        env=environment(rabbit, queue),
        stdin=terminal,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(terminal)
    assert eventually(lambda: ready(rabbit, f"{queue}.parked") == 0, timeout=20)
    return process, controller


def test_a_killed_tool_loses_nothing(rabbit: RabbitService, queue_name: str) -> None:
    bodies = [job(n) for n in range(4)]
    park(rabbit, queue_name, bodies)
    process, controller = waiting_at_the_prompt(rabbit, queue_name, "replay", "--all")
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    os.close(controller)
    assert eventually(lambda: ready(rabbit, f"{queue_name}.parked") == 4)
    assert peek(rabbit, f"{queue_name}.parked") == bodies


def test_a_connection_closed_by_the_broker_is_exit_1_and_loses_nothing(
    rabbit: RabbitService, queue_name: str
) -> None:
    bodies = [job(n) for n in range(3)]
    park(rabbit, queue_name, bodies)
    process, controller = waiting_at_the_prompt(rabbit, queue_name, "replay", "--all")
    connections = rabbitmqctl("list_connections", "pid", "client_properties", "--quiet")
    [pid] = [
        line.split("\t")[0]
        for line in connections.splitlines()
        if f"stylelicense parked {process.pid}" in line
    ]
    rabbitmqctl("close_connection", pid, "test closes it")
    os.write(controller, b"y\n")
    _, err = process.communicate(timeout=20)
    os.close(controller)
    assert process.returncode == 1, err
    assert b"failed after 0 of 3" in err and b"Traceback" not in err
    assert eventually(lambda: ready(rabbit, f"{queue_name}.parked") == 3)
    assert peek(rabbit, f"{queue_name}.parked") == bodies
    with adapter(rabbit, queue_name) as queue:
        assert not queue.count(queue_name)  # nothing replayed (the queue may not exist)


def test_a_message_parked_by_the_worker_is_listed_and_replayed(
    rabbit: RabbitService, queue_name: str
) -> None:
    source = worker_source(rabbit, queue_name, prefetch=1)
    try:
        source.start(consume=True)
        with connect(rabbit) as connection:
            connection.channel().basic_publish("", queue_name, b"not json")
        delivery = source.receive(5)
        assert delivery is not None
        source.park(delivery, "INVALID_REQUEST: not JSON", outcome={"kind": "failed"})
        assert eventually(lambda: ready(rabbit, f"{queue_name}.parked") == 1)
    finally:
        source.close()
    [entry] = listed(rabbit, queue_name)
    assert entry["reason"] == "INVALID_REQUEST: not JSON" and entry["attempts"] == 0
    assert tool(rabbit, queue_name, "replay", entry["id"], "--yes").returncode == 0
    replayed = drain(rabbit, queue_name)
    assert len(replayed) == 1
    headers, body = replayed[0]
    assert body == b"not json" and headers["x-replay-count"] == 1 and "x-park-reason" not in headers


def bounded(rabbit: RabbitService, queue: str, max_messages: int) -> bool:
    """Whether ``queue`` has the bounds (a declare with them is accepted; throwaway channel)."""
    with connect(rabbit) as connection:
        try:
            connection.channel().queue_declare(
                queue, durable=True, arguments=parked_arguments(max_messages, 0)
            )
        except ChannelClosedByBroker:
            return False
    return True


def test_migrate_bounds_an_unbounded_queue_keeping_the_order(
    rabbit: RabbitService, queue_name: str
) -> None:
    bodies = [job(n) for n in range(6)]
    park(rabbit, queue_name, bodies)
    extra = {"RABBITMQ_PARKED_MAX_MESSAGES": "100", "RABBITMQ_PARKED_TTL_SECONDS": "0"}
    dry = tool(rabbit, queue_name, "migrate", "--dry-run", **extra)
    assert dry.returncode == 0 and "would move" in dry.stderr
    assert not bounded(rabbit, f"{queue_name}.parked", 100)
    done = tool(rabbit, queue_name, "migrate", "--yes", **extra)
    assert done.returncode == 0, done.stderr
    assert bounded(rabbit, f"{queue_name}.parked", 100)
    [arguments] = [
        line
        for line in rabbitmqctl("list_queues", "name", "arguments").splitlines()
        if line.startswith(f"{queue_name}.parked\t")
    ]
    assert "x-max-length" in arguments and "reject-publish" in arguments
    assert peek(rabbit, f"{queue_name}.parked") == bodies
    with adapter(rabbit, queue_name) as queue:
        assert queue.count(f"{queue_name}.parked.migrating") is None  # deleted once empty
    again = tool(rabbit, queue_name, "migrate", "--yes", **extra)
    assert again.returncode == 0 and "nothing to migrate" in again.stderr


def test_migrate_into_a_queue_too_small_keeps_the_rest_and_a_rerun_finishes(
    rabbit: RabbitService, queue_name: str
) -> None:
    bodies = [job(n) for n in range(5)]
    park(rabbit, queue_name, bodies)
    small = adapter(rabbit, queue_name, max_messages=3)
    with small:
        result = ParkedMigration(small).run()
    assert (result.moved_out, result.moved_back, result.left_in_holding) == (5, 3, 2)
    assert peek(rabbit, f"{queue_name}.parked") == bodies[:3]
    assert peek(rabbit, f"{queue_name}.parked.migrating") == bodies[3:]
    said = tool(
        rabbit,
        queue_name,
        "migrate",
        "--yes",
        RABBITMQ_PARKED_MAX_MESSAGES="3",
        RABBITMQ_PARKED_TTL_SECONDS="0",
    )
    assert said.returncode == 1 and "2 message(s) stay in" in said.stderr
    drain(rabbit, f"{queue_name}.parked")  # the operator makes room
    with small:
        result = ParkedMigration(small).run()
    assert (result.moved_out, result.moved_back, result.left_in_holding) == (0, 2, 0)
    assert peek(rabbit, f"{queue_name}.parked") == bodies[3:]
    assert bounded(rabbit, f"{queue_name}.parked", 3)


def test_migrate_finishes_after_an_interruption_with_the_parked_queue_deleted(
    rabbit: RabbitService, queue_name: str
) -> None:
    """Interrupted after the move out and the delete: the rerun declares and moves back."""
    bodies = [job(n) for n in range(3)]
    with connect(rabbit) as connection:
        channel = connection.channel()
        channel.queue_declare(f"{queue_name}.parked.migrating", durable=True)
        for body in bodies:
            channel.basic_publish("", f"{queue_name}.parked.migrating", body)
    with adapter(rabbit, queue_name) as queue:
        assert queue.count() is None and ParkedMigration(queue).state().holding == 3
        result = ParkedMigration(queue).run()
    assert (result.moved_back, result.left_in_holding) == (3, 0)
    assert peek(rabbit, f"{queue_name}.parked") == bodies
    assert bounded(rabbit, f"{queue_name}.parked", 10_000)


BUSY = "another `python -m app parked` command is running on {}.parked (only one at a time"
WORKERS = "stop every worker first: scale the Deployment to 0 and pause KEDA"


def test_one_session_at_a_time_and_a_killed_one_frees_the_lock(
    rabbit: RabbitService, queue_name: str
) -> None:
    bodies = [job(n) for n in range(3)]
    park(rabbit, queue_name, bodies)
    process, controller = waiting_at_the_prompt(rabbit, queue_name, "replay", "--all")
    for argv in (
        ["list"],
        ["show", "abcd"],
        ["replay", "--all", "--yes"],
        ["purge", "--all", "--yes", "--discard"],
        ["migrate", "--yes", "--dry-run"],
    ):
        busy = tool(rabbit, queue_name, *argv, RABBITMQ_PARKED_MAX_MESSAGES="100")
        assert busy.returncode == 1, (argv, busy.stderr)
        assert BUSY.format(queue_name) in busy.stderr and busy.stderr.count("\n") == 1
        assert busy.stdout == ""
    assert ready(rabbit, f"{queue_name}.parked") == 0  # the first session still holds them
    assert not bounded(rabbit, f"{queue_name}.parked", 100)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    os.close(controller)
    assert eventually(lambda: ready(rabbit, f"{queue_name}.parked") == 3)
    with adapter(rabbit, queue_name) as queue:  # the broker deleted the lock with its connection
        assert queue.count(f"{queue_name}.parked.lock") == 0
    assert len(listed(rabbit, queue_name)) == 3
    assert peek(rabbit, f"{queue_name}.parked") == bodies


def test_migrate_is_refused_while_another_session_holds_parked_messages(
    rabbit: RabbitService, queue_name: str
) -> None:
    """The review's reproduction: a delete if_empty counts ready messages only, so deleting the
    parked queue while a session held its messages unacked dropped them."""
    bodies = [job(n) for n in range(5)]
    park(rabbit, queue_name, bodies)  # unbounded, as an earlier version declared it
    with adapter(rabbit, queue_name) as other:
        assert len(other.scan()) == 5
        refused = tool(rabbit, queue_name, "migrate", "--yes")
        assert refused.returncode == 1 and BUSY.format(queue_name) in refused.stderr
    assert peek(rabbit, f"{queue_name}.parked") == bodies
    assert not bounded(rabbit, f"{queue_name}.parked", 10_000)
    with adapter(rabbit, queue_name) as queue:
        assert queue.count(f"{queue_name}.parked.migrating") is None


def test_migrate_refuses_while_a_worker_consumes_and_changes_nothing(
    rabbit: RabbitService, queue_name: str
) -> None:
    """The review's reproduction: a worker parks while migrate runs. A park routed to the old
    parked queue as it is deleted was confirmed and dropped; now migrate does not start."""
    bodies = [job(n) for n in range(20)]
    park(rabbit, queue_name, bodies)
    jobs = [f"job {n}".encode() for n in range(30)]
    source = worker_source(rabbit, queue_name, prefetch=5)
    parked_meanwhile: list[bytes] = []

    def worker() -> None:
        while len(parked_meanwhile) < len(jobs):
            delivery = source.receive(5)
            if delivery is None:
                return
            source.park(delivery, "INVALID_REQUEST: x")
            parked_meanwhile.append(delivery.body)

    try:
        source.start(consume=True)
        with connect(rabbit) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            for body in jobs:
                channel.basic_publish("", queue_name, body, pika.BasicProperties(delivery_mode=2))
        parking = threading.Thread(target=worker)
        parking.start()
        extra = {"RABBITMQ_PARKED_MAX_MESSAGES": "100"}
        dry = tool(rabbit, queue_name, "migrate", "--dry-run", **extra)
        assert dry.returncode == 1 and f"{queue_name} has 1 consumer(s)" in dry.stderr
        assert "would refuse" in dry.stderr and WORKERS in dry.stderr
        refused = tool(rabbit, queue_name, "migrate", "--yes", **extra)
        assert refused.returncode == 1, refused.stderr
        assert f"{queue_name} has 1 consumer(s): {WORKERS}" in refused.stderr
        assert "moved" not in refused.stderr
        parking.join(60)
    finally:
        source.close()
    assert parked_meanwhile == jobs
    assert not bounded(rabbit, f"{queue_name}.parked", 100)
    assert sorted(peek(rabbit, f"{queue_name}.parked")) == sorted(bodies + jobs)
    with adapter(rabbit, queue_name) as queue:
        assert queue.count(f"{queue_name}.parked.migrating") is None


def test_migrate_checks_for_workers_again_before_deleting(
    rabbit: RabbitService, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that starts while the messages move out stops the migration before the delete;
    every message waits in the holding queue, and a rerun once it is gone finishes."""
    bodies = [job(n) for n in range(4)]
    park(rabbit, queue_name, bodies)
    with connect(rabbit) as worker:
        channel = worker.channel()
        channel.queue_declare(queue_name, durable=True)
        move = ParkedMigration._move  # pylint: disable=protected-access

        def move_then_a_worker_starts(migration: ParkedMigration, source: str, target: str) -> int:
            moved = move(migration, source, target)
            channel.basic_consume(queue_name, lambda *_: None)
            return moved

        monkeypatch.setattr(ParkedMigration, "_move", move_then_a_worker_starts)
        with adapter(rabbit, queue_name) as queue:
            with pytest.raises(WorkersRunning, match="has 1 consumer"):
                ParkedMigration(queue).run()
        assert ready(rabbit, f"{queue_name}.parked") == 0  # not deleted
    monkeypatch.undo()
    assert not bounded(rabbit, f"{queue_name}.parked", 10_000)
    assert peek(rabbit, f"{queue_name}.parked.migrating") == bodies
    with adapter(rabbit, queue_name) as queue:
        result = ParkedMigration(queue).run()
    assert (result.moved_out, result.moved_back, result.left_in_holding) == (0, 4, 0)
    assert peek(rabbit, f"{queue_name}.parked") == bodies
    assert bounded(rabbit, f"{queue_name}.parked", 10_000)


def test_migrate_to_no_limit_and_no_ttl_unbounds_the_queue_for_a_rollback(
    rabbit: RabbitService, queue_name: str
) -> None:
    bodies = [job(n) for n in range(4)]
    park(rabbit, queue_name, bodies)
    bound = {"RABBITMQ_PARKED_MAX_MESSAGES": "100", "RABBITMQ_PARKED_TTL_SECONDS": "60"}
    assert tool(rabbit, queue_name, "migrate", "--yes", **bound).returncode == 0
    unbound = {"RABBITMQ_PARKED_MAX_MESSAGES": "0", "RABBITMQ_PARKED_TTL_SECONDS": "0"}
    dry = tool(rabbit, queue_name, "migrate", "--dry-run", **unbound)
    assert dry.returncode == 0 and "would move the 4 messages" in dry.stderr
    assert "no arguments" in dry.stderr
    done = tool(rabbit, queue_name, "migrate", "--yes", **unbound)
    assert done.returncode == 0, done.stderr
    [arguments] = [
        line
        for line in rabbitmqctl("list_queues", "name", "arguments").splitlines()
        if line.startswith(f"{queue_name}.parked\t")
    ]
    assert arguments == f"{queue_name}.parked\t[]"
    with connect(rabbit) as connection:  # what every earlier version declares: accepted
        connection.channel().queue_declare(f"{queue_name}.parked", durable=True)
    assert peek(rabbit, f"{queue_name}.parked") == bodies
    again = tool(rabbit, queue_name, "migrate", "--yes", **unbound)
    assert again.returncode == 0 and "nothing to migrate" in again.stderr


@pytest.fixture
def in_process(rabbit: RabbitService, queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``main`` in this process with the tool's settings; the logging it sets up is undone."""
    for name, value in environment(rabbit, queue_name).items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    pika_log = logging.getLogger("pika")
    monkeypatch.setattr(pika_log, "level", pika_log.level)


def test_purge_saves_each_message_on_disk_before_it_is_removed(
    rabbit: RabbitService,
    queue_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    in_process: None,
) -> None:
    del in_process
    bodies = [job(1), job(2), job(1)]
    park(rabbit, queue_name, bodies)
    saved = tmp_path / "purged.jsonl"
    acked = ParkedQueue.purge
    on_disk_at_ack: list[bytes] = []

    def checked_purge(queue: ParkedQueue, message: Any) -> None:
        last = json.loads(saved.read_text().splitlines()[-1])
        on_disk_at_ack.append(last["body"].encode() if last["id"] == message.id else b"")
        acked(queue, message)

    monkeypatch.setattr(ParkedQueue, "purge", checked_purge)
    assert main(["parked", "purge", "--generation-id", "1", "--yes", "--save", str(saved)]) == 0
    assert on_disk_at_ack == [bodies[0], bodies[2]]
    assert peek(rabbit, f"{queue_name}.parked") == [bodies[1]]


def test_a_save_that_fails_leaves_the_message_parked_and_blames_the_file(
    rabbit: RabbitService,
    queue_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    in_process: None,
) -> None:
    del in_process
    bodies = [job(n) for n in range(3)]
    park(rabbit, queue_name, bodies)
    saved = tmp_path / "purged.jsonl"
    fsync = os.fsync
    calls: list[int] = []

    def full_after_one(descriptor: int) -> None:
        calls.append(descriptor)
        if len(calls) > 1:
            raise BrokenPipeError(32, "Broken pipe")
        fsync(descriptor)

    monkeypatch.setattr(parked_command.os, "fsync", full_after_one)
    assert main(["parked", "purge", "--all", "--yes", "--save", str(saved)]) == 1
    err = capsys.readouterr().err
    assert f"could not save {saved}" in err and "1 of 3 purged" in err
    assert "the broker" not in err and "Traceback" not in err
    monkeypatch.undo()
    assert peek(rabbit, f"{queue_name}.parked") == bodies[1:]
    # The line that was not known to be on disk is cut off again: whole lines only.
    assert [json.loads(line)["body"].encode() for line in saved.read_text().splitlines()] == [
        bodies[0]
    ]


def test_purge_discard_keeps_no_copy_and_neither_is_a_usage_error(
    rabbit: RabbitService, queue_name: str
) -> None:
    bodies = [job(1), job(2)]
    park(rabbit, queue_name, bodies)
    neither = tool(rabbit, queue_name, "purge", "--all", "--yes")
    assert neither.returncode == 2 and "--save FILE" in neither.stderr
    first = listed(rabbit, queue_name)[0]["id"]
    done = tool(rabbit, queue_name, "purge", first, "--yes", "--discard")
    assert done.returncode == 0 and done.stdout == "" and "purged 1 of 1" in done.stderr
    assert peek(rabbit, f"{queue_name}.parked") == [bodies[1]]


def test_purge_into_a_reader_that_stops_early_loses_nothing(
    rabbit: RabbitService, queue_name: str, tmp_path: Path
) -> None:
    """The review's reproduction: ``purge --all --yes | head -1`` acked 20, one line was kept."""
    bodies = [job(n) for n in range(20)]
    park(rabbit, queue_name, bodies)
    saved = tmp_path / "purged.jsonl"
    piped = subprocess.run(
        f"{sys.executable} -m app parked purge --all --yes --save {saved} | (sleep 1; head -1)",
        shell=True,
        cwd=ROOT,
        env=environment(rabbit, queue_name),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.stdout == "" and "purged 20 of 20" in piped.stderr
    kept = [json.loads(line)["body"].encode() for line in saved.read_text().splitlines()]
    assert kept == bodies and ready(rabbit, f"{queue_name}.parked") == 0
