# pylint: disable=too-many-lines
"""Settlement on its own: every path's Settled value, every call it makes on the source, the
record it leaves, what the backend is told and what telemetry hears (fakes, a fake clock)."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from adapters.memory_task_source import InMemoryTaskSource
from domain import settlement as settlement_module
from domain.errors import (
    ErrorCode,
    FailureReport,
    GpuOutOfMemory,
    InternalError,
    InvalidRequest,
    LoraInvalid,
    NotifyError,
    StorageError,
    WebhookNotFound,
    WebhookOutcomeUnknown,
    WebhookRejected,
    WebhookUnauthorized,
)
from domain.job import Completion
from domain.ledger import Decision, Entry, MessageId, OutcomeLedger, Verdict
from domain.backend_access import BackendAccess
from domain.settlement import Settlement
from domain.settlement_policy import Settled, SettlementPolicy, telling_lease_for
from ports.records import Record
from ports.task_source import Delivery
from tests.unit.fakes import FakeClock, FakeNotifier, FakeRecordStore, FakeTelemetry

WALL = 1_700_000_000.0
"""The ledger's wall clock at the start of every test."""
MONO = 5_000.0
"""The backend access's monotonic clock at the start of every test."""
URL = "https://cdn.test/7.png"
META: dict[str, Any] = {"seed": 42, "durations": {"total_seconds": 1.5}}
MSG = MessageId(generation_id=7, key="a" * 32, task_id="t-7")
OTHER = MessageId(generation_id=7, key="b" * 32, task_id="t-7b")
WITHHELD = "withheld: the generation was already reported failed"

POLICY = SettlementPolicy(
    max_retries=3,
    base_delay_seconds=5.0,
    delay_factor=4.0,
    max_delay_seconds=600.0,
    outcome_max_age_seconds=86400.0,
    not_found_seconds=300.0,
    telling_lease_seconds=900.0,
)


@dataclass
class WatchingNotifier(FakeNotifier):
    """Snapshots the message's record as each outcome call starts; each call takes
    ``call_seconds`` on the wall clock."""

    watch: Any = None
    snapshots: list[Any] = field(default_factory=list)
    call_seconds: float = 0.0
    clock: FakeClock | None = None

    def _watch(self) -> None:
        if self.watch is not None:
            self.snapshots.append(self.watch())
        if self.clock is not None:
            self.clock.advance(self.call_seconds)

    def completed(self, generation_id: int, result_url: str, metadata: Mapping[str, Any]) -> None:
        self._watch()
        super().completed(generation_id, result_url, metadata)

    def failed(self, generation_id: int, code: ErrorCode, message: str, retry_count: int) -> None:
        self._watch()
        super().failed(generation_id, code, message, retry_count)


@dataclass
class World:
    wall: FakeClock
    mono: FakeClock
    records: FakeRecordStore
    ledger: OutcomeLedger
    notifier: WatchingNotifier
    source: InMemoryTaskSource
    access: BackendAccess
    telemetry: FakeTelemetry
    settlement: Settlement

    def doc(self, message: MessageId = MSG) -> Any:
        return self.records.document(f"{message.generation_id}/{message.key}.json")

    def owner_doc(self) -> Any:
        return self.records.document("7/failure.json")

    def queue(self) -> dict[str, list[Any]]:
        return {
            "acked": self.source.acked,
            "retried": self.source.retried,
            "released": self.source.released,
            "parked": self.source.parked,
        }

    def prerecord(
        self,
        decision: Decision,
        message: MessageId = MSG,
        *,
        teller: str = "gone",
        release: bool = True,
        told: str | None = None,
    ) -> Entry:
        """A decision recorded by another copy (its turn released unless ``release`` is
        false; marked ``told`` when given)."""
        entry = self.ledger.decide(message, decision, teller=teller)
        if release:
            self.ledger.release_turn(message, entry)
        current = self.ledger.entry(message)
        assert current is not None
        if told is not None:
            self.ledger.mark_told(message, current, told)
            current = self.ledger.entry(message)
            assert current is not None
        return current


def queue_of(
    acked: list[Any] | None = None,
    retried: list[Any] | None = None,
    released: list[Any] | None = None,
    parked: list[Any] | None = None,
) -> dict[str, list[Any]]:
    return {
        "acked": acked or [],
        "retried": retried or [],
        "released": released or [],
        "parked": parked or [],
    }


def build(
    monkeypatch: pytest.MonkeyPatch,
    records: Any = None,
    source: InMemoryTaskSource | None = None,
) -> World:
    tokens = (f"copy-{n}" for n in itertools.count(1))
    monkeypatch.setattr(settlement_module, "_copy_token", lambda: next(tokens))
    wall, mono = FakeClock(WALL), FakeClock(MONO)
    store = records if records is not None else FakeRecordStore()
    ledger = OutcomeLedger(records=store, wall_clock=wall)
    notifier = WatchingNotifier(clock=wall)
    source = source if source is not None else InMemoryTaskSource(clock=mono)
    access = BackendAccess(probe_seconds=30.0, clock=mono)
    telemetry = FakeTelemetry()
    settlement = Settlement(
        source=source,
        ledger=ledger,
        notifier=notifier,
        access=access,
        policy=POLICY,
        telemetry=telemetry,
    )
    world = World(wall, mono, store, ledger, notifier, source, access, telemetry, settlement)
    notifier.watch = lambda: world.doc() if f"7/{MSG.key}.json" in store.records else None
    return world


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    yield build(monkeypatch)


def deliver(attempt: int = 0, handbacks: int = 0) -> Delivery:
    return Delivery(body=b'{"generation_id": 7}', attempt=attempt, handbacks=handbacks)


def completion_payload(decided_at: float = WALL, url: str | None = URL) -> dict[str, Any]:
    return {
        "verdict": "completed",
        "generation_id": 7,
        "task_id": "t-7",
        "decided_at": decided_at,
        "result_url": url,
        "metadata": META,
    }


def failure_payload(
    code: str = "LORA_INVALID",
    message: str = "bad lora",
    retry_count: int = 0,
    *,
    poison: bool = False,
    decided_at: float = WALL,
    task_id: str | None = "t-7",
) -> dict[str, Any]:
    return {
        "verdict": "failed",
        "generation_id": 7,
        "task_id": task_id,
        "decided_at": decided_at,
        "failure": {
            "code": code,
            "message": message,
            "retry_count": retry_count,
            "poison": poison,
        },
    }


