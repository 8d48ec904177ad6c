"""The normalized request: what the model is asked to do, with every default applied."""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from domain.errors import InvalidRequest, SignatureInvalid
from domain.messages import GenerationMessage, short_repr

ASPECT_RATIOS: Mapping[str, tuple[int, int]] = {
    "1:1": (512, 512),
    "1:2": (512, 1024),
    "2:1": (1024, 512),
    "2:2": (1024, 1024),
}
SIGNATURE_POSITIONS = (
    "top-left",
    "top-center",
    "top-right",
    "bottom-left",
    "bottom-center",
    "bottom-right",
)
SIGNATURE_SIZES: Mapping[str, float] = {"small": 0.15, "medium": 0.25, "large": 0.35}
SCHEDULER = "dpmsolver++"


@dataclass(frozen=True)
class SignatureConfig:
    """Where and how strongly the artist's signature is stamped."""

    position: str = "bottom-right"
    size: str = "medium"
    opacity: float = 0.7

    @property
    def width_fraction(self) -> float:
        """Signature width as a fraction of the image width."""
        return SIGNATURE_SIZES[self.size]

    @classmethod
    def parse(cls, raw: object) -> SignatureConfig:
        """From ``signature_config``: missing keys take defaults, bad ones SIGNATURE_INVALID."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise SignatureInvalid(
                f"data.signature_config must be an object; got {type(raw).__name__}"
            )
        defaults = cls()
        position = raw.get("position", defaults.position)
        size = raw.get("size", defaults.size)
        opacity = raw.get("opacity", defaults.opacity)
        if not isinstance(position, str) or position not in SIGNATURE_POSITIONS:
            raise SignatureInvalid(
                f"data.signature_config.position must be one of {', '.join(SIGNATURE_POSITIONS)};"
                f" got {short_repr(position)}"
            )
        if not isinstance(size, str) or size not in SIGNATURE_SIZES:
            raise SignatureInvalid(
                f"data.signature_config.size must be one of {', '.join(SIGNATURE_SIZES)};"
                f" got {short_repr(size)}"
            )
        if isinstance(opacity, bool) or not isinstance(opacity, (int, float)):
            raise SignatureInvalid(
                f"data.signature_config.opacity must be a number; got {short_repr(opacity)}"
            )
        # Compared before float(): an integer like 10**400 would overflow the conversion.
        if not 0 <= opacity <= 1:  # also refuses NaN
            raise SignatureInvalid(
                f"data.signature_config.opacity must be within 0-1; got {short_repr(opacity)}"
            )
        return cls(position=position, size=size, opacity=float(opacity))


@dataclass(frozen=True)
class SignatureSpec:
    """The signature to stamp: an image reference, else a text; never both empty."""

    config: SignatureConfig
    image_ref: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """A validated job with every default applied; the model's whole input."""

    generation_id: int
    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    seed_was_chosen: bool = False
    negative_prompt: str | None = None
    scheduler: str = SCHEDULER
    lora_ref: str | None = None
    lora_scale: float = 1.0
    signature: SignatureSpec | None = None
    task_id: str | None = None
    style_id: int | None = None
    artist_name: str | None = None
    """The artist as the message names them (whitespace folded); None when it names none."""


BatchKey = tuple[int, int, int, float, str]


def batch_key(request: GenerationRequest) -> BatchKey:
    """What jobs must share to run in one model call: size, steps, guidance and scheduler.

    Prompts, negative prompts, seeds and LoRAs may differ within a batch.
    """
    return (request.width, request.height, request.steps, request.guidance_scale, request.scheduler)


def output_key(generation_id: int, prefix: str = "generations/") -> str:
    """The object key for a generation's PNG: ``generations/<id>.png``."""
    return f"{prefix}{generation_id}.png"


def printable(text: str) -> str:
    """``text`` with its control characters and whitespace folded to single spaces: a name as
    files and documents can carry it (an XMP packet cannot hold U+0001 at all)."""
    return " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in text).split())


def compose_prompt(prompt: str, tags: Sequence[str]) -> str:
    """Join the prompt with the tags that it does not already contain (whole words, any case).

    Each distinct tag costs one search, over the prompt and the tags added so far joined by
    newlines: folded text holds no newline, so a match never spans two parts, and a newline is
    a word boundary like the end of a part.
    """
    text = " ".join(prompt.split())
    parts = [text] if text else []
    haystack = text
    seen: set[str] = set()
    for raw in tags:
        tag = " ".join(str(raw).split())
        if not tag or tag in seen:
            continue
        seen.add(tag)
        if re.search(rf"(?<!\w){re.escape(tag)}(?!\w)", haystack, re.IGNORECASE):
            continue
        parts.append(tag)
        haystack = f"{haystack}\n{tag}"
    return ", ".join(parts)


