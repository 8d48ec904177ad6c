"""The RabbitMQ adapter against a real broker: declaration, settlement, retries, parking."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pika
import pytest

from adapters.rabbitmq_task_source import RabbitMQTaskSource
from domain.errors import ErrorCode, FailureReport
from ports.task_source import Delivery
from tests.integration.services import RabbitService


@pytest.fixture
def queue_name(rabbit: RabbitService) -> Iterator[str]:
    name = f"image_generation_{uuid.uuid4().hex[:8]}"
    yield name
    with connect(rabbit) as connection:
        channel = connection.channel()
        for suffix in ("", ".parked", ".retry.1s"):
            channel.queue_delete(name + suffix)


def connect(rabbit: RabbitService) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            rabbit.host,
            rabbit.port,
            rabbit.vhost,
            pika.PlainCredentials(rabbit.user, rabbit.password),
        )
    )


def publish_as_backend(rabbit: RabbitService, queue: str, bodies: list[bytes]) -> None:
    with connect(rabbit) as connection:
        channel = connection.channel()
        # The backend's own declare must keep working after the worker declared the queue.
        channel.queue_declare(queue=queue, durable=True)
        for body in bodies:
            channel.basic_publish(
                exchange="",
                routing_key=queue,
                body=body,
                properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            )


def ready(rabbit: RabbitService, queue: str) -> int:
    with connect(rabbit) as connection:
        return connection.channel().queue_declare(queue=queue, passive=True).method.message_count


@pytest.fixture
def source(rabbit: RabbitService, queue_name: str) -> Iterator[RabbitMQTaskSource]:
    task_source = RabbitMQTaskSource(
        host=rabbit.host,
        port=rabbit.port,
        user=rabbit.user,
        password=rabbit.password,
        vhost=rabbit.vhost,
        queue_name=queue_name,
        prefetch=3,
        retry_delay_seconds=1,
    )
    task_source.start(consume=False)
    yield task_source
    task_source.close()


def receive(source: RabbitMQTaskSource, timeout: float = 5.0) -> Delivery:
    delivery = source.receive(timeout)
    assert delivery is not None, "no delivery arrived"
    return delivery


def test_nothing_arrives_before_start_consuming(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(rabbit, queue_name, [b'{"n": 1}'])
    assert source.receive(0.5) is None
    source.start_consuming()
    delivery = receive(source)
    assert delivery.body == b'{"n": 1}' and delivery.attempt == 0 and not delivery.redelivered
    source.ack(delivery)
    time.sleep(0.3)
    assert ready(rabbit, queue_name) == 0


def test_retry_comes_back_later_with_the_attempt_and_the_decided_failure(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(rabbit, queue_name, [b'{"n": 2}'])
    source.start_consuming()
    first = receive(source)
    report = FailureReport(
        generation_id=7, code=ErrorCode.GPU_OOM, message="oom", retry_count=2, poison=True
    )
    began = time.monotonic()
    source.retry(first, "GPU_OOM: oom", report)
    again = receive(source, timeout=10)
    assert time.monotonic() - began >= 0.9  # waited in <queue>.retry.1s
    assert again.body == first.body and again.attempt == 1
    assert again.pending_failure == report
    source.retry(again, "again")
    third = receive(source, timeout=10)
    assert third.attempt == 2 and third.pending_failure is None
    source.ack(third)


def test_park_moves_the_message_aside_with_its_reason_even_if_the_queue_vanished(
    rabbit: RabbitService, source: RabbitMQTaskSource, queue_name: str
) -> None:
    publish_as_backend(rabbit, queue_name, [b"not json", b"also not json"])
    source.start_consuming()
    first, second = receive(source), receive(source)
    source.park(first, "INVALID_REQUEST: message is not valid JSON")
    time.sleep(0.5)
    with connect(rabbit) as connection:
        connection.channel().queue_delete(f"{queue_name}.parked")
    source.park(second, "INVALID_REQUEST: again")  # unroutable at first: re-declared, parked
    time.sleep(0.5)
    with connect(rabbit) as connection:
        method, properties, body = connection.channel().basic_get(f"{queue_name}.parked", True)
    assert method is not None and body == b"also not json"
    assert properties.headers["x-park-reason"] == "INVALID_REQUEST: again"
    assert properties.headers["x-original-queue"] == queue_name
    assert ready(rabbit, queue_name) == 0


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


def test_queue_depth_counts_ready_messages_without_consuming(
    rabbit: RabbitService, queue_name: str
) -> None:
    task_source = RabbitMQTaskSource(
        host=rabbit.host,
        port=rabbit.port,
        user=rabbit.user,
        password=rabbit.password,
        vhost=rabbit.vhost,
        queue_name=queue_name,
        depth_refresh_seconds=0.1,
    )
    publish_as_backend(rabbit, queue_name, [b"{}"] * 3)
    task_source.start(consume=False)
    try:
        deadline = time.monotonic() + 5
        while task_source.queue_depth != 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert task_source.queue_depth == 3
        assert ready(rabbit, queue_name) == 3  # a passive declare takes nothing
    finally:
        task_source.close()
    assert task_source.queue_depth is None
