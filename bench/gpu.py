"""Plain diffusers fp16 against this worker's tuned model on a GPU, SD 1.5 with a LoRA, one run.

The SD 1.5 architecture with random weights (``bench.sd15``; no download), 512x512, 50
DPM-Solver++ steps, guidance 7.5, a rank-8 LoRA on to_q/to_k/to_v/to_out.0 active throughout:

- plain: ``StableDiffusionPipeline`` in fp16 with diffusers' default attention and
  ``load_lora_weights``, called with a batch of prompts;
- tuned: ``DiffusersImageModel`` with ``GpuTuning`` (channels_last, fused VAE QKV, cuDNN
  autotuning) and its pipeline LoRAs, called with ``generate_batch``;
- tuned+compile: the same with ``torch.compile`` of the UNet and the LoRA in the hot-swap slot
  (``MODEL_COMPILE=true``);

at each batch size: steps/s (denoising iterations of the whole batch per second, the figure
published for SD 1.5), images/s and peak allocated memory. Then a mixed-LoRA batch (4 jobs, 4
different LoRAs, per-sample LoRA routing) against the same 4 jobs one by one, on the tuned
model without compilation (a compiled UNet has one hot-swap slot and runs such jobs one LoRA per
call). Prints the plan with a time estimate first, then the figures and ratios; writes
bench/results/gpu.json (after every section, so a run cut short still leaves its figures).

Each section runs in its own process (the next one gets the whole GPU back). A measurement that
would end after ``--budget-s`` (default 500 s) is skipped, and a section still running then (a
compilation slower than estimated) is stopped with the figures it has: the run ends inside the
10 minutes a lent GPU gives one command. The compiled section runs last: how long inductor takes
(autotuning included) is the least predictable part, and running past the budget there must not
cost the figures of the others.

    .venv/bin/python -m bench.gpu                  # on a CUDA GPU, well inside 10 minutes
    .venv/bin/python -m bench.gpu --no-compile     # without torch.compile (no compile time)
    .venv/bin/python -m bench.gpu --smoke          # toy model on the CPU, seconds (the test)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib.metadata
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from adapters.diffusion.model import DiffusersImageModel
from adapters.diffusion.tuning import COMPILE_MODES, GpuTuning, warm_up
from bench.sd15 import SD15_UNET_CONFIG, SMOKE_UNET_CONFIG, sd15_pipeline, write_diffusers_lora
from domain.errors import GenerationError
from domain.request import GenerationRequest
from ports.image_model import BatchItem
from ports.storage import LoraArtifact

RESULTS = Path(__file__).parent / "results" / "gpu.json"
GUIDANCE = 7.5
LORA_RANK = 8
MIXED_LORAS = 4
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager")
TARGET_RATIO = 1.8
"""Issue 4's target: tuned steps/s at least this multiple of plain diffusers fp16, LoRA active."""

# Estimates for an H100-class card (SD 1.5 fp16, 512x512, classifier-free guidance): plain
# diffusers runs about 55 steps/s at batch 1; each further image adds about 11.5 ms per step.
_STEP_S_BATCH_1 = 0.018
_STEP_S_PER_EXTRA_IMAGE = 0.0115
_DECODE_S_PER_IMAGE = 0.03
_BUILD_S = 60.0
_LOAD_S = 15.0
_COMPILE_S_PER_SHAPE = 120.0


@dataclass(frozen=True)
class Setup:
    """What one run measures, resolved from the command line."""

    smoke: bool
    device: str
    dtype: torch.dtype
    size: int
    steps: int
    batches: tuple[int, ...]
    repeats: int
    compile: bool
    compile_mode: str
    compile_backend: str
    budget_s: float
    output: Path


