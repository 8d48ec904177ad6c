"""Request normalization: sizes, defaults, bounds, seeds, signatures and prompt composition."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest

from domain.errors import ErrorCode, InvalidRequest, SignatureInvalid
from domain.messages import GenerationMessage, parse_message
from domain.request import (
    SCHEDULER,
    GenerationRequest,
    RequestNormalizer,
    RequestPolicy,
    SignatureConfig,
    SignatureSpec,
    batch_key,
    compose_prompt,
    output_key,
)

CHOSEN_SEED = 987654


class FixedSeedSource:
    """A seed source that always answers the same seed and counts how often it was asked."""

    def __init__(self, seed: int = CHOSEN_SEED) -> None:
        self.seed = seed
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.seed


@pytest.fixture
def seeds() -> FixedSeedSource:
    return FixedSeedSource()


@pytest.fixture
def normalizer(seeds: FixedSeedSource) -> RequestNormalizer:
    return RequestNormalizer(policy=RequestPolicy(), seed_source=seeds)


def _message(parameters: dict[str, Any] | None = None, **data: Any) -> GenerationMessage:
    """A parsed message: generation 456 with a one-word prompt, plus the given ``data`` fields."""
    fields: dict[str, Any] = {"generation_id": 456, "prompt": "watercolor"}
    fields.update(data)
    if parameters is not None:
        fields["parameters"] = parameters
    return parse_message(json.dumps({"type": "image_generation", "data": fields}))


def _normalize(
    parameters: dict[str, Any] | None = None,
    *,
    policy: RequestPolicy | None = None,
    **data: Any,
) -> GenerationRequest:
    normalizer = RequestNormalizer(policy=policy or RequestPolicy(), seed_source=FixedSeedSource())
    return normalizer.normalize(_message(parameters, **data))


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "aspect_ratio, size",
    [("1:1", (512, 512)), ("1:2", (512, 1024)), ("2:1", (1024, 512)), ("2:2", (1024, 1024))],
)
def test_aspect_ratio_maps_to_size(aspect_ratio: str, size: tuple[int, int]) -> None:
    request = _normalize(aspect_ratio=aspect_ratio)
    assert (request.width, request.height) == size


def test_explicit_width_and_height_win_over_aspect_ratio() -> None:
    request = _normalize({"width": 640, "height": 768}, aspect_ratio="2:2")
    assert (request.width, request.height) == (640, 768)


@pytest.mark.parametrize(
    "parameters, aspect_ratio, size",
    [
        ({"width": 768}, "1:2", (768, 1024)),
        ({"height": 768}, "2:1", (1024, 768)),
        ({"width": 768}, None, (768, 512)),
        ({"height": 256}, None, (512, 256)),
    ],
)
def test_one_of_width_height_given(
    parameters: dict[str, Any], aspect_ratio: str | None, size: tuple[int, int]
) -> None:
    request = _normalize(parameters, aspect_ratio=aspect_ratio)
    assert (request.width, request.height) == size


def test_policy_default_size_without_aspect_ratio_or_parameters() -> None:
    request = _normalize(policy=RequestPolicy(default_width=768, default_height=640))
    assert (request.width, request.height) == (768, 640)


# --- defaults ----------------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    policy = RequestPolicy()
    assert (policy.default_steps, policy.default_guidance_scale) == (50, 7.5)
    assert (policy.default_width, policy.default_height) == (512, 512)

    request = _normalize()

    assert request.steps == 50
    assert request.guidance_scale == 7.5
    assert (request.width, request.height) == (512, 512)
    assert request.scheduler == SCHEDULER == "dpmsolver++"
    assert request.lora_scale == 1.0
    assert request.negative_prompt is None
    assert request.lora_ref is None
    assert request.signature is None


def test_policy_defaults_are_used() -> None:
    policy = RequestPolicy(default_steps=20, default_guidance_scale=5.0, lora_scale=0.8)
    request = _normalize(policy=policy)
    assert (request.steps, request.guidance_scale, request.lora_scale) == (20, 5.0, 0.8)


def test_parameters_override_defaults() -> None:
    request = _normalize({"steps": 30, "cfg_scale": 4})
    assert request.steps == 30
    assert request.guidance_scale == 4.0
    assert isinstance(request.guidance_scale, float)


def test_identity_fields_are_carried() -> None:
    message = parse_message(
        json.dumps(
            {
                "task_id": "t-1",
                "type": "image_generation",
                "data": {"generation_id": 77, "style_id": 5, "prompt": "ink"},
            }
        )
    )
    request = RequestNormalizer(seed_source=FixedSeedSource()).normalize(message)
    assert (request.generation_id, request.task_id, request.style_id) == (77, "t-1", 5)


def test_output_key_prefix() -> None:
    assert output_key(12) == "generations/12.png"
    assert output_key(12, prefix="out/") == "out/12.png"


# --- policy bounds -----------------------------------------------------------------------------

SMALL_POLICY = RequestPolicy(
    min_size=256, max_size=768, max_steps=60, max_guidance_scale=12.0, max_prompt_chars=40
)


@pytest.mark.parametrize(
    "parameters, data, field",
    [
        ({"width": 248}, {}, "data.parameters.width"),
        ({"width": 776}, {}, "data.parameters.width"),
        ({"height": 248}, {}, "data.parameters.height"),
        ({"height": 1024}, {}, "data.parameters.height"),
        ({"steps": 61}, {}, "data.parameters.steps"),
        ({"cfg_scale": 12.5}, {}, "data.parameters.cfg_scale"),
        ({}, {"prompt": "x" * 41}, "data.prompt"),
        ({}, {"prompt": "x" * 30, "prompt_tags": ["longer tag"]}, "data.prompt"),
        ({}, {"negative_prompt": "x" * 41}, "data.negative_prompt"),
        ({"negative_prompt": "x" * 41}, {}, "data.parameters.negative_prompt"),
        ({"negative_prompt": "x"}, {"negative_prompt": "x" * 41}, "data.negative_prompt"),
    ],
)
def test_policy_bounds_are_enforced_naming_the_field(
    parameters: dict[str, Any], data: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _normalize(parameters, policy=SMALL_POLICY, **data)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert caught.value.retryable is False
    assert caught.value.message.startswith(f"{field}: ")


def test_values_on_the_bounds_are_accepted() -> None:
    request = _normalize(
        {"width": 256, "height": 768, "steps": 60, "cfg_scale": 12.0},
        policy=SMALL_POLICY,
        prompt="x" * 40,
        negative_prompt="y" * 40,
    )
    assert (request.width, request.height, request.steps) == (256, 768, 60)
    assert request.guidance_scale == 12.0
    assert len(request.prompt) == 40
    assert request.negative_prompt == "y" * 40


def test_negative_prompt_in_parameters_on_the_bound_is_accepted() -> None:
    request = _normalize({"negative_prompt": "y" * 40}, policy=SMALL_POLICY)
    assert request.negative_prompt == "y" * 40


def test_negative_prompt_is_measured_after_folding_whitespace() -> None:
    request = _normalize(policy=SMALL_POLICY, negative_prompt="  " + "y " * 20 + "\n\t ")
    assert request.negative_prompt == " ".join(["y"] * 20)


def test_default_policy_bounds_the_negative_prompt_like_the_prompt() -> None:
    assert _normalize(negative_prompt="y" * 2000).negative_prompt == "y" * 2000
    with pytest.raises(InvalidRequest) as caught:
        _normalize(negative_prompt="y" * 2001)
    assert caught.value.message == "data.negative_prompt: 2001 characters, more than 2000"
    with pytest.raises(InvalidRequest) as caught:
        _normalize(prompt="x" * 2001)
    assert caught.value.message == "data.prompt: 2001 characters, more than 2000"


class RecordingCompose:
    """Stands in for ``compose_prompt`` and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, prompt: str, tags: list[str]) -> str:
        self.calls.append((prompt, list(tags)))
        return compose_prompt(prompt, tags)


