"""The pipelined runner: the model works while earlier jobs upload and later ones download."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping

from dependency_injector import providers
from PIL import Image

from domain.errors import ErrorCode, GpuOutOfMemory, LoraInvalid
from domain.request import GenerationRequest
from ports.image_model import StepCallback
from ports.storage import LoraArtifact, StoredOutput
from tests.unit.conftest import Wired
from tests.unit.fakes import FakeImageModel, FakeStorage
from tests.messages import backend_message
from tests.unit.test_runner import run_all


class ModelThatSignals(FakeImageModel):
    def __init__(self) -> None:
        super().__init__()
        self.started: dict[int, threading.Event] = {}
        self.threads: set[str] = set()

    def event(self, generation_id: int) -> threading.Event:
        return self.started.setdefault(generation_id, threading.Event())

    def generate(
        self, request: GenerationRequest, lora: LoraArtifact | None, on_step: StepCallback
    ) -> Image.Image:
        self.threads.add(threading.current_thread().name)
        self.event(request.generation_id).set()
        return super().generate(request, lora, on_step)


class UploadWaitingForTheModel(FakeStorage):
    """Job N's upload only completes once the model has started job N + 1."""

    def __init__(self, model: ModelThatSignals, last: int) -> None:
        super().__init__()
        self.model = model
        self.last = last
        self.overlapped: list[bool] = []
        self.fetch_threads: set[str] = set()

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        generation_id = int(metadata["generation-id"])
        if generation_id < self.last:
            self.overlapped.append(self.model.event(generation_id + 1).wait(timeout=5))
        return super().put_output(key, data, metadata)

    def find_output(self, key: str) -> StoredOutput | None:
        self.fetch_threads.add(threading.current_thread().name)
        return super().find_output(key)


def test_uploads_overlap_the_next_generation(wired: Wired) -> None:
    model = ModelThatSignals()
    storage = UploadWaitingForTheModel(model, last=4)
    wired.container.image_model.override(providers.Object(model))
    wired.container.storage.override(providers.Object(storage))
    for generation_id in range(1, 5):
        wired.source.put(backend_message(generation_id))

    assert run_all(wired) == 4

    # A serial runner would wait 5 s per job here and record False.
    assert storage.overlapped == [True, True, True]
    assert sorted(g for k, g, _ in wired.notifier.sent if k == "completed") == [1, 2, 3, 4]
    assert len(wired.source.acked) == 4
    # The model ran on the caller's thread; the I/O on the pool's.
    assert model.threads == {threading.current_thread().name}
    assert storage.fetch_threads and all(n.startswith("job-io") for n in storage.fetch_threads)


def test_every_delivery_is_settled_once_under_mixed_outcomes(wired: Wired) -> None:
    wired.storage.loras["styles/1/"] = b"w"
    messages = [
        backend_message(1, lora_path="styles/1/"),
        b"not json",
        backend_message(2, lora_path="styles/404/"),
        backend_message(3),
        backend_message(4, aspect_ratio="7:7"),
        backend_message(5),
    ]
    for message in messages:
        wired.source.put(message)
    assert run_all(wired) == 6
    settled = len(wired.source.acked) + len(wired.source.parked) + len(wired.source.retried)
    assert settled == 6
    assert len(wired.source.parked) == 2
    assert sorted(g for k, g, _ in wired.notifier.sent if k == "completed") == [1, 3, 5]
    assert sorted(g for k, g, _ in wired.notifier.sent if k == "failed") == [2, 4]


class SlowFirstIntake(FakeStorage):
    """The first job's intake takes a while, so the jobs behind it are prepared by then."""

    def __init__(self, first: int) -> None:
        super().__init__()
        self.first = first

    def find_output(self, key: str) -> StoredOutput | None:
        if key.endswith(f"/{self.first}.png"):
            time.sleep(0.3)
        return super().find_output(key)


def batching(wired: Wired, limit: int, first: int) -> None:
    wired.model.batch_limit = limit
    wired.container.job_runner.add_kwargs(max_batch_size=limit)
    wired.storage = SlowFirstIntake(first)
    wired.container.storage.override(providers.Object(wired.storage))


