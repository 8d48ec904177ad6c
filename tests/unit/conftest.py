"""The container with every port replaced by a recording fake, as the tests of the domain use it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from dependency_injector import providers
from PIL import Image

from adapters.memory_task_source import InMemoryTaskSource
from app.settings import load_settings
from containers import Container, build_container
from tests.unit.fakes import (
    FakeClock,
    FakeImageModel,
    FakeNotifier,
    FakeProvenance,
    FakeRecordStore,
    FakeStorage,
    FakeTelemetry,
)


@dataclass
class Wired:
    """A container wired with fakes, and the fakes themselves."""

    container: Container
    model: FakeImageModel
    storage: FakeStorage
    notifier: FakeNotifier
    source: InMemoryTaskSource
    records: FakeRecordStore
    telemetry: FakeTelemetry
    clock: FakeClock
    provenance: FakeProvenance


def png_bytes(size: tuple[int, int], color: tuple[int, int, int, int]) -> bytes:
    """A PNG with alpha filled with one color."""
    buffer = io.BytesIO()
    Image.new("RGBA", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch) -> Iterator[Wired]:
    """Settings from a clean environment; ports overridden with fakes through the container.

    One fake clock drives the source, the runner and the job: it moves 0.1 s per denoising step,
    and a test moves it to let a delayed retry come back.
    """
    monkeypatch.chdir("/")  # no stray .env is read
    settings = load_settings(max_retries=3, signature_default_text="")
    container = build_container(settings.container_config())
    clock = FakeClock()
    fakes = Wired(
        container=container,
        model=FakeImageModel(clock=clock),
        storage=FakeStorage(),
        notifier=FakeNotifier(),
        source=InMemoryTaskSource(clock=clock),
        records=FakeRecordStore(),
        telemetry=FakeTelemetry(),
        clock=clock,
        provenance=FakeProvenance(),
    )
    container.image_model.override(providers.Object(fakes.model))
    container.storage.override(providers.Object(fakes.storage))
    container.notifier.override(providers.Object(fakes.notifier))
    container.task_source.override(providers.Object(fakes.source))
    container.records.override(providers.Object(fakes.records))
    container.telemetry.override(providers.Object(fakes.telemetry))
    container.provenance.override(providers.Object(fakes.provenance))
    container.generation_job.add_kwargs(clock=clock)
    container.job_runner.add_kwargs(clock=clock)
    container.ledger.add_kwargs(wall_clock=clock)
    container.backend_access.add_kwargs(clock=clock)
    container.normalizer.override(
        providers.Singleton(
            container.normalizer.cls, policy=container.request_policy, seed_source=lambda: 1234
        )
    )
    yield fakes
    container.unwire()
    container.reset_override()
