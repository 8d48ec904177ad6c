"""A tiny local HTTP server that plays Cloud Storage's XML API for PutObject and GetObject.

It keeps what the record store depends on, as Cloud Storage documents it (not verified against
Cloud Storage itself): every write makes a new object generation, named in the
``x-goog-generation`` answer header of PUT and GET; an upload is conditional only on
``x-goog-if-generation-match`` (``0``: the object must not exist; ``N``: its generation must be
``N``), checked and applied atomically, else 412 ``PreconditionFailed``; ``If-Match`` and
``If-None-Match`` on an upload are ignored (documented for retrieval only), so a store relying on
them is unconditional here as it would be there. An ``aws-chunked`` upload is refused (400), as
the XML API takes plain bodies. Other requests get 501.

``client()`` builds a client with ``make_s3_client`` for Cloud Storage's real endpoint
(``https://storage.googleapis.com``, so every GCS rule of the client applies) and sends its
signed requests here instead, over plain HTTP::

    with GcsStandIn() as gcs:
        store = S3RecordStore(client=gcs.client(), bucket="b", prefix="records/")
"""

from __future__ import annotations

import hashlib
import http.server
import itertools
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from adapters.s3 import make_s3_client
from tests.integration.local_http import LocalHttpServer

GCS_ENDPOINT = "https://storage.googleapis.com"
GENERATION_MATCH = "x-goog-if-generation-match"


@dataclass(frozen=True)
class StoredObject:
    """One object's bytes and generation."""

    data: bytes
    generation: int


@dataclass(frozen=True)
class SeenRequest:
    """A request as it arrived (header names in lower case) and the status it was answered."""

    method: str
    path: str
    headers: dict[str, str]
    status: int


class GcsStandIn(LocalHttpServer):
    """Cloud Storage's XML API for PUT and GET of objects, on ``127.0.0.1`` (a free port).

    ``objects`` maps ``(bucket, key)`` to what is stored; ``requests`` lists what arrived.
    ``hold_puts``: when set, every PUT waits on this barrier before its check, so racing uploads
    are all in flight at once.
    """

    def __init__(self, *, hold_puts: threading.Barrier | None = None) -> None:
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.requests: list[SeenRequest] = []
        self.hold_puts = hold_puts
        self._lock = threading.Lock()
        self._generations = itertools.count(1_700_000_000_000_001)
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            """Answers one request on behalf of the stand-in."""

            protocol_version = "HTTP/1.1"  # answers ``Expect: 100-continue`` at once

            def do_PUT(self) -> None:  # pylint: disable=invalid-name
                """An upload, conditional on ``x-goog-if-generation-match`` only."""
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                stand_in.answer(self, stand_in.put(self, body))

            def do_GET(self) -> None:  # pylint: disable=invalid-name
                """A download, naming the generation."""
                stand_in.answer(self, stand_in.get(self))

            def do_HEAD(self) -> None:  # pylint: disable=invalid-name
                """Not played here."""
                stand_in.answer(self, _error(501, "NotImplemented"))

            do_POST = do_DELETE = do_HEAD

            def log_message(self, *_: Any) -> None:  # pylint: disable=arguments-differ
                """Quiet: ``requests`` says what happened."""

        super().__init__(Handler)

    def client(self) -> Any:
        """A client for Cloud Storage's endpoint whose requests come here instead."""
        client = make_s3_client(
            endpoint_url=GCS_ENDPOINT,
            region="auto",
            access_key_id="GOOG1EXAMPLE",
            secret_access_key="secret",
            max_attempts=1,
        )

        def reroute(request: Any, **_: Any) -> None:
            request.url = self.endpoint_url + request.url[len(GCS_ENDPOINT) :]

        client.meta.events.register("before-send.s3", reroute)
        return client

    # Answering (on the handler threads).

    def put(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> _Answer:
        """Store the body when the generation precondition (if any) holds."""
        headers = {name.lower(): value for name, value in handler.headers.items()}
        if "aws-chunked" in headers.get("content-encoding", ""):
            return self._seen(handler, _error(400, "InvalidArgument"))
        if self.hold_puts is not None:
            self.hold_puts.wait(10)
        name = _object_name(handler.path)
        condition = headers.get(GENERATION_MATCH)
        with self._lock:  # the check and the write are one step, as in Cloud Storage
            current = self.objects.get(name)
            held = 0 if current is None else current.generation
            if condition is not None and (not condition.isdigit() or int(condition) != held):
                answer = _error(412, "PreconditionFailed")
            else:
                stored = StoredObject(data=body, generation=next(self._generations))
                self.objects[name] = stored
                answer = _Answer(200, b"", _object_headers(stored))
        return self._seen(handler, answer)

    def get(self, handler: http.server.BaseHTTPRequestHandler) -> _Answer:
        """The object's bytes and generation, or 404 ``NoSuchKey``."""
        with self._lock:
            stored = self.objects.get(_object_name(handler.path))
        if stored is None:
            return self._seen(handler, _error(404, "NoSuchKey"))
        return self._seen(handler, _Answer(200, stored.data, _object_headers(stored)))

    def _seen(self, handler: http.server.BaseHTTPRequestHandler, answer: _Answer) -> _Answer:
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self._lock:
            self.requests.append(SeenRequest(handler.command, handler.path, headers, answer.status))
        return answer

    @staticmethod
    def answer(handler: http.server.BaseHTTPRequestHandler, answer: _Answer) -> None:
        """Write the answer."""
        handler.send_response(answer.status)
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(answer.body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(answer.body)


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    headers: dict[str, str]


def _object_name(path: str) -> tuple[str, str]:
    """``(bucket, key)`` of a path-style request path."""
    bucket, _, key = unquote(urlsplit(path).path).lstrip("/").partition("/")
    return bucket, key


def _object_headers(stored: StoredObject) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        # Like Cloud Storage's ETag of a simple upload: the MD5 of the bytes, not a version.
        "ETag": f'"{hashlib.md5(stored.data, usedforsecurity=False).hexdigest()}"',
        "x-goog-generation": str(stored.generation),
        "x-goog-metageneration": "1",
    }


def _error(status: int, code: str) -> _Answer:
    body = (
        "<?xml version='1.0' encoding='UTF-8'?>"
        f"<Error><Code>{code}</Code><Message>{code}</Message></Error>"
    ).encode()
    return _Answer(status, body, {"Content-Type": "application/xml"})
