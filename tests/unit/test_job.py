"""The use case with recording fakes: inputs, the model call, the stored PNG and its metadata."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from PIL import Image

from domain.errors import (
    ErrorCode,
    GenerationError,
    GpuOutOfMemory,
    InternalError,
    InvalidRequest,
    LoraInvalid,
    LoraNotFound,
    ModelError,
    ProvenanceFailed,
    SignatureInvalid,
    StorageError,
)
from domain.job import METADATA_KEY, Completion, GenerationJob, Rendered
from domain.request import GenerationRequest, SignatureConfig, SignatureSpec
from domain.watermark import Watermarker
from ports.image_model import BatchItem
from ports.provenance import ProvenanceFacts
from ports.storage import LoraArtifact, StoredOutput
from tests.unit.conftest import Wired, png_bytes
from tests.unit.fakes import FakeClock, FakeImageModel, FakeStorage


def make_request(**changes: object) -> GenerationRequest:
    values: dict[str, object] = {
        "generation_id": 500,
        "prompt": "watercolor, portrait",
        "width": 512,
        "height": 512,
        "steps": 50,
        "guidance_scale": 7.5,
        "seed": 42,
    }
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def run_job(job: GenerationJob, request: GenerationRequest) -> Completion:
    (rendered,) = job.render_batch([job.prepare(request)])
    assert isinstance(rendered, Rendered), rendered
    return job.finish(rendered)


class TimedStorage(FakeStorage):
    """Downloads take 0.5 s and uploads 0.25 s on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def fetch_lora(self, ref: str) -> LoraArtifact:
        self.clock.advance(0.5)
        return super().fetch_lora(ref)

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        self.clock.advance(0.25)
        return super().put_output(key, data, metadata)


def test_the_completion_carries_every_key_and_every_duration(wired: Wired) -> None:
    storage = TimedStorage(wired.clock)
    storage.loras["s3://models/styles/1/"] = b"weights"
    wired.container.storage.override(storage)  # type: ignore[arg-type]
    job = wired.container.generation_job()
    request = make_request(
        lora_ref="s3://models/styles/1/", lora_scale=0.8, style_id=1, task_id="t-9"
    )
    prepared = job.prepare(request)
    wired.clock.advance(1.0)  # waiting for the model
    (rendered,) = job.render_batch([prepared])
    assert isinstance(rendered, Rendered)
    completion = job.finish(rendered)
    assert completion == Completion(
        result_url="https://cdn.test/generations/500.png",
        metadata={
            "seed": 42,
            "seed_was_chosen": False,
            "steps": 50,
            "guidance_scale": 7.5,
            "width": 512,
            "height": 512,
            "scheduler": "dpmsolver++",
            "model": "fake/sd15",
            "prompt": "watercolor, portrait",
            "negative_prompt": None,
            "style_id": 1,
            "task_id": "t-9",
            "lora_path": "s3://models/styles/1/",
            "lora_checksum": "sha-7",
            "lora_scale": 0.8,
            "signature": None,
            "provenance": {"fake": {"generation_id": 500}},
            "durations": {
                "fetch_seconds": 0.5,
                "queued_seconds": 1.0,
                "generation_seconds": 5.0,
                "provenance_seconds": 0.0,
                "encode_seconds": 0.0,
                "upload_seconds": 0.25,
                "total_seconds": 6.75,
            },
        },
        reused=False,
    )
    data, stored = storage.outputs["generations/500.png"]
    assert json.loads(stored[METADATA_KEY]) == {
        **completion.metadata,
        "durations": {
            "fetch_seconds": 0.5,
            "queued_seconds": 1.0,
            "generation_seconds": 5.0,
            "provenance_seconds": 0.0,
            "encode_seconds": 0.0,
        },
    }
    assert stored["generation-id"] == "500" and len(stored["content-sha256"]) == 64
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (512, 512)
    called_request, lora = wired.model.calls[0]
    assert called_request is request and lora is not None and lora.checksum == "sha-7"