def test_prompt_too_long_is_refused_before_composing(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = RecordingCompose()
    monkeypatch.setattr("domain.request.compose_prompt", recorder)
    with pytest.raises(InvalidRequest) as caught:
        _normalize(policy=SMALL_POLICY, prompt="x" * 41, prompt_tags=["ink", "oil"])
    assert caught.value.message == "data.prompt: 41 characters, more than 40"
    assert not recorder.calls
    _normalize(policy=SMALL_POLICY, prompt="x" * 30, prompt_tags=["ink"])
    assert recorder.calls == [("x" * 30, ["ink"])]


def test_sixty_four_tags_are_composed() -> None:
    tags = [f"t{i}" for i in range(64)]
    request = _normalize(prompt="ink", prompt_tags=tags)
    assert request.prompt == ", ".join(["ink", *tags])


def test_aspect_ratio_beyond_max_size_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        _normalize(policy=SMALL_POLICY, aspect_ratio="2:1")
    assert "1024" in caught.value.message
    assert "256-768" in caught.value.message


def test_default_policy_accepts_the_largest_aspect_ratio_and_refuses_larger() -> None:
    assert _normalize(aspect_ratio="2:2").width == 1024
    with pytest.raises(InvalidRequest):
        _normalize({"width": 1032})


@pytest.mark.parametrize("value", ["Infinity", "NaN", '"7.5"', "true"])
def test_non_finite_or_non_numeric_guidance_is_refused(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_message(
            '{"type": "image_generation", "data": {"generation_id": 1, "prompt": "a",'
            f' "parameters": {{"cfg_scale": {value}}}}}}}'
        )
    assert caught.value.message.startswith("data.parameters.cfg_scale: ")


# --- seed --------------------------------------------------------------------------------------


def test_seed_from_data(normalizer: RequestNormalizer, seeds: FixedSeedSource) -> None:
    request = normalizer.normalize(_message(seed=42))
    assert request.seed == 42
    assert request.seed_was_chosen is False
    assert seeds.calls == 0


def test_seed_zero_is_kept(normalizer: RequestNormalizer, seeds: FixedSeedSource) -> None:
    request = normalizer.normalize(_message(seed=0))
    assert request.seed == 0
    assert request.seed_was_chosen is False
    assert seeds.calls == 0


def test_parameters_seed_wins_over_data_seed(normalizer: RequestNormalizer) -> None:
    request = normalizer.normalize(_message({"seed": 7}, seed=42))
    assert request.seed == 7
    assert request.seed_was_chosen is False


def test_data_seed_used_when_parameters_have_none(normalizer: RequestNormalizer) -> None:
    request = normalizer.normalize(_message({"steps": 20, "seed": None}, seed=42))
    assert request.seed == 42


@pytest.mark.parametrize(
    "parameters, data",
    [(None, {}), (None, {"seed": None}), ({"seed": None}, {"seed": None}), ({"steps": 20}, {})],
)
def test_seed_is_chosen_when_null_or_missing(
    normalizer: RequestNormalizer,
    seeds: FixedSeedSource,
    parameters: dict[str, Any] | None,
    data: dict[str, Any],
) -> None:
    request = normalizer.normalize(_message(parameters, **data))
    assert request.seed == CHOSEN_SEED
    assert request.seed_was_chosen is True
    assert seeds.calls == 1


def test_default_seed_source_picks_a_32_bit_seed() -> None:
    request = RequestNormalizer().normalize(_message())
    assert request.seed_was_chosen is True
    assert 0 <= request.seed < 2**32


# --- negative prompt, LoRA ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameters, data, expected",
    [
        (None, {"negative_prompt": "blurry, low quality"}, "blurry, low quality"),
        ({"negative_prompt": "blurry"}, {}, "blurry"),
        ({"negative_prompt": "from parameters"}, {"negative_prompt": "from data"}, "from data"),
        (None, {"negative_prompt": "  blurry \n  low   quality "}, "blurry low quality"),
        (None, {"negative_prompt": "   "}, None),
        (None, {"negative_prompt": None}, None),
    ],
)
def test_negative_prompt(
    parameters: dict[str, Any] | None, data: dict[str, Any], expected: str | None
) -> None:
    assert _normalize(parameters, **data).negative_prompt == expected


@pytest.mark.parametrize(
    "lora_path, expected",
    [
        ("s3://stylelicense-models/styles/123/", "s3://stylelicense-models/styles/123/"),
        ("  styles/123/lora.safetensors \n", "styles/123/lora.safetensors"),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_lora_path(lora_path: str | None, expected: str | None) -> None:
    assert _normalize(lora_path=lora_path).lora_ref == expected


# --- signature ---------------------------------------------------------------------------------


def test_signature_image_and_config() -> None:
    request = _normalize(
        signature_path="s3://stylelicense-media/signatures/77.png",
        signature_config={"position": "top-left", "size": "large", "opacity": 0.25},
    )
    assert request.signature == SignatureSpec(
        config=SignatureConfig(position="top-left", size="large", opacity=0.25),
        image_ref="s3://stylelicense-media/signatures/77.png",
        text=None,
    )
    assert request.signature.config.width_fraction == 0.35


def test_signature_config_defaults() -> None:
    request = _normalize(signature_path="sig.png")
    assert request.signature is not None
    assert request.signature.config == SignatureConfig()
    assert SignatureConfig() == SignatureConfig(position="bottom-right", size="medium", opacity=0.7)
    assert request.signature.config.width_fraction == 0.25


def test_signature_config_missing_keys_take_defaults() -> None:
    config = SignatureConfig.parse({"position": "top-center"})
    assert config == SignatureConfig(position="top-center", size="medium", opacity=0.7)
    assert SignatureConfig.parse({}) == SignatureConfig()
    assert SignatureConfig.parse(None) == SignatureConfig()


@pytest.mark.parametrize("size, fraction", [("small", 0.15), ("medium", 0.25), ("large", 0.35)])
def test_signature_sizes(size: str, fraction: float) -> None:
    assert SignatureConfig.parse({"size": size}).width_fraction == fraction


@pytest.mark.parametrize("opacity, expected", [(0, 0.0), (1, 1.0), (0.0, 0.0), (1.0, 1.0)])
def test_signature_opacity_bounds_are_accepted(opacity: float, expected: float) -> None:
    config = SignatureConfig.parse({"opacity": opacity})
    assert config.opacity == expected
    assert isinstance(config.opacity, float)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"position": "middle"}, "signature_config.position"),
        ({"position": "Bottom-Right"}, "signature_config.position"),
        ({"position": 3}, "signature_config.position"),
        ({"position": None}, "signature_config.position"),
        ({"size": "huge"}, "signature_config.size"),
        ({"size": 25}, "signature_config.size"),
        ({"size": True}, "signature_config.size"),
        ({"opacity": 1.5}, "signature_config.opacity"),
        ({"opacity": -0.1}, "signature_config.opacity"),
        ({"opacity": "0.5"}, "signature_config.opacity"),
        ({"opacity": True}, "signature_config.opacity"),
        ({"opacity": False}, "signature_config.opacity"),
        ({"opacity": None}, "signature_config.opacity"),
        ({"opacity": float("nan")}, "signature_config.opacity"),
    ],
)
def test_invalid_signature_config_is_signature_invalid(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(SignatureInvalid) as caught:
        SignatureConfig.parse(raw)
    assert caught.value.code is ErrorCode.SIGNATURE_INVALID
    assert caught.value.retryable is False
    assert field in caught.value.message


def _nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "raw",
    [
        {"position": "p" * 50000},
        {"size": "s" * 50000},
        {"opacity": "o" * 50000},
        {"opacity": 10**4000},
        {"position": _nested_list(100000)},
        {"opacity": _nested_list(100000)},
    ],
    ids=["long-position", "long-size", "long-opacity", "huge-opacity", "deep-position", "deep-op"],
)
def test_signature_config_refusal_is_brief_whatever_the_value(raw: dict[str, Any]) -> None:
    with pytest.raises(SignatureInvalid) as caught:
        SignatureConfig.parse(raw)
    assert caught.value.message.startswith("data.signature_config.")
    assert len(caught.value.message) < 200


