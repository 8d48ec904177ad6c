"""Progress webhooks, best effort, on one background thread; completions resent over late progress.

Progress is handed to one daemon thread, coalesced per generation (the newest pending update),
sent once, and never sent for a generation whose outcome is being reported: its queued progress
is dropped, an in-flight one is awaited (up to about the timeout), and later ones are ignored
until a new run of the generation starts (step 0).

A progress call that got no answer (a timeout, a connection dropped after sending, a gateway's
502/504) or that was still in flight when the outcome went out may still be applied by the
backend, after the completion, replacing the metadata the completion stored: a completion sent
for such a generation is sent once more, on a timer thread, a resend delay later (best effort,
logged; ``close()`` sends pending ones at once, one attempt each). Never a failure.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import replace

import requests

from adapters.webhooks.answers import describe, never_sent, view_may_have_applied
from adapters.webhooks.outcome_sender import OutcomeSender
from adapters.webhooks.transport import PROGRESS_PATH, Transport, WebhookMessage
from domain.progress import ProgressUpdate

log = logging.getLogger(__package__)  # one logger for the whole adapter: adapters.webhooks

RESEND_MARGIN_SECONDS = 1.0
"""Added to ``timeout_seconds``: how long after a completion it is sent again when a progress call
of its generation got no answer (the backend may apply that call late, replacing the metadata)."""
FINISHED_MEMORY = 10_000
"""How many finished generation ids are remembered to drop their late progress updates (and how
many generations with an unanswered progress call)."""


class ProgressSender:
    """The progress thread, what it remembers of each generation, and the resend timers.

    ``closed`` is set by ``close()``, for good: no progress is sent, no completion resent.
    """

    def __init__(
        self,
        transport: Transport,
        outcomes: OutcomeSender,
        *,
        timeout_seconds: float,
        resend_delay_seconds: float,
    ) -> None:
        self._transport = transport
        self._outcomes = outcomes
        self._timeout = timeout_seconds
        self._resend_delay = resend_delay_seconds
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._pending: OrderedDict[int, ProgressUpdate] = OrderedDict()
        self._finished: OrderedDict[int, None] = OrderedDict()
        self._unanswered: OrderedDict[int, None] = OrderedDict()
        """Generations with a progress call the backend may still apply (no answer came)."""
        self._resends: dict[int, tuple[threading.Timer, WebhookMessage]] = {}
        self._in_flight: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def submit(self, generation_id: int, update: ProgressUpdate) -> None:
        """Queue the update for the background thread; never blocks, never raises."""
        try:
            with self._lock:
                if update.current_step == 0:
                    # A new run of the generation starts (the backend re-queued it): progress
                    # is its own again. Progress of a finished run is never at step 0.
                    self._finished.pop(generation_id, None)
                if self._closed or generation_id in self._finished:
                    return
                # Assigning to an existing key replaces the stale update in its queue position.
                self._pending[generation_id] = update
                self._start_thread()
                self._work.notify()
        except Exception:  # pylint: disable=broad-exception-caught
            log.warning("generation %s: progress update not queued", generation_id, exc_info=True)

    def finish(self, generation_id: int) -> None:
        """No progress for this generation may reach the backend from now on."""
        with self._lock:
            self._finished[generation_id] = None
            self._finished.move_to_end(generation_id)
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
            self._pending.pop(generation_id, None)
            settled = self._idle.wait_for(
                lambda: self._in_flight != generation_id, timeout=self._timeout + 1.0
            )
            if not settled:
                self._remember_unanswered(generation_id)
        if not settled:
            log.warning("generation %s: a progress update is still in flight", generation_id)

    def resend_after_late_progress(self, message: WebhookMessage) -> None:
        """After a delivered completion: when a progress call of its generation got no answer,
        send the completion again once the resend delay has passed, on a timer thread."""
        generation_id = message.generation_id
        with self._lock:
            if self._closed or generation_id not in self._unanswered:
                return
            del self._unanswered[generation_id]
            again = replace(message, message_id="msg_" + uuid.uuid4().hex)
            timer = threading.Timer(self._resend_delay, self._resend, args=(again,))
            timer.daemon = True
            timer.name = f"http-notifier-resend-{generation_id}"
            previous = self._resends.get(generation_id)
            self._resends[generation_id] = (timer, again)
            timer.start()
        if previous is not None:
            previous[0].cancel()
        log.info(
            "generation %s: a progress call got no answer and may be applied late: the"
            " completion is sent again in %.1f s",
            generation_id,
            self._resend_delay,
        )

    def close(self) -> bool:
        """Stop the progress thread (pending progress is dropped) and send the completions
        waiting to be sent again at once (one attempt each); False when already closed."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._pending.clear()
            self._work.notify_all()
            thread = self._thread
            resends = list(self._resends.values())
            self._resends.clear()
        for timer, _ in resends:
            timer.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._timeout + 1.0)
        for _, message in resends:
            self._resend_once(message)
        return True

    def _remember_unanswered(self, generation_id: int) -> None:
        """Note that the backend may still apply a progress call of this generation; lock held."""
        self._unanswered[generation_id] = None
        self._unanswered.move_to_end(generation_id)
        while len(self._unanswered) > FINISHED_MEMORY:
            self._unanswered.popitem(last=False)

    def _resend(self, message: WebhookMessage) -> None:
        """The timer's work: the completion again, with retries; logged, never raised."""
        with self._lock:
            entry = self._resends.get(message.generation_id)
            if entry is None or entry[1] is not message:
                return  # close() took it, or a newer completion replaced it
            del self._resends[message.generation_id]
        try:
            self._outcomes.send(message)
        except Exception:  # pylint: disable=broad-exception-caught
            log.warning(
                "generation %s: completion not sent again over late progress",
                message.generation_id,
                exc_info=True,
            )

    def _resend_once(self, message: WebhookMessage) -> None:
        """One attempt at a completion that was to be sent again later (at close); logged."""
        try:
            response = self._transport.send(message)
        except requests.RequestException as exc:
            log.warning(
                "generation %s: completion not sent again at close: %s",
                message.generation_id,
                describe(exc),
            )
            return
        log.info(
            "generation %s: completion sent again at close, status %d",
            message.generation_id,
            response.status_code,
        )

    def _start_thread(self) -> None:
        """Start the progress thread once; the caller holds the lock."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._progress_loop, name="http-notifier-progress", daemon=True
            )
            self._thread.start()

    def _progress_loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                generation_id, update = self._pending.popitem(last=False)
                self._in_flight = generation_id
            try:
                self._send_progress(generation_id, update)
            except Exception:  # pylint: disable=broad-exception-caught
                log.warning("generation %s: progress update failed", generation_id, exc_info=True)
            finally:
                with self._lock:
                    self._in_flight = None
                    self._idle.notify_all()

    def _send_progress(self, generation_id: int, update: ProgressUpdate) -> None:
        """One attempt, no retries: a lost milestone is superseded by the next one."""
        payload = {"generation_id": generation_id, "progress": update.as_payload()}
        message = self._transport.message("PATCH", PROGRESS_PATH, generation_id, payload)
        try:
            response = self._transport.send(message)
        except requests.RequestException as exc:
            if not never_sent(exc):
                with self._lock:
                    self._remember_unanswered(generation_id)
            log.debug("generation %s: %s not sent: %s", generation_id, PROGRESS_PATH, describe(exc))
            return
        if view_may_have_applied(response.status_code):
            with self._lock:
                self._remember_unanswered(generation_id)
        if 200 <= response.status_code < 300:
            log.debug(
                "generation %s: %s %d%% sent, status %d",
                generation_id,
                PROGRESS_PATH,
                update.progress_percent,
                response.status_code,
            )
        else:
            log.warning(
                "generation %s: %s dropped, status %d: %s",
                generation_id,
                PROGRESS_PATH,
                response.status_code,
                self._transport.excerpt(response),
            )
