"""The stack a worker runs against in integration tests: a queue of its own on the real
RabbitMQ, buckets on the real S3 API, a backend that behaves as the real one, and the worker
itself, in this process or as ``python -m app worker``.

Every queue a test declares here is deleted afterwards (main, parked, every retry queue).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import boto3
import pika
import pytest
from PIL import Image

from adapters.rabbitmq import retry_ladder
from tests.integration.backend_receiver import BackendReceiver, GenerationState
from tests.integration.services import RabbitService, S3Service, free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-secret-token"
RETRY_DELAY_SECONDS = 1
RETRY_MAX_DELAY_SECONDS = 4


def solid_signature() -> bytes:
    """An opaque red PNG: easy to find on the generated image."""
    buffer = io.BytesIO()
    Image.new("RGBA", (200, 100), (255, 0, 0, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def near(pixel: Any, expected: tuple[int, int, int], tolerance: int = 8) -> bool:
    """Whether an RGB pixel is within ``tolerance`` levels of ``expected`` in every channel:
    the invisible mark moves pixels by a few levels, never more."""
    return all(abs(int(got) - want) <= tolerance for got, want in zip(pixel, expected, strict=True))


@dataclass
class Stack:
    """Buckets, queue and receiver of one test, and how to reach them."""

    rabbit: RabbitService
    s3: S3Service
    receiver: BackendReceiver
    queue: str
    models_bucket: str
    media_bucket: str
    client: Any

    def env(self, tiny_model_dir: Path, download_dir: Path) -> dict[str, str]:
        """The worker's settings as environment variables."""
        return {
            "RABBITMQ_HOST": self.rabbit.host,
            "RABBITMQ_PORT": str(self.rabbit.port),
            "RABBITMQ_USER": self.rabbit.user,
            "RABBITMQ_PASS": self.rabbit.password,
            "RABBITMQ_QUEUE": self.queue,
            "RABBITMQ_RETRY_DELAY_SECONDS": str(RETRY_DELAY_SECONDS),
            "RABBITMQ_RETRY_MAX_DELAY_SECONDS": str(RETRY_MAX_DELAY_SECONDS),
            "AWS_S3_ENDPOINT_URL": self.s3.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_S3_REGION_NAME": self.s3.region,
            "AWS_STORAGE_BUCKET_NAME": self.media_bucket,
            "S3_MODELS_BUCKET": self.models_bucket,
            "BACKEND_API_URL": self.receiver.base_url,
            "INTERNAL_API_TOKEN": TOKEN,
            "WEBHOOK_MAX_ATTEMPTS": "4",
            "WEBHOOK_RETRY_BUDGET_SECONDS": "10",
            "MODEL_ID": str(tiny_model_dir),
            "MODEL_DEVICE": "cpu",
            "LORA_CACHE_DIR": str(download_dir),
            "MAX_RETRIES": "3",
            "LOG_LEVEL": "INFO",
            "METRICS_PORT": str(free_port()),
        }

    def publish(self, message: dict[str, Any] | bytes) -> None:
        """Exactly as the backend's code publishes a job."""
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        with self.connection() as connection:
            channel = connection.channel()
            channel.queue_declare(queue=self.queue, durable=True)
            channel.basic_publish(
                exchange="",
                routing_key=self.queue,
                body=body,
                properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            )

    def connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(
            pika.ConnectionParameters(
                self.rabbit.host,
                self.rabbit.port,
                self.rabbit.vhost,
                pika.PlainCredentials(self.rabbit.user, self.rabbit.password),
            )
        )

    def queue_state(self, name: str | None = None) -> tuple[int, int]:
        """(ready messages, consumers) of a queue."""
        with self.connection() as connection:
            ok = connection.channel().queue_declare(queue=name or self.queue, passive=True)
            return ok.method.message_count, ok.method.consumer_count

    def parked(self) -> list[tuple[bytes, dict[str, Any]]]:
        """Drain the parked queue: (body, headers) of each parked message."""
        found = []
        with self.connection() as connection:
            channel = connection.channel()
            while True:
                method, properties, body = channel.basic_get(f"{self.queue}.parked", True)
                if method is None:
                    return found
                found.append((body, dict(properties.headers or {})))

    def queues(self) -> list[str]:
        """Every queue the worker declares for this stack's queue."""
        ladder = retry_ladder(RETRY_DELAY_SECONDS, RETRY_MAX_DELAY_SECONDS)
        return [
            self.queue,
            f"{self.queue}.parked",
            *(f"{self.queue}.retry.{delay}s" for delay in ladder),
        ]

    def delete_queues(self) -> None:
        """Delete every queue of this stack from the shared broker."""
        with self.connection() as connection:
            channel = connection.channel()
            for name in self.queues():
                channel.queue_delete(queue=name)

    def waiting(self) -> int:
        """Messages ready in the main queue and in every retry queue."""
        total = 0
        with self.connection() as connection:
            channel = connection.channel()
            for name in self.queues():
                if name.endswith(".parked"):
                    continue
                total += channel.queue_declare(queue=name, passive=True).method.message_count
        return total

    def state(self, generation_id: int, want: str, timeout: float = 120) -> GenerationState:
        """What the backend holds for a generation once its status is ``want``."""
        found = self.receiver.wait_for_state(
            generation_id, lambda s: s is not None and s.status == want, timeout=timeout
        )
        assert found is not None, f"generation {generation_id} never became {want}"
        return found

    def output(self, generation_id: int) -> Image.Image:
        data = self.client.get_object(
            Bucket=self.media_bucket, Key=f"generations/{generation_id}.png"
        )
        return Image.open(io.BytesIO(data["Body"].read()))


