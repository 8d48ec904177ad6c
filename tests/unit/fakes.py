"""Hand-written fakes of the ports that record what happened (unit tests of the domain only)."""

from __future__ import annotations

import io
import itertools
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from adapters.memory_task_source import InMemoryTaskSource
from domain.errors import (
    ErrorCode,
    GenerationError,
    InvalidRequest,
    LoraNotFound,
    SignatureInvalid,
)
from domain.progress import ProgressUpdate
from domain.request import GenerationRequest
from ports.image_model import BatchItem, StepCallback
from ports.provenance import MarkedImage, ProvenanceFacts
from ports.records import Record
from ports.storage import LoraArtifact, ReferenceKind, StoredOutput
from ports.task_source import Delivery


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeImageModel:
    """Paints a flat image of the requested size; advances a fake clock per step."""

    clock: FakeClock | None = None
    seconds_per_step: float = 0.1
    color: tuple[int, int, int] = (0, 0, 0)
    fail_with: list[GenerationError | Exception] = field(default_factory=list)
    calls: list[tuple[GenerationRequest, LoraArtifact | None]] = field(default_factory=list)
    batch_limit: int = 1
    batches: list[list[int]] = field(default_factory=list)
    """Generation ids of each ``generate_batch`` call."""
    item_errors: dict[int, GenerationError] = field(default_factory=dict)
    """Per generation id: the error ``generate_batch`` returns in that item's slot."""

    @property
    def name(self) -> str:
        return "fake/sd15"

    @property
    def max_batch_size(self) -> int:
        return self.batch_limit

    def lora_cache_stats(self) -> None:
        return None

    def generate_batch(self, items: Sequence[BatchItem]) -> list[Image.Image | GenerationError]:
        self.batches.append([item.request.generation_id for item in items])
        for item in items:
            self.calls.append((item.request, item.lora))
        if self.fail_with:
            raise self.fail_with.pop(0)
        steps = items[0].request.steps
        for step in range(1, steps + 1):
            if self.clock is not None:
                self.clock.advance(self.seconds_per_step)
            for item in items:
                item.on_step(step, steps)
        return [
            self.item_errors.get(item.request.generation_id)
            or Image.new("RGB", (item.request.width, item.request.height), self.color)
            for item in items
        ]

    def generate(
        self, request: GenerationRequest, lora: LoraArtifact | None, on_step: StepCallback
    ) -> Image.Image:
        self.calls.append((request, lora))
        if self.fail_with:
            raise self.fail_with.pop(0)
        for step in range(1, request.steps + 1):
            if self.clock is not None:
                self.clock.advance(self.seconds_per_step)
            on_step(step, request.steps)
        return Image.new("RGB", (request.width, request.height), self.color)


@dataclass
class FakeStorage:
    """Objects in dicts; ``fail_puts``, ``fail_fetches``, ``fail_finds`` raise errors first."""

    loras: dict[str, bytes] = field(default_factory=dict)
    signatures: dict[str, bytes] = field(default_factory=dict)
    outputs: dict[str, tuple[bytes, dict[str, str]]] = field(default_factory=dict)
    fail_puts: list[GenerationError] = field(default_factory=list)
    fail_fetches: list[GenerationError] = field(default_factory=list)
    fail_finds: list[GenerationError] = field(default_factory=list)
    fail_checks: list[GenerationError] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    puts: list[str] = field(default_factory=list)
    checked: list[tuple[str, str]] = field(default_factory=list)

    def fetch_lora(self, ref: str) -> LoraArtifact:
        self.fetched.append(ref)
        if self.fail_fetches:
            raise self.fail_fetches.pop(0)
        if ref not in self.loras:
            raise LoraNotFound(f"no LoRA at {ref!r}")
        return LoraArtifact(ref=ref, path=f"/fake/{ref}", checksum=f"sha-{len(self.loras[ref])}")

    def fetch_signature(self, ref: str) -> bytes:
        self.fetched.append(ref)
        if ref not in self.signatures:
            raise SignatureInvalid(f"no signature image at {ref!r}")
        return self.signatures[ref]

    def check_reference(self, ref: str, kind: ReferenceKind) -> None:
        self.checked.append((ref, kind))
        if ref.startswith("ftp://"):
            raise InvalidRequest(f"{ref!r} is not a storage reference")

    def find_output(self, key: str) -> StoredOutput | None:
        if self.fail_finds:
            raise self.fail_finds.pop(0)
        if key not in self.outputs:
            return None
        return StoredOutput(key=key, url=f"https://cdn.test/{key}", metadata=self.outputs[key][1])

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        self.puts.append(key)
        if self.fail_puts:
            raise self.fail_puts.pop(0)
        if key in self.outputs:  # the first writer wins, as with If-None-Match: *
            stored = self.outputs[key][1]
            return StoredOutput(
                key=key, url=f"https://cdn.test/{key}", metadata=stored, created=False
            )
        self.outputs[key] = (data, dict(metadata))
        return StoredOutput(key=key, url=f"https://cdn.test/{key}", metadata=dict(metadata))

    def lora_cache_stats(self) -> None:
        return None

    def check(self) -> None:
        if self.fail_checks:
            raise self.fail_checks.pop(0)