def parse_args(argv: Sequence[str] | None) -> Setup:
    """The command line, with the smoke defaults applied."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, help="denoising steps (default 50; smoke 2)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,4,8; smoke 1,2)")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (default 2; smoke 1)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the tuned UNet (default on; off with --smoke)",
    )
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default=GpuTuning().compile_mode)
    parser.add_argument(
        "--compile-backend",
        choices=COMPILE_BACKENDS,
        default=GpuTuning().compile_backend,
        help="inductor (production); eager/aot_eager check the compiled path without codegen",
    )
    parser.add_argument(
        "--budget-s", type=float, default=500.0, help="skip measurements that would end later"
    )
    parser.add_argument("--smoke", action="store_true", help="toy model, CPU, 2 steps, 64x64")
    parser.add_argument("--output", type=Path, help=f"results file (default {RESULTS})")
    args = parser.parse_args(argv)
    smoke = bool(args.smoke)
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or use --smoke to check the script on a CPU")
    try:
        batches = tuple(int(b) for b in (args.batches or ("1,2" if smoke else "1,4,8")).split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        parser.error(f"--batches must be positive integers, comma-separated; got {args.batches!r}")
    return Setup(
        smoke=smoke,
        device="cpu" if smoke else "cuda",
        dtype=torch.float32 if smoke else torch.float16,
        size=64 if smoke else 512,
        steps=args.steps or (2 if smoke else 50),
        batches=batches,
        repeats=args.repeats or (1 if smoke else 2),
        compile=(not smoke) if args.compile is None else args.compile,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        budget_s=args.budget_s,
        output=args.output or RESULTS,
    )


def estimate(setup: Setup) -> dict[str, float]:
    """Seconds each section should take on an H100-class GPU (the plan printed first)."""

    per_path = sum(estimate_run(setup, batch) for batch in setup.batches)
    plan = {
        "build model and LoRAs": _BUILD_S,
        "plain diffusers fp16": _LOAD_S + per_path,
        "tuned": _LOAD_S + per_path,
        "mixed-LoRA batch vs one by one": _LOAD_S
        + estimate_run(setup, MIXED_LORAS)
        + MIXED_LORAS * estimate_run(setup, 1),
    }
    if setup.compile:
        # Two shapes compile: batch 1, then the largest batch (its dimension turns dynamic).
        plan["tuned+compile"] = _LOAD_S + per_path + 2 * _COMPILE_S_PER_SHAPE
    plan["total"] = sum(plan.values())
    return plan


@dataclass(frozen=True)
class Clock:
    """Elapsed time against the run's budget; wall-clock based, so it crosses processes."""

    start: float
    budget_s: float

    @property
    def elapsed(self) -> float:
        """Seconds since the run began."""
        return time.time() - self.start

    @property
    def remaining(self) -> float:
        """Seconds left in the budget."""
        return self.budget_s - self.elapsed

    def allows(self, seconds: float) -> bool:
        """Whether something expected to take ``seconds`` ends inside the budget."""
        return seconds <= self.remaining


class SectionOutput:
    """What a section has measured so far, rewritten to a JSON file after every figure.

    The parent reads it when the section ends, or after stopping it at the budget.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        """Record ``value`` under ``key`` and rewrite the file (atomically)."""
        self.data[key] = value
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps(self.data), encoding="utf-8")
        staging.replace(self.path)


def synchronize() -> None:
    """Wait for queued GPU work, so that wall time measures it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    """Forget the previous peak of allocated GPU memory."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int | None:
    """Peak allocated GPU memory since ``reset_peak`` (None on the CPU)."""
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def release() -> None:
    """Free what the previous section held before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(run: Callable[[], object], repeats: int) -> tuple[float, int | None]:
    """One untimed run (autotuning, caches), then the median of ``repeats`` timed ones."""
    run()
    synchronize()
    reset_peak()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), peak_memory()


def prompt(index: int) -> str:
    """A distinct prompt per job, as distinct jobs would bring."""
    subjects = ["a lighthouse", "a red fox", "an old tram", "a mountain lake", "a violin"]
    return f"{subjects[index % len(subjects)]} at dusk, oil painting, study {index}"


def request(index: int, setup: Setup, lora_scale: float = 1.0) -> GenerationRequest:
    """The index-th job of a batch."""
    return GenerationRequest(
        generation_id=index + 1,
        prompt=prompt(index),
        negative_prompt="blurry, low quality",
        width=setup.size,
        height=setup.size,
        steps=setup.steps,
        guidance_scale=GUIDANCE,
        seed=1000 + index,
        lora_scale=lora_scale,
    )


def build_assets(setup: Setup, root: Path) -> tuple[Path, list[LoraArtifact]]:
    """Write the model folder and ``MIXED_LORAS`` rank-8 LoRA files; the folder and the LoRAs."""
    config = SMOKE_UNET_CONFIG if setup.smoke else SD15_UNET_CONFIG
    model_dir = root / "model"
    pipe = sd15_pipeline(
        0,
        text_and_vae="small" if setup.smoke else "full",
        unet_config=config,
        tokenizer_dir=root / "tokenizer-src",
    )
    pipe.to(dtype=setup.dtype).save_pretrained(model_dir, safe_serialization=True)
    loras = []
    for seed in range(1, MIXED_LORAS + 1):
        path = write_diffusers_lora(pipe.unet, root / f"style_{seed}.safetensors", seed, LORA_RANK)
        checksum = hashlib.sha256(path.read_bytes()).hexdigest()
        loras.append(LoraArtifact(ref=path.name, path=str(path), checksum=checksum))
    del pipe
    release()
    return model_dir, loras


