"""The outcome ledger: one decision per message, one failure per generation, on shared records."""

from __future__ import annotations

import threading

import pytest

from domain.errors import ErrorCode, FailureReport, StorageError
from domain.ledger import Decision, MessageId, OutcomeLedger, Verdict
from tests.unit.fakes import FakeRecordStore


def ledger(records: FakeRecordStore | None = None) -> OutcomeLedger:
    return OutcomeLedger(records=records or FakeRecordStore(), wall_clock=lambda: 1_700_000_000.0)


def completed(generation_id: int = 5, url: str = "https://cdn.test/5.png") -> Decision:
    return Decision(
        verdict=Verdict.COMPLETED,
        generation_id=generation_id,
        task_id="t-1",
        decided_at=1_700_000_000.0,
        result_url=url,
        metadata={"seed": 7, "durations": {"total_seconds": 1.5}},
    )


def failed(generation_id: int = 5, *, poison: bool = False) -> Decision:
    return Decision(
        verdict=Verdict.FAILED,
        generation_id=generation_id,
        task_id="t-1",
        decided_at=1_700_000_000.0,
        failure=FailureReport(
            generation_id=generation_id,
            code=ErrorCode.LORA_NOT_FOUND,
            message="no LoRA",
            retry_count=2,
            poison=poison,
        ),
    )


def test_a_message_is_its_task_id_and_generation() -> None:
    first = MessageId.of(5, "task-a", b"body one")
    assert first == MessageId.of(5, "task-a", b"another body")
    assert first.key != MessageId.of(5, "task-b", b"body one").key
    assert len(first.key) == 32 and int(first.key, 16) >= 0
    assert first.task_id == "task-a" and first.generation_id == 5


def test_a_message_without_task_id_is_its_body() -> None:
    assert MessageId.of(5, None, b"x").key == MessageId.of(5, None, b"x").key
    assert MessageId.of(5, None, b"x").key != MessageId.of(5, None, b"y").key
    assert MessageId.of(5, None, b"x").key != MessageId.of(5, "x", b"x").key


def test_the_first_decision_stands_for_every_copy() -> None:
    book = ledger()
    message = MessageId.of(5, "t-1", b"")
    mine = failed()
    entry = book.decide(message, mine, teller="copy-a")
    assert entry.decision is mine and entry.teller == "copy-a" and entry.told is None
    later = book.decide(message, completed(), teller="copy-b")
    assert later.decision == mine and later.teller == "copy-a"
    assert book.entry(message) == later


def test_decisions_round_trip_every_field() -> None:
    book = ledger()
    for generation_id, decision in ((5, completed()), (6, failed(6, poison=True))):
        message = MessageId.of(generation_id, "t-1", b"")
        book.decide(message, decision, teller="c")
        entry = book.entry(message)
        assert entry is not None and entry.decision == decision


def test_one_record_per_message_under_its_generation() -> None:
    records = FakeRecordStore()
    message = MessageId.of(5, "t-1", b"")
    ledger(records).decide(message, completed(), teller="copy-a")
    key = f"5/{message.key}.json"
    assert records.keys(5) == [key]
    assert records.document(key) == {
        "verdict": "completed",
        "generation_id": 5,
        "task_id": "t-1",
        "decided_at": 1_700_000_000.0,
        "result_url": "https://cdn.test/5.png",
        "metadata": {"seed": 7, "durations": {"total_seconds": 1.5}},
        "told": None,
        "teller": "copy-a",
        "since": 1_700_000_000.0,
        "sending": False,
    }


def test_told_is_remembered_and_ends_the_turn() -> None:
    book = ledger()
    message = MessageId.of(5, "a", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    book.mark_told(message, entry, "delivered")
    told = book.entry(message)
    assert told is not None and told.told == "delivered" and told.teller is None
    assert book.entry(MessageId.of(5, "b", b"")) is None


def test_one_copy_at_a_time_takes_the_turn() -> None:
    book = ledger()
    message = MessageId.of(5, "a", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    book.release_turn(message, entry)
    released = book.entry(message)
    assert released is not None and released.teller is None
    taken = book.take_turn(message, released, "copy-b")
    assert taken is not None and taken.teller == "copy-b"
    assert book.take_turn(message, released, "copy-c") is None  # the record moved on
    current = book.entry(message)
    assert current is not None and current.teller == "copy-b"


def test_marking_told_survives_a_concurrent_turn_change() -> None:
    book = ledger()
    message = MessageId.of(5, "a", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    assert book.take_turn(message, entry, "copy-b") is not None
    book.mark_told(message, entry, "delivered")  # copy-a's stale entry: re-read, then marked
    told = book.entry(message)
    assert told is not None and told.told == "delivered"


def test_a_generation_has_one_failure_owner() -> None:
    book = ledger()
    first, second = MessageId.of(5, "a", b""), MessageId.of(5, "b", b"")
    assert book.failure_owner(first) == first.key
    assert book.failure_owner(second) == first.key
    assert book.failure_owner(first) == first.key
    assert book.failure_owner(MessageId.of(6, "b", b"")) != first.key


def test_racing_copies_all_follow_one_decision() -> None:
    book = ledger()
    message = MessageId.of(5, "t-1", b"")
    results: list[tuple[str, str | None]] = []
    gate = threading.Barrier(8)

    def decide(index: int) -> None:
        gate.wait()
        entry = book.decide(message, completed() if index % 2 else failed(), teller=str(index))
        results.append((entry.decision.verdict.value, entry.teller))

    threads = [threading.Thread(target=decide, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1


@pytest.mark.parametrize(
    "raw", [b"not json", b"[1, 2]", b'{"verdict": "maybe"}', b'{"verdict": "failed"}']
)
def test_an_unreadable_decision_is_a_storage_error(raw: bytes) -> None:
    records = FakeRecordStore()
    message = MessageId.of(5, "t-1", b"")
    records.records[f"5/{message.key}.json"] = (raw, "v0")
    with pytest.raises(StorageError, match=message.key):
        ledger(records).entry(message)


def test_unreachable_records_raise_storage_errors() -> None:
    records = FakeRecordStore(fail_next=[StorageError("down"), StorageError("down")])
    book = ledger(records)
    message = MessageId.of(5, "t-1", b"")
    with pytest.raises(StorageError):
        book.decide(message, completed(), teller="c")
    with pytest.raises(StorageError):
        book.failure_owner(message)
    assert records.records == {}