def test_without_a_lora_the_base_model_runs_and_no_style_is_reported(wired: Wired) -> None:
    completion = run_job(wired.container.generation_job(), make_request(lora_scale=0.8))
    assert wired.model.calls[0][1] is None and wired.storage.fetched == []
    style = {key: completion.metadata[key] for key in ("lora_path", "lora_checksum", "lora_scale")}
    assert style == {"lora_path": None, "lora_checksum": None, "lora_scale": None}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            SignatureSpec(
                config=SignatureConfig(position="top-left", size="small", opacity=1.0),
                image_ref="sig.png",
            ),
            {"kind": "image", "position": "top-left", "size": "small", "opacity": 1.0},
        ),
        (
            SignatureSpec(config=SignatureConfig(), text="Ana"),
            {"kind": "text", "position": "bottom-right", "size": "medium", "opacity": 0.7},
        ),
    ],
)
def test_the_signature_is_described_in_the_metadata(
    wired: Wired, spec: SignatureSpec, expected: dict[str, object]
) -> None:
    wired.storage.signatures["sig.png"] = png_bytes((100, 50), (255, 0, 0, 255))
    completion = run_job(wired.container.generation_job(), make_request(signature=spec))
    assert completion.metadata["signature"] == expected


def test_image_signature_is_stamped_before_storing(wired: Wired) -> None:
    wired.storage.signatures["sig.png"] = png_bytes((100, 50), (255, 0, 0, 255))
    spec = SignatureSpec(
        config=SignatureConfig(position="top-left", size="small", opacity=1.0), image_ref="sig.png"
    )
    run_job(wired.container.generation_job(), make_request(signature=spec))
    data, _ = wired.storage.outputs["generations/500.png"]
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        # 3 % margin = 15 px; small = 15 % of 512 = 77 px wide.
        assert rgb.getpixel((20, 20)) == (255, 0, 0)
        assert rgb.getpixel((300, 300)) == (0, 0, 0)


def test_every_milestone_is_sent_with_an_eta(wired: Wired) -> None:
    run_job(wired.container.generation_job(), make_request())
    assert wired.notifier.kinds() == ["progress"] * 5
    updates = wired.notifier.of_kind("progress")
    assert [u.progress_percent for u in updates] == [0, 26, 50, 76, 90]
    assert [u.current_step for u in updates] == [0, 13, 25, 38, 45]
    assert [u.total_steps for u in updates] == [50] * 5
    # 0.1 s per step measured on the fake clock: 37 steps left at step 13 -> 3.7 s -> 4.
    assert [u.estimated_seconds for u in updates] == [None, 4, 3, 2, 1]


def test_second_job_gets_an_eta_at_zero_percent_from_the_first(wired: Wired) -> None:
    run_job(wired.container.generation_job(), make_request(generation_id=1))
    run_job(wired.container.generation_job(), make_request(generation_id=2))
    second_zero = wired.notifier.of_kind("progress")[5]
    assert second_zero.current_step == 0 and second_zero.estimated_seconds == 5


def test_the_pulse_beats_at_every_step(wired: Wired) -> None:
    job = wired.container.generation_job()
    beats: list[int] = []
    job.render_batch([job.prepare(make_request(steps=7))], pulse=lambda: beats.append(1))
    assert len(beats) == 7


def test_progress_delivery_trouble_never_fails_the_generation(wired: Wired) -> None:
    wired.notifier.fail_progress = True
    completion = run_job(wired.container.generation_job(), make_request())
    assert completion.result_url.endswith("500.png") and wired.notifier.sent == []


def test_a_stored_image_is_its_completion_without_the_upload_times(wired: Wired) -> None:
    job = wired.container.generation_job()
    assert job.stored(500) is None
    first = run_job(job, make_request())
    again = job.stored(500)
    assert again is not None and again.reused and again.result_url == first.result_url
    durations = dict(first.metadata["durations"])
    del durations["upload_seconds"], durations["total_seconds"]
    assert again.metadata == {**first.metadata, "durations": durations}