def record(
    payload: Mapping[str, Any],
    *,
    told: Any = None,
    teller: str | None = None,
    since: float = 0.0,
    sending: bool = False,
) -> dict[str, Any]:
    return {**payload, "told": told, "teller": teller, "since": since, "sending": sending}


def completion_decision(decided_at: float = WALL, url: str | None = URL) -> Decision:
    return Decision(
        verdict=Verdict.COMPLETED,
        generation_id=7,
        task_id="t-7",
        decided_at=decided_at,
        result_url=url,
        metadata=META,
    )


def failure_decision(
    decided_at: float = WALL, *, poison: bool = False, message: MessageId = MSG
) -> Decision:
    return Decision(
        verdict=Verdict.FAILED,
        generation_id=7,
        task_id=message.task_id,
        decided_at=decided_at,
        failure=FailureReport(
            generation_id=7,
            code=ErrorCode.LORA_INVALID,
            message="bad lora",
            retry_count=0,
            poison=poison,
        ),
    )


def sent_failure(message: str = "bad lora", retry_count: int = 0) -> tuple[str, int, Any]:
    return (
        "failed",
        7,
        {"code": ErrorCode.LORA_INVALID, "message": message, "retry_count": retry_count},
    )


SENT_COMPLETION = ("completed", 7, {"result_url": URL, **META})


# --- the policy and the lease ----------------------------------------------------------------


def test_the_policy_defaults() -> None:
    assert SettlementPolicy() == SettlementPolicy(
        max_retries=3,
        base_delay_seconds=5.0,
        delay_factor=4.0,
        max_delay_seconds=600.0,
        outcome_max_age_seconds=86400.0,
        not_found_seconds=300.0,
        telling_lease_seconds=300.0,
    )


@pytest.mark.parametrize(
    ("handbacks", "delay"),
    [(-1, 5.0), (0, 5.0), (1, 20.0), (2, 80.0), (3, 320.0), (4, 600.0), (40, 600.0)],
)
def test_the_delay_grows_by_the_factor_up_to_the_cap(handbacks: int, delay: float) -> None:
    assert POLICY.delay(handbacks) == delay


def test_the_exponent_is_capped_at_32() -> None:
    policy = SettlementPolicy(
        base_delay_seconds=1.0, delay_factor=2.0, max_delay_seconds=float("inf")
    )
    assert policy.delay(31) == 2.0**31
    assert policy.delay(32) == 2.0**32
    assert policy.delay(33) == 2.0**32
    assert policy.delay(-5) == 1.0


def test_the_delay_cap_is_reached_exactly() -> None:
    policy = SettlementPolicy(base_delay_seconds=5.0, delay_factor=2.0, max_delay_seconds=40.0)
    assert [policy.delay(n) for n in range(5)] == [5.0, 10.0, 20.0, 40.0, 40.0]


@pytest.mark.parametrize(
    ("timeout", "attempts", "budget", "storage", "lease"),
    [
        (25.0, 3, 0.0, 0, 300.0),  # exactly the floor: 4 * 75
        (25.0, 3, 0.25, 0, 301.0),  # one past it
        (1.0, 1, 0.0, 1, 300.0),  # under the floor
        (2.0, 3, 7.0, 2, 312.0),  # 4 * (2 * 3 + 7) + 2 * 2 * 65
        (0.0, 0, 0.0, 3, 390.0),  # 2 * 3 * 65
        (10.0, 3, 10.0, 5, 810.0),
    ],
)
def test_the_telling_lease(
    timeout: float, attempts: int, budget: float, storage: int, lease: float
) -> None:
    assert (
        telling_lease_for(
            timeout_seconds=timeout,
            attempts=attempts,
            budget_seconds=budget,
            storage_attempts=storage,
        )
        == lease
    )


def test_settled_values_are_the_metric_labels() -> None:
    assert {s.name: s.value for s in Settled} == {
        "COMPLETED": "completed",
        "FAILED": "failed",
        "DUPLICATE": "duplicate",
        "RETRY": "retry",
        "RETURNED": "returned",
        "PARKED": "parked",
    }


# --- backend access ----------------------------------------------------------------------------


def test_backend_access_refused_then_probed_at_the_interval() -> None:
    clock = FakeClock(100.0)
    access = BackendAccess(probe_seconds=30.0, clock=clock)
    assert access.refusal is None and access.probe_due() is False
    access.refused("HTTP 401: token rejected")
    assert access.refusal == "HTTP 401: token rejected"
    clock.advance(29.0)
    assert access.probe_due() is False
    clock.advance(1.0)  # exactly the interval
    assert access.probe_due() is True
    assert access.probe_due() is False  # claimed
    clock.advance(29.0)
    assert access.probe_due() is False
    clock.advance(1.0)
    assert access.probe_due() is True
    access.refused("HTTP 403: forbidden")  # a later refusal restarts the interval
    assert access.refusal == "HTTP 403: forbidden"
    clock.advance(29.0)
    assert access.probe_due() is False
    access.accepted()
    assert access.refusal is None
    clock.advance(1000.0)
    assert access.probe_due() is False


def test_backend_access_first_probe_waits_for_the_interval_after_a_refusal() -> None:
    clock = FakeClock(0.0)
    access = BackendAccess(probe_seconds=30.0, clock=clock)
    clock.advance(1000.0)
    access.refused("HTTP 401")
    assert access.probe_due() is False
    clock.advance(30.0)
    assert access.probe_due() is True


def test_backend_access_probes_every_30_seconds_by_default() -> None:
    clock = FakeClock(100.0)
    access = BackendAccess(clock=clock)
    access.refused("HTTP 401")
    clock.advance(29.0)
    assert access.probe_due() is False
    clock.advance(1.0)
    assert access.probe_due() is True


