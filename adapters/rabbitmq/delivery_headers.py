"""The worker's AMQP headers: what a delivery carries in, what a retried or parked copy carries.

A copy counts its attempts (``x-retry-count``) and hand-backs (``x-handback-count``) and says
why it was retried or parked; a parked one also carries the decided outcome as JSON. Whatever
fails while reading a delivery's headers is the caller's to catch: the delivery is then taken
as a first one (attempt 0, nothing carried), so its body decides.

A copy whose original headers could not be decoded (``header_codec``), or cannot be encoded
again, carries the worker's headers only, and why the original's were dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import pika

from adapters.rabbitmq.header_codec import (
    ORIGINAL_HEADERS_DROPPED,
    UNDECODABLE_HEADERS,
    encoding_problem,
)
from adapters.rabbitmq.inbox import Tag
from domain.errors import ErrorCode, FailureReport
from ports.task_source import Delivery

log = logging.getLogger(__package__)  # one logger for the whole adapter: adapters.rabbitmq

ATTEMPT_HEADER = "x-retry-count"
HANDBACK_HEADER = "x-handback-count"
PENDING_FAILURE_HEADER = "x-pending-failure"
"""Legacy: an earlier version carried a decided failure here; read, never written."""
REASON_HEADER = "x-reason"
PARK_REASON_HEADER = "x-park-reason"
DECIDED_OUTCOME_HEADER = "x-decided-outcome"
OUTCOME_TRUNCATED_HEADER = "x-decided-outcome-truncated"
"""Set, to the full size in bytes, when ``x-decided-outcome`` was cut to its limit."""
OVERFLOW_HEADER = "x-park-overflow"
"""On a copy whose park the full parked queue refused: how many times it was refused. Such a copy
is parked by the adapter when it comes back, without running (its park was decided)."""
PARKED_AT_HEADER = "x-parked-at"
MAX_COUNT = 2**31 - 1
"""The largest count the worker writes in a header (a signed 32-bit AMQP integer)."""
MAX_REASON_CHARS = 1000
MAX_OUTCOME_BYTES = 16 * 1024


def read_delivery(body: bytes, properties: Any, received_at: float, tag: Tag) -> Delivery:
    """A delivery with the counts and the failure its headers carry."""
    headers = getattr(properties, "headers", None) or {}
    attempt = header_count(headers.get(ATTEMPT_HEADER))
    handbacks = header_count(headers.get(HANDBACK_HEADER))
    return Delivery(
        body=body,
        attempt=attempt or 0,
        # Copies retried by an earlier version carry the attempt only; each was a hand-back.
        handbacks=handbacks if handbacks is not None else attempt or 0,
        received_at=received_at,
        tag=tag,
        carried_failure=_carried_failure(headers.get(PENDING_FAILURE_HEADER)),
    )


def retry_headers(delivery: Delivery, *, reason: str, attempt: int) -> dict[str, Any]:
    """The headers of a retried copy: its attempt, one more hand-back, and why."""
    return {
        ATTEMPT_HEADER: attempt,
        HANDBACK_HEADER: min(delivery.handbacks + 1, MAX_COUNT),
        REASON_HEADER: str(reason)[:MAX_REASON_CHARS],
    }


def park_headers(
    delivery: Delivery, reason: str, original_queue: str, outcome: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The headers of a parked copy: why, when, from where, its counts, the decided outcome."""
    headers: dict[str, Any] = {
        PARK_REASON_HEADER: str(reason)[:MAX_REASON_CHARS],
        PARKED_AT_HEADER: datetime.now(timezone.utc).isoformat(),
        "x-original-queue": original_queue,
        ATTEMPT_HEADER: delivery.attempt,
        HANDBACK_HEADER: delivery.handbacks,
    }
    if outcome is not None:
        headers.update(_outcome_headers(outcome))
    return headers


