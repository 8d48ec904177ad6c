"""The operations endpoint over real HTTP, and the operator's commands ``health`` and ``submit``.

/metrics is scraped and parsed with prometheus-client's own parser; readiness and liveness are
driven by real checks and an injected clock. ``submit`` publishes to the real broker.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import socket
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.error import HTTPError

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.prometheus import PrometheusTelemetry
from app.cli import main
from app.ops_server import OpsServer, OpsServerError
from app.probes import Liveness, Readiness
from tests.integration.services import RabbitService


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str) -> tuple[int, dict[str, object]]:
    status, headers, body = get(url)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def scrape(server: OpsServer) -> dict[str, float]:
    """Every sample of /metrics as ``name{label="v",...}`` -> value."""
    status, headers, body = get(f"{server.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.fixture
def telemetry() -> PrometheusTelemetry:
    return PrometheusTelemetry()


@pytest.fixture
def server(telemetry: PrometheusTelemetry) -> Iterator[OpsServer]:
    with OpsServer(registry=telemetry.registry, host="127.0.0.1", port=0) as ops:
        yield ops


def test_metrics_move_by_the_events_pushed_between_two_scrapes(
    server: OpsServer, telemetry: PrometheusTelemetry
) -> None:
    assert server.port != 0
    before = scrape(server)
    telemetry.job_started()
    telemetry.job_started()
    telemetry.images_generated(count=2, steps=30, seconds=4.0)
    telemetry.job_finished(outcome="completed", error_code=None, seconds=6.0)
    telemetry.job_finished(outcome="failed", error_code="LORA_INVALID", seconds=1.0)
    telemetry.webhook_attempt(kind="failed", ok=False)
    telemetry.webhook_attempt(kind="failed", ok=True)
    after = scrape(server)

    def moved(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert moved("stylelicense_images_generated_total") == 2
    assert moved("stylelicense_denoising_steps_total") == 60
    assert after["stylelicense_denoising_steps_per_second"] == 15.0
    assert moved("stylelicense_generation_seconds_count") == 1
    assert moved('stylelicense_generation_seconds_bucket{le="5.0"}') == 1
    assert moved('stylelicense_generation_seconds_bucket{le="3.0"}') == 0
    assert moved('stylelicense_jobs_total{outcome="completed"}') == 1
    assert moved('stylelicense_jobs_total{outcome="failed"}') == 1
    assert moved('stylelicense_jobs_total{outcome="retry"}') == 0
    assert moved('stylelicense_job_failures_total{error_code="LORA_INVALID"}') == 1
    assert moved('stylelicense_webhook_attempts_total{kind="failed"}') == 2
    assert moved('stylelicense_webhook_failures_total{kind="failed"}') == 1
    assert after["stylelicense_jobs_in_flight"] == 0
    assert after["process_resident_memory_bytes"] > 0


def test_openmetrics_and_gzip_when_the_scraper_asks(server: OpsServer) -> None:
    status, headers, body = get(
        f"{server.url}/metrics",
        {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"},
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    text = gzip.decompress(body).decode("utf-8")
    assert text.rstrip().endswith("# EOF") and "stylelicense_jobs_total" in text


def test_gpu_metrics_appear_only_while_the_monitor_reports_a_gpu(
    server: OpsServer, telemetry: PrometheusTelemetry
) -> None:
    class Sample:
        index, name = 0, "NVIDIA H200"
        utilization_percent, memory_used_bytes, memory_total_bytes = 42.0, 3 * 2**30, 141 * 2**30

    samples: list[Sample] = []
    telemetry.watch_gpus(lambda: samples)
    assert not any(key.startswith("stylelicense_gpu_") for key in scrape(server))
    samples.append(Sample())
    after = scrape(server)
    assert after['stylelicense_gpu_utilization_percent{gpu="0",name="NVIDIA H200"}'] == 42.0
    assert after['stylelicense_gpu_memory_used_bytes{gpu="0",name="NVIDIA H200"}'] == 3 * 2**30


def test_readiness_flips_with_its_checks_and_says_what_is_wrong(
    telemetry: PrometheusTelemetry,
) -> None:
    broker_up = threading.Event()
    readiness = Readiness(timeout_seconds=2.0)
    readiness.add(
        "broker",
        lambda: (True, "connected") if broker_up.is_set() else (False, "connection lost"),
        phrases=("connected", "connection lost"),
    )
    readiness.add("model", lambda: (True, "loaded"), phrases=["loaded"])
    with OpsServer(registry=telemetry.registry, readiness=readiness, port=0) as ops:
        status, body = get_json(f"{ops.url}/readyz")
        assert status == 503 and body["ready"] is False
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert checks["broker"]["ok"] is False and checks["broker"]["detail"] == "connection lost"
        assert checks["model"] == {"ok": True, "detail": "loaded", "seconds": 0.0}
        broker_up.set()
        status, body = get_json(f"{ops.url}/readyz")
        assert status == 200 and body["ready"] is True
        broker_up.clear()
        assert get_json(f"{ops.url}/readyz")[0] == 503


def check_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    """The log records about one readiness check."""
    return [r for r in caplog.records if f"readiness check {name} " in r.getMessage()]


def test_a_raising_or_hung_check_fails_within_the_time_limit_without_piling_up(
    telemetry: PrometheusTelemetry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.probes")
    release = threading.Event()
    calls = {"hung": 0}

    def hung() -> tuple[bool, str]:
        calls["hung"] += 1
        release.wait(30)
        return True, "late"

    def storage() -> tuple[bool, str]:
        raise PermissionError("AccessDenied on stylelicense-media")

    readiness = Readiness(timeout_seconds=0.3)
    readiness.add("hung", hung, phrases=["late"])
    readiness.add("storage", storage, phrases=["buckets reachable"])
    try:
        with OpsServer(registry=telemetry.registry, readiness=readiness, port=0) as ops:
            for _ in range(3):
                began = time.monotonic()
                status, headers, raw = get(f"{ops.url}/readyz")
                assert time.monotonic() - began < 2.0
                checks = json.loads(raw)["checks"]
                assert status == 503 and headers["Content-Type"] == "application/json"
                assert checks["hung"]["detail"] == "no answer in time"
                assert checks["storage"] == {
                    "ok": False,
                    "detail": "check failed",
                    "seconds": checks["storage"]["seconds"],
                }
                assert b"stylelicense-media" not in raw and b"PermissionError" not in raw
            assert calls["hung"] == 1  # the hung run is shared, not started per probe
            release.set()
            time.sleep(0.1)
            hung_now = get_json(f"{ops.url}/readyz")[1]["checks"]["hung"]
            assert (hung_now["ok"], hung_now["detail"]) == (True, "late")
    finally:
        release.set()
    [failing] = check_lines(caplog, "storage")  # three probes, one change of state: one line
    assert failing.levelno == logging.WARNING
    assert "PermissionError: AccessDenied on stylelicense-media" in failing.getMessage()
    assert failing.exc_info is not None and failing.exc_info[0] is PermissionError
    assert [(r.levelno, "0.3 s" in r.getMessage()) for r in check_lines(caplog, "hung")] == [
        (logging.WARNING, True),
        (logging.INFO, False),
    ]


def test_only_registered_phrases_reach_the_body_the_rest_goes_to_the_log_redacted(
    telemetry: PrometheusTelemetry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.probes")

    def redact(text: str) -> str:
        return text.replace("tok-123456", "***")

    readiness = Readiness(redact=redact)
    readiness.add(
        "backend",
        lambda: (False, "401 from https://api.internal:8443 with Authorization: Bearer tok-123456"),
        phrases=["credentials refused"],
    )
    readiness.add("broker", lambda: (True, "connected to rabbitmq.internal:5672"))
    readiness.add(
        "storage",
        lambda: (False, "unreachable: AccessDenied on stylelicense-media"),
        phrases=["unreachable", "buckets reachable"],
    )
    readiness.add("model", lambda: (True, "loaded"), phrases=["loaded"])
    with OpsServer(registry=telemetry.registry, readiness=readiness, port=0, redact=redact) as ops:
        _, headers, body = get(f"{ops.url}/readyz")
    checks = json.loads(body)["checks"]
    assert {name: check["detail"] for name, check in checks.items()} == {
        "backend": "failing",
        "broker": "ok",
        "model": "loaded",
        "storage": "unreachable",
    }
    for leak in (b"tok-123456", b"Bearer", b"api.internal", b"rabbitmq", b"https", b"Access"):
        assert leak not in body
    assert headers["Cache-Control"] == "no-store"
    logged = caplog.text
    assert "https://api.internal:8443 with Authorization: Bearer ***" in logged
    assert "connected to rabbitmq.internal:5672" in logged and "tok-123456" not in logged
    assert "unreachable: AccessDenied on stylelicense-media" in logged


def test_state_changes_are_logged_once_each(
    telemetry: PrometheusTelemetry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.probes")
    connected = threading.Event()
    readiness = Readiness()
    readiness.add(
        "broker",
        lambda: (connected.is_set(), "up" if connected.is_set() else "down at broker-7:5672"),
    )
    with OpsServer(registry=telemetry.registry, readiness=readiness, port=0) as ops:
        for state in (False, False, True, True, True, False, False):
            if state:
                connected.set()
            else:
                connected.clear()
            get(f"{ops.url}/readyz")
    lines = check_lines(caplog, "broker")
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO, logging.WARNING]
    assert "broker-7:5672" in lines[0].getMessage()


def test_a_phrase_must_be_one_short_line() -> None:
    readiness = Readiness()
    with pytest.raises(ValueError, match="'broker'"):
        readiness.add("broker", lambda: (True, ""), phrases=["x" * 41])
    with pytest.raises(ValueError, match="'broker'"):
        readiness.add("broker", lambda: (True, ""), phrases=["two\nlines"])
    readiness.close()


def test_liveness_goes_503_when_the_heartbeat_is_stale(telemetry: PrometheusTelemetry) -> None:
    clock = FakeClock()
    liveness = Liveness(stale_after_seconds=300, startup_grace_seconds=600, clock=clock)
    with OpsServer(registry=telemetry.registry, liveness=liveness, port=0) as ops:
        clock.now += 599
        status, body = get_json(f"{ops.url}/healthz")
        assert status == 200 and body["seconds_since_start"] == 599
        clock.now += 2
        status, body = get_json(f"{ops.url}/healthz")
        assert status == 503 and "has not started after 601 s" in str(body["detail"])
        liveness.heartbeat()
        clock.now += 299.5
        status, body = get_json(f"{ops.url}/healthz")
        assert status == 200 and body == {
            "alive": True,
            "seconds_since_heartbeat": 299.5,
            "stale_after_seconds": 300,
        }
        clock.now += 1
        status, body = get_json(f"{ops.url}/healthz")
        assert status == 503 and body["alive"] is False
        assert body["seconds_since_heartbeat"] == 300.5
        assert "has not reported for 300 s" in str(body["detail"])
        liveness.heartbeat()
        assert get_json(f"{ops.url}/healthz")[0] == 200


def test_unknown_paths_are_404_and_close_releases_the_port(telemetry: PrometheusTelemetry) -> None:
    ops = OpsServer(registry=telemetry.registry, port=0).start()
    port = ops.port
    assert get_json(f"{ops.url}/nope")[0] == 404
    assert get_json(f"{ops.url}/")[1] == {"endpoints": ["/metrics", "/healthz", "/readyz"]}
    with pytest.raises(OpsServerError) as caught:
        OpsServer(registry=telemetry.registry, host="127.0.0.1", port=port).start()
    message = str(caught.value)
    assert message.startswith(f"METRICS_PORT {port}: 127.0.0.1:{port} is already in use")
    assert message.endswith("each worker on a host needs its own METRICS_PORT")
    assert "\n" not in message
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.EADDRINUSE
    ops.close()
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{port}/healthz")
    OpsServer(registry=telemetry.registry, host="127.0.0.1", port=port).start().close()


def idle_connection(server: OpsServer) -> socket.socket:
    """A client that connects and sends nothing: it holds a handler until it closes."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def handler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ops-handler")]


