"""Settings from the environment and ``.env``, checked at start (docs/configuration.md: the
backend's own variable names first; each field's ``description`` is that table's wording)."""

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

    # Broker (docs/configuration.md).
    rabbitmq_host: str = Field(default="localhost", description="Host name of the RabbitMQ broker.")
    rabbitmq_port: int = Field(default=5672, ge=1, le=65535, description="AMQP port of the broker.")
    rabbitmq_user: str = Field(default="guest", description="Broker user name.")
    rabbitmq_pass: SecretStr = Field(
        default=SecretStr("guest"), description="Broker password (never logged)."
    )
    rabbitmq_vhost: str = Field(default="/", description="Broker virtual host.")
    rabbitmq_queue: str = Field(
        default="image_generation",
        description="The job queue, declared as the backend declares it: durable, no arguments.",
    )
    rabbitmq_retry_delay_seconds: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="How long a message handed back (a retryable error, an outcome the backend"
        " could not take, a copy of a job in flight here) waits the first time, in the delay"
        " queues `<queue>.retry.<N>s`; each later hand-back waits 4 times longer.",
    )
    rabbitmq_retry_max_delay_seconds: int = Field(
        default=600,
        ge=1,
        le=86400,
        description="The longest wait of a message handed back (by default: 5, 20, 80, 320,"
        " 600 s).",
    )
    rabbitmq_heartbeat_seconds: int = Field(
        default=60,
        ge=0,
        le=3600,
        description="AMQP heartbeat; the connection thread keeps it flowing during long"
        " generations.",
    )
    max_concurrent_generations: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Jobs held at once at most (the consumer prefetch); batches are drawn from"
        " these. Fewer are held when jobs are slow (see `MAX_HOLD_SECONDS`).",
    )
    pipeline_io_threads: int = Field(
        default=4,
        ge=2,
        le=64,
        description="Threads for the I/O around the model: downloads, PNG encoding, uploads,"
        " webhooks.",
    )
    pipeline_lookahead: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Jobs whose inputs (LoRA, signature) are fetched ahead of the model.",
    )
    max_batch_size: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Prepared jobs sharing size, steps and guidance that run in one model call"
        " (their LoRAs may differ); 1 turns batching off.",
    )
    max_hold_seconds: float = Field(
        default=600.0,
        ge=10,
        le=86400,
        description="The longest a received message waits in the worker before its job starts;"
        " past it, it goes back to the queue. Keep it plus the longest job under RabbitMQ's"
        " `consumer_timeout` (30 min by default).",
    )

    # Object storage.
    aws_access_key_id: SecretStr | None = Field(
        default=None,
        description="S3 access key (never logged); unset: boto3's default chain (instance role,"
        " ...).",
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret key (never logged); unset: boto3's default chain."
    )
    aws_storage_bucket_name: str = Field(
        default="stylelicense-media",
        description="Media bucket: signatures, and outputs unless `S3_OUTPUT_BUCKET` is set.",
    )
    aws_s3_region_name: str = Field(default="us-east-1", description="S3 region.")
    aws_s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible server (MinIO, Cloud Storage's XML API), e.g."
        " `http://minio:9000`; unset for AWS.",
    )
    s3_models_bucket: str | None = Field(
        default=None,
        description="Bucket of bare `lora_path` keys; unset: `lora_path` must name its bucket"
        " (as the backend's messages do). Checked at start only when set.",
    )
    s3_allowed_buckets: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Comma-separated buckets that `lora_path` and `signature_path` may name"
        " besides the models and media buckets (others are `INVALID_REQUEST`); unset: any"
        " bucket the credentials can read.",
    )
    s3_output_bucket: str | None = Field(
        default=None, description="Bucket of the generated PNGs; unset: the media bucket."
    )
    s3_output_prefix: str = Field(
        default="generations/",
        description="Key prefix of the generated PNGs (`<prefix><generation_id>.png`).",
    )
    s3_public_base_url: str | None = Field(
        default=None,
        description="Public base URL of `result_url` (a CDN, MinIO's public address); unset:"
        " the bucket's own URL.",
    )
    s3_max_attempts: int = Field(
        default=5, ge=1, le=20, description="Attempts per S3 call (boto3's standard retry mode)."
    )
    outcome_records_prefix: str = Field(
        default="worker-outcomes/",
        description="Where, in the output bucket, every worker records the outcome decided for"
        " each message; keep it out of public prefixes.",
    )
    lora_cache_dir: str = Field(
        default=".cache/loras",
        description="Folder of the LoRA disk cache (by object and ETag); the workers of one host"
        " may share it on a local file system, not NFS.",
    )
    lora_cache_max_bytes: int = Field(
        default=20 * 1024**3,
        ge=0,
        description="Disk cap of the LoRA cache (20 GiB by default); least recently used"
        " entries are evicted beyond it.",
    )
    lora_cache_protect_seconds: float = Field(
        default=600.0,
        ge=0,
        description="An entry of the LoRA disk cache handed out this recently is never evicted"
        " (the model may not have loaded it yet).",
    )
    lora_max_bytes: int = Field(
        default=512 * 1024**2,
        ge=1,
        description="Largest LoRA accepted (512 MiB by default), checked before download and"
        " before load.",
    )
    lora_max_rank: int = Field(
        default=256, ge=1, le=4096, description="Largest LoRA rank accepted."
    )

    # Backend webhooks.
    backend_api_url: str = Field(
        default="http://localhost:8000",
        description="The backend's base URL: the only webhook destination (URLs in messages are"
        " ignored).",
    )
    internal_api_token: SecretStr = Field(
        default=SecretStr(""),
        description="Sent as `Authorization: Bearer <token>` with every webhook (never logged).",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="Timeout of each webhook request."
    )
    webhook_max_attempts: int = Field(
        default=3,
        ge=1,
        le=50,
        description="Attempts of a completion or failure call within one delivery (connection"
        " errors, 5xx, 408, 429; `Retry-After` honoured); longer outages hand the message back.",
    )
    webhook_retry_budget_seconds: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="Time those attempts may take within one delivery.",
    )
    webhook_not_found_retry_seconds: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="How long after the decision a 404 (the backend does not know the"
        " generation, perhaps not yet) is retried before the message is parked with its"
        " outcome.",
    )
    outcome_max_age_seconds: float = Field(
        default=86400.0,
        ge=60,
        le=30 * 86400,
        description="How long a decided outcome the backend cannot take (5xx, unreachable, a"
        " refused token) is retried before the message is parked with it.",
    )
    backend_access_probe_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="While the backend refuses `INTERNAL_API_TOKEN` (401/403), how often it is"
        " asked again.",
    )
    webhook_signing_secret: SecretStr | None = Field(
        default=None,
        description="When set, every webhook is also signed the Standard Webhooks way"
        " (`whsec_<base64>` or a plain string; never logged).",
    )

    # Model.
    model_id: str = Field(
        default=DEFAULT_MODEL_ID,
        description="Hub id or local diffusers folder of Stable Diffusion 1.5.",
    )
    model_device: str = Field(
        default="auto", description="`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."
    )
    model_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="`auto`: float16 on CUDA, float32 on the CPU."
    )
    model_cache_dir: str | None = Field(
        default=None, description="Hub download cache; unset: `HF_HOME`'s default."
    )
    cuda_visible_devices: str | None = Field(
        default=None,
        description="GPUs the process sees, e.g. `0` or `0,1` (exported before CUDA starts, so"
        " `.env` works too; never set it empty: that hides every GPU). Indices are in PCI bus"
        " order, as nvidia-smi shows them: the worker sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` unless"
        " it is set, so the model and the GPU metrics see the same card.",
    )
    lora_scale: float = Field(
        default=RequestPolicy.lora_scale,
        ge=0.0,
        le=2.0,
        description="Strength of the artist's LoRA (0 = base model, 1 = as trained).",
    )
    model_channels_last: bool = Field(
        default=True, description="channels_last memory format for the UNet and the VAE."
    )
    model_fuse_qkv: bool = Field(
        default=True,
        description="Fused QKV projections where no LoRA reaches them (the VAE's attention,"
        " never the UNet's).",
    )
    model_compile: bool = Field(
        default=False,
        description="`torch.compile` the UNet; pipeline LoRAs are then hot-swapped into one slot"
        " so a switch never recompiles.",
    )
    model_compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field(
        default="default",
        description="`default` compiles fastest; the `max-autotune` modes benchmark kernels for"
        " every shape (commonly minutes per shape on a cold cache, at start and at each"
        " recompile): measure with `bench.gpu --compile-mode` first. Kernels are cached in"
        " `TORCHINDUCTOR_CACHE_DIR` (on the cache volume in the image).",
    )
    model_warmup: bool = Field(
        default=True,
        description="On CUDA, before taking jobs: one image and one full batch at 512x512, then"
        " one image at each other size of the contract's aspect ratios, so no job waits for a"
        " compilation or cuDNN's autotuning; a size that fails (out of memory on a small card)"
        " is logged and skipped.",
    )
    # LORA_ADAPTER_CACHE_SIZE is this setting's name before 2026-11 (still read).
    lora_pipeline_cache_size: int = Field(
        default=8,
        ge=1,
        le=256,
        validation_alias=AliasChoices("lora_pipeline_cache_size", "lora_adapter_cache_size"),
        description="Pipeline LoRAs kept loaded, least recently used evicted (also read under"
        " its old name `LORA_ADAPTER_CACHE_SIZE`).",
    )
    mixed_lora_batches: bool = Field(
        default=True,
        description="Jobs with different LoRAs may share one model call (each sample routed"
        " through its own pipeline LoRA).",
    )
    lora_hotswap_max_rank: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Rank of the hot-swap slot (with `MODEL_COMPILE`); a LoRA above it costs one"
        " recompile.",
    )

    # Request policy (defaults are the domain's: one source for each number).
    default_steps: int = Field(
        default=RequestPolicy.default_steps,
        ge=1,
        le=500,
        description="Denoising steps when a message gives none.",
    )
    default_guidance_scale: float = Field(
        default=RequestPolicy.default_guidance_scale,
        ge=0.0,
        le=50.0,
        description="Guidance scale (`cfg_scale`) when a message gives none.",
    )
    min_image_size: int = Field(
        default=RequestPolicy.min_size,
        ge=64,
        description="Smallest width and height a message may ask for.",
    )
    max_image_size: int = Field(
        default=RequestPolicy.max_size,
        ge=64,
        le=4096,
        description="Largest width and height a message may ask for.",
    )
    max_steps: int = Field(
        default=RequestPolicy.max_steps,
        ge=1,
        le=500,
        description="Most denoising steps a message may ask for.",
    )
    max_guidance_scale: float = Field(
        default=RequestPolicy.max_guidance_scale,
        ge=0.0,
        description="Largest guidance scale a message may ask for.",
    )
    max_prompt_chars: int = Field(
        default=RequestPolicy.max_prompt_chars,
        ge=1,
        description="Longest prompt (tags included) and negative prompt, in characters.",
    )
    progress_milestones: Annotated[tuple[int, ...], NoDecode] = Field(
        default=DEFAULT_MILESTONES,
        description="Percentages (each 0 to 100, comma-separated) of the denoising steps at"
        " which a progress webhook is sent, each once.",
    )
    # At least 3: the backend re-queues a retryable failure told with retry_count < 3, and the
    # re-queued message's own failure would then be withheld (one failure per generation).
    max_retries: int = Field(
        default=SettlementPolicy.max_retries,
        ge=3,
        le=100,
        description="Deliveries of a job that may end in a retryable error before its failure"
        " is reported.",
    )

    # Signature.
    signature_default_text: str = Field(
        default="",
        description="Text signature for a message with neither `signature_path` nor"
        " `artist_name`; empty: no signature.",
    )
    signature_font_path: str | None = Field(
        default=None,
        description="TrueType font of text signatures; unset: DejaVu Sans Bold from the system.",
    )
    signature_max_bytes: int = Field(
        default=5 * 1024 * 1024,
        ge=1024,
        description="Largest signature image accepted, in bytes (5 MiB by default).",
    )
    signature_max_pixels: int = Field(
        default=4096 * 4096,
        ge=1024,
        description="Largest signature image accepted, in pixels (4096x4096 by default).",
    )

    # Adapter choice: production by default; demo and generate use local/console/memory.
    storage_backend: Literal["s3", "local"] = Field(
        default="s3",
        description="The `Storage` adapter of the worker; `local` is a folder laid out like S3.",
    )
    notifier_backend: Literal["http", "console"] = Field(
        default="http",
        description="The `Notifier` adapter of the worker: the backend's webhooks, or the"
        " console.",
    )
    task_source_backend: Literal["rabbitmq", "memory"] = Field(
        default="rabbitmq", description="The `TaskSource` adapter of the worker."
    )
    local_storage_dir: str = Field(
        default="output/storage",
        description="Root of the local storage adapter (`<root>/<bucket>/<key>`).",
    )

    # Operations: metrics and health endpoints, logs.
    metrics_host: str = Field(
        default="0.0.0.0",
        description="Address of the operations endpoint (`/metrics`, `/healthz`, `/readyz`).",
    )
    metrics_port: int = Field(
        default=9100,
        ge=0,
        le=65535,
        description="Port of the operations endpoint (`0`: an ephemeral port); each worker on a"
        " host needs its own.",
    )
    health_stale_after_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="`/healthz` fails when the worker loop has been silent this long (make it"
        " longer than the longest batch).",
    )
    health_startup_grace_seconds: float = Field(
        default=1800.0,
        ge=0,
        le=86400,
        description="Before the loop's first beat (model download and load), `/healthz` passes"
        " for this long.",
    )
    readiness_timeout_seconds: float = Field(
        default=3.0, gt=0, le=60, description="Time limit of each `/readyz` check."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO",
        description="Level of the worker's own loggers (third-party libraries stay at WARNING).",
    )
    log_format: Literal["json", "text"] | None = Field(
        default=None,
        description="`json`: one object per line; unset: `json` for the worker, `text` for the"
        " other commands.",
    )

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
