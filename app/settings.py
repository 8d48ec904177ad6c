"""Settings from the environment and ``.env``, checked at start (README, "Settings": the
backend's own variable names first)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from domain.progress import DEFAULT_MILESTONES
from domain.request import RequestPolicy
from domain.settlement_policy import SettlementPolicy

DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


SECRET_SETTINGS = frozenset(
    {
        "RABBITMQ_PASS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "INTERNAL_API_TOKEN",
        "WEBHOOK_SIGNING_SECRET",
    }
)
"""Never echoed, not even in a validation error."""


class SettingsError(ValueError):
    """A setting has a bad value; the message names the environment variable."""


class Settings(BaseSettings):
    """Every tunable of the worker. The field name, upper-cased, is the environment variable."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # Broker (README, "Settings").
    rabbitmq_host: str = "localhost"
    rabbitmq_port: int = Field(default=5672, ge=1, le=65535)
    rabbitmq_user: str = "guest"
    rabbitmq_pass: SecretStr = SecretStr("guest")
    rabbitmq_vhost: str = "/"
    rabbitmq_queue: str = "image_generation"
    rabbitmq_retry_delay_seconds: int = Field(default=5, ge=1, le=3600)
    rabbitmq_retry_max_delay_seconds: int = Field(default=600, ge=1, le=86400)
    rabbitmq_heartbeat_seconds: int = Field(default=60, ge=0, le=3600)
    max_concurrent_generations: int = Field(default=10, ge=1, le=1000)
    pipeline_io_threads: int = Field(default=4, ge=2, le=64)
    pipeline_lookahead: int = Field(default=2, ge=1, le=64)
    max_batch_size: int = Field(default=4, ge=1, le=64)
    max_hold_seconds: float = Field(default=600.0, ge=10, le=86400)

    # Object storage.
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_storage_bucket_name: str = "stylelicense-media"
    aws_s3_region_name: str = "us-east-1"
    aws_s3_endpoint_url: str | None = None
    s3_models_bucket: str | None = None
    s3_allowed_buckets: Annotated[tuple[str, ...], NoDecode] = ()
    s3_output_bucket: str | None = None
    s3_output_prefix: str = "generations/"
    s3_public_base_url: str | None = None
    s3_max_attempts: int = Field(default=5, ge=1, le=20)
    outcome_records_prefix: str = "worker-outcomes/"
    lora_cache_dir: str = ".cache/loras"
    lora_cache_max_bytes: int = Field(default=20 * 1024**3, ge=0)
    lora_cache_protect_seconds: float = Field(default=600.0, ge=0)
    lora_max_bytes: int = Field(default=512 * 1024**2, ge=1)
    lora_max_rank: int = Field(default=256, ge=1, le=4096)

    # Backend webhooks.
    backend_api_url: str = "http://localhost:8000"
    internal_api_token: SecretStr = SecretStr("")
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    webhook_max_attempts: int = Field(default=3, ge=1, le=50)
    webhook_retry_budget_seconds: float = Field(default=10.0, ge=0, le=3600)
    webhook_not_found_retry_seconds: float = Field(default=300.0, ge=0, le=86400)
    outcome_max_age_seconds: float = Field(default=86400.0, ge=60, le=30 * 86400)
    backend_access_probe_seconds: float = Field(default=30.0, gt=0, le=3600)
    webhook_signing_secret: SecretStr | None = None

    # Model.
    model_id: str = DEFAULT_MODEL_ID
    model_device: str = "auto"
    model_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    model_cache_dir: str | None = None
    cuda_visible_devices: str | None = None
    lora_scale: float = Field(default=RequestPolicy.lora_scale, ge=0.0, le=2.0)
    model_channels_last: bool = True
    model_fuse_qkv: bool = True
    model_compile: bool = False
    model_compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"
    model_warmup: bool = True
    # LORA_ADAPTER_CACHE_SIZE is this setting's name before 2026-11 (still read).
    lora_pipeline_cache_size: int = Field(
        default=8,
        ge=1,
        le=256,
        validation_alias=AliasChoices("lora_pipeline_cache_size", "lora_adapter_cache_size"),
    )
    mixed_lora_batches: bool = True
    lora_hotswap_max_rank: int = Field(default=32, ge=1, le=4096)

    # Request policy (defaults are the domain's: one source for each number).
    default_steps: int = Field(default=RequestPolicy.default_steps, ge=1, le=500)
    default_guidance_scale: float = Field(
        default=RequestPolicy.default_guidance_scale, ge=0.0, le=50.0
    )
    min_image_size: int = Field(default=RequestPolicy.min_size, ge=64)
    max_image_size: int = Field(default=RequestPolicy.max_size, ge=64, le=4096)
    max_steps: int = Field(default=RequestPolicy.max_steps, ge=1, le=500)
    max_guidance_scale: float = Field(default=RequestPolicy.max_guidance_scale, ge=0.0)
    max_prompt_chars: int = Field(default=RequestPolicy.max_prompt_chars, ge=1)
    progress_milestones: Annotated[tuple[int, ...], NoDecode] = DEFAULT_MILESTONES
    # At least 3: the backend re-queues a retryable failure told with retry_count < 3, and the
    # re-queued message's own failure would then be withheld (one failure per generation).
    max_retries: int = Field(default=SettlementPolicy.max_retries, ge=3, le=100)

    # Signature.
    signature_default_text: str = ""
    signature_font_path: str | None = None
    signature_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    signature_max_pixels: int = Field(default=4096 * 4096, ge=1024)

    # Adapter choice: production by default; demo and generate use local/console/memory.
    storage_backend: Literal["s3", "local"] = "s3"
    notifier_backend: Literal["http", "console"] = "http"
    task_source_backend: Literal["rabbitmq", "memory"] = "rabbitmq"
    local_storage_dir: str = "output/storage"

    # Operations: metrics and health endpoints, logs.
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    health_stale_after_seconds: float = Field(default=300.0, gt=0, le=86400)
    health_startup_grace_seconds: float = Field(default=1800.0, ge=0, le=86400)
    readiness_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("s3_allowed_buckets", mode="before")
    @classmethod
    def _bucket_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("progress_milestones", mode="before")
    @classmethod
    def _milestones(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = tuple(int(part) for part in value.split(",") if part.strip())
            except ValueError as exc:
                raise ValueError(f"expected comma-separated integers, got {value!r}") from exc
        if isinstance(value, (tuple, list)) and any(not 0 <= int(v) <= 100 for v in value):
            raise ValueError(f"each milestone must lie within 0-100, got {value!r}")
        return value

    @property
    def output_bucket(self) -> str:
        """Where PNGs go: S3_OUTPUT_BUCKET, else the media bucket."""
        return self.s3_output_bucket or self.aws_storage_bucket_name

    def container_config(self) -> dict[str, Any]:
        """The values the composition root is configured with (``containers.build_container``):
        every setting by field name, secrets in plain text, and ``output_bucket``."""
        values = self.model_dump()
        for name in SECRET_SETTINGS:
            values[name.lower()] = plain_secret(values[name.lower()])
        values["output_bucket"] = self.output_bucket
        return values


def plain_secret(value: object) -> str | None:
    """The plain text of a secret setting (a ``SecretStr`` or a plain value); None when unset."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return getter() if getter is not None else str(value)


def secret_values(settings: Settings) -> list[str]:
    """The values of the secret settings (for the log redactor); unset ones are left out."""
    values = []
    for name in sorted(SECRET_SETTINGS):
        plain = plain_secret(getattr(settings, name.lower(), None))
        if plain:
            values.append(plain)
    return values


def load_settings(**overrides: object) -> Settings:
    """Read the settings; a bad value raises SettingsError naming the variable and the value."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for item in exc.errors():
            name = ".".join(str(part) for part in item["loc"]).upper()
            shown = "hidden" if name in SECRET_SETTINGS else repr(item.get("input"))
            lines.append(f"{name}: {item['msg']} (got {shown})")
        raise SettingsError("invalid settings: " + "; ".join(lines)) from exc
    for low, high in (
        ("min_image_size", "max_image_size"),
        ("default_steps", "max_steps"),
        ("default_guidance_scale", "max_guidance_scale"),
    ):
        if getattr(settings, low) > getattr(settings, high):
            raise SettingsError(
                f"{low.upper()} ({getattr(settings, low)}) is above"
                f" {high.upper()} ({getattr(settings, high)})"
            )
    return settings
