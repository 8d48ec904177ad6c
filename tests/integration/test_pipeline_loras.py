"""Pipeline LoRAs on the tiny model: resident LRU, no leaks over many swaps, the hot-swap slot."""

from __future__ import annotations

import gc
import json
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch._subclasses.fake_tensor import FakeTensor

from adapters.diffusion.cuda_memory import is_cuda_oom
from adapters.diffusion.lora.files import sha256_of
from adapters.diffusion.lora.hotswap import HOTSWAP_SLOT
from adapters.diffusion.lora.peft_layers import lora_layers
from adapters.diffusion.lora.resident import ResidentLoras
from adapters.diffusion.lora.validation import LoraLayout, LoraValidator
from adapters.diffusion.model import DiffusersImageModel
from adapters.diffusion.tiny_model import build_tiny_lora
from domain.errors import GpuOutOfMemory, LoraInvalid, StorageError
from domain.request import GenerationRequest
from ports.storage import LoraArtifact

pytestmark = pytest.mark.model

PIXEL_TOLERANCE = 2
"""Largest difference allowed between two 8-bit channel values computed along different but
equivalent float paths (rank padded with zeros, another batch size)."""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[LoraArtifact]:
    """Five different LoRAs in the three layouts."""
    root = tmp_path_factory.mktemp("cache_loras")
    made = []
    for seed, fmt in enumerate(["diffusers", "kohya", "peft", "diffusers", "peft"], start=11):
        suffix = "" if fmt == "peft" else ".safetensors"
        path = build_tiny_lora(tiny_model_dir, root / f"style{seed}{suffix}", fmt=fmt, seed=seed)
        made.append(artifact(path))
    return made


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> DiffusersImageModel:
    """A plain model: the images every other path must reproduce."""
    return DiffusersImageModel.load(model_id=str(tiny_model_dir), device="cpu")


def fresh(tiny_model_dir: Path, **options: object) -> DiffusersImageModel:
    pipeline = DiffusersImageModel.load(model_id=str(tiny_model_dir), device="cpu").pipeline
    return DiffusersImageModel(pipeline, model_id=str(tiny_model_dir), **options)  # type: ignore


def artifact(path: Path) -> LoraArtifact:
    return LoraArtifact(ref=path.name, path=str(path), checksum=sha256_of(path))


def request(**changes: object) -> GenerationRequest:
    values: dict[str, object] = {
        "generation_id": 1,
        "prompt": "ink, harbour at dawn",
        "width": 128,
        "height": 128,
        "steps": 2,
        "guidance_scale": 7.5,
        "seed": 7,
    }
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def render(model: DiffusersImageModel, lora: LoraArtifact | None, **changes: object) -> np.ndarray:
    image: Image.Image = model.generate(request(**changes), lora, lambda _s, _t: None)
    return np.asarray(image, dtype=np.float32)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE


def adapter_keys(layer: object) -> dict[str, set[str]]:
    """Every per-adapter dict of a peft LoRA layer, by attribute name."""
    names = layer.adapter_layer_names + layer.other_param_names  # type: ignore[attr-defined]
    keys = {name: set(getattr(layer, name)) for name in names}
    keys["lora_variant"] = set(layer.lora_variant)  # type: ignore[attr-defined]
    return keys


def live_tensors() -> int:
    """Real tensors alive in the process. Fake tensors are left out: they are dynamo's tracing
    artifacts, and those of the compiled models of other tests go at moments of their own."""
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, torch.Tensor) and not isinstance(obj, FakeTensor)
    )


def test_a_loaded_lora_is_switched_not_reloaded(
    tiny_model_dir: Path, loras: list[LoraArtifact]
) -> None:
    model = fresh(tiny_model_dir, lora_pipeline_cache_size=2)
    cache = model.pipeline_loras
    first, second, third = loras[:3]
    names = [cache.activate(lora, 1.0) for lora in (first, second, first)]
    assert names[0] == names[2] != names[1]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 2, 0)
    newest = cache.activate(third, 1.0)  # evicts `second`, the least recently used
    assert cache.stats.evictions == 1 and cache.stats.entries == 2
    assert set(model.pipeline.get_list_adapters()["unet"]) == {names[0], newest}
    cache.activate(second, 1.0)  # a miss again: it was evicted
    assert cache.stats.misses == 4 and cache.stats.evictions == 2


