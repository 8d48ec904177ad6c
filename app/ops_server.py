"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on one small HTTP server.

- ``/metrics``: the Prometheus exposition of a registry (OpenMetrics when the scraper asks for
  it, gzip when it accepts it).
- ``/healthz`` (liveness): 200 while the worker loop keeps calling ``Liveness.heartbeat()``;
  503 once it has been silent for longer than ``stale_after_seconds`` (a stuck loop: restart
  the process). Until the first beat, ``startup_grace_seconds`` covers the model's load.
- ``/readyz`` (readiness): 200 only when every registered check passes (model loaded, broker
  connected, storage reachable...). Checks run concurrently, each within a time limit; a check
  that raises or does not answer in time counts as failing, with the reason in the JSON body.

Built on the standard library's ``ThreadingHTTPServer`` on a daemon thread: three read-only
routes with JSON bodies and custom status codes need no framework, every request gets its own
thread (a slow readiness check never delays a scrape), and ``close()`` stops it cleanly.
Responses carry only states, durations and the checks' own short details, never settings;
``redact`` (the log redactor) is applied to every detail as a second line of defence.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = logging.getLogger(__name__)

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 9100
DETAIL_CHARS = 300
"""How much of a check's detail (or exception text) a response carries."""

ReadinessCheck = Callable[[], tuple[bool, str]]
"""A readiness check: ``(ok, detail)``; ``detail`` says what is wrong (or what is fine)."""