def test_invalid_signature_config_in_a_message_is_signature_invalid() -> None:
    with pytest.raises(SignatureInvalid) as caught:
        _normalize(signature_path="sig.png", signature_config={"position": "centre"})
    assert caught.value.code is ErrorCode.SIGNATURE_INVALID
    assert "'centre'" in caught.value.message


@pytest.mark.parametrize("size", [["medium"], {"name": "medium"}])
def test_unhashable_signature_size_is_signature_invalid(size: Any) -> None:
    # A JSON list or object as `size` must be refused as SIGNATURE_INVALID like any bad value,
    # not escape as a TypeError (which becomes a retryable INTERNAL_ERROR).
    with pytest.raises(SignatureInvalid):
        SignatureConfig.parse({"size": size})


def test_text_signature_from_artist_name() -> None:
    policy = RequestPolicy(signature_default_text="StyleLicense")
    request = _normalize(policy=policy, artist_name="  Ada   Lovelace ")
    assert request.signature == SignatureSpec(
        config=SignatureConfig(), image_ref=None, text="Ada Lovelace"
    )


def test_the_artist_is_kept_for_the_provenance_marks_whitespace_folded() -> None:
    assert _normalize(artist_name="  Ada   Lovelace ").artist_name == "Ada Lovelace"
    assert _normalize(artist_name="Ada\x01Love\x00lace\x7f").artist_name == "Ada Love lace"
    # The default signature text is the platform's, never an artist's name.
    policy = RequestPolicy(signature_default_text="StyleLicense")
    assert _normalize(policy=policy).artist_name is None
    assert _normalize(policy=policy, artist_name="   ").artist_name is None