def test_a_hit_reads_no_file(
    tiny_model_dir: Path, loras: list[LoraArtifact], reference: DiffusersImageModel, tmp_path: Path
) -> None:
    moved = tmp_path / "moved.safetensors"
    shutil.copy(loras[0].path, moved)
    lora = LoraArtifact(ref="moved", path=str(moved), checksum=loras[0].checksum)
    model = fresh(tiny_model_dir)
    first = render(model, lora)
    moved.unlink()
    assert_close(render(model, lora), first)
    assert model.pipeline_loras.stats.hits == 1
    assert_close(first, render(reference, loras[0]))


def assert_holds_only(unet: torch.nn.Module, resident: set[str]) -> None:
    """Every per-adapter entry of every LoRA layer, and the config, name a resident LoRA."""
    assert set(unet.peft_config) == resident
    for layer in lora_layers(unet):
        for attribute, keys in adapter_keys(layer).items():
            if attribute in ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
                assert not keys, attribute
            elif attribute == "lora_variant":
                assert keys <= resident
            else:
                assert keys == resident, attribute
        assert not layer.merged_adapters and set(layer.active_adapters) <= resident


def test_many_swaps_leave_exactly_capacity_loras_and_no_growth(
    tiny_model_dir: Path, loras: list[LoraArtifact], reference: DiffusersImageModel
) -> None:
    capacity = 3
    model = fresh(tiny_model_dir, lora_pipeline_cache_size=capacity)
    cache = model.pipeline_loras
    order = random.Random(5).choices(loras, k=150)
    baseline = 0
    for turn, lora in enumerate(order):
        cache.activate(lora, 1.0)
        resident = set(cache.names)
        assert len(resident) == min(capacity, len({seen.checksum for seen in order[: turn + 1]}))
        assert_holds_only(model.pipeline.unet, resident)
        if turn == 20:
            assert len(resident) == capacity
            baseline = live_tensors()
    assert len(lora_layers(model.pipeline.unet)) == 32  # the tiny UNet's attention projections
    assert live_tensors() == baseline  # nothing accumulates on the host
    assert not getattr(model.pipeline, "_merged_adapters", set())
    stats = cache.stats
    assert stats.hits + stats.misses == len(order) and stats.evictions == stats.misses - capacity
    # A resident LoRA gives the image a freshly loaded one gives.
    for lora in loras:
        assert_close(render(model, lora), render(reference, lora))
    cache.deactivate()
    assert np.array_equal(render(model, None), render(reference, None))


def test_a_batch_never_evicts_its_own_loras(
    tiny_model_dir: Path, loras: list[LoraArtifact]
) -> None:
    model = fresh(tiny_model_dir, lora_pipeline_cache_size=2)
    cache = model.pipeline_loras
    cache.activate(loras[0], 1.0)
    outcome = cache.activate_mixed([(loras[1], 1.0), (loras[2], 0.5)])
    assert set(outcome) == {loras[1].checksum, loras[2].checksum}
    assert set(outcome.values()) == set(cache.names)
    with pytest.raises(ValueError, match="at most 2"):
        cache.activate_mixed([(lora, 1.0) for lora in loras[:3]])
    with pytest.raises(ValueError, match="two scales"):
        cache.activate_mixed([(loras[0], 1.0), (loras[0], 0.5)])


def test_the_validator_runs_before_every_load_and_a_refusal_loads_nothing(
    tiny_model_dir: Path, loras: list[LoraArtifact]
) -> None:
    pipeline = DiffusersImageModel.load(model_id=str(tiny_model_dir), device="cpu").pipeline
    real = LoraValidator(unet=pipeline.unet, text_encoder=pipeline.text_encoder)
    checked: list[str] = []

    def validate(path: Path) -> LoraLayout:
        checked.append(Path(path).name)
        if "style13" in str(path):
            raise LoraInvalid("refused by the test's validator")
        return real.validate(path)

    cache = ResidentLoras(pipeline, capacity=4, validator=validate)
    cache.activate(loras[0], 1.0)
    cache.activate(loras[0], 1.0)
    with pytest.raises(LoraInvalid, match="refused"):
        cache.activate(loras[2], 1.0)
    assert checked == [Path(loras[0].path).name, Path(loras[2].path).name]
    assert pipeline.get_list_adapters()["unet"] == cache.names
    assert len(cache.names) == 1


