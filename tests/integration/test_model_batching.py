"""Batches on the tiny model: equal to single runs, mixed LoRAs per sample, OOM splitting."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.diffusion.batching import plan_batches
from adapters.diffusion.lora.files import sha256_of
from adapters.diffusion.model import DiffusersImageModel
from adapters.diffusion.tiny_model import build_tiny_lora
from domain.errors import ErrorCode, GenerationError, GpuOutOfMemory, LoraInvalid, ModelError
from domain.request import GenerationRequest
from ports.image_model import BatchItem
from ports.storage import LoraArtifact

pytestmark = pytest.mark.model

PIXEL_TOLERANCE = 2
"""Largest difference allowed between an item's image in a batch and alone, per 8-bit channel
value. Batching changes the shapes of the matrix products, hence the float rounding; on this
model the difference seen is at most 1 (a rounding flip) and ~1e-4 on average."""
MEAN_TOLERANCE = 0.02


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> DiffusersImageModel:
    return DiffusersImageModel.load(model_id=str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def loras(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, LoraArtifact]:
    root = tmp_path_factory.mktemp("batch_loras")
    made = {
        "A": build_tiny_lora(tiny_model_dir, root / "a.safetensors", fmt="diffusers", seed=31),
        "B": build_tiny_lora(tiny_model_dir, root / "b", fmt="peft", seed=32),
        "C": build_tiny_lora(tiny_model_dir, root / "c.safetensors", fmt="kohya", seed=33),
    }
    made["T"] = with_text_encoder(made["A"], root / "t.safetensors")
    return {name: artifact(path) for name, path in made.items()}


def with_text_encoder(source: Path, dest: Path) -> Path:
    """``source`` plus LoRA weights on the text encoder's attention."""
    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = dict(handle.metadata() or {})
    generator = torch.Generator().manual_seed(5)
    for layer in range(2):
        for projection in ("q_proj", "v_proj"):
            name = f"text_encoder.encoder.layers.{layer}.self_attn.{projection}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(4, 32, generator=generator) / 4
            tensors[f"{name}.lora_B.weight"] = torch.randn(32, 4, generator=generator)
    save_file(tensors, str(dest), metadata=metadata)
    return dest


def artifact(path: Path) -> LoraArtifact:
    return LoraArtifact(ref=path.name, path=str(path), checksum=sha256_of(path))


def request(index: int, **changes: object) -> GenerationRequest:
    values: dict[str, object] = {
        "generation_id": 100 + index,
        "prompt": f"a lighthouse, study number {index}",
        "negative_prompt": "blurry" if index % 2 else None,
        "width": 128,
        "height": 128,
        "steps": 3,
        "guidance_scale": 7.5,
        "seed": 1000 + index,
    }
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def item(index: int, lora: LoraArtifact | None, **changes: object) -> BatchItem:
    return BatchItem(request=request(index, **changes), lora=lora, on_step=lambda _s, _t: None)


def pixels(image: Image.Image | GenerationError) -> np.ndarray:
    assert isinstance(image, Image.Image), image
    return np.asarray(image, dtype=np.float32)


def single(model: DiffusersImageModel, batch_item: BatchItem) -> np.ndarray:
    return pixels(model.generate(batch_item.request, batch_item.lora, lambda _s, _t: None))


def assert_matches_singles(
    model: DiffusersImageModel,
    items: Sequence[BatchItem],
    results: Sequence[Image.Image | GenerationError],
) -> None:
    assert len(results) == len(items)
    for batch_item, result in zip(items, results):
        got, want = pixels(result), single(model, batch_item)
        difference = np.abs(got - want)
        assert difference.max() <= PIXEL_TOLERANCE and difference.mean() <= MEAN_TOLERANCE


def record_calls(
    model: DiffusersImageModel,
    monkeypatch: pytest.MonkeyPatch,
    fail: Callable[[list[GenerationRequest]], bool] = lambda _requests: False,
) -> list[list[int]]:
    """Record the generation ids of every pipeline call; raise a CUDA OOM where ``fail`` says."""
    calls: list[list[int]] = []
    real = model._denoise  # pylint: disable=protected-access

    def denoise(jobs: list) -> list[Image.Image]:
        requests = [job.request for job in jobs]
        calls.append([r.generation_id for r in requests])
        if fail(requests):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(jobs)

    monkeypatch.setattr(model, "_denoise", denoise)
    return calls


