"""End-to-end throughput of the worker against the bare model, measured side by side.

Real RabbitMQ, a real S3 API (moto_server), an HTTP backend that answers every webhook after
100 ms (a backend across clouds), the tiny model with a mix of LoRAs at a step count that makes
one job take about 0.5 s of model time. torch gets one thread (``--threads``), so the model
behaves like a GPU: busy on its own device while the worker's I/O uses the other core.

Runs, in one process and one go: the bare model called in a loop (the ceiling) and the worker
(its staged runner: intake and finish on I/O threads around the model), with every provenance
mark on (the default: invisible mark, metadata, C2PA signed with the development certificate);
``--without-provenance`` adds, in each round, a worker with the invisible mark and the signing
off, so the marks' cost is a ratio of the same run. Prints jobs/s and the ratios to the bare
model; writes bench/results/worker.json.

    make bench            # or: .venv/bin/python -m bench.worker_throughput --jobs 24
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pika
import torch
from dependency_injector import providers
from PIL import Image

from adapters.diffusion.lora.files import sha256_of
from adapters.diffusion.model import DiffusersImageModel
from adapters.diffusion.tiny_model import build_tiny_lora, build_tiny_model
from app.settings import load_settings
from app.worker import favour_the_model_thread, start
from containers import build_container
from domain.request import GenerationRequest
from ports.storage import LoraArtifact
from tests.integration.backend_receiver import BackendReceiver
from tests.integration.services import ensure_local_rabbitmq, moto_server

RESULTS = Path(__file__).parent / "results" / "worker.json"
TOKEN = "bench-token"
SERVICE_NICENESS = 10
"""The backend and S3 stand in for other machines; at a lower CPU priority their share of this
box competes less with the model. The worker's own threads keep normal priority."""


def serve_backend(token: str, delay: float, ports: multiprocessing.Queue) -> None:
    """The backend in its own process, as in production: answers every webhook after ``delay``."""
    os.nice(SERVICE_NICENESS)
    with BackendReceiver(token=token, delay_seconds=delay) as receiver:
        ports.put(receiver.port)
        threading.Event().wait()


class CountingNotifier:
    """Passes webhooks through and counts delivered completions (the benchmark's clock)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._lock = threading.Condition()
        self.completed_ids: set[int] = set()
        self.model_seconds: list[float] = []
        self.provenance_seconds: list[float] = []

    def progress(self, generation_id: int, update: Any) -> None:
        """Pass through."""
        self._inner.progress(generation_id, update)

    def failed(self, *args: Any) -> None:
        """Pass through."""
        self._inner.failed(*args)

    def completed(self, generation_id: int, result_url: str, metadata: Any) -> None:
        """Pass through, then count."""
        self._inner.completed(generation_id, result_url, metadata)
        with self._lock:
            self.completed_ids.add(generation_id)
            self.model_seconds.append(metadata["durations"]["generation_seconds"])
            self.provenance_seconds.append(metadata["durations"]["provenance_seconds"])
            self._lock.notify_all()

    def wait_for(self, ids: set[int], timeout: float) -> None:
        """Until every id in ``ids`` was delivered."""
        with self._lock:
            if not self._lock.wait_for(lambda: ids <= self.completed_ids, timeout):
                raise TimeoutError(f"{len(ids - self.completed_ids)} jobs not completed")


def calibrate_steps(model: DiffusersImageModel, target_seconds: float, lora: LoraArtifact) -> int:
    """The step count at which one 512x512 job with a LoRA takes about ``target_seconds``."""

    def seconds(steps: int) -> float:
        request = job_request(0, steps)
        began = time.perf_counter()
        model.generate(request, lora, lambda _s, _t: None)
        return time.perf_counter() - began

    seconds(4)  # warm-up
    per_step = (seconds(20) - seconds(4)) / 16
    fixed = max(0.0, seconds(4) - 4 * per_step)
    return max(2, round((target_seconds - fixed) / per_step))


def job_request(generation_id: int, steps: int) -> GenerationRequest:
    """The model's input for one benchmark job."""
    return GenerationRequest(
        generation_id=generation_id,
        prompt="watercolor, portrait, vintage",
        width=512,
        height=512,
        steps=steps,
        guidance_scale=7.5,
        seed=generation_id,
    )


def bare_loop(
    model: DiffusersImageModel, loras: list[LoraArtifact], jobs: int, steps: int
) -> float:
    """Jobs per second of the model alone, LoRA switching included."""
    began = time.perf_counter()
    for index in range(jobs):
        model.generate(job_request(index, steps), loras[index % len(loras)], lambda _s, _t: None)
    return jobs / (time.perf_counter() - began)


