"""The CPU LoRA benchmark runs end to end at toy size; its SD 1.5 builders are the real thing."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from adapters.diffusion.lora.validation import LoraValidator
from adapters.diffusion.model import DiffusersImageModel
from bench import lora_cpu
from bench.sd15 import (
    SD15_LORA_LAYERS,
    SD15_TEXT_ENCODER_CONFIG,
    SD15_TEXT_ENCODER_PARAMETERS,
    SD15_UNET_CONFIG,
    SD15_UNET_PARAMETERS,
    SD15_VAE_CONFIG,
    SD15_VAE_PARAMETERS,
    SMOKE_UNET_CONFIG,
    TRAINER_RANK,
    save_sd15_model,
    sd15_pipeline,
    write_diffusers_lora,
    write_peft_lora,
)
from domain.request import GenerationRequest


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sd15_meta_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def test_the_configs_are_sd15_sized(sd15_meta_unet: UNet2DConditionModel) -> None:
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(dict(SD15_TEXT_ENCODER_CONFIG)))
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    assert parameters(sd15_meta_unet) == SD15_UNET_PARAMETERS
    assert parameters(text_encoder) == SD15_TEXT_ENCODER_PARAMETERS
    assert parameters(vae) == SD15_VAE_PARAMETERS


def test_peft_lora_has_the_trainers_layout(
    sd15_meta_unet: UNet2DConditionModel, tmp_path: Path
) -> None:
    folder = write_peft_lora(sd15_meta_unet, tmp_path / "style", seed=1)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA"
    assert config["r"] == config["lora_alpha"] == TRAINER_RANK
    assert set(config["target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0"}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        down = handle.get_tensor(
            "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
        )
    assert len(keys) == 2 * SD15_LORA_LAYERS
    assert all(
        k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
        for k in keys
    )
    assert down.shape == (TRAINER_RANK, 768)
    assert down.abs().sum() > 0
    layout = LoraValidator(unet=sd15_meta_unet).validate(folder)
    assert (layout.format, layout.ranks, layout.target_modules) == ("peft", (8,), 128)


def test_both_writers_give_the_same_lora_and_it_changes_the_unet(tmp_path: Path) -> None:
    pipe = sd15_pipeline(0, text_and_vae="small", unet_config=SMOKE_UNET_CONFIG)
    folder = write_peft_lora(pipe.unet, tmp_path / "style", seed=5)
    file = write_diffusers_lora(pipe.unet, tmp_path / "style.safetensors", seed=5)
    inputs = (
        torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
        torch.tensor(500),
        torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1)),
    )
    naive = lora_cpu.NaiveLoader(pipe)
    with torch.inference_mode():
        plain = pipe.unet(*inputs).sample
        outputs = []
        for path in (folder, file):
            naive.load(path, "style")
            outputs.append(pipe.unet(*inputs).sample)
            pipe.unload_lora_weights()
        again = pipe.unet(*inputs).sample
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert (outputs[0] - plain).abs().max() > 1e-3
    assert torch.equal(again, plain)  # unload restores the plain UNet


def test_saved_model_loads_in_the_worker_and_takes_the_lora(tmp_path: Path) -> None:
    folder = save_sd15_model(
        tmp_path / "sd15", seed=3, text_and_vae="small", unet_config=SMOKE_UNET_CONFIG
    )
    assert save_sd15_model(folder, seed=4) == folder  # already there: nothing rebuilt
    model = DiffusersImageModel.load(model_id=str(folder), device="cpu")
    try:
        lora = lora_cpu.artifact(write_peft_lora(model.pipeline.unet, tmp_path / "style", seed=2))
        request = GenerationRequest(
            generation_id=1,
            prompt="ink, harbour",
            width=64,
            height=64,
            steps=2,
            guidance_scale=7.5,
            seed=7,
        )
        plain = model.generate(request, None, lora_cpu.no_progress)
        styled = model.generate(request, lora, lora_cpu.no_progress)
    finally:
        model.close()
    assert plain.size == styled.size == (64, 64)
    assert lora_cpu.max_pixel_difference([plain], [styled]) > 0


def check_timing(timing: dict, runs: int) -> None:
    assert timing["runs"] == runs
    assert 0 < timing["median"] <= timing["p90"] < 60


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict, dict]]:
    """One ``--smoke`` run: what main returned, and the results file it wrote."""
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    threads = torch.get_num_threads()
    try:
        returned = lora_cpu.main(["--smoke", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it; the session keeps its own
    yield returned, json.loads(out.read_text(encoding="utf-8"))


def test_smoke_run_writes_its_settings(smoke: tuple[dict, dict]) -> None:
    returned, results = smoke
    assert results == json.loads(json.dumps(returned))
    settings = results["settings"]
    assert settings["smoke"] is True and settings["threads"] == 1
    assert set(results["versions"]) >= {"torch", "diffusers", "peft"}
    assert results["machine"]["cores"] >= 1
    assert results["lora"]["lora"]["rank"] == TRAINER_RANK
    assert results["seconds"] > 0


def test_switch_figures_are_sane(smoke: tuple[dict, dict]) -> None:
    results = smoke[1]
    switch = results["lora"]["switch"]
    for key in (
        "baseline_peft_seconds",
        "baseline_diffusers_file_seconds",
        "cold_seconds",
        "warm_seconds",
    ):
        check_timing(switch[key], results["settings"]["reps"])
    baseline = switch["baseline_peft_seconds"]["median"]
    warm, cold = switch["warm_seconds"]["median"], switch["cold_seconds"]["median"]
    assert switch["warm_cheaper_x"] == pytest.approx(baseline / warm, rel=0.01, abs=0.1)
    assert switch["cold_cheaper_x"] == pytest.approx(baseline / cold, rel=0.01, abs=0.01)
    assert switch["warm_over_baseline"] == pytest.approx(warm / baseline, rel=0.01, abs=1e-5)
    assert switch["cold_over_baseline"] == pytest.approx(cold / baseline, rel=0.01, abs=1e-4)
    assert switch["warm_target_met"] == (baseline / warm >= lora_cpu.WARM_TARGET_X)
    assert warm < cold  # a hit costs less than a miss, even at toy size


def test_memory_figures_are_sane(smoke: tuple[dict, dict]) -> None:
    results = smoke[1]
    memory = results["lora"]["memory"]
    assert memory["swaps"] == results["settings"]["swaps"]
    for side in ("cache", "baseline"):
        assert memory[side]["start_mb"] > 0
        assert math.isfinite(memory[side]["growth_mb"])
        assert memory[side]["seconds_per_swap"] > 0
        assert len(memory[side]["growth_trace_mb"]) >= 2
    stats = memory["cache_stats"]
    assert stats["hits"] + stats["misses"] == memory["swaps"]
    assert stats["misses"] > 0 and stats["evictions"] > 0
    assert memory["target_met"] == (memory["cache"]["growth_mb"] < lora_cpu.MEMORY_TARGET_MB)


def test_batching_figures_are_sane(smoke: tuple[dict, dict]) -> None:
    results = smoke[1]
    batching = results["batching"]
    assert [run["size"] for run in batching["runs"]] == results["settings"]["image_sizes"]
    for run in batching["runs"]:
        assert run["seconds_per_job"] > 0 and run["steps"] >= 2
        for name in ("same_lora", "mixed_lora"):
            row = run[name]
            assert row["jobs"] == batching["jobs_per_batch"]
            check_timing(row["one_by_one_seconds"], results["settings"]["batch_reps"])
            check_timing(row["batched_seconds"], results["settings"]["batch_reps"])
            ratio = row["one_by_one_seconds"]["median"] / row["batched_seconds"]["median"]
            assert row["speedup"] == pytest.approx(ratio, rel=0.01)
            assert 0 <= row["max_abs_pixel_difference"] <= batching["pixel_tolerance"]
        assert run["same_lora"]["loras"] == 1
        assert run["mixed_lora"]["loras"] == run["mixed_lora"]["jobs"] > 1