def test_a_failing_delete_does_not_cost_the_image(
    tiny_model_dir: Path, loras: list[LoraArtifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fresh(tiny_model_dir, lora_pipeline_cache_size=1)
    render(model, loras[0])

    def broken_delete(_name: object) -> None:
        raise RuntimeError("adapter bookkeeping broke")

    monkeypatch.setattr(model.pipeline, "delete_adapters", broken_delete)
    assert render(model, loras[1]).shape == (128, 128, 3)
    assert model.pipeline_loras.stats.evictions == 1


def test_training_dropout_in_the_metadata_is_off_while_generating(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    source = build_tiny_lora(tiny_model_dir, tmp_path / "plain.safetensors", fmt="diffusers")
    path = rewrite_lora(source, tmp_path / "dropout.safetensors", config={"lora_dropout": 0.5})
    model = fresh(tiny_model_dir)
    lora = artifact(path)
    first = render(model, lora)
    assert np.array_equal(render(model, lora), first)
    assert all(
        isinstance(layer.lora_dropout[name], torch.nn.Identity)
        for layer in lora_layers(model.pipeline.unet)
        for name in layer.lora_dropout
    )


# -- hot-swap mode (for a compiled UNet), tested uncompiled on the CPU -------------------------


def slot_parameters(model: DiffusersImageModel) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {
        name: (id(param), tuple(param.shape))
        for name, param in model.pipeline.unet.named_parameters()
        if f".{HOTSWAP_SLOT}." in name
    }


def slot_scalings(model: DiffusersImageModel) -> list[torch.Tensor]:
    return [layer.scaling[HOTSWAP_SLOT] for layer in lora_layers(model.pipeline.unet)]


def test_hotswap_images_equal_the_normal_path_and_the_slot_is_never_rebuilt(
    tiny_model_dir: Path, loras: list[LoraArtifact], reference: DiffusersImageModel
) -> None:
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8, lora_pipeline_cache_size=3)
    slot = slot_parameters(model)
    scalings = slot_scalings(model)
    assert slot and all(isinstance(scaling, torch.Tensor) for scaling in scalings)
    assert np.array_equal(render(model, None), render(reference, None))
    first, second = loras[0], loras[2]  # a diffusers file and a PEFT folder
    for lora, scale in ((first, 1.0), (second, 1.0), (first, 1.0), (first, 0.5), (None, 1.0)):
        got = render(model, lora, lora_scale=scale)
        assert_close(got, render(reference, lora, lora_scale=scale))
    # Weights were copied into the same tensors; no LoRA was added or removed.
    assert slot_parameters(model) == slot
    assert [id(s) for s in slot_scalings(model)] == [id(s) for s in scalings]
    assert list(model.pipeline.unet.peft_config) == [HOTSWAP_SLOT]
    assert model.pipeline_loras.stats.hits == 2 and model.pipeline_loras.stats.misses == 2


def test_hotswap_keeps_parsed_loras_in_host_memory_up_to_capacity(
    tiny_model_dir: Path, loras: list[LoraArtifact], reference: DiffusersImageModel, tmp_path: Path
) -> None:
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8, lora_pipeline_cache_size=2)
    moved = tmp_path / "moved.safetensors"
    shutil.copy(loras[1].path, moved)
    kohya = LoraArtifact(ref="moved", path=str(moved), checksum=loras[1].checksum)
    render(model, kohya)
    render(model, loras[0])
    moved.unlink()
    assert_close(render(model, kohya), render(reference, loras[1]))  # served from host memory
    render(model, loras[3])  # evicts loras[0], the least recently used
    stats = model.pipeline_loras.stats
    assert (stats.entries, stats.evictions, stats.hits, stats.misses) == (2, 1, 1, 3)


def test_hotswap_grows_the_slot_for_a_higher_rank(
    tiny_model_dir: Path, loras: list[LoraArtifact], reference: DiffusersImageModel, tmp_path: Path
) -> None:
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=4)
    wide = artifact(
        build_tiny_lora(tiny_model_dir, tmp_path / "wide.safetensors", fmt="diffusers", rank=8)
    )
    assert_close(render(model, wide), render(reference, wide))
    assert {shape for _, shape in slot_parameters(model).values()} >= {(8, 32)}
    assert_close(render(model, loras[0]), render(reference, loras[0]))
    assert list(model.pipeline.unet.peft_config) == [HOTSWAP_SLOT]


def test_hotswap_refuses_a_bad_lora_and_keeps_serving(
    tiny_model_dir: Path, loras: list[LoraArtifact], reference: DiffusersImageModel, tmp_path: Path
) -> None:
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8)
    render(model, loras[0])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(LoraInvalid):
        model.generate(request(), artifact(broken), lambda _s, _t: None)
    assert np.array_equal(render(model, None), render(reference, None))
    assert_close(render(model, loras[0]), render(reference, loras[0]))


