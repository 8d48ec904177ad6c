"""Job ids on log records: set by ``log_ids``, per thread, carried across thread hand-offs."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from domain.log_context import (
    LogIds,
    LogIdsFilter,
    carry_log_ids,
    current_log_ids,
    log_ids,
)


class Recorder(logging.Handler):
    """Keeps the records that passed its filters."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(LogIdsFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def ids(self) -> list[tuple[object, object, str]]:
        return [(r.generation_id, r.task_id, r.getMessage()) for r in self.records]


@pytest.fixture
def recorder() -> Recorder:
    logger = logging.getLogger("tests.log_context")
    handler = Recorder()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


LOG = logging.getLogger("tests.log_context")


def test_outside_a_job_the_ids_are_none(recorder: Recorder) -> None:
    assert current_log_ids() is None
    LOG.info("idle")
    assert recorder.ids() == [(None, None, "idle")]


def test_job_context_stamps_the_ids_and_restores_them_even_on_error(recorder: Recorder) -> None:
    with pytest.raises(RuntimeError):
        with log_ids(generation_id=456, task_id="t-1") as context:
            assert context == LogIds(456, "t-1") and current_log_ids() == context
            LOG.info("inside")
            raise RuntimeError("boom")
    LOG.info("after")
    assert recorder.ids() == [(456, "t-1", "inside"), (None, None, "after")]
    assert current_log_ids() is None


def test_a_nested_context_keeps_the_outer_ids_it_does_not_set(recorder: Recorder) -> None:
    with log_ids(task_id="t-9"):
        with log_ids(generation_id=7):
            LOG.info("nested")
        LOG.info("outer")
    assert recorder.ids() == [(7, "t-9", "nested"), (None, "t-9", "outer")]


def test_each_thread_sees_only_its_own_job(recorder: Recorder) -> None:
    barrier = threading.Barrier(2)

    def work(generation_id: int) -> None:
        with log_ids(generation_id=generation_id, task_id=f"task-{generation_id}"):
            barrier.wait()  # both threads are inside their job at once
            LOG.info("working on %d", generation_id)
            barrier.wait()

    threads = [threading.Thread(target=work, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(recorder.ids()) == [(1, "task-1", "working on 1"), (2, "task-2", "working on 2")]


def test_carry_job_context_hands_the_ids_to_a_pool_thread(recorder: Recorder) -> None:
    with ThreadPoolExecutor(1) as pool, log_ids(generation_id=42, task_id="t-42"):
        pool.submit(carry_log_ids(LOG.info), "carried").result()
        pool.submit(LOG.info, "not carried").result()
    assert recorder.ids() == [(42, "t-42", "carried"), (None, None, "not carried")]


def test_an_explicit_extra_id_wins_over_the_context(recorder: Recorder) -> None:
    with log_ids(generation_id=1, task_id="t-1"):
        LOG.info("poison", extra={"generation_id": 99})
    assert recorder.ids() == [(99, "t-1", "poison")]


def test_an_explicit_extra_task_id_wins_over_the_context(recorder: Recorder) -> None:
    with log_ids(generation_id=1, task_id="t-1"):
        LOG.info("redelivered", extra={"task_id": "t-99"})
    assert recorder.ids() == [(1, "t-99", "redelivered")]


def test_carry_job_context_passes_keyword_arguments_on(recorder: Recorder) -> None:
    def upload(key: str, *, bucket: str) -> str:
        LOG.info("upload %s to %s", key, bucket)
        return f"{bucket}/{key}"

    with ThreadPoolExecutor(1) as pool, log_ids(generation_id=5, task_id="t-5"):
        result = pool.submit(carry_log_ids(upload), "a.png", bucket="images").result()
    assert result == "images/a.png"
    assert recorder.ids() == [(5, "t-5", "upload a.png to images")]