def test_a_connection_storm_gets_503_without_a_thread_each(
    telemetry: PrometheusTelemetry,
) -> None:
    with OpsServer(registry=telemetry.registry, port=0, handler_threads=2) as ops:
        threads_before = threading.active_count()
        holders = [idle_connection(ops) for _ in range(2)]
        time.sleep(0.2)  # both are handed to the two handler threads
        began = time.monotonic()
        status, headers, body = get(f"{ops.url}/healthz")
        assert time.monotonic() - began < 1.0
        assert (status, json.loads(body)) == (503, {"error": "busy"})
        assert headers["Retry-After"] == "1"
        storm = [idle_connection(ops) for _ in range(20)]
        time.sleep(0.3)
        assert threading.active_count() <= threads_before
        assert len(handler_threads()) == 2
        for sock in storm:
            assert sock.recv(4096).startswith(b"HTTP/1.0 503")
            sock.close()
        for sock in holders:
            sock.close()
        deadline = time.monotonic() + 3
        while get(f"{ops.url}/healthz")[0] != 200:
            assert time.monotonic() < deadline, "the handlers were not freed"
            time.sleep(0.05)


def test_concurrent_scrapes_are_answered_or_refused_never_reset(
    telemetry: PrometheusTelemetry,
) -> None:
    with OpsServer(registry=telemetry.registry, port=0, handler_threads=2) as ops:
        with ThreadPoolExecutor(max_workers=24) as pool:
            statuses = list(pool.map(lambda _: get(f"{ops.url}/metrics")[0], range(96)))
    assert set(statuses) <= {200, 503} and 200 in statuses