def test_text_signature_from_policy_default() -> None:
    policy = RequestPolicy(signature_default_text="StyleLicense")
    request = _normalize(policy=policy, signature_config={"position": "top-right"})
    assert request.signature == SignatureSpec(
        config=SignatureConfig(position="top-right"), image_ref=None, text="StyleLicense"
    )


def test_no_signature_without_image_or_text() -> None:
    assert RequestPolicy().signature_default_text == ""
    assert _normalize().signature is None
    assert _normalize(signature_path="   ").signature is None


def test_image_signature_keeps_the_artist_name_as_text() -> None:
    request = _normalize(signature_path="sig.png", artist_name="Ada")
    assert request.signature is not None
    assert (request.signature.image_ref, request.signature.text) == ("sig.png", "Ada")


# --- prompt composition ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, tags, expected",
    [
        # The backend builds prompt as ", ".join(prompt_tags): nothing is added.
        (
            "watercolor, portrait, vintage",
            ["watercolor", "portrait", "vintage"],
            "watercolor, portrait, vintage",
        ),
        # A tag already present as a whole word, in any case, is not appended.
        (
            "A Watercolor painting of a PORTRAIT",
            ["watercolor", "portrait", "vintage"],
            "A Watercolor painting of a PORTRAIT, vintage",
        ),
        (
            "sunset over mountains, oil painting",
            ["Oil Painting"],
            "sunset over mountains, oil painting",
        ),
        # Present only inside a longer word: appended.
        (
            "watercolors of a portraitist",
            ["watercolor", "portrait"],
            "watercolors of a portraitist, watercolor, portrait",
        ),
        ("underwater scene", ["water"], "underwater scene, water"),
        # Duplicate tags appear once.
        ("sunset", ["ink", "ink", "INK"], "sunset, ink"),
        # Blank tags are skipped.
        ("sunset", ["", "   ", "ink"], "sunset, ink"),
        # Whitespace is collapsed in the prompt and in tags.
        (
            "  a   sunset\n over\tmountains ",
            ["oil    painting"],
            "a sunset over mountains, oil painting",
        ),
        # An empty prompt is built from the tags.
        ("", ["watercolor", "portrait"], "watercolor, portrait"),
        ("   ", ["watercolor"], "watercolor"),
        # Tags with regex metacharacters are matched literally.
        ("style c++ art", ["c++", "a.t"], "style c++ art, a.t"),
        ("sunset", [], "sunset"),
        ("", [], ""),
        # A tag already added counts as present, like the prompt.
        ("sunset", ["oil painting", "painting", "OIL"], "sunset, oil painting"),
        # A tag is never found across two parts.
        (
            "oil",
            ["painting", "oil, painting", "oil painting"],
            "oil, painting, oil, painting, oil painting",
        ),
        ("a b", ["c", "b c"], "a b, c, b c"),
    ],
)
def test_compose_prompt(prompt: str, tags: list[str], expected: str) -> None:
    assert compose_prompt(prompt, tags) == expected


