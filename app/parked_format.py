"""How ``python -m app parked`` shows a parked message: ``list``'s table, ``show``'s text, and
the whole message as one JSON line (``show --json``, ``purge --save``)."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from decimal import Decimal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.rabbitmq.parked import ParkedMessage


def body_fields(body: bytes) -> dict[str, str]:
    """``{"body": text}`` when the body is UTF-8, else ``{"body_base64": ...}``."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(body).decode("ascii")}


def json_value(value: Any) -> Any:
    """A ``json.dumps`` default for header and property values."""
    if isinstance(value, bytes):
        return body_fields(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return repr(value)


def outcome_value(text: str | None) -> Any:
    """The decided outcome parsed when it is JSON (it is cut when large), else the text."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def summary(message: ParkedMessage) -> dict[str, Any]:
    """The fields ``list`` shows."""
    return {
        "id": message.id,
        "parked_at": message.parked_at,
        "generation_id": message.generation_id,
        "task_id": message.task_id,
        "reason": message.reason,
        "attempts": message.attempts,
        "decided_outcome": outcome_value(message.decided_outcome),
    }


def whole(message: ParkedMessage) -> dict[str, Any]:
    """Everything about one message: ``show --json`` and each line ``purge`` prints."""
    return {
        **summary(message),
        "original_queue": message.original_queue,
        "handbacks": message.handbacks,
        "decided_outcome_full_size": message.outcome_full_size,
        "properties": message.property_values,
        "headers": message.headers,
        **body_fields(message.body),
    }


def to_json(fields: dict[str, Any]) -> str:
    """One JSON line."""
    return json.dumps(fields, default=json_value, ensure_ascii=False)


def outcome_brief(text: str | None) -> str:
    """The decided outcome in a few words for ``list``: its kind and error code."""
    outcome = outcome_value(text)
    if isinstance(outcome, dict):
        words = [str(outcome[key]) for key in ("kind", "error_code") if outcome.get(key)]
        return " ".join(words) or "?"
    return "-" if outcome is None else str(outcome)[:20]


def table(messages: Sequence[ParkedMessage]) -> list[str]:
    """``list``'s lines, one per message, under a header line."""
    rows = [("ID", "PARKED AT", "GENERATION", "TASK_ID", "ATTEMPTS", "OUTCOME", "REASON")]
    for message in messages:
        rows.append(
            (
                message.id,
                message.parked_at or "-",
                str(message.generation_id if message.generation_id is not None else "-"),
                message.task_id or "-",
                str(message.attempts if message.attempts is not None else "-"),
                outcome_brief(message.decided_outcome),
                " ".join((message.reason or "-").split())[:100],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]) for row in rows]


def describe(message: ParkedMessage) -> list[str]:
    """``show``'s text: the fields, the properties, every header, the outcome, the body."""
    fields = whole(message)
    lines = [f"id: {message.id}"]
    for key in ("parked_at", "generation_id", "task_id", "reason", "original_queue"):
        lines.append(f"{key}: {fields[key] if fields[key] is not None else '-'}")
    lines.append(f"attempts: {fields['attempts']}  handbacks: {fields['handbacks']}")
    lines.append("properties:")
    lines += [f"  {name}: {value}" for name, value in fields["properties"].items()]
    lines.append("headers:")
    lines += [f"  {name}: {to_json(value)}" for name, value in fields["headers"].items()]
    outcome = message.decided_outcome
    if outcome is not None:
        cut = message.outcome_full_size
        lines.append("decided outcome" + (f" (cut, {cut} bytes in full):" if cut else ":"))
        lines.append(f"  {outcome}")
    if "body" in fields:
        lines += ["body:", fields["body"]]
    else:
        lines += ["body (not UTF-8, base64):", fields["body_base64"]]
    return lines