def test_backend_access_logs_a_refusal_and_a_recovery_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    access = BackendAccess(probe_seconds=30.0, clock=FakeClock())
    with caplog.at_level(logging.INFO, logger="domain.backend_access"):
        access.accepted()  # nothing was refused: nothing to say
        access.refused("HTTP 401")
        assert [(r.levelname, "HTTP 401" in r.getMessage()) for r in caplog.records] == [
            ("ERROR", True)
        ]
        access.refused("HTTP 401")
        access.refused("HTTP 401")
        access.accepted()
        access.accepted()
    assert [(r.levelname, "HTTP 401" in r.getMessage()) for r in caplog.records] == [
        ("ERROR", True),
        ("INFO", False),
    ]


def test_no_refusal_asks_nothing(world: World) -> None:
    assert world.settlement.backend_refusal() is None
    assert world.notifier.probes == 0


def test_a_refusal_stands_until_the_probe_is_due(world: World) -> None:
    world.access.refused("HTTP 401: token")
    world.mono.advance(29.0)
    assert world.settlement.backend_refusal() == "HTTP 401: token"
    assert world.notifier.probes == 0


def test_a_due_probe_that_is_accepted_clears_the_refusal(world: World) -> None:
    world.access.refused("HTTP 401: token")
    world.mono.advance(30.0)
    assert world.settlement.backend_refusal() is None
    assert world.notifier.probes == 1 and world.access.refusal is None


def test_a_due_probe_refused_again_keeps_the_new_reason(world: World) -> None:
    world.access.refused("HTTP 401: token")
    world.notifier.refuse_access = WebhookUnauthorized("HTTP 403: rotated")
    world.mono.advance(30.0)
    assert world.settlement.backend_refusal() == "HTTP 403: rotated"
    assert world.access.refusal == "HTTP 403: rotated"
    world.mono.advance(29.0)  # the refusal restarted the interval
    assert world.settlement.backend_refusal() == "HTTP 403: rotated"
    assert world.notifier.probes == 1


def test_a_due_probe_that_cannot_reach_the_backend_keeps_the_refusal(world: World) -> None:
    world.access.refused("HTTP 401: token")
    world.notifier.refuse_access = NotifyError("HTTP 503")
    world.mono.advance(30.0)
    assert world.settlement.backend_refusal() == "HTTP 401: token"
    assert world.access.refusal == "HTTP 401: token"
    assert world.settlement.backend_refusal() == "HTTP 401: token"  # the probe was claimed
    assert world.notifier.probes == 1


# --- construction --------------------------------------------------------------------------


def test_defaults_of_the_settlement(monkeypatch: pytest.MonkeyPatch) -> None:
    world = build(monkeypatch)
    bare = Settlement(
        source=world.source, ledger=world.ledger, notifier=world.notifier, access=world.access
    )
    assert bare.policy == SettlementPolicy()
    assert world.settlement.policy is POLICY
    # No telemetry given: an undelivered outcome reports to nothing, and does not fail.
    world.notifier.fail_completions.append(NotifyError("HTTP 503"))
    delivery = deliver()
    assert bare.completed(delivery, MSG, Completion(URL, META)) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "completed not delivered: NOTIFY_ERROR: HTTP 503", 0, 5.0)]
    )


# --- completions -----------------------------------------------------------------------------


def test_a_completion_is_recorded_told_marked_and_acked(world: World) -> None:
    world.notifier.call_seconds = 2.0
    world.access.refused("HTTP 401")
    delivery = deliver()
    assert world.settlement.completed(delivery, MSG, Completion(URL, META)) is Settled.COMPLETED
    assert world.notifier.snapshots == [record(completion_payload(), teller="copy-1", since=WALL)]
    assert world.notifier.sent == [SENT_COMPLETION]
    assert world.doc() == record(completion_payload(), told={"how": "delivered", "at": WALL + 2.0})
    assert world.queue() == queue_of(acked=[delivery])
    assert world.telemetry.events == [] and world.access.refusal is None


def test_a_completion_told_by_another_copy_is_told_again_by_the_copy_that_ran(
    world: World,
) -> None:
    world.prerecord(completion_decision(decided_at=WALL - 50.0), release=False, told="delivered")
    world.wall.advance(10.0)
    delivery = deliver()
    assert world.settlement.completed(delivery, MSG, Completion("other", {})) is Settled.COMPLETED
    # The decision that stands is the first one, told again (its metadata merged back).
    assert world.notifier.sent == [SENT_COMPLETION]
    assert world.doc() == record(
        completion_payload(decided_at=WALL - 50.0), told={"how": "delivered", "at": WALL}
    )  # told before: the record keeps its first telling
    assert world.queue() == queue_of(acked=[delivery])


def test_a_completion_follows_a_failure_told_first(world: World) -> None:
    world.prerecord(failure_decision(), release=False, told="delivered")
    delivery = deliver()
    assert world.settlement.completed(delivery, MSG, Completion(URL, META)) is Settled.DUPLICATE
    assert not world.notifier.sent and world.queue() == queue_of(acked=[delivery])


def test_a_completion_follows_a_failure_being_told(world: World) -> None:
    world.prerecord(failure_decision(), release=False)
    before = world.doc()
    delivery = deliver(handbacks=1)
    assert world.settlement.completed(delivery, MSG, Completion(URL, META)) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "another copy is telling its failure", 0, 20.0)]
    )
    assert world.doc() == before and not world.notifier.sent


def test_a_completion_without_url_is_told_with_an_empty_one(world: World) -> None:
    world.prerecord(completion_decision(url=None))
    delivery = deliver()
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.COMPLETED
    assert world.notifier.sent == [("completed", 7, {"result_url": "", **META})]


def test_a_completion_not_recorded_is_handed_back_untold(world: World) -> None:
    world.records.fail_next.append(StorageError("S3 down"))
    delivery = deliver(attempt=2, handbacks=2)
    assert world.settlement.completed(delivery, MSG, Completion(URL, META)) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "outcome not recorded: STORAGE_ERROR: S3 down", 2, 80.0)]
    )
    assert not world.notifier.sent and world.records.records == {}


