"""The in-memory TaskSource behaves as the broker does where the domain can tell."""

from __future__ import annotations

import threading
import time

import pytest

from adapters.memory_task_source import InMemoryTaskSource
from domain.errors import ErrorCode, FailureReport
from ports.task_source import Delivery, TaskSource
from tests.unit.fakes import FakeClock


def take(source: InMemoryTaskSource) -> Delivery:
    """The next delivery, which must be there now."""
    delivery = source.receive(0)
    assert delivery is not None, "no delivery"
    return delivery


@pytest.fixture(name="clock")
def clock_fixture() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="source")
def source_fixture(clock: FakeClock) -> InMemoryTaskSource:
    return InMemoryTaskSource(clock=clock)


def test_it_implements_the_port(source: InMemoryTaskSource) -> None:
    assert isinstance(source, TaskSource)


def test_put_encodes_and_delivers_in_order_with_the_given_counts(
    source: InMemoryTaskSource, clock: FakeClock
) -> None:
    report = FailureReport(generation_id=9, code=ErrorCode.GPU_OOM, message="oom", retry_count=1)
    source.put({"n": 1})
    source.put("two", 2, handbacks=5, carried_failure=report)
    first, second = take(source), take(source)
    assert first.body == b'{"n": 1}' and (first.attempt, first.handbacks) == (0, 0)
    assert first.received_at == clock.now and first.carried_failure is None
    assert second.body == b"two" and (second.attempt, second.handbacks) == (2, 5)
    assert second.carried_failure == report
    assert first != second and source.receive(0) is None


def test_ack_records_and_removes(source: InMemoryTaskSource) -> None:
    source.put(b"a")
    delivery = take(source)
    source.ack(delivery)
    assert source.acked == [delivery] and len(source) == 0 and source.receive(0) is None


def test_retry_comes_back_only_after_its_delay_on_the_clock(
    source: InMemoryTaskSource, clock: FakeClock
) -> None:
    report = FailureReport(generation_id=1, code=ErrorCode.GPU_OOM, message="x", retry_count=0)
    source.put(b"job", 1, handbacks=2, carried_failure=report)
    first = take(source)
    source.retry(first, reason="GPU_OOM: oom", attempt=2, delay_seconds=30)
    assert source.retried == [(first, "GPU_OOM: oom", 2, 30)]
    assert len(source) == 1 and source.queue_depth == 0
    assert source.receive(0.05) is None  # not due yet
    clock.advance(29.9)
    assert source.receive(0) is None
    clock.advance(0.1)
    again = take(source)
    assert again.body == b"job" and (again.attempt, again.handbacks) == (2, 3)
    assert again.carried_failure is None  # the copy never carries the legacy failure
    assert again.received_at == clock.now


def test_receive_waits_for_a_delayed_copy_that_becomes_due_while_waiting(
    source: InMemoryTaskSource, clock: FakeClock
) -> None:
    source.put(b"job")
    source.retry(take(source), reason="r", attempt=1, delay_seconds=5)
    threading.Timer(0.1, clock.advance, args=(5,)).start()
    began = time.monotonic()
    again = source.receive(2)
    assert again is not None and again.attempt == 1
    assert time.monotonic() - began < 1.5


def test_retry_on_the_real_clock_waits_within_the_timeout() -> None:
    source = InMemoryTaskSource()
    source.put(b"job")
    source.retry(take(source), reason="r", attempt=1, delay_seconds=0.2)
    assert source.receive(0.05) is None
    began = time.monotonic()
    assert source.receive(2) is not None
    assert 0.05 < time.monotonic() - began < 1.0


def test_a_due_copy_joins_the_back_of_the_queue(
    source: InMemoryTaskSource, clock: FakeClock
) -> None:
    source.put(b"retried")
    source.retry(take(source), reason="r", attempt=1, delay_seconds=1)
    source.put(b"waiting")
    clock.advance(1)
    source.put(b"later")
    assert [take(source).body for _ in range(3)] == [b"waiting", b"retried", b"later"]


def test_release_puts_the_message_back_first_as_it_is(source: InMemoryTaskSource) -> None:
    source.put(b"a", 3, handbacks=4)
    source.put(b"b")
    first = take(source)
    source.release(first)
    again = take(source)
    assert source.released == [first]
    assert again.body == b"a" and (again.attempt, again.handbacks) == (3, 4)
    assert again.tag != first.tag


def test_park_records_reason_and_outcome(source: InMemoryTaskSource) -> None:
    source.put(b"bad")
    delivery = take(source)
    assert source.parked_depth == 0
    outcome = {"kind": "failed", "error_code": "INVALID_REQUEST"}
    source.park(delivery, "INVALID_REQUEST: not JSON", outcome=outcome)
    assert source.parked == [(delivery, "INVALID_REQUEST: not JSON", outcome)]
    assert len(source) == 0 and source.receive(0) is None
    assert source.parked_depth == 1
    source.close()
    assert source.parked_depth is None


