"""The outcome ledger: one decision per message, one failure per generation, on shared records."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import pytest

from domain.errors import ErrorCode, FailureReport, StorageError
from domain.ledger import (
    TOLD_DELIVERED,
    TOLD_PARKED,
    TOLD_UNKNOWN,
    TOLD_WITHHELD,
    Decision,
    Entry,
    MessageId,
    OutcomeLedger,
    Verdict,
)
from tests.unit.fakes import FakeClock, FakeRecordStore


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
    assert not records.records


# --- whole-object checks of every field, bound and failure path -------------------------------

WALL = 1_700_000_000.0
FAIL_KEY = "5/failure.json"


class Conflicts(FakeRecordStore):
    """A record store whose next ``conflicts`` replaces lose a race (None, nothing stored);
    every replace is counted, and ``then`` (key -> document) is written by "another worker"
    just before a lost replace of that key."""

    def __init__(self) -> None:
        super().__init__()
        self.conflicts = 0
        self.replaces: list[str] = []
        self.then: dict[str, Any] = {}

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        self.replaces.append(key)
        if self.conflicts:
            self.conflicts -= 1
            if key in self.then:
                with self.lock:
                    self.records[key] = (json.dumps(self.then.pop(key)).encode(), "v-other")
            return None
        return super().replace(key, data, version)


def clocked(records: FakeRecordStore | None = None) -> tuple[OutcomeLedger, FakeClock]:
    clock = FakeClock(WALL)
    return OutcomeLedger(records=records or FakeRecordStore(), wall_clock=clock), clock


def message_key(message: MessageId) -> str:
    return f"{message.generation_id}/{message.key}.json"


FAILED_PAYLOAD = {
    "verdict": "failed",
    "generation_id": 5,
    "task_id": "t-1",
    "decided_at": WALL,
    "failure": {"code": "LORA_NOT_FOUND", "message": "no LoRA", "retry_count": 2, "poison": False},
}
COMPLETED_PAYLOAD = {
    "verdict": "completed",
    "generation_id": 5,
    "task_id": "t-1",
    "decided_at": WALL,
    "result_url": "https://cdn.test/5.png",
    "metadata": {"seed": 7, "durations": {"total_seconds": 1.5}},
}


def stored(
    payload: Mapping[str, Any],
    told: Any = None,
    teller: str | None = None,
    since: float = 0.0,
    sending: bool = False,
) -> dict[str, Any]:
    return {**payload, "told": told, "teller": teller, "since": since, "sending": sending}


@pytest.mark.parametrize(
    ("task_id", "body", "key"),
    [
        ("t-1", b"ignored", "73d115f490e4a430fa89cbd64e86d0cc"),
        (None, b'{"a": 1}', "504397f8fa0d66bb4731c42a2af0aeba"),
        ("", b"", "a74221068bb8c69f1189ee164650cfef"),
        ("\u00e9t\u00e9", b"", "835ad2f682fa538ed441795021433dc4"),
    ],
)
def test_a_message_key_is_the_sha256_of_its_task_id_or_body(
    task_id: str | None, body: bytes, key: str
) -> None:
    assert MessageId.of(5, task_id, body) == MessageId(generation_id=5, key=key, task_id=task_id)


def test_the_told_forms() -> None:
    assert (TOLD_DELIVERED, TOLD_WITHHELD, TOLD_UNKNOWN, TOLD_PARKED) == (
        "delivered",
        "withheld: the generation was already reported failed",
        "unknown: ",
        "parked: ",
    )


@pytest.mark.parametrize(
    ("told", "settled", "given_up"),
    [
        (None, False, False),
        ("delivered", True, False),
        ("withheld: the generation was already reported failed", True, False),
        ("unknown: read timeout", True, False),
        ("parked: HTTP 400", False, True),
    ],
)
def test_an_entry_is_settled_or_given_up_by_its_told_form(
    told: str | None, settled: bool, given_up: bool
) -> None:
    entry = Entry(decision=failed(), version="v1", told=told)
    assert (entry.settled, entry.given_up) == (settled, given_up)


def test_an_entry_s_defaults() -> None:
    entry = Entry(decision=failed(), version="v1")
    assert (entry.told, entry.teller, entry.teller_since, entry.sending) == (None, None, 0.0, False)


def test_decisions_as_payloads() -> None:
    assert completed().as_payload() == COMPLETED_PAYLOAD
    assert failed().as_payload() == FAILED_PAYLOAD
    poisoned = failed(poison=True).as_payload()
    assert poisoned == {**FAILED_PAYLOAD, "failure": {**FAILED_PAYLOAD["failure"], "poison": True}}
    bare = Decision(verdict=Verdict.FAILED, generation_id=5, task_id=None, decided_at=1.0)
    assert bare.as_payload() == {
        "verdict": "failed",
        "generation_id": 5,
        "task_id": None,
        "decided_at": 1.0,
    }
    report = failed().failure
    both = Decision(
        verdict=Verdict.COMPLETED, generation_id=5, task_id="t", decided_at=1.0, failure=report
    )
    assert both.as_payload() == {
        "verdict": "completed",
        "generation_id": 5,
        "task_id": "t",
        "decided_at": 1.0,
        "result_url": None,
        "metadata": {},
    }


@pytest.mark.parametrize("decision", [completed(), failed(), failed(poison=True)])
def test_decisions_round_trip_through_payloads(decision: Decision) -> None:
    assert Decision.from_payload(decision.as_payload()) == decision
    assert Decision.from_payload(json.loads(json.dumps(decision.as_payload()))) == decision


def test_a_payload_s_optional_fields_and_conversions() -> None:
    payload = {"verdict": "completed", "generation_id": "12", "decided_at": "5"}
    assert Decision.from_payload(payload) == Decision(
        verdict=Verdict.COMPLETED, generation_id=12, task_id=None, decided_at=5.0
    )
    odd = {**COMPLETED_PAYLOAD, "task_id": 12, "metadata": None}
    assert Decision.from_payload(odd) == Decision(
        verdict=Verdict.COMPLETED,
        generation_id=5,
        task_id=None,
        decided_at=WALL,
        result_url="https://cdn.test/5.png",
        metadata={},
    )
    failure = {"code": "GPU_OOM", "message": 42, "retry_count": "3"}
    assert Decision.from_payload({**FAILED_PAYLOAD, "failure": failure}).failure == FailureReport(
        generation_id=5, code=ErrorCode.GPU_OOM, message="42", retry_count=3, poison=False
    )
    poison = {**failure, "poison": 1}
    assert Decision.from_payload({**FAILED_PAYLOAD, "failure": poison}).failure == FailureReport(
        generation_id=5, code=ErrorCode.GPU_OOM, message="42", retry_count=3, poison=True
    )


@pytest.mark.parametrize(
    ("payload", "message", "cause"),
    [
        ([1, 2], "a decision is a JSON object", None),
        ("completed", "a decision is a JSON object", None),
        (None, "a decision is a JSON object", None),
        ({"generation_id": 5, "decided_at": 1.0}, "not a decision: 'verdict'", KeyError),
        (
            {"verdict": "maybe", "generation_id": 5, "decided_at": 1.0},
            "'maybe' is not a valid Verdict",
            None,
        ),
        ({"verdict": "completed", "decided_at": 1.0}, "not a decision: 'generation_id'", KeyError),
        ({"verdict": "completed", "generation_id": 5}, "not a decision: 'decided_at'", KeyError),
        (
            {"verdict": "completed", "generation_id": None, "decided_at": 1.0},
            "not a decision: int() argument must be a string, a bytes-like object or a real"
            " number, not 'NoneType'",
            TypeError,
        ),
        (
            {**FAILED_PAYLOAD, "failure": None},
            "not a decision: 'NoneType' object is not subscriptable",
            TypeError,
        ),
        (
            {k: v for k, v in FAILED_PAYLOAD.items() if k != "failure"},
            "not a decision: 'failure'",
            KeyError,
        ),
        (
            {**FAILED_PAYLOAD, "failure": {"message": "m", "retry_count": 1}},
            "not a decision: 'code'",
            KeyError,
        ),
        (
            {**FAILED_PAYLOAD, "failure": {"code": "NOPE", "message": "m", "retry_count": 1}},
            "'NOPE' is not a valid ErrorCode",
            None,
        ),
        (
            {**FAILED_PAYLOAD, "failure": {"code": "GPU_OOM", "retry_count": 1}},
            "not a decision: 'message'",
            KeyError,
        ),
        (
            {**FAILED_PAYLOAD, "failure": {"code": "GPU_OOM", "message": "m"}},
            "not a decision: 'retry_count'",
            KeyError,
        ),
        ({**COMPLETED_PAYLOAD, "metadata": [1]}, "metadata is not an object", None),
        ({**COMPLETED_PAYLOAD, "metadata": "seed"}, "metadata is not an object", None),
    ],
)
def test_a_malformed_payload_is_a_value_error(
    payload: object, message: str, cause: type[Exception] | None
) -> None:
    with pytest.raises(ValueError) as raised:
        Decision.from_payload(payload)
    assert str(raised.value) == message
    if cause is not None:
        assert isinstance(raised.value.__cause__, cause)


def test_the_ledger_reads_the_wall_clock() -> None:
    book, clock = clocked()
    assert book.now() == WALL
    clock.advance(2.5)
    assert book.now() == WALL + 2.5
    before = time.time()
    default = OutcomeLedger(records=FakeRecordStore()).now()
    assert before <= default <= time.time()


def test_a_decision_is_stored_as_compact_sorted_json() -> None:
    records = FakeRecordStore()
    book, _ = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    decision = Decision(
        verdict=Verdict.COMPLETED,
        generation_id=5,
        task_id="t-1",
        decided_at=1.5,
        result_url="u",
        metadata={"z": 1, "path": PurePosixPath("/a/b")},
    )
    book.decide(message, decision, teller="c")
    assert records.records[message_key(message)] == (
        b'{"decided_at":1.5,"generation_id":5,"metadata":{"path":"/a/b","z":1},'
        b'"result_url":"u","sending":false,"since":1700000000.0,"task_id":"t-1",'
        b'"teller":"c","told":null,"verdict":"completed"}',
        "v1",
    )


def test_deciding_returns_the_entry_that_stands() -> None:
    records = FakeRecordStore()
    book, clock = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    mine = failed()
    entry = book.decide(message, mine, teller="copy-a")
    assert entry == Entry(decision=mine, version="v1", teller="copy-a", teller_since=WALL)
    assert entry.decision is mine
    clock.advance(10.0)
    later = book.decide(message, completed(), teller="copy-b")
    assert later == Entry(decision=mine, version="v1", teller="copy-a", teller_since=WALL)
    assert records.document(message_key(message)) == stored(
        FAILED_PAYLOAD, teller="copy-a", since=WALL
    )
    assert book.entry(MessageId.of(5, "t-2", b"")) is None


def test_taking_the_turn() -> None:
    records = FakeRecordStore()
    book, clock = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    clock.advance(30.0)
    taken = book.take_turn(message, entry, "copy-b")
    assert taken == Entry(
        decision=failed(), version="v2", told=None, teller="copy-b", teller_since=WALL + 30.0
    )
    assert records.document(message_key(message)) == stored(
        FAILED_PAYLOAD, teller="copy-b", since=WALL + 30.0
    )
    assert book.entry(message) == taken
    assert book.take_turn(message, entry, "copy-c") is None  # stale: the record moved on
    assert book.entry(message) == taken


def test_taking_the_turn_of_an_outcome_given_up_tells_it_again() -> None:
    records = FakeRecordStore()
    book, clock = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    book.mark_told(message, book.decide(message, failed(), teller="a"), "parked: HTTP 400")
    given_up = book.entry(message)
    assert given_up is not None and given_up.given_up
    clock.advance(1.0)
    taken = book.take_turn(message, given_up, "copy-b")
    assert taken == Entry(
        decision=failed(), version="v3", told=None, teller="copy-b", teller_since=WALL + 1.0
    )
    assert records.document(message_key(message))["told"] is None


def test_taking_the_turn_keeps_a_told_form_that_is_not_given_up() -> None:
    records = FakeRecordStore()
    book, clock = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    book.mark_told(message, book.decide(message, completed(), teller="a"), "delivered")
    told = book.entry(message)
    assert told is not None
    clock.advance(1.0)
    taken = book.take_turn(message, told, "copy-b")
    assert taken == Entry(
        decision=completed(),
        version="v3",
        told="delivered",
        teller="copy-b",
        teller_since=WALL + 1.0,
    )
    assert records.document(message_key(message)) == stored(
        COMPLETED_PAYLOAD,
        told={"how": "delivered", "at": WALL + 1.0},
        teller="copy-b",
        since=WALL + 1.0,
    )


def test_marking_sending_renews_the_turn() -> None:
    records = FakeRecordStore()
    book, clock = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    clock.advance(4.0)
    sending = book.mark_sending(message, entry)
    assert sending == Entry(
        decision=failed(),
        version="v2",
        told=None,
        teller="copy-a",
        teller_since=WALL + 4.0,
        sending=True,
    )
    assert records.document(message_key(message)) == stored(
        FAILED_PAYLOAD, teller="copy-a", since=WALL + 4.0, sending=True
    )
    assert book.entry(message) == sending
    assert book.mark_sending(message, entry) is None  # stale
    assert book.entry(message) == sending


def test_marking_sending_keeps_a_told_form() -> None:
    records = FakeRecordStore()
    book, _ = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    given_up = Entry(decision=entry.decision, version=entry.version, told="parked: x", teller="a")
    sending = book.mark_sending(message, given_up)
    assert sending is not None and sending.told == "parked: x"
    assert records.document(message_key(message))["told"] == {"how": "parked: x", "at": WALL}


def test_releasing_the_turn() -> None:
    records = Conflicts()
    book, clock = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    sending = book.mark_sending(message, entry)
    assert sending is not None
    clock.advance(3.0)
    book.release_turn(message, sending)
    assert records.document(message_key(message)) == stored(FAILED_PAYLOAD)
    released = book.entry(message)
    assert released == Entry(decision=failed(), version="v3")


def test_releasing_a_turn_given_up_keeps_the_told_form() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    given_up = Entry(
        decision=entry.decision, version=entry.version, told="parked: x", teller="copy-a"
    )
    book.release_turn(message, given_up)
    assert records.document(message_key(message)) == stored(
        FAILED_PAYLOAD, told={"how": "parked: x", "at": WALL}
    )


@pytest.mark.parametrize("told", ["delivered", "unknown: x", TOLD_WITHHELD])
def test_a_turn_of_a_settled_outcome_is_not_released(told: str) -> None:
    records = Conflicts()
    book, _ = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    settled = Entry(decision=entry.decision, version=entry.version, told=told, teller="copy-a")
    book.release_turn(message, settled)
    assert not records.replaces
    assert records.document(message_key(message))["teller"] == "copy-a"


def test_a_turn_taken_by_another_copy_is_not_released() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    assert book.take_turn(message, entry, "copy-b") is not None
    records.replaces.clear()
    book.release_turn(message, entry)  # stale: the write loses, the re-read names copy-b
    assert records.replaces == [message_key(message)]
    assert records.document(message_key(message)) == stored(
        FAILED_PAYLOAD, teller="copy-b", since=WALL
    )


def test_releasing_retries_on_a_fresh_read_up_to_three_times() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    records.conflicts = 2
    book.release_turn(message, entry)
    assert len(records.replaces) == 3
    assert records.document(message_key(message))["teller"] is None
    entry = book.decide(MessageId.of(5, "t-2", b""), failed(), teller="copy-a")
    records.replaces.clear()
    records.conflicts = 3
    with pytest.raises(StorageError) as raised:
        book.release_turn(MessageId.of(5, "t-2", b""), entry)
    assert raised.value.message == "could not release the turn of generation 5"
    assert len(records.replaces) == 3


def test_releasing_a_turn_whose_record_vanished_is_done() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    del records.records[message_key(message)]
    book.release_turn(message, entry)
    assert records.replaces == [message_key(message)]


def test_forgetting_that_a_completion_was_told() -> None:
    records = FakeRecordStore()
    book, clock = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    book.mark_told(message, book.decide(message, completed(), teller="a"), "delivered")
    told = book.entry(message)
    assert told is not None
    clock.advance(2.0)
    book.forget_told(message, told)
    assert records.document(message_key(message)) == stored(COMPLETED_PAYLOAD)
    assert book.entry(message) == Entry(decision=completed(), version="v3")


def test_marking_told() -> None:
    records = Conflicts()
    book, clock = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    clock.advance(6.0)
    book.mark_told(message, entry, "unknown: read timeout")
    assert records.document(message_key(message)) == stored(
        FAILED_PAYLOAD, told={"how": "unknown: read timeout", "at": WALL + 6.0}
    )
    assert book.entry(message) == Entry(
        decision=failed(), version="v2", told="unknown: read timeout"
    )
    records.replaces.clear()
    book.mark_told(message, entry, "delivered")  # stale, re-read: settled, nothing written
    assert records.replaces == [message_key(message)]
    settled = book.entry(message)
    assert settled is not None
    book.mark_told(message, settled, "delivered")
    assert records.replaces == [message_key(message)]
    assert records.document(message_key(message))["told"]["how"] == "unknown: read timeout"


def test_marking_told_replaces_a_given_up_form() -> None:
    records = Conflicts()
    book, clock = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    book.mark_told(message, book.decide(message, failed(), teller="a"), "parked: HTTP 400")
    given_up = book.entry(message)
    assert given_up is not None
    clock.advance(1.0)
    book.mark_told(message, given_up, "delivered")
    assert records.document(message_key(message))["told"] == {"how": "delivered", "at": WALL + 1}


def test_marking_told_retries_on_a_fresh_read_up_to_three_times() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    records.conflicts = 2
    book.mark_told(message, entry, "delivered")
    assert len(records.replaces) == 3
    assert records.document(message_key(message))["told"] == {"how": "delivered", "at": WALL}
    other = MessageId.of(5, "t-2", b"")
    entry = book.decide(other, failed(), teller="copy-a")
    records.replaces.clear()
    records.conflicts = 3
    with pytest.raises(StorageError) as raised:
        book.mark_told(other, entry, "delivered")
    assert raised.value.message == "could not record that generation 5 was told"
    assert len(records.replaces) == 3


def test_marking_told_a_record_that_vanished_is_done() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    message = MessageId.of(5, "t-1", b"")
    entry = book.decide(message, failed(), teller="copy-a")
    del records.records[message_key(message)]
    book.mark_told(message, entry, "delivered")
    assert records.replaces == [message_key(message)]


def test_the_failure_owner_record() -> None:
    records = FakeRecordStore()
    book, clock = clocked(records)
    first, second = MessageId.of(5, "a", b""), MessageId.of(5, "b", b"")
    assert book.failure_owner(first) == first.key
    assert records.records[FAIL_KEY] == (
        b'{"at":1700000000.0,"message":"' + first.key.encode() + b'","task_id":"a"}',
        "v1",
    )
    clock.advance(5.0)
    assert book.failure_owner(second) == first.key
    assert records.document(FAIL_KEY) == {"message": first.key, "task_id": "a", "at": WALL}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "record '5/failure.json' is not JSON"),
        (b"[]", "record '5/failure.json' is not a JSON object"),
        (b"{}", "record '5/failure.json' does not name its message"),
        (b'{"message": 5}', "record '5/failure.json' does not name its message"),
    ],
)
def test_an_unreadable_failure_owner_is_a_storage_error(raw: bytes, message: str) -> None:
    records = FakeRecordStore()
    records.records[FAIL_KEY] = (raw, "v0")
    book, _ = clocked(records)
    with pytest.raises(StorageError) as raised:
        book.failure_owner(MessageId.of(5, "a", b""))
    assert raised.value.message == message


def given_up_owner(book: OutcomeLedger, owner: MessageId, how: str = "parked: HTTP 400") -> None:
    assert book.failure_owner(owner) == owner.key
    book.mark_told(owner, book.decide(owner, failed(), teller="x"), how)


def test_a_failure_given_up_is_taken_over() -> None:
    records = Conflicts()
    book, clock = clocked(records)
    owner, mine = MessageId.of(5, "a", b""), MessageId.of(5, "b", b"")
    given_up_owner(book, owner)
    clock.advance(9.0)
    assert book.take_failure(mine, owner.key) is True
    assert records.document(FAIL_KEY) == {"message": mine.key, "task_id": "b", "at": WALL + 9.0}
    assert book.failure_owner(mine) == mine.key


@pytest.mark.parametrize(
    "how",
    ["delivered", "unknown: read timeout", "withheld: the generation was already reported failed"],
)
def test_a_failure_not_given_up_is_not_taken(how: str) -> None:
    records = Conflicts()
    book, _ = clocked(records)
    owner, mine = MessageId.of(5, "a", b""), MessageId.of(5, "b", b"")
    given_up_owner(book, owner, how)
    records.replaces.clear()
    assert book.take_failure(mine, owner.key) is False
    assert records.document(FAIL_KEY)["message"] == owner.key
    assert FAIL_KEY not in records.replaces


def test_a_failure_whose_owner_has_no_record_is_not_taken() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    owner, mine = MessageId.of(5, "a", b""), MessageId.of(5, "b", b"")
    book.failure_owner(owner)
    assert book.take_failure(mine, owner.key) is False
    assert records.document(FAIL_KEY)["message"] == owner.key


def test_a_failure_owner_record_that_vanished_is_not_taken() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    owner, mine = MessageId.of(5, "a", b""), MessageId.of(5, "b", b"")
    given_up_owner(book, owner)
    del records.records[FAIL_KEY]
    assert book.take_failure(mine, owner.key) is False
    assert FAIL_KEY not in records.records


def test_a_failure_taken_meanwhile_belongs_to_its_taker() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    owner, mine, third = (MessageId.of(5, name, b"") for name in ("a", "b", "c"))
    given_up_owner(book, owner)
    records.records[FAIL_KEY] = (json.dumps({"message": mine.key}).encode(), "v-9")
    assert book.take_failure(mine, owner.key) is True  # this message took it already
    records.records[FAIL_KEY] = (json.dumps({"message": third.key}).encode(), "v-10")
    assert book.take_failure(mine, owner.key) is False
    assert FAIL_KEY not in records.replaces


@pytest.mark.parametrize(("winner", "owns"), [("mine", True), ("third", False), ("gone", False)])
def test_a_failure_take_over_that_loses_the_race(winner: str, owns: bool) -> None:
    records = Conflicts()
    book, _ = clocked(records)
    owner, mine, third = (MessageId.of(5, name, b"") for name in ("a", "b", "c"))
    given_up_owner(book, owner)
    records.conflicts = 1
    if winner == "gone":
        original = records.replace

        def vanish(key: str, data: bytes, version: str) -> str | None:
            del records.records[key]
            return original(key, data, version)

        records.replace = vanish  # type: ignore[method-assign]
    else:
        records.then[FAIL_KEY] = {"message": (mine if winner == "mine" else third).key}
    assert book.take_failure(mine, owner.key) is owns


@pytest.mark.parametrize(
    ("extra", "told", "teller", "since", "sending"),
    [
        ({}, None, None, 0.0, False),
        ({"told": "delivered"}, None, None, 0.0, False),
        ({"told": {"how": 5}}, "5", None, 0.0, False),
        ({"told": {}}, "None", None, 0.0, False),
        ({"teller": 5, "since": "x", "sending": "true"}, None, None, 0.0, False),
        ({"teller": "c", "since": 12, "sending": 1}, None, "c", 12.0, False),
        ({"since": 2.5, "sending": True}, None, None, 2.5, True),
    ],
)
def test_an_entry_reads_what_it_can_of_its_telling(
    extra: dict[str, Any], told: str | None, teller: str | None, since: float, sending: bool
) -> None:
    records = FakeRecordStore()
    message = MessageId.of(5, "t-1", b"")
    records.records[message_key(message)] = (json.dumps({**FAILED_PAYLOAD, **extra}).encode(), "v7")
    assert ledger(records).entry(message) == Entry(
        decision=failed(),
        version="v7",
        told=told,
        teller=teller,
        teller_since=since,
        sending=sending,
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "is not JSON"),
        (b"[1, 2]", "is not a JSON object"),
        (b'{"verdict": "failed"}', "is not a decision: not a decision: 'generation_id'"),
    ],
)
def test_an_unreadable_record_names_itself(raw: bytes, reason: str) -> None:
    records = FakeRecordStore()
    message = MessageId.of(5, "t-1", b"")
    records.records[message_key(message)] = (raw, "v0")
    with pytest.raises(StorageError) as raised:
        ledger(records).entry(message)
    assert raised.value.message == f"record {message_key(message)!r} {reason}"


def test_an_unreadable_failure_owner_met_while_taking_over_names_itself() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    owner, mine = MessageId.of(5, "a", b""), MessageId.of(5, "b", b"")
    given_up_owner(book, owner)
    records.records[FAIL_KEY] = (b'{"message": null}', "v-9")
    with pytest.raises(StorageError) as raised:
        book.take_failure(mine, owner.key)
    assert raised.value.message == "record '5/failure.json' does not name its message"


def test_an_unreadable_failure_owner_met_after_losing_the_race_names_itself() -> None:
    records = Conflicts()
    book, _ = clocked(records)
    owner, mine = MessageId.of(5, "a", b""), MessageId.of(5, "b", b"")
    given_up_owner(book, owner)
    records.conflicts = 1
    records.then[FAIL_KEY] = {"message": ["not", "a", "key"]}
    with pytest.raises(StorageError) as raised:
        book.take_failure(mine, owner.key)
    assert raised.value.message == "record '5/failure.json' does not name its message"