def message(generation_id: int, steps: int, lora_key: str, models: str, media: str) -> bytes:
    """A job exactly as the backend publishes it."""
    return json.dumps(
        {
            "task_id": str(uuid.uuid4()),
            "type": "image_generation",
            "data": {
                "generation_id": generation_id,
                "style_id": 1,
                "lora_path": f"s3://{models}/{lora_key}",
                "prompt": "watercolor, portrait, vintage",
                "seed": generation_id,
                "signature_path": f"s3://{media}/signatures/1.png",
                "signature_config": {"position": "bottom-right", "size": "medium", "opacity": 0.7},
                "parameters": {"steps": steps, "width": 512, "height": 512},
            },
        }
    ).encode()


def worker_run(  # pylint: disable=too-many-locals
    *,
    model: DiffusersImageModel,
    env: dict[str, Any],
    jobs: int,
    steps: int,
    lora_keys: list[str],
    first_id: int,
) -> tuple[float, float]:
    """Jobs per second of the whole worker on a backlog of ``jobs`` messages, and the share of
    the wall time the model was busy."""
    queue_name = f"bench_{uuid.uuid4().hex[:8]}"
    settings = load_settings(**env, rabbitmq_queue=queue_name)
    with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1")) as connection:
        channel = connection.channel()
        channel.queue_declare(queue=queue_name, durable=True)
        for index in range(jobs):
            channel.basic_publish(
                exchange="",
                routing_key=queue_name,
                body=message(
                    first_id + index,
                    steps,
                    lora_keys[index % len(lora_keys)],
                    settings.s3_models_bucket,
                    settings.aws_storage_bucket_name,
                ),
                properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            )
    container = build_container(settings.container_config())
    container.image_model.override(providers.Object(model))
    counter = CountingNotifier(container.notifier())
    container.notifier.override(providers.Object(counter))
    problem = start(container)
    if problem:
        raise RuntimeError(problem)
    runner = container.job_runner()
    stop = threading.Event()
    ids = set(range(first_id, first_id + jobs))
    began = time.perf_counter()
    thread = threading.Thread(target=lambda: runner.run(should_stop=stop.is_set), daemon=True)
    thread.start()
    counter.wait_for(ids, timeout=jobs * 30)
    elapsed = time.perf_counter() - began
    busy = sum(counter.model_seconds)
    marking = statistics.median(counter.provenance_seconds)
    print(
        f"  worker: model busy {busy:.2f} s of {elapsed:.2f} s"
        f" ({busy / elapsed:.1%}), {busy / jobs:.3f} s per job inside the worker,"
        f" provenance {marking * 1000:.0f} ms per job (median, on an I/O thread)"
    )
    stop.set()
    thread.join(60)
    source = container.task_source()
    source.close()
    container.shutdown_resources()
    with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1")) as connection:
        channel = connection.channel()
        for name in (
            source.queue_name,
            source.parked_queue,
            *(source.retry_queue_for(delay) for delay in source.retry_delays),
        ):
            channel.queue_delete(queue=name)
    return jobs / elapsed, busy / elapsed