def test_a_batch_of_one_lora_equals_its_single_runs(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [item(i, loras["A"]) for i in range(3)]
    calls = record_calls(model, monkeypatch)
    results = model.generate_batch(items)
    assert calls == [[100, 101, 102]]  # one pipeline call
    assert_matches_singles(model, items, results)
    # Per-item prompts and seeds really differ: no two images alike.
    assert np.abs(pixels(results[0]) - pixels(results[1])).mean() > 1.0


def test_each_item_reports_every_step(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact]
) -> None:
    seen: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}
    items = [
        BatchItem(
            request=request(i, steps=4),
            lora=loras["A"] if i else None,
            on_step=lambda step, total, i=i: seen[i].append((step, total)),
        )
        for i in range(3)
    ]
    model.generate_batch(items)
    assert seen == {i: [(step, 4) for step in range(1, 5)] for i in range(3)}


def test_a_mixed_batch_routes_each_sample_through_its_own_lora(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [
        item(0, loras["A"]),
        item(1, loras["B"]),
        item(2, None),
        item(3, loras["A"]),
        item(4, loras["C"], lora_scale=0.5),
    ]
    model_calls = record_calls(model, monkeypatch)
    results = model.generate_batch(items)
    assert model_calls == [[100, 101, 102, 103], [104]]  # at most max_batch_size=4 per call
    assert_matches_singles(model, items, results)
    base = single(model, item(0, None))
    assert np.abs(pixels(results[0]) - base).mean() > 2.0  # the LoRA did apply in the batch


def test_a_mixed_batch_without_guidance(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact]
) -> None:
    items = [
        item(i, lora, guidance_scale=1.0) for i, lora in enumerate([loras["B"], None, loras["A"]])
    ]
    assert_matches_singles(model, items, model.generate_batch(items))


def test_a_mixed_batch_routes_the_text_encoder_too(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact]
) -> None:
    items = [item(0, loras["T"]), item(1, None), item(2, loras["A"]), item(3, loras["T"])]
    results = model.generate_batch(items)
    assert_matches_singles(model, items, results)
    # T is A plus a text-encoder LoRA: the same prompt and seed differ only by that part.
    with_text = pixels(model.generate(request(0), loras["T"], lambda _s, _t: None))
    unet_only = pixels(model.generate(request(0), loras["A"], lambda _s, _t: None))
    assert np.abs(with_text - unet_only).mean() > 1.0


