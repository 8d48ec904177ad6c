"""Queue message parsing: both shapes the backend sends, and every way a message is refused."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from domain.errors import ErrorCode, GenerationError, InvalidRequest, UnsupportedTask
from domain.messages import GenerationMessage, parse_message, peek_identity

# The message as the backend's code sends it, verbatim (docs/contract.md, "Queue message": the
# first shape).
BACKEND_MESSAGE = """{
  "task_id": "660f9511-f3ac-52e5-b827-557766551111",
  "type": "image_generation",
  "data": {
    "generation_id": 456,
    "style_id": 123,
    "lora_path": "s3://stylelicense-models/styles/123/",
    "prompt": "watercolor, portrait, vintage",
    "aspect_ratio": "1:1",
    "seed": 42,
    "signature_path": "s3://stylelicense-media/signatures/77.png",
    "signature_config": {"position": "bottom-right", "size": "medium", "opacity": 0.7},
    "prompt_tags": ["watercolor", "portrait", "vintage"]
  },
  "webhook_url": "https://api.example.com/api/webhooks/generation/456/status"
}"""

# The message as the backend's own documentation shows it, verbatim (docs/contract.md, "Queue
# message": the second shape).
DOCUMENTED_MESSAGE = """{
  "task_id": "…", "type": "image_generation",
  "data": {
    "generation_id": 456, "style_id": 123,
    "prompt": "a beautiful sunset over mountains, watercolor style",
    "negative_prompt": "blurry, low quality",
    "parameters": {"width": 512, "height": 512, "steps": 50, "cfg_scale": 7.5, "seed": 42}
  },
  "callback_url": "…", "created_at": "2025-01-20T11:30:00.000Z"
}"""

_MISSING = object()
LARGEST_INT64 = 9223372036854775807  # 2**63 - 1, written out: a wrong bound must not follow along


def _as_body(text: str, kind: str) -> bytes | str:
    return text.encode("utf-8") if kind == "bytes" else text


def _backend_document() -> dict[str, Any]:
    return json.loads(BACKEND_MESSAGE)


def _documented_document() -> dict[str, Any]:
    return json.loads(DOCUMENTED_MESSAGE)


def _with(document: dict[str, Any], path: str, value: Any) -> str:
    """The document as JSON with ``path`` (dotted) set to ``value``, or removed for _MISSING."""
    changed = copy.deepcopy(document)
    *parents, leaf = path.split(".")
    target = changed
    for key in parents:
        target = target[key]
    if value is _MISSING:
        del target[leaf]
    else:
        target[leaf] = value
    return json.dumps(changed)


def _refusal(body: bytes | str) -> GenerationError:
    with pytest.raises(GenerationError) as caught:
        parse_message(body)
    return caught.value


@pytest.mark.parametrize("kind", ["bytes", "str"])
def test_backend_shape_is_accepted(kind: str) -> None:
    message = parse_message(_as_body(BACKEND_MESSAGE, kind))

    assert isinstance(message, GenerationMessage)
    assert message.task_id == "660f9511-f3ac-52e5-b827-557766551111"
    assert message.type == "image_generation"
    assert message.webhook_url == "https://api.example.com/api/webhooks/generation/456/status"
    assert message.callback_url is None
    data = message.data
    assert data.generation_id == 456
    assert data.style_id == 123
    assert data.lora_path == "s3://stylelicense-models/styles/123/"
    assert data.prompt == "watercolor, portrait, vintage"
    assert data.aspect_ratio == "1:1"
    assert data.seed == 42
    assert data.signature_path == "s3://stylelicense-media/signatures/77.png"
    assert data.signature_config == {"position": "bottom-right", "size": "medium", "opacity": 0.7}
    assert data.prompt_tags == ["watercolor", "portrait", "vintage"]
    assert data.parameters is None
    assert data.negative_prompt is None


@pytest.mark.parametrize("kind", ["bytes", "str"])
def test_documented_shape_is_accepted(kind: str) -> None:
    message = parse_message(_as_body(DOCUMENTED_MESSAGE, kind))

    assert message.task_id == "…"
    assert message.callback_url == "…"
    assert message.created_at == "2025-01-20T11:30:00.000Z"
    assert message.webhook_url is None
    data = message.data
    assert data.generation_id == 456
    assert data.style_id == 123
    assert data.prompt == "a beautiful sunset over mountains, watercolor style"
    assert data.negative_prompt == "blurry, low quality"
    assert data.prompt_tags == []
    assert data.aspect_ratio is None
    assert data.seed is None
    params = data.parameters
    assert params is not None
    assert (params.width, params.height, params.steps) == (512, 512, 50)
    assert params.cfg_scale == 7.5
    assert params.seed == 42


def test_minimal_message_takes_defaults() -> None:
    message = parse_message('{"type": "image_generation", "data": {"generation_id": 1}}')
    assert message.task_id is None
    assert message.data.prompt == ""
    assert message.data.prompt_tags == []
    assert message.data.lora_path is None
    assert message.data.signature_config is None


def test_unknown_fields_are_ignored_at_every_level() -> None:
    document = _documented_document()
    document["priority"] = "high"
    document["data"]["user_id"] = 9
    document["data"]["parameters"]["sampler"] = "euler"

    message = parse_message(json.dumps(document))

    assert message == parse_message(DOCUMENTED_MESSAGE)
    assert not hasattr(message, "priority")
    assert not hasattr(message.data, "user_id")


@pytest.mark.parametrize(
    "document, path, value, field",
    [
        ("backend", "data", _MISSING, "data"),
        ("backend", "data", "not an object", "data"),
        ("backend", "data.generation_id", _MISSING, "data.generation_id"),
        ("backend", "data.generation_id", 0, "data.generation_id"),
        ("backend", "data.generation_id", -3, "data.generation_id"),
        ("backend", "data.generation_id", 4.5, "data.generation_id"),
        ("backend", "data.generation_id", "abc", "data.generation_id"),
        ("backend", "data.generation_id", None, "data.generation_id"),
        ("backend", "data.aspect_ratio", "3:1", "data.aspect_ratio"),
        ("backend", "data.aspect_ratio", "1x1", "data.aspect_ratio"),
        ("backend", "data.seed", -1, "data.seed"),
        ("backend", "data.seed", LARGEST_INT64 + 1, "data.seed"),
        ("backend", "data.prompt_tags", "watercolor", "data.prompt_tags"),
        ("backend", "data.prompt_tags", {"a": 1}, "data.prompt_tags"),
        ("backend", "data.prompt_tags", [1, 2], "data.prompt_tags.0"),
        ("documented", "data.parameters.width", 500, "data.parameters.width"),
        ("documented", "data.parameters.height", 100, "data.parameters.height"),
        ("documented", "data.parameters.width", 0, "data.parameters.width"),
        ("documented", "data.parameters.seed", -1, "data.parameters.seed"),
        ("documented", "data.parameters.seed", LARGEST_INT64 + 1, "data.parameters.seed"),
        ("documented", "data.parameters.steps", 0, "data.parameters.steps"),
        ("documented", "data.parameters.steps", -5, "data.parameters.steps"),
        ("documented", "data.parameters.cfg_scale", -0.5, "data.parameters.cfg_scale"),
        ("documented", "data.parameters", [512, 512], "data.parameters"),
    ],
)
def test_invalid_field_is_refused_naming_it(
    document: str, path: str, value: Any, field: str
) -> None:
    base = _backend_document() if document == "backend" else _documented_document()

    error = _refusal(_with(base, path, value))

    assert isinstance(error, InvalidRequest)
    assert error.code is ErrorCode.INVALID_REQUEST
    assert error.retryable is False
    assert f"{field}: " in error.message


def test_largest_seed_is_accepted() -> None:
    message = parse_message(_with(_backend_document(), "data.seed", LARGEST_INT64))
    assert message.data.seed == LARGEST_INT64


def test_null_seed_is_accepted() -> None:
    assert parse_message(_with(_backend_document(), "data.seed", None)).data.seed is None


def test_several_bad_fields_are_all_named() -> None:
    document = _documented_document()
    document["data"]["parameters"]["width"] = 100
    document["data"]["parameters"]["steps"] = 0

    message = _refusal(json.dumps(document)).message

    assert message == (
        "data.parameters.width: must be a multiple of 8, got 100;"
        " data.parameters.steps: Input should be greater than 0 (got 0)"
    )


def test_generation_id_true_is_refused() -> None:
    # JSON `true` is not an id; peek_identity refuses it, so parsing must too (it would
    # otherwise run and report generation 1, someone else's job).
    error = _refusal(_with(_backend_document(), "data.generation_id", True))
    assert error.code is ErrorCode.INVALID_REQUEST
    assert "data.generation_id: " in error.message


@pytest.mark.parametrize(
    "body",
    [b"not json", "not json", b"", "{", b'{"type": "image_generation",}', "'single quotes'"],
)
def test_not_json_is_invalid_request(body: bytes | str) -> None:
    error = _refusal(body)
    assert isinstance(error, InvalidRequest)
    assert error.code is ErrorCode.INVALID_REQUEST
    assert error.retryable is False
    assert "not valid JSON" in error.message


def test_bytes_that_are_not_utf8_are_invalid_request() -> None:
    body = BACKEND_MESSAGE.replace("watercolor, portrait", "watercolor\xe9").encode("latin-1")

    error = _refusal(body)

    assert error.code is ErrorCode.INVALID_REQUEST
    assert "not valid JSON" in error.message
    assert "utf-8" in error.message


@pytest.mark.parametrize(
    "body, kind", [("[1, 2]", "list"), ('"image_generation"', "str"), ("42", "int")]
)
def test_json_that_is_not_an_object_is_invalid_request(body: str, kind: str) -> None:
    error = _refusal(body)
    assert error.code is ErrorCode.INVALID_REQUEST
    assert "must be a JSON object" in error.message
    assert error.message.endswith(f"got {kind}")


@pytest.mark.parametrize("value", [_MISSING, None])
def test_missing_type_is_invalid_request(value: Any) -> None:
    error = _refusal(_with(_backend_document(), "type", value))
    assert isinstance(error, InvalidRequest)
    assert error.code is ErrorCode.INVALID_REQUEST
    assert error.message == "type: Field required"


@pytest.mark.parametrize("value", ["style_training", "IMAGE_GENERATION", "", 7])
def test_other_type_is_unsupported_task(value: Any) -> None:
    error = _refusal(_with(_backend_document(), "type", value))
    assert isinstance(error, UnsupportedTask)
    assert error.code is ErrorCode.UNSUPPORTED_TASK
    assert error.retryable is False
    assert error.message.startswith("type: ")
    assert repr(value) in error.message


def test_other_type_wins_over_bad_data() -> None:
    body = json.dumps({"type": "style_training", "data": {"generation_id": -1}})
    assert _refusal(body).code is ErrorCode.UNSUPPORTED_TASK


BACKEND_TASK_ID = "660f9511-f3ac-52e5-b827-557766551111"


@pytest.mark.parametrize(
    "body, expected",
    [
        (BACKEND_MESSAGE, 456),
        (BACKEND_MESSAGE.encode("utf-8"), 456),
        (_with(_backend_document(), "data.aspect_ratio", "9:9"), 456),
        (_with(_backend_document(), "type", "style_training"), 456),
        (_with(_backend_document(), "data.generation_id", LARGEST_INT64), LARGEST_INT64),
        (_with(_backend_document(), "data.generation_id", LARGEST_INT64 + 1), None),
        (_with(_backend_document(), "data.generation_id", "789"), None),
        (_with(_backend_document(), "data.generation_id", _MISSING), None),
        (_with(_backend_document(), "data", _MISSING), None),
        (_with(_backend_document(), "data", [456]), None),
        (_with(_backend_document(), "data.generation_id", True), None),
        (_with(_backend_document(), "data.generation_id", 0), None),
        (_with(_backend_document(), "data.generation_id", -4), None),
        (_with(_backend_document(), "data.generation_id", "0"), None),
        (_with(_backend_document(), "data.generation_id", "-4"), None),
        (_with(_backend_document(), "data.generation_id", "abc"), None),
        (_with(_backend_document(), "data.generation_id", 4.5), None),
        (_with(_backend_document(), "data.generation_id", None), None),
    ],
)
def test_peek_identity_reads_the_generation_id_by_the_model_rule(
    body: bytes | str, expected: int | None
) -> None:
    generation_id, task_id = peek_identity(body)
    assert generation_id == expected
    assert task_id == BACKEND_TASK_ID


@pytest.mark.parametrize(
    "task_id, expected",
    [
        ("t-1", "t-1"),
        ("", ""),
        ("x" * 200, "x" * 200),
        ("x" * 201, None),
        (_MISSING, None),
        (None, None),
        (7, None),
        (True, None),
        (["t-1"], None),
        ({"id": "t-1"}, None),
    ],
)
def test_peek_identity_reads_the_task_id_by_the_model_rule(
    task_id: Any, expected: str | None
) -> None:
    assert peek_identity(_with(_backend_document(), "task_id", task_id)) == (456, expected)


def test_peek_identity_refuses_a_task_id_that_is_not_unicode() -> None:
    body = BACKEND_MESSAGE.replace(BACKEND_TASK_ID, "\\ud800")
    assert '"\\ud800"' in body
    assert peek_identity(body) == (456, None)


@pytest.mark.parametrize(
    "body",
    ["[456]", "not json", b"\xff\xfe\x00garbage", "", "null", '"456"', '{"data": 456}'],
)
def test_peek_identity_of_no_object_is_nothing(body: bytes | str) -> None:
    assert peek_identity(body) == (None, None)


@pytest.mark.parametrize("kind", ["bytes", "str"])
def test_peek_identity_of_the_documented_shape(kind: str) -> None:
    assert peek_identity(_as_body(DOCUMENTED_MESSAGE, kind)) == (456, "…")


@pytest.mark.parametrize("raw", ["²", "１２"])
def test_peek_identity_never_raises_on_unicode_digits(raw: str) -> None:
    # str.isdigit() is True for "²" but int("²") raises; a best-effort peek on a poison message
    # must answer, not raise (else the runner retries the poison message instead of parking it).
    body = _with(_backend_document(), "data.generation_id", raw)
    assert peek_identity(body) == (None, BACKEND_TASK_ID)