def figures(path: str, batch: int, seconds: float, peak: int | None, setup: Setup) -> dict:
    """One measured configuration as it goes into the results."""
    return {
        "path": path,
        "batch": batch,
        "seconds": round(seconds, 4),
        "steps_per_s": round(setup.steps / seconds, 3),
        "images_per_s": round(batch / seconds, 3),
        "peak_memory_bytes": peak,
    }


def plain_section(
    setup: Setup, model_dir: Path, loras: list[LoraArtifact], clock: Clock, out: SectionOutput
) -> None:
    """Plain diffusers fp16 with the first LoRA loaded by ``load_lora_weights``."""
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir,
        dtype=setup.dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.to(setup.device)
    pipe.set_progress_bar_config(disable=True)
    lora_path = Path(loras[0].path)
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="style")
    runs = []
    for batch in setup.batches:
        if not clock.allows(estimate_run(setup, batch)):
            print(f"  plain  batch {batch}: skipped (budget)")
            out.put("skipped", [*out.data.get("skipped", []), f"batch {batch}"])
            continue
        jobs = [request(i, setup) for i in range(batch)]

        def run(jobs: list[GenerationRequest] = jobs) -> object:
            generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
            with torch.inference_mode():
                return pipe(
                    prompt=[job.prompt for job in jobs],
                    negative_prompt=[job.negative_prompt or "" for job in jobs],
                    width=setup.size,
                    height=setup.size,
                    num_inference_steps=setup.steps,
                    guidance_scale=GUIDANCE,
                    generator=generators,
                    output_type="pil",
                )

        seconds, peak = timed(run, setup.repeats)
        runs.append(figures("plain", batch, seconds, peak, setup))
        out.put("runs", runs)
        print_run(runs[-1])


def estimate_run(setup: Setup, batch: int) -> float:
    """Expected seconds of one figure (its untimed run and its repeats) on an H100-class GPU."""
    step = _STEP_S_BATCH_1 + _STEP_S_PER_EXTRA_IMAGE * (batch - 1)
    return (1 + setup.repeats) * (setup.steps * step + _DECODE_S_PER_IMAGE * batch)


def load_tuned(setup: Setup, model_dir: Path, *, compile_unet: bool) -> DiffusersImageModel:
    """This worker's model as production loads it, tuned for the GPU."""
    return DiffusersImageModel.load(
        model_id=str(model_dir),
        device=setup.device,
        dtype="float32" if setup.smoke else "float16",
        local_files_only=True,
        tuning=GpuTuning(
            compile_unet=compile_unet,
            compile_mode=setup.compile_mode,
            compile_backend=setup.compile_backend,
        ),
        max_batch_size=max(*setup.batches, MIXED_LORAS),
    )


def run_items(model: DiffusersImageModel, items: list[BatchItem]) -> list[Any]:
    """``generate_batch``, failing loudly if any item failed."""
    results = model.generate_batch(items)
    for result in results:
        if isinstance(result, GenerationError):
            raise result
    return results


def tuned_section(
    setup: Setup, model_dir: Path, loras: list[LoraArtifact], clock: Clock, out: SectionOutput
) -> None:
    """The tuned model without compilation, the same LoRA through its pipeline LoRAs."""
    _run_tuned("tuned", setup, model_dir, loras[0], clock, out, compile_unet=False)


def compiled_section(
    setup: Setup, model_dir: Path, loras: list[LoraArtifact], clock: Clock, out: SectionOutput
) -> None:
    """The tuned model with ``torch.compile`` of the UNet and the LoRA hot-swapped in."""
    _run_tuned("tuned+compile", setup, model_dir, loras[0], clock, out, compile_unet=True)


def _run_tuned(  # pylint: disable=too-many-arguments
    path: str,
    setup: Setup,
    model_dir: Path,
    lora: LoraArtifact,
    clock: Clock,
    out: SectionOutput,
    *,
    compile_unet: bool,
) -> None:
    """Warm the tuned model up as the worker does, then time each batch size."""
    model = load_tuned(setup, model_dir, compile_unet=compile_unet)
    print(f"  {path} warm-up (compilation, autotuning)...", flush=True)
    warm_s = warm_up(model, shapes=[(setup.size, setup.size)], steps=2)
    print(f"  {path} warm-up: {warm_s:.1f} s")
    out.put("warm_up_s", round(warm_s, 1))
    runs = []
    for batch in setup.batches:
        if not clock.allows(estimate_run(setup, batch)):
            print(f"  {path} batch {batch}: skipped (budget)")
            out.put("skipped", [*out.data.get("skipped", []), f"batch {batch}"])
            continue
        items = [BatchItem(request(i, setup), lora, _no_progress) for i in range(batch)]
        seconds, peak = timed(lambda items=items: run_items(model, items), setup.repeats)
        runs.append(figures(path, batch, seconds, peak, setup))
        out.put("runs", runs)
        print_run(runs[-1])
    out.put("adapter_cache", _stats(model))