def test_an_image_stored_first_by_another_copy_wins(wired: Wired) -> None:
    job = wired.container.generation_job()
    prepared = job.prepare(make_request())
    (rendered,) = job.render_batch([prepared])
    other = json.dumps({"seed": 99})
    wired.storage.outputs["generations/500.png"] = (b"png", {METADATA_KEY: other})
    assert isinstance(rendered, Rendered)
    completion = job.finish(rendered)
    assert completion == Completion(
        result_url="https://cdn.test/generations/500.png", metadata={"seed": 99}, reused=True
    )
    assert wired.storage.outputs["generations/500.png"][0] == b"png"


@pytest.mark.parametrize("stored", ["{not json", "[1]"])
def test_unreadable_stored_metadata_is_an_empty_object(wired: Wired, stored: str) -> None:
    wired.storage.outputs["generations/500.png"] = (b"png", {METADATA_KEY: stored})
    completion = wired.container.generation_job().stored(500)
    assert completion == Completion(
        result_url="https://cdn.test/generations/500.png", metadata={}, reused=True
    )


def test_the_output_key_uses_the_prefix(wired: Wired) -> None:
    assert wired.container.generation_job().output_key(7) == "generations/7.png"
    job = wired.container.generation_job(output_prefix="out/")
    assert job.output_key(7) == "out/7.png"


# --- errors: raised for the settlement to decide ----------------------------------------------


def test_a_missing_lora_is_lora_not_found_before_the_model(wired: Wired) -> None:
    with pytest.raises(LoraNotFound):
        wired.container.generation_job().prepare(make_request(lora_ref="styles/404/"))
    assert wired.model.calls == []


def test_an_invalid_signature_image_fails_before_the_model(wired: Wired) -> None:
    wired.storage.signatures["sig.png"] = b"not an image"
    spec = SignatureSpec(config=SignatureConfig(), image_ref="sig.png")
    with pytest.raises(SignatureInvalid):
        wired.container.generation_job().prepare(make_request(signature=spec))
    assert wired.model.calls == []


def test_a_storage_outage_while_fetching_is_storage_error(wired: Wired) -> None:
    wired.storage.loras["styles/1/"] = b"w"
    wired.storage.fail_fetches.append(StorageError("s3 unreachable"))
    with pytest.raises(StorageError):
        wired.container.generation_job().prepare(make_request(lora_ref="styles/1/"))


def test_a_storage_outage_while_storing_is_storage_error(wired: Wired) -> None:
    wired.storage.fail_puts.append(StorageError("s3 timeout"))
    job = wired.container.generation_job()
    (rendered,) = job.render_batch([job.prepare(make_request())])
    assert isinstance(rendered, Rendered)
    with pytest.raises(StorageError):
        job.finish(rendered)
    assert wired.storage.outputs == {}


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (LoraInvalid("pickle refused"), ErrorCode.LORA_INVALID),
        (ModelError("nan"), ErrorCode.MODEL_ERROR),
        (GpuOutOfMemory("oom"), ErrorCode.GPU_OOM),
        (RuntimeError("boom"), ErrorCode.INTERNAL_ERROR),
    ],
)
def test_a_model_error_is_each_job_s_error(
    wired: Wired, raised: Exception, expected: ErrorCode
) -> None:
    wired.model.fail_with.append(raised)
    job = wired.container.generation_job()
    (result,) = job.render_batch([job.prepare(make_request())])
    assert isinstance(result, GenerationError) and result.code is expected
    if isinstance(raised, GenerationError):
        assert result is raised
    else:
        assert isinstance(result, InternalError) and result.message == "RuntimeError: boom"
    assert wired.telemetry.of("images") == []


def test_a_batch_reports_each_item_and_counts_only_images(wired: Wired) -> None:
    wired.model.batch_limit = 3
    wired.model.item_errors[2] = LoraInvalid("not for this model")
    job = wired.container.generation_job()
    batch = [job.prepare(make_request(generation_id=i)) for i in (1, 2, 3)]
    results = job.render_batch(batch)
    assert [type(result).__name__ for result in results] == ["Rendered", "LoraInvalid", "Rendered"]
    assert wired.model.batches == [[1, 2, 3]]
    assert wired.telemetry.of("images") == [
        {"count": 2, "steps": 50, "seconds": pytest.approx(5.0)}
    ]


