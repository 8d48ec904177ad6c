"""The durable memory of outcomes: what was decided for each message, and what the backend was told.

Every worker process reads and writes the same records (``ports.records.RecordStore``: S3
conditional writes in production), so "already handled" is decided from storage, never from one
process's memory or from the broker's ``redelivered`` flag. Per generation ``G``:

- ``G/<message>.json``: the one outcome of one message (completed or failed), created once,
  before the backend hears anything; a second copy of the message (a redelivery, a duplicate
  publish, another worker) reads it and follows it. The same record says whether the backend was
  told, and which copy is telling it now: a failure is told by one copy at a time (a lease taken
  and released with compare-and-swap), since each failure call refunds the user.
- ``G/failure.json``: which message owns the generation's one failure call. The backend refunds
  the user on every ``failed`` call, so a generation is reported failed once, whatever the number
  of messages the backend published for it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from domain.errors import ErrorCode, FailureReport, StorageError
from ports.records import Record, RecordStore

MESSAGE_KEY_HEX = 32
"""Hex digits of a message key (128 bits of SHA-256)."""

TOLD_DELIVERED = "delivered"
"""The backend took the outcome."""
TOLD_WITHHELD = "withheld: the generation was already reported failed"
"""A failure not sent: its generation's failure was told by another message."""
TOLD_UNKNOWN = "unknown: "
"""A failure the backend may have applied (its answer was lost): never sent again; every copy of
the message is parked for an operator."""
TOLD_PARKED = "parked: "
"""An outcome given up on (404 for too long, refused, too old): the backend does not have it. A
copy (an operator's replay) tells it again, and another message may own the generation's
failure."""


class Verdict(str, Enum):
    """The outcome decided for one message."""

    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class MessageId:
    """Who a message is: its generation and its publish.

    The backend makes a new ``task_id`` for every publish, so two deliveries with the same
    ``task_id`` are copies of one message (a redelivery, the same body published twice), and a
    new ``task_id`` for a known generation is a new message (the backend re-queued it). A message
    without a ``task_id`` is known by its body.
    """

    generation_id: int
    key: str
    task_id: str | None = None

    @classmethod
    def of(cls, generation_id: int, task_id: str | None, body: bytes) -> MessageId:
        """The identity of a message with this generation, task id and body."""
        seed = b"task:" + task_id.encode("utf-8") if task_id else b"body:" + body
        key = hashlib.sha256(seed).hexdigest()[:MESSAGE_KEY_HEX]
        return cls(generation_id=generation_id, key=key, task_id=task_id)


@dataclass(frozen=True)
class Decision:
    """The outcome of one message, recorded before the backend is told.

    A completion carries the stored image's ``result_url`` and metadata; a failure its report.
    ``decided_at`` is wall-clock seconds, so every worker can tell how old the decision is.
    """

    verdict: Verdict
    generation_id: int
    task_id: str | None
    decided_at: float
    result_url: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    failure: FailureReport | None = None

    def as_payload(self) -> dict[str, Any]:
        """The decision as the JSON object stored, and attached to a parked message."""
        payload: dict[str, Any] = {
            "verdict": self.verdict.value,
            "generation_id": self.generation_id,
            "task_id": self.task_id,
            "decided_at": self.decided_at,
        }
        if self.verdict is Verdict.COMPLETED:
            payload["result_url"] = self.result_url
            payload["metadata"] = dict(self.metadata)
        elif self.failure is not None:
            payload["failure"] = {
                "code": self.failure.code.value,
                "message": self.failure.message,
                "retry_count": self.failure.retry_count,
                "poison": self.failure.poison,
            }
        return payload

    @classmethod
    def from_payload(cls, payload: object) -> Decision:
        """Read a stored decision; ``ValueError`` when it is not one."""
        if not isinstance(payload, dict):
            raise ValueError("a decision is a JSON object")
        try:
            verdict = Verdict(payload["verdict"])
            generation_id = int(payload["generation_id"])
            task_id = payload.get("task_id")
            decided_at = float(payload["decided_at"])
            failure = None
            if verdict is Verdict.FAILED:
                raw = payload["failure"]
                failure = FailureReport(
                    generation_id=generation_id,
                    code=ErrorCode(raw["code"]),
                    message=str(raw["message"]),
                    retry_count=int(raw["retry_count"]),
                    poison=bool(raw.get("poison")),
                )
            metadata = payload.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise ValueError("metadata is not an object")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a decision: {exc}") from exc
        return cls(
            verdict=verdict,
            generation_id=generation_id,
            task_id=task_id if isinstance(task_id, str) else None,
            decided_at=decided_at,
            result_url=payload.get("result_url"),
            metadata=metadata,
            failure=failure,
        )


