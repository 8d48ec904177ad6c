"""Shared fixtures: the tiny diffusers model and its LoRAs, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.services import RabbitService, S3Service, rabbit_service, s3_service


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete diffusers SD folder with seeded random weights (no hub)."""
    # pylint: disable-next=import-outside-toplevel
    from adapters.diffusion.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same LoRA in the three accepted layouts."""
    # pylint: disable-next=import-outside-toplevel
    from adapters.diffusion.tiny_model import build_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    return {
        "diffusers": build_tiny_lora(tiny_model_dir, root / "style.safetensors", fmt="diffusers"),
        "kohya": build_tiny_lora(tiny_model_dir, root / "style_kohya.safetensors", fmt="kohya"),
        "peft": build_tiny_lora(tiny_model_dir, root / "style_peft", fmt="peft"),
    }


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Service]:
    """A real S3 HTTP API (MinIO via testcontainers, or moto_server)."""
    with s3_service() as service:  # pylint: disable=contextmanager-generator-missing-cleanup
        yield service


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitService]:
    """A real RabbitMQ broker (testcontainers, or the local one)."""
    with rabbit_service() as service:  # pylint: disable=contextmanager-generator-missing-cleanup
        yield service
