"""The HTTP webhook notifier against a real HTTP receiver that enforces the backend's rules."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests

from adapters.webhooks import (
    COMPLETE_PATH,
    FAILED_PATH,
    PROGRESS_PATH,
    HttpNotifier,
)
from domain.errors import (
    ErrorCode,
    NotifyError,
    WebhookNotFound,
    WebhookOutcomeUnknown,
    WebhookRejected,
    WebhookUnauthorized,
)
from domain.progress import ProgressUpdate
from ports.notifier import Notifier
from tests.integration.backend_receiver import (
    COMPLETED,
    FAILED,
    PENDING,
    BackendReceiver,
    RecordedRequest,
)
from tests.integration.services import free_port
from tests.unit.fakes import FakeTelemetry

TOKEN = "tok-7f3a9c1e-very-secret"
SEED = 1234
KEY = b"0123456789abcdef0123456789abcdef"
WHSEC = "whsec_" + base64.b64encode(KEY).decode()


class FakeTime:
    """A monotonic clock that only moves when the notifier sleeps; records the sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def receiver() -> Iterator[BackendReceiver]:
    with BackendReceiver(token=TOKEN) as backend:
        yield backend


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


NotifierFactory = Callable[..., HttpNotifier]


@pytest.fixture
def make_notifier(receiver: BackendReceiver, fake_time: FakeTime) -> Iterator[NotifierFactory]:
    made: list[HttpNotifier] = []

    def make(**overrides: Any) -> HttpNotifier:
        options: dict[str, Any] = {
            "base_url": receiver.base_url,
            "token": TOKEN,
            "timeout_seconds": 2.0,
            "max_attempts": 4,
            "sleep": fake_time.sleep,
            "clock": fake_time.clock,
            "rng": random.Random(SEED),
        }
        options.update(overrides)
        notifier = HttpNotifier(**options)
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()


def update(step: int, total: int = 50) -> ProgressUpdate:
    return ProgressUpdate(
        current_step=step,
        total_steps=total,
        progress_percent=step * 100 // total,
        estimated_seconds=total - step,
    )


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_common_headers(request: RecordedRequest) -> None:
    assert request.header("Authorization") == f"Bearer {TOKEN}"
    assert request.header("X-Request-Source") == "inference-server"
    assert request.header("Content-Type") == "application/json"


# The wire format.


def test_implements_the_port(make_notifier: NotifierFactory) -> None:
    assert isinstance(make_notifier(), Notifier)