def test_hotswap_a_lora_gone_from_disk_is_a_retryable_storage_error(
    tiny_model_dir: Path, loras: list[LoraArtifact], reference: DiffusersImageModel, tmp_path: Path
) -> None:
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8)
    render(model, loras[0])
    for fmt, name in (("diffusers", "gone.safetensors"), ("peft", "gone_peft")):
        path = build_tiny_lora(tiny_model_dir, tmp_path / name, fmt=fmt, seed=31)
        gone = artifact(path)
        if path.is_dir():  # evicted from the disk cache after the job's fetch
            shutil.rmtree(path)
        else:
            path.unlink()
        with pytest.raises(StorageError, match="left the local cache") as caught:
            model.generate(request(), gone, lambda _s, _t: None)
        assert caught.value.retryable
    assert np.array_equal(render(model, None), render(reference, None))
    assert_close(render(model, loras[0]), render(reference, loras[0]))


def test_hotswap_a_lora_for_fewer_layers_swaps_in_place(
    tiny_model_dir: Path, reference: DiffusersImageModel, loras: list[LoraArtifact], tmp_path: Path
) -> None:
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8)
    source = build_tiny_lora(tiny_model_dir, tmp_path / "all.safetensors", fmt="diffusers", seed=9)
    narrow = artifact(
        rewrite_lora(
            source,
            tmp_path / "only_q.safetensors",
            keep=lambda key: ".to_q." in key,
            config={"target_modules": ["to_q"]},
        )
    )
    slot = slot_parameters(model)
    assert_close(render(model, narrow), render(reference, narrow))
    assert slot_parameters(model) == slot  # the layers it leaves out were zeroed, not removed
    assert_close(render(model, loras[0]), render(reference, loras[0]))


