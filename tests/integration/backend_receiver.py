"""A real HTTP server that plays the backend's webhook endpoints (docs/contract.md, "Webhooks")
in tests.

It enforces the backend's rules and records every request::

    with BackendReceiver(token="t") as backend:
        notifier = HttpNotifier(base_url=backend.base_url, token="t")
        notifier.completed(7, "https://cdn/7.png", {"seed": 1})
        [request] = backend.of_kind("complete")
        assert request.payload["generation_id"] == 7

Answers, in this order: 404 for an unknown path, 405 for a wrong method, 401 for a missing or
wrong bearer token, 403 for a wrong ``X-Request-Source``, 415 for a body that is not declared as
JSON, 401 for a bad Standard Webhooks signature (only when ``signing_secret`` is given), 400 for a
body that is not a JSON object or misses a field, 404 for a generation id listed as unknown or,
once generations are registered (``generations=`` or ``register``), for one not registered, and
200 ``{"success": true}`` otherwise. Failures injected with ``fail_next`` (the next N calls) or
``fail_for`` (a while) and delays set with ``set_delay`` come before all of these, like an outage
in front of the real backend or a view whose transaction rolls back: they change no state. An
injected failure with ``applied=True`` is a gateway that lost the view's answer instead: the call
goes through the rules and is applied as usual, then answered with the injected status.

It also holds what the real backend's views store, per generation (``state``)::

    progress  -> the stored progress JSON is REPLACED by the call's ``progress``
    complete  -> status "completed", ``result_url`` set, ``metadata`` MERGED into the progress JSON
    failed    -> status "failed", and the user's tokens REFUNDED on every call, whatever the
                 status was (``refunds`` counts them): a second ``failed`` refunds twice

A call is applied when it is answered, after any delay: a client that timed out waiting has still
had its call applied, as with a backend that committed before the answer was lost.

Every accessor is thread-safe. Requests are recorded when answered and listed in arrival order.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import urlsplit

DEFAULT_TOKEN = "test-internal-token"
REQUEST_SOURCE = "inference-server"
PATHS = MappingProxyType(
    {
        "/api/webhooks/inference/progress": "progress",
        "/api/webhooks/inference/complete": "complete",
        "/api/webhooks/inference/failed": "failed",
    }
)
"""The backend's webhook paths and the kind of each."""
METHODS = MappingProxyType({"progress": "PATCH", "complete": "POST", "failed": "POST"})
"""The only method each kind accepts."""
REQUIRED_FIELDS = MappingProxyType(
    {
        "progress": ("generation_id", "progress"),
        "complete": ("generation_id", "result_url", "metadata"),
        "failed": ("generation_id", "error_message", "error_code", "retry_count"),
    }
)
"""Top-level fields each kind must carry (400 otherwise)."""
PROGRESS_FIELDS = ("current_step", "total_steps", "progress_percent")
"""Fields the ``progress`` object must carry."""
SIGNATURE_TOLERANCE_SECONDS = 300
"""How far ``webhook-timestamp`` may be from now (Standard Webhooks' recommendation)."""


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived, and the status it was answered with."""

    seq: int
    """Arrival order, from 0."""
    method: str
    path: str
    kind: str | None
    """``progress``, ``complete``, ``failed``, or None for an unknown path."""
    headers: Mapping[str, str]
    """Header names in lower case."""
    body: bytes
    payload: Any
    """The parsed JSON body, or None when the body is not JSON."""
    status: int
    arrived_at: float
    """``time.monotonic()`` when the request line was read."""
    answered_at: float
    """``time.monotonic()`` just before the answer was written."""

    def header(self, name: str) -> str | None:
        """A header's value, by case-insensitive name."""
        return self.headers.get(name.lower())

    @property
    def generation_id(self) -> Any:
        """``payload["generation_id"]`` when present."""
        return self.payload.get("generation_id") if isinstance(self.payload, dict) else None


PENDING = "pending"
COMPLETED = "completed"
FAILED = "failed"
"""The statuses a generation can have here (the backend has more; these are the worker's)."""


@dataclass(frozen=True)
class GenerationState:
    """What the backend holds for one generation after the calls applied so far."""

    generation_id: int
    status: str
    """``pending``, ``completed`` or ``failed``."""
    progress: Mapping[str, Any] | None
    """The stored progress JSON: the last progress call's object, with completion metadata merged
    in; None before either arrived."""
    result_url: str | None
    refunds: int
    """How many times the user's tokens were refunded (one per applied ``failed`` call)."""
    error_code: str | None
    error_message: str | None


