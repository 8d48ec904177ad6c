"""Error codes are a wire contract with the backend: their names, retryability and mapping."""

from __future__ import annotations

import pytest

from domain.errors import (
    ErrorCode,
    GenerationError,
    GpuOutOfMemory,
    InternalError,
    InvalidRequest,
    LoraInvalid,
    LoraNotFound,
    ModelError,
    NotifyError,
    ProvenanceFailed,
    SignatureInvalid,
    StorageError,
    UnsupportedTask,
    as_generation_error,
)

# Written out literally: renaming or dropping a code must fail this test, because the backend
# stores `error_code` verbatim.
WIRE_CODES = [
    "INVALID_REQUEST",
    "UNSUPPORTED_TASK",
    "LORA_NOT_FOUND",
    "LORA_INVALID",
    "SIGNATURE_INVALID",
    "GPU_OOM",
    "MODEL_ERROR",
    "STORAGE_ERROR",
    "NOTIFY_ERROR",
    "PROVENANCE_ERROR",
    "INTERNAL_ERROR",
]

SUBCLASS_CODES = [
    (InvalidRequest, "INVALID_REQUEST", False),
    (UnsupportedTask, "UNSUPPORTED_TASK", False),
    (LoraNotFound, "LORA_NOT_FOUND", False),
    (LoraInvalid, "LORA_INVALID", False),
    (SignatureInvalid, "SIGNATURE_INVALID", False),
    (GpuOutOfMemory, "GPU_OOM", True),
    (ModelError, "MODEL_ERROR", False),
    (StorageError, "STORAGE_ERROR", True),
    (NotifyError, "NOTIFY_ERROR", True),
    (ProvenanceFailed, "PROVENANCE_ERROR", True),
    (InternalError, "INTERNAL_ERROR", True),
]


def test_codes_are_exactly_the_wire_strings() -> None:
    assert [code.value for code in ErrorCode] == WIRE_CODES


@pytest.mark.parametrize("wire", WIRE_CODES)
def test_code_value_equals_its_name_and_round_trips(wire: str) -> None:
    code = ErrorCode(wire)
    assert code.name == wire
    assert code.value == wire
    assert code == wire  # a str enum compares equal to the string the backend stores


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_a_one_line_description(code: ErrorCode) -> None:
    assert isinstance(code.description, str)
    assert code.description.strip()
    assert "\n" not in code.description


def test_descriptions_are_distinct() -> None:
    descriptions = [code.description for code in ErrorCode]
    assert len(set(descriptions)) == len(descriptions)


def test_retryable_set_is_exactly_the_transient_codes() -> None:
    retryable = {code.value for code in ErrorCode if code.retryable}
    assert retryable == {
        "GPU_OOM",
        "STORAGE_ERROR",
        "NOTIFY_ERROR",
        "PROVENANCE_ERROR",
        "INTERNAL_ERROR",
    }


@pytest.mark.parametrize("error_class, wire, retryable", SUBCLASS_CODES)
def test_subclass_carries_its_code(
    error_class: type[GenerationError], wire: str, retryable: bool
) -> None:
    error = error_class("something happened")
    assert isinstance(error, GenerationError)
    assert error.code is ErrorCode(wire)
    assert error.retryable is retryable
    assert error.message == "something happened"


def test_every_code_has_a_subclass() -> None:
    assert {wire for _, wire, _ in SUBCLASS_CODES} == set(WIRE_CODES)


def test_base_error_defaults_to_internal_error() -> None:
    error = GenerationError("oops")
    assert error.code is ErrorCode.INTERNAL_ERROR
    assert error.retryable is True


def test_code_override_by_keyword() -> None:
    error = StorageError("bucket policy forbids the write", code=ErrorCode.MODEL_ERROR)
    assert error.code is ErrorCode.MODEL_ERROR
    assert error.retryable is False
    # The override is per instance; the class keeps its code.
    assert StorageError.code is ErrorCode.STORAGE_ERROR
    assert StorageError("again").code is ErrorCode.STORAGE_ERROR


def test_str_is_code_colon_message() -> None:
    assert str(GpuOutOfMemory("GPU out of memory")) == "GPU_OOM: GPU out of memory"
    assert str(GenerationError("x", code=ErrorCode.LORA_INVALID)) == "LORA_INVALID: x"


def test_errors_can_be_raised_and_caught_as_generation_error() -> None:
    with pytest.raises(GenerationError) as caught:
        raise LoraNotFound("no LoRA at s3://models/styles/1/")
    assert caught.value.code is ErrorCode.LORA_NOT_FOUND


@pytest.mark.parametrize(
    "error",
    [InvalidRequest("bad"), NotifyError("down"), GenerationError("x", code=ErrorCode.GPU_OOM)],
)
def test_as_generation_error_keeps_a_generation_error(error: GenerationError) -> None:
    assert as_generation_error(error) is error


@pytest.mark.parametrize(
    "exc, expected_message",
    [
        (ValueError("boom"), "ValueError: boom"),
        (KeyError("width"), "KeyError: 'width'"),
        (RuntimeError(), "RuntimeError: "),
    ],
)
def test_as_generation_error_maps_others_to_internal_error(
    exc: BaseException, expected_message: str
) -> None:
    mapped = as_generation_error(exc)
    assert isinstance(mapped, InternalError)
    assert mapped.code is ErrorCode.INTERNAL_ERROR
    assert mapped.retryable is True
    assert mapped.message == expected_message
    assert str(mapped) == f"INTERNAL_ERROR: {expected_message}"


def test_repr_and_args_carry_the_message_as_for_any_exception() -> None:
    # What a log line with %r, a debugger or a traceback of a chained error shows.
    error = StorageError("bucket down", code=ErrorCode.MODEL_ERROR)
    assert error.args == ("bucket down",)
    assert repr(error) == "StorageError('bucket down')"