def overflow_headers(delivery: Delivery, park: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of a parked copy the full parked queue refused, sent to wait in a retry
    queue: the park's, one more hand-back, and how many times the parked queue refused it
    (counts capped, so that they always encode)."""
    return {
        **park,
        HANDBACK_HEADER: min(delivery.handbacks + 1, MAX_COUNT),
        OVERFLOW_HEADER: min((overflows(delivery) or 0) + 1, MAX_COUNT),
    }


def overflows(delivery: Delivery) -> int | None:
    """How many times the full parked queue refused this message's park; None when the
    delivery is not such a copy, and its body decides. A copy is one only as the worker writes
    it: a count of at least 1 beside the park's own ``x-park-reason`` and ``x-parked-at`` (a job
    published with a stray ``x-park-overflow`` runs as any other)."""
    headers = getattr(getattr(delivery.tag, "properties", None), "headers", None) or {}
    count = header_count(headers.get(OVERFLOW_HEADER))
    if not count or not all(
        isinstance(headers.get(name), (str, bytes)) and headers.get(name)
        for name in (PARK_REASON_HEADER, PARKED_AT_HEADER)
    ):
        return None
    return count


def copy_properties(original: Any, headers: Mapping[str, Any]) -> pika.BasicProperties:
    """The original's properties for a re-published copy: persistent, headers merged (but for
    ``x-park-overflow``, which a copy carries only when ``headers`` set it).

    The marker of undecodable headers is not copied as if it were a header of the message: the
    copy says instead, in ``x-original-headers-dropped``, that the original's were lost and why
    (the copy's own headers decode, so it is an ordinary delivery from then on). So do headers
    that decoded but cannot be encoded again: publishing them would fail."""
    # x-park-overflow: only a copy sent to wait for room carries it (``headers`` set it then).
    merged = carried_headers(
        getattr(original, "headers", None) or {},
        (PENDING_FAILURE_HEADER, OVERFLOW_HEADER),
        headers,
    )
    return pika.BasicProperties(
        content_type=getattr(original, "content_type", None) or "application/json",
        content_encoding=getattr(original, "content_encoding", None),
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=getattr(original, "message_id", None),
        correlation_id=getattr(original, "correlation_id", None),
        timestamp=getattr(original, "timestamp", None),
        type=getattr(original, "type", None),
        app_id=getattr(original, "app_id", None),
        headers=merged,
    )


def carried_headers(
    original: Mapping[str, Any], dropped: Iterable[str], headers: Mapping[str, Any]
) -> dict[str, Any]:
    """The headers a copy carries: the original's but ``dropped``, then ``headers``. Headers
    that could not be decoded are replaced by ``x-original-headers-dropped`` saying so; when the
    rest cannot be encoded again, the copy carries ``headers`` only, and why."""
    merged = {name: value for name, value in original.items() if name not in set(dropped)}
    undecodable = merged.pop(UNDECODABLE_HEADERS, None)
    if undecodable is not None:
        merged[ORIGINAL_HEADERS_DROPPED] = undecodable
    merged.update(headers)
    problem = encoding_problem(merged)
    if problem is not None:
        log.warning("the original's headers are not copied: %s", problem)
        merged = {ORIGINAL_HEADERS_DROPPED: problem, **headers}
    return merged


def _outcome_headers(outcome: Mapping[str, Any]) -> dict[str, Any]:
    """``outcome`` as JSON text, cut to MAX_OUTCOME_BYTES (and then said so)."""
    try:
        text = json.dumps(dict(outcome), default=str, ensure_ascii=False)
    except (TypeError, ValueError):  # keys JSON cannot take, a circular reference
        text = json.dumps({"repr": repr(outcome)}, ensure_ascii=False)
    raw = text.encode()
    if len(raw) <= MAX_OUTCOME_BYTES:
        return {DECIDED_OUTCOME_HEADER: text}
    return {
        DECIDED_OUTCOME_HEADER: raw[:MAX_OUTCOME_BYTES].decode(errors="ignore"),
        OUTCOME_TRUNCATED_HEADER: len(raw),
    }


def header_count(raw: object) -> int | None:
    """A non-negative integer header, or None (anything else: a string, a bool, a negative)."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    return None


def _carried_failure(raw: object) -> FailureReport | None:
    """The legacy ``x-pending-failure`` header, read strictly: anything else is ignored."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)  # type: ignore[arg-type]
        report = FailureReport(
            generation_id=data["generation_id"],
            code=ErrorCode(data["code"]),
            message=data["message"],
            retry_count=data["retry_count"],
            poison=data.get("poison", False),
        )
    # Anything: RecursionError from deeply nested JSON, an error of an odd header type...
    except Exception:  # pylint: disable=broad-exception-caught
        report = None
    if (
        report is None
        or header_count(report.generation_id) is None
        or not isinstance(report.message, str)
        or header_count(report.retry_count) is None
        or not isinstance(report.poison, bool)
    ):
        log.warning("unreadable %s header ignored: %.200r", PENDING_FAILURE_HEADER, raw)
        return None
    return report