@dataclass
class _Generation:
    status: str = PENDING
    progress: dict[str, Any] | None = None
    result_url: str | None = None
    refunds: int = 0
    error_code: str | None = None
    error_message: str | None = None

    def frozen(self, generation_id: int) -> GenerationState:
        """An immutable copy, for callers outside the lock."""
        progress = None if self.progress is None else MappingProxyType(dict(self.progress))
        return GenerationState(
            generation_id=generation_id,
            status=self.status,
            progress=progress,
            result_url=self.result_url,
            refunds=self.refunds,
            error_code=self.error_code,
            error_message=self.error_message,
        )


@dataclass
class _FailureRule:
    remaining: int | None
    status: int
    kind: str | None
    headers: dict[str, str]
    body: bytes
    until: float | None = None
    """``time.monotonic()`` after which the rule no longer answers; None: no time limit."""
    applied: bool = False
    """Whether the call is applied (when the rules accept it) before the injected answer."""

    def matches(self, kind: str | None, now: float) -> bool:
        """Whether the rule answers a request to ``kind`` arriving at ``now``."""
        if self.kind not in (None, kind) or self.remaining == 0:
            return False
        return self.until is None or now < self.until


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    applied: bool = False
    """For an injected answer: the call is applied first, as when no rule answered."""


def verify_signature(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_seconds: float = SIGNATURE_TOLERANCE_SECONDS,
) -> bool:
    """Whether ``headers`` (lower-case names) carry a valid Standard Webhooks signature of ``body``.

    The key is base64-decoded after a ``whsec_`` prefix, else the secret's UTF-8 bytes. The
    timestamp must lie within ``tolerance_seconds`` of ``now`` (default: the wall clock).
    """
    message_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not message_id or not timestamp or not signatures or not timestamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_seconds:
        return False
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            return False
    else:
        key = secret.encode("utf-8")
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    expected = base64.b64encode(digest).decode("ascii")
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


