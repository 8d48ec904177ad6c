"""``python -m app worker``: consume the queue until stopped.

Start-up checks fail fast, naming what is wrong: the broker, the buckets, the C2PA signing key,
the model. The first SIGTERM/SIGINT stops taking work, lets the job in flight finish and be
settled, then closes; a second one exits at once (unsettled deliveries go back to the queue with
the connection).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from app.logging_setup import SecretRedactor
from app.ops_server import OpsServer
from app.probes import Liveness, Readiness
from app.settings import Settings, secret_values
from containers import Container, build_container
from domain.errors import GenerationError
from ports.storage import Storage
from ports.task_source import SourceUnavailable

log = logging.getLogger(__name__)

EXIT_STARTUP_FAILED = 3

GIL_SWITCH_INTERVAL_SECONDS = 0.0005
"""The model thread gives the GIL up around every torch op and must get it back at once: with
CPython's default 5 ms, an I/O thread running Python (boto3, pika, JSON) keeps it waiting up to
5 ms each time. Measured on the tiny model: a thread using 10 % of a core in Python slowed the
model by 14 % at 5 ms and by 3 % at 0.5 ms."""


def favour_the_model_thread() -> None:
    """Shorten the GIL switch interval for the worker process (see GIL_SWITCH_INTERVAL_SECONDS)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)


class Shutdown:
    """Signal handling: the first signal asks for a graceful stop, the second exits."""

    def __init__(self, on_first: list[Callable[[], object]]) -> None:
        self.requested = threading.Event()
        self.on_first = on_first

    def install(self) -> None:
        """Handle SIGTERM and SIGINT (main thread only)."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            log.warning("second %s: exiting now; unsettled jobs return to the queue", name)
            os._exit(128 + signum)
        log.info("%s: finishing the job in flight, taking no more", name)
        self.requested.set()
        # Not here: a handler interrupts the main thread anywhere, possibly inside a lock the
        # callbacks need (pika's add_callback_threadsafe takes a non-reentrant one).
        for callback in self.on_first:
            threading.Thread(target=callback, name="shutdown", daemon=True).start()


def start(container: Container) -> str | None:
    """Connect and load everything the worker needs; the problem in one line, or None."""
    source = container.task_source()
    try:
        source.start(consume=False)
    except SourceUnavailable as exc:
        return f"broker: {exc}"
    try:
        container.storage().check()
    except GenerationError as exc:
        return f"storage: {exc.message}"
    try:
        marks = container.provenance().marks
    except ValueError as exc:  # a configured key or certificate the worker cannot sign with
        return f"provenance: {exc}"
    log.info("every image carries: %s", ", ".join(marks))
    try:
        container.image_model.init()
    except GenerationError as exc:
        return f"model: {exc.message} (set MODEL_ID to a local Stable Diffusion 1.5 folder)"
    # Only now: jobs prefetched during a long model load would sit idle, held from other workers.
    source.start_consuming()
    return None


def run_worker(settings: Settings, container: Container | None = None) -> int:
    """Run until a signal; the process exit status."""
    container = container or build_container(settings.container_config())
    favour_the_model_thread()
    telemetry = container.telemetry()
    liveness = Liveness(
        stale_after_seconds=settings.health_stale_after_seconds,
        startup_grace_seconds=settings.health_startup_grace_seconds,
    )
    redact = SecretRedactor(secret_values(settings)).redact
    readiness = Readiness(timeout_seconds=settings.readiness_timeout_seconds, redact=redact)
    ops = OpsServer(
        registry=telemetry.registry,
        liveness=liveness,
        readiness=readiness,
        host=settings.metrics_host,
        port=settings.metrics_port,
        redact=redact,
    )
    # Checks before the server: an empty readiness would answer "ready" while the model loads.
    shutdown = Shutdown(on_first=[])
    model_loaded = threading.Event()
    watch(container, readiness, model_loaded, shutdown)
    try:
        ops.start()
    except OSError as exc:  # OpsServerError names METRICS_PORT and the address
        print(f"worker: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    try:
        return _serve(settings, container, liveness, shutdown, model_loaded)
    finally:
        ops.close()
        readiness.close()


def _serve(
    settings: Settings,
    container: Container,
    liveness: Liveness,
    shutdown: Shutdown,
    model_loaded: threading.Event,
) -> int:
    problem = start(container)
    if problem is not None:
        print(f"worker: cannot start: {problem}", file=sys.stderr)
        container.task_source().close()
        container.shutdown_resources()
        return EXIT_STARTUP_FAILED
    model_loaded.set()
    source = container.task_source()
    container.telemetry().watch_lora_cache("pipeline", container.image_model().lora_cache_stats)
    shutdown.on_first.append(source.stop_consuming)
    shutdown.install()
    log.info(
        "worker ready: queue %s, prefetch %d, batches up to %d",
        settings.rabbitmq_queue,
        settings.max_concurrent_generations,
        settings.max_batch_size,
    )
    try:
        handled = container.job_runner().run(
            should_stop=shutdown.requested.is_set, heartbeat=liveness.heartbeat
        )
    finally:
        source.close()
        container.shutdown_resources()
    log.info("worker stopped after %d deliveries", handled)
    return 0


def watch(
    container: Container,
    readiness: Readiness,
    model_loaded: threading.Event,
    shutdown: Shutdown,
) -> None:
    """Readiness checks and scrape-time metric sources for what the container holds."""
    telemetry = container.telemetry()
    source = container.task_source()
    storage = container.storage()
    access = container.backend_access()
    readiness.add(
        "model",
        lambda: (model_loaded.is_set(), "loaded" if model_loaded.is_set() else "loading"),
        phrases=("loaded", "loading"),
    )
    readiness.add(
        "broker",
        lambda: (source.connected, "connected" if source.connected else "disconnected"),
        phrases=("connected", "disconnected"),
    )
    telemetry.watch_queue_depth(lambda: source.queue_depth)
    telemetry.watch_parked_depth(lambda: source.parked_depth)
    readiness.add(
        "storage",
        lambda: _storage_reachable(storage),
        phrases=("buckets reachable", "unreachable"),
    )
    readiness.add(
        "backend",
        lambda: (
            access.refusal is None,
            (
                "credentials accepted"
                if access.refusal is None
                else f"credentials refused: {access.refusal}"
            ),
        ),
        phrases=("credentials accepted", "credentials refused"),
    )
    readiness.add(
        "accepting",
        lambda: (
            not shutdown.requested.is_set(),
            "stopping" if shutdown.requested.is_set() else "taking jobs",
        ),
        phrases=("taking jobs", "stopping"),
    )
    telemetry.watch_lora_cache("disk", storage.lora_cache_stats)
    telemetry.watch_gpus(container.gpu_monitor().sample)


def _storage_reachable(storage: Storage) -> tuple[bool, str]:
    try:
        storage.check()
    except GenerationError as exc:
        return False, f"unreachable: {exc.message}"
    return True, "buckets reachable"