def test_normalizer_uses_the_composed_prompt() -> None:
    request = _normalize(prompt="a sunset", prompt_tags=["watercolor", "sunset"])
    assert request.prompt == "a sunset, watercolor"


@pytest.mark.parametrize(
    "data",
    [{"prompt": ""}, {"prompt": "  ", "prompt_tags": ["", " "]}, {"prompt": "", "prompt_tags": []}],
)
def test_empty_prompt_and_tags_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _normalize(**data)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert caught.value.message.startswith("data.prompt: ")
    assert "data.prompt_tags" in caught.value.message


# --- exact refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("bottom-right", "data.signature_config must be an object; got str"),
        ([0.5], "data.signature_config must be an object; got list"),
        (
            {"position": "middle"},
            "data.signature_config.position must be one of top-left, top-center, top-right,"
            " bottom-left, bottom-center, bottom-right; got 'middle'",
        ),
        (
            {"size": "huge"},
            "data.signature_config.size must be one of small, medium, large; got 'huge'",
        ),
        ({"opacity": "0.5"}, "data.signature_config.opacity must be a number; got '0.5'"),
        ({"opacity": 1.5}, "data.signature_config.opacity must be within 0-1; got 1.5"),
        ({"opacity": -1}, "data.signature_config.opacity must be within 0-1; got -1"),
    ],
)
def test_signature_config_refusal_names_the_value(raw: Any, message: str) -> None:
    with pytest.raises(SignatureInvalid) as caught:
        SignatureConfig.parse(raw)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("aspect_ratio", "message"),
    [
        ("2:1", "data.aspect_ratio: width 1024 is outside 256-768"),
        ("1:2", "data.aspect_ratio: height 1024 is outside 256-768"),
    ],
)
def test_an_aspect_ratio_out_of_bounds_is_named(aspect_ratio: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _normalize(policy=SMALL_POLICY, aspect_ratio=aspect_ratio)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (RequestPolicy(default_width=1032), "default width: width 1032 is outside 256-1024"),
        (RequestPolicy(default_height=248), "default height: height 248 is outside 256-1024"),
    ],
)
def test_a_default_size_out_of_bounds_is_named(policy: RequestPolicy, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _normalize(policy=policy)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"width": 1032}, "data.parameters.width: width 1032 is outside 256-1024"),
        ({"height": 248}, "data.parameters.height: height 248 is outside 256-1024"),
    ],
)
def test_a_given_size_out_of_bounds_is_named(parameters: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _normalize(parameters, aspect_ratio="1:1")
    assert caught.value.message == message


def test_a_prompt_at_the_limit_still_takes_its_tags() -> None:
    # 40 characters is within SMALL_POLICY's 40, so the tag is composed in, and the result is
    # then too long; a prompt of 39 plus a tag already in it stays at 39.
    with pytest.raises(InvalidRequest) as caught:
        _normalize(policy=SMALL_POLICY, prompt="x" * 40, prompt_tags=["ink"])
    assert caught.value.message == "data.prompt: 45 characters, more than 40"
    request = _normalize(policy=SMALL_POLICY, prompt="x" * 36 + " ink", prompt_tags=["INK"])
    assert request.prompt == "x" * 36 + " ink"


def test_the_default_signature_text_is_folded() -> None:
    policy = RequestPolicy(signature_default_text="  Style \n License  ")
    request = _normalize(policy=policy)
    assert request.signature == SignatureSpec(
        config=SignatureConfig(), image_ref=None, text="Style License"
    )


def test_each_distinct_tag_costs_one_search(monkeypatch: pytest.MonkeyPatch) -> None:
    searched: list[str] = []
    search = re.search

    def recording_search(pattern: str, text: str, flags: int = 0) -> re.Match[str] | None:
        searched.append(pattern)
        return search(pattern, text, flags)

    monkeypatch.setattr(re, "search", recording_search)
    composed = compose_prompt("ink sketch", ["oil", "ink", "oil", "ink", "oil", "ink"])
    monkeypatch.undo()
    assert composed == "ink sketch, oil"
    assert len(searched) == 2


# --- batch keys -------------------------------------------------------------------------------

BATCH_HEAD = GenerationRequest(
    generation_id=1,
    prompt="watercolor",
    width=512,
    height=768,
    steps=30,
    guidance_scale=7.5,
    seed=1,
    scheduler="dpmsolver++",
)


def test_the_batch_key_is_size_steps_guidance_and_scheduler() -> None:
    assert batch_key(BATCH_HEAD) == (512, 768, 30, 7.5, "dpmsolver++")


@pytest.mark.parametrize(
    "change",
    [
        {"width": 520},
        {"height": 776},
        {"steps": 31},
        {"guidance_scale": 7.0},
        {"scheduler": "euler"},
    ],
    ids=["width", "height", "steps", "guidance", "scheduler"],
)
def test_each_model_setting_splits_a_batch(change: dict[str, Any]) -> None:
    assert batch_key(replace(BATCH_HEAD, **change)) != batch_key(BATCH_HEAD)


@pytest.mark.parametrize(
    "change",
    [
        {"generation_id": 2, "task_id": "t-2", "style_id": 9},
        {"prompt": "ink", "negative_prompt": "blurry"},
        {"seed": 2, "seed_was_chosen": True},
        {"lora_ref": "styles/2/", "lora_scale": 0.5},
        {"signature": SignatureSpec(text="Ana", image_ref=None, config=SignatureConfig())},
    ],
    ids=["identity", "prompts", "seed", "lora", "signature"],
)
def test_what_each_job_has_of_its_own_shares_a_batch(change: dict[str, Any]) -> None:
    assert batch_key(replace(BATCH_HEAD, **change)) == batch_key(BATCH_HEAD)
