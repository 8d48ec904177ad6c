"""The bounded parked queue against a real broker: declared with its bounds, an unbounded one
left as it is, a full one that loses nothing (the same body twice, a connection closed mid-park),
and its depth read on a side channel (docs/parked-messages.md, guarantees 1 to 3)."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pika
import pytest

from adapters import rabbitmq
from tests.integration.services import RabbitService
from tests.integration.test_rabbitmq_task_source import (  # pylint: disable=unused-import
    MakeSource,
    connect,
    connects,
    eventually,
    make_source,  # a fixture
    publish_as_backend,
    queue_name,  # a fixture
    rabbitmqctl,
    ready,
    receive,
    records_of,
)


def declares_with(rabbit: RabbitService, queue: str, arguments: dict[str, Any]) -> bool:
    """Whether the broker takes a declare of ``queue`` with ``arguments`` (a 406 says the queue
    has others); on a throwaway channel."""
    with connect(rabbit) as connection:
        try:
            connection.channel().queue_declare(queue=queue, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 406, exc
            return False
    return True


def test_the_parked_queue_is_declared_with_its_bounds(
    rabbit: RabbitService, make_source: MakeSource, queue_name: str
) -> None:
    source = make_source(parked_max_messages=7, parked_ttl_seconds=3600)
    source.start(consume=False)
    parked = f"{queue_name}.parked"
    bounds = {"x-max-length": 7, "x-overflow": "reject-publish", "x-message-ttl": 3_600_000}
    assert declares_with(rabbit, parked, bounds)
    assert not declares_with(rabbit, parked, {})
    assert not declares_with(rabbit, parked, {**bounds, "x-overflow": "drop-head"})
    # The backend's queue keeps no arguments: the backend's own declare still works.
    assert declares_with(rabbit, queue_name, {})
    listing = rabbitmqctl("list_queues", "-q", "--no-table-headers", "name", "arguments")
    (line,) = [row for row in listing.splitlines() if row.split("\t")[0] == parked]
    assert "x-max-length" in line and "reject-publish" in line and "3600000" in line


def test_a_parked_queue_declared_without_bounds_is_used_as_it_is(
    rabbit: RabbitService,
    make_source: MakeSource,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As an earlier version declared it, with a message already parked in it.
    with connect(rabbit) as connection:
        channel = connection.channel()
        channel.queue_declare(queue=f"{queue_name}.parked", durable=True)
        channel.basic_publish("", f"{queue_name}.parked", b"parked before")
    caplog.set_level(logging.INFO, logger=rabbitmq.__name__)
    source = make_source(parked_max_messages=1)
    source.start(consume=False)
    (warning,) = records_of(caplog, logging.WARNING)
    assert f"{queue_name}.parked exists with other arguments" in warning.getMessage()
    assert "python -m app parked migrate" in warning.getMessage()
    publish_as_backend(rabbit, queue_name, [b"one", b"two"])
    source.start_consuming()
    for _ in range(2):
        source.park(receive(source), "INVALID_REQUEST: not JSON")
    # Unbounded as it was (no x-max-length of 1), and the consuming channel never saw a 406.
    assert eventually(lambda: ready(rabbit, f"{queue_name}.parked") == 3)
    assert ready(rabbit, queue_name) == 0 and connects(caplog) == 1
    assert declares_with(rabbit, f"{queue_name}.parked", {})


def test_a_full_parked_queue_loses_nothing_the_message_waits_and_is_parked_later(  # pylint: disable=too-many-locals
    rabbit: RabbitService,
    make_source: MakeSource,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = make_source(parked_max_messages=1, retry_delay_seconds=1, retry_max_delay_seconds=2)
    source.start(consume=False)
    caplog.set_level(logging.INFO, logger=rabbitmq.__name__)
    parked = f"{queue_name}.parked"
    # The same body twice (the backend may publish it twice), then another.
    publish_as_backend(rabbit, queue_name, [b"poison", b"poison", b"other poison"])
    source.start_consuming()
    first = receive(source)
    source.park(first, "INVALID_REQUEST: first")
    assert eventually(lambda: ready(rabbit, parked) == 1)
    refused = [receive(source), receive(source)]
    for delivery in refused:
        source.park(delivery, "INVALID_REQUEST: refused", outcome={"kind": "failed"})
    assert eventually(lambda: source.park_overflows == 2)
    assert ready(rabbit, parked) == 1  # nothing dropped from the head
    assert source.refused_republishes == 0
    errors = records_of(caplog, logging.ERROR)
    assert len(errors) == 2 and "full" in errors[0].getMessage()
    assert f"{queue_name}.retry.2s" in errors[0].getMessage()

    # They come back every 2 s and are refused again, never handed out: their park was
    # decided, so they must not run again (a told failure would be acked as a copy, and gone).
    assert eventually(lambda: source.park_overflows >= 4, timeout=8)
    assert source.receive(0.5) is None
    assert ready(rabbit, parked) == 1 and ready(rabbit, queue_name) == 0
    # Room for one: it goes in when one comes back; the other waits again, then goes in too.
    with connect(rabbit) as connection:
        method, _, body = connection.channel().basic_get(parked, True)
    assert method is not None and body == b"poison"
    assert eventually(lambda: ready(rabbit, parked) == 1, timeout=8)
    with connect(rabbit) as connection:
        method, properties, body = connection.channel().basic_get(parked, True)
    assert method is not None
    bodies = [body]
    assert eventually(lambda: ready(rabbit, parked) == 1, timeout=8)
    with connect(rabbit) as connection:
        method, later, body = connection.channel().basic_get(parked, True)
    assert method is not None
    bodies.append(body)
    assert sorted(bodies) == [b"other poison", b"poison"]
    for headers in (dict(properties.headers), dict(later.headers)):
        # The park's own headers, as decided, and no mark of the wait.
        assert headers["x-park-reason"] == "INVALID_REQUEST: refused"
        assert json.loads(headers["x-decided-outcome"]) == {"kind": "failed"}
        assert "x-park-overflow" not in headers and "x-reason" not in headers
        assert headers["x-handback-count"] >= 1
    assert source.receive(0.2) is None
    assert ready(rabbit, f"{queue_name}.retry.2s") == 0 and ready(rabbit, queue_name) == 0
    infos = [r.getMessage() for r in records_of(caplog, logging.INFO)]
    assert any("waited for room" in line for line in infos)


def test_a_copy_waiting_for_room_carries_its_count_and_is_parked_by_any_worker(
    rabbit: RabbitService, make_source: MakeSource, queue_name: str
) -> None:
    # As a worker left it: in the job queue, with the park's headers and the overflow count.
    headers = {
        "x-park-reason": "INVALID_REQUEST: x",
        "x-parked-at": "2026-11-29T00:00:00+00:00",
        "x-decided-outcome": '{"kind": "failed"}',
        "x-park-overflow": 3,
        "x-handback-count": 3,
        "x-retry-count": 0,
    }
    publish_as_backend(rabbit, queue_name, [b'{"task_id": "t"}'], headers=headers)
    source = make_source()
    source.start()
    assert eventually(lambda: ready(rabbit, f"{queue_name}.parked") == 1)
    assert source.receive(0.3) is None
    with connect(rabbit) as connection:
        method, properties, body = connection.channel().basic_get(f"{queue_name}.parked", True)
    assert method is not None and body == b'{"task_id": "t"}'
    got = dict(properties.headers)
    assert "x-park-overflow" not in got
    assert {k: got[k] for k in headers if k != "x-park-overflow"} == {
        k: v for k, v in headers.items() if k != "x-park-overflow"
    }


def test_a_full_parked_queue_and_a_dropped_connection_lose_nothing(
    rabbit: RabbitService, make_source: MakeSource, queue_name: str
) -> None:
    name = f"test-{uuid.uuid4().hex}"
    source = make_source(
        connection_name=name,
        parked_max_messages=1,
        retry_delay_seconds=1,
        retry_max_delay_seconds=30,
    )
    source.start(consume=False)
    with connect(rabbit) as connection:
        connection.channel().basic_publish("", f"{queue_name}.parked", b"fills it")
    publish_as_backend(rabbit, queue_name, [b"poison"] * 5)
    source.start_consuming()
    held = [receive(source) for _ in range(3)]
    for delivery in held:
        source.park(delivery, "INVALID_REQUEST: x")
    listing = rabbitmqctl(
        "list_connections", "-q", "--no-table-headers", "pid", "client_properties"
    )
    (pid,) = [line.split("\t")[0] for line in listing.splitlines() if name in line]
    rabbitmqctl("close_connection", pid, "test: connection closed mid-park")
    source.close()

    def everywhere() -> int:
        return ready(rabbit, queue_name) + ready(rabbit, f"{queue_name}.retry.30s")

    # Each of the five is in the job queue or waiting in the overflow queue, at least once
    # (a copy confirmed whose original's ack was lost is there twice).
    assert eventually(lambda: everywhere() >= 5, timeout=10)
    assert ready(rabbit, f"{queue_name}.parked") == 1


def test_the_parked_depth_is_read_on_a_side_channel(
    rabbit: RabbitService,
    make_source: MakeSource,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=rabbitmq.__name__)
    source = make_source(depth_refresh_seconds=0.1)
    source.start(consume=False)
    assert eventually(lambda: source.parked_depth == 0)
    publish_as_backend(rabbit, queue_name, [b"x", b"y"])
    source.start_consuming()
    for _ in range(2):
        source.park(receive(source), "INVALID_REQUEST: x")
    assert eventually(lambda: source.parked_depth == 2)
    # An operator deletes the parked queue: the depth is unknown, and the consuming channel,
    # which would be closed by a passive declare of a missing queue, goes on.
    with connect(rabbit) as connection:
        connection.channel().queue_delete(f"{queue_name}.parked")
    assert eventually(lambda: source.parked_depth is None)
    publish_as_backend(rabbit, queue_name, [b"z"])
    delivery = receive(source)
    assert source.still_held(delivery)
    source.park(delivery, "INVALID_REQUEST: z")  # declares the parked queue again
    assert eventually(lambda: source.parked_depth == 1)
    assert connects(caplog) == 1
    source.close()
    assert source.parked_depth is None


def test_a_job_with_a_stray_overflow_header_runs_and_a_huge_count_still_encodes(
    rabbit: RabbitService, make_source: MakeSource, queue_name: str
) -> None:
    park_headers = {"x-park-reason": "INVALID_REQUEST: x", "x-parked-at": "2026-11-29T00:00:00"}
    stray: list[dict[str, Any]] = [
        {"x-park-overflow": 0, **park_headers},  # 0: the worker never writes it
        {"x-park-overflow": 1},  # without the park's headers: not a copy the worker made
        {"x-park-overflow": 2**62, "x-park-reason": "", "x-parked-at": "t"},
        {"x-park-overflow": "1", **park_headers},
        {"x-park-overflow": -1, **park_headers},
    ]
    for number, headers in enumerate(stray):
        publish_as_backend(rabbit, queue_name, [f'{{"n": {number}}}'.encode()], headers=headers)
    source = make_source(parked_max_messages=1, retry_delay_seconds=1, retry_max_delay_seconds=2)
    source.start()
    handed = []
    for _ in stray:
        delivery = receive(source)
        handed.append(json.loads(delivery.body)["n"])
        source.ack(delivery)
    assert sorted(handed) == list(range(len(stray)))  # every one runs as a job
    assert ready(rabbit, f"{queue_name}.parked") == 0

    # A real copy at the largest count, while the parked queue is full: it still waits (the
    # next count is capped, so it encodes), rather than being handed back every 5 s for ever.
    with connect(rabbit) as connection:
        connection.channel().basic_publish("", f"{queue_name}.parked", b"fills it")
    publish_as_backend(
        rabbit,
        queue_name,
        [b"waited"],
        headers={"x-park-overflow": 2**63 - 1, "x-handback-count": 2**63 - 1, **park_headers},
    )
    assert eventually(lambda: source.park_overflows == 1)
    assert source.refused_republishes == 0
    assert eventually(lambda: ready(rabbit, f"{queue_name}.retry.2s") == 1)
