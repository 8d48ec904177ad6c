"""Real services for the integration tests: RabbitMQ and an S3 HTTP API.

Where a Docker engine answers, testcontainers starts RabbitMQ and MinIO. Otherwise the endpoints
come from the environment (``make test`` sets them: the local RabbitMQ and a ``moto_server`` it
starts), and, failing that, a ``moto_server`` is started here on a free port. With ``CI=true`` a
service that cannot be reached fails the run; it never turns into skipped tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class S3Service:
    """An S3 endpoint with credentials that accept any bucket name."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


@dataclass(frozen=True)
class RabbitService:
    """An AMQP endpoint."""

    host: str
    port: int
    user: str
    password: str
    vhost: str = "/"


class ServiceUnavailable(RuntimeError):
    """A service could not be started or reached."""


def unavailable(what: str, why: str) -> None:
    """Fail in CI, skip elsewhere: a missing service must never pass silently in CI."""
    message = f"{what} is not reachable: {why}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def docker_available() -> bool:
    """Whether a Docker engine answers (the docker client alone is not enough)."""
    if shutil.which("docker") is None and not os.environ.get("DOCKER_HOST"):
        return False
    try:
        import docker  # pylint: disable=import-outside-toplevel

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # pylint: disable=broad-exception-caught
        return False


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections there."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_server(*, niceness: int = 0) -> Iterator[S3Service]:
    """A moto_server process on a free port, stopped afterwards.

    ``niceness`` lowers its CPU priority (benchmarks: it stands in for a remote S3).
    """
    port = free_port()
    executable = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [str(executable), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if niceness:
        os.setpriority(os.PRIO_PROCESS, process.pid, niceness)
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port, 0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServiceUnavailable(f"moto_server did not start (exit code {process.poll()})")
            time.sleep(0.1)
        yield S3Service(f"http://127.0.0.1:{port}", "testing", "testing")
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def s3_service() -> Iterator[S3Service]:
    """MinIO in a container, else the endpoint in TEST_S3_ENDPOINT_URL, else moto_server."""
    if docker_available():
        from testcontainers.minio import (  # pylint: disable=import-outside-toplevel
            MinioContainer,
        )

        with MinioContainer() as minio:
            config = minio.get_config()
            yield S3Service(
                f"http://{config['endpoint']}", config["access_key"], config["secret_key"]
            )
        return
    endpoint = os.environ.get("TEST_S3_ENDPOINT_URL")
    if endpoint:
        host, _, port = endpoint.split("//", 1)[1].partition(":")
        if not port_open(host, int(port.split("/")[0] or 80)):
            unavailable("S3 API", f"nothing listens at TEST_S3_ENDPOINT_URL={endpoint}")
        yield S3Service(endpoint, "testing", "testing")
        return
    try:
        with moto_server() as service:
            yield service
    except ServiceUnavailable as exc:
        unavailable("S3 API", str(exc))


@contextmanager
def rabbit_service() -> Iterator[RabbitService]:
    """RabbitMQ in a container, else the broker at TEST_RABBITMQ_HOST/PORT (default local)."""
    if docker_available():
        from testcontainers.rabbitmq import (  # pylint: disable=import-outside-toplevel
            RabbitMqContainer,
        )

        with RabbitMqContainer() as rabbit:
            params = rabbit.get_connection_params()
            yield RabbitService(
                params.host,
                params.port,
                params.credentials.username,
                params.credentials.password,
            )
        return
    host = os.environ.get("TEST_RABBITMQ_HOST", "127.0.0.1")
    port = int(os.environ.get("TEST_RABBITMQ_PORT", "5672"))
    if not port_open(host, port):
        unavailable("RabbitMQ", f"nothing listens at {host}:{port} (rabbitmq-server -detached)")
    yield RabbitService(
        host,
        port,
        os.environ.get("TEST_RABBITMQ_USER", "guest"),
        os.environ.get("TEST_RABBITMQ_PASS", "guest"),
    )


def ensure_local_rabbitmq(host: str = "127.0.0.1", port: int = 5672, wait: float = 60.0) -> bool:
    """Start the machine's RabbitMQ (``rabbitmq-server -detached``) if nothing listens."""
    if port_open(host, port):
        return True
    server = shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"
    if not Path(server).exists():
        return False
    subprocess.run([server, "-detached"], check=False, capture_output=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.5)
    return False


def main(argv: list[str]) -> int:
    """Run a command (the test suite) with the services up and their endpoints exported.

    Where Docker answers, testcontainers starts the services inside the tests instead.
    """
    env = dict(os.environ)
    if docker_available():
        return subprocess.call(argv, env=env)
    host = env.setdefault("TEST_RABBITMQ_HOST", "127.0.0.1")
    port = int(env.setdefault("TEST_RABBITMQ_PORT", "5672"))
    if host in {"127.0.0.1", "localhost"} and not ensure_local_rabbitmq(host, port):
        print(f"services: RabbitMQ is not reachable at {host}:{port}", file=sys.stderr)
        if IN_CI:
            return 1
    if env.get("TEST_S3_ENDPOINT_URL"):
        return subprocess.call(argv, env=env)
    try:
        with moto_server() as s3:
            env["TEST_S3_ENDPOINT_URL"] = s3.endpoint_url
            return subprocess.call(argv, env=env)
    except ServiceUnavailable as exc:
        print(f"services: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