@dataclass(frozen=True)
class RequestPolicy:
    """Defaults and bounds applied to every message (from settings)."""

    default_steps: int = 50
    default_guidance_scale: float = 7.5
    default_width: int = 512
    default_height: int = 512
    min_size: int = 256
    max_size: int = 1024
    max_steps: int = 150
    max_guidance_scale: float = 30.0
    max_prompt_chars: int = 2000
    lora_scale: float = 1.0
    signature_default_text: str = ""


@dataclass
class RequestNormalizer:
    """Turns a validated message into a ``GenerationRequest`` under a ``RequestPolicy``."""

    policy: RequestPolicy = field(default_factory=RequestPolicy)
    seed_source: Callable[[], int] = field(default=lambda: secrets.randbelow(2**32))

    def normalize(self, message: GenerationMessage) -> GenerationRequest:
        """Apply defaults and bounds; raise InvalidRequest/SignatureInvalid naming the field."""
        data = message.data
        params = data.parameters
        policy = self.policy

        prompt = self._prompt(message)

        width, height = self._size(message)
        steps = params.steps if params and params.steps is not None else policy.default_steps
        if steps > policy.max_steps:
            raise InvalidRequest(f"data.parameters.steps: {steps} is above {policy.max_steps}")
        guidance = (
            params.cfg_scale
            if params and params.cfg_scale is not None
            else policy.default_guidance_scale
        )
        if guidance > policy.max_guidance_scale:
            raise InvalidRequest(
                f"data.parameters.cfg_scale: {guidance} is above {policy.max_guidance_scale}"
            )

        seed = params.seed if params and params.seed is not None else data.seed
        seed_was_chosen = seed is None
        if seed is None:
            seed = self.seed_source()

        negative = self._negative_prompt(message)

        return GenerationRequest(
            generation_id=data.generation_id,
            task_id=message.task_id,
            style_id=data.style_id,
            prompt=prompt,
            negative_prompt=negative or None,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=float(guidance),
            seed=seed,
            seed_was_chosen=seed_was_chosen,
            lora_ref=(data.lora_path or "").strip() or None,
            lora_scale=policy.lora_scale,
            signature=self._signature(message),
            artist_name=printable(data.artist_name or "") or None,
        )

    def _prompt(self, message: GenerationMessage) -> str:
        """The prompt with its tags; a prompt already too long is refused before composing."""
        data, limit = message.data, self.policy.max_prompt_chars
        text = " ".join(data.prompt.split())
        if len(text) <= limit:
            text = compose_prompt(text, data.prompt_tags)
        if not text:
            raise InvalidRequest("data.prompt: empty, and data.prompt_tags adds nothing")
        if len(text) > limit:
            raise InvalidRequest(f"data.prompt: {len(text)} characters, more than {limit}")
        return text

    def _negative_prompt(self, message: GenerationMessage) -> str | None:
        """The negative prompt, folded, under the same length bound as the prompt."""
        data, params = message.data, message.data.parameters
        negative, source = data.negative_prompt, "data.negative_prompt"
        if negative is None and params is not None:
            negative, source = params.negative_prompt, "data.parameters.negative_prompt"
        folded = " ".join((negative or "").split())
        limit = self.policy.max_prompt_chars
        if len(folded) > limit:
            raise InvalidRequest(f"{source}: {len(folded)} characters, more than {limit}")
        return folded or None

    def _size(self, message: GenerationMessage) -> tuple[int, int]:
        data, params, policy = message.data, message.data.parameters, self.policy
        if data.aspect_ratio is not None:
            width, height = ASPECT_RATIOS[data.aspect_ratio]
            source = {"width": "data.aspect_ratio", "height": "data.aspect_ratio"}
        else:
            width, height = policy.default_width, policy.default_height
            source = {"width": "default width", "height": "default height"}
        if params is not None and params.width is not None:
            width, source["width"] = params.width, "data.parameters.width"
        if params is not None and params.height is not None:
            height, source["height"] = params.height, "data.parameters.height"
        for name, value in (("width", width), ("height", height)):
            if not policy.min_size <= value <= policy.max_size:
                raise InvalidRequest(
                    f"{source[name]}: {name} {value} is outside"
                    f" {policy.min_size}-{policy.max_size}"
                )
        return width, height

    def _signature(self, message: GenerationMessage) -> SignatureSpec | None:
        data = message.data
        image_ref = (data.signature_path or "").strip() or None
        text = " ".join((data.artist_name or "").split()) or " ".join(
            self.policy.signature_default_text.split()
        )
        if image_ref is None and not text:
            return None
        config = SignatureConfig.parse(data.signature_config)
        return SignatureSpec(config=config, image_ref=image_ref, text=text or None)
