"""The worker end to end: real RabbitMQ, a real S3 API, real HTTP webhooks, the tiny model.

Messages are published exactly as the backend publishes them (durable declare, no arguments,
persistent, application/json).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from adapters.provenance.inspection import inspect_image
from adapters.provenance.invisible_mark import InvisibleMark
from adapters.provenance.vocabulary import TRAINED_ALGORITHMIC_MEDIA
from app.settings import load_settings
from app.worker import start
from containers import Container, build_container
from tests.integration.backend_receiver import BackendReceiver, RecordedRequest
from tests.integration.services import free_port
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.worker_stack import (
    ROOT,
    TOKEN,
    Stack,
    near,
    rabbit_connections,
    solid_signature,
)
from tests.messages import backend_message

pytestmark = pytest.mark.model


@dataclass
class RunningWorker:
    container: Container
    stop: threading.Event
    thread: threading.Thread

    def shutdown(self) -> None:
        self.stop.set()
        self.container.task_source().stop_consuming()
        self.thread.join(60)
        self.container.task_source().close()
        self.container.shutdown_resources()


@pytest.fixture
def worker(worker_env: dict[str, str]) -> Iterator[RunningWorker]:
    """The worker's container and runner on a thread (signals are the subprocess test's)."""
    container = build_container(
        load_settings(**{k.lower(): v for k, v in worker_env.items()}).container_config()
    )
    problem = start(container)
    assert problem is None, problem
    stop = threading.Event()
    runner = container.job_runner()
    thread = threading.Thread(target=lambda: runner.run(should_stop=stop.is_set), daemon=True)
    thread.start()
    running = RunningWorker(container, stop, thread)
    yield running
    if thread.is_alive():
        running.shutdown()


def outcome_of(
    receiver: BackendReceiver, generation_id: int, timeout: float = 60
) -> list[RecordedRequest]:
    return receiver.wait_for(
        lambda records: any(
            r.generation_id == generation_id
            and r.kind in {"complete", "failed"}
            and r.status == 200
            for r in records
        ),
        timeout=timeout,
    )


def upload_tree(client: Any, bucket: str, prefix: str, folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket=bucket,
                Key=f"{prefix}{path.relative_to(folder).as_posix()}",
                Body=path.read_bytes(),
            )


@pytest.mark.usefixtures("worker")
def test_a_backend_job_ends_as_a_signed_png_and_one_completion(
    stack: Stack, tiny_loras: dict[str, Path]
) -> None:
    upload_tree(stack.client, stack.models_bucket, "styles/123/", tiny_loras["peft"])
    stack.client.put_object(
        Bucket=stack.media_bucket, Key="signatures/77.png", Body=solid_signature()
    )
    stack.publish(
        backend_message(
            456,
            lora_path=f"s3://{stack.models_bucket}/styles/123/",
            aspect_ratio="1:2",
            signature_path=f"s3://{stack.media_bucket}/signatures/77.png",
            signature_config={"position": "top-left", "size": "large", "opacity": 1.0},
        )
    )
    records = [r for r in outcome_of(stack.receiver, 456) if r.generation_id == 456]

    progress = [r.payload["progress"] for r in records if r.kind == "progress"]
    assert [p["progress_percent"] for p in progress] == [0, 26, 50, 76, 90]
    assert all(p["total_steps"] == 50 for p in progress)
    (completion,) = [r for r in records if r.kind == "complete"]
    assert records[-1] is completion  # nothing after the completion
    assert completion.header("Authorization") == f"Bearer {TOKEN}"
    assert completion.header("X-Request-Source") == "inference-server"
    body = completion.payload
    assert body["result_url"].endswith(f"/{stack.media_bucket}/generations/456.png")
    assert body["metadata"]["width"] == 512 and body["metadata"]["height"] == 1024
    assert body["metadata"]["seed"] == 42 and body["metadata"]["steps"] == 50
    assert len(body["metadata"]["lora_checksum"]) == 64
    with stack.output(456) as image:
        assert image.size == (512, 1024)
        # large = 35 % of 512 = 179 px wide from the 3 % margin (15 px): red, opaque (the
        # invisible mark moves a channel by a few levels at most).
        assert near(image.convert("RGB").getpixel((60, 40)), (255, 0, 0))
    # The stored PNG carries every mark, and inspect proves them (the development certificate
    # is the only thing it reports).
    png = stack.client.get_object(Bucket=stack.media_bucket, Key="generations/456.png")
    inspection = inspect_image(png["Body"].read(), invisible_mark=InvisibleMark())
    assert inspection.verified() and inspection.credentials.state == "untrusted"
    assert inspection.credentials.manifest_label == (
        body["metadata"]["provenance"]["content_credentials"]["manifest_label"]
    )
    assert inspection.text.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert inspection.text.generation_id == 456 and "Seed: 42" in str(inspection.text.parameters)
    assert inspection.mark is not None and inspection.mark.generation_id == 456
    assert body["metadata"]["provenance"]["invisible_mark"]["payload"] == {"generation_id": 456}
    assert stack.queue_state() == (0, 1)


@pytest.mark.usefixtures("worker")
def test_missing_lora_fails_with_lora_not_found(stack: Stack) -> None:
    stack.publish(backend_message(457, lora_path="styles/404/"))
    records = outcome_of(stack.receiver, 457)
    (failure,) = [r.payload for r in records if r.kind == "failed"]
    assert failure["error_code"] == "LORA_NOT_FOUND" and failure["retry_count"] == 0
    assert not [r for r in records if r.kind == "complete"]


@pytest.mark.usefixtures("worker")
def test_poison_messages_are_parked_and_reported_when_an_id_exists(stack: Stack) -> None:
    stack.publish(b"this is not json")
    stack.publish(backend_message(458, aspect_ratio="16:9"))
    records = outcome_of(stack.receiver, 458)
    (failure,) = [r.payload for r in records if r.kind == "failed"]
    assert (
        failure["error_code"] == "INVALID_REQUEST"
        and "data.aspect_ratio" in failure["error_message"]
    )
    deadline = time.monotonic() + 10
    parked: list[tuple[bytes, dict[str, Any]]] = []
    while len(parked) < 2 and time.monotonic() < deadline:
        parked += stack.parked()
        time.sleep(0.1)
    reasons = {body[:16]: headers["x-park-reason"] for body, headers in parked}
    assert reasons[b"this is not json"].startswith("INVALID_REQUEST: message is not valid JSON")
    assert len(parked) == 2
    assert len(stack.receiver.requests) == 1  # nothing for the message without an id


@pytest.mark.usefixtures("worker")
def test_webhook_503_twice_is_delivered(stack: Stack) -> None:
    stack.receiver.fail_next(2, 503, kind="complete")
    stack.publish(backend_message(459, parameters={"steps": 4, "width": 256, "height": 256}))
    records = outcome_of(stack.receiver, 459)
    completions = [r for r in records if r.kind == "complete"]
    assert [r.status for r in completions] == [503, 503, 200]
    assert not [r for r in records if r.kind == "failed"]


@pytest.mark.usefixtures("worker")
def test_broker_connection_killed_mid_job_still_one_png_one_completion(stack: Stack) -> None:
    if subprocess.run(["which", "rabbitmqctl"], capture_output=True, check=False).returncode:
        pytest.skip("needs rabbitmqctl next to the broker to kill a connection")
    stack.receiver.set_delay(0.3, kind="progress")
    stack.publish(backend_message(460, parameters={"steps": 40, "width": 512, "height": 512}))
    stack.receiver.wait_for(lambda rs: any(r.kind == "progress" for r in rs), timeout=30)
    pids = rabbit_connections(f"pid {os.getpid()}")
    assert pids, "the worker's connection was not found"
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "test kill"], check=True, capture_output=True
        )
    records = outcome_of(stack.receiver, 460)
    time.sleep(3)  # give the redelivery time to arrive and be handled
    completions = [r for r in stack.receiver.of_kind("complete") if r.generation_id == 460]
    assert len(completions) == 1
    listed = stack.client.list_objects_v2(Bucket=stack.media_bucket, Prefix="generations/460")
    assert [o["Key"] for o in listed.get("Contents", [])].count("generations/460.png") == 1
    assert stack.queue_state()[0] == 0
    assert records


def test_sigterm_mid_job_finishes_acks_and_exits(
    stack: Stack, worker_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**os.environ, **worker_env, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", "app", "worker"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        stack.publish(backend_message(461, parameters={"steps": 60, "width": 512, "height": 512}))
        stack.receiver.wait_for(
            lambda rs: any(r.kind == "progress" and r.generation_id == 461 for r in rs), timeout=60
        )
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    completions = [r for r in stack.receiver.of_kind("complete") if r.generation_id == 461]
    assert len(completions) == 1 and completions[0].status == 200
    assert stack.queue_state() == (0, 0)  # acked, nothing left, consumer gone


def run_worker_cli(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m app worker`` to its exit."""
    return subprocess.run(
        [sys.executable, "-m", "app", "worker"],
        cwd=cwd,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_worker_start_fails_fast_naming_the_broker(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    done = run_worker_cli({**worker_env, "RABBITMQ_PORT": "1"}, tmp_path)
    assert done.returncode == 3
    assert "cannot start: broker" in done.stderr and "RabbitMQ" in done.stderr
    assert TOKEN not in done.stderr + done.stdout


def test_worker_start_fails_fast_naming_a_missing_bucket(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    done = run_worker_cli({**worker_env, "S3_MODELS_BUCKET": "no-such-bucket-here"}, tmp_path)
    assert done.returncode == 3
    assert "cannot start: storage" in done.stderr and "no-such-bucket-here" in done.stderr


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus exposition, or None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def poll(url: str, want: int, timeout: float = 90) -> requests.Response:
    """GET ``url`` until it answers ``want``; the last response."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == want or time.monotonic() > deadline:
                return response
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_operations_of_a_running_worker(  # pylint: disable=too-many-locals,too-many-statements
    stack: Stack, worker_env: dict[str, str], tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    """Metrics move by the right amounts, readiness follows the broker, logs are JSON with ids
    and no secret, all from ``python -m app worker`` as the container runs it."""
    upload_tree(stack.client, stack.models_bucket, "styles/9/", tiny_loras["peft"])
    signing_secret = "whsec_" + base64.b64encode(b"operations-test-signing-key").decode()
    port = free_port()
    with TcpProxy(stack.rabbit.host, stack.rabbit.port) as proxy:
        env = {
            **os.environ,
            **worker_env,
            "RABBITMQ_PORT": str(proxy.port),
            "RABBITMQ_HOST": "127.0.0.1",
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(port),
            "WEBHOOK_SIGNING_SECRET": signing_secret,
            "PYTHONPATH": str(ROOT),
        }
        log_path = tmp_path / "worker.log"
        with log_path.open("w", encoding="utf-8") as log_file:
            process = subprocess.Popen(  # pylint: disable=consider-using-with
                [sys.executable, "-m", "app", "worker"],
                cwd=tmp_path,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            ready = poll(f"{base}/readyz", 200)
            assert ready.status_code == 200, ready.text
            assert set(ready.json()["checks"]) == {
                "model",
                "broker",
                "storage",
                "backend",
                "accepting",
            }
            assert requests.get(f"{base}/healthz", timeout=5).status_code == 200

            task_ids = {}
            for generation_id in (470, 471):
                message = backend_message(
                    generation_id,
                    lora_path=f"s3://{stack.models_bucket}/styles/9/",
                    parameters={"steps": 4, "width": 256, "height": 256},
                )
                task_ids[generation_id] = message["task_id"]
                stack.publish(message)
                outcome_of(stack.receiver, generation_id)
            time.sleep(0.5)  # the settlement (ack, job end) follows the completion webhook
            text = requests.get(f"{base}/metrics", timeout=5).text
            print(text)  # shown on failure, or with -s: one scrape of a real run
            assert metric(text, "stylelicense_jobs_total", outcome="completed") == 2
            assert metric(text, "stylelicense_images_generated_total") == 2
            assert metric(text, "stylelicense_denoising_steps_total") == 8
            assert metric(text, "stylelicense_generation_seconds_count") == 2
            assert metric(text, "stylelicense_jobs_in_flight") == 0
            completions = metric(text, "stylelicense_webhook_attempts_total", kind="completed")
            assert completions == 2
            assert metric(text, "stylelicense_webhook_failures_total", kind="completed") in (
                0,
                None,
            )
            # The first job downloaded and loaded the LoRA; the second found it in both caches.
            for level in ("disk", "pipeline"):
                assert metric(text, "stylelicense_lora_cache_misses_total", level=level) == 1
                assert metric(text, "stylelicense_lora_cache_hits_total", level=level) == 1
            assert metric(text, "stylelicense_queue_depth") == 0
            assert metric(text, "stylelicense_gpu_memory_used_bytes") is None  # no GPU: absent

            proxy.cut()
            down = poll(f"{base}/readyz", 503, timeout=30)
            assert down.status_code == 503
            assert down.json()["checks"]["broker"]["ok"] is False
            assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
            proxy.restore()
            assert poll(f"{base}/readyz", 200, timeout=60).status_code == 200
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
    assert process.returncode == 0
    output = log_path.read_text(encoding="utf-8")
    assert TOKEN not in output and signing_secret not in output
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert records, "the worker logged nothing"
    for generation_id, task_id in task_ids.items():
        about = [r for r in records if f"generation {generation_id}:" in r["message"]]
        assert about, f"no log line about generation {generation_id}"
        for record in about:
            assert record["generation_id"] == generation_id, record
            assert record["task_id"] == task_id, record
