"""The guarantees of docs/guarantees.md, against the real broker, the real S3 API and a backend
that keeps what the real one keeps (a refund per failure call, progress replacing the stored JSON).

Each test runs ``python -m app worker`` as the container does and breaks something on the way:
a connection closed by ``rabbitmqctl close_connection``, a body published twice, a second
worker, kill -9, a backend whose failure view answers 500, a rotated token. The assertions are
on what the backend ends up holding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.backend_receiver import GenerationState
from tests.integration.services import port_open
from tests.integration.worker_stack import (
    TOKEN,
    Stack,
    WorkerProcess,
    close_connections,
    free_metrics_port,
    near,
    run_app,
    solid_signature,
    start_worker,
    wait_until,
)
from tests.messages import backend_message

pytestmark = pytest.mark.model

SMALL = {"width": 256, "height": 256}
"""The smallest size the policy allows: the tiny model renders it in well under a second."""


def small(steps: int = 8) -> dict[str, int]:
    return {**SMALL, "steps": steps}


def upload_tree(stack: Stack, bucket: str, prefix: str, folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stack.client.put_object(
                Bucket=bucket,
                Key=f"{prefix}{path.relative_to(folder).as_posix()}",
                Body=path.read_bytes(),
            )


def ready(port: str, timeout: float = 120) -> None:
    def answered() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(answered, timeout, f"the worker on port {port} to be ready")


def calls(stack: Stack, generation_id: int, kind: str, status: int | None = 200) -> list[Any]:
    return [
        r
        for r in stack.receiver.of_kind(kind)
        if r.generation_id == generation_id and (status is None or r.status == status)
    ]


def assert_completed_once_with_metadata(stack: Stack, generation_id: int) -> GenerationState:
    """Completed, never refunded, the final metadata still stored, and every completion alike."""
    state = stack.state(generation_id, "completed")
    assert state.refunds == 0 and calls(stack, generation_id, "failed", None) == []
    assert state.progress is not None and "seed" in state.progress, state.progress
    bodies = {
        json.dumps(r.payload, sort_keys=True) for r in calls(stack, generation_id, "complete")
    }
    assert len(bodies) == 1, "two different completions"
    assert state.result_url and state.result_url.endswith(f"generations/{generation_id}.png")
    return state


def stop(worker: WorkerProcess) -> None:
    status = worker.stop()
    assert status == 0, worker.output()[-3000:]


def test_a_dropped_connection_tells_one_outcome_per_message(
    stack: Stack, worker_env: dict[str, str], tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    """A re-queued generation and a body published twice are in flight when the broker closes
    the worker's connection; bodies that crashed every worker before are on the queue too."""
    upload_tree(stack, stack.models_bucket, "styles/1/", tiny_loras["peft"])
    missing = f"s3://{stack.models_bucket}/styles/missing/"
    port = free_metrics_port()
    worker = start_worker({**worker_env, "METRICS_PORT": port}, tmp_path)
    try:
        ready(port)
        stack.publish(
            b'{"type": "image_generation", "data": {"generation_id": ' + b"9" * 5000 + b"}}"
        )
        stack.publish(b"[" * 100_000)
        stack.publish(backend_message(701, lora_path=missing, parameters=small()))
        assert stack.state(701, "failed").refunds == 1
        stack.receiver.set_delay(0.2, kind="progress")  # keeps the jobs in flight a while
        requeued = backend_message(701, lora_path=f"s3://{stack.models_bucket}/styles/1/")
        requeued["data"]["parameters"] = small(steps=20)
        stack.publish(requeued)
        twice = backend_message(702, parameters=small(steps=20))
        stack.publish(twice)
        stack.publish(twice)
        stack.receiver.wait_for(
            lambda rs: any(r.kind == "progress" and r.generation_id == 701 for r in rs), timeout=60
        )
        assert close_connections(f"pid {worker.pid}") >= 1
        stack.state(701, "completed")
        stack.state(702, "completed")
        wait_until(lambda: stack.waiting() == 0, 60, "every copy to be settled")
        assert worker.process.poll() is None, "the worker exited"
    finally:
        stop(worker)
    first = stack.receiver.state(701)
    assert first is not None and first.refunds == 1  # the first failure only
    assert len(calls(stack, 701, "failed")) == 1
    for generation_id in (701, 702):
        state = stack.receiver.state(generation_id)
        assert state is not None and state.status == "completed"
        assert state.progress is not None and "seed" in state.progress, "metadata erased"
        last = [r for r in stack.receiver.requests if r.generation_id == generation_id][-1]
        assert last.kind == "complete", "a call after the outcome"
    assert_completed_once_with_metadata(stack, 702)
    parked = stack.parked()
    assert len(parked) == 2 and all(b.startswith((b"{", b"[")) for b, _ in parked)