def main() -> None:  # pylint: disable=too-many-locals,too-many-statements
    """Run the measurements, interleaved, and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loras", type=int, default=3)
    parser.add_argument("--model-seconds", type=float, default=0.5)
    parser.add_argument("--webhook-delay", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="MAX_BATCH_SIZE of the worker; 1 compares pipelining alone with the one-job loop",
    )
    parser.add_argument(
        "--without-provenance",
        action="store_true",
        help="also run, each round, a worker without the invisible mark and C2PA signing",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    favour_the_model_thread()  # as the worker process does; the bare loop gets it too
    if not ensure_local_rabbitmq():
        raise SystemExit("RabbitMQ is not reachable on 127.0.0.1:5672")

    ports: multiprocessing.Queue = multiprocessing.Queue()
    backend = multiprocessing.Process(
        target=serve_backend, args=(TOKEN, args.webhook_delay, ports), daemon=True
    )
    backend.start()
    backend_url = f"http://127.0.0.1:{ports.get(timeout=30)}"
    with tempfile.TemporaryDirectory() as scratch, moto_server(niceness=SERVICE_NICENESS) as s3:
        root = Path(scratch)
        model_dir = build_tiny_model(root / "tiny-sd")
        lora_dirs = [
            build_tiny_lora(model_dir, root / f"lora{i}", fmt="peft", seed=10 + i)
            for i in range(args.loras)
        ]
        client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id=s3.access_key,
            aws_secret_access_key=s3.secret_key,
            region_name=s3.region,
        )
        models, media = "bench-models", "bench-media"
        for bucket in (models, media):
            client.create_bucket(Bucket=bucket)
        lora_keys = []
        for index, folder in enumerate(lora_dirs):
            for path in folder.iterdir():
                client.put_object(
                    Bucket=models, Key=f"styles/{index}/{path.name}", Body=path.read_bytes()
                )
            lora_keys.append(f"styles/{index}/")
        signature = io.BytesIO()
        Image.new("RGBA", (200, 80), (250, 240, 220, 255)).save(signature, format="PNG")
        client.put_object(Bucket=media, Key="signatures/1.png", Body=signature.getvalue())

        model = DiffusersImageModel.load(model_id=str(model_dir), device="cpu")
        local_loras = [
            LoraArtifact(ref=str(p), path=str(p), checksum=sha256_of(p)) for p in lora_dirs
        ]
        steps = calibrate_steps(model, args.model_seconds, local_loras[0])
        env = {
            "storage_backend": "s3",
            "notifier_backend": "http",
            "task_source_backend": "rabbitmq",
            "aws_s3_endpoint_url": s3.endpoint_url,
            "aws_access_key_id": s3.access_key,
            "aws_secret_access_key": s3.secret_key,
            "aws_storage_bucket_name": media,
            "s3_models_bucket": models,
            "backend_api_url": backend_url,
            "internal_api_token": TOKEN,
            "lora_cache_dir": str(root / "downloads"),
            "model_id": str(model_dir),
            "max_batch_size": args.batch,
        }
        # Interleaved, so drift of a shared machine hits every contender alike.
        bares, pipelineds, busies, unmarked = [], [], [], []
        for round_index in range(args.rounds):
            bares.append(bare_loop(model, local_loras, args.jobs, steps))
            rate, busy = worker_run(
                model=model,
                env=env,
                jobs=args.jobs,
                steps=steps,
                lora_keys=lora_keys,
                first_id=1000 * (round_index + 1),
            )
            pipelineds.append(rate)
            busies.append(busy)
            if args.without_provenance:
                rate, _ = worker_run(
                    model=model,
                    env={
                        **env,
                        "provenance_invisible_mark": False,
                        "c2pa_without_certificate": "unsigned",
                    },
                    jobs=args.jobs,
                    steps=steps,
                    lora_keys=lora_keys,
                    first_id=1000 * (round_index + 1) + 500,
                )
                unmarked.append(rate)
        bares.append(bare_loop(model, local_loras, args.jobs, steps))
    backend.terminate()

    ceiling = statistics.mean(bares)
    pipelined = statistics.mean(pipelineds)
    pipelined_busy = statistics.mean(busies)
    results = {
        "jobs": args.jobs,
        "steps": steps,
        "loras": args.loras,
        "webhook_delay_seconds": args.webhook_delay,
        "torch_threads": args.threads,
        "max_batch_size": args.batch,
        "model_seconds_per_job": round(1 / ceiling, 3),
        "rounds": args.rounds,
        "bare_jobs_per_second": [round(rate, 3) for rate in bares],
        "pipelined_jobs_per_second": [round(rate, 3) for rate in pipelineds],
        "pipelined_ratio_per_round": [
            round(rate / statistics.mean(bares[i : i + 2]), 3) for i, rate in enumerate(pipelineds)
        ],
        "pipelined_ratio": round(pipelined / ceiling, 3),
        "pipelined_model_busy": round(pipelined_busy, 3),
        "provenance": "invisible mark, metadata, C2PA (development certificate)",
        "without_provenance_jobs_per_second": [round(rate, 3) for rate in unmarked],
        "without_provenance_ratio": (
            round(statistics.mean(unmarked) / ceiling, 3) if unmarked else None
        ),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"model time per job      {1 / ceiling:.3f} s ({steps} steps, {args.loras} LoRAs)")
    print(
        f"bare model              {ceiling:.3f} jobs/s"
        f" (runs: {', '.join(f'{rate:.3f}' for rate in bares)})"
    )
    print(
        f"worker, every mark      {pipelined:.3f} jobs/s  ratio {pipelined / ceiling:.3f}"
        f"  (model busy {pipelined_busy:.1%} of the time)"
    )
    if unmarked:
        plain = statistics.mean(unmarked)
        print(
            f"worker, no provenance   {plain:.3f} jobs/s  ratio {plain / ceiling:.3f}"
            f"  (with the marks: {pipelined / plain:.3f} of it)"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
