"""Whether the backend takes the worker's credentials: readiness and intake follow it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackendAccess:
    """Whether the backend takes the worker's credentials, as the last outcome call or probe said.

    A refusal (401/403) is a misconfiguration: readiness turns red with the reason, and intake
    hands deliveries back without running them until a probe (at most every ``probe_seconds``)
    or an outcome call is accepted again. Thread-safe.
    """

    def __init__(self, *, probe_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self._probe_seconds = probe_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._refusal: str | None = None
        self._last_probe = float("-inf")

    @property
    def refusal(self) -> str | None:
        """Why the backend refuses the worker's credentials, or None while it takes them."""
        with self._lock:
            return self._refusal

    def refused(self, reason: str) -> None:
        """The backend answered 401/403."""
        with self._lock:
            first = self._refusal is None
            self._refusal = reason
            self._last_probe = self._clock()
        if first:
            log.error(
                "the backend refuses the worker's credentials (%s): set INTERNAL_API_TOKEN to the"
                " backend's token; messages go back to the queue until it is accepted",
                reason,
            )

    def accepted(self) -> None:
        """An outcome call or a probe went through."""
        with self._lock:
            was = self._refusal
            self._refusal = None
        if was is not None:
            log.info("the backend accepts the worker's credentials again")

    def probe_due(self) -> bool:
        """Whether a refused worker should ask the backend again now (claims the probe)."""
        with self._lock:
            if self._refusal is None or self._clock() - self._last_probe < self._probe_seconds:
                return False
            self._last_probe = self._clock()
            return True
