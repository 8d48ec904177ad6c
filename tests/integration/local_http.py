"""A ``ThreadingHTTPServer`` on a free local port, served from a daemon thread while entered:
the lifecycle every HTTP stand-in of the integration tests shares."""

from __future__ import annotations

import http.server
import threading
from types import TracebackType
from typing import Self


class LocalHttpServer:
    """Serves ``handler`` at ``endpoint_url`` between ``__enter__`` and ``__exit__``."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