class Liveness:
    """Whether the worker loop is still turning: it calls ``heartbeat()`` on each iteration.

    ``stale_after_seconds`` must exceed the longest iteration: the longest model call (a full
    batch at the largest size and most steps) plus the queue poll.
    """

    def __init__(
        self,
        *,
        stale_after_seconds: float = 300.0,
        startup_grace_seconds: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stale_after_seconds <= 0 or startup_grace_seconds < 0:
            raise ValueError(
                "stale_after_seconds must be positive and startup_grace_seconds not negative,"
                f" got {stale_after_seconds} and {startup_grace_seconds}"
            )
        self.stale_after_seconds = stale_after_seconds
        self.startup_grace_seconds = startup_grace_seconds
        self._clock = clock
        self._born = clock()
        self._last_beat: float | None = None
        self._lock = threading.Lock()

    def heartbeat(self) -> None:
        """The loop made progress (cheap: call it on every iteration)."""
        now = self._clock()
        with self._lock:
            self._last_beat = now

    def status(self) -> tuple[bool, dict[str, Any]]:
        """``(alive, body)`` for ``/healthz``."""
        now = self._clock()
        with self._lock:
            last = self._last_beat
        if last is None:
            waited = now - self._born
            alive = waited <= self.startup_grace_seconds
            body: dict[str, Any] = {
                "alive": alive,
                "seconds_since_start": round(waited, 3),
                "startup_grace_seconds": self.startup_grace_seconds,
            }
            if not alive:
                body["detail"] = (
                    f"the worker loop has not started after {waited:.0f} s"
                    f" (limit {self.startup_grace_seconds:.0f} s)"
                )
            return alive, body
        silent = now - last
        alive = silent <= self.stale_after_seconds
        body = {
            "alive": alive,
            "seconds_since_heartbeat": round(silent, 3),
            "stale_after_seconds": self.stale_after_seconds,
        }
        if not alive:
            body["detail"] = (
                f"the worker loop has not reported for {silent:.0f} s"
                f" (limit {self.stale_after_seconds:.0f} s): it is stuck"
            )
        return alive, body


class Readiness:
    """Named readiness checks, evaluated together for ``/readyz``.

    A check still running from an earlier probe is not started again: the new probe waits on
    the same run (so a hung check holds one thread, not one per probe). With no checks
    registered the worker counts as ready: register them before the server starts.
    """

    def __init__(self, *, timeout_seconds: float = 3.0, max_threads: int = 8) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}")
        self.timeout_seconds = timeout_seconds
        self._checks: dict[str, ReadinessCheck] = {}
        self._running: dict[str, Future[tuple[bool, str, float]]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="readyz-check")

    def add(self, name: str, check: ReadinessCheck) -> None:
        """Register (or replace) the check called ``name``."""
        with self._lock:
            self._checks[name] = check

    def evaluate(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """``(ready, {name: {"ok", "detail", "seconds"}})``, within about ``timeout_seconds``."""
        started = time.monotonic()
        with self._lock:
            futures = {name: self._start(name, check) for name, check in self._checks.items()}
        wait_for_futures(futures.values(), timeout=self.timeout_seconds)
        checks: dict[str, dict[str, Any]] = {}
        for name, future in sorted(futures.items()):
            if future.done():
                ok, detail, seconds = future.result()
            else:
                ok, detail = False, f"no answer within {self.timeout_seconds:g} s"
                seconds = time.monotonic() - started
            checks[name] = {"ok": ok, "detail": detail, "seconds": round(seconds, 3)}
        return all(check["ok"] for check in checks.values()), checks

    def close(self) -> None:
        """Stop the check threads (a hung check is abandoned, not awaited)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _start(self, name: str, check: ReadinessCheck) -> Future[tuple[bool, str, float]]:
        """The running evaluation of ``check``, started now unless one is running; lock held."""
        running = self._running.get(name)
        if running is not None and not running.done():
            return running
        future = self._pool.submit(_run_check, check)
        self._running[name] = future
        return future


class OpsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` from a daemon thread.

    ``port=0`` binds an ephemeral port (tests); ``port`` tells the bound one after ``start()``.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        liveness: Liveness | None = None,
        readiness: Readiness | None = None,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must lie within 0-65535, got {port}")
        self.registry = registry
        self.liveness = liveness if liveness is not None else Liveness()
        self.readiness = readiness if readiness is not None else Readiness()
        self.host = host
        self._port = port
        self._redact = redact if redact is not None else (lambda text: text)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port served (the bound one once started, which matters for port 0)."""
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def url(self) -> str:
        """Base URL for clients on this machine."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}"

    def start(self) -> OpsServer:
        """Bind and serve; OSError (e.g. the port is taken) is raised here, not in the thread."""
        if self._server is not None:
            return self
        server = _Server((self.host, self._port), self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="ops-server",
            daemon=True,
        )
        self._thread.start()
        log.info("operations endpoint on %s (/metrics, /healthz, /readyz)", self.url)
        return self

    def close(self) -> None:
        """Stop serving, release the port and the readiness threads."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.readiness.close()

    def __enter__(self) -> OpsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- the routes (called from the request threads) ----------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """Status code and body of ``/healthz``."""
        alive, body = self.liveness.status()
        if "detail" in body:
            body["detail"] = self._clean(body["detail"])
        return (HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE), body

    def ready(self) -> tuple[int, dict[str, Any]]:
        """Status code and body of ``/readyz``."""
        ready, checks = self.readiness.evaluate()
        for result in checks.values():
            result["detail"] = self._clean(result["detail"])
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return status, {"ready": ready, "checks": checks}

    def _clean(self, detail: object) -> str:
        text = " ".join(str(detail).split())
        text = self._redact(text)
        return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


class _Server(ThreadingHTTPServer):
    """One thread per request, daemon threads, IPv6 when the host is an IPv6 address."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], ops: OpsServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.ops = ops
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a client may take to send its request
    server_version = "stylelicense-ops"

    def do_GET(self) -> None:  # pylint: disable=invalid-name
        """Route the request."""
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        ops = self.server.ops
        try:
            if path == "/metrics":
                self._metrics(ops.registry)
            elif path == "/healthz":
                self._json(*ops.health())
            elif path == "/readyz":
                self._json(*ops.ready())
            elif path == "/":
                self._json(HTTPStatus.OK, {"endpoints": ["/metrics", "/healthz", "/readyz"]})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            log.debug("ops client went away during %s", path)
        except Exception:  # pylint: disable=broad-exception-caught
            log.exception("ops endpoint %s failed", path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def _metrics(self, registry: CollectorRegistry) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(registry)
        headers = {"Content-Type": content_type}
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self._send(HTTPStatus.OK, body, headers)

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body, sort_keys=True) + "\n").encode("utf-8")
        self._send(status, data, {"Content-Type": "application/json"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
        """Requests are logged at DEBUG: a scrape every 15 s is not news."""
        log.debug("ops %s %s", self.address_string(), format % args)


def _run_check(check: ReadinessCheck) -> tuple[bool, str, float]:
    """``(ok, detail, seconds)`` of one run; an exception or a malformed answer is a failure."""
    began = time.monotonic()
    try:
        value: object = check()
    except Exception as exc:  # pylint: disable=broad-exception-caught
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    else:
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], bool):
            ok, detail = value[0], str(value[1])
        else:
            ok, detail = False, f"the check returned {value!r:.60}, not (bool, str)"
    return ok, detail, time.monotonic() - began
