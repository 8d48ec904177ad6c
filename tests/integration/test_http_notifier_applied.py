"""Webhook calls the backend may have applied though no clean answer came back.

A ``failed`` call refunds the user on every call, so one that may have been applied (a gateway's
502/504, an answer lost or unreadable after sending) is never sent again; one that surely never
left (connection refused, connect timeout) is retried. A progress call the backend applies late
(after the worker gave up on it, after the completion) replaces the completion's metadata, so the
completion is sent once more later. Against a real HTTP receiver (``BackendReceiver``) and real
``requests`` sessions whose first calls raise real exceptions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError
from urllib3.exceptions import ProxyError as Urllib3ProxyError

from domain.errors import ErrorCode, WebhookOutcomeUnknown
from tests.integration.backend_receiver import COMPLETED, FAILED, BackendReceiver
from tests.integration.test_http_notifier import (  # the fixtures are shared with it
    TOKEN,
    WHSEC,
    FakeTime,
    NotifierFactory,
    fake_time,
    make_notifier,
    receiver,
    update,
)

__all__ = ["fake_time", "make_notifier", "receiver"]  # fixtures, used by name


# A failure is sent again only when it cannot have been applied.


@pytest.mark.parametrize("status", [502, 504, 501, 520, 524])
def test_a_failure_a_gateway_answered_for_is_never_sent_again(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime, status: int
) -> None:
    # The view committed the refund, then the proxy in front lost its answer.
    receiver.fail_next(1, status, kind="failed", applied=True, body="<html>Bad Gateway</html>")
    with pytest.raises(WebhookOutcomeUnknown, match=f"gateway answered HTTP {status}"):
        make_notifier().failed(3, ErrorCode.LORA_INVALID, "bad LoRA", 0)
    time.sleep(0.1)
    assert [r.status for r in receiver.of_kind("failed")] == [status]
    assert not fake_time.sleeps
    state = receiver.state(3)
    assert state is not None and (state.status, state.refunds) == (FAILED, 1)


def test_a_failure_whose_answer_cannot_be_decoded_is_never_sent_again(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    # The refund is committed and answered 200, but the body cannot be read (bad gzip).
    receiver.fail_next(
        1, 200, kind="failed", headers={"Content-Encoding": "gzip"}, body="not gzip at all"
    )
    with pytest.raises(WebhookOutcomeUnknown, match="ContentDecodingError"):
        make_notifier().failed(3, ErrorCode.LORA_INVALID, "bad LoRA", 0)
    time.sleep(0.1)
    assert len(receiver.of_kind("failed")) == 1 and not fake_time.sleeps
    state = receiver.state(3)
    assert state is not None and state.refunds == 1


class FailingSession(requests.Session):
    """A real session whose first requests raise the given exceptions instead of being sent."""

    def __init__(self, *errors: Exception) -> None:
        super().__init__()
        self.errors = list(errors)

    def request(  # type: ignore[override]  # pylint: disable=arguments-differ
        self, method: str, url: str, **kwargs: Any
    ) -> requests.Response:
        if self.errors:
            raise self.errors.pop(0)
        return super().request(method, url, **kwargs)


NO_POOL: Any = None
"""urllib3's errors name the pool or connection they came from: none here."""


def gave_up(reason: Exception) -> MaxRetryError:
    """What urllib3 raises when a request's only try failed with ``reason``."""
    return MaxRetryError(NO_POOL, "/api/webhooks/inference/failed", reason)


def refused() -> NewConnectionError:
    """What urllib3 raises when the connection is refused (nothing was sent)."""
    return NewConnectionError(NO_POOL, "Failed to establish a new connection: [Errno 111]")


