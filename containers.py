"""The composition root: configured values -> resources -> adapters -> use case.

Nothing here runs at import time. ``build_container(values)`` fills the configuration with the
values the entry points read (``Settings.container_config()``: every setting by field name,
secrets in plain text); tests replace any provider with ``container.<provider>.override(...)``.
This module imports no entry point and no settings class: configuration flows in as values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from dependency_injector import containers, providers

from adapters.console_notifier import ConsoleNotifier
from adapters.diffusion.lora.disk_cache import LoraDiskCache
from adapters.diffusion.resource import init_image_model
from adapters.fonts import SignatureFonts
from adapters.local import LocalRecordStore, LocalStorage
from adapters.local.records import records_root
from adapters.memory_task_source import InMemoryTaskSource
from adapters.nvml import GpuMonitor
from adapters.prometheus import PrometheusTelemetry
from adapters.provenance.configured import configured_credentials, configured_invisible_mark
from adapters.provenance.marks import ProvenanceMarks
from adapters.rabbitmq import RabbitMQTaskSource
from adapters.s3 import S3RecordStore, S3Storage, make_s3_client
from adapters.webhooks import HttpNotifier
from domain.backend_access import BackendAccess
from domain.job import GenerationJob
from domain.ledger import OutcomeLedger
from domain.progress import StepTimeEstimator
from domain.request import RequestNormalizer, RequestPolicy
from domain.runner import StagedRunner
from domain.settlement import Settlement
from domain.settlement_policy import SettlementPolicy, telling_lease_for
from domain.watermark import Watermarker


def init_gpu_monitor(*, visible_devices: str | None) -> Iterator[GpuMonitor]:
    """NVML, started lazily at the first sample (a Resource: shut down with the worker)."""
    monitor = GpuMonitor(visible_devices=visible_devices)
    try:
        yield monitor
    finally:
        monitor.close()


class Container(containers.DeclarativeContainer):
    """Wires the worker; adapters are chosen by the ``*_backend`` settings."""

    config = providers.Configuration(strict=True)

    image_model = providers.Resource(
        init_image_model,
        model_id=config.model_id,
        device=config.model_device,
        dtype=config.model_dtype,
        cache_dir=config.model_cache_dir,
        cuda_visible_devices=config.cuda_visible_devices,
        tuning=providers.Dict(
            channels_last=config.model_channels_last,
            fuse_qkv=config.model_fuse_qkv,
            compile_unet=config.model_compile,
            compile_mode=config.model_compile_mode,
        ),
        warmup=config.model_warmup,
        max_batch_size=config.max_batch_size,
        lora_pipeline_cache_size=config.lora_pipeline_cache_size,
        mixed_lora_batches=config.mixed_lora_batches,
        hotswap_max_rank=config.lora_hotswap_max_rank,
        lora_max_bytes=config.lora_max_bytes,
        lora_max_rank=config.lora_max_rank,
    )

    s3_client = providers.Singleton(
        make_s3_client,
        endpoint_url=config.aws_s3_endpoint_url,
        region=config.aws_s3_region_name,
        access_key_id=config.aws_access_key_id,
        secret_access_key=config.aws_secret_access_key,
        max_attempts=config.s3_max_attempts,
    )

    lora_disk_cache = providers.Singleton(
        LoraDiskCache,
        root=config.lora_cache_dir,
        max_bytes=config.lora_cache_max_bytes,
        protect_seconds=config.lora_cache_protect_seconds,
    )

    storage = providers.Selector(
        config.storage_backend,
        s3=providers.Singleton(
            S3Storage,
            client=s3_client,
            models_bucket=config.s3_models_bucket,
            media_bucket=config.aws_storage_bucket_name,
            output_bucket=config.output_bucket,
            lora_cache=lora_disk_cache,
            max_lora_bytes=config.lora_max_bytes,
            public_base_url=config.s3_public_base_url,
            endpoint_url=config.aws_s3_endpoint_url,
            region=config.aws_s3_region_name,
            max_signature_bytes=config.signature_max_bytes,
            allowed_buckets=config.s3_allowed_buckets,
        ),
        local=providers.Singleton(
            LocalStorage,
            root=config.local_storage_dir,
            models_bucket=config.s3_models_bucket,
            media_bucket=config.aws_storage_bucket_name,
            output_bucket=config.output_bucket,
            allowed_buckets=config.s3_allowed_buckets,
        ),
    )

    records = providers.Selector(
        config.storage_backend,
        s3=providers.Singleton(
            S3RecordStore,
            client=s3_client,
            bucket=config.output_bucket,
            prefix=config.outcome_records_prefix,
        ),
        local=providers.Singleton(
            LocalRecordStore,
            root=providers.Callable(
                records_root,
                config.local_storage_dir,
                config.output_bucket,
                config.outcome_records_prefix,
            ),
        ),
    )

    ledger = providers.Singleton(OutcomeLedger, records=records)

    gpu_monitor = providers.Resource(init_gpu_monitor, visible_devices=config.cuda_visible_devices)

    telemetry = providers.Singleton(
        PrometheusTelemetry,
        info=providers.Dict(
            model=config.model_id, device=config.model_device, queue=config.rabbitmq_queue
        ),
    )

    notifier = providers.Selector(
        config.notifier_backend,
        http=providers.Resource(
            HttpNotifier.resource,
            base_url=config.backend_api_url,
            token=config.internal_api_token,
            timeout_seconds=config.webhook_timeout_seconds,
            max_attempts=config.webhook_max_attempts,
            retry_budget_seconds=config.webhook_retry_budget_seconds,
            signing_secret=config.webhook_signing_secret,
            telemetry=telemetry,
        ),
        console=providers.Singleton(ConsoleNotifier),
    )

    task_source = providers.Selector(
        config.task_source_backend,
        rabbitmq=providers.Singleton(
            RabbitMQTaskSource,
            host=config.rabbitmq_host,
            port=config.rabbitmq_port,
            user=config.rabbitmq_user,
            password=config.rabbitmq_pass,
            vhost=config.rabbitmq_vhost,
            queue_name=config.rabbitmq_queue,
            prefetch=config.max_concurrent_generations,
            retry_delay_seconds=config.rabbitmq_retry_delay_seconds,
            retry_max_delay_seconds=config.rabbitmq_retry_max_delay_seconds,
            parked_max_messages=config.rabbitmq_parked_max_messages,
            parked_ttl_seconds=config.rabbitmq_parked_ttl_seconds,
            heartbeat_seconds=config.rabbitmq_heartbeat_seconds,
        ),
        memory=providers.Singleton(InMemoryTaskSource),
    )

    signature_fonts = providers.Singleton(SignatureFonts, font_path=config.signature_font_path)

    watermarker = providers.Singleton(
        Watermarker,
        font_loader=signature_fonts,
        max_signature_bytes=config.signature_max_bytes,
        max_signature_pixels=config.signature_max_pixels,
    )

    provenance = providers.Singleton(
        ProvenanceMarks,
        include_prompt=config.provenance_include_prompt,
        invisible_mark=providers.Singleton(
            configured_invisible_mark,
            enabled=config.provenance_invisible_mark,
            min_image_size=config.min_image_size,
        ),
        credentials=providers.Singleton(
            configured_credentials,
            key_file=config.c2pa_signing_key_file,
            certificate_file=config.c2pa_certificate_file,
            algorithm=config.c2pa_signing_algorithm,
            timestamp_url=config.c2pa_timestamp_url,
            without_certificate=config.c2pa_without_certificate,
            thumbnail=config.c2pa_thumbnail,
        ),
    )

    step_times = providers.Singleton(StepTimeEstimator)

    request_policy = providers.Singleton(
        RequestPolicy,
        default_steps=config.default_steps,
        default_guidance_scale=config.default_guidance_scale,
        min_size=config.min_image_size,
        max_size=config.max_image_size,
        max_steps=config.max_steps,
        max_guidance_scale=config.max_guidance_scale,
        max_prompt_chars=config.max_prompt_chars,
        lora_scale=config.lora_scale,
        signature_default_text=config.signature_default_text,
    )

    normalizer = providers.Singleton(RequestNormalizer, policy=request_policy)

    generation_job = providers.Factory(
        GenerationJob,
        model=image_model,
        storage=storage,
        notifier=notifier,
        watermarker=watermarker,
        provenance=provenance,
        step_times=step_times,
        milestones=config.progress_milestones,
        output_prefix=config.s3_output_prefix,
        telemetry=telemetry,
    )

    backend_access = providers.Singleton(
        BackendAccess, probe_seconds=config.backend_access_probe_seconds
    )

    settlement_policy = providers.Singleton(
        SettlementPolicy,
        max_retries=config.max_retries,
        base_delay_seconds=config.rabbitmq_retry_delay_seconds,
        max_delay_seconds=config.rabbitmq_retry_max_delay_seconds,
        outcome_max_age_seconds=config.outcome_max_age_seconds,
        not_found_seconds=config.webhook_not_found_retry_seconds,
        telling_lease_seconds=providers.Callable(
            telling_lease_for,
            timeout_seconds=config.webhook_timeout_seconds,
            attempts=config.webhook_max_attempts,
            budget_seconds=config.webhook_retry_budget_seconds,
            storage_attempts=config.s3_max_attempts,
        ),
    )

    settlement = providers.Singleton(
        Settlement,
        source=task_source,
        ledger=ledger,
        notifier=notifier,
        access=backend_access,
        policy=settlement_policy,
        telemetry=telemetry,
    )

    job_runner = providers.Factory(
        StagedRunner,
        source=task_source,
        job=generation_job,
        normalizer=normalizer,
        settlement=settlement,
        telemetry=telemetry,
        io_threads=config.pipeline_io_threads,
        lookahead=config.pipeline_lookahead,
        max_batch_size=config.max_batch_size,
        max_held=config.max_concurrent_generations,
        max_hold_seconds=config.max_hold_seconds,
    )


def build_container(values: Mapping[str, Any]) -> Container:
    """A container configured from ``values`` (``Settings.container_config()``)."""
    container = Container()
    container.config.from_dict(dict(values))
    return container