def test_hotswap_a_lora_for_other_layers_grows_the_slot_once(
    tiny_model_dir: Path, reference: DiffusersImageModel, loras: list[LoraArtifact], tmp_path: Path
) -> None:
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8)
    feed_forward = {
        path: module
        for path, module in reference.pipeline.unet.named_modules()
        if path.endswith(".ff.net.2") and isinstance(module, torch.nn.Linear)
    }
    generator = torch.Generator().manual_seed(4)
    extra = {}
    for path, module in feed_forward.items():
        extra[f"unet.{path}.lora_A.weight"] = torch.randn(
            4, module.in_features, generator=generator
        )
        extra[f"unet.{path}.lora_B.weight"] = torch.randn(
            module.out_features, 4, generator=generator
        )
    source = build_tiny_lora(tiny_model_dir, tmp_path / "attn.safetensors", fmt="diffusers", seed=8)
    wider = artifact(
        rewrite_lora(
            source,
            tmp_path / "attn_ff.safetensors",
            config={"target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]},
            extra=extra,
        )
    )
    before = slot_parameters(model)
    assert_close(render(model, wider), render(reference, wider))
    grown = slot_parameters(model)
    assert len(grown) == len(before) + 2 * len(feed_forward)
    for lora in (loras[0], loras[2], wider, None):
        assert_close(render(model, lora), render(reference, lora))
    assert slot_parameters(model) == grown  # the grown slot takes every later LoRA in place
    assert list(model.pipeline.unet.peft_config) == [HOTSWAP_SLOT]


def rewrite_lora(
    source: Path,
    dest: Path,
    *,
    keep: Callable[[str], bool] = lambda _key: True,
    config: dict[str, object] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A copy of a diffusers-layout LoRA file with tensors left out or added, config changed."""
    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if keep(key)}
        metadata = dict(handle.metadata() or {})
    document = json.loads(metadata["lora_adapter_metadata"])
    document.update({f"unet.{field}": value for field, value in (config or {}).items()})
    metadata["lora_adapter_metadata"] = json.dumps(document)
    save_file({**tensors, **(extra or {})}, str(dest), metadata=metadata)
    return dest


def with_text_encoder(tiny_model_dir: Path, dest: Path, seed: int) -> Path:
    """A diffusers-layout LoRA that also adapts the text encoder's attention."""
    source = build_tiny_lora(
        tiny_model_dir, dest.with_suffix(".unet.safetensors"), fmt="diffusers", seed=seed
    )
    generator = torch.Generator().manual_seed(seed)
    text = {}
    for layer in range(2):
        for projection in ("q_proj", "v_proj"):
            name = f"text_encoder.encoder.layers.{layer}.self_attn.{projection}"
            text[f"{name}.lora_A.weight"] = torch.randn(4, 32, generator=generator) / 4
            text[f"{name}.lora_B.weight"] = torch.randn(32, 4, generator=generator)
    return rewrite_lora(source, dest, extra=text)


def test_hotswap_with_a_text_encoder_lora(
    tiny_model_dir: Path, reference: DiffusersImageModel, loras: list[LoraArtifact], tmp_path: Path
) -> None:
    texty = artifact(with_text_encoder(tiny_model_dir, tmp_path / "texty.safetensors", seed=21))
    unet_only = render(reference, loras[0])
    assert np.abs(render(reference, texty) - render(reference, None)).mean() > 1.0
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8)
    for lora, scale in ((texty, 1.0), (loras[0], 1.0), (texty, 0.5), (None, 1.0)):
        assert_close(
            render(model, lora, lora_scale=scale), render(reference, lora, lora_scale=scale)
        )
    assert_close(render(model, loras[0]), unet_only)


def test_hotswap_a_config_the_slot_cannot_match_still_renders_right(
    tiny_model_dir: Path,
    reference: DiffusersImageModel,
    loras: list[LoraArtifact],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "rslora"
    shutil.copytree(loras[2].path, folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_rslora"] = True  # hot-swap refuses a slot config that differs in use_rslora
    config_path.write_text(json.dumps(config))
    rslora = artifact(folder)
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8)
    with caplog.at_level(logging.WARNING, logger="adapters.diffusion.lora.hotswap"):
        for lora in (rslora, loras[0], rslora, None):
            assert_close(render(model, lora), render(reference, lora))
    assert "becomes the hot-swap slot itself" in caplog.text
    assert list(model.pipeline.unet.peft_config) == [HOTSWAP_SLOT]


def with_alpha_pattern(source: LoraArtifact, dest: Path) -> LoraArtifact:
    """A copy of a PEFT LoRA whose first target layer has its own alpha (an ``alpha_pattern``)."""
    shutil.copytree(source.path, dest)
    config_path = dest / "adapter_config.json"
    config = json.loads(config_path.read_text())
    with safe_open(str(dest / "adapter_model.safetensors"), framework="pt") as handle:
        first = sorted(key for key in handle.keys() if key.endswith(".lora_A.weight"))[0]
    module = first.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    config["alpha_pattern"] = {module: config["lora_alpha"] * 4}
    config_path.write_text(json.dumps(config))
    return artifact(dest)


def test_hotswap_between_loras_with_per_layer_alphas_scales_each_layer_right(
    tiny_model_dir: Path, reference: DiffusersImageModel, loras: list[LoraArtifact], tmp_path: Path
) -> None:
    # peft's hot-swap copies weights but not alpha_pattern: such LoRAs must not be swapped in
    # place with the slot's uniform scaling.
    first = with_alpha_pattern(loras[2], tmp_path / "a")
    second = with_alpha_pattern(loras[4], tmp_path / "b")
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8)
    for lora in (first, second, first, None, second, loras[2], first, loras[0]):
        assert_close(render(model, lora), render(reference, lora))


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    ],
)
def test_allocation_failures_outside_the_caching_allocator_are_oom(message: str) -> None:
    assert is_cuda_oom(RuntimeError(message))
    assert not is_cuda_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_cuda_oom(ValueError(message))


def test_an_oom_while_hot_swapping_and_again_while_undoing_is_gpu_oom_then_recovers(
    tiny_model_dir: Path,
    loras: list[LoraArtifact],
    reference: DiffusersImageModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = fresh(tiny_model_dir, lora_hotswap=True, hotswap_max_rank=8)
    cache = model.pipeline_loras
    render(model, loras[0])

    def swap_runs_out(_parsed: object) -> None:
        # diffusers removes the LoRA when a hot-swap fails: the slot is gone.
        cache._remove(HOTSWAP_SLOT)  # pylint: disable=protected-access
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    def prime_runs_out() -> None:
        raise RuntimeError("CUDA error: out of memory")

    with monkeypatch.context() as patched:
        patched.setattr(cache, "_hotswap_unet", swap_runs_out)
        patched.setattr(cache, "_prime_slot", prime_runs_out)
        with pytest.raises(GpuOutOfMemory):
            model.generate(request(), loras[2], lambda _s, _t: None)
    # The undo left no slot. The next jobs rebuild it and render right: a base-model job
    # first, then the failed LoRA and another.
    assert HOTSWAP_SLOT not in getattr(model.pipeline.unet, "peft_config", {})
    assert np.array_equal(render(model, None), render(reference, None))
    assert_close(render(model, loras[2]), render(reference, loras[2]))
    assert_close(render(model, loras[0]), render(reference, loras[0]))
    assert list(model.pipeline.unet.peft_config) == [HOTSWAP_SLOT]