NEVER_SENT = [
    pytest.param(lambda: requests.ConnectTimeout("connect timed out"), id="connect-timeout"),
    pytest.param(lambda: requests.ConnectionError(gave_up(refused())), id="connection-refused"),
    pytest.param(
        lambda: requests.exceptions.ProxyError(
            gave_up(Urllib3ProxyError("proxy unreachable", refused()))
        ),
        id="proxy-refused",
    ),
]
MAYBE_SENT = [
    pytest.param(lambda: requests.ReadTimeout("read timed out"), id="read-timeout"),
    pytest.param(
        lambda: requests.ConnectionError(
            gave_up(ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")))
        ),
        id="connection-aborted",
    ),
    pytest.param(
        lambda: requests.exceptions.ChunkedEncodingError("incomplete chunk"), id="chunked"
    ),
    pytest.param(lambda: requests.exceptions.ContentDecodingError("bad gzip"), id="decoding"),
    pytest.param(lambda: requests.exceptions.SSLError("record layer failure"), id="ssl"),
    pytest.param(
        lambda: requests.exceptions.ProxyError(
            gave_up(Urllib3ProxyError("proxy reset", OSError("reset")))
        ),
        id="proxy-reset",
    ),
    pytest.param(lambda: requests.RequestException("anything else"), id="other"),
]


@pytest.mark.parametrize("error", NEVER_SENT)
def test_a_failure_never_sent_is_retried(
    receiver: BackendReceiver, make_notifier: NotifierFactory, error: Callable[[], Exception]
) -> None:
    with FailingSession(error()) as session:
        make_notifier(session=session).failed(4, ErrorCode.GPU_OOM, "oom", 0)
    state = receiver.state(4)
    assert state is not None and state.refunds == 1


@pytest.mark.parametrize("error", MAYBE_SENT)
def test_a_failure_perhaps_sent_is_never_sent_again(
    receiver: BackendReceiver, make_notifier: NotifierFactory, error: Callable[[], Exception]
) -> None:
    with FailingSession(error()) as session:
        with pytest.raises(WebhookOutcomeUnknown, match="answer was lost"):
            make_notifier(session=session).failed(4, ErrorCode.GPU_OOM, "oom", 0)
    assert receiver.state(4) is None and not receiver.requests


@pytest.mark.parametrize("error", [*NEVER_SENT, *MAYBE_SENT[:3]])
def test_a_completion_is_retried_after_any_transport_error(
    receiver: BackendReceiver, make_notifier: NotifierFactory, error: Callable[[], Exception]
) -> None:
    with FailingSession(error()) as session:
        make_notifier(session=session).completed(4, "https://cdn/4.png", {})
    assert [r.status for r in receiver.of_kind("complete")] == [200]


# A completion is sent again over progress the backend applied after it.


def wait_until_arrived(receiver: BackendReceiver, kind: str, count: int = 1) -> None:
    deadline = time.monotonic() + 5
    while receiver.arrived(kind) < count:
        assert time.monotonic() < deadline, f"no {kind} call arrived"
        time.sleep(0.005)


def test_a_completion_is_sent_again_over_progress_the_backend_applied_late(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    # The backend applies the PATCH after the worker gave up on it (a locked row, a slow
    # database), after the completion: the stored JSON loses the completion's metadata.
    receiver.set_delay(1.0, kind="progress")
    notifier = make_notifier(timeout_seconds=0.3)  # sent again 0.3 + 1.0 s after completing
    notifier.progress(41, update(45))
    wait_until_arrived(receiver, "progress")
    notifier.completed(41, "https://cdn/41.png", {"seed": 42, "steps": 50})
    first = receiver.of_kind("complete")
    receiver.wait_for_state(41, lambda s: s is not None and "seed" not in (s.progress or {}))
    records = receiver.wait_for(lambda seen: len([r for r in seen if r.kind == "complete"]) == 2)
    [late] = [r for r in records if r.kind == "progress"]
    again = [r for r in records if r.kind == "complete"][1]
    assert len(first) == 1 and first[0].answered_at < late.answered_at < again.arrived_at
    assert again.payload == first[0].payload
    assert again.header("webhook-id") is None  # unsigned here; signed ones get a fresh id
    state = receiver.state(41)
    assert state is not None and (state.status, state.result_url) == (
        COMPLETED,
        "https://cdn/41.png",
    )
    assert state.progress == {**update(45).as_payload(), "seed": 42, "steps": 50}
    time.sleep(0.2)
    assert len(receiver.of_kind("complete")) == 2, "sent again once"


class HeldProgressSession(requests.Session):
    """A real session whose progress calls wait for ``release`` before they are sent."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def request(  # type: ignore[override]  # pylint: disable=arguments-differ
        self, method: str, url: str, **kwargs: Any
    ) -> requests.Response:
        if method == "PATCH":
            self.entered.set()
            self.release.wait(10)
        return super().request(method, url, **kwargs)


def test_a_completion_is_sent_again_when_it_stopped_waiting_for_progress(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    with HeldProgressSession() as session:
        notifier = make_notifier(session=session, timeout_seconds=0.2)  # again 1.2 s later
        notifier.progress(42, update(45))
        assert session.entered.wait(5), "the progress call is in flight"
        started = time.monotonic()
        notifier.completed(42, "https://cdn/42.png", {"seed": 7})
        assert time.monotonic() - started >= 1.1, "waited timeout + 1 s for the progress call"
        session.release.set()  # the progress call goes out after the completion
        receiver.wait_for_state(42, lambda s: s is not None and "seed" not in (s.progress or {}))
        receiver.wait_for(lambda seen: len([r for r in seen if r.kind == "complete"]) == 2)
    state = receiver.state(42)
    assert state is not None and state.progress == {**update(45).as_payload(), "seed": 7}


def test_a_signed_completion_sent_again_has_a_fresh_id(make_notifier: NotifierFactory) -> None:
    with BackendReceiver(token=TOKEN, signing_secret=WHSEC) as backend:
        backend.set_delay(0.4, kind="progress")
        notifier = make_notifier(
            base_url=backend.base_url,
            signing_secret=WHSEC,
            timeout_seconds=0.1,
            resend_delay_seconds=0.5,
        )
        notifier.progress(43, update(45))
        wait_until_arrived(backend, "progress")
        notifier.completed(43, "https://cdn/43.png", {"seed": 1})
        backend.wait_for(lambda seen: len([r for r in seen if r.kind == "complete"]) == 2)
        first, again = backend.of_kind("complete")
    assert backend.verify(first) and backend.verify(again)
    assert first.header("webhook-id") != again.header("webhook-id")
    assert first.body == again.body


def test_a_completion_is_not_sent_again_when_progress_was_answered(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.fail_next(1, 500, kind="progress")  # an answer: the view rolled back
    notifier = make_notifier(resend_delay_seconds=0.1)
    notifier.progress(44, update(10))
    receiver.wait_for(lambda seen: len(seen) == 1)
    notifier.progress(45, update(10))
    receiver.wait_for(lambda seen: len(seen) == 2)
    notifier.completed(44, "https://cdn/44.png", {})
    notifier.completed(45, "https://cdn/45.png", {})
    time.sleep(0.4)
    assert len(receiver.of_kind("complete")) == 2


def test_a_failure_is_never_sent_again_after_unanswered_progress(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.3, kind="progress")
    notifier = make_notifier(timeout_seconds=0.1, resend_delay_seconds=0.1)
    notifier.progress(46, update(45))
    wait_until_arrived(receiver, "progress")
    notifier.failed(46, ErrorCode.GPU_OOM, "oom", 0)
    time.sleep(0.6)
    notifier.close()
    assert len(receiver.of_kind("failed")) == 1
    state = receiver.state(46)
    assert state is not None and state.refunds == 1


def test_close_sends_a_waiting_completion_at_once(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.3, kind="progress")
    notifier = make_notifier(timeout_seconds=0.1, resend_delay_seconds=60.0)
    notifier.progress(47, update(45))
    wait_until_arrived(receiver, "progress")
    notifier.completed(47, "https://cdn/47.png", {"seed": 5})
    time.sleep(0.4)  # the late progress is applied
    notifier.close()
    assert len(receiver.of_kind("complete")) == 2
    state = receiver.state(47)
    assert state is not None and state.progress == {**update(45).as_payload(), "seed": 5}