@pytest.mark.parametrize(
    ("error", "age", "reason", "parked"),
    [
        (NotifyError("HTTP 503"), 0.0, "unreachable", False),
        (NotifyError("HTTP 503"), 86400.0, "unreachable", False),
        (NotifyError("HTTP 503"), 86401.0, "unreachable", True),
        (WebhookUnauthorized("HTTP 401"), 86400.0, "unauthorized", False),
        (WebhookUnauthorized("HTTP 401"), 86401.0, "unauthorized", True),
        (WebhookNotFound("HTTP 404"), 300.0, "not_found", False),
        (WebhookNotFound("HTTP 404"), 301.0, "not_found", True),
        (WebhookRejected("HTTP 400"), 0.0, "rejected", True),
        (WebhookOutcomeUnknown("read timeout"), 0.0, "unknown", True),
    ],
)
def test_a_completion_the_backend_does_not_take(
    world: World, error: NotifyError, age: float, reason: str, parked: bool
) -> None:
    world.prerecord(completion_decision(decided_at=WALL - age))
    before = world.doc()
    world.notifier.fail_completions.append(error)
    delivery = deliver(attempt=1, handbacks=3)
    settled = world.settlement.known(delivery, MSG, lambda: None)
    text = f"completed not delivered: NOTIFY_ERROR: {error.message}"
    if parked:
        assert settled is Settled.PARKED
        assert world.queue() == queue_of(
            parked=[(delivery, text, completion_payload(decided_at=WALL - age))]
        )
    else:
        assert settled is Settled.RETRY
        assert world.queue() == queue_of(retried=[(delivery, text, 1, 320.0)])
    assert world.telemetry.events == [
        ("undelivered", {"outcome": "completed", "reason": reason, "parked": parked})
    ]
    assert world.doc() == before  # a first telling failed: nothing to forget
    unauthorized = isinstance(error, WebhookUnauthorized)
    assert world.access.refusal == ("HTTP 401" if unauthorized else None)


def test_a_failed_re_telling_of_a_completion_is_forgotten(world: World) -> None:
    world.prerecord(completion_decision(), release=False, told="delivered")
    world.notifier.fail_completions.append(NotifyError("HTTP 502"))
    delivery = deliver()
    assert world.settlement.completed(delivery, MSG, Completion(URL, META)) is Settled.RETRY
    assert world.doc() == record(completion_payload())
    assert world.queue() == queue_of(
        retried=[(delivery, "completed not delivered: NOTIFY_ERROR: HTTP 502", 0, 5.0)]
    )


class FailingTellWrites(FakeRecordStore):
    """Writes that change "told" (to a value or to null) after a telling raise ``error``."""

    error: Exception = KeyError("ETag")
    armed: bool = False

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        if self.armed and (b'"told":{' in data or b'"teller":null,"told":null' in data):
            raise self.error
        return super().replace(key, data, version)


def test_a_re_telling_not_forgotten_is_still_handed_back(monkeypatch: pytest.MonkeyPatch) -> None:
    world = build(monkeypatch, records=FailingTellWrites())
    world.prerecord(completion_decision(), release=False, told="delivered")
    before = world.doc()
    world.records.armed = True  # type: ignore[attr-defined]
    world.notifier.fail_completions.append(NotifyError("HTTP 502"))
    delivery = deliver()
    assert world.settlement.completed(delivery, MSG, Completion(URL, META)) is Settled.RETRY
    assert world.doc() == before
    assert world.queue() == queue_of(
        retried=[(delivery, "completed not delivered: NOTIFY_ERROR: HTTP 502", 0, 5.0)]
    )


def test_a_told_completion_not_recorded_is_still_acked(monkeypatch: pytest.MonkeyPatch) -> None:
    world = build(monkeypatch, records=FailingTellWrites())
    world.records.armed = True  # type: ignore[attr-defined]
    delivery = deliver()
    assert world.settlement.completed(delivery, MSG, Completion(URL, META)) is Settled.COMPLETED
    assert world.doc() == record(completion_payload(), teller="copy-1", since=WALL)
    assert world.queue() == queue_of(acked=[delivery])


# --- known outcomes ----------------------------------------------------------------------------


def test_nothing_known_runs_the_job(world: World) -> None:
    asked: list[Completion | None] = []
    assert world.settlement.known(deliver(), MSG, lambda: asked.append(None)) is None
    assert asked == [None] and not world.records.records and world.queue() == queue_of()


def test_a_stored_image_is_decided_and_told(world: World) -> None:
    delivery = deliver()
    assert world.settlement.known(delivery, MSG, lambda: Completion(URL, META)) is (
        Settled.COMPLETED
    )
    assert world.notifier.snapshots == [record(completion_payload(), teller="copy-1", since=WALL)]
    assert world.notifier.sent == [SENT_COMPLETION]
    assert world.doc() == record(completion_payload(), told={"how": "delivered", "at": WALL})
    assert world.queue() == queue_of(acked=[delivery])


def test_a_recorded_decision_is_followed_without_looking_for_an_image(world: World) -> None:
    world.prerecord(completion_decision())

    def stored() -> Completion | None:
        raise AssertionError("not asked")

    delivery = deliver()
    assert world.settlement.known(delivery, MSG, stored) is Settled.COMPLETED
    assert world.notifier.sent == [SENT_COMPLETION]
    assert world.queue() == queue_of(acked=[delivery])


def test_a_told_decision_acks_a_copy_silently(world: World) -> None:
    world.prerecord(completion_decision(), release=False, told="delivered")
    delivery = deliver()
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.DUPLICATE
    assert not world.notifier.sent and world.queue() == queue_of(acked=[delivery])


def test_a_withheld_failure_acks_a_copy_silently(world: World) -> None:
    world.prerecord(failure_decision(), release=False, told=WITHHELD)
    delivery = deliver()
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.DUPLICATE
    assert not world.notifier.sent and world.queue() == queue_of(acked=[delivery])


@pytest.mark.parametrize("where", ["entry", "stored"])
def test_unreachable_records_hand_a_known_check_back(world: World, where: str) -> None:
    def stored() -> Completion | None:
        raise StorageError("S3 down")

    if where == "entry":
        world.records.fail_next.append(StorageError("S3 down"))
    delivery = deliver(attempt=1, handbacks=4)
    assert world.settlement.known(delivery, MSG, stored) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "outcome records unreachable: STORAGE_ERROR: S3 down", 1, 600.0)]
    )