def test_one_lora_at_two_scales_runs_in_two_calls(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [item(0, loras["A"]), item(1, loras["A"], lora_scale=0.5), item(2, loras["A"])]
    calls = record_calls(model, monkeypatch)
    results = model.generate_batch(items)
    assert calls == [[100, 102], [101]]
    assert_matches_singles(model, items, results)


def test_without_mixed_batches_each_call_has_one_lora(
    tiny_model_dir: Path, loras: dict[str, LoraArtifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = DiffusersImageModel.load(model_id=str(tiny_model_dir), device="cpu").pipeline
    plain = DiffusersImageModel(pipeline, model_id="tiny", mixed_lora_batches=False)
    items = [
        item(0, loras["A"]),
        item(1, None),
        item(2, loras["B"]),
        item(3, loras["A"]),
        item(4, None),
    ]
    calls = record_calls(plain, monkeypatch)
    results = plain.generate_batch(items)
    assert calls == [[100, 103], [101, 104], [102]]
    assert_matches_singles(plain, items, results)


def test_items_of_different_sizes_or_steps_never_share_a_call(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [
        item(0, loras["A"]),
        item(1, loras["A"], width=192),
        item(2, loras["A"], steps=2),
        item(3, loras["A"]),
    ]
    calls = record_calls(model, monkeypatch)
    results = model.generate_batch(items)
    assert calls == [[100, 103], [101], [102]]
    assert [pixels(result).shape for result in results] == [
        (128, 128, 3),
        (128, 192, 3),
        (128, 128, 3),
        (128, 128, 3),
    ]


def test_a_bad_lora_fails_only_its_own_items(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    bad = artifact(broken)
    items = [item(0, loras["A"]), item(1, bad), item(2, None), item(3, bad)]
    results = model.generate_batch(items)
    assert isinstance(results[1], LoraInvalid) and isinstance(results[3], LoraInvalid)
    assert_matches_singles(model, [items[0], items[2]], [results[0], results[2]])


def test_oom_splits_the_batch_in_halves_down_to_single_images(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [item(i, lora) for i, lora in enumerate([loras["A"], None, loras["B"], loras["A"]])]
    calls = record_calls(model, monkeypatch, fail=lambda requests: len(requests) > 1)
    results = model.generate_batch(items)
    assert [len(call) for call in calls] == [4, 2, 1, 1, 2, 1, 1]
    assert calls[1:4] == [[100, 101], [100], [101]] and calls[4:] == [[102, 103], [102], [103]]
    monkeypatch.undo()
    assert_matches_singles(model, items, results)


def test_an_item_that_oom_alone_is_the_only_gpu_oom(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [item(i, loras["A"]) for i in range(4)]
    calls = record_calls(
        model, monkeypatch, fail=lambda requests: any(r.generation_id == 102 for r in requests)
    )
    results = model.generate_batch(items)
    assert [len(call) for call in calls] == [4, 2, 2, 1, 1]
    assert isinstance(results[2], GpuOutOfMemory) and results[2].code is ErrorCode.GPU_OOM
    assert results[2].retryable
    monkeypatch.undo()
    assert_matches_singles(model, [items[i] for i in (0, 1, 3)], [results[i] for i in (0, 1, 3)])


def latent_tensors(height: int, width: int) -> list[torch.Tensor]:
    gc.collect()
    shape = (4, height // 8, width // 8)
    return [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, torch.Tensor) and tuple(obj.shape[-3:]) == shape
    ]


def test_nothing_of_a_failed_call_stays_allocated(
    model: DiffusersImageModel, loras: dict[str, LoraArtifact]
) -> None:
    # Odd sizes, so that no other tensor of the process has the latents' shape.
    size = {"width": 136, "height": 152}
    items = [item(i, loras["A"], **size) for i in range(2)]
    unet_calls = 0

    def oom_mid_denoising(*_args: object) -> None:
        nonlocal unet_calls
        unet_calls += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    hook = model.pipeline.unet.register_forward_pre_hook(oom_mid_denoising)
    try:
        results = model.generate_batch(items)
    finally:
        hook.remove()
    assert unet_calls == 3  # the pair, then each alone
    assert all(isinstance(result, GpuOutOfMemory) for result in results)
    assert all(result.__cause__ is None and result.__traceback__ is None for result in results)
    assert latent_tensors(152, 136) == []
    assert pixels(model.generate_batch(items)[0]).shape == (152, 136, 3)  # still serves
    assert latent_tensors(152, 136) == []  # nor does a finished one


def test_other_failures_are_model_errors_for_the_call(
    model: DiffusersImageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_calls(model, monkeypatch)

    def broken(*_args: object) -> None:
        raise ValueError("a NaN somewhere")

    hook = model.pipeline.unet.register_forward_pre_hook(broken)
    try:
        results = model.generate_batch([item(0, None), item(1, None)])
    finally:
        hook.remove()
    assert len(calls) == 1  # not retried: only an OOM is
    assert all(isinstance(result, ModelError) for result in results)
    assert results[0] is not results[1]


def test_a_single_generate_raises_its_items_error(
    model: DiffusersImageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_calls(model, monkeypatch, fail=lambda _requests: True)
    with pytest.raises(GpuOutOfMemory):
        model.generate(request(0), None, lambda _s, _t: None)


def test_a_closed_model_raises_for_a_batch(tiny_model_dir: Path) -> None:
    closing = DiffusersImageModel.load(model_id=str(tiny_model_dir), device="cpu")
    closing.close()
    with pytest.raises(ModelError, match="closed"):
        closing.generate_batch([item(0, None)])


# -- planning (no model) -------------------------------------------------------------------


def lora(name: str) -> LoraArtifact:
    return LoraArtifact(ref=name, path=f"/loras/{name}", checksum=name * 8)


def test_plan_first_fit_keeps_order_and_limits() -> None:
    items = [
        item(0, lora("a")),
        item(1, lora("b")),
        item(2, None),
        item(3, lora("c")),
        item(4, lora("a"), lora_scale=0.5),
        item(5, lora("a")),
    ]
    assert plan_batches(items, max_size=4, max_loras=3, mixed=True) == [[0, 1, 2, 3], [4], [5]]
    assert plan_batches(items, max_size=4, max_loras=2, mixed=True) == [[0, 1, 2, 5], [3, 4]]
    assert plan_batches(items, max_size=2, max_loras=8, mixed=True) == [[0, 1], [2, 3], [4], [5]]
    assert plan_batches(items, max_size=4, max_loras=8, mixed=False) == [
        [0, 5],
        [1],
        [2],
        [3],
        [4],
    ]


def test_plan_never_mixes_batch_keys() -> None:
    items = [
        item(0, None),
        item(1, None, guidance_scale=5.0),
        item(2, None),
        item(3, None, steps=9),
    ]
    assert plan_batches(items, max_size=4, max_loras=8, mixed=True) == [[0, 2], [1], [3]]