@dataclass
class FakeRecordStore:
    """Records in a dict with a version counter, changed atomically under a lock;
    ``fail_next`` raises its errors first (one per call)."""

    records: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    fail_next: list[Exception] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    versions: itertools.count = field(default_factory=lambda: itertools.count(1))

    def _fail(self) -> None:
        if self.fail_next:
            raise self.fail_next.pop(0)

    def create(self, key: str, data: bytes) -> Record:
        with self.lock:
            self._fail()
            if key in self.records:
                return Record(*self.records[key])
            self.records[key] = (bytes(data), f"v{next(self.versions)}")
            return Record(*self.records[key], created=True)

    def read(self, key: str) -> Record | None:
        with self.lock:
            self._fail()
            return Record(*self.records[key]) if key in self.records else None

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        with self.lock:
            self._fail()
            if key not in self.records or self.records[key][1] != version:
                return None
            self.records[key] = (bytes(data), f"v{next(self.versions)}")
            return self.records[key][1]

    def document(self, key: str) -> Any:
        return json.loads(self.records[key][0])

    def keys(self, generation_id: int) -> list[str]:
        return sorted(key for key in self.records if key.startswith(f"{generation_id}/"))


@dataclass
class FakeNotifier:
    """Records every webhook as (kind, generation_id, payload); can fail the first calls.

    ``refuse_access`` makes ``check_access`` raise it (a rotated token); ``probes`` counts the
    calls.
    """

    sent: list[tuple[str, int, Any]] = field(default_factory=list)
    fail_completions: list[Exception] = field(default_factory=list)
    fail_failures: list[Exception] = field(default_factory=list)
    fail_progress: bool = False
    refuse_access: Exception | None = None
    probes: int = 0

    def progress(self, generation_id: int, update: ProgressUpdate) -> None:
        if self.fail_progress:
            raise ConnectionError("backend down")
        self.sent.append(("progress", generation_id, update))

    def completed(self, generation_id: int, result_url: str, metadata: Mapping[str, Any]) -> None:
        if self.fail_completions:
            raise self.fail_completions.pop(0)
        # A round trip through JSON proves the payload is serializable, as the webhook needs.
        self.sent.append(
            (
                "completed",
                generation_id,
                {"result_url": result_url, **json.loads(json.dumps(metadata))},
            )
        )

    def failed(self, generation_id: int, code: ErrorCode, message: str, retry_count: int) -> None:
        if self.fail_failures:
            raise self.fail_failures.pop(0)
        self.sent.append(
            (
                "failed",
                generation_id,
                {"code": code, "message": message, "retry_count": retry_count},
            )
        )

    def check_access(self) -> None:
        self.probes += 1
        if self.refuse_access is not None:
            raise self.refuse_access

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.sent]

    def of_kind(self, kind: str) -> list[Any]:
        return [payload for k, _, payload in self.sent if k == kind]


@dataclass
class FakeProvenance:
    """Records the facts each image was marked with; encodes a plain PNG; fails when told."""

    marked: list[ProvenanceFacts] = field(default_factory=list)
    error: Exception | None = None
    marks: tuple[str, ...] = ("fake",)
    clock: FakeClock | None = None
    seconds: float = 0.0

    def mark(self, image: Image.Image, facts: ProvenanceFacts) -> MarkedImage:
        if self.error is not None:
            raise self.error
        if self.clock is not None:
            self.clock.advance(self.seconds)
        self.marked.append(facts)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=6)
        return MarkedImage(
            png=buffer.getvalue(), provenance={"fake": {"generation_id": facts.generation_id}}
        )


@dataclass
class FakeTelemetry:
    """Records the events the domain reports."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def job_started(self) -> None:
        self.events.append(("started", {}))

    def job_finished(self, *, outcome: str, error_code: str | None, seconds: float) -> None:
        self.events.append(
            ("finished", {"outcome": outcome, "error_code": error_code, "seconds": seconds})
        )

    def images_generated(self, *, count: int, steps: int, seconds: float) -> None:
        self.events.append(("images", {"count": count, "steps": steps, "seconds": seconds}))

    def webhook_attempt(self, *, kind: str, ok: bool) -> None:
        self.events.append(("webhook", {"kind": kind, "ok": ok}))

    def outcome_undelivered(self, *, outcome: str, reason: str, parked: bool) -> None:
        self.events.append(
            ("undelivered", {"outcome": outcome, "reason": reason, "parked": parked})
        )

    def failure_withheld(self) -> None:
        self.events.append(("withheld", {}))

    def delivery_returned(self, *, reason: str) -> None:
        self.events.append(("returned", {"reason": reason}))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [payload for event, payload in self.events if event == name]


class AgingSource(InMemoryTaskSource):
    """Its first delivery has waited ``age`` seconds by the time it is handed to the runner."""

    def __init__(self, clock: FakeClock, age: float) -> None:
        super().__init__(clock=clock)
        self.fake_clock, self.age = clock, age

    def receive(self, timeout: float) -> Delivery | None:
        delivery = super().receive(timeout)
        if delivery is not None and self.age:
            self.fake_clock.advance(self.age)
            self.age = 0.0
        return delivery