def test_two_workers_on_one_host_share_the_queue_and_the_lora_cache(  # pylint: disable=too-many-locals
    stack: Stack, worker_env: dict[str, str], tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    upload_tree(stack, stack.models_bucket, "styles/2/", tiny_loras["peft"])
    cache = tmp_path / "shared-cache"
    env = {**worker_env, "LORA_CACHE_DIR": str(cache), "MAX_CONCURRENT_GENERATIONS": "2"}
    port_a, port_b = free_metrics_port(), free_metrics_port()
    first = start_worker({**env, "METRICS_PORT": port_a}, tmp_path, "a")
    second: WorkerProcess | None = None
    try:
        ready(port_a)
        clash = start_worker({**env, "METRICS_PORT": port_a}, tmp_path, "clash")
        assert clash.process.wait(timeout=120) == 3
        told = clash.output().strip().splitlines()
        assert "METRICS_PORT" in told[-1] and "Traceback" not in clash.output()
        second = start_worker({**env, "METRICS_PORT": port_b}, tmp_path, "b")
        ready(port_b)
        lora = f"s3://{stack.models_bucket}/styles/2/"
        for generation_id in range(711, 717):
            stack.publish(backend_message(generation_id, lora_path=lora, parameters=small()))
        twice = backend_message(717, lora_path=lora, parameters=small())
        stack.publish(twice)
        stack.publish(twice)
        for generation_id in range(711, 718):
            assert_completed_once_with_metadata(stack, generation_id)
        wait_until(lambda: stack.waiting() == 0, 60, "every copy to be settled")
    finally:
        stop(first)
        if second is not None:
            stop(second)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("a", "b")}
    for name, text in logs.items():
        assert '"generation_id"' in text and "delivered" in text, f"worker {name} took no job"
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1, entries  # one download, shared
    assert not list(cache.rglob("*.part")), "a download was left behind"