def test_a_whole_batch_failing_is_every_job_s_error(wired: Wired) -> None:
    wired.model.batch_limit = 2
    wired.model.fail_with.append(GpuOutOfMemory("oom"))
    job = wired.container.generation_job()
    batch = [job.prepare(make_request(generation_id=i)) for i in (1, 2)]
    results = job.render_batch(batch)
    assert [result.code for result in results] == [ErrorCode.GPU_OOM] * 2  # type: ignore[union-attr]


# --- checks at intake -------------------------------------------------------------------------


def test_references_are_checked_naming_the_field(wired: Wired) -> None:
    job = wired.container.generation_job()
    with pytest.raises(InvalidRequest, match=r"^INVALID_REQUEST: data\.lora_path: 'ftp://x'"):
        job.check(make_request(lora_ref="ftp://x"))
    spec = SignatureSpec(config=SignatureConfig(), image_ref="ftp://y")
    with pytest.raises(InvalidRequest, match=r"^INVALID_REQUEST: data\.signature_path: "):
        job.check(make_request(signature=spec))
    job.check(make_request(lora_ref="s3://models/a.safetensors"))
    assert wired.storage.checked[-1] == ("s3://models/a.safetensors", "lora")


def test_a_text_signature_is_checked_at_intake(wired: Wired) -> None:
    job = wired.container.generation_job()
    bad = SignatureSpec(config=SignatureConfig(), text="Ana\x00")
    with pytest.raises(SignatureInvalid):
        job.check(make_request(signature=bad))
    job.check(make_request(signature=SignatureSpec(config=SignatureConfig(), text="Ana")))


# --- the completion metadata, exactly --------------------------------------------------------


class SlowStorage(FakeStorage):
    """The LoRA download takes 0.12345 s and the upload 0.23456 s on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def fetch_lora(self, ref: str) -> LoraArtifact:
        self.clock.advance(0.12345)
        return super().fetch_lora(ref)

    def put_output(self, key: str, data: bytes, metadata: Mapping[str, str]) -> StoredOutput:
        self.clock.advance(0.23456)
        return super().put_output(key, data, metadata)


class SlowStamp:
    """The container's watermarker, taking 0.04321 s per stamp on the fake clock."""

    def __init__(self, inner: Watermarker, clock: FakeClock) -> None:
        self.inner = inner
        self.clock = clock

    def stamp(
        self, image: Image.Image, spec: SignatureSpec, signature_image: Image.Image | None = None
    ) -> Image.Image:
        self.clock.advance(0.04321)
        return self.inner.stamp(image, spec, signature_image)

    def decode_signature(self, data: bytes) -> Image.Image:
        return self.inner.decode_signature(data)

    def check_text(self, text: str) -> None:
        self.inner.check_text(text)


# Every duration has a fourth decimal, so rounding to 3 decimals (not 4, not to an integer) shows.
STORED_METADATA = (
    '{"durations": {"encode_seconds": 0.056, "fetch_seconds": 0.123,'
    ' "generation_seconds": 0.123, "provenance_seconds": 0.012, "queued_seconds": 1.068},'
    ' "guidance_scale": 7.5, "height": 512, "lora_checksum": "sha-7", "lora_path": "styles/1/",'
    ' "lora_scale": 0.8, "model": "fake/sd15", "negative_prompt": "blurry",'
    ' "prompt": "watercolor, portrait", "provenance": {"fake": {"generation_id": 500}},'
    ' "scheduler": "dpmsolver++", "seed": 42,'
    ' "seed_was_chosen": true, "signature": {"kind": "image", "opacity": 0.5,'
    ' "position": "top-left", "size": "small"}, "steps": 10, "style_id": 1, "task_id": "t-9",'
    ' "width": 512}'
)