def test_lose_connection_makes_held_deliveries_stale_and_delivers_them_again(
    source: InMemoryTaskSource,
) -> None:
    for body in (b"a", b"b", b"c"):
        source.put(body)
    first, second = take(source), take(source)
    source.ack(first)
    source.lose_connection()
    assert source.still_held(first) is False and source.still_held(second) is False
    again = take(source)
    assert again.body == b"b" and again.tag != second.tag and source.still_held(again)
    assert take(source).body == b"c"
    source.ack(second)
    source.retry(second, reason="r", attempt=1, delay_seconds=0)
    source.release(second)
    source.park(second, "p")
    assert [kind for kind, _ in source.dropped] == ["ack", "retry", "release", "park"]
    assert source.acked == [first] and source.retried == [] and source.released == []
    assert source.parked == [] and len(source) == 0
    source.ack(again)
    assert source.acked == [first, again]


def test_held_messages_come_back_in_the_order_they_were_handed_out(
    source: InMemoryTaskSource,
) -> None:
    for body in (b"1", b"2", b"3"):
        source.put(body)
    take(source)
    take(source)
    source.lose_connection()
    assert [take(source).body for _ in range(3)] == [b"1", b"2", b"3"]


def test_a_second_settlement_is_recorded_and_has_no_effect(source: InMemoryTaskSource) -> None:
    source.put(b"a")
    delivery = take(source)
    source.ack(delivery)
    source.release(delivery)
    assert source.settled_twice == [("release", delivery)]
    assert source.released == [] and source.receive(0) is None


def test_hold_at_most_limits_deliveries_held_and_not_settled(
    source: InMemoryTaskSource,
) -> None:
    for n in range(5):
        source.put(str(n))
    source.hold_at_most(1)
    first = take(source)
    assert source.receive(0.05) is None
    source.ack(first)
    second = take(source)
    source.hold_at_most(3)
    third, fourth = take(source), take(source)
    assert source.receive(0) is None
    assert [d.body for d in (first, second, third, fourth)] == [b"0", b"1", b"2", b"3"]
    assert source.holds == [1, 3]
    source.hold_at_most(0)
    for delivery in (second, third, fourth):
        source.ack(delivery)
    assert source.receive(0) is None
    with pytest.raises(ValueError, match="-1"):
        source.hold_at_most(-1)


def test_a_settlement_wakes_a_receive_waiting_on_the_hold(source: InMemoryTaskSource) -> None:
    source.put(b"a")
    source.put(b"b")
    source.hold_at_most(1)
    first = take(source)
    threading.Timer(0.1, source.ack, args=(first,)).start()
    second = source.receive(2)
    assert second is not None and second.body == b"b"


def test_prefetch_caps_the_hold() -> None:
    source = InMemoryTaskSource(prefetch=1)
    source.put(b"a")
    source.put(b"b")
    source.hold_at_most(5)
    take(source)
    assert source.receive(0) is None and source.holds == [5]


def test_consuming_can_be_stopped_and_resumed(source: InMemoryTaskSource) -> None:
    source.start(consume=False)
    source.put(b"a")
    assert source.receive(0.01) is None and source.queue_depth == 1
    source.start_consuming()
    delivery = take(source)
    source.stop_consuming()
    source.put(b"b")
    assert source.receive(0) is None
    source.ack(delivery)
    assert source.acked == [delivery]


def test_close_returns_held_messages_and_drops_later_settlements(
    source: InMemoryTaskSource,
) -> None:
    source.put(b"a")
    delivery = take(source)
    assert source.connected and source.still_held(delivery)
    source.close()
    assert not source.connected and source.queue_depth is None
    assert not source.still_held(delivery) and source.receive(0) is None
    source.ack(delivery)
    assert source.dropped == [("ack", delivery)] and len(source) == 1
    source.start()
    assert take(source).body == b"a"


def test_a_hand_built_delivery_counts_as_held(source: InMemoryTaskSource) -> None:
    delivery = Delivery(body=b"x", attempt=1, handbacks=1)
    assert source.still_held(delivery)
    source.release(delivery)
    again = take(source)
    assert again.body == b"x" and (again.attempt, again.handbacks) == (1, 1)


def test_len_counts_ready_and_delayed_messages(source: InMemoryTaskSource) -> None:
    source.put(b"a")
    source.put(b"b")
    source.retry(take(source), reason="r", attempt=1, delay_seconds=60)
    assert len(source) == 2 and source.queue_depth == 1
