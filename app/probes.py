"""What ``/healthz`` and ``/readyz`` answer: the worker loop's liveness and the readiness checks.

- Liveness: alive while the worker loop keeps calling ``Liveness.heartbeat()``; not alive once
  it has been silent for longer than ``stale_after_seconds`` (a stuck loop: restart the
  process). Until the first beat, ``startup_grace_seconds`` covers the model's load.
- Readiness: ready only when every registered check passes (model loaded, broker connected,
  storage reachable...). Checks run concurrently, each within a time limit; a check that raises
  or does not answer in time counts as failing.

The endpoint is reachable by anyone on the network, so a readiness answer says little: each check
shows one of the short phrases registered with it (``Readiness.add(..., phrases=...)``), else a
fixed one (``ok``, ``failing``, ``check failed``, ``no answer in time``); never exception text,
URLs, hosts or bucket names. The full detail goes to the log, redacted, once per change of a
check's state rather than on every probe. ``app.ops_server`` serves both over HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

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