def test_the_metadata_is_stored_byte_stable_with_durations_to_the_millisecond(
    wired: Wired,
) -> None:
    storage = SlowStorage(wired.clock)
    storage.loras["styles/1/"] = b"weights"
    storage.signatures["sig.png"] = png_bytes((100, 50), (255, 0, 0, 255))
    wired.container.storage.override(storage)  # type: ignore[arg-type]
    stamp = SlowStamp(wired.container.watermarker(), wired.clock)
    wired.container.watermarker.override(stamp)  # type: ignore[arg-type]
    wired.provenance.clock, wired.provenance.seconds = wired.clock, 0.01234
    wired.model.seconds_per_step = 0.0123456
    job = wired.container.generation_job()
    spec = SignatureSpec(
        config=SignatureConfig(position="top-left", size="small", opacity=0.5), image_ref="sig.png"
    )
    request = make_request(
        steps=10,
        seed_was_chosen=True,
        negative_prompt="blurry",
        lora_ref="styles/1/",
        lora_scale=0.8,
        signature=spec,
        style_id=1,
        task_id="t-9",
    )
    prepared = job.prepare(request)
    wired.clock.advance(1.06789)  # waiting for the model
    (rendered,) = job.render_batch([prepared])
    assert isinstance(rendered, Rendered)

    completion = job.finish(rendered)

    assert completion == Completion(
        result_url="https://cdn.test/generations/500.png",
        metadata={
            "seed": 42,
            "seed_was_chosen": True,
            "steps": 10,
            "guidance_scale": 7.5,
            "width": 512,
            "height": 512,
            "scheduler": "dpmsolver++",
            "model": "fake/sd15",
            "prompt": "watercolor, portrait",
            "negative_prompt": "blurry",
            "style_id": 1,
            "task_id": "t-9",
            "lora_path": "styles/1/",
            "lora_checksum": "sha-7",
            "lora_scale": 0.8,
            "signature": {"kind": "image", "position": "top-left", "size": "small", "opacity": 0.5},
            "provenance": {"fake": {"generation_id": 500}},
            "durations": {
                "fetch_seconds": 0.123,
                "queued_seconds": 1.068,
                "generation_seconds": 0.123,
                "provenance_seconds": 0.012,
                "encode_seconds": 0.056,
                "upload_seconds": 0.235,
                "total_seconds": 1.605,
            },
        },
        reused=False,
    )
    data, stored = storage.outputs["generations/500.png"]
    assert stored == {
        METADATA_KEY: STORED_METADATA,
        "generation-id": "500",
        "content-sha256": hashlib.sha256(data).hexdigest(),
    }


def test_the_image_is_marked_after_the_signature_with_the_facts_the_backend_is_told(
    wired: Wired,
) -> None:
    wired.storage.loras["styles/1/"] = b"weights"
    request = make_request(
        steps=10,
        negative_prompt="blurry",
        lora_ref="styles/1/",
        lora_scale=0.8,
        style_id=7,
        task_id="t-9",
        artist_name="Ada Lovelace",
        signature=SignatureSpec(config=SignatureConfig(), text="Ada"),
    )
    completion = run_job(wired.container.generation_job(), request)

    (facts,) = wired.provenance.marked
    assert facts == ProvenanceFacts(
        generation_id=500,
        task_id="t-9",
        style_id=7,
        artist="Ada Lovelace",
        prompt="watercolor, portrait",
        negative_prompt="blurry",
        steps=10,
        guidance_scale=7.5,
        seed=42,
        width=512,
        height=512,
        scheduler="dpmsolver++",
        model="fake/sd15",
        lora_checksum="sha-7",
        lora_scale=0.8,
    )
    assert completion.metadata["provenance"] == {"fake": {"generation_id": 500}}
    # What is stored is the marker's PNG, with the stamped signature in it.
    data, _ = wired.storage.outputs["generations/500.png"]
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))  # not all black


def test_a_request_without_task_id_or_negative_prompt_marks_them_empty(wired: Wired) -> None:
    run_job(wired.container.generation_job(), make_request())
    (facts,) = wired.provenance.marked
    assert (facts.task_id, facts.negative_prompt, facts.artist) == ("", "", None)