class BackendReceiver:
    """The backend's webhook endpoints on ``127.0.0.1`` (a free port), served by threads.

    ``token``: the accepted bearer token (see ``set_token``). ``signing_secret``: when given,
    unsigned or badly signed requests get 401. ``unknown_generation_ids``: ids answered with 404.
    ``generations``: the generations that exist (pending); when given, or once ``register`` was
    called, any other id is answered with 404 as the real backend does; by default every id is
    accepted and its state created on its first applied call. ``delay_seconds``: wait before
    answering any request (see ``set_delay``). Use as a context manager, or ``start()`` and
    ``stop()``.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        signing_secret: str | None = None,
        unknown_generation_ids: Iterable[int] = (),
        generations: Iterable[int] | None = None,
        delay_seconds: float = 0.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.token = token
        self.signing_secret = signing_secret
        self.unknown_generation_ids = frozenset(unknown_generation_ids)
        self._host = host
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._delays: dict[str | None, float] = {None: delay_seconds}
        self._rules: list[_FailureRule] = []
        self._records: list[RecordedRequest] = []
        self._arrivals: dict[str | None, int] = {}
        self._seq = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._generations: dict[int, _Generation] = {}
        self._registered_only = generations is not None
        for generation_id in generations or ():
            self._generations[generation_id] = _Generation()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle.

    def start(self) -> BackendReceiver:
        """Bind a free port and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._server = _Server((self._host, 0), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="backend-receiver",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> BackendReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port served (after ``start``)."""
        if self._server is None:
            raise RuntimeError("the receiver is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``, the value for BACKEND_API_URL."""
        return f"http://{self._host}:{self.port}"

    # Behaviour.

    def fail_next(
        self,
        count: int | None,
        status: int = 503,
        *,
        kind: str | None = None,
        retry_after: str | float | None = None,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        applied: bool = False,
    ) -> None:
        """Answer the next ``count`` requests (None: all, until ``clear``) with ``status``.

        ``kind`` limits the rule to one endpoint; ``retry_after`` adds a ``Retry-After`` header
        (seconds or an HTTP date); ``body`` replaces the default JSON error body. Rules queue up:
        the first one with calls left that matches a request answers it. ``applied``: the view
        runs and commits first (when its rules accept the call), then a gateway in front answers
        ``status`` instead of the view's answer (``fail_next(1, 502, applied=True)``: nginx's
        502 after the refund was committed).
        """
        self._add_rule(
            count=count,
            until=None,
            status=status,
            kind=kind,
            retry_after=retry_after,
            body=body,
            headers=headers,
            applied=applied,
        )

    def fail_for(
        self,
        seconds: float,
        status: int = 503,
        *,
        kind: str | None = None,
        retry_after: str | float | None = None,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer every request (to ``kind``, or all) with ``status`` for the next ``seconds``.

        ``fail_for(2, 500, kind="failed")``: the failed view raising at commit for a while (the
        refund rolls back, nothing changes); ``fail_for(5, 401)``: the token rotated on one side
        for a while. Otherwise like ``fail_next``.
        """
        if seconds < 0:
            raise ValueError(f"seconds must not be negative, got {seconds}")
        until = time.monotonic() + seconds
        self._add_rule(
            count=None,
            until=until,
            status=status,
            kind=kind,
            retry_after=retry_after,
            body=body,
            headers=headers,
        )

    def set_token(self, token: str) -> None:
        """Accept ``token`` from now on, refusing the old one (rotated on the backend's side)."""
        with self._lock:
            self.token = token

    def register(self, *generation_ids: int) -> None:
        """Create these generations (pending); from now on any other id is answered with 404."""
        with self._lock:
            self._registered_only = True
            for generation_id in generation_ids:
                self._generations.setdefault(generation_id, _Generation())

    def _add_rule(
        self,
        *,
        count: int | None,
        until: float | None,
        status: int,
        kind: str | None,
        retry_after: str | float | None,
        body: bytes | str | None,
        headers: Mapping[str, str] | None,
        applied: bool = False,
    ) -> None:
        if kind is not None and kind not in METHODS:
            raise ValueError(f"kind must be one of {sorted(METHODS)}, got {kind!r}")
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = str(retry_after)
        if body is None:
            body = json.dumps({"success": False, "error": f"injected {status}"})
        data = body.encode("utf-8") if isinstance(body, str) else body
        with self._lock:
            self._rules.append(_FailureRule(count, status, kind, extra, data, until, applied))

    def set_delay(self, seconds: float, *, kind: str | None = None) -> None:
        """Wait ``seconds`` before answering (one kind, or every request when ``kind`` is None)."""
        with self._lock:
            self._delays[kind] = seconds

    def clear(self) -> None:
        """Forget recorded requests, failure rules and delays (not what the generations hold)."""
        with self._lock:
            self._records.clear()
            self._rules.clear()
            self._arrivals.clear()
            self._delays = {None: 0.0}
            self._max_in_flight = self._in_flight

    # What the backend holds.

    def state(self, generation_id: int) -> GenerationState | None:
        """What the backend holds for a generation, or None when it does not exist (here)."""
        with self._lock:
            generation = self._generations.get(generation_id)
            return None if generation is None else generation.frozen(generation_id)

    def wait_for_state(
        self,
        generation_id: int,
        predicate: Callable[[GenerationState | None], bool],
        *,
        timeout: float = 5.0,
    ) -> GenerationState | None:
        """Block until ``predicate(state(generation_id))`` holds; that state, or TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                generation = self._generations.get(generation_id)
                current = None if generation is None else generation.frozen(generation_id)
                if predicate(current):
                    return current
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"generation {generation_id} not as expected within {timeout} s: {current}"
                    )
                self._changed.wait(left)

    # What happened.

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every answered request, in arrival order (a copy)."""
        with self._lock:
            return sorted(self._records, key=lambda r: r.seq)

    def of_kind(self, kind: str) -> list[RecordedRequest]:
        """Answered requests to one endpoint (``progress``, ``complete``, ``failed``)."""
        return [r for r in self.requests if r.kind == kind]

    def for_generation(self, generation_id: int) -> list[RecordedRequest]:
        """Answered requests about one generation, in arrival order."""
        return [r for r in self.requests if r.generation_id == generation_id]

    def arrived(self, kind: str | None = None) -> int:
        """Requests that arrived (answered or not), to one endpoint or in all."""
        with self._lock:
            if kind is None:
                return sum(self._arrivals.values())
            return self._arrivals.get(kind, 0)

    @property
    def max_in_flight(self) -> int:
        """The most requests that were being answered at the same time."""
        with self._lock:
            return self._max_in_flight

    def wait_for(
        self,
        predicate: Callable[[list[RecordedRequest]], bool],
        *,
        timeout: float = 5.0,
    ) -> list[RecordedRequest]:
        """Block until ``predicate(requests)`` holds; the requests, or TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                records = sorted(self._records, key=lambda r: r.seq)
                if predicate(records):
                    return records
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met within {timeout} s: {len(records)} seen")
                self._changed.wait(left)

    def verify(self, request: RecordedRequest) -> bool:
        """Whether a recorded request carries a valid signature with this receiver's secret."""
        if self.signing_secret is None:
            raise ValueError("the receiver has no signing_secret")
        return verify_signature(self.signing_secret, request.headers, request.body)

    # Answering (called by the handler threads).

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> _Answer:
        """Decide the answer to one request and record it; runs on the request's thread."""
        arrived_at = time.monotonic()
        path = urlsplit(target).path
        kind = PATHS.get(path)
        with self._lock:
            seq = self._seq
            self._seq += 1
            self._arrivals[kind] = self._arrivals.get(kind, 0) + 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            delay = self._delays.get(kind, self._delays.get(None, 0.0))
        try:
            if delay > 0:
                time.sleep(delay)
            payload = _parse_json(body)
            injected = self._injected_failure(kind)
            answer = injected or self._check(method, kind, headers, body)
            if injected is not None and injected.applied:
                # A gateway lost the view's answer: the view ran, and committed if it accepted.
                if self._check(method, kind, headers, body).status == 200 and kind is not None:
                    self._apply(kind, payload)
            elif answer.status == 200 and kind is not None:
                self._apply(kind, payload)
            record = RecordedRequest(
                seq=seq,
                method=method,
                path=path,
                kind=kind,
                headers=MappingProxyType(dict(headers)),
                body=body,
                payload=payload,
                status=answer.status,
                arrived_at=arrived_at,
                answered_at=time.monotonic(),
            )
            with self._changed:
                self._records.append(record)
                self._changed.notify_all()
            return answer
        finally:
            with self._lock:
                self._in_flight -= 1

    def _apply(self, kind: str, payload: dict[str, Any]) -> None:
        """Store what the backend's view stores for an accepted call."""
        generation_id = payload["generation_id"]
        with self._lock:
            generation = self._generations.setdefault(generation_id, _Generation())
            if kind == "progress":
                generation.progress = dict(payload["progress"])
            elif kind == "complete":
                generation.status = COMPLETED
                generation.result_url = payload["result_url"]
                generation.progress = {**(generation.progress or {}), **payload["metadata"]}
            else:
                generation.status = FAILED
                generation.refunds += 1
                generation.error_code = payload["error_code"]
                generation.error_message = payload["error_message"]

    def _injected_failure(self, kind: str | None) -> _Answer | None:
        now = time.monotonic()
        with self._lock:
            for rule in self._rules:
                if not rule.matches(kind, now):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                return _Answer(rule.status, rule.body, dict(rule.headers), rule.applied)
        return None

    def _check(
        self, method: str, kind: str | None, headers: Mapping[str, str], body: bytes
    ) -> _Answer:
        """The backend's own rules; the first one broken decides the answer."""
        if kind is None:
            return _error(404, "not found")
        if method != METHODS[kind]:
            return _error(405, f"method {method} not allowed", {"Allow": METHODS[kind]})
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        payload = _parse_json(body)
        problem = _invalid_field(kind, payload)
        with self._lock:
            token = self.token
            unknown = problem is None and self._unknown(payload["generation_id"])
        refusals = (
            (headers.get("authorization") != f"Bearer {token}", 401, "bad or missing token"),
            (headers.get("x-request-source") != REQUEST_SOURCE, 403, "invalid request source"),
            (media_type != "application/json", 415, f"unsupported media type {media_type!r}"),
            (not self._signed_correctly(headers, body), 401, "invalid webhook signature"),
            (problem is not None, 400, str(problem)),
            (unknown, 404, "generation not found"),
        )
        for refused, status, message in refusals:
            if refused:
                return _error(status, message)
        return _Answer(200, json.dumps({"success": True}).encode())

    def _unknown(self, generation_id: int) -> bool:
        """Whether the backend answers 404 for this id; lock held."""
        if generation_id in self.unknown_generation_ids:
            return True
        return self._registered_only and generation_id not in self._generations

    def _signed_correctly(self, headers: Mapping[str, str], body: bytes) -> bool:
        if self.signing_secret is None:
            return True
        return verify_signature(self.signing_secret, headers, body)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def _invalid_field(kind: str, payload: Any) -> str | None:
    """What makes the payload invalid (missing or mistyped fields), or None."""
    if not isinstance(payload, dict):
        return "the body must be a JSON object"
    problems = [f"missing field {name!r}" for name in REQUIRED_FIELDS[kind] if name not in payload]
    generation_id = payload.get("generation_id")
    if "generation_id" in payload and (
        not isinstance(generation_id, int) or isinstance(generation_id, bool)
    ):
        problems.append("generation_id must be an integer")
    progress = payload.get("progress")
    if kind == "progress" and "progress" in payload:
        if isinstance(progress, dict):
            problems += [
                f"missing field 'progress.{n}'" for n in PROGRESS_FIELDS if n not in progress
            ]
        else:
            problems.append("progress must be an object")
    if kind == "complete" and "metadata" in payload and not isinstance(payload["metadata"], dict):
        problems.append("metadata must be an object")
    return "; ".join(problems) or None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(status, json.dumps({"success": False, "error": message}).encode(), headers or {})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], receiver: BackendReceiver) -> None:
        self.receiver = receiver
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls
    server: _Server

    def do_GET(self) -> None:  # pylint: disable=invalid-name
        """Any method goes through the same rules."""
        self._answer()

    do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
        """Quiet: the receiver's records say what happened."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        answer = self.server.receiver.handle(self.command, self.path, headers, body)
        try:
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
