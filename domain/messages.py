"""Wire models of the queue message, exactly as the backend publishes it (docs/contract.md,
"Queue message").

Two shapes are accepted: the one the backend's code sends (flat ``data`` with ``aspect_ratio``,
``seed``, ``prompt_tags``, ``signature_*``) and the one its docs show (``data.parameters`` with
``width``/``height``/``steps``/``cfg_scale``/``seed``). Unknown fields are ignored.

Any bytes at all may arrive on the queue, so reading a message raises nothing but
``InvalidRequest``/``UnsupportedTask``, and ``peek_identity`` raises nothing at all. Every string
and list is bounded here, at the edge, so no later stage is fed megabytes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from pydantic_core import PydanticCustomError

from domain.errors import InvalidRequest, UnsupportedTask

TASK_TYPE = "image_generation"
AspectRatio = Literal["1:1", "1:2", "2:1", "2:2"]

MAX_INT64 = 2**63 - 1
"""Every integer of the message fits a signed 64-bit column (the backend's ids, torch's seed)."""

MAX_TASK_ID_CHARS = 200
"""A UUID is 36 characters; room for any other id scheme, not for a payload."""
MAX_WIRE_PROMPT_CHARS = 10_000
"""Far above ``RequestPolicy.max_prompt_chars`` (2000 by default), which decides what is too
long; this bound only keeps megabytes away from whitespace folding and prompt composition."""
MAX_PROMPT_TAGS = 64
"""Composing checks every tag against the prompt; the backend sends a handful of tags."""
MAX_TAG_CHARS = 100
MAX_ARTIST_NAME_CHARS = 100
"""A name to stamp on an image; the text signature's own bound (``MAX_SIGNATURE_TEXT_CHARS``)."""
MAX_PATH_CHARS = 1024
"""An S3 key is at most 1024 bytes."""
MAX_URL_CHARS = 2048
"""The usual limit of browsers and proxies; the URLs are informational anyway."""
MAX_CREATED_AT_CHARS = 64
"""An ISO 8601 timestamp is under 40 characters."""
MAX_SIGNATURE_CONFIG_KEYS = 8
"""The contract names three keys (position, size, opacity); room for a few the backend may add."""

MAX_MESSAGE_BYTES = 256 * 1024
"""The largest body read; a larger one is refused before it is parsed. A message with every
string above at its bound holds about 43 000 characters. The backend writes it with
``json.dumps``, which escapes each non-ASCII character as ``\\uXXXX`` (6 bytes), so that message
in non-ASCII text weighs 258 264 bytes: 256 KiB (262 144 bytes) holds it, where 64 KiB would
refuse legal non-ASCII messages. Parsing 256 KiB takes about a millisecond."""

PositiveInt = Annotated[StrictInt, Field(gt=0, le=MAX_INT64)]
"""Strict: JSON ``true`` must never become generation 1, nor ``"7"`` generation 7."""
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_INT64)]
"""Strict: JSON ``true`` must never become seed 1."""
TaskId = Annotated[StrictStr, Field(max_length=MAX_TASK_ID_CHARS)]
Prompt = Annotated[StrictStr, Field(max_length=MAX_WIRE_PROMPT_CHARS)]
Tag = Annotated[StrictStr, Field(max_length=MAX_TAG_CHARS)]
ObjectPath = Annotated[StrictStr, Field(max_length=MAX_PATH_CHARS)]
Url = Annotated[StrictStr, Field(max_length=MAX_URL_CHARS)]

_GENERATION_ID = TypeAdapter(PositiveInt)
_TASK_ID = TypeAdapter(TaskId)
_SHOWN_CHARS = 60
_MULTIPLE_OF_8 = "multiple_of_8"
_NAMES_THE_VALUE = frozenset({_MULTIPLE_OF_8})


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Parameters(_Wire):
    """``data.parameters`` in the documented shape."""

    width: PositiveInt | None = None
    height: PositiveInt | None = None
    steps: PositiveInt | None = None
    cfg_scale: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] | None = None
    seed: Seed | None = None
    negative_prompt: Prompt | None = None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise PydanticCustomError(
                _MULTIPLE_OF_8, "must be a multiple of 8, got {value}", {"value": value}
            )
        return value


