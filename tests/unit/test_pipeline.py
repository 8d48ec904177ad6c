"""The pipelined runner: the model works while earlier jobs upload and later ones download."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from dependency_injector import providers
from PIL import Image

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
