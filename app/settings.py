"""Settings from the environment and ``.env``, checked at start (docs/configuration.md: the
backend's own variable names first; each field's ``description`` is that table's wording)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.settings_provenance import ProvenanceSettings
from app.settings_services import ServiceSettings
from app.settings_worker import WorkerSettings

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


class Settings(BaseSettings, ProvenanceSettings, WorkerSettings, ServiceSettings):
    """Every tunable of the worker. The field name, upper-cased, is the environment variable;
    the fields live in ``ServiceSettings``, ``WorkerSettings`` and ``ProvenanceSettings``, in
    the order of the docs."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

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
    if (settings.c2pa_signing_key_file is None) != (settings.c2pa_certificate_file is None):
        raise SettingsError(
            "C2PA_SIGNING_KEY_FILE and C2PA_CERTIFICATE_FILE are set together (a key signs"
            " only with its certificate chain); one of them is unset"
        )
    return settings