class GenerationData(_Wire):
    """``data``: what to generate for which generation."""

    generation_id: PositiveInt
    style_id: Annotated[StrictInt, Field(ge=0, le=MAX_INT64)] | None = None
    lora_path: ObjectPath | None = None
    prompt: Prompt = ""
    negative_prompt: Prompt | None = None
    prompt_tags: Annotated[list[Tag], Field(max_length=MAX_PROMPT_TAGS)] = Field(
        default_factory=list
    )
    aspect_ratio: AspectRatio | None = None
    seed: Seed | None = None
    signature_path: ObjectPath | None = None
    # An object; its values are checked by the domain (SignatureConfig.parse), so a bad position,
    # size or opacity is SIGNATURE_INVALID.
    signature_config: (
        Annotated[dict[str, Any], Field(max_length=MAX_SIGNATURE_CONFIG_KEYS)] | None
    ) = None
    artist_name: Annotated[StrictStr, Field(max_length=MAX_ARTIST_NAME_CHARS)] | None = None
    parameters: Parameters | None = None


class GenerationMessage(_Wire):
    """One job from the ``image_generation`` queue."""

    task_id: TaskId | None = None
    type: Literal["image_generation"]
    data: GenerationData
    webhook_url: Url | None = None
    callback_url: Url | None = None
    created_at: Annotated[StrictStr, Field(max_length=MAX_CREATED_AT_CHARS)] | None = None


def short_repr(value: object) -> str:
    """A short, safe rendering of a value from a message, for an error message.

    Containers are named, not printed (they may be nested deeper than ``repr`` can go); long
    values are cut, so an error message never echoes a payload.
    """
    if value is not None and not isinstance(value, (str, int, float)):
        return type(value).__name__
    try:
        text = repr(value)
    except ValueError:  # an int past the interpreter's digit limit
        return "a number too long to show"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "message"
        given = item.get("input")
        named = item["type"] in _NAMES_THE_VALUE or isinstance(given, (dict, list))
        given_part = "" if named else f" (got {short_repr(given)})"
        parts.append(f"{where}: {item['msg']}{given_part}")
    return "; ".join(parts)


def _decode(body: bytes | str) -> dict[str, Any]:
    """The body as a JSON object; ``InvalidRequest`` for anything else, whatever the bytes."""
    if not isinstance(body, (bytes, str)):
        raise InvalidRequest(f"message must be bytes or text, got {type(body).__name__}")
    size = len(body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body)
    if size > MAX_MESSAGE_BYTES:
        raise InvalidRequest(f"message is {size} bytes, more than the limit of {MAX_MESSAGE_BYTES}")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"message is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRequest("message is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # an integer literal past the interpreter's digit limit
        raise InvalidRequest(f"message cannot be read: {exc}") from exc
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
        raise UnsupportedTask(f"type: expected {TASK_TYPE!r}, got {short_repr(task_type)}")
    try:
        return GenerationMessage.model_validate(document)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from exc


def peek_identity(body: bytes | str) -> tuple[int | None, str | None]:
    """Best-effort ``(data.generation_id, task_id)`` of any body, for logs and the failure webhook.

    Never raises. Each part follows the model's own rule (the same pydantic types) and is None
    where the body does not hold a valid one; a body over ``MAX_MESSAGE_BYTES`` is not parsed.
    """
    try:
        document = _decode(body)
    except InvalidRequest:
        return None, None
    data = document.get("data")
    generation_id = _valid(
        _GENERATION_ID, data.get("generation_id") if isinstance(data, dict) else None
    )
    task_id = _valid(_TASK_ID, document.get("task_id"))
    return generation_id, task_id


def _valid(adapter: TypeAdapter[Any], value: object) -> Any:
    """``value`` when ``adapter`` accepts it, else None."""
    if value is None:
        return None
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None