def test_a_failure_perhaps_applied_parks_every_copy(world: World) -> None:
    world.prerecord(failure_decision(), release=False, told="unknown: read timeout")
    for _ in range(2):
        world.settlement.known(deliver(), MSG, lambda: None)
    delivery = deliver(attempt=2)
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.PARKED
    text = "failed not delivered: NOTIFY_ERROR: unknown: read timeout"
    assert world.source.parked[-1] == (delivery, text, failure_payload())
    assert world.source.acked == [] and world.source.retried == []
    assert not world.notifier.sent
    assert (
        world.telemetry.events
        == [("undelivered", {"outcome": "failed", "reason": "unknown", "parked": True})] * 3
    )


def test_a_failure_given_up_is_told_again_by_a_copy(world: World) -> None:
    world.prerecord(failure_decision(), release=False, told="parked: HTTP 400")
    world.ledger.failure_owner(MSG)
    world.wall.advance(5.0)
    delivery = deliver()
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.FAILED
    assert world.notifier.snapshots == [
        record(failure_payload(), teller="copy-1", since=WALL + 5.0, sending=True)
    ]
    assert world.notifier.sent == [sent_failure()]
    assert world.doc() == record(failure_payload(), told={"how": "delivered", "at": WALL + 5.0})
    assert world.queue() == queue_of(acked=[delivery])


# --- failures --------------------------------------------------------------------------------


def test_a_retryable_error_is_handed_back_while_retries_remain(world: World) -> None:
    delivery = deliver(attempt=2, handbacks=2)
    assert world.settlement.failed(delivery, MSG, GpuOutOfMemory("oom")) is Settled.RETRY
    assert world.queue() == queue_of(retried=[(delivery, "GPU_OOM: oom", 3, 80.0)])
    assert world.records.records == {} and not world.notifier.sent


def test_a_retryable_error_out_of_retries_is_decided_and_told(world: World) -> None:
    world.notifier.call_seconds = 3.0
    delivery = deliver(attempt=3, handbacks=3)
    assert world.settlement.failed(delivery, MSG, GpuOutOfMemory("oom")) is Settled.FAILED
    payload = failure_payload("GPU_OOM", "oom", 3)
    assert world.notifier.snapshots == [record(payload, teller="copy-1", since=WALL, sending=True)]
    assert world.notifier.sent == [
        ("failed", 7, {"code": ErrorCode.GPU_OOM, "message": "oom", "retry_count": 3})
    ]
    assert world.doc() == record(payload, told={"how": "delivered", "at": WALL + 3.0})
    assert world.owner_doc() == {"message": MSG.key, "task_id": "t-7", "at": WALL}
    assert world.queue() == queue_of(acked=[delivery])
    assert world.telemetry.events == []


def test_a_final_error_is_decided_at_once(world: World) -> None:
    world.access.refused("HTTP 401")
    delivery = deliver()
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.FAILED
    assert world.notifier.sent == [sent_failure()]
    assert world.doc() == record(failure_payload(), told={"how": "delivered", "at": WALL})
    assert world.queue() == queue_of(acked=[delivery])
    assert world.access.refusal is None


@pytest.mark.parametrize(("length", "kept"), [(1000, 1000), (1001, 1000)])
def test_the_error_message_is_cut_to_1000_characters(world: World, length: int, kept: int) -> None:
    world.settlement.failed(deliver(), MSG, LoraInvalid("x" * length))
    assert world.notifier.sent == [sent_failure("x" * kept)]
    assert world.doc()["failure"]["message"] == "x" * kept


def test_a_retryable_error_follows_a_completion_decided_meanwhile(world: World) -> None:
    world.prerecord(completion_decision(), release=False, told="delivered")
    delivery = deliver(attempt=1)
    assert world.settlement.failed(delivery, MSG, GpuOutOfMemory("oom")) is Settled.COMPLETED
    assert world.notifier.sent == [SENT_COMPLETION]
    assert world.queue() == queue_of(acked=[delivery])


def test_a_retryable_error_follows_a_failure_told_meanwhile(world: World) -> None:
    world.prerecord(failure_decision(), release=False, told="delivered")
    delivery = deliver(attempt=1)
    assert world.settlement.failed(delivery, MSG, GpuOutOfMemory("oom")) is Settled.DUPLICATE
    assert not world.notifier.sent and world.queue() == queue_of(acked=[delivery])


def test_a_retryable_error_tells_a_failure_decided_meanwhile(world: World) -> None:
    world.prerecord(failure_decision())
    delivery = deliver(attempt=1)
    assert world.settlement.failed(delivery, MSG, GpuOutOfMemory("oom")) is Settled.FAILED
    assert world.notifier.snapshots == [
        record(failure_payload(), teller="copy-1", since=WALL, sending=True)
    ]
    assert world.notifier.sent == [sent_failure()]
    assert world.queue() == queue_of(acked=[delivery])


def test_a_final_error_tells_again_a_completion_told_first(world: World) -> None:
    world.prerecord(completion_decision(), release=False, told="delivered")
    delivery = deliver(attempt=3)
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.COMPLETED
    assert world.notifier.sent == [SENT_COMPLETION]
    assert world.queue() == queue_of(acked=[delivery])


def test_a_carried_failure_follows_a_completion_told_first(world: World) -> None:
    world.prerecord(completion_decision(), release=False, told="delivered")
    report = FailureReport(generation_id=7, code=ErrorCode.GPU_OOM, message="oom", retry_count=3)
    delivery = deliver(attempt=3)
    assert world.settlement.carried(delivery, MSG, report) is Settled.DUPLICATE
    assert not world.notifier.sent and world.queue() == queue_of(acked=[delivery])


def test_a_poison_copy_follows_a_completion_told_first(world: World) -> None:
    world.prerecord(completion_decision(), release=False, told="delivered")
    delivery = deliver()
    assert world.settlement.poison(delivery, MSG, InvalidRequest("bad")) is Settled.DUPLICATE
    assert not world.notifier.sent and world.queue() == queue_of(acked=[delivery])


def test_a_retryable_error_with_records_unreachable_is_handed_back(world: World) -> None:
    world.records.fail_next.append(StorageError("S3 down"))
    delivery = deliver(attempt=0, handbacks=1)
    assert world.settlement.failed(delivery, MSG, GpuOutOfMemory("oom")) is Settled.RETRY
    assert world.queue() == queue_of(retried=[(delivery, "GPU_OOM: oom", 1, 20.0)])