def test_an_image_that_cannot_be_marked_is_not_stored(wired: Wired) -> None:
    wired.provenance.error = ProvenanceFailed("timestamp authority did not answer")
    with pytest.raises(ProvenanceFailed) as raised:
        run_job(wired.container.generation_job(), make_request())
    assert raised.value.code is ErrorCode.PROVENANCE_ERROR and raised.value.retryable
    assert not wired.storage.outputs


def test_a_redelivery_reports_the_stored_provenance_unchanged(wired: Wired) -> None:
    job = wired.container.generation_job()
    first = run_job(job, make_request())
    wired.provenance.error = ProvenanceFailed("must not be called again")
    assert job.stored(500) == Completion(
        result_url=first.result_url,
        metadata={**first.metadata, "durations": _stored_durations(first.metadata)},
        reused=True,
    )


def _stored_durations(metadata: Any) -> dict[str, float]:
    durations = dict(metadata["durations"])
    del durations["upload_seconds"], durations["total_seconds"]
    return durations


def test_progress_is_sent_for_the_job_s_generation(wired: Wired) -> None:
    run_job(wired.container.generation_job(), make_request(generation_id=321))
    assert [(kind, generation) for kind, generation, _ in wired.notifier.sent] == [
        ("progress", 321)
    ] * 5


def test_progress_follows_the_configured_milestones(wired: Wired) -> None:
    run_job(wired.container.generation_job(milestones=(0, 60)), make_request(steps=10))
    updates = wired.notifier.of_kind("progress")
    assert [(u.progress_percent, u.current_step) for u in updates] == [(0, 0), (60, 6)]


def test_an_image_stored_without_metadata_is_its_completion_quietly(
    wired: Wired, caplog: pytest.LogCaptureFixture
) -> None:
    wired.storage.outputs["generations/500.png"] = (b"png", {"generation-id": "500"})
    with caplog.at_level(logging.WARNING, logger="domain.job"):
        completion = wired.container.generation_job().stored(500)
    assert completion == Completion(
        result_url="https://cdn.test/generations/500.png", metadata={}, reused=True
    )
    assert caplog.records == []


def test_unreadable_stored_metadata_is_logged(
    wired: Wired, caplog: pytest.LogCaptureFixture
) -> None:
    wired.storage.outputs["generations/500.png"] = (b"png", {METADATA_KEY: "{not json"})
    with caplog.at_level(logging.WARNING, logger="domain.job"):
        wired.container.generation_job().stored(500)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "output generations/500.png: stored metadata unreadable")
    ]


class ShortBatchModel(FakeImageModel):
    """Returns one image fewer than the jobs it was given."""

    def generate_batch(self, items: Sequence[BatchItem]) -> list[Image.Image | GenerationError]:
        return super().generate_batch(items)[:-1]


def test_a_model_returning_too_few_images_drops_no_job_silently(wired: Wired) -> None:
    model = ShortBatchModel(clock=wired.clock, batch_limit=2)
    wired.container.image_model.override(model)  # type: ignore[arg-type]
    job = wired.container.generation_job()
    batch = [job.prepare(make_request(generation_id=i)) for i in (1, 2)]
    with pytest.raises(ValueError):
        job.render_batch(batch)
    assert model.batches == [[1, 2]]


@pytest.mark.parametrize(
    ("raised", "logged"),
    [
        (RuntimeError("boom"), [("ERROR", "the model failed unexpectedly", True)]),
        (ModelError("nan"), []),
    ],
)
def test_only_an_unexpected_model_failure_is_logged_with_its_traceback(
    wired: Wired, caplog: pytest.LogCaptureFixture, raised: Exception, logged: list[object]
) -> None:
    wired.model.fail_with.append(raised)
    job = wired.container.generation_job()
    with caplog.at_level(logging.WARNING, logger="domain.job"):
        job.render_batch([job.prepare(make_request())])
    records = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert records == logged


def test_the_signature_reference_is_checked_as_a_signature(wired: Wired) -> None:
    spec = SignatureSpec(config=SignatureConfig(), image_ref="s3://media/sig.png")
    wired.container.generation_job().check(make_request(signature=spec))
    assert wired.storage.checked == [("s3://media/sig.png", "signature")]