def test_closing_ends_the_handler_threads(telemetry: PrometheusTelemetry) -> None:
    with OpsServer(registry=telemetry.registry, port=0, handler_threads=3) as ops:
        assert get(f"{ops.url}/healthz")[0] == 200
        mine = handler_threads()
        assert len(mine) >= 3
    for thread in mine:
        thread.join(timeout=5)
    assert not any(thread.is_alive() for thread in mine)


# --- python -m app health ---------------------------------------------------------------------


@pytest.fixture
def clean_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """main() reads settings from the environment and configures logging: isolate both."""
    monkeypatch.chdir(tmp_path)
    for name in ("METRICS_PORT", "METRICS_HOST", "LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)


@pytest.mark.usefixtures("clean_cli")
def test_health_command_exits_0_when_ready_and_1_otherwise(
    telemetry: PrometheusTelemetry, capsys: pytest.CaptureFixture[str]
) -> None:
    ready = threading.Event()
    readiness = Readiness()
    readiness.add(
        "model",
        lambda: (ready.is_set(), "loaded" if ready.is_set() else "loading"),
        phrases=("loaded", "loading"),
    )
    with OpsServer(registry=telemetry.registry, readiness=readiness, port=0) as ops:
        port = str(ops.port)
        assert main(["health", "--port", port]) == 1
        assert json.loads(capsys.readouterr().out)["checks"]["model"]["detail"] == "loading"
        ready.set()
        assert main(["health", "--port", port]) == 0
        assert json.loads(capsys.readouterr().out)["ready"] is True
        assert main(["health", "--live", "--port", port]) == 0
        assert json.loads(capsys.readouterr().out)["alive"] is True
    assert main(["health", "--port", port, "--timeout", "1"]) == 1
    assert "did not answer" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.usefixtures("clean_cli")
def test_health_command_reads_metrics_port_and_fails_as_unhealthy_on_bad_settings(
    telemetry: PrometheusTelemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OpsServer(registry=telemetry.registry, port=0) as ops:
        monkeypatch.setenv("METRICS_PORT", str(ops.port))
        assert main(["health"]) == 0
    monkeypatch.setenv("METRICS_PORT", "not-a-port")
    assert main(["health"]) == 1  # Docker reads 1 as unhealthy; 2 is reserved there


# --- python -m app submit ---------------------------------------------------------------------


@pytest.mark.usefixtures("clean_cli")
def test_submit_publishes_exactly_as_the_backend_does(
    rabbit: RabbitService, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"test-submit-{uuid.uuid4().hex[:8]}"
    for name, value in {
        "RABBITMQ_HOST": rabbit.host,
        "RABBITMQ_PORT": str(rabbit.port),
        "RABBITMQ_USER": rabbit.user,
        "RABBITMQ_PASS": rabbit.password,
        "RABBITMQ_VHOST": rabbit.vhost,
        "RABBITMQ_QUEUE": queue,
    }.items():
        monkeypatch.setenv(name, value)
    argv = ["submit", "--generation-id", "900", "--count", "2", "--tag", "ink", "--seed", "5"]
    argv += ["--lora-path", "s3://stylelicense-models/styles/3/", "--steps", "20"]
    assert main(argv) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            host=rabbit.host,
            port=rabbit.port,
            virtual_host=rabbit.vhost,
            credentials=pika.PlainCredentials(rabbit.user, rabbit.password),
        )
    )
    try:
        channel = connection.channel()
        # The backend's own declare succeeds: the queue is durable with no arguments.
        channel.queue_declare(queue=queue, durable=True)
        received = []
        for _ in range(2):
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            assert method is not None
            assert properties.delivery_mode == 2
            assert properties.content_type == "application/json"
            received.append(json.loads(body))
        channel.queue_delete(queue)
    finally:
        connection.close()
    assert received == printed
    assert [message["data"]["generation_id"] for message in received] == [900, 901]
    first = received[0]
    assert first["type"] == "image_generation" and uuid.UUID(first["task_id"])
    assert first["data"]["prompt_tags"] == ["ink"] and first["data"]["seed"] == 5
    assert first["data"]["lora_path"] == "s3://stylelicense-models/styles/3/"
    assert first["data"]["parameters"] == {"steps": 20}
    assert first["data"]["signature_config"]["position"] == "bottom-right"


@pytest.mark.usefixtures("clean_cli")
def test_submit_names_an_unreachable_broker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("RABBITMQ_HOST", "127.0.0.1")
    monkeypatch.setenv("RABBITMQ_PORT", str(port))
    monkeypatch.setenv("RABBITMQ_PASS", "do-not-print-me")
    assert main(["submit", "--timeout", "2"]) == 1
    error = capsys.readouterr().err
    assert f"RabbitMQ at 127.0.0.1:{port} is not reachable" in error
    assert "do-not-print-me" not in error
