"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on one small HTTP server.

- ``/metrics``: the Prometheus exposition of a registry (OpenMetrics when the scraper asks for
  it, gzip when it accepts it).
- ``/healthz``: 200 while ``Liveness`` says the worker loop is alive, else 503.
- ``/readyz``: 200 when every check of ``Readiness`` passes, else 503; each check shows only
  a registered phrase or a fixed one (``app.probes``).

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
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from app.probes import Liveness, Readiness

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


class OpsServerError(OSError):
    """The operations endpoint cannot be served at its address (METRICS_HOST:METRICS_PORT)."""


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
