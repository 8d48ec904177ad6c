"""Settings of the worker itself: the model, the request policy, the signature, which adapters
run, operations (fields of ``app.settings.Settings``; docs/configuration.md is rendered from
them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic_settings import NoDecode

from domain.progress import DEFAULT_MILESTONES
from domain.request import RequestPolicy
from domain.settlement_policy import SettlementPolicy

DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class WorkerSettings(BaseModel):
    """The model and its limits, what a request may ask, the signature, the adapters, operations."""

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
