"""Settings of the services the worker talks to: the broker, object storage, the backend's
webhooks (fields of ``app.settings.Settings``; docs/configuration.md is rendered from them)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import NoDecode


class ServiceSettings(BaseModel):
    """Where the broker, the buckets and the backend are, and how hard to try each."""

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
    rabbitmq_parked_max_messages: int = Field(
        default=10_000,
        ge=0,
        le=10_000_000,
        description="Most messages `<queue>.parked` holds (`x-max-length`, with `x-overflow:"
        " reject-publish`): a message parked while it is full is not dropped but waits in the"
        " longest retry queue and is parked when there is room (docs/parked-messages.md); 0: no"
        " limit.",
    )
    rabbitmq_parked_ttl_seconds: int = Field(
        default=0,
        ge=0,
        le=365 * 86400,
        description="How long a parked message is kept (`x-message-ttl`); 0, the default: for"
        " ever. An expired message is gone, with an outcome the backend may never have been told"
        " (its record stays under `OUTCOME_RECORDS_PREFIX`).",
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

    @field_validator("s3_allowed_buckets", mode="before")
    @classmethod
    def _bucket_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value