def mixed_section(
    setup: Setup, model_dir: Path, loras: list[LoraArtifact], clock: Clock, out: SectionOutput
) -> None:
    """4 jobs with 4 LoRAs in one ``generate_batch`` against the same jobs one by one."""
    expected = _LOAD_S + estimate_run(setup, MIXED_LORAS) + MIXED_LORAS * estimate_run(setup, 1)
    if not clock.allows(expected):
        print("  mixed-LoRA: skipped (budget)")
        out.put("skipped", ["mixed-LoRA batch"])
        return
    model = load_tuned(setup, model_dir, compile_unet=False)
    items = [BatchItem(request(i, setup), lora, _no_progress) for i, lora in enumerate(loras)]
    batched_s, batched_peak = timed(lambda: run_items(model, items), setup.repeats)

    def one_by_one() -> None:
        for item in items:
            run_items(model, [item])

    single_s, single_peak = timed(one_by_one, setup.repeats)
    result = {
        "loras": len(loras),
        "batched_s": round(batched_s, 4),
        "one_by_one_s": round(single_s, 4),
        "speedup": round(single_s / batched_s, 3),
        "batched_peak_memory_bytes": batched_peak,
        "one_by_one_peak_memory_bytes": single_peak,
        "adapter_cache": _stats(model),
    }
    out.put("mixed_lora", result)
    print(
        f"  mixed-LoRA batch of {len(loras)}: {batched_s:.2f} s; one by one: {single_s:.2f} s"
        f" -> {result['speedup']:.2f}x"
    )


SECTIONS: dict[str, Callable[[Setup, Path, list[LoraArtifact], Clock, SectionOutput], None]] = {
    "plain": plain_section,
    "tuned": tuned_section,
    "mixed": mixed_section,
    "compiled": compiled_section,
}
_STOP_GRACE_S = 15.0


def _section_child(  # pylint: disable=too-many-arguments
    name: str,
    setup: Setup,
    model_dir: Path,
    loras: list[LoraArtifact],
    clock: Clock,
    output: Path,
) -> None:
    """Entry point of a section's own process."""
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if setup.smoke:
        torch.set_num_threads(1)
    SECTIONS[name](setup, model_dir, loras, clock, SectionOutput(output))


def run_section(
    name: str, setup: Setup, model_dir: Path, loras: list[LoraArtifact], clock: Clock
) -> dict[str, Any]:
    """Run a section in its own process, stopped at the budget; what it measured.

    Its own process gives the next section the whole GPU back, and a compilation that runs
    past the budget can be stopped without losing the figures measured before it.
    """
    if clock.remaining <= 0:
        print(f"  {name}: skipped (budget)")
        return {"skipped": ["the whole section"]}
    output = model_dir.parent / f"section-{name}.json"
    process = multiprocessing.get_context("spawn").Process(
        target=_section_child, args=(name, setup, model_dir, loras, clock, output)
    )
    process.start()
    process.join(max(clock.remaining, 0.0) + _STOP_GRACE_S)
    data: dict[str, Any] = {}
    if process.is_alive():
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
        print(f"  {name}: stopped at the budget ({clock.budget_s:.0f} s)")
        data["stopped_at_budget"] = True
    elif process.exitcode != 0:
        print(f"  {name}: failed (exit code {process.exitcode}; its traceback is above)")
        data["error"] = f"exit code {process.exitcode}"
    sys.stdout.flush()
    if output.is_file():
        data.update(json.loads(output.read_text(encoding="utf-8")))
    return data