def test_progress_method_path_headers_and_exact_body(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    make_notifier().progress(500, update(38))
    [request] = receiver.wait_for(lambda seen: len(seen) >= 1)
    assert (request.method, request.path, request.status) == ("PATCH", PROGRESS_PATH, 200)
    assert_common_headers(request)
    expected = {
        "generation_id": 500,
        "progress": {
            "current_step": 38,
            "total_steps": 50,
            "progress_percent": 76,
            "estimated_seconds": 12,
        },
    }
    assert request.payload == expected
    assert request.body == json.dumps(expected, separators=(",", ":")).encode()
    assert request.header("webhook-signature") is None


def test_completion_goes_to_the_configured_url_only(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    metadata = {
        "seed": 42,
        "steps": 50,
        "guidance_scale": 7.5,
        "webhook_url": "http://127.0.0.1:1/api/webhooks/generation/500/status",
        "callback_url": "http://evil.example/steal",
    }
    notifier = make_notifier(base_url=receiver.base_url + "/")
    notifier.completed(500, "https://cdn.example/generations/500.png", metadata)
    [request] = receiver.requests
    assert (request.method, request.path, request.status) == ("POST", COMPLETE_PATH, 200)
    assert_common_headers(request)
    assert request.payload == {
        "generation_id": 500,
        "result_url": "https://cdn.example/generations/500.png",
        "metadata": metadata,
    }


def test_failure_body_carries_the_code_string(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    make_notifier().failed(500, ErrorCode.GPU_OOM, "GPU out of memory", 2)
    [request] = receiver.requests
    assert (request.method, request.path, request.status) == ("POST", FAILED_PATH, 200)
    assert_common_headers(request)
    assert request.body == (
        b'{"generation_id":500,"error_message":"GPU out of memory",'
        b'"error_code":"GPU_OOM","retry_count":2}'
    )


# Refusals and retries.


def test_wrong_token_is_unauthorized_at_once_without_naming_it(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    notifier = make_notifier(token="not-the-token")
    with pytest.raises(WebhookUnauthorized, match="401.*INTERNAL_API_TOKEN") as caught:
        notifier.completed(1, "https://cdn/1.png", {})
    assert "not-the-token" not in str(caught.value) and TOKEN not in str(caught.value)
    assert [r.status for r in receiver.requests] == [401]
    assert not fake_time.sleeps
    assert receiver.state(1) is None


REFUSALS = [
    (401, WebhookUnauthorized),
    (403, WebhookUnauthorized),
    (404, WebhookNotFound),
    (400, WebhookRejected),
    (409, WebhookRejected),
    (410, WebhookRejected),
    (422, WebhookRejected),
]


@pytest.mark.parametrize(("status", "error"), REFUSALS)
def test_each_refusal_raises_its_own_error_without_retry(
    receiver: BackendReceiver,
    make_notifier: NotifierFactory,
    fake_time: FakeTime,
    status: int,
    error: type[NotifyError],
) -> None:
    receiver.fail_next(1, status, kind="failed", body='{"error": "field error_code: bad"}')
    with pytest.raises(NotifyError, match=f"{status}.*field error_code: bad") as caught:
        make_notifier().failed(1, ErrorCode.MODEL_ERROR, "boom", 0)
    assert type(caught.value) is error  # pylint: disable=unidiomatic-typecheck
    assert len(receiver.requests) == 1 and not fake_time.sleeps
    assert receiver.state(1) is None  # an injected refusal changes nothing


def test_credential_refusals_name_what_to_check(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.fail_next(1, 403)
    with pytest.raises(WebhookUnauthorized, match="403.*X-Request-Source"):
        make_notifier().completed(1, "https://cdn/1.png", {})


def test_a_refusal_carries_a_short_excerpt_without_the_token(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.fail_next(1, 422, body=f"token {TOKEN} " + "x" * 5000)
    with pytest.raises(WebhookRejected) as caught:
        make_notifier(signing_secret="sign-me-secret").completed(1, "https://cdn/1.png", {})
    message = str(caught.value)
    assert TOKEN not in message and "token ***" in message
    assert len(message) < 300 and message.endswith("...")


def test_an_unknown_generation_is_not_found_and_changes_nothing(
    make_notifier: NotifierFactory,
) -> None:
    with BackendReceiver(token=TOKEN, generations=[1]) as backend:
        notifier = make_notifier(base_url=backend.base_url)
        with pytest.raises(WebhookNotFound, match="404.*generation 404404"):
            notifier.completed(404404, "https://cdn/x.png", {})
        notifier.completed(1, "https://cdn/1.png", {"seed": 3})
        assert [r.status for r in backend.requests] == [404, 200]
        assert backend.state(404404) is None
        state = backend.state(1)
    assert state is not None and state.status == COMPLETED
    assert state.result_url == "https://cdn/1.png" and state.progress == {"seed": 3}


def test_listed_unknown_ids_are_not_found(make_notifier: NotifierFactory) -> None:
    with BackendReceiver(token=TOKEN, unknown_generation_ids=[5]) as backend:
        with pytest.raises(WebhookNotFound):
            make_notifier(base_url=backend.base_url).failed(5, ErrorCode.MODEL_ERROR, "m", 0)


def test_redirects_are_not_followed(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.fail_next(1, 307, headers={"Location": "http://127.0.0.1:1/elsewhere"})
    with pytest.raises(WebhookRejected, match="307"):
        make_notifier().completed(1, "https://cdn/1.png", {})
    assert len(receiver.requests) == 1


def test_503_twice_then_delivered_with_jittered_backoff(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    receiver.fail_next(2, 503)
    make_notifier(backoff_base_seconds=0.5).completed(7, "https://cdn/7.png", {"seed": 1})
    assert [r.status for r in receiver.requests] == [503, 503, 200]
    expected = random.Random(SEED)
    assert fake_time.sleeps == [expected.uniform(0, 0.5), expected.uniform(0, 1.0)]


def test_backoff_ceiling_is_capped(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    receiver.fail_next(4, 500)
    notifier = make_notifier(max_attempts=5, backoff_base_seconds=1.0, backoff_max_seconds=1.5)
    notifier.completed(7, "https://cdn/7.png", {})
    expected = random.Random(SEED)
    assert fake_time.sleeps == [expected.uniform(0, c) for c in (1.0, 1.5, 1.5, 1.5)]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried_for_a_completion(
    receiver: BackendReceiver, make_notifier: NotifierFactory, status: int
) -> None:
    receiver.fail_next(1, status, applied=True)  # applied or not: repeating it is harmless
    make_notifier().completed(3, "https://cdn/3.png", {"seed": 1})
    assert [r.status for r in receiver.requests] == [status, 200]


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_statuses_that_apply_nothing_are_retried_for_a_failure(
    receiver: BackendReceiver, make_notifier: NotifierFactory, status: int
) -> None:
    receiver.fail_next(1, status, kind="failed")
    make_notifier().failed(3, ErrorCode.STORAGE_ERROR, "s3 down", 1)
    assert [r.status for r in receiver.requests] == [status, 200]
    state = receiver.state(3)
    assert state is not None and state.refunds == 1


def test_retry_after_seconds_is_honoured(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    receiver.fail_next(1, 429, retry_after=2)
    make_notifier().completed(7, "https://cdn/7.png", {})
    assert fake_time.sleeps == [2.0]
    assert len(receiver.requests) == 2


def test_retry_after_http_date_is_honoured_and_capped(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=10), usegmt=True)
    receiver.fail_next(1, 503, retry_after=soon)
    receiver.fail_next(1, 503, retry_after=3600)
    notifier = make_notifier(backoff_max_seconds=30.0, retry_budget_seconds=60.0)
    notifier.completed(7, "https://cdn/7.png", {})
    assert len(fake_time.sleeps) == 2
    assert 8.0 <= fake_time.sleeps[0] <= 10.0
    assert fake_time.sleeps[1] == 30.0


def test_retry_after_is_ignored_for_500(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    receiver.fail_next(1, 500, retry_after=20)
    make_notifier(backoff_base_seconds=0.5).completed(7, "https://cdn/7.png", {})
    assert fake_time.sleeps == [random.Random(SEED).uniform(0, 0.5)]


def test_always_503_gives_up_after_max_attempts(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    receiver.fail_next(None, 503)
    with pytest.raises(NotifyError, match="4 attempt.*503") as caught:
        make_notifier(max_attempts=4).completed(7, "https://cdn/7.png", {})
    assert not isinstance(caught.value, WebhookRejected)
    assert len(receiver.requests) == 4
    assert len(fake_time.sleeps) == 3


def test_retry_budget_stops_before_a_wait_that_would_exceed_it(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    receiver.fail_next(None, 503, retry_after=10)
    notifier = make_notifier(max_attempts=10, retry_budget_seconds=25.0)
    with pytest.raises(NotifyError, match="3 attempt"):
        notifier.completed(7, "https://cdn/7.png", {})
    assert fake_time.sleeps == [10.0, 10.0]
    assert len(receiver.requests) == 3


def test_connection_refused_is_a_notify_error(
    make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    notifier = make_notifier(base_url=f"http://127.0.0.1:{unused_port()}", max_attempts=3)
    with pytest.raises(NotifyError, match="3 attempt.*ConnectionError") as caught:
        notifier.failed(7, ErrorCode.MODEL_ERROR, "boom", 0)
    assert type(caught.value) is NotifyError  # pylint: disable=unidiomatic-typecheck
    assert "answer was lost" not in str(caught.value)  # nothing reached a backend
    assert len(fake_time.sleeps) == 2


def test_defaults_retry_briefly_three_attempts(
    receiver: BackendReceiver, fake_time: FakeTime
) -> None:
    receiver.fail_next(None, 503)
    with HttpNotifier(
        base_url=receiver.base_url, token=TOKEN, sleep=fake_time.sleep, clock=fake_time.clock
    ) as notifier:
        with pytest.raises(NotifyError, match="3 attempt"):
            notifier.completed(7, "https://cdn/7.png", {})
    assert len(receiver.requests) == 3


def test_defaults_give_up_within_ten_seconds(
    receiver: BackendReceiver, fake_time: FakeTime
) -> None:
    receiver.fail_next(None, 503, retry_after=6)
    with HttpNotifier(
        base_url=receiver.base_url, token=TOKEN, sleep=fake_time.sleep, clock=fake_time.clock
    ) as notifier:
        with pytest.raises(NotifyError, match="2 attempt"):
            notifier.completed(7, "https://cdn/7.png", {})
    assert fake_time.sleeps == [6.0]


def test_a_failure_whose_answer_is_lost_is_never_sent_again(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    # The backend refunds on every failure call: a call it may have applied is not repeated.
    receiver.set_delay(0.4, kind="failed")
    notifier = make_notifier(timeout_seconds=0.1, max_attempts=3)
    with pytest.raises(WebhookOutcomeUnknown, match="answer was lost: the backend may have"):
        notifier.failed(7, ErrorCode.MODEL_ERROR, "boom", 0)
    state = receiver.wait_for_state(7, lambda s: s is not None and s.refunds == 1)
    assert state is not None and state.status == FAILED
    time.sleep(0.5)  # let a second attempt arrive, if one was sent
    assert len(receiver.of_kind("failed")) == 1 and receiver.state(7).refunds == 1


def test_a_completion_whose_answer_is_lost_is_sent_again(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.4, kind="complete")
    notifier = make_notifier(timeout_seconds=0.1, max_attempts=2)
    with pytest.raises(NotifyError, match="an answer was lost"):
        notifier.completed(7, "https://cdn/7.png", {"seed": 1})
    assert len(receiver.wait_for(lambda seen: len(seen) >= 2)) == 2


def test_a_failure_refused_at_connect_is_retried(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.fail_next(2, status=503, kind="failed")
    notifier = make_notifier(max_attempts=3)
    notifier.failed(8, ErrorCode.MODEL_ERROR, "boom", 0)
    assert receiver.state(8).refunds == 1 and len(receiver.of_kind("failed")) == 3


def test_slow_receiver_times_out_is_retried_then_gives_up(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime
) -> None:
    receiver.set_delay(0.6)
    notifier = make_notifier(timeout_seconds=0.15, max_attempts=2)
    started = time.monotonic()
    with pytest.raises(NotifyError, match="2 attempt.*Timeout"):
        notifier.completed(7, "https://cdn/7.png", {})
    assert time.monotonic() - started < 0.55
    assert len(fake_time.sleeps) == 1
    assert len(receiver.wait_for(lambda seen: len(seen) >= 2)) == 2


# Signing.


def expected_signature(key: bytes, request: RecordedRequest) -> str:
    signed = f"{request.header('webhook-id')}.{request.header('webhook-timestamp')}.".encode()
    digest = hmac.new(key, signed + request.body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_signed_requests_keep_their_id_across_retries(make_notifier: NotifierFactory) -> None:
    with BackendReceiver(token=TOKEN, signing_secret=WHSEC) as backend:
        notifier = make_notifier(base_url=backend.base_url, signing_secret=WHSEC)
        backend.fail_next(1, 503, kind="complete")
        notifier.completed(7, "https://cdn/7.png", {})
        notifier.failed(8, ErrorCode.GPU_OOM, "oom", 0)
        first, retry, other = backend.requests
    assert [r.status for r in (first, retry, other)] == [503, 200, 200]
    assert all(backend.verify(r) for r in (first, retry, other))
    assert all(r.header("webhook-signature") == expected_signature(KEY, r) for r in (retry, other))
    assert first.header("webhook-id") == retry.header("webhook-id")
    assert first.header("webhook-id") != other.header("webhook-id")
    assert str(first.header("webhook-id")).startswith("msg_")
    assert abs(int(str(retry.header("webhook-timestamp"))) - time.time()) < 60


def test_plain_secret_is_used_as_utf8_bytes(make_notifier: NotifierFactory) -> None:
    with BackendReceiver(token=TOKEN, signing_secret="plain-sécret") as backend:
        make_notifier(base_url=backend.base_url, signing_secret="plain-sécret").completed(
            7, "https://cdn/7.png", {}
        )
        [request] = backend.requests
    assert request.status == 200
    assert request.header("webhook-signature") == expected_signature(
        "plain-sécret".encode(), request
    )


def test_whsec_prefix_is_decoded_not_used_verbatim(make_notifier: NotifierFactory) -> None:
    with BackendReceiver(token=TOKEN, signing_secret=WHSEC) as backend:
        notifier = make_notifier(base_url=backend.base_url, signing_secret=WHSEC)
        notifier.completed(7, "https://cdn/7.png", {})
        [request] = backend.requests
    assert request.header("webhook-signature") == expected_signature(KEY, request)
    assert request.header("webhook-signature") != expected_signature(WHSEC.encode(), request)


def test_wrong_secret_is_refused_by_the_receiver(make_notifier: NotifierFactory) -> None:
    with BackendReceiver(token=TOKEN, signing_secret=WHSEC) as backend:
        notifier = make_notifier(base_url=backend.base_url, signing_secret="whsec_" + "QUJD")
        with pytest.raises(WebhookUnauthorized, match="401"):
            notifier.completed(7, "https://cdn/7.png", {})


def test_malformed_whsec_secret_fails_at_construction_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="base64") as caught:
        HttpNotifier(base_url="http://127.0.0.1:1", token=TOKEN, signing_secret="whsec_%%not%%")
    assert "%%not%%" not in str(caught.value)


# Progress.


def test_progress_never_blocks_the_caller(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.5)
    notifier = make_notifier()
    started = time.perf_counter()
    for generation_id in range(20):
        notifier.progress(generation_id, update(25))
    assert time.perf_counter() - started < 0.1


def test_a_burst_is_coalesced_to_the_newest_update(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.3, kind="progress")
    notifier = make_notifier()
    notifier.progress(9, update(0))
    receiver_saw_first = time.monotonic() + 2
    while receiver.arrived("progress") < 1 and time.monotonic() < receiver_saw_first:
        time.sleep(0.005)
    for step in range(1, 21):
        notifier.progress(9, update(step))
    seen = receiver.wait_for(
        lambda records: any(r.payload["progress"]["current_step"] == 20 for r in records)
    )
    assert [r.payload["progress"]["current_step"] for r in seen] == [0, 20]


def test_progress_errors_are_dropped_and_not_retried(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.fail_next(1, 500, kind="progress")
    notifier = make_notifier()
    notifier.progress(1, update(10))
    notifier.progress(2, update(10))
    seen = receiver.wait_for(lambda records: len(records) >= 2)
    time.sleep(0.1)
    assert [(r.generation_id, r.status) for r in receiver.requests] == [(1, 500), (2, 200)]
    assert [r.generation_id for r in seen] == [1, 2]


def test_progress_to_an_unreachable_backend_never_raises(make_notifier: NotifierFactory) -> None:
    notifier = make_notifier(base_url=f"http://127.0.0.1:{unused_port()}")
    for step in range(5):
        notifier.progress(1, update(step))
    notifier.close()


def test_completion_waits_for_in_flight_progress_of_its_generation(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.3, kind="progress")
    notifier = make_notifier()
    notifier.progress(5, update(10))
    deadline = time.monotonic() + 2
    while receiver.arrived("progress") < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    notifier.completed(5, "https://cdn/5.png", {})
    progress, complete = receiver.for_generation(5)
    assert (progress.kind, complete.kind) == ("progress", "complete")
    assert complete.arrived_at >= progress.answered_at


def test_progress_of_another_generation_does_not_delay_completion(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.5, kind="progress")
    notifier = make_notifier()
    notifier.progress(1, update(10))
    deadline = time.monotonic() + 2
    while receiver.arrived("progress") < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    notifier.completed(2, "https://cdn/2.png", {})
    assert time.monotonic() - started < 0.3


def test_queued_progress_is_dropped_when_the_outcome_is_sent(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.2, kind="progress")
    notifier = make_notifier()
    notifier.progress(1, update(10))
    deadline = time.monotonic() + 2
    while receiver.arrived("progress") < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    notifier.progress(2, update(10))
    notifier.completed(2, "https://cdn/2.png", {})
    notifier.progress(2, update(20))
    notifier.progress(3, update(10))
    receiver.wait_for(lambda records: any(r.generation_id == 3 for r in records))
    assert [(r.generation_id, r.kind) for r in receiver.requests] == [
        (1, "progress"),
        (2, "complete"),
        (3, "progress"),
    ]


def run_generation(notifier: HttpNotifier, generation_id: int) -> None:
    for step in range(0, 50, 5):
        notifier.progress(generation_id, update(step))
    if generation_id % 2:
        notifier.completed(generation_id, f"https://cdn/{generation_id}.png", {})
    else:
        notifier.failed(generation_id, ErrorCode.MODEL_ERROR, "boom", 0)
    notifier.progress(generation_id, update(49))


def test_no_progress_reaches_the_backend_after_the_outcome(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.003, kind="progress")
    notifier = make_notifier()
    generation_ids = range(1, 81)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda gid: run_generation(notifier, gid), generation_ids))
    time.sleep(0.1)
    notifier.close()
    records = receiver.requests
    assert any(r.kind == "progress" for r in records)
    for generation_id in generation_ids:
        mine = [r for r in records if r.generation_id == generation_id]
        [outcome] = [r for r in mine if r.kind != "progress"]
        assert mine[-1] is outcome
        for request in mine[:-1]:
            assert request.answered_at <= outcome.arrived_at
            assert request.payload["progress"]["current_step"] != 49


def test_close_drops_pending_progress_and_is_idempotent(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.set_delay(0.2, kind="progress")
    notifier = make_notifier()
    for generation_id in range(10):
        notifier.progress(generation_id, update(10))
    notifier.close()
    notifier.close()
    notifier.progress(99, update(10))
    time.sleep(0.3)
    assert receiver.arrived("progress") <= 1
    with pytest.raises(NotifyError, match="closed"):
        notifier.completed(1, "https://cdn/1.png", {})


def test_an_injected_session_stays_open(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    with requests.Session() as session:
        notifier = make_notifier(session=session)
        notifier.completed(1, "https://cdn/1.png", {})
        notifier.close()
        assert session.get(receiver.base_url + "/nowhere", timeout=2).status_code == 404


# Secrets.


def test_token_and_secret_stay_out_of_logs_repr_and_errors(
    receiver: BackendReceiver, make_notifier: NotifierFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    notifier = make_notifier(signing_secret="sign-me-secret")
    receiver.fail_next(1, 503, kind="complete")
    receiver.fail_next(1, 400, kind="failed", body=f'{{"detail": "bad token {TOKEN}"}}')
    notifier.progress(1, update(10))
    receiver.wait_for(lambda records: len(records) >= 1)
    notifier.completed(1, "https://cdn/1.png", {})
    with pytest.raises(WebhookRejected) as caught:
        notifier.failed(2, ErrorCode.MODEL_ERROR, "boom", 0)
    assert caplog.records
    for text in (caplog.text, repr(notifier), str(caught.value)):
        assert TOKEN not in text
        assert "sign-me-secret" not in text
        assert "Bearer" not in text
    assert "generation 1" in caplog.text and COMPLETE_PATH in caplog.text


# The receiver itself (the end-to-end tests rely on its rules).


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("POST", COMPLETE_PATH, {"X-Request-Source": "inference-server"}, b"{}", 401),
        ("POST", COMPLETE_PATH, {"Authorization": "Bearer nope"}, b"{}", 401),
        ("POST", COMPLETE_PATH, {"X-Request-Source": "browser"}, b"{}", 403),
        ("POST", COMPLETE_PATH, {}, b"not json", 400),
        ("POST", COMPLETE_PATH, {}, b'{"generation_id": 1, "result_url": "u"}', 400),
        ("PATCH", PROGRESS_PATH, {}, b'{"generation_id": 1, "progress": {"current_step": 1}}', 400),
        ("POST", FAILED_PATH, {}, b'{"generation_id": 1, "error_message": "m"}', 400),
        ("POST", "/api/webhooks/inference/other", {}, b"{}", 404),
        ("POST", PROGRESS_PATH, {}, b"{}", 405),
        ("GET", COMPLETE_PATH, {}, b"", 405),
        ("POST", FAILED_PATH, {"Content-Type": "text/plain"}, b"{}", 415),
        (
            "POST",
            FAILED_PATH,
            {},
            b'{"generation_id": 1, "error_message": "m", "error_code": "X", "retry_count": 0}',
            200,
        ),
    ],
)
def test_receiver_enforces_the_backend_rules(
    receiver: BackendReceiver,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    sent = {
        "Authorization": f"Bearer {TOKEN}",
        "X-Request-Source": "inference-server",
        "Content-Type": "application/json",
    }
    sent.update(headers)
    if "Authorization" not in headers and status == 401:
        del sent["Authorization"]
    response = requests.request(
        method, receiver.base_url + path, headers=sent, data=body, timeout=2
    )
    assert response.status_code == status
    assert response.json()["success"] is (status == 200)
    [recorded] = receiver.requests
    assert (recorded.method, recorded.path, recorded.status, recorded.body) == (
        method,
        path,
        status,
        body,
    )


def test_a_new_run_of_a_finished_generation_reports_progress_again() -> None:
    with BackendReceiver(token=TOKEN) as receiver:
        notifier = HttpNotifier(base_url=receiver.base_url, token=TOKEN)
        try:
            notifier.completed(901, "https://cdn/x.png", {})
            notifier.progress(901, ProgressUpdate(10, 50, 20, 3))  # late: dropped
            notifier.progress(901, ProgressUpdate(0, 50, 0, None))  # the re-queued run starts
            receiver.wait_for(lambda rs: len([r for r in rs if r.kind == "progress"]) == 1)
        finally:
            notifier.close()
    (progress,) = receiver.of_kind("progress")
    assert progress.payload["progress"]["current_step"] == 0


def test_every_http_attempt_is_reported_to_telemetry(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    telemetry = FakeTelemetry()
    notifier = make_notifier(telemetry=telemetry)
    receiver.fail_next(2, 503, kind="complete")
    notifier.completed(8, "https://cdn/8.png", {"seed": 1})
    receiver.fail_next(1, 401, kind="failed")
    with pytest.raises(WebhookUnauthorized):
        notifier.failed(9, ErrorCode.LORA_INVALID, "bad", 0)
    notifier.check_access()
    assert telemetry.of("webhook") == [
        {"kind": "completed", "ok": False},
        {"kind": "completed", "ok": False},
        {"kind": "completed", "ok": True},
        {"kind": "failed", "ok": False},
    ]


def test_a_connection_error_is_a_failed_attempt(make_notifier: NotifierFactory) -> None:
    telemetry = FakeTelemetry()
    port = free_port()
    notifier = make_notifier(
        base_url=f"http://127.0.0.1:{port}", telemetry=telemetry, max_attempts=2
    )
    with pytest.raises(NotifyError):
        notifier.completed(10, "https://cdn/10.png", {})
    assert telemetry.of("webhook") == [{"kind": "completed", "ok": False}] * 2


# What the backend ends up holding.


def test_the_completion_metadata_survives_late_progress(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    notifier = make_notifier()
    notifier.progress(31, update(0))
    receiver.wait_for_state(31, lambda s: s is not None and s.progress is not None)
    notifier.completed(31, "https://cdn/31.png", {"seed": 42, "steps": 50})
    notifier.progress(31, update(45))  # late: must not replace the stored JSON
    notifier.progress(32, update(10))
    receiver.wait_for_state(32, lambda s: s is not None)
    state = receiver.state(31)
    assert state is not None and (state.status, state.result_url) == (
        COMPLETED,
        "https://cdn/31.png",
    )
    assert state.progress == {
        **update(0).as_payload(),
        "seed": 42,
        "steps": 50,
    }


def test_a_failure_retried_through_a_rolled_back_commit_refunds_once(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.fail_next(2, 500, kind="failed")
    make_notifier().failed(12, ErrorCode.GPU_OOM, "GPU out of memory", 0)
    state = receiver.state(12)
    assert state is not None
    assert (state.status, state.refunds, state.error_code) == (FAILED, 1, "GPU_OOM")
    assert [r.status for r in receiver.of_kind("failed")] == [500, 500, 200]


def test_an_outage_longer_than_the_budget_raises_and_changes_nothing(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    receiver.fail_for(60, 503, kind="failed")
    with pytest.raises(NotifyError, match="4 attempt"):
        make_notifier().failed(13, ErrorCode.GPU_OOM, "oom", 0)
    assert receiver.state(13) is None


# Asking whether the backend accepts the credentials.

ACCESS_BODY = (
    b'{"generation_id":0,"progress":{"current_step":0,"total_steps":1,'
    b'"progress_percent":0,"estimated_seconds":null}}'
)


def test_check_access_accepts_the_real_backends_404_and_changes_nothing(
    make_notifier: NotifierFactory,
) -> None:
    telemetry = FakeTelemetry()
    with BackendReceiver(token=TOKEN, generations=[1]) as backend:
        make_notifier(base_url=backend.base_url, telemetry=telemetry).check_access()
        [request] = backend.requests
        assert backend.state(0) is None
        untouched = backend.state(1)
    assert (request.method, request.path, request.status) == ("PATCH", PROGRESS_PATH, 404)
    assert_common_headers(request)
    assert request.body == ACCESS_BODY
    assert telemetry.of("webhook") == []  # a probe, not a webhook
    assert untouched is not None and (untouched.status, untouched.progress) == (PENDING, None)


@pytest.mark.parametrize("status", [200, 204, 400, 404])
def test_check_access_accepts_any_answer_a_view_gives(
    receiver: BackendReceiver, make_notifier: NotifierFactory, status: int
) -> None:
    receiver.fail_next(1, status)
    make_notifier().check_access()
    assert [r.status for r in receiver.requests] == [status]


@pytest.mark.parametrize("status", [401, 403])
def test_check_access_refused_names_the_token_and_the_status(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime, status: int
) -> None:
    receiver.fail_next(1, status, body=f"bad token {TOKEN}")
    with pytest.raises(WebhookUnauthorized, match=f"HTTP {status}") as caught:
        make_notifier().check_access()
    assert "INTERNAL_API_TOKEN" in str(caught.value) and TOKEN not in str(caught.value)
    assert len(receiver.requests) == 1 and not fake_time.sleeps


def test_check_access_with_a_wrong_token_is_refused(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    with pytest.raises(WebhookUnauthorized, match="401.*INTERNAL_API_TOKEN"):
        make_notifier(token="stale-token").check_access()
    assert [r.status for r in receiver.requests] == [401]


@pytest.mark.parametrize("status", [500, 503, 429, 405])
def test_check_access_cannot_tell_on_other_answers_and_tries_once(
    receiver: BackendReceiver, make_notifier: NotifierFactory, fake_time: FakeTime, status: int
) -> None:
    receiver.fail_next(None, status)
    with pytest.raises(NotifyError, match=f"HTTP {status}") as caught:
        make_notifier().check_access()
    assert not isinstance(caught.value, WebhookUnauthorized)
    assert len(receiver.requests) == 1 and not fake_time.sleeps


def test_check_access_unreachable_or_slow_is_a_notify_error(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    with pytest.raises(NotifyError, match="no answer.*ConnectionError") as refused:
        make_notifier(base_url=f"http://127.0.0.1:{unused_port()}").check_access()
    assert not isinstance(refused.value, WebhookUnauthorized)
    receiver.set_delay(0.5)
    started = time.monotonic()
    with pytest.raises(NotifyError, match="no answer.*Timeout"):
        make_notifier(timeout_seconds=0.1).check_access()
    assert time.monotonic() - started < 0.45


def test_check_access_is_signed_like_the_webhooks(make_notifier: NotifierFactory) -> None:
    with BackendReceiver(token=TOKEN, signing_secret=WHSEC) as backend:
        make_notifier(base_url=backend.base_url, signing_secret=WHSEC).check_access()
        with pytest.raises(WebhookUnauthorized):
            make_notifier(base_url=backend.base_url, signing_secret="whsec_QUJD").check_access()
        first, second = backend.requests
    assert backend.verify(first) and not backend.verify(second)


def test_check_access_follows_a_token_rotation(
    receiver: BackendReceiver, make_notifier: NotifierFactory
) -> None:
    notifier = make_notifier()
    notifier.check_access()
    receiver.set_token("rotated-token")
    with pytest.raises(WebhookUnauthorized):
        notifier.check_access()
    with pytest.raises(WebhookUnauthorized):
        notifier.completed(3, "https://cdn/3.png", {})
    receiver.set_token(TOKEN)
    notifier.check_access()
    notifier.completed(3, "https://cdn/3.png", {})
    state = receiver.state(3)
    assert state is not None and state.status == COMPLETED


def test_check_access_after_close_is_a_notify_error(make_notifier: NotifierFactory) -> None:
    notifier = make_notifier()
    notifier.close()
    with pytest.raises(NotifyError, match="closed"):
        notifier.check_access()