@dataclass(frozen=True)
class Entry:
    """A message's record: its decision, whether the backend was told, who is telling it."""

    decision: Decision
    version: str
    told: str | None = None
    """How the outcome was settled with the backend (one of the ``TOLD_*`` forms), or None."""
    teller: str | None = None
    """The copy telling the outcome now, or None."""
    teller_since: float = 0.0
    """Wall-clock seconds when that copy took its turn (or last renewed it)."""
    sending: bool = False
    """The teller was about to send the outcome: from then on the backend may have it."""

    @property
    def settled(self) -> bool:
        """Whether nothing more is to be told (delivered, withheld or perhaps applied)."""
        return self.told is not None and not self.told.startswith(TOLD_PARKED)

    @property
    def given_up(self) -> bool:
        """Whether the outcome was parked undelivered (the backend does not have it)."""
        return self.told is not None and self.told.startswith(TOLD_PARKED)


class OutcomeLedger:
    """Decisions and their telling, keyed by message identity, in a shared ``RecordStore``.

    Every method raises ``StorageError`` when the records cannot be reached; the caller then hands
    the message back, since no outcome may reach the backend before its decision is durable.
    """

    def __init__(
        self, *, records: RecordStore, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self._records = records
        self._wall_clock = wall_clock

    def now(self) -> float:
        """Wall-clock seconds, as ``Decision.decided_at`` counts them."""
        return self._wall_clock()

    def entry(self, message: MessageId) -> Entry | None:
        """The record of this message, if an outcome was decided for it."""
        record = self._records.read(self._key(message))
        return None if record is None else self._entry(message, record)

    def decide(self, message: MessageId, decision: Decision, *, teller: str) -> Entry:
        """Record ``decision`` with ``teller`` telling it, unless an outcome was recorded first;
        the entry that stands (``teller`` holds the turn only in the first case)."""
        mine = {
            **decision.as_payload(),
            "told": None,
            "teller": teller,
            "since": self.now(),
            "sending": False,
        }
        record = self._records.create(self._key(message), _encode(mine))
        if record.created:
            return Entry(
                decision=decision, version=record.version, teller=teller, teller_since=mine["since"]
            )
        return self._entry(message, record)

    def take_turn(self, message: MessageId, entry: Entry, teller: str) -> Entry | None:
        """Make ``teller`` the copy telling the outcome; None when another copy changed the
        record first (it is telling, or told)."""
        now = self.now()
        told = None if entry.given_up else entry.told  # told again: no longer given up
        changed = self._replace(message, entry, told=told, teller=teller, since=now)
        if changed is None:
            return None
        return Entry(
            decision=entry.decision, version=changed, told=told, teller=teller, teller_since=now
        )

    def mark_sending(self, message: MessageId, entry: Entry) -> Entry | None:
        """The teller is about to send: renew its turn and record that the backend may have the
        outcome from now on; None when another copy changed the record first (do not send)."""
        now = self.now()
        changed = self._replace(
            message, entry, told=entry.told, teller=entry.teller, since=now, sending=True
        )
        if changed is None:
            return None
        return Entry(
            decision=entry.decision,
            version=changed,
            told=entry.told,
            teller=entry.teller,
            teller_since=now,
            sending=True,
        )

    def release_turn(self, message: MessageId, entry: Entry) -> None:
        """The teller could not tell (the backend surely did not apply it): another copy may take
        the turn at once. Retried on a fresh read while the record still names this teller."""
        current: Entry | None = entry
        for _ in range(3):
            if current is None or current.teller != entry.teller or current.settled:
                return
            if (
                self._replace(message, current, told=current.told, teller=None, since=0.0)
                is not None
            ):
                return
            current = self.entry(message)
        raise StorageError(f"could not release the turn of generation {message.generation_id}")

    def forget_told(self, message: MessageId, entry: Entry) -> None:
        """A completion must be told again (a copy's re-telling failed): clear "told"."""
        self._replace(message, entry, told=None, teller=None, since=0.0)

    def mark_told(self, message: MessageId, entry: Entry, how: str) -> None:
        """Remember that the outcome needs no more telling, and why."""
        current: Entry | None = entry
        for _ in range(3):
            if current is None or current.settled:
                return
            if self._replace(message, current, told=how, teller=None, since=0.0) is not None:
                return
            current = self.entry(message)
        raise StorageError(f"could not record that generation {message.generation_id} was told")

    def failure_owner(self, message: MessageId) -> str:
        """Claim the generation's one failure call for this message; the key of its owner.

        The owner is this message's key when it won (or had won before), another message's key
        when the generation's failure belongs to that one.
        """
        key = self._failure_key(message.generation_id)
        mine = {"message": message.key, "task_id": message.task_id, "at": self.now()}
        record = self._records.create(key, _encode(mine))
        if record.created:
            return message.key
        return self._owner_of(record, key)

    def take_failure(self, message: MessageId, owner: str) -> bool:
        """Make this message the owner of its generation's failure when ``owner`` gave its up
        (its failure was parked undelivered); whether this message owns it now."""
        key = self._failure_key(message.generation_id)
        owner_entry = self.entry(MessageId(generation_id=message.generation_id, key=owner))
        if owner_entry is None or not owner_entry.given_up:
            return False
        record = self._records.read(key)
        if record is None:
            return False
        current = self._owner_of(record, key)
        if current != owner:
            return current == message.key
        mine = {"message": message.key, "task_id": message.task_id, "at": self.now()}
        if self._records.replace(key, _encode(mine), record.version) is not None:
            return True
        again = self._records.read(key)
        return again is not None and self._owner_of(again, key) == message.key

    @staticmethod
    def _owner_of(record: Record, key: str) -> str:
        owner = _decode_object(record.data, key).get("message")
        if not isinstance(owner, str):
            raise StorageError(f"record {key!r} does not name its message")
        return owner

    @staticmethod
    def _failure_key(generation_id: int) -> str:
        return f"{generation_id}/failure.json"

    def _replace(  # pylint: disable=too-many-arguments
        self,
        message: MessageId,
        entry: Entry,
        *,
        told: str | None,
        teller: str | None,
        since: float,
        sending: bool = False,
    ) -> str | None:
        """Compare-and-swap the record; its new version, or None when it changed meanwhile."""
        payload = {
            **entry.decision.as_payload(),
            "told": None if told is None else {"how": told, "at": self.now()},
            "teller": teller,
            "since": since,
            "sending": sending,
        }
        return self._records.replace(self._key(message), _encode(payload), entry.version)

    def _entry(self, message: MessageId, record: Record) -> Entry:
        key = self._key(message)
        document = _decode_object(record.data, key)
        try:
            decision = Decision.from_payload(document)
        except ValueError as exc:
            raise StorageError(f"record {key!r} is not a decision: {exc}") from exc
        told = document.get("told")
        teller = document.get("teller")
        since = document.get("since")
        return Entry(
            decision=decision,
            version=record.version,
            told=str(told.get("how")) if isinstance(told, dict) else None,
            teller=teller if isinstance(teller, str) else None,
            teller_since=float(since) if isinstance(since, (int, float)) else 0.0,
            sending=document.get("sending") is True,
        )

    @staticmethod
    def _key(message: MessageId) -> str:
        return f"{message.generation_id}/{message.key}.json"


def _encode(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()


def _decode_object(raw: bytes, key: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"record {key!r} is not JSON") from exc
    if not isinstance(document, dict):
        raise StorageError(f"record {key!r} is not a JSON object")
    return document