def _stats(model: DiffusersImageModel) -> dict[str, Any]:
    stats = model.pipeline_loras.stats
    return {"hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions}


def _no_progress(_done: int, _total: int) -> None:
    """Benchmarks report no progress."""


def ratios(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Each tuned path / plain, per batch size where both were measured."""
    by_key = {(run["path"], run["batch"]): run for run in runs}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (path, batch), tuned in sorted(by_key.items()):
        plain = by_key.get(("plain", batch))
        if path == "plain" or plain is None:
            continue
        out.setdefault(path, {})[str(batch)] = {
            "steps_per_s": round(tuned["steps_per_s"] / plain["steps_per_s"], 3),
            "images_per_s": round(tuned["images_per_s"] / plain["images_per_s"], 3),
        }
    return out


def print_run(run: dict) -> None:
    """One figure, as measured."""
    memory = run["peak_memory_bytes"]
    shown = f"{memory / 2**30:.2f} GiB" if memory is not None else "n/a"
    print(
        f"  {run['path']:<13} batch {run['batch']}: {run['seconds']:.2f} s,"
        f" {run['steps_per_s']:.2f} steps/s, {run['images_per_s']:.2f} images/s, peak {shown}"
    )


def device_name(setup: Setup) -> str:
    """The card's name (or the CPU's, for a smoke run)."""
    if setup.device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def write(results: dict[str, Any], output: Path) -> None:
    """Write the results file (again after every section)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def print_plan(setup: Setup, plan: dict[str, float]) -> None:
    """What will run and how long it should take, before anything runs."""
    print(
        f"plan: SD 1.5 architecture{' (toy widths)' if setup.smoke else ''}, random weights,"
        f" {setup.size}x{setup.size}, {setup.steps} DPM-Solver++ steps, guidance {GUIDANCE},"
        f" rank-{LORA_RANK} LoRA, batches {list(setup.batches)}, {setup.repeats} timed run(s)"
        f" each, compile={setup.compile}"
        f"{f' ({setup.compile_backend}, {setup.compile_mode})' if setup.compile else ''},"
        f" on {setup.device}"
    )
    for section, seconds in plan.items():
        print(f"  {section:<32} ~{seconds:5.0f} s (estimate for an H100-class GPU)")
    print(f"  budget: measurements that would end after {setup.budget_s:.0f} s are skipped")


def print_summary(results: dict[str, Any]) -> None:
    """The ratios, against the issue's target."""
    print("tuned / plain steps/s (LoRA active):")
    for path, by_batch in results["ratios"].items():
        for batch, ratio in by_batch.items():
            mark = "meets" if ratio["steps_per_s"] >= TARGET_RATIO else "below"
            print(
                f"  {path:<13} batch {batch}: {ratio['steps_per_s']:.2f}x steps/s,"
                f" {ratio['images_per_s']:.2f}x images/s ({mark} the {TARGET_RATIO}x target)"
            )
    mixed = results.get("mixed_lora")
    if mixed:
        print(f"mixed-LoRA batch / one by one: {mixed['speedup']:.2f}x")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the plan, write the results after each section, print the ratios; the results.

    Exits with status 1 (after writing the results) if a section failed.
    """
    setup = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if setup.smoke:
        torch.set_num_threads(1)  # a check that the script runs, on a shared CPU
    clock = Clock(start=time.time(), budget_s=setup.budget_s)
    plan = estimate(setup)
    print_plan(setup, plan)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(setup),
        "versions": {
            name: importlib.metadata.version(name) for name in ("torch", "diffusers", "peft")
        },
        "smoke": setup.smoke,
        "size": setup.size,
        "steps": setup.steps,
        "guidance_scale": GUIDANCE,
        "lora_rank": LORA_RANK,
        "batches": list(setup.batches),
        "repeats": setup.repeats,
        "compile": setup.compile,
        "compile_mode": setup.compile_mode if setup.compile else None,
        "compile_backend": setup.compile_backend if setup.compile else None,
        "budget_s": setup.budget_s,
        "plan_estimate_s": {key: round(value) for key, value in plan.items()},
        "runs": [],
        "ratios": {},
        "sections": {},
        "mixed_lora": None,
        "complete": False,
    }
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        model_dir, loras = build_assets(setup, Path(scratch))
        print(f"  built the model and {len(loras)} LoRAs: {clock.elapsed:.0f} s")
        for name in SECTIONS:
            if name == "compiled" and not setup.compile:
                continue
            data = run_section(name, setup, model_dir, loras, clock)
            results["runs"] += data.pop("runs", [])
            results["mixed_lora"] = data.pop("mixed_lora", results["mixed_lora"])
            results["sections"][name] = data
            results["ratios"] = ratios(results["runs"])
            write(results, setup.output)
    failed = [name for name, data in results["sections"].items() if "error" in data]
    cut = [
        name
        for name, data in results["sections"].items()
        if "stopped_at_budget" in data or data.get("skipped")
    ]
    results["complete"] = not failed and not cut
    results["wall_s"] = round(clock.elapsed, 1)
    write(results, setup.output)
    print_summary(results)
    print(f"written to {setup.output} in {results['wall_s']:.0f} s")
    if failed:
        raise SystemExit(f"section(s) failed: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    main()
