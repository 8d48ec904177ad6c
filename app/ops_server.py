"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on one small HTTP server.

- ``/metrics``: the Prometheus exposition of a registry (OpenMetrics when the scraper asks for
  it, gzip when it accepts it).
- ``/healthz`` (liveness): 200 while the worker loop keeps calling ``Liveness.heartbeat()``;
  503 once it has been silent for longer than ``stale_after_seconds`` (a stuck loop: restart
  the process). Until the first beat, ``startup_grace_seconds`` covers the model's load.
- ``/readyz`` (readiness): 200 only when every registered check passes (model loaded, broker
  connected, storage reachable...). Checks run concurrently, each within a time limit; a check
  that raises or does not answer in time counts as failing.

The endpoint is reachable by anyone on the network, so ``/readyz`` says little: each check shows
one of the short phrases registered with it (``Readiness.add(..., phrases=...)``), else a fixed
one (``ok``, ``failing``, ``check failed``, ``no answer in time``); never exception text, URLs,
hosts or bucket names. The full detail goes to the log, redacted, once per change of a check's
state rather than on every probe.

Built on the standard library's ``HTTPServer`` on a daemon thread: three read-only routes with
JSON bodies and custom status codes need no framework. A fixed number of handler threads serve
requests (a slow readiness check never delays a scrape); a connection arriving while all are
busy is answered 503 at once, so a scraper storm cannot exhaust the worker's threads. Starting
on an address in use raises ``OpsServerError`` naming METRICS_PORT; ``close()`` stops cleanly.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = logging.getLogger(__name__)

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 9100
HANDLER_THREADS = 8
"""Requests served at once; a connection beyond them is answered 503 at once."""
REQUEST_READ_SECONDS = 5
"""How long a client may take to send its request before its handler thread is freed."""
BUSY_WAIT_SECONDS = 0.05
"""How long a refused connection's request may take to arrive, so the 503 is read, not reset."""
DETAIL_CHARS = 300
"""How much of a liveness detail a response carries."""
PHRASE_CHARS = 40
"""The longest phrase a readiness check may register to show in ``/readyz``."""
PASSING = "ok"
FAILING = "failing"
CHECK_FAILED = "check failed"
NO_ANSWER = "no answer in time"
"""What ``/readyz`` shows for a check whose detail is not one of its registered phrases, for one
that raised, and for one that did not answer within the time limit."""

ReadinessCheck = Callable[[], tuple[bool, str]]
"""A readiness check: ``(ok, detail)``; ``detail`` says what is wrong (or what is fine).

``/readyz`` shows ``detail`` only when it is one of the phrases registered with the check; the
full ``detail`` goes to the log."""


class OpsServerError(OSError):
    """The operations endpoint cannot be served at its address (METRICS_HOST:METRICS_PORT)."""


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


@dataclass(frozen=True)
class _Run:
    """One run of a check: its answer and, for the log, the full detail and any exception."""

    ok: bool
    detail: str
    seconds: float
    error: BaseException | None = None
    answered: bool = True


