"""The test backend holds what the real backend's views store (docs/contract.md, "What the
backend does with each call").

The end-to-end tests assert on this state (a refund counted twice, metadata erased by a late
progress call), so the receiver's own rules are tested here with plain HTTP calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.integration.backend_receiver import (
    COMPLETED,
    FAILED,
    PENDING,
    PATHS,
    BackendReceiver,
)

TOKEN = "receiver-test-token"
PATH_OF = {kind: path for path, kind in PATHS.items()}
METHOD_OF = {"progress": "PATCH", "complete": "POST", "failed": "POST"}


@pytest.fixture
def backend() -> Iterator[BackendReceiver]:
    with BackendReceiver(token=TOKEN) as receiver:
        yield receiver


def call(
    backend: BackendReceiver,
    kind: str,
    payload: dict[str, Any],
    *,
    token: str = TOKEN,
    source: str = "inference-server",
    timeout: float = 2.0,
) -> int:
    """One webhook call as the worker makes it; the status answered."""
    response = requests.request(
        METHOD_OF[kind],
        backend.base_url + PATH_OF[kind],
        json=payload,
        headers={"Authorization": f"Bearer {token}", "X-Request-Source": source},
        timeout=timeout,
    )
    return response.status_code


def progress(generation_id: int, step: int, **extra: Any) -> dict[str, Any]:
    body = {"current_step": step, "total_steps": 50, "progress_percent": step * 2, **extra}
    return {"generation_id": generation_id, "progress": body}


def complete(generation_id: int, **metadata: Any) -> dict[str, Any]:
    return {
        "generation_id": generation_id,
        "result_url": f"https://cdn/{generation_id}.png",
        "metadata": metadata,
    }


def failed(generation_id: int, code: str = "MODEL_ERROR") -> dict[str, Any]:
    return {
        "generation_id": generation_id,
        "error_message": "boom",
        "error_code": code,
        "retry_count": 0,
    }


def test_progress_replaces_the_stored_json(backend: BackendReceiver) -> None:
    assert call(backend, "progress", progress(1, 10, estimated_seconds=9, note="x")) == 200
    assert call(backend, "progress", progress(1, 20)) == 200
    state = backend.state(1)
    assert state is not None and state.status == PENDING
    assert state.progress == {"current_step": 20, "total_steps": 50, "progress_percent": 40}


def test_completion_merges_metadata_and_late_progress_erases_it(backend: BackendReceiver) -> None:
    call(backend, "progress", progress(2, 45))
    assert call(backend, "complete", complete(2, seed=42, steps=50)) == 200
    state = backend.state(2)
    assert state is not None and (state.status, state.result_url) == (
        COMPLETED,
        "https://cdn/2.png",
    )
    assert state.progress == {
        "current_step": 45,
        "total_steps": 50,
        "progress_percent": 90,
        "seed": 42,
        "steps": 50,
    }
    assert call(backend, "complete", complete(2, seed=42, steps=50)) == 200
    assert backend.state(2) == state  # the same completion again is harmless
    call(backend, "progress", progress(2, 49))
    erased = backend.state(2)
    assert erased is not None and "seed" not in (erased.progress or {})


def test_every_failure_call_refunds_whatever_the_status(backend: BackendReceiver) -> None:
    call(backend, "complete", complete(3, seed=1))
    assert call(backend, "failed", failed(3, "GPU_OOM")) == 200
    assert call(backend, "failed", failed(3, "GPU_OOM")) == 200
    state = backend.state(3)
    assert state is not None
    assert (state.status, state.refunds, state.error_code) == (FAILED, 2, "GPU_OOM")
    assert state.result_url == "https://cdn/3.png"  # the image was given away and refunded


def test_refusals_change_nothing(backend: BackendReceiver) -> None:
    assert call(backend, "failed", failed(4), token="wrong") == 401
    assert call(backend, "failed", failed(4), source="browser") == 403
    assert call(backend, "failed", {"generation_id": 4}) == 400
    assert call(backend, "complete", {"generation_id": 4, "metadata": {}}) == 400
    assert backend.state(4) is None


def test_any_id_is_accepted_until_generations_are_registered(backend: BackendReceiver) -> None:
    assert call(backend, "progress", progress(777, 0)) == 200
    backend.register(5)
    assert call(backend, "failed", failed(778)) == 404
    assert call(backend, "failed", failed(5)) == 200
    assert call(backend, "progress", progress(777, 1)) == 200  # it exists by now
    assert backend.state(778) is None
    state = backend.state(5)
    assert state is not None and state.refunds == 1


def test_registered_generations_exist_pending_and_others_are_404() -> None:
    with BackendReceiver(token=TOKEN, generations=[6]) as backend:
        state = backend.state(6)
        assert state is not None and (state.status, state.progress, state.refunds) == (
            PENDING,
            None,
            0,
        )
        assert call(backend, "complete", complete(0)) == 404
        assert backend.state(0) is None


def test_injected_failures_for_n_calls_roll_back(backend: BackendReceiver) -> None:
    backend.fail_next(2, 500, kind="failed")
    assert [call(backend, "failed", failed(7)) for _ in range(3)] == [500, 500, 200]
    assert call(backend, "complete", complete(8)) == 200
    state = backend.state(7)
    assert state is not None and state.refunds == 1


def test_injected_failures_for_a_while(backend: BackendReceiver) -> None:
    backend.fail_for(0.4, 503, kind="failed")
    assert call(backend, "failed", failed(9)) == 503
    assert call(backend, "progress", progress(9, 1)) == 200
    time.sleep(0.5)
    assert call(backend, "failed", failed(9)) == 200
    state = backend.state(9)
    assert state is not None and state.refunds == 1


def test_unauthorized_for_a_while_then_back(backend: BackendReceiver) -> None:
    backend.fail_for(0.3, 401)
    assert call(backend, "complete", complete(10)) == 401
    time.sleep(0.4)
    assert call(backend, "complete", complete(10)) == 200


def test_a_rotated_token_refuses_the_old_one(backend: BackendReceiver) -> None:
    backend.set_token("new-token")
    assert call(backend, "complete", complete(11)) == 401
    assert call(backend, "complete", complete(11), token="new-token") == 200


def test_a_call_whose_answer_is_lost_is_still_applied(backend: BackendReceiver) -> None:
    backend.set_delay(0.4, kind="failed")
    with pytest.raises(requests.Timeout):
        call(backend, "failed", failed(12), timeout=0.1)
    state = backend.wait_for_state(12, lambda s: s is not None and s.refunds == 1)
    assert state is not None and state.status == FAILED


def test_wait_for_state_times_out_naming_the_generation(backend: BackendReceiver) -> None:
    with pytest.raises(TimeoutError, match="generation 13"):
        backend.wait_for_state(13, lambda s: s is not None, timeout=0.1)


def test_fail_for_refuses_a_negative_duration(backend: BackendReceiver) -> None:
    with pytest.raises(ValueError, match="-1"):
        backend.fail_for(-1)
