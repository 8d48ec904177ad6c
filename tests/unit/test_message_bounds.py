"""Hostile queue bodies: every bound of the wire model, strict integers, and bytes of any kind.

Limits are written here as literals, never imported from the code, so a wrong bound in the code
cannot move along with its test.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from domain.errors import InvalidRequest, UnsupportedTask
from domain.messages import GenerationMessage, parse_message, peek_identity, short_repr

LARGEST_INT64 = 9223372036854775807
LIMIT_BYTES = 262144

BASE: dict[str, Any] = {
    "task_id": "t-1",
    "type": "image_generation",
    "data": {
        "generation_id": 456,
        "prompt": "watercolor",
        "parameters": {"width": 512, "height": 512, "steps": 20, "cfg_scale": 7.5},
    },
}


def _body(path: str, value: Any) -> str:
    """BASE as JSON with ``path`` (dotted) set to ``value``."""
    document = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    target = document
    for key in parents:
        target = target[key]
    target[leaf] = value
    return json.dumps(document)


def _read(message: GenerationMessage, path: str) -> Any:
    """The value at ``path`` (dotted) of a parsed message."""
    value: Any = message
    for key in path.split("."):
        value = getattr(value, key)
    return value


def _refusal(body: bytes | str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_message(body)
    return caught.value


def _padded(size: int) -> bytes:
    """A valid message of exactly ``size`` bytes (JSON whitespace after the object)."""
    body = json.dumps(BASE).encode("utf-8")
    return body + b" " * (size - len(body))


KEYS_8 = {"position": "top-left", "size": "small", "opacity": 0.5} | {f"k{i}": i for i in range(5)}
KEYS_9 = KEYS_8 | {"k5": 5}

# (field, the largest value accepted, the smallest refused beyond it, the field the error names)
BOUNDS = [
    ("task_id", "x" * 200, "x" * 201, "task_id"),
    ("data.prompt", "x" * 10000, "x" * 10001, "data.prompt"),
    ("data.negative_prompt", "x" * 10000, "x" * 10001, "data.negative_prompt"),
    (
        "data.parameters.negative_prompt",
        "x" * 10000,
        "x" * 10001,
        "data.parameters.negative_prompt",
    ),
    ("data.prompt_tags", ["t"] * 64, ["t"] * 65, "data.prompt_tags"),
    ("data.prompt_tags", ["ok", "x" * 100], ["ok", "x" * 101], "data.prompt_tags.1"),
    ("data.artist_name", "x" * 100, "x" * 101, "data.artist_name"),
    ("data.lora_path", "x" * 1024, "x" * 1025, "data.lora_path"),
    ("data.signature_path", "x" * 1024, "x" * 1025, "data.signature_path"),
    ("webhook_url", "x" * 2048, "x" * 2049, "webhook_url"),
    ("callback_url", "x" * 2048, "x" * 2049, "callback_url"),
    ("created_at", "x" * 64, "x" * 65, "created_at"),
    ("data.signature_config", KEYS_8, KEYS_9, "data.signature_config"),
    ("data.generation_id", LARGEST_INT64, LARGEST_INT64 + 1, "data.generation_id"),
    ("data.generation_id", 1, 0, "data.generation_id"),
    ("data.style_id", LARGEST_INT64, LARGEST_INT64 + 1, "data.style_id"),
    ("data.style_id", 0, -1, "data.style_id"),
    ("data.seed", LARGEST_INT64, LARGEST_INT64 + 1, "data.seed"),
    ("data.seed", 0, -1, "data.seed"),
    ("data.parameters.seed", LARGEST_INT64, LARGEST_INT64 + 1, "data.parameters.seed"),
    ("data.parameters.seed", 0, -1, "data.parameters.seed"),
    ("data.parameters.steps", LARGEST_INT64, LARGEST_INT64 + 1, "data.parameters.steps"),
    ("data.parameters.steps", 1, 0, "data.parameters.steps"),
    ("data.parameters.width", LARGEST_INT64 - 7, LARGEST_INT64 + 1, "data.parameters.width"),
    ("data.parameters.height", 8, 0, "data.parameters.height"),
]


@pytest.mark.parametrize(("path", "largest", "beyond", "field"), BOUNDS)
def test_value_at_the_bound_is_accepted(path: str, largest: Any, beyond: Any, field: str) -> None:
    del beyond, field
    assert _read(parse_message(_body(path, largest)), path) == largest


@pytest.mark.parametrize(("path", "largest", "beyond", "field"), BOUNDS)
def test_value_past_the_bound_is_refused_naming_the_field(
    path: str, largest: Any, beyond: Any, field: str
) -> None:
    del largest
    error = _refusal(_body(path, beyond))
    assert error.message.startswith(f"{field}: ")
    assert len(error.message) < 300  # names the value, never echoes a payload


@pytest.mark.parametrize(
    "path",
    [
        "data.generation_id",
        "data.style_id",
        "data.seed",
        "data.parameters.seed",
        "data.parameters.width",
        "data.parameters.height",
        "data.parameters.steps",
    ],
)
@pytest.mark.parametrize("value", [True, False, "7", "512", 512.0])
def test_integers_are_strict(path: str, value: Any) -> None:
    # JSON true must never become 1, nor "7" become 7.
    assert _refusal(_body(path, value)).message.startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("task_id", 7),
        ("data.prompt", 7),
        ("data.artist_name", ["Ana"]),
        ("data.lora_path", True),
        ("webhook_url", {"url": "x"}),
        ("data.prompt_tags", ["ok", 7]),
        ("data.signature_config", "bottom-right"),
        ("data.signature_config", ["bottom-right"]),
    ],
)
def test_wrong_types_are_refused_naming_the_field(path: str, value: Any) -> None:
    assert _refusal(_body(path, value)).message.startswith(path)


def test_sixty_five_tags_are_refused_before_any_prompt_is_composed() -> None:
    error = _refusal(_body("data.prompt_tags", [f"tag{i}" for i in range(65)]))
    assert error.message.startswith("data.prompt_tags: ")
    assert "65" in error.message


def test_width_not_a_multiple_of_8_keeps_its_message() -> None:
    error = _refusal(_body("data.parameters.width", 500))
    assert error.message == "data.parameters.width: must be a multiple of 8, got 500"


def test_refusal_of_a_long_string_does_not_echo_it() -> None:
    error = _refusal(_body("data.prompt", "y" * 10001))
    assert "y" * 100 not in error.message
    assert "yyy..." in error.message


@pytest.mark.parametrize("value", ["x" * 10000, [[[["image_generation"]]]], {"a": 1}, 1.5])
def test_other_type_of_any_size_is_unsupported_with_a_short_message(value: Any) -> None:
    with pytest.raises(UnsupportedTask) as caught:
        parse_message(_body("type", value))
    assert caught.value.message.startswith("type: ")
    assert len(caught.value.message) < 200


def test_deeply_nested_type_is_unsupported_without_recursing() -> None:
    body = '{"type": ' + "[" * 900 + "]" * 900 + ', "data": {"generation_id": 1}}'
    with pytest.raises(UnsupportedTask) as caught:
        parse_message(body)
    assert caught.value.message.endswith("got list")


# --- bodies that crashed the worker ----------------------------------------------------------

HUGE_INT = '{"data": {"generation_id": ' + "9" * 5000 + "}}"
DEEP_ARRAY = "[" * 100000
DEEP_OBJECT = '{"a":' * 40000
NOT_UTF8 = b'{"type": "image_generation", "data": {"generation_id": 7, "prompt": "caf\xe9"}}'
ONE_MB = _padded(1024 * 1024)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (HUGE_INT, "4300 digits"),
        (HUGE_INT.encode("utf-8"), "4300 digits"),
        (DEEP_ARRAY, "nested too deeply"),
        (DEEP_ARRAY.encode("utf-8"), "nested too deeply"),
        (DEEP_OBJECT, "nested too deeply"),
        (NOT_UTF8, "utf-8"),
        (ONE_MB, "1048576 bytes, more than the limit of 262144"),
        (b"\x00" * 1000, "not valid JSON"),
        ("\ufeff" + json.dumps(BASE), "not valid JSON"),
    ],
)
def test_crash_bodies_are_invalid_requests(body: bytes | str, fragment: str) -> None:
    assert fragment in _refusal(body).message


@pytest.mark.parametrize("body", [DEEP_ARRAY, DEEP_OBJECT.encode("utf-8")])
def test_a_deeply_nested_body_is_refused_with_a_plain_message(body: bytes | str) -> None:
    assert _refusal(body).message == "message is not valid JSON: nested too deeply"


@pytest.mark.parametrize("body", [HUGE_INT, DEEP_ARRAY, DEEP_OBJECT, NOT_UTF8, ONE_MB])
def test_crash_bodies_have_no_identity(body: bytes | str) -> None:
    assert peek_identity(body) == (None, None)


@pytest.mark.parametrize("body", [None, 456, 4.5, ["task"], {"data": {"generation_id": 1}}])
def test_peek_identity_of_something_not_a_body_is_nothing(body: Any) -> None:
    assert peek_identity(body) == (None, None)


@pytest.mark.parametrize(("body", "kind"), [(None, "NoneType"), (456, "int"), (["task"], "list")])
def test_something_not_a_body_is_an_invalid_request(body: Any, kind: str) -> None:
    assert _refusal(body).message == f"message must be bytes or text, got {kind}"


def test_a_number_of_4300_digits_elsewhere_is_still_read() -> None:
    document = copy.deepcopy(BASE)
    body = json.dumps(document)[:-1] + ', "extra": ' + "9" * 4300 + "}"
    assert parse_message(body).data.generation_id == 456
    assert peek_identity(body) == (456, "t-1")


def test_generation_id_of_4300_digits_is_refused_briefly() -> None:
    body = json.dumps(BASE).replace('"generation_id": 456', '"generation_id": ' + "9" * 4300)
    error = _refusal(body)
    assert error.message.startswith("data.generation_id: ")
    assert len(error.message) < 300
    assert peek_identity(body) == (None, "t-1")


# --- the size bound --------------------------------------------------------------------------


def test_body_of_exactly_the_limit_is_read() -> None:
    body = _padded(262144)
    assert len(body) == 262144
    assert parse_message(body).data.generation_id == 456
    assert peek_identity(body) == (456, "t-1")


def test_body_one_byte_past_the_limit_is_refused_unread() -> None:
    body = _padded(262145)
    assert _refusal(body).message == "message is 262145 bytes, more than the limit of 262144"
    assert peek_identity(body) == (None, None)


def test_text_body_is_measured_in_utf8_bytes() -> None:
    message = json.dumps(BASE | {"task_id": "é"}, ensure_ascii=False)
    text = message + " " * (262143 - len(message))  # 262143 characters, 262144 bytes
    assert parse_message(text).task_id == "é"
    longer = text + " "
    assert len(longer) == 262144
    assert "262145 bytes" in _refusal(longer).message
    assert peek_identity(longer) == (None, None)


def test_message_at_every_bound_in_escaped_non_ascii_fits_the_limit() -> None:
    # What the backend's json.dumps writes (ensure_ascii: each "é" is 6 bytes) for a message
    # with every string at its bound: the size limit must not refuse it.
    document = {
        "task_id": "é" * 200,
        "type": "image_generation",
        "data": {
            "generation_id": LARGEST_INT64,
            "style_id": LARGEST_INT64,
            "lora_path": "é" * 1024,
            "prompt": "é" * 10000,
            "negative_prompt": "é" * 10000,
            "prompt_tags": ["é" * 100] * 64,
            "aspect_ratio": "2:2",
            "seed": LARGEST_INT64,
            "signature_path": "é" * 1024,
            "signature_config": {"position": "bottom-right", "size": "large", "opacity": 0.7},
            "artist_name": "é" * 100,
            "parameters": {
                "width": 1024,
                "height": 1024,
                "steps": 150,
                "cfg_scale": 30.0,
                "seed": LARGEST_INT64,
                "negative_prompt": "é" * 10000,
            },
        },
        "webhook_url": "é" * 2048,
        "callback_url": "é" * 2048,
        "created_at": "é" * 64,
    }
    body = json.dumps(document).encode("utf-8")
    assert len(body) <= 262144
    message = parse_message(body)
    assert message.data.prompt == "é" * 10000
    assert peek_identity(body) == (LARGEST_INT64, "é" * 200)


# --- anything at all -------------------------------------------------------------------------

SEED_BODIES = [json.dumps(BASE).encode("utf-8"), HUGE_INT.encode("utf-8"), NOT_UTF8]


def _mutations(rng: random.Random, count: int) -> list[bytes]:
    """Bodies made by cutting, flipping, repeating and inserting bytes of valid and bad ones."""
    bodies = []
    for _ in range(count):
        body = bytearray(rng.choice(SEED_BODIES))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body) + 1)
            action = rng.randrange(4)
            if action == 0:
                del body[at:]
            elif action == 1 and at < len(body):
                body[at] = rng.randrange(256)
            elif action == 2:
                body[at:at] = rng.choice([b"[", b"{", b'"', b"9" * 50, b"\\u", b"\xff", b"true"])
            else:
                body[at:at] = body[at : at + rng.randint(1, 40)] * rng.randint(1, 50)
        bodies.append(bytes(body))
    bodies.extend(rng.randbytes(rng.randint(0, 300)) for _ in range(count // 4))
    return bodies


def test_any_bytes_raise_only_request_errors_and_peek_never_raises() -> None:
    rng = random.Random(20240607)
    outcomes = set()
    for body in _mutations(rng, 2000):
        generation_id, task_id = peek_identity(body)
        assert generation_id is None or 0 < generation_id <= LARGEST_INT64
        assert task_id is None or (isinstance(task_id, str) and len(task_id) <= 200)
        try:
            parse_message(body)
            outcomes.add("parsed")
        except (InvalidRequest, UnsupportedTask) as exc:
            outcomes.add(type(exc).__name__)
    assert outcomes == {"parsed", "InvalidRequest", "UnsupportedTask"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", "'abc'"),
        (7, "7"),
        (None, "None"),
        (True, "True"),
        ("z" * 100, "'" + "z" * 56 + "..."),
        ("z" * 58, "'" + "z" * 58 + "'"),  # 60 characters: shown whole
        ("z" * 59, "'" + "z" * 56 + "..."),  # 61 characters: cut to 60
        ([1, 2], "list"),
        ({"a": 1}, "dict"),
        pytest.param(10**5000, "a number too long to show", id="int-of-5001-digits"),
    ],
)
def test_short_repr(value: object, expected: str) -> None:
    assert short_repr(value) == expected