class Readiness:
    """Named readiness checks, evaluated together for ``/readyz``.

    A check still running from an earlier probe is not started again: the new probe waits on
    the same run (so a hung check holds one thread, not one per probe). With no checks
    registered the worker counts as ready: register them before the server starts.

    What a probe shows per check is ``{"ok", "detail", "seconds"}`` where ``detail`` is one of
    the check's registered ``phrases`` or a fixed phrase (``PASSING``, ``FAILING``,
    ``CHECK_FAILED``, ``NO_ANSWER``). The full detail, passed through ``redact``, is logged when
    a check's shown state changes (WARNING when it starts failing, INFO when it passes), with
    the traceback of a check that raised.
    """

    def __init__(
        self,
        *,
        timeout_seconds: float = 3.0,
        max_threads: int = 8,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}")
        self.timeout_seconds = timeout_seconds
        self._redact = redact if redact is not None else (lambda text: text)
        self._checks: dict[str, ReadinessCheck] = {}
        self._phrases: dict[str, frozenset[str]] = {}
        self._shown: dict[str, tuple[bool, str]] = {}
        self._running: dict[str, Future[_Run]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="readyz-check")

    def add(self, name: str, check: ReadinessCheck, *, phrases: Iterable[str] = ()) -> None:
        """Register (or replace) the check called ``name``.

        ``phrases``: the details the check returns that ``/readyz`` may show as they are (short
        fixed words such as "loaded", "loading", "disconnected"). A detail that starts with one
        of them and ": " shows that phrase alone ("unreachable: AccessDenied on bucket x" shows
        "unreachable"; the log gets it all). Any other detail shows as ``ok``/``failing``. A
        phrase must be one line of at most ``PHRASE_CHARS`` characters.
        """
        allowed = frozenset(phrases)
        for phrase in allowed:
            if not phrase or len(phrase) > PHRASE_CHARS or not phrase.isprintable():
                raise ValueError(
                    f"readiness phrase for {name!r} must be one printable line of 1-{PHRASE_CHARS}"
                    f" characters, got {phrase!r:.60}"
                )
        with self._lock:
            self._checks[name] = check
            self._phrases[name] = allowed
            self._shown.pop(name, None)

    def evaluate(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """``(ready, {name: {"ok", "detail", "seconds"}})``, within about ``timeout_seconds``."""
        started = time.monotonic()
        with self._lock:
            futures = {name: self._start(name, check) for name, check in self._checks.items()}
        wait_for_futures(futures.values(), timeout=self.timeout_seconds)
        checks: dict[str, dict[str, Any]] = {}
        for name, future in sorted(futures.items()):
            if future.done():
                run = future.result()
            else:
                run = _Run(
                    ok=False,
                    detail=f"no answer within {self.timeout_seconds:g} s",
                    seconds=time.monotonic() - started,
                    answered=False,
                )
            shown = self._show(name, run)
            self._log_change(name, run, shown)
            checks[name] = {"ok": run.ok, "detail": shown, "seconds": round(run.seconds, 3)}
        return all(check["ok"] for check in checks.values()), checks

    def close(self) -> None:
        """Stop the check threads (a hung check is abandoned, not awaited)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _start(self, name: str, check: ReadinessCheck) -> Future[_Run]:
        """The running evaluation of ``check``, started now unless one is running; lock held."""
        running = self._running.get(name)
        if running is not None and not running.done():
            return running
        future = self._pool.submit(_run_check, check)
        self._running[name] = future
        return future

    def _show(self, name: str, run: _Run) -> str:
        """The phrase ``/readyz`` shows for a run: registered, or a fixed one."""
        if not run.answered:
            return NO_ANSWER
        if run.error is not None:
            return CHECK_FAILED
        with self._lock:
            allowed = self._phrases.get(name, frozenset())
        phrase = run.detail if run.detail in allowed else run.detail.partition(": ")[0]
        if phrase in allowed:
            return phrase
        return PASSING if run.ok else FAILING

    def _log_change(self, name: str, run: _Run, shown: str) -> None:
        """Log the full detail when the check's shown state changed since the last probe."""
        with self._lock:
            if self._shown.get(name) == (run.ok, shown):
                return
            self._shown[name] = (run.ok, shown)
        detail = self._redact(" ".join(run.detail.split()))
        if run.ok:
            log.info("readiness check %s passes: %s", name, detail)
            return
        error = run.error
        log.warning(
            "readiness check %s failing: %s",
            name,
            detail,
            exc_info=(type(error), error, error.__traceback__) if error is not None else None,
        )


class OpsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` from a daemon thread.

    ``port=0`` binds an ephemeral port (tests); ``port`` tells the bound one after ``start()``.
    ``handler_threads`` requests are served at once; more are answered 503 without a thread.
    ``redact`` is applied to everything a response says, as a second line of defence.
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
        handler_threads: int = HANDLER_THREADS,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must lie within 0-65535, got {port}")
        if handler_threads < 1:
            raise ValueError(f"handler_threads must be at least 1, got {handler_threads}")
        self.handler_threads = handler_threads
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
        """Bind and serve; ``OpsServerError`` (e.g. the port is taken) is raised here, not in
        the thread, as one line naming METRICS_PORT and the address."""
        if self._server is not None:
            return self
        try:
            server = _Server((self.host, self._port), self, handler_threads=self.handler_threads)
        except OSError as exc:
            error = OpsServerError(_bind_problem(self.host, self._port, exc))
            error.errno = exc.errno
            raise error from exc
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


class _Server(HTTPServer):
    """A fixed pool of handler threads; a connection finding none free is answered 503 at once.

    The accepting thread only queues a connection when a handler slot is free, so at most
    ``handler_threads`` connections are being served and no thread is created per connection.
    IPv6 when the host is an IPv6 address.
    """

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], ops: OpsServer, *, handler_threads: int) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.ops = ops
        self._slots = threading.BoundedSemaphore(handler_threads)
        self._accepted: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._handlers = [
            threading.Thread(target=self._serve_accepted, name=f"ops-handler-{i}", daemon=True)
            for i in range(handler_threads)
        ]
        super().__init__(address, _Handler)  # binds: may raise before any thread starts
        for thread in self._handlers:
            thread.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to a free handler thread, or refuse it with 503 at once."""
        # Released by the handler thread once it has served the connection, not in a block.
        if not self._slots.acquire(blocking=False):  # pylint: disable=consider-using-with
            self._refuse(request)
            return
        self._accepted.put((request, client_address))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Through logging (the standard one prints a traceback to stderr)."""
        log.debug("ops request from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        """Close the socket and let the handler threads finish what they hold, then end."""
        super().server_close()
        for _ in self._handlers:
            self._accepted.put(None)

    def _serve_accepted(self) -> None:
        while True:
            item = self._accepted.get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:  # pylint: disable=broad-exception-caught
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 on the accepting thread, after reading what has arrived (closing a socket with
        unread data resets it, and the client would see a reset instead of the 503)."""
        try:
            readable, _, _ = select.select([request], [], [], BUSY_WAIT_SECONDS)
            if readable:
                request.setblocking(False)
                try:
                    for _ in range(4):
                        if not request.recv(65536):
                            break
                except OSError:
                    pass
            request.settimeout(BUSY_WAIT_SECONDS * 4)
            request.sendall(_BUSY_RESPONSE)
        except OSError:
            log.debug("ops: a refused client went away")
        finally:
            self.shutdown_request(request)
        log.debug("ops: all %d handler threads busy, answered 503", len(self._handlers))


_BUSY_BODY = b'{"error": "busy"}\n'
_BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n"
    b"Retry-After: 1\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n" + _BUSY_BODY
)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_READ_SECONDS
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


def _run_check(check: ReadinessCheck) -> _Run:
    """One run; an exception or a malformed answer is a failure (kept for the log)."""
    began = time.monotonic()
    try:
        value: object = check()
    except Exception as exc:  # pylint: disable=broad-exception-caught
        return _Run(
            ok=False,
            detail=f"{type(exc).__name__}: {exc}",
            seconds=time.monotonic() - began,
            error=exc,
        )
    seconds = time.monotonic() - began
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], bool):
        return _Run(ok=value[0], detail=str(value[1]), seconds=seconds)
    malformed = TypeError(f"the check returned {value!r:.60}, not (bool, str)")
    return _Run(ok=False, detail=str(malformed), seconds=seconds, error=malformed)


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    """One line for an operator: which setting, which address, what to do."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"METRICS_PORT {port}: {address} is already in use, so /metrics, /healthz and"
            " /readyz cannot be served; each worker on a host needs its own METRICS_PORT"
        )
    reason = exc.strerror or type(exc).__name__
    return (
        f"METRICS_PORT {port} (METRICS_HOST {host}): cannot serve /metrics, /healthz and /readyz"
        f" on {address}: {reason}; each worker on a host needs its own METRICS_PORT"
    )