@pytest.fixture
def stack(rabbit: RabbitService, s3: S3Service) -> Iterator[Stack]:
    """A stack of one test; its queues are deleted afterwards."""
    suffix = uuid.uuid4().hex[:10]
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
    )
    models, media = f"models-{suffix}", f"media-{suffix}"
    for bucket in (models, media):
        client.create_bucket(Bucket=bucket)
    with BackendReceiver(token=TOKEN) as receiver:
        built = Stack(rabbit, s3, receiver, f"image_generation_{suffix}", models, media, client)
        try:
            yield built
        finally:
            built.delete_queues()


@pytest.fixture
def worker_env(
    stack: Stack, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The worker's settings for the stack, also set in this process's environment."""
    env = stack.env(tiny_model_dir, tmp_path / "loras")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return env


@dataclass
class WorkerProcess:
    """``python -m app worker`` as the container runs it, its output in a file."""

    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[str] = field(repr=False)

    @property
    def pid(self) -> int:
        """The worker's process id (its broker connection is named after it)."""
        return self.process.pid

    def output(self) -> str:
        """Everything the worker printed so far."""
        self.log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM (graceful), then wait; the exit status (killed if it does not exit)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode

    def kill(self) -> None:
        """kill -9: no settlement, no goodbye; the broker returns what it held."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log_file.close()


def start_worker(env: dict[str, str], cwd: Path, name: str = "worker") -> WorkerProcess:
    """Start ``python -m app worker`` with exactly ``env`` (plus PATH and PYTHONPATH)."""
    log_path = cwd / f"{name}.log"
    log_file = log_path.open("w", encoding="utf-8")
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", "app", "worker"],
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return WorkerProcess(process=process, log_path=log_path, log_file=log_file)


def run_app(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m app <args>`` to its end with exactly ``env`` (plus PATH and PYTHONPATH),
    as an operator would next to the worker."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``predicate()`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def rabbit_connections(name_fragment: str) -> list[str]:
    """Broker-side ids of the connections whose client properties contain ``name_fragment``."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split("\t", 1)[0] for line in out.splitlines() if name_fragment in line]


def close_connections(name_fragment: str) -> int:
    """``rabbitmqctl close_connection`` on every matching connection; how many were closed."""
    pids = rabbit_connections(name_fragment)
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "test: connection dropped"],
            check=True,
            capture_output=True,
        )
    return len(pids)


def free_metrics_port() -> str:
    """A free port for one worker's /metrics."""
    return str(free_port())
