"""The RabbitMQ adapter against a real broker: declaration, settlement, the retry ladder, parking,
holding, a consumer the broker cancels, a connection the broker closes, messages whose headers
cannot be read or written back, a copy that cannot be published, and a quorum queue (which
refuses a global QoS)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.data
import pytest

from adapters import rabbitmq
from adapters.rabbitmq import RabbitMQTaskSource, delivery_headers, settling
from domain.errors import ErrorCode, FailureReport
from ports.task_source import Delivery, SourceUnavailable
from tests.integration.services import RabbitService, free_port, unavailable

MakeSource = Callable[..., RabbitMQTaskSource]


def connect(rabbit: RabbitService) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            rabbit.host,
            rabbit.port,
            rabbit.vhost,
            pika.PlainCredentials(rabbit.user, rabbit.password),
        )
    )


def publish_as_backend(
    rabbit: RabbitService, queue: str, bodies: list[bytes], headers: dict[str, Any] | None = None
) -> None:
    with connect(rabbit) as connection:
        channel = connection.channel()
        # The backend's own declare must keep working after the worker declared the queue.
        channel.queue_declare(queue=queue, durable=True)
        for body in bodies:
            channel.basic_publish(
                exchange="",
                routing_key=queue,
                body=body,
                properties=pika.BasicProperties(
                    delivery_mode=2, content_type="application/json", headers=headers
                ),
            )


class RawHeaderValue:
    """A header value published as it is given: AMQP field bytes (the type octet, then the value).
    The broker accepts values pika cannot decode into Python (a timestamp past the year 9999)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


@pytest.fixture
def raw_header_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let pika's encoder (of this test only) publish ``RawHeaderValue`` headers."""
    original = pika.data.encode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, RawHeaderValue):
            pieces.append(value.raw)
            return len(value.raw)
        return original(pieces, value)

    monkeypatch.setattr(pika.data, "encode_value", encode_value)