def test_a_carried_failure_is_told_as_carried(world: World) -> None:
    report = FailureReport(generation_id=7, code=ErrorCode.GPU_OOM, message="oom", retry_count=3)
    delivery = deliver(attempt=3)
    assert world.settlement.carried(delivery, MSG, report) is Settled.FAILED
    assert world.notifier.sent == [
        ("failed", 7, {"code": ErrorCode.GPU_OOM, "message": "oom", "retry_count": 3})
    ]
    assert world.doc() == record(
        failure_payload("GPU_OOM", "oom", 3), told={"how": "delivered", "at": WALL}
    )
    assert world.queue() == queue_of(acked=[delivery])


def test_a_poison_message_without_a_generation_is_parked(world: World) -> None:
    delivery = deliver()
    assert world.settlement.poison(delivery, None, InvalidRequest("not json")) is Settled.PARKED
    assert world.queue() == queue_of(parked=[(delivery, "INVALID_REQUEST: not json", None)])
    assert not world.notifier.sent and world.records.records == {}


def test_a_poison_message_is_reported_then_parked(world: World) -> None:
    delivery = deliver(attempt=1)
    error = InvalidRequest("y" * 1001)
    assert world.settlement.poison(delivery, MSG, error) is Settled.PARKED
    assert world.notifier.sent == [
        ("failed", 7, {"code": ErrorCode.INVALID_REQUEST, "message": "y" * 1000, "retry_count": 1})
    ]
    payload = failure_payload("INVALID_REQUEST", "y" * 1000, 1, poison=True)
    assert world.doc() == record(payload, told={"how": "delivered", "at": WALL})
    reason = "INVALID_REQUEST: " + "y" * 1000
    assert world.queue() == queue_of(parked=[(delivery, reason, None)])


# --- the turn to tell a failure --------------------------------------------------------------


def test_a_live_teller_keeps_its_turn_until_the_lease_ends(world: World) -> None:
    world.ledger.failure_owner(MSG)
    world.prerecord(failure_decision(), teller="other", release=False)
    before = world.doc()
    world.wall.advance(899.0)
    delivery = deliver(handbacks=2)
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "another copy is telling its failure", 0, 80.0)]
    )
    assert world.doc() == before and not world.notifier.sent
    world.wall.advance(1.0)  # exactly the lease: the teller is presumed dead
    again = deliver()
    assert world.settlement.known(again, MSG, lambda: None) is Settled.FAILED
    assert world.notifier.snapshots == [
        record(failure_payload(), teller="copy-2", since=WALL + 900.0, sending=True)
    ]
    assert world.notifier.sent == [sent_failure()]
    assert world.source.acked == [again]


def test_a_teller_stopped_while_sending_is_waited_for_then_parked(world: World) -> None:
    world.ledger.failure_owner(MSG)
    entry = world.prerecord(failure_decision(), teller="other", release=False)
    world.ledger.mark_sending(MSG, entry)
    world.wall.advance(899.0)
    first = deliver()
    assert world.settlement.known(first, MSG, lambda: None) is Settled.RETRY
    world.wall.advance(1.0)
    delivery = deliver(attempt=2)
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.PARKED
    stopped = "the copy telling this failure stopped while sending it"
    assert world.queue() == queue_of(
        retried=[(first, "another copy is telling its failure", 0, 5.0)],
        parked=[(delivery, f"failed not delivered: NOTIFY_ERROR: {stopped}", failure_payload())],
    )
    assert world.doc() == record(
        failure_payload(), told={"how": f"unknown: {stopped}", "at": WALL + 900.0}
    )
    assert world.telemetry.events == [
        ("undelivered", {"outcome": "failed", "reason": "unknown", "parked": True})
    ]
    assert not world.notifier.sent


def test_a_turn_taken_by_another_copy_first_hands_back(monkeypatch: pytest.MonkeyPatch) -> None:
    class TakenMeanwhile(FakeRecordStore):
        """Another copy takes the turn between this copy's read and its write."""

        def replace(self, key: str, data: bytes, version: str) -> str | None:
            if b'"teller":"copy-1"' in data:
                return None
            return super().replace(key, data, version)

    world = build(monkeypatch, records=TakenMeanwhile())
    world.prerecord(failure_decision())
    delivery = deliver()
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "another copy is telling its failure", 0, 5.0)]
    )
    assert not world.notifier.sent


def test_a_failed_verdict_without_report_is_never_sent(world: World) -> None:
    bare = Decision(verdict=Verdict.FAILED, generation_id=7, task_id="t-7", decided_at=WALL)
    world.ledger.release_turn(MSG, world.ledger.decide(MSG, bare, teller="other"))
    before = world.doc()
    assert before["teller"] is None
    delivery = deliver()
    released = Entry(decision=bare, version="v2")
    # pylint: disable-next=protected-access
    settled = world.settlement._tell(delivery, MSG, released, "copy-9", retell=False)
    assert settled is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "another copy is telling its failure", 0, 5.0)]
    )
    assert not world.notifier.sent and world.doc() == before  # no turn taken


class OutageOnReplace(FakeRecordStore):
    """Records that can be read and created, but not replaced once ``armed``."""

    armed: bool = False

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        if self.armed:
            raise StorageError("S3 down")
        return super().replace(key, data, version)


def test_records_unreachable_while_taking_the_turn_hand_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = OutageOnReplace()
    world = build(monkeypatch, records=records)
    world.prerecord(failure_decision())
    records.armed = True
    delivery = deliver()
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "outcome records unreachable: STORAGE_ERROR: S3 down", 0, 5.0)]
    )
    assert not world.notifier.sent


def test_records_unreachable_while_claiming_the_failure_hand_back(world: World) -> None:
    world.prerecord(failure_decision())
    # The entry is read, the turn taken, then claiming the generation's failure fails.
    original = world.records.create

    def create(key: str, data: bytes) -> Record:
        if key == "7/failure.json":
            raise StorageError("S3 down")
        return original(key, data)

    world.records.create = create  # type: ignore[method-assign]
    delivery = deliver()
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "outcome records unreachable: STORAGE_ERROR: S3 down", 0, 5.0)]
    )
    assert not world.notifier.sent