def test_the_worker_starts_with_only_the_backends_environment(
    stack: Stack, tiny_model_dir: Path, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    """The backend's own variables (docs/contract.md, "Environment"), an S3 endpoint and a local
    model path: nothing else. The queue is the backend's own, ``image_generation``, and references
    are as the backend stores them (a full s3:// URI, and the public URL of the signature)."""
    if port_open("127.0.0.1", 9100):
        pytest.fail("port 9100 (METRICS_PORT's default) is taken on this machine")
    env = {
        "RABBITMQ_HOST": stack.rabbit.host,
        "RABBITMQ_PORT": str(stack.rabbit.port),
        "RABBITMQ_USER": stack.rabbit.user,
        "RABBITMQ_PASS": stack.rabbit.password,
        "AWS_ACCESS_KEY_ID": stack.s3.access_key,
        "AWS_SECRET_ACCESS_KEY": stack.s3.secret_key,
        "AWS_STORAGE_BUCKET_NAME": stack.media_bucket,
        "AWS_S3_REGION_NAME": stack.s3.region,
        "BACKEND_API_URL": stack.receiver.base_url,
        "INTERNAL_API_TOKEN": TOKEN,
        "MAX_CONCURRENT_GENERATIONS": "10",
        "LOG_LEVEL": "INFO",
        "AWS_S3_ENDPOINT_URL": stack.s3.endpoint_url,
        "MODEL_ID": str(tiny_model_dir),
    }
    backend_queue = Stack(
        stack.rabbit,
        stack.s3,
        stack.receiver,
        "image_generation",
        stack.models_bucket,
        stack.media_bucket,
        stack.client,
    )
    upload_tree(stack, stack.models_bucket, "styles/123/", tiny_loras["peft"])
    stack.client.put_object(
        Bucket=stack.media_bucket, Key="signatures/77.png", Body=solid_signature()
    )
    worker = start_worker(env, tmp_path)
    try:
        ready("9100")
        backend_queue.publish(
            backend_message(
                721,
                lora_path=f"s3://{stack.models_bucket}/styles/123/",
                signature_path=f"{stack.s3.endpoint_url}/{stack.media_bucket}/signatures/77.png",
                signature_config={"position": "top-left", "size": "large", "opacity": 1.0},
                parameters=small(),
            )
        )
        assert_completed_once_with_metadata(stack, 721)
    finally:
        status = worker.stop()
        with backend_queue.connection() as connection:
            channel = connection.channel()
            for name in ("image_generation", "image_generation.parked"):
                channel.queue_delete(queue=name)
            for delay in (5, 20, 80, 320, 600):
                channel.queue_delete(queue=f"image_generation.retry.{delay}s")
    assert status == 0, worker.output()[-3000:]
    with stack.output(721) as image:
        assert near(image.convert("RGB").getpixel((30, 20)), (255, 0, 0))


def test_a_failure_view_answering_500_is_waited_out_and_refunds_once(
    stack: Stack, worker_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_metrics_port()
    worker = start_worker({**worker_env, "METRICS_PORT": port}, tmp_path)
    try:
        ready(port)
        stack.receiver.fail_for(5.0, status=500, kind="failed")
        stack.publish(
            backend_message(
                731, lora_path=f"s3://{stack.models_bucket}/styles/none/", parameters=small()
            )
        )
        state = stack.state(731, "failed", timeout=180)
        wait_until(lambda: stack.waiting() == 0, 60, "the message to be settled")
    finally:
        stop(worker)
    assert state.refunds == 1 and state.error_code == "LORA_NOT_FOUND"
    assert len(calls(stack, 731, "failed")) == 1
    assert len(calls(stack, 731, "failed", 500)) >= 2  # refused, handed back, tried again
    assert stack.parked() == []


def test_a_rotated_token_keeps_the_queue_intact_until_it_is_fixed(
    stack: Stack, worker_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_metrics_port()
    env = {**worker_env, "METRICS_PORT": port, "BACKEND_ACCESS_PROBE_SECONDS": "1"}
    worker = start_worker(env, tmp_path)
    try:
        ready(port)
        stack.receiver.set_token("rotated-on-the-backend")
        stack.publish(backend_message(741, parameters=small()))

        def refused() -> bool:
            answer = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            backend = answer.json()["checks"]["backend"]
            return answer.status_code == 503 and backend["detail"] == "credentials refused"

        wait_until(refused, 120, "readiness to report the refused token")
        stack.publish(backend_message(742, parameters=small()))
        time.sleep(3)  # the worker holds 742 back: not rendered, nothing sent for it
        assert [r for r in stack.receiver.requests if r.generation_id == 742] == []
        assert stack.parked() == []
        stack.receiver.set_token(TOKEN)
        for generation_id in (741, 742):
            assert_completed_once_with_metadata(stack, generation_id)
        ready(port)
    finally:
        stop(worker)


def test_kill_9_mid_job_then_another_worker_completes_it_once(
    stack: Stack, worker_env: dict[str, str], tmp_path: Path
) -> None:
    stack.receiver.set_delay(0.3, kind="progress")
    doomed = start_worker({**worker_env, "METRICS_PORT": free_metrics_port()}, tmp_path, "a")
    stack.publish(backend_message(751, parameters=small(steps=30)))
    stack.receiver.wait_for(
        lambda rs: any(r.kind == "progress" and r.generation_id == 751 for r in rs), timeout=120
    )
    doomed.kill()
    survivor = start_worker({**worker_env, "METRICS_PORT": free_metrics_port()}, tmp_path, "b")
    try:
        assert_completed_once_with_metadata(stack, 751)
        wait_until(lambda: stack.waiting() == 0, 60, "the message to be settled")
    finally:
        stop(survivor)
    last = [r for r in stack.receiver.requests if r.generation_id == 751][-1]
    assert last.kind == "complete"


def test_a_parked_outcome_is_told_once_when_replayed_and_a_told_failure_never_again(
    stack: Stack, worker_env: dict[str, str], tmp_path: Path
) -> None:
    """Guarantee 14 (docs/parked-messages.md, 5): the backend does not know generation 761 yet,
    so its completion is parked undelivered; an invalid message for 762 is reported failed and
    parked; a body that is not JSON is parked. Once the backend knows 761, `python -m app parked
    replay --all --yes` tells its completion once; 762's failure is not told again (one refund:
    the copy of a told message is acked); the body that is not JSON runs through intake again
    and is parked again."""
    stack.receiver.register(762)
    port = free_metrics_port()
    env = {**worker_env, "METRICS_PORT": port, "WEBHOOK_NOT_FOUND_RETRY_SECONDS": "2"}
    worker = start_worker(env, tmp_path)
    parked = f"{stack.queue}.parked"
    try:
        ready(port)
        stack.publish(backend_message(761, parameters=small()))
        stack.publish(
            {"type": "image_generation", "data": {"generation_id": 762, "prompt": ["not text"]}}
        )
        stack.publish(b"not json")
        assert stack.state(762, "failed").refunds == 1
        wait_until(lambda: stack.queue_state(parked)[0] == 3, 120, "all three to be parked")
        assert calls(stack, 761, "complete", 200) == []
        assert len(calls(stack, 761, "complete", 404)) >= 1

        def parked_metric() -> float | None:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            for line in text.splitlines():
                if line.startswith("stylelicense_parked_messages "):
                    return float(line.split()[1])
            return None

        wait_until(lambda: parked_metric() == 3.0, 30, "the parked metric to read 3")

        stack.receiver.register(761)
        replay = run_app(env, tmp_path, "parked", "replay", "--all", "--yes")
        assert replay.returncode == 0, replay.stderr
        assert_completed_once_with_metadata(stack, 761)
        wait_until(lambda: stack.queue_state(parked)[0] == 1, 60, "one to be parked again")
        wait_until(lambda: stack.waiting() == 0, 60, "every copy to be settled")
    finally:
        stop(worker)
    assert len(calls(stack, 761, "complete", 200)) == 1
    state = stack.receiver.state(762)
    assert state is not None and state.refunds == 1 and len(calls(stack, 762, "failed")) == 1
    ((body, headers),) = stack.parked()
    assert body == b"not json" and headers["x-replay-count"] == 1
