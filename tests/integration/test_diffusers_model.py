"""The real diffusers adapter on the tiny seeded model, on the CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from adapters.diffusion.lora.disk_cache import LoraCacheKey, LoraDiskCache
from adapters.diffusion.lora.files import sha256_of
from adapters.diffusion.model import DiffusersImageModel
from adapters.diffusion.tiny_model import build_tiny_lora
from domain.errors import ErrorCode, GpuOutOfMemory, LoraInvalid, ModelError, StorageError
from domain.request import GenerationRequest
from ports.storage import LoraArtifact

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> DiffusersImageModel:
    return DiffusersImageModel.load(model_id=str(tiny_model_dir), device="cpu")


def request(**changes: object) -> GenerationRequest:
    values: dict[str, object] = {
        "generation_id": 1,
        "prompt": "watercolor, portrait",
        "width": 256,
        "height": 256,
        "steps": 4,
        "guidance_scale": 7.5,
        "seed": 42,
    }
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def artifact(path: Path) -> LoraArtifact:
    return LoraArtifact(ref=path.name, path=str(path), checksum=sha256_of(path))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def ignore_steps(_step: int, _total: int) -> None:
    pass


def test_loads_on_cpu_as_fp32_with_dpm_solver_pp(model: DiffusersImageModel) -> None:
    pipe = model.pipeline
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.scheduler.config.solver_order == 2
    assert pipe.vae_scale_factor == 8


def test_same_seed_same_image_other_seed_other_image(model: DiffusersImageModel) -> None:
    first = model.generate(request(), None, ignore_steps)
    again = model.generate(request(), None, ignore_steps)
    other = model.generate(request(seed=43), None, ignore_steps)
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


@pytest.mark.parametrize(("width", "height"), [(256, 256), (256, 512), (512, 256)])
def test_image_has_the_requested_size(model: DiffusersImageModel, width: int, height: int) -> None:
    image = model.generate(request(width=width, height=height, steps=2), None, ignore_steps)
    assert image.size == (width, height) and image.mode == "RGB"


def test_progress_callbacks_arrive_in_order(model: DiffusersImageModel) -> None:
    seen: list[tuple[int, int]] = []
    model.generate(request(steps=6), None, lambda step, total: seen.append((step, total)))
    assert seen == [(step, 6) for step in range(1, 7)]


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "peft"])
def test_each_lora_layout_changes_the_image(
    model: DiffusersImageModel, tiny_loras: dict[str, Path], layout: str
) -> None:
    base = pixels(model.generate(request(), None, ignore_steps))
    styled = pixels(model.generate(request(), artifact(tiny_loras[layout]), ignore_steps))
    assert np.abs(styled - base).mean() > 2.0, f"{layout} LoRA left the image unchanged"
    # The LoRA stays loaded for the next job, yet a base-model job is the base model exactly.
    after = pixels(model.generate(request(), None, ignore_steps))
    assert np.array_equal(after, base)
    hits = model.pipeline_loras.stats.hits
    again = pixels(model.generate(request(), artifact(tiny_loras[layout]), ignore_steps))
    assert model.pipeline_loras.stats.hits == hits + 1
    assert np.array_equal(again, styled)


def test_the_three_layouts_are_the_same_style(
    model: DiffusersImageModel, tiny_loras: dict[str, Path]
) -> None:
    images = {
        layout: pixels(model.generate(request(), artifact(path), ignore_steps))
        for layout, path in tiny_loras.items()
    }
    assert np.abs(images["diffusers"] - images["kohya"]).max() <= 2.0
    assert np.abs(images["diffusers"] - images["peft"]).max() <= 2.0


def test_lora_alpha_is_honoured_in_every_layout(
    model: DiffusersImageModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    def image(layout: str, alpha: float, dest: str) -> np.ndarray:
        path = build_tiny_lora(tiny_model_dir, tmp_path / dest, fmt=layout, alpha=alpha)
        return pixels(model.generate(request(), artifact(path), ignore_steps))

    base = pixels(model.generate(request(), None, ignore_steps))
    weak = {
        layout: image(layout, 1.0, f"weak_{layout}{suffix}")
        for layout, suffix in (
            ("diffusers", ".safetensors"),
            ("kohya", ".safetensors"),
            ("peft", ""),
        )
    }
    strong = image("peft", 4.0, "strong_peft")
    assert np.abs(weak["diffusers"] - weak["peft"]).max() <= 2.0
    assert np.abs(weak["kohya"] - weak["peft"]).max() <= 2.0
    # alpha 1 at rank 4 is a quarter of the default (alpha = rank) strength.
    assert np.abs(weak["peft"] - base).mean() < 0.6 * np.abs(strong - base).mean()


def test_lora_scale_zero_is_the_base_model(
    model: DiffusersImageModel, tiny_loras: dict[str, Path]
) -> None:
    base = pixels(model.generate(request(), None, ignore_steps))
    for path in tiny_loras.values():
        zero = pixels(model.generate(request(lora_scale=0.0), artifact(path), ignore_steps))
        assert np.abs(zero - base).max() <= 1.0
    half = pixels(
        model.generate(request(lora_scale=0.5), artifact(tiny_loras["peft"]), ignore_steps)
    )
    full = pixels(
        model.generate(request(lora_scale=1.0), artifact(tiny_loras["peft"]), ignore_steps)
    )
    assert 0 < np.abs(half - base).mean() < np.abs(full - base).mean()


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth"])
def test_pickle_formats_are_refused_unopened(
    model: DiffusersImageModel, tmp_path: Path, suffix: str
) -> None:
    trap = tmp_path / f"style{suffix}"
    # A pickle that would create a file if it were ever unpickled.
    marker = tmp_path / "unpickled"
    trap.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(LoraInvalid, match="pickle formats"):
        model.generate(request(), artifact(trap), ignore_steps)
    assert not marker.exists()


def test_corrupt_safetensors_is_lora_invalid(model: DiffusersImageModel, tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(LoraInvalid) as caught:
        model.generate(request(), artifact(broken), ignore_steps)
    assert caught.value.code is ErrorCode.LORA_INVALID


def test_lora_for_another_model_is_lora_invalid(model: DiffusersImageModel, tmp_path: Path) -> None:
    alien = tmp_path / "alien.safetensors"
    save_file(
        {
            "unet.not_a_block.to_q.lora_A.weight": torch.ones(4, 7),
            "unet.not_a_block.to_q.lora_B.weight": torch.ones(7, 4),
        },
        str(alien),
    )
    before = model.pipeline.get_list_adapters().get("unet", [])
    with pytest.raises(LoraInvalid):
        model.generate(request(), artifact(alien), ignore_steps)
    assert model.pipeline.get_list_adapters().get("unet", []) == before  # nothing of it stays
    model.generate(request(steps=2), None, ignore_steps)  # still serves


def test_peft_folder_with_pickled_weights_is_refused(
    model: DiffusersImageModel, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "peft_bin"
    shutil.copytree(tiny_loras["peft"], folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(LoraInvalid):
        model.generate(request(), artifact(folder), ignore_steps)


def test_unknown_model_is_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="MODEL_ID="):
        DiffusersImageModel.load(model_id=str(tmp_path / "nothing-here"), device="cpu")


def test_peft_folder_missing_tensors_its_config_targets_is_refused(
    model: DiffusersImageModel, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "partial"
    shutil.copytree(tiny_loras["peft"], folder)
    weights = folder / "adapter_model.safetensors"
    kept = {k: v for k, v in load_file(str(weights)).items() if ".to_k." not in k}
    save_file(kept, str(weights))
    before = model.pipeline.get_list_adapters().get("unet", [])
    with pytest.raises(LoraInvalid, match="lacks .* tensors its config targets"):
        model.generate(request(), artifact(folder), ignore_steps)
    assert model.pipeline.get_list_adapters().get("unet", []) == before


def test_peft_config_is_read_whole_rslora_changes_the_scaling(
    model: DiffusersImageModel, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "rslora"
    shutil.copytree(tiny_loras["peft"], folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_rslora"] = True  # scale alpha/sqrt(r) = 2 instead of alpha/r = 1 at r=alpha=4
    config_path.write_text(json.dumps(config))
    plain = pixels(model.generate(request(), artifact(tiny_loras["peft"]), ignore_steps))
    rs = pixels(model.generate(request(), artifact(folder), ignore_steps))
    doubled = pixels(
        model.generate(request(lora_scale=2.0), artifact(tiny_loras["peft"]), ignore_steps)
    )
    assert np.abs(rs - plain).mean() > 1.0
    assert np.abs(rs - doubled).max() <= 2.0


def test_oom_while_loading_a_lora_is_gpu_oom_not_lora_invalid(
    model: DiffusersImageModel,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    unseen = build_tiny_lora(
        tiny_model_dir, tmp_path / "unseen.safetensors", fmt="diffusers", seed=77
    )
    before = model.pipeline.get_list_adapters().get("unet", [])

    def no_memory(*_args: object, **_kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(model.pipeline, "load_lora_into_unet", no_memory)
    with pytest.raises(GpuOutOfMemory) as caught:
        model.generate(request(), artifact(unseen), ignore_steps)
    assert caught.value.retryable and caught.value.code is ErrorCode.GPU_OOM
    assert model.pipeline.get_list_adapters().get("unet", []) == before


def test_oom_while_denoising_is_gpu_oom_and_the_model_still_serves(
    model: DiffusersImageModel, tiny_loras: dict[str, Path]
) -> None:
    calls = 0

    def no_memory(*_args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hook = model.pipeline.unet.register_forward_pre_hook(no_memory)
    try:
        with pytest.raises(GpuOutOfMemory) as caught:
            model.generate(request(), artifact(tiny_loras["peft"]), ignore_steps)
    finally:
        hook.remove()
    assert caught.value.retryable and caught.value.__cause__ is None
    image = model.generate(request(steps=2), artifact(tiny_loras["peft"]), ignore_steps)
    assert image.size == (256, 256)


def test_a_failing_progress_callback_does_not_fail_the_image(
    model: DiffusersImageModel,
) -> None:
    seen: list[int] = []

    def broken(step: int, _total: int) -> None:
        seen.append(step)
        raise ValueError("progress sink broke")

    image = model.generate(request(steps=3), None, broken)
    assert image.size == (256, 256) and seen == [1, 2, 3]


def test_closed_model_refuses_work(tiny_model_dir: Path) -> None:
    closing = DiffusersImageModel.load(model_id=str(tiny_model_dir), device="cpu")
    closing.close()
    with pytest.raises(ModelError, match="closed"):
        closing.generate(request(), None, ignore_steps)


def cached_then_evicted(built: Path, cache_root: Path) -> LoraArtifact:
    """``built`` fetched through a LoRA disk cache, as a job's intake does, then evicted from it
    (by a second cache on the folder with no room, as another worker process would)."""
    cache = LoraDiskCache(root=cache_root, max_bytes=1 << 30, protect_seconds=0)

    def fill(target: Path) -> None:
        if built.is_dir():
            shutil.copytree(built, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(built, target)

    cached = cache.fetch(
        LoraCacheKey.of(f"s3://models/{built.name}", [(built.name, '"1"')]),
        fill,
        name=built.name,
        folder=built.is_dir(),
    )
    lora = LoraArtifact(ref=built.name, path=str(cached.path), checksum=cached.checksum)
    LoraDiskCache(root=cache_root, max_bytes=0, protect_seconds=0)
    assert not cached.path.exists()
    return lora


@pytest.mark.parametrize(("layout", "name"), [("diffusers", "gone.safetensors"), ("peft", "gone")])
def test_a_lora_evicted_before_the_model_loads_it_is_a_retryable_storage_error(
    model: DiffusersImageModel,
    tiny_model_dir: Path,
    tiny_loras: dict[str, Path],
    tmp_path: Path,
    layout: str,
    name: str,
) -> None:
    built = build_tiny_lora(tiny_model_dir, tmp_path / name, fmt=layout, seed=91)
    lora = cached_then_evicted(built, tmp_path / "cache")
    before = model.pipeline.get_list_adapters().get("unet", [])
    with pytest.raises(StorageError) as caught:
        model.generate(request(steps=2), lora, ignore_steps)
    assert caught.value.code is ErrorCode.STORAGE_ERROR and caught.value.retryable
    assert "left the local cache before the model loaded it" in caught.value.message
    assert "fetched again on retry" in caught.value.message
    # Nothing of it stays (making room for it may have evicted another LoRA).
    assert set(model.pipeline.get_list_adapters().get("unet", [])) <= set(before)
    # The model serves the next jobs, and the LoRA itself once it is on disk again.
    model.generate(request(steps=2), artifact(tiny_loras["peft"]), ignore_steps)
    assert model.generate(request(steps=2), artifact(built), ignore_steps).size == (256, 256)


def test_a_lora_file_vanishing_while_it_loads_is_a_retryable_storage_error(
    model: DiffusersImageModel,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = build_tiny_lora(
        tiny_model_dir, tmp_path / "racing.safetensors", fmt="diffusers", seed=93
    )

    def vanished(*_args: object, **_kwargs: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(model.pipeline, "load_lora_into_unet", vanished)
    with pytest.raises(StorageError) as caught:
        model.generate(request(steps=2), artifact(path), ignore_steps)
    assert caught.value.retryable and isinstance(caught.value.__cause__, FileNotFoundError)


def test_a_corrupt_lora_in_the_cache_stays_lora_invalid(
    model: DiffusersImageModel, tmp_path: Path
) -> None:
    cache = LoraDiskCache(root=tmp_path / "cache", max_bytes=1 << 20)
    cached = cache.fetch(
        LoraCacheKey.of("s3://models/bad.safetensors", [("bad.safetensors", '"1"')]),
        lambda target: target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
        name="bad.safetensors",
        folder=False,
    )
    lora = LoraArtifact(ref="bad.safetensors", path=str(cached.path), checksum=cached.checksum)
    with pytest.raises(LoraInvalid) as caught:
        model.generate(request(steps=2), lora, ignore_steps)
    assert not caught.value.retryable