# --- the one failure call of a generation -----------------------------------------------------


def test_a_failure_of_a_generation_already_reported_is_withheld(world: World) -> None:
    world.settlement.failed(deliver(), OTHER, LoraInvalid("bad lora"))
    world.wall.advance(7.0)
    delivery = deliver()
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.FAILED
    assert world.notifier.sent == [sent_failure()]  # OTHER's only
    assert world.doc() == record(
        failure_payload(decided_at=WALL + 7.0), told={"how": WITHHELD, "at": WALL + 7.0}
    )
    assert world.owner_doc() == {"message": OTHER.key, "task_id": "t-7b", "at": WALL}
    assert world.telemetry.events == [("withheld", {})]
    assert world.source.acked[-1] is delivery and world.source.parked == []


def test_a_withheld_poison_failure_is_parked(world: World) -> None:
    world.settlement.failed(deliver(), OTHER, LoraInvalid("bad lora"))
    delivery = deliver()
    assert world.settlement.poison(delivery, MSG, InvalidRequest("bad")) is Settled.PARKED
    assert world.queue()["parked"] == [(delivery, "INVALID_REQUEST: bad", None)]
    assert world.telemetry.events == [("withheld", {})]
    assert world.doc()["told"] == {"how": WITHHELD, "at": WALL}


def test_a_failure_perhaps_applied_keeps_the_generation(world: World) -> None:
    world.notifier.fail_failures.append(WebhookOutcomeUnknown("read timeout"))
    assert world.settlement.failed(deliver(), OTHER, LoraInvalid("bad lora")) is Settled.PARKED
    delivery = deliver()
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.FAILED
    assert not world.notifier.sent
    assert world.telemetry.of("withheld") == [{}]
    assert world.owner_doc()["message"] == OTHER.key


def test_a_failure_given_up_passes_the_generation_to_the_next_message(world: World) -> None:
    world.notifier.fail_failures.append(WebhookRejected("HTTP 400"))
    assert world.settlement.failed(deliver(), OTHER, LoraInvalid("bad lora")) is Settled.PARKED
    assert world.doc(OTHER)["told"] == {"how": "parked: HTTP 400", "at": WALL}
    world.wall.advance(60.0)
    delivery = deliver()
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.FAILED
    assert world.owner_doc() == {"message": MSG.key, "task_id": "t-7", "at": WALL + 60.0}
    assert world.notifier.sent == [sent_failure()]
    assert world.telemetry.of("withheld") == []
    assert world.source.acked == [delivery]


def test_a_failure_owner_without_record_keeps_the_generation(world: World) -> None:
    world.ledger.failure_owner(OTHER)  # claimed, then its worker died before recording
    delivery = deliver()
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.FAILED
    assert not world.notifier.sent and world.telemetry.of("withheld") == [{}]


@pytest.mark.parametrize(
    ("error", "age", "reason", "parked", "told"),
    [
        (NotifyError("HTTP 503"), 0.0, "unreachable", False, None),
        (NotifyError("HTTP 503"), 86400.0, "unreachable", False, None),
        (NotifyError("HTTP 503"), 86401.0, "unreachable", True, "parked: HTTP 503"),
        (WebhookUnauthorized("HTTP 401"), 86400.0, "unauthorized", False, None),
        (WebhookUnauthorized("HTTP 401"), 86401.0, "unauthorized", True, "parked: HTTP 401"),
        (WebhookNotFound("HTTP 404"), 300.0, "not_found", False, None),
        (WebhookNotFound("HTTP 404"), 301.0, "not_found", True, "parked: HTTP 404"),
        (WebhookRejected("HTTP 400"), 0.0, "rejected", True, "parked: HTTP 400"),
        (WebhookOutcomeUnknown("read timeout"), 0.0, "unknown", True, "unknown: read timeout"),
    ],
)
def test_a_failure_the_backend_does_not_take(  # pylint: disable=too-many-arguments
    world: World, error: NotifyError, age: float, reason: str, parked: bool, told: str | None
) -> None:
    world.prerecord(failure_decision(decided_at=WALL - age))
    world.notifier.fail_failures.append(error)
    delivery = deliver(attempt=2, handbacks=1)
    settled = world.settlement.known(delivery, MSG, lambda: None)
    text = f"failed not delivered: NOTIFY_ERROR: {error.message}"
    payload = failure_payload(decided_at=WALL - age)
    assert world.notifier.snapshots == [record(payload, teller="copy-1", since=WALL, sending=True)]
    if parked:
        assert settled is Settled.PARKED
        assert world.queue() == queue_of(parked=[(delivery, text, payload)])
        assert world.doc() == record(payload, told={"how": told, "at": WALL})
    else:
        assert settled is Settled.RETRY
        assert world.queue() == queue_of(retried=[(delivery, text, 2, 20.0)])
        assert world.doc() == record(payload)  # the turn released: another copy may tell it
    assert world.telemetry.events == [
        ("undelivered", {"outcome": "failed", "reason": reason, "parked": parked})
    ]
    unauthorized = isinstance(error, WebhookUnauthorized)
    assert world.access.refusal == ("HTTP 401" if unauthorized else None)