def ready(rabbit: RabbitService, queue: str) -> int:
    with connect(rabbit) as connection:
        return connection.channel().queue_declare(queue=queue, passive=True).method.message_count


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl against the local broker (the tests that need it reach into the broker)."""
    executable = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not shutil.which(executable):
        unavailable("rabbitmqctl", "not installed")
    done = subprocess.run(
        [executable, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def headers_of(delivery: Delivery) -> dict[str, Any]:
    """The AMQP headers a delivery arrived with (kept in the adapter's tag)."""
    return dict(delivery.tag.properties.headers or {})  # type: ignore[attr-defined]


def connects(caplog: pytest.LogCaptureFixture) -> int:
    """How many times the sources connected (log records at INFO, from the start on)."""
    return sum(
        1
        for record in caplog.records
        if record.name == rabbitmq.__name__
        and record.getMessage().startswith("connected to RabbitMQ")
    )


def records_of(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    """The adapter's log records of exactly ``level``."""
    return [
        record
        for record in caplog.records
        if record.name == rabbitmq.__name__ and record.levelno == level
    ]


def get_parked(rabbit: RabbitService, queue: str) -> tuple[dict[str, Any], bytes]:
    """Take the one message of ``<queue>.parked``: its headers and body."""
    with connect(rabbit) as connection:
        method, properties, body = connection.channel().basic_get(f"{queue}.parked", True)
    assert method is not None, "nothing parked"
    return dict(properties.headers or {}), body


def receive(source: RabbitMQTaskSource, timeout: float = 5.0) -> Delivery:
    delivery = source.receive(timeout)
    assert delivery is not None, "no delivery arrived"
    return delivery


@pytest.fixture
def queue_name() -> str:
    return f"image_generation_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_source(rabbit: RabbitService, queue_name: str) -> Iterator[MakeSource]:
    """Sources on a fresh queue; every queue any of them declared is deleted afterwards."""
    made: list[RabbitMQTaskSource] = []

    def make(**overrides: Any) -> RabbitMQTaskSource:
        arguments: dict[str, Any] = {
            "host": rabbit.host,
            "port": rabbit.port,
            "user": rabbit.user,
            "password": rabbit.password,
            "vhost": rabbit.vhost,
            "queue_name": queue_name,
            "prefetch": 3,
            "retry_delay_seconds": 1,
            "retry_max_delay_seconds": 4,
            **overrides,
        }
        made.append(RabbitMQTaskSource(**arguments))
        return made[-1]

    yield make
    names = {queue_name, f"{queue_name}.parked"}
    for task_source in made:
        task_source.close()
        names.update(task_source.retry_queue_for(delay) for delay in task_source.retry_delays)
    with connect(rabbit) as connection:
        channel = connection.channel()
        for name in sorted(names):
            channel.queue_delete(name)


@pytest.fixture
def source(make_source: MakeSource) -> RabbitMQTaskSource:
    task_source = make_source()
    task_source.start(consume=False)
    return task_source


def test_nothing_arrives_before_start_consuming(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(rabbit, queue_name, [b'{"n": 1}'])
    assert source.receive(0.5) is None
    before = time.monotonic()
    source.start_consuming()
    delivery = receive(source)
    assert delivery.body == b'{"n": 1}' and (delivery.attempt, delivery.handbacks) == (0, 0)
    assert before <= delivery.received_at <= time.monotonic()
    assert delivery.carried_failure is None and source.still_held(delivery)
    source.ack(delivery)
    assert eventually(lambda: ready(rabbit, queue_name) == 0)


def test_the_ladder_keeps_the_existing_base_queue_name(make_source: MakeSource) -> None:
    ladder = make_source(retry_delay_seconds=5, retry_max_delay_seconds=600)
    assert ladder.retry_delays == (5, 20, 80, 320, 600)
    name = ladder.queue_name
    assert ladder.retry_queue_for(0) == f"{name}.retry.5s"
    assert ladder.retry_queue_for(79.9) == f"{name}.retry.20s"
    assert ladder.retry_queue_for(80) == f"{name}.retry.80s"
    assert ladder.retry_queue_for(10_000) == f"{name}.retry.600s"
    with pytest.raises(ValueError, match="base 5s, max 4s"):
        make_source(retry_delay_seconds=5, retry_max_delay_seconds=4)


def test_retry_waits_in_the_rung_picked_and_comes_back_with_its_headers(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    legacy = FailureReport(
        generation_id=7, code=ErrorCode.GPU_OOM, message="oom", retry_count=2, poison=True
    )
    legacy_header = json.dumps({**legacy.__dict__, "code": legacy.code.value})
    publish_as_backend(
        rabbit,
        queue_name,
        [b'{"n": 2}'],
        headers={"x-trace": "abc", "x-pending-failure": legacy_header},
    )
    source.start_consuming()
    first = receive(source)
    assert first.carried_failure == legacy

    began = time.monotonic()
    source.retry(first, reason="GPU_OOM: oom", attempt=1, delay_seconds=2.5)  # rung 1 s
    again = receive(source, timeout=10)
    waited = time.monotonic() - began
    headers = headers_of(again)
    assert 0.9 <= waited < 3.5
    assert again.body == first.body and (again.attempt, again.handbacks) == (1, 1)
    assert again.carried_failure is None and "x-pending-failure" not in headers
    assert headers["x-reason"] == "GPU_OOM: oom" and headers["x-trace"] == "abc"
    assert headers["x-death"][0]["queue"] == f"{queue_name}.retry.1s"

    began = time.monotonic()
    source.retry(again, reason="x" * 5000, attempt=2, delay_seconds=100)  # the cap: 4 s
    third = receive(source, timeout=10)
    headers = headers_of(third)
    assert time.monotonic() - began >= 3.9
    assert (third.attempt, third.handbacks) == (2, 2) and len(headers["x-reason"]) == 1000
    assert headers["x-death"][0]["queue"] == f"{queue_name}.retry.4s"
    source.ack(third)
    assert eventually(lambda: ready(rabbit, queue_name) == 0)


def test_release_gives_the_message_back_as_it_is(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(
        rabbit, queue_name, [b'{"n": 3}'], headers={"x-retry-count": 2, "x-handback-count": 3}
    )
    source.start_consuming()
    first = receive(source)
    assert (first.attempt, first.handbacks) == (2, 3)
    source.release(first)
    again = receive(source, timeout=2)
    assert again.body == first.body and (again.attempt, again.handbacks) == (2, 3)
    assert again.tag != first.tag
    source.ack(again)
    assert eventually(lambda: ready(rabbit, queue_name) == 0)
    assert source.receive(0.5) is None


def test_a_closed_connection_redelivers_and_drops_settlements_of_the_old_one(
    rabbit: RabbitService, make_source: MakeSource, queue_name: str
) -> None:
    name = f"test-{uuid.uuid4().hex}"
    source = make_source(connection_name=name)
    source.start(consume=False)
    source.hold_at_most(2)
    publish_as_backend(rabbit, queue_name, [b"a", b"b", b"c"])
    source.start_consuming()
    old = [receive(source), receive(source)]
    assert all(source.still_held(delivery) for delivery in old)

    listing = rabbitmqctl(
        "list_connections", "-q", "--no-table-headers", "pid", "client_properties"
    )
    (pid,) = [line.split("\t")[0] for line in listing.splitlines() if name in line]
    rabbitmqctl("close_connection", pid, "test: connection closed")
    assert eventually(lambda: not source.still_held(old[0]))
    assert eventually(lambda: source.connected, timeout=10)
    assert not any(source.still_held(delivery) for delivery in old)

    new = [receive(source), receive(source)]
    assert sorted(d.body for d in new) == [b"a", b"b"]
    assert all(source.still_held(delivery) for delivery in new)
    assert source.receive(0.5) is None  # the hold of 2 outlived the connection
    assert eventually(lambda: ready(rabbit, queue_name) == 1)  # ... at the broker as well
    for delivery in old:  # their tags exist on the new channel too: they must not reach it
        source.ack(delivery)
        source.release(delivery)
    time.sleep(0.5)
    assert source.connected
    source.close()
    assert ready(rabbit, queue_name) == 3


def test_hold_at_most_limits_what_is_held_and_can_be_raised(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(rabbit, queue_name, [str(n).encode() for n in range(5)])
    source.hold_at_most(1)
    source.start_consuming()
    first = receive(source)
    assert source.receive(0.5) is None
    assert ready(rabbit, queue_name) == 4  # the broker sent one, not the prefetch of 3
    source.ack(first)
    second = receive(source)
    source.hold_at_most(3)
    more = [receive(source), receive(source)]
    assert source.receive(0.5) is None
    assert [d.body for d in (first, second, *more)] == [b"0", b"1", b"2", b"3"]
    for delivery in (second, *more):
        source.ack(delivery)
    assert receive(source).body == b"4"


def test_lowering_the_hold_returns_what_was_prefetched(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(rabbit, queue_name, [str(n).encode() for n in range(5)])
    source.start_consuming()
    first = receive(source)
    assert eventually(lambda: ready(rabbit, queue_name) == 2)  # two more prefetched
    source.hold_at_most(1)
    # The two prefetched went back, and none comes while the first is held: the prefetch is the
    # channel's, and counts the delivery handed out.
    assert eventually(lambda: ready(rabbit, queue_name) == 4)
    assert source.receive(0.5) is None
    assert ready(rabbit, queue_name) == 4
    source.ack(first)
    second = receive(source)
    assert second.body == b"1" and source.receive(0.5) is None
    source.ack(second)


def test_a_consumer_cancelled_by_the_broker_is_consumed_again(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    source.start_consuming()
    publish_as_backend(rabbit, queue_name, [b"before"])
    source.ack(receive(source))
    time.sleep(0.3)
    with connect(rabbit) as connection:
        channel = connection.channel()
        channel.queue_delete(queue_name)
        channel.queue_declare(queue=queue_name, durable=True)
    publish_as_backend(rabbit, queue_name, [b"after"])
    delivery = receive(source, timeout=5)
    assert delivery.body == b"after" and source.still_held(delivery)
    source.ack(delivery)
    assert eventually(lambda: ready(rabbit, queue_name) == 0)


def test_a_copy_the_broker_refuses_twice_hands_the_original_back_later(
    rabbit: RabbitService,
    source: RabbitMQTaskSource,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = f"test-{queue_name}"
    rabbitmqctl(
        "set_policy",
        "--apply-to",
        "queues",
        policy,
        f"^{queue_name}\\.retry\\.",
        json.dumps({"overflow": "reject-publish", "max-length": 0}),
    )
    try:
        time.sleep(0.5)
        publish_as_backend(rabbit, queue_name, [b'{"n": 4}'])
        source.start_consuming()
        first = receive(source)
        caplog.set_level(logging.ERROR, logger=rabbitmq.__name__)
        began = time.monotonic()
        source.retry(first, reason="GPU_OOM", attempt=1, delay_seconds=1)
        # Retried at once on every redelivery, as a runner would: the original must not come
        # back in a hot loop (it did, about 190 times a second).
        redelivered = 0
        while (remaining := began + 3 - time.monotonic()) > 0:
            delivery = source.receive(remaining)
            if delivery is not None:
                redelivered += 1
                source.retry(delivery, reason="GPU_OOM", attempt=1, delay_seconds=1)
        assert redelivered <= 1
        assert eventually(lambda: source.refused_republishes == redelivered + 1)
        errors = [
            r for r in caplog.records if r.name == rabbitmq.__name__ and r.levelno == logging.ERROR
        ]
        assert len(errors) == source.refused_republishes and "twice" in errors[0].getMessage()

        again = receive(source, timeout=8)  # handed back after 5 s: not lost, not left unsettled
        assert time.monotonic() - began >= 4.5
        assert again.body == first.body and (again.attempt, again.handbacks) == (0, 0)
        assert ready(rabbit, f"{queue_name}.retry.1s") == 0
        source.ack(again)
        assert eventually(lambda: ready(rabbit, queue_name) == 0)
    finally:
        rabbitmqctl("clear_policy", policy)


def test_park_carries_the_reason_and_the_decided_outcome_even_if_the_queue_vanished(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(rabbit, queue_name, [b"not json", b"also not json"])
    source.start_consuming()
    first, second = receive(source), receive(source)
    outcome = {"kind": "failed", "error_code": "INVALID_REQUEST", "generation_id": 5}
    source.park(first, "INVALID_REQUEST: message is not valid JSON", outcome=outcome)
    assert eventually(lambda: ready(rabbit, f"{queue_name}.parked") == 1)
    with connect(rabbit) as connection:
        method, properties, body = connection.channel().basic_get(f"{queue_name}.parked", True)
    assert method is not None and body == b"not json"
    assert properties.headers["x-park-reason"] == "INVALID_REQUEST: message is not valid JSON"
    assert json.loads(properties.headers["x-decided-outcome"]) == outcome
    assert "x-decided-outcome-truncated" not in properties.headers
    with connect(rabbit) as connection:
        connection.channel().queue_delete(f"{queue_name}.parked")

    big = {"kind": "failed", "message": "é" * 20_000}
    source.park(second, "INVALID_REQUEST: again", outcome=big)  # unroutable at first
    assert eventually(lambda: ready(rabbit, queue_name) == 0 and source.connected)
    with connect(rabbit) as connection:
        method, properties, body = connection.channel().basic_get(f"{queue_name}.parked", True)
    assert method is not None and body == b"also not json"
    assert properties.headers["x-park-reason"] == "INVALID_REQUEST: again"
    assert properties.headers["x-original-queue"] == queue_name
    assert len(properties.headers["x-decided-outcome"].encode()) <= 16 * 1024
    assert properties.headers["x-decided-outcome-truncated"] == len(
        json.dumps(big, ensure_ascii=False).encode()
    )


def test_an_unparseable_pending_failure_header_is_ignored(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(
        rabbit,
        queue_name,
        [b"{}"],
        headers={
            "x-pending-failure": '{"generation_id": "7", "code": "GPU_OOM"',
            "x-retry-count": "x",
        },
    )
    publish_as_backend(
        rabbit,
        queue_name,
        [b"{}"],
        headers={
            "x-pending-failure": json.dumps(
                {"generation_id": 7, "code": "NO_SUCH_CODE", "message": "m", "retry_count": 0}
            )
        },
    )
    source.start_consuming()
    for _ in range(2):
        delivery = receive(source)
        assert delivery.carried_failure is None and delivery.attempt == 0
        source.ack(delivery)


def test_a_pending_failure_header_nested_too_deep_is_ignored(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    # json.loads raises RecursionError on it; escaping the pika callback, it reset the
    # connection, and the broker delivered the message again at the head of the queue, forever.
    publish_as_backend(
        rabbit,
        queue_name,
        [b"nested"],
        headers={"x-pending-failure": "[" * 5000, "x-retry-count": 2, "x-handback-count": 3},
    )
    publish_as_backend(rabbit, queue_name, [b"behind it"])
    source.start_consuming()
    first, second = receive(source), receive(source)
    assert first.body == b"nested" and first.carried_failure is None
    assert (first.attempt, first.handbacks) == (2, 3)
    assert second.body == b"behind it"
    assert source.still_held(first)  # the connection it came on was never reset
    source.ack(first)
    source.ack(second)
    assert eventually(lambda: ready(rabbit, queue_name) == 0)


def test_anything_failing_while_reading_headers_hands_the_delivery_on(
    rabbit: RabbitService,
    source: RabbitMQTaskSource,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(raw: object) -> None:
        raise RuntimeError(f"cannot read {raw!r}")

    monkeypatch.setattr(delivery_headers, "_carried_failure", broken)
    caplog.set_level(logging.WARNING, logger=rabbitmq.__name__)
    headers = {"x-pending-failure": "{}", "x-retry-count": 2, "x-handback-count": 3}
    publish_as_backend(rabbit, queue_name, [b"odd"], headers=headers)
    publish_as_backend(rabbit, queue_name, [b"behind it"])
    source.start_consuming()
    first, second = receive(source), receive(source)
    assert first.body == b"odd" and first.carried_failure is None
    assert (first.attempt, first.handbacks) == (0, 0)  # taken as a first delivery
    assert second.body == b"behind it" and source.still_held(first)
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    source.ack(first)
    source.ack(second)
    assert eventually(lambda: ready(rabbit, queue_name) == 0)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"T" + struct.pack(">Q", 2**62), id="timestamp-past-year-9999"),
        pytest.param(
            b"F" + struct.pack(">I", 11) + b"\x01k" + b"T" + struct.pack(">Q", 2**62),
            id="timestamp-in-a-nested-table",
        ),
    ],
)
@pytest.mark.usefixtures("raw_header_values")
def test_headers_pika_cannot_decode_do_not_stop_the_message(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str, raw: bytes
) -> None:
    headers = {"x-retry-count": 2, "x-trace": RawHeaderValue(raw)}
    publish_as_backend(rabbit, queue_name, [b"poison"], headers=headers)
    publish_as_backend(rabbit, queue_name, [b"behind it"])
    source.start_consuming()
    first, second = receive(source), receive(source)
    assert first.body == b"poison" and second.body == b"behind it"
    assert source.still_held(first)  # the connection it came on was never reset
    assert (first.attempt, first.handbacks, first.carried_failure) == (0, 0, None)
    (reason,) = headers_of(first).values()
    assert list(headers_of(first)) == ["x-undecodable-headers"] and "Error" in reason
    properties = first.tag.properties  # type: ignore[attr-defined]
    assert (properties.content_type, properties.delivery_mode) == ("application/json", 2)
    source.ack(second)

    # The copy says the original's headers were lost; it does not pass the marker on as if it
    # were the message's header, and its own headers decode.
    source.retry(first, reason="GPU_OOM", attempt=1, delay_seconds=1)
    again = receive(source, timeout=10)
    copied = headers_of(again)
    assert again.body == b"poison" and (again.attempt, again.handbacks) == (1, 1)
    assert "x-undecodable-headers" not in copied and "x-trace" not in copied
    assert copied["x-original-headers-dropped"] == reason and copied["x-reason"] == "GPU_OOM"
    source.ack(again)
    assert eventually(lambda: ready(rabbit, queue_name) == 0)


def test_the_hold_counts_every_unsettled_delivery_on_the_broker(
    rabbit: RabbitService, make_source: MakeSource, queue_name: str
) -> None:
    source = make_source(prefetch=4)
    source.start(consume=False)
    publish_as_backend(rabbit, queue_name, [str(n).encode() for n in range(5)])
    remaining = 5

    def unacked_settles_at(count: int) -> None:
        """The broker's unacked count (all but the ready ones) reaches ``count`` and stays."""
        assert eventually(
            lambda: remaining - ready(rabbit, queue_name) == count
        ), f"unacked {remaining - ready(rabbit, queue_name)}, expected {count}"
        time.sleep(0.4)
        assert remaining - ready(rabbit, queue_name) == count

    source.hold_at_most(1)
    source.start_consuming()
    unacked_settles_at(1)
    source.hold_at_most(3)  # raised: the running consumer gets two more, not three
    unacked_settles_at(3)

    handed = [receive(source)]
    for hold in (2, 3, 2, 3, 2):
        source.hold_at_most(hold)
        unacked_settles_at(max(hold, len(handed)))
        if len(handed) < hold:
            handed.append(receive(source))
            unacked_settles_at(max(hold, len(handed)))
    assert len(handed) == 3 and source.receive(0.5) is None  # holds 3 with a hold of 2

    source.hold_at_most(0)  # no consumer: a prefetch of 0 would mean no limit
    unacked_settles_at(3)
    for _ in range(2):
        source.ack(handed.pop())
        remaining -= 1
        unacked_settles_at(len(handed))
    source.hold_at_most(2)
    unacked_settles_at(2)
    handed.append(receive(source))
    assert source.receive(0.5) is None
    for delivery in handed:
        source.ack(delivery)
    remaining -= len(handed)
    unacked_settles_at(1)
    last = receive(source)
    assert last.body == b"4"
    source.ack(last)
    assert eventually(lambda: ready(rabbit, queue_name) == 0)


def test_stop_consuming_returns_prefetched_deliveries_and_close_returns_unsettled(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(rabbit, queue_name, [json.dumps({"n": n}).encode() for n in range(5)])
    source.start_consuming()
    taken = receive(source)  # one handed out; two more prefetched (prefetch=3)
    time.sleep(0.5)
    source.stop_consuming()
    time.sleep(0.5)
    assert ready(rabbit, queue_name) == 4  # the prefetched two went back at once
    source.ack(taken)
    source.close()
    assert ready(rabbit, queue_name) == 4
    assert not source.connected and not source.still_held(taken)


def test_queue_depth_counts_ready_messages_without_consuming(
    rabbit: RabbitService, make_source: MakeSource, queue_name: str
) -> None:
    task_source = make_source(
        depth_refresh_seconds=0.1, retry_delay_seconds=5, retry_max_delay_seconds=600
    )
    publish_as_backend(rabbit, queue_name, [b"{}"] * 3)
    task_source.start(consume=False)
    assert eventually(lambda: task_source.queue_depth == 3)
    assert ready(rabbit, queue_name) == 3  # a passive declare takes nothing
    task_source.close()
    assert task_source.queue_depth is None


def test_an_unreachable_broker_is_named_at_start(make_source: MakeSource) -> None:
    port = free_port()
    task_source = make_source(host="127.0.0.1", port=port)
    with pytest.raises(SourceUnavailable, match=f"127.0.0.1:{port}.*Error"):
        task_source.start(timeout=1.5)
    assert not task_source.connected


TOO_BIG_DOUBLE = RawHeaderValue(b"d" + struct.pack(">d", 1e19))
"""A double of 2**63 or more: pika reads it as an int (10**19) its encoder refuses."""


@pytest.mark.parametrize("settle", ["retry", "park"])
@pytest.mark.usefixtures("raw_header_values")
def test_a_header_pika_reads_but_cannot_write_back_is_left_off_the_copy(
    rabbit: RabbitService,
    make_source: MakeSource,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
    settle: str,
) -> None:
    # Copied with the original's headers, it raised struct.error on the I/O thread: the
    # connection was reset, the message came back, and failed the same way, forever.
    caplog.set_level(logging.INFO, logger=rabbitmq.__name__)
    source = make_source()
    source.start(consume=False)
    headers = {"x-trace": TOO_BIG_DOUBLE, "x-keep": "k", "x-retry-count": 1}
    publish_as_backend(rabbit, queue_name, [b"poison"], headers=headers)
    publish_as_backend(rabbit, queue_name, [b"behind 1", b"behind 2"])
    source.start_consuming()
    first = receive(source)
    assert first.body == b"poison" and first.attempt == 1
    assert headers_of(first)["x-trace"] == 10**19  # what pika reads
    if settle == "retry":
        source.retry(first, reason="GPU_OOM", attempt=2, delay_seconds=1)
    else:
        source.park(first, "INVALID_REQUEST: poison", outcome={"kind": "failed"})

    behind = [receive(source), receive(source)]
    assert sorted(d.body for d in behind) == [b"behind 1", b"behind 2"]
    for delivery in behind:
        source.ack(delivery)
    if settle == "retry":
        again = receive(source, timeout=10)
        copied = headers_of(again)
        assert again.body == b"poison" and (again.attempt, again.handbacks) == (2, 2)
        assert copied["x-death"][0]["queue"] == f"{queue_name}.retry.1s"
        assert copied["x-reason"] == "GPU_OOM"
        source.ack(again)
    else:
        assert eventually(lambda: ready(rabbit, f"{queue_name}.parked") == 1)
        copied, body = get_parked(rabbit, queue_name)
        assert body == b"poison" and copied["x-park-reason"] == "INVALID_REQUEST: poison"
        assert json.loads(copied["x-decided-outcome"]) == {"kind": "failed"}
        assert copied["x-retry-count"] == 1
    dropped = copied["x-original-headers-dropped"]
    assert "'x-trace'" in dropped and "encoded" in dropped and "'x-keep'" not in dropped
    assert "x-trace" not in copied and "x-keep" not in copied
    assert eventually(lambda: ready(rabbit, queue_name) == 0)
    assert all(source.still_held(delivery) for delivery in behind)
    assert connects(caplog) == 1  # never reset
    assert not records_of(caplog, logging.ERROR)
    assert len(records_of(caplog, logging.WARNING)) == 1  # the headers left off, once


def test_anything_failing_while_publishing_a_copy_hands_the_original_back_later(
    rabbit: RabbitService,
    make_source: MakeSource,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unencodable(original: Any, headers: Any) -> pika.BasicProperties:
        del original, headers
        return pika.BasicProperties(headers={"x-big": 10**19})  # basic_publish raises

    caplog.set_level(logging.INFO, logger=rabbitmq.__name__)
    source = make_source()
    source.start(consume=False)
    publish_as_backend(rabbit, queue_name, [b"first", b"behind it"])
    source.start_consuming()
    first = receive(source)
    monkeypatch.setattr(settling, "copy_properties", unencodable)
    began = time.monotonic()
    source.retry(first, reason="GPU_OOM", attempt=1, delay_seconds=1)
    second = receive(source)
    assert second.body == b"behind it"
    source.ack(second)
    assert eventually(lambda: source.refused_republishes == 1)
    (error,) = records_of(caplog, logging.ERROR)
    assert "could not be published" in error.getMessage() and error.exc_info is not None
    monkeypatch.undo()

    again = receive(source, timeout=8)  # handed back after 5 s, as it was
    assert time.monotonic() - began >= 4.5
    assert again.body == b"first" and (again.attempt, again.handbacks) == (0, 0)
    assert ready(rabbit, f"{queue_name}.retry.1s") == 0
    # The channel still publishes with confirms: the next copy goes through.
    source.retry(again, reason="GPU_OOM", attempt=1, delay_seconds=1)
    retried = receive(source, timeout=10)
    assert retried.body == b"first" and retried.attempt == 1
    source.ack(retried)
    assert eventually(lambda: ready(rabbit, queue_name) == 0)
    assert source.still_held(second) and connects(caplog) == 1
    assert len(records_of(caplog, logging.ERROR)) == 1


def ack_one_at_a_time(source: RabbitMQTaskSource, count: int) -> dict[bytes, Delivery]:
    """Receive and ack ``count`` deliveries (15 s at most), checking that none is handed out
    while one is held (a hold of 1); by body."""
    taken: dict[bytes, Delivery] = {}
    deadline = time.monotonic() + 15
    while len(taken) < count and time.monotonic() < deadline:
        delivery = source.receive(1.0)
        if delivery is None:
            continue
        assert source.receive(0.3) is None  # the hold of 1
        taken[delivery.body] = delivery
        source.ack(delivery)
    return taken


@pytest.fixture
def quorum_rabbit(rabbit: RabbitService) -> Iterator[RabbitService]:
    """A vhost of its own whose default queue type is quorum, so that the source's argument-less
    declares accept the quorum queue declared in it (and make its retry and parked queues quorum
    too); deleted afterwards, with every queue and policy in it. Request it before
    ``make_source``: the sources close before it goes."""
    vhost = f"test-quorum-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost, "--default-queue-type", "quorum")
    try:
        rabbitmqctl("set_permissions", "-p", vhost, rabbit.user, ".*", ".*", ".*")
        yield dataclasses.replace(rabbit, vhost=vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)


def test_a_quorum_queue_is_consumed_retried_and_parked_with_a_per_consumer_hold(
    quorum_rabbit: RabbitService,
    make_source: MakeSource,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A quorum queue refuses a global QoS: the broker closed the connection (540) on every
    # consume, and the worker reconnected forever.
    with connect(quorum_rabbit) as connection:
        connection.channel().queue_declare(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
    publish_as_backend(quorum_rabbit, queue_name, [str(n).encode() for n in range(5)])
    caplog.set_level(logging.INFO, logger=rabbitmq.__name__)
    source = make_source(vhost=quorum_rabbit.vhost)
    source.start(consume=False)
    source.hold_at_most(1)
    source.start_consuming()
    first = receive(source, timeout=10)
    assert source.receive(0.5) is None
    assert eventually(lambda: ready(quorum_rabbit, queue_name) == 4)  # the broker sent one
    (warning,) = [r for r in records_of(caplog, logging.WARNING) if "global QoS" in r.getMessage()]
    assert "per-consumer" in warning.getMessage() and "NOT_IMPLEMENTED" in warning.getMessage()
    assert connects(caplog) == 2  # the refused one, then per consumer

    source.hold_at_most(3)  # a new consumer: the deliveries of the old one stay held
    second, third = receive(source), receive(source)
    assert source.receive(0.5) is None  # three held
    assert [d.body for d in (first, second, third)] == [b"0", b"1", b"2"]
    assert eventually(lambda: ready(quorum_rabbit, queue_name) == 1)  # "3" prefetched
    source.hold_at_most(1)  # below what is held: nothing is handed out, the surplus goes back
    assert source.receive(0.5) is None
    # ... and the new consumer takes one again (its prefetch of 1 does not count the deliveries
    # of the old consumer); had "3" stayed in the inbox, it would have taken "4" as well.
    time.sleep(0.4)
    assert ready(quorum_rabbit, queue_name) == 1 and source.receive(0.1) is None

    source.retry(first, reason="GPU_OOM", attempt=1, delay_seconds=1)
    source.park(second, "INVALID_REQUEST: poison", outcome={"kind": "failed"})
    source.ack(third)
    assert eventually(lambda: ready(quorum_rabbit, f"{queue_name}.parked") == 1)
    parked, body = get_parked(quorum_rabbit, queue_name)
    assert body == b"1" and parked["x-park-reason"] == "INVALID_REQUEST: poison"

    rest = ack_one_at_a_time(source, 3)
    assert sorted(rest) == [b"0", b"3", b"4"]
    retried = rest[b"0"]
    assert (retried.attempt, retried.handbacks) == (1, 1)
    assert headers_of(retried)["x-death"][0]["queue"] == f"{queue_name}.retry.1s"
    assert eventually(lambda: ready(quorum_rabbit, queue_name) == 0)
    assert source.still_held(retried) and connects(caplog) == 2
    types = rabbitmqctl(
        "list_queues", "-q", "--no-table-headers", "-p", quorum_rabbit.vhost, "name", "type"
    )
    assert f"{queue_name}\tquorum" in types
