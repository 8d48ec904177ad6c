"""LoRA switching cost and memory on the SD 1.5 UNet, and batching on the tiny model, on the CPU.

Three measurements, each side by side with its baseline in one run (this machine is shared and
noisy, so only ratios measured together mean anything):

1. Switch cost, on a UNet with SD 1.5's real architecture (random weights, fp32) and LoRAs as the
   backend's trainer writes them (PEFT folders, rank 8, to_q/to_k/to_v/to_out.0). Baseline: the
   naive path per job, inject the LoRA (peft, as ``load_lora_weights`` would for a diffusers file;
   that file path is timed too) and ``unload_lora_weights`` after the job. Cold: the pipeline
   LoRAs on a miss (validation, load, activation, LRU eviction). Warm: the LoRA is resident and
   only activated. Interleaved in rounds; median and p90 per operation.
2. Resident memory over many swaps among many LoRAs with a small cache (after a warm-up), for
   the cache and, over the same swaps, for the baseline.
3. On the tiny model: ``generate_batch`` of 4 jobs against ``generate`` 4 times, for one LoRA and
   for 4 different LoRAs, at several image sizes (steps calibrated so one job takes about
   ``--job-seconds``); images compared pixel by pixel.

Writes bench/results/cpu.json and prints a table.

    .venv/bin/python -m bench.lora_cpu            # the full run (minutes)
    .venv/bin/python -m bench.lora_cpu --smoke    # toy sizes, seconds (the test runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file

from adapters.diffusion.lora.files import sha256_of
from adapters.diffusion.lora.pipeline_loras import PipelineLoras
from adapters.diffusion.model import DiffusersImageModel
from adapters.diffusion.tiny_model import build_tiny_lora, build_tiny_model
from bench.sd15 import (
    SD15_UNET_CONFIG,
    SMOKE_UNET_CONFIG,
    TRAINER_RANK,
    lora_factors,
    sd15_pipeline,
    write_diffusers_lora,
    write_peft_lora,
)
from domain.request import GenerationRequest
from ports.image_model import BatchItem
from ports.storage import LoraArtifact

RESULTS = Path(__file__).parent / "results" / "cpu.json"
WARM_TARGET_X = 50.0
"""Issue 4's target: a warm switch at least this many times cheaper than the per-job load."""
MEMORY_TARGET_MB = 100.0
"""Issue 4's target: resident memory growth over the swaps below this."""
PIXEL_TOLERANCE = 2
"""Largest difference (of 255) allowed between a batched image and the same job run alone."""
ROUND_SIZE = 5
"""Timed operations per contender per round; rounds alternate which contender goes first."""
PEFT_PREFIX = "base_model.model."
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per operation: every run, and their median and 90th percentile."""

    runs: list[float]

    @property
    def median(self) -> float:
        """The median run."""
        return statistics.median(self.runs)

    @property
    def p90(self) -> float:
        """The 90th percentile (linear interpolation between runs)."""
        if len(self.runs) == 1:
            return self.runs[0]
        return statistics.quantiles(self.runs, n=10, method="inclusive")[-1]

    def as_dict(self) -> dict[str, Any]:
        """For the results file."""
        return {
            "median": round(self.median, 6),
            "p90": round(self.p90, 6),
            "runs": len(self.runs),
        }


def no_progress(_done: int, _total: int) -> None:
    """A step callback that ignores progress."""


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action`` took."""
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def resident_mb() -> float:
    """This process's resident set size in MiB (Linux /proc, else psutil)."""
    try:
        pages = int(Path("/proc/self/statm").read_text(encoding="ascii").split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        import psutil  # pylint: disable=import-outside-toplevel

        return psutil.Process().memory_info().rss / MIB


class NaiveLoader:
    """The per-job path the cache replaces: load the LoRA, activate it, unload it after the job.

    A PEFT folder goes through peft's injection as the model adapter does (``load_lora_weights``
    does not read that layout); a single diffusers file goes through ``load_lora_weights``.
    ``unload_lora_weights`` restores the plain UNet, so every job pays the full injection.
    """

    def __init__(self, pipe: StableDiffusionPipeline) -> None:
        self._pipe = pipe
        self._count = 0

    def job(self, path: Path) -> None:
        """Load ``path`` as the only LoRA, activate it, then unload everything."""
        self._count += 1
        self.load(path, f"naive_{self._count}")
        self._pipe.unload_lora_weights()

    def load(self, path: Path, name: str) -> None:
        """Load ``path`` as LoRA ``name`` and make it the active one."""
        if path.is_dir():
            self._inject_peft(path, name)
        else:
            self._pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        self._pipe.set_adapters([name], adapter_weights=[1.0])

    def _inject_peft(self, folder: Path, name: str) -> None:
        raw = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        known = {field.name for field in dataclasses.fields(LoraConfig)}
        fields = {key: value for key, value in raw.items() if key in known}
        config = LoraConfig(**{**fields, "lora_dropout": 0.0, "init_lora_weights": False})
        state = {
            key.removeprefix(PEFT_PREFIX): value
            for key, value in load_file(folder / "adapter_model.safetensors").items()
        }
        self._pipe.unet.add_adapter(config, adapter_name=name)
        result = set_peft_model_state_dict(self._pipe.unet, state, adapter_name=name)
        if result.unexpected_keys:
            raise RuntimeError(f"LoRA {folder} does not fit: {result.unexpected_keys[0]!r}")


def artifact(path: Path) -> LoraArtifact:
    """A local LoRA as the worker's storage hands it to the model."""
    return LoraArtifact(ref=str(path), path=str(path), checksum=sha256_of(path))


def build_pipeline_loras(pipe: StableDiffusionPipeline, capacity: int) -> PipelineLoras:
    """The project's pipeline LoRAs on ``pipe``, built by the model adapter as the worker does."""
    model = DiffusersImageModel(pipe, model_id="sd15-random", lora_pipeline_cache_size=capacity)
    return model.pipeline_loras


class SwitchBench:
    """Baseline (PEFT folder and diffusers file), cold and warm switches, interleaved in rounds.

    Each side of a round starts from the plain UNet. The baseline side runs naive jobs; the
    cache side fills the cache to capacity (untimed), then alternates a miss that evicts
    (cold) with a switch back to a resident LoRA other than the active one (warm). Rounds
    alternate which side goes first, so drift of a shared machine hits both alike.
    """

    def __init__(
        self,
        *,
        pipe: StableDiffusionPipeline,
        cache: PipelineLoras,
        loras: list[LoraArtifact],
        diffusers_files: list[Path],
    ) -> None:
        self._pipe = pipe
        self._cache = cache
        self._naive = NaiveLoader(pipe)
        self._loras = loras
        self._files = diffusers_files
        self._cursor = 0
        self.runs: dict[str, list[float]] = {
            "baseline": [],
            "baseline_file": [],
            "cold": [],
            "warm": [],
        }

    def run(self, reps: int) -> dict[str, Timing]:
        """``reps`` timed operations of each kind; the UNet is left plain."""
        for round_index in range(-(-reps // ROUND_SIZE)):
            size = min(ROUND_SIZE, reps - round_index * ROUND_SIZE)
            if round_index % 2 == 0:
                self._baseline_side(size)
                self._cache_side(size)
            else:
                self._cache_side(size)
                self._baseline_side(size)
        self._plain()
        return {name: Timing(values) for name, values in self.runs.items()}

    def _next(self) -> int:
        index = self._cursor % len(self._loras)
        self._cursor += 1
        return index

    def _plain(self) -> None:
        self._cache.clear()
        self._pipe.unload_lora_weights()

    def _baseline_side(self, size: int) -> None:
        self._plain()
        for _ in range(size):
            index = self._next()
            folder, file = Path(self._loras[index].path), self._files[index]
            self.runs["baseline"].append(timed(lambda path=folder: self._naive.job(path)))
            self.runs["baseline_file"].append(timed(lambda path=file: self._naive.job(path)))

    def _cache_side(self, size: int) -> None:
        self._plain()
        cache = self._cache
        resident = [self._loras[self._next()] for _ in range(cache.capacity)]
        for lora in resident:
            cache.activate(lora, 1.0)
        before = cache.stats
        for _ in range(size):
            fresh = self._loras[self._next()]
            self.runs["cold"].append(timed(lambda lora=fresh: cache.activate(lora, 1.0)))
            # The LRU one was evicted; the least recent survivor is cached and not active.
            survivor, resident = resident[1], [*resident[2:], fresh, resident[1]]
            self.runs["warm"].append(timed(lambda lora=survivor: cache.activate(lora, 1.0)))
        after = cache.stats
        if (after.misses - before.misses, after.hits - before.hits) != (size, size):
            raise RuntimeError("the cache did not miss on every cold run and hit on every warm")


def swap_sequence(count: int, loras: int, seed: int) -> list[int]:
    """``count`` seeded LoRA indices, never the same twice in a row (every job is a switch)."""
    rng = random.Random(seed)
    sequence = [rng.randrange(loras)]
    while len(sequence) < count:
        index = rng.randrange(loras)
        if index != sequence[-1]:
            sequence.append(index)
    return sequence


def memory_growth(
    *, run_swap: Callable[[int], None], swaps: list[int], samples: int = 10
) -> dict[str, Any]:
    """Resident MiB before and after ``swaps``, with ``samples`` readings along the way."""
    gc.collect()
    start = resident_mb()
    trace = [0.0]
    every = max(1, len(swaps) // samples)
    began = time.perf_counter()
    for done, index in enumerate(swaps, start=1):
        run_swap(index)
        if done % every == 0 or done == len(swaps):
            trace.append(round(resident_mb() - start, 1))
    seconds = time.perf_counter() - began
    gc.collect()
    growth = resident_mb() - start
    return {
        "start_mb": round(start, 1),
        "growth_mb": round(growth, 1),
        "growth_trace_mb": trace,
        "seconds_per_swap": round(seconds / len(swaps), 5),
    }


def tiny_request(index: int, size: int, steps: int) -> GenerationRequest:
    """Job ``index`` of the batching benchmark: its own prompt and seed."""
    prompts = ("watercolor, portrait", "ink, harbour at dawn", "oil, still life", "pastel, cat")
    return GenerationRequest(
        generation_id=index,
        prompt=prompts[index % len(prompts)],
        negative_prompt="blurry" if index % 2 else "",
        width=size,
        height=size,
        steps=steps,
        guidance_scale=7.5,
        seed=1000 + index,
    )


def one_job_seconds(model: DiffusersImageModel, lora: LoraArtifact, size: int, steps: int) -> float:
    """Seconds of one tiny-model job alone."""
    return timed(lambda: model.generate(tiny_request(0, size, steps), lora, no_progress))


def calibrate_steps(
    model: DiffusersImageModel, lora: LoraArtifact, size: int, target_seconds: float
) -> int:
    """The step count (at least 2) at which one job with a LoRA takes about ``target_seconds``."""
    one_job_seconds(model, lora, size, 2)  # warm-up
    two, ten = (one_job_seconds(model, lora, size, steps) for steps in (2, 10))
    per_step = max(1e-4, (ten - two) / 8)
    fixed = max(0.0, two - 2 * per_step)
    return max(2, round((target_seconds - fixed) / per_step))


def max_pixel_difference(first: Sequence[Any], second: Sequence[Any]) -> int:
    """Largest per-channel difference (0-255) between two lists of images."""
    return max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
        for a, b in zip(first, second, strict=True)
    )


def compare_batching(
    model: DiffusersImageModel, items: list[BatchItem], reps: int
) -> dict[str, Any]:
    """``generate_batch(items)`` against ``generate`` per item, interleaved; images compared."""
    alone: list[Any] = []
    together: list[Any] = []

    def one_by_one() -> None:
        alone[:] = [model.generate(item.request, item.lora, item.on_step) for item in items]

    def batched() -> None:
        outputs = model.generate_batch(items)
        for output in outputs:
            if isinstance(output, Exception):
                raise output
        together[:] = outputs

    one_by_one()  # warm-up: from here on, both sides find every LoRA cached
    batched()
    sequential_runs, batched_runs = [], []
    for rep in range(reps):
        if rep % 2 == 0:
            sequential_runs.append(timed(one_by_one))
            batched_runs.append(timed(batched))
        else:
            batched_runs.append(timed(batched))
            sequential_runs.append(timed(one_by_one))
    difference = max_pixel_difference(alone, together)
    if difference > PIXEL_TOLERANCE:
        raise AssertionError(f"a batched image differs from its single run by {difference}/255")
    sequential, batch = Timing(sequential_runs), Timing(batched_runs)
    return {
        "jobs": len(items),
        "loras": len({item.lora.checksum for item in items if item.lora is not None}),
        "one_by_one_seconds": sequential.as_dict(),
        "batched_seconds": batch.as_dict(),
        "speedup": round(sequential.median / batch.median, 3),
        "max_abs_pixel_difference": difference,
        "identical_within_tolerance": True,
    }


def batching(
    *, model: DiffusersImageModel, loras: list[LoraArtifact], size: int, steps: int, reps: int
) -> dict[str, Any]:
    """Batched against one by one, for one LoRA and for as many LoRAs as the batch has jobs."""
    jobs = model.max_batch_size
    requests = [tiny_request(i, size, steps) for i in range(jobs)]
    same = [BatchItem(r, loras[0], no_progress) for r in requests]
    mixed = [BatchItem(r, loras[i % len(loras)], no_progress) for i, r in enumerate(requests)]
    return {
        "same_lora": compare_batching(model, same, reps),
        "mixed_lora": compare_batching(model, mixed, reps),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks every default to a seconds-long run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--swaps", type=int, help="swaps measured for memory (default 500)")
    parser.add_argument("--loras", type=int, help="distinct LoRAs swapped among (default 20)")
    parser.add_argument("--cache", type=int, help="pipeline LoRA capacity (default 4)")
    parser.add_argument("--warmup", type=int, help="untimed swaps first (default 40)")
    parser.add_argument("--reps", type=int, help="timed operations per contender (default 20)")
    parser.add_argument("--batch-reps", type=int, help="timed batch comparisons (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--job-seconds", type=float, default=0.35, help="tiny job's target time")
    parser.add_argument(
        "--image-sizes",
        type=lambda text: [int(part) for part in text.split(",")],
        help="tiny-model image sizes for batching, comma-separated (default 128,256,512)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="toy UNet, few reps (for the test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    defaults = (
        {
            "swaps": 8,
            "loras": 4,
            "cache": 2,
            "reps": 2,
            "batch_reps": 1,
            "warmup": 4,
            "image_sizes": [64],
        }
        if args.smoke
        else {
            "swaps": 500,
            "loras": 20,
            "cache": 4,
            "reps": 20,
            "batch_reps": 5,
            "warmup": 40,
            "image_sizes": [128, 256, 512],
        }
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.cache < 2:
        parser.error("--cache must be at least 2: a warm switch goes to another resident LoRA")
    if args.loras < args.cache + min(args.reps, ROUND_SIZE):
        parser.error("--loras must be at least --cache + 5 (or + --reps), so that cold runs miss")
    return args


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Library versions that decide the figures."""
    return {
        package: importlib.metadata.version(package)
        for package in ("torch", "diffusers", "peft", "transformers", "safetensors")
    }


def switch_figures(timings: dict[str, Timing]) -> dict[str, Any]:
    """Per-operation timings and their ratios to the PEFT-folder baseline."""
    baseline, cold, warm = (timings[name].median for name in ("baseline", "cold", "warm"))
    return {
        "baseline_peft_seconds": timings["baseline"].as_dict(),
        "baseline_diffusers_file_seconds": timings["baseline_file"].as_dict(),
        "cold_seconds": timings["cold"].as_dict(),
        "warm_seconds": timings["warm"].as_dict(),
        "warm_over_baseline": round(warm / baseline, 5),
        "cold_over_baseline": round(cold / baseline, 4),
        "warm_cheaper_x": round(baseline / warm, 1),
        "cold_cheaper_x": round(baseline / cold, 2),
        "target_warm_cheaper_x": WARM_TARGET_X,
        "warm_target_met": baseline / warm >= WARM_TARGET_X,
    }


def memory_figures(
    args: argparse.Namespace,
    *,
    pipe: StableDiffusionPipeline,
    cache: PipelineLoras,
    loras: list[LoraArtifact],
) -> dict[str, Any]:
    """Resident memory over the same seeded swaps: through the cache, then the naive path."""
    sequence = swap_sequence(args.warmup + args.swaps, args.loras, args.seed)
    warmup, swaps = sequence[: args.warmup], sequence[args.warmup :]
    cache.clear()
    pipe.unload_lora_weights()
    for index in warmup:
        cache.activate(loras[index], 1.0)
    before = cache.stats
    cached = memory_growth(run_swap=lambda i: cache.activate(loras[i], 1.0), swaps=swaps)
    after = cache.stats
    cache.clear()
    pipe.unload_lora_weights()
    naive = NaiveLoader(pipe)
    for index in warmup:
        naive.job(Path(loras[index].path))
    baseline = memory_growth(run_swap=lambda i: naive.job(Path(loras[i].path)), swaps=swaps)
    return {
        "swaps": len(swaps),
        "warmup_swaps": len(warmup),
        "loras": args.loras,
        "cache_capacity": args.cache,
        "cache": cached,
        "cache_stats": {
            name: getattr(after, name) - getattr(before, name)
            for name in ("hits", "misses", "evictions")
        },
        "baseline": baseline,
        "target_growth_mb": MEMORY_TARGET_MB,
        "target_met": cached["growth_mb"] < MEMORY_TARGET_MB,
    }


def lora_section(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Switch timings and memory on the SD 1.5 (or, with --smoke, toy) UNet."""
    unet_config = SMOKE_UNET_CONFIG if args.smoke else SD15_UNET_CONFIG
    pipe = sd15_pipeline(args.seed, text_and_vae="small", unet_config=unet_config)
    folders = [
        write_peft_lora(pipe.unet, root / f"style_{i}", seed=100 + i) for i in range(args.loras)
    ]
    files = [
        write_diffusers_lora(pipe.unet, root / f"style_{i}.safetensors", seed=100 + i)
        for i in range(args.loras)
    ]
    loras = [artifact(folder) for folder in folders]
    cache = build_pipeline_loras(pipe, args.cache)
    timings = SwitchBench(pipe=pipe, cache=cache, loras=loras, diffusers_files=files).run(args.reps)
    return {
        "unet": "toy (smoke)" if args.smoke else "SD 1.5",
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "lora": {
            "format": "peft folder",
            "rank": TRAINER_RANK,
            "targets": "to_q, to_k, to_v, to_out.0",
            "layers": sum(1 for _ in lora_factors(pipe.unet, seed=0)),
            "bytes": sum(p.stat().st_size for p in folders[0].iterdir()),
        },
        "switch": switch_figures(timings),
        "memory": memory_figures(args, pipe=pipe, cache=cache, loras=loras),
    }


def batching_section(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Batched against sequential on the tiny model, at each image size asked for."""
    model_dir = build_tiny_model(root / "tiny-sd")
    loras = [
        artifact(build_tiny_lora(model_dir, root / f"tiny_lora_{i}", fmt="peft", seed=20 + i))
        for i in range(4)
    ]
    model = DiffusersImageModel.load(model_id=str(model_dir), device="cpu", max_batch_size=4)
    runs = []
    try:
        for size in args.image_sizes:
            steps = 2 if args.smoke else calibrate_steps(model, loras[0], size, args.job_seconds)
            single = Timing([one_job_seconds(model, loras[0], size, steps) for _ in range(3)])
            runs.append(
                {
                    "size": size,
                    "steps": steps,
                    "seconds_per_job": round(single.median, 4),
                    **batching(
                        model=model, loras=loras, size=size, steps=steps, reps=args.batch_reps
                    ),
                }
            )
    finally:
        model.close()
    return {
        "jobs_per_batch": model.max_batch_size,
        "pixel_tolerance": PIXEL_TOLERANCE,
        "runs": runs,
    }


def print_table(results: dict[str, Any]) -> None:
    """The figures, readable."""
    switch = results["lora"]["switch"]
    memory = results["lora"]["memory"]
    print(f"LoRA switch on the {results['lora']['unet']} UNet (median / p90, seconds)")
    for label, key in (
        ("baseline: inject PEFT folder + unload", "baseline_peft_seconds"),
        ("baseline: load_lora_weights file + unload", "baseline_diffusers_file_seconds"),
        ("cache miss (cold, evicts)", "cold_seconds"),
        ("cache hit (warm switch)", "warm_seconds"),
    ):
        print(f"  {label:44s} {switch[key]['median']:9.5f} / {switch[key]['p90']:9.5f}")
    print(
        f"  warm is {switch['warm_cheaper_x']:.1f}x cheaper than the baseline"
        f" (target >= {WARM_TARGET_X:.0f}x: {'met' if switch['warm_target_met'] else 'NOT met'});"
        f" cold {switch['cold_cheaper_x']:.2f}x"
    )
    print(
        f"Resident memory over {memory['swaps']} swaps among {memory['loras']} LoRAs"
        f" (cache {memory['cache_capacity']}, after {memory['warmup_swaps']} warm-up swaps)"
    )
    print(
        f"  cache    {memory['cache']['growth_mb']:+8.1f} MB"
        f" (target < {MEMORY_TARGET_MB:.0f} MB: {'met' if memory['target_met'] else 'NOT met'})"
        f"  {memory['cache_stats']}"
    )
    print(f"  baseline {memory['baseline']['growth_mb']:+8.1f} MB")
    for batch in results["batching"]["runs"]:
        print_batching(batch)


def print_batching(batch: dict[str, Any]) -> None:
    """One image size's batching figures, readable."""
    print(
        f"Tiny model, {batch['size']}x{batch['size']}, {batch['steps']} steps,"
        f" {batch['seconds_per_job']:.3f} s per job alone"
    )
    for name in ("same_lora", "mixed_lora"):
        row = batch[name]
        print(
            f"  {name:10s} {row['jobs']} jobs: one by one {row['one_by_one_seconds']['median']:.3f}"
            f" s, batched {row['batched_seconds']['median']:.3f} s, speedup {row['speedup']:.2f}x,"
            f" max pixel difference {row['max_abs_pixel_difference']}/255"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every measurement, write the results file, print the table; return the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as scratch:
        root = Path(scratch)
        results: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": versions(),
            "settings": {
                "threads": args.threads,
                "reps": args.reps,
                "batch_reps": args.batch_reps,
                "image_sizes": args.image_sizes,
                "swaps": args.swaps,
                "warmup": args.warmup,
                "loras": args.loras,
                "cache": args.cache,
                "seed": args.seed,
                "smoke": args.smoke,
                "dtype": "float32",
                "device": "cpu",
            },
            "lora": lora_section(args, root),
            "batching": batching_section(args, root),
        }
    results["seconds"] = round(time.perf_counter() - began, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_table(results)
    print(f"written to {args.out} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