def test_a_turn_not_released_still_hands_back(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoRelease(FakeRecordStore):
        armed = False

        def replace(self, key: str, data: bytes, version: str) -> str | None:
            if self.armed and b'"teller":null' in data:
                raise KeyError("ETag")
            return super().replace(key, data, version)

    records = NoRelease()
    world = build(monkeypatch, records=records)
    world.prerecord(failure_decision())
    records.armed = True
    world.notifier.fail_failures.append(NotifyError("HTTP 503"))
    delivery = deliver()
    assert world.settlement.known(delivery, MSG, lambda: None) is Settled.RETRY
    assert world.doc() == record(failure_payload(), teller="copy-1", since=WALL, sending=True)
    assert world.queue() == queue_of(
        retried=[(delivery, "failed not delivered: NOTIFY_ERROR: HTTP 503", 0, 5.0)]
    )


def test_a_told_failure_not_recorded_is_still_acked(monkeypatch: pytest.MonkeyPatch) -> None:
    world = build(monkeypatch, records=FailingTellWrites())
    world.records.armed = True  # type: ignore[attr-defined]
    delivery = deliver()
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.FAILED
    assert world.doc() == record(failure_payload(), teller="copy-1", since=WALL, sending=True)
    assert world.queue() == queue_of(acked=[delivery])


# --- marking a failure as being sent ------------------------------------------------------------


class SendingMarks(FakeRecordStore):
    """What happens to the write that marks a failure as being sent: ``lands`` (stored or not),
    ``answer`` ("lost": None returned; "error": StorageError raised; "ok"), and ``then`` a
    document that replaces the record afterwards (another copy's write), or None."""

    lands: bool = True
    answer: str = "ok"
    then: dict[str, Any] | None = None

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        if b'"sending":true' not in data:
            return super().replace(key, data, version)
        changed = super().replace(key, data, version) if self.lands else None
        if self.then is not None:
            with self.lock:
                self.records[key] = (json.dumps(self.then).encode(), "v-then")
        if self.answer == "error":
            raise StorageError("answer lost")
        return None if self.answer == "lost" else changed


@pytest.mark.parametrize("answer", ["lost", "error"])
def test_a_sending_mark_that_landed_sends(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    records = SendingMarks()
    records.answer = answer
    world = build(monkeypatch, records=records)
    delivery = deliver()
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.FAILED
    assert world.notifier.sent == [sent_failure()]
    assert world.doc() == record(failure_payload(), told={"how": "delivered", "at": WALL})
    assert world.queue() == queue_of(acked=[delivery])


@pytest.mark.parametrize(
    "then",
    [
        None,  # the write did not land
        "other teller",
        "not sending",
        "settled",
        "gone",
    ],
)
def test_a_sending_mark_that_did_not_land_hands_back(
    monkeypatch: pytest.MonkeyPatch, then: str | None
) -> None:
    records = SendingMarks()
    records.answer = "error"
    records.lands = False
    payload = failure_payload()
    if then == "other teller":
        records.then = record(payload, teller="copy-x", since=WALL, sending=True)
    elif then == "not sending":
        records.then = record(payload, teller="copy-1", since=WALL, sending=False)
    elif then == "settled":
        records.then = record(
            payload, told={"how": "delivered", "at": WALL}, teller="copy-1", sending=True
        )
    world = build(monkeypatch, records=records)
    if then == "gone":

        def vanish(key: str, data: bytes, version: str) -> str | None:
            if b'"sending":true' in data:
                del records.records[key]
                raise StorageError("answer lost")
            return FakeRecordStore.replace(records, key, data, version)

        records.replace = vanish  # type: ignore[method-assign]
    delivery = deliver()
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "another copy took the turn to tell its failure", 0, 5.0)]
    )
    assert not world.notifier.sent


def test_a_sending_mark_whose_re_read_fails_hands_back(monkeypatch: pytest.MonkeyPatch) -> None:
    records = SendingMarks()
    records.answer = "lost"
    world = build(monkeypatch, records=records)
    original = records.replace

    def lost_then_down(key: str, data: bytes, version: str) -> str | None:
        answer = original(key, data, version)
        if b'"sending":true' in data:
            records.fail_next.append(StorageError("S3 down"))
        return answer

    records.replace = lost_then_down  # type: ignore[method-assign]
    delivery = deliver()
    assert world.settlement.failed(delivery, MSG, LoraInvalid("bad lora")) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "outcome records unreachable: STORAGE_ERROR: S3 down", 0, 5.0)]
    )


# --- without a job ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handbacks", "delay"), [(0, 5.0), (1, 20.0), (2, 80.0), (3, 320.0), (4, 600.0), (9, 600.0)]
)
def test_a_delivery_returned_later_waits_its_back_off(
    world: World, handbacks: int, delay: float
) -> None:
    delivery = deliver(attempt=2, handbacks=handbacks)
    assert world.settlement.returned(delivery, "in flight here") is Settled.RETURNED
    assert world.queue() == queue_of(retried=[(delivery, "in flight here", 2, delay)])


def test_a_delivery_returned_now_is_released(world: World) -> None:
    delivery = deliver(attempt=1, handbacks=1)
    assert world.settlement.returned(delivery, "held too long", requeue_now=True) is (
        Settled.RETURNED
    )
    assert world.queue() == queue_of(released=[delivery])


def test_contain_hands_back_while_retries_remain(world: World) -> None:
    delivery = deliver(attempt=2, handbacks=2)
    assert world.settlement.contain(delivery, InternalError("bug")) is Settled.RETRY
    assert world.queue() == queue_of(
        retried=[(delivery, "could not be settled: INTERNAL_ERROR: bug", 3, 80.0)]
    )


def test_contain_parks_once_retries_are_spent(world: World) -> None:
    delivery = deliver(attempt=3, handbacks=3)
    assert world.settlement.contain(delivery, InternalError("bug")) is Settled.PARKED
    assert world.queue() == queue_of(
        parked=[(delivery, "could not be settled: INTERNAL_ERROR: bug", None)]
    )


class ExplodingSource(InMemoryTaskSource):
    def ack(self, delivery: Delivery) -> None:
        raise ConnectionError("channel closed")

    def retry(self, delivery: Delivery, *, reason: str, attempt: int, delay_seconds: float) -> None:
        raise ConnectionError("channel closed")

    def release(self, delivery: Delivery) -> None:
        raise ConnectionError("channel closed")

    def park(
        self, delivery: Delivery, reason: str, *, outcome: Mapping[str, Any] | None = None
    ) -> None:
        raise ConnectionError("channel closed")


def test_a_source_that_raises_while_settling_is_contained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = build(monkeypatch, source=ExplodingSource())
    settlement = world.settlement
    assert settlement.completed(deliver(), MSG, Completion(URL, META)) is Settled.COMPLETED
    assert settlement.returned(deliver(), "x") is Settled.RETURNED
    assert settlement.returned(deliver(), "x", requeue_now=True) is Settled.RETURNED
    assert settlement.contain(deliver(attempt=3), InternalError("bug")) is Settled.PARKED
