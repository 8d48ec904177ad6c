"""Wire models of the queue message, exactly as the backend publishes it (CONTRACT.md section 1).

Two shapes are accepted: the one the backend's code sends (flat ``data`` with ``aspect_ratio``,
``seed``, ``prompt_tags``, ``signature_*``) and the one its docs show (``data.parameters`` with
``width``/``height``/``steps``/``cfg_scale``/``seed``). Unknown fields are ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from domain.errors import InvalidRequest, UnsupportedTask

TASK_TYPE = "image_generation"
AspectRatio = Literal["1:1", "1:2", "2:1", "2:2"]
MAX_SEED = 2**63 - 1
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
"""Strict: JSON ``true`` must never become seed 1 (nor generation 1)."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Parameters(_Wire):
    """``data.parameters`` in the documented shape."""

    width: StrictInt | None = Field(default=None, gt=0)
    height: StrictInt | None = Field(default=None, gt=0)
    steps: StrictInt | None = Field(default=None, gt=0)
    cfg_scale: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] | None = None
    seed: Seed | None = None
    negative_prompt: str | None = None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value


class GenerationData(_Wire):
    """``data``: what to generate for which generation."""

    generation_id: StrictInt = Field(gt=0)
    style_id: StrictInt | None = None
    lora_path: str | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    prompt_tags: list[str] = Field(default_factory=list)
    aspect_ratio: AspectRatio | None = None
    seed: Seed | None = None
    signature_path: str | None = None
    # Validated by the domain (SignatureConfig.parse) so a bad value is SIGNATURE_INVALID.
    signature_config: Any = None
    artist_name: str | None = None
    parameters: Parameters | None = None


class GenerationMessage(_Wire):
    """One job from the ``image_generation`` queue."""

    task_id: str | None = None
    type: str
    data: GenerationData
    webhook_url: str | None = None
    callback_url: str | None = None
    created_at: str | None = None


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "message"
        given = item.get("input")
        shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
        parts.append(f"{where}: {item['msg']}{shown}")
    return "; ".join(parts)


def _decode(body: bytes | str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"message is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidRequest(f"message must be a JSON object, got {type(document).__name__}")
    return document


def parse_message(body: bytes | str) -> GenerationMessage:
    """Validate a queue message; raise ``InvalidRequest``/``UnsupportedTask`` naming the field."""
    document = _decode(body)
    task_type = document.get("type")
    if task_type is None:
        raise InvalidRequest("type: Field required")
    if task_type != TASK_TYPE:
        raise UnsupportedTask(f"type: expected {TASK_TYPE!r}, got {task_type!r}")
    try:
        return GenerationMessage.model_validate(document)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from exc


def peek_generation_id(body: bytes | str) -> int | None:
    """Best-effort ``data.generation_id`` of an invalid message, for the failure webhook."""
    try:
        document = _decode(body)
    except InvalidRequest:
        return None
    data = document.get("data")
    value = data.get("generation_id") if isinstance(data, dict) else None
    # The same rule as GenerationData.generation_id: a positive JSON integer, nothing else.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None