def test_jobs_that_share_size_and_steps_run_in_one_model_call(wired: Wired) -> None:
    batching(wired, 4, first=1)
    for generation_id in range(1, 6):
        wired.source.put(backend_message(generation_id))
    assert run_all(wired) == 5
    assert wired.model.batches[0] == [1, 2, 3, 4]
    assert sorted(request.generation_id for request, _ in wired.model.calls) == [1, 2, 3, 4, 5]
    assert len(wired.notifier.of_kind("completed")) == 5 and len(wired.source.acked) == 5
    assert len(wired.storage.outputs) == 5


def test_a_batch_never_mixes_sizes_and_never_exceeds_the_limit(wired: Wired) -> None:
    batching(wired, 2, first=1)
    sizes = {1: "1:1", 2: "2:1", 3: "1:1", 4: "2:1", 5: "1:1", 6: "1:1"}
    for generation_id, ratio in sizes.items():
        wired.source.put(backend_message(generation_id, aspect_ratio=ratio))
    run_all(wired)
    for batch in wired.model.batches:
        assert len(batch) <= 2
        assert len({sizes[i] for i in batch}) == 1
    assert len(wired.source.acked) == 6


def test_each_job_of_a_batch_gets_its_own_progress_and_completion(wired: Wired) -> None:
    batching(wired, 4, first=11)
    for generation_id in (11, 12, 13):
        wired.source.put(backend_message(generation_id))
    run_all(wired)
    for generation_id in (11, 12, 13):
        percents = [
            payload.progress_percent
            for kind, gid, payload in wired.notifier.sent
            if kind == "progress" and gid == generation_id
        ]
        assert percents[0] == 0 and percents == sorted(percents) and len(percents) > 2
    completed = {gid for kind, gid, _ in wired.notifier.sent if kind == "completed"}
    assert completed == {11, 12, 13}


def test_one_item_failing_in_a_batch_fails_that_job_alone(wired: Wired) -> None:
    batching(wired, 4, first=21)
    wired.model.item_errors[22] = LoraInvalid("not for this model")
    for generation_id in (21, 22, 23):
        wired.source.put(backend_message(generation_id))
    run_all(wired)
    assert wired.model.batches[0] == [21, 22, 23]
    (failure,) = wired.notifier.of_kind("failed")
    assert failure["code"] is ErrorCode.LORA_INVALID
    assert [gid for kind, gid, _ in wired.notifier.sent if kind == "failed"] == [22]
    assert {gid for kind, gid, _ in wired.notifier.sent if kind == "completed"} == {21, 23}
    assert len(wired.source.acked) == 3


def test_a_whole_batch_failing_hands_every_job_back(wired: Wired) -> None:
    batching(wired, 4, first=31)
    wired.model.fail_with.append(GpuOutOfMemory("out of memory"))
    for generation_id in (31, 32, 33):
        wired.source.put(backend_message(generation_id))
    run_all(wired)
    assert wired.model.batches[0] == [31, 32, 33]
    retried = sorted(json.loads(d.body)["data"]["generation_id"] for d, _ in wired.source.retried)
    assert retried == [31, 32, 33]
    # Handed back, then generated on the next delivery.
    completed = {gid for kind, gid, _ in wired.notifier.sent if kind == "completed"}
    assert completed == {31, 32, 33}


class SlowUpload(FakeStorage):
    """Uploads take a while, so a later job's finish could overtake an earlier one's."""

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        time.sleep(0.3)
        return super().put_output(key, data, metadata)


def test_a_redelivery_racing_its_original_in_flight_never_sends_a_second_completion(
    wired: Wired,
) -> None:
    # A dropped connection: the broker redelivers a job this process is still working on. Both
    # intakes find no stored image; the copy must not complete before or after the original.
    wired.model.batch_limit = 4
    wired.container.job_runner.add_kwargs(max_batch_size=4)
    wired.storage = SlowUpload()
    wired.container.storage.override(providers.Object(wired.storage))
    message = backend_message(41)
    wired.source.put(message)
    wired.source.put(message, redelivered=True)
    run_all(wired)
    assert wired.notifier.kinds().count("completed") == 1
    assert len(wired.source.acked) == 2
    # The copy never shared the original's model call.
    assert all(len(batch) == 1 for batch in wired.model.batches)
