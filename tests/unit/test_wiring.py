"""Settings, the container, and the architecture's import rules."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from dependency_injector import providers

from adapters.console_notifier import ConsoleNotifier
from adapters.diffusion.resource import export_cuda_environment, warm_up_shapes
from adapters.local import LocalStorage
from adapters.memory_task_source import InMemoryTaskSource
from app.settings import SettingsError, load_settings
from containers import build_container
from domain.job import GenerationJob
from domain.request import ASPECT_RATIOS, GenerationRequest
from ports import Notifier, Storage, TaskSource
from tests.unit.conftest import Wired

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    settings = load_settings()
    assert settings.max_concurrent_generations == 10
    assert settings.rabbitmq_queue == "image_generation"
    assert settings.default_steps == 50 and settings.default_guidance_scale == 7.5
    assert settings.progress_milestones == (0, 25, 50, 75, 90)
    assert settings.model_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_environment_names_are_the_contracts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    for name, value in {
        "RABBITMQ_HOST": "mq",
        "RABBITMQ_PORT": "5673",
        "AWS_STORAGE_BUCKET_NAME": "media",
        "AWS_S3_REGION_NAME": "eu-west-1",
        "BACKEND_API_URL": "https://api.test",
        "INTERNAL_API_TOKEN": "tok-123",
        "MAX_CONCURRENT_GENERATIONS": "4",
        "LOG_LEVEL": "debug",
        "PROGRESS_MILESTONES": "0, 50,100",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert (settings.rabbitmq_host, settings.rabbitmq_port) == ("mq", 5673)
    assert settings.output_bucket == "media" and settings.aws_s3_region_name == "eu-west-1"
    assert settings.internal_api_token.get_secret_value() == "tok-123"
    assert "tok-123" not in repr(settings)
    assert settings.max_concurrent_generations == 4 and settings.log_level == "DEBUG"
    assert settings.progress_milestones == (0, 50, 100)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("RABBITMQ_PORT", "not-a-port", "RABBITMQ_PORT"),
        ("MAX_CONCURRENT_GENERATIONS", "0", "MAX_CONCURRENT_GENERATIONS"),
        ("PROGRESS_MILESTONES", "0,fifty", "PROGRESS_MILESTONES"),
        ("PROGRESS_MILESTONES", "0,150", "PROGRESS_MILESTONES"),
        ("MODEL_DTYPE", "float8", "MODEL_DTYPE"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL"),
        ("MIN_IMAGE_SIZE", "2048", "MIN_IMAGE_SIZE"),
        ("DEFAULT_STEPS", "200", "DEFAULT_STEPS \\(200\\) is above MAX_STEPS"),
        ("DEFAULT_GUIDANCE_SCALE", "40", "DEFAULT_GUIDANCE_SCALE"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.chdir("/")
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=fragment):
        load_settings()


def test_bad_value_of_a_secret_is_not_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(internal_api_token=["s3cr3t-token"])
    assert "INTERNAL_API_TOKEN" in str(caught.value) and "s3cr3t" not in str(caught.value)


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RABBITMQ_QUEUE=jobs\nMAX_RETRIES=7\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.rabbitmq_queue == "jobs" and settings.max_retries == 7


def test_selectors_build_the_configured_adapters(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir("/")
    container = build_container(
        load_settings(
            local_storage_dir=str(tmp_path),
            storage_backend="local",
            notifier_backend="console",
            task_source_backend="memory",
        ).container_config()
    )
    assert isinstance(container.storage(), LocalStorage)
    assert isinstance(container.notifier(), ConsoleNotifier)
    assert isinstance(container.task_source(), InMemoryTaskSource)
    assert isinstance(container.storage(), Storage)
    assert isinstance(container.notifier(), Notifier)
    assert isinstance(container.task_source(), TaskSource)
    assert container.storage().root == tmp_path.resolve()


def test_overrides_reach_the_use_case(wired: Wired) -> None:
    job = wired.container.generation_job()
    assert isinstance(job, GenerationJob)
    assert job is not wired.container.generation_job()  # a Factory: one per job
    stream = io.StringIO()
    wired.container.notifier.override(providers.Object(ConsoleNotifier(stream)))
    request = GenerationRequest(
        generation_id=8, prompt="p", width=256, height=256, steps=4, guidance_scale=7.5, seed=1
    )
    job = wired.container.generation_job()
    (rendered,) = job.render_batch([job.prepare(request)])
    job.finish(rendered)  # type: ignore[arg-type]
    assert wired.model.calls[0][0] is request  # the overridden model ran it
    assert "generations/8.png" in wired.storage.outputs  # into the overridden storage
    assert "generation 8" in stream.getvalue() and wired.notifier.sent == []


def test_building_the_container_does_not_import_torch() -> None:
    code = (
        "import sys, containers\nfrom app.settings import load_settings\n"
        "containers.build_container(load_settings().container_config())\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
    )
    assert out.stdout.strip() == "False"


def test_cuda_numbers_devices_as_nvml_and_nvidia_smi_do() -> None:
    # patch.dict restores the whole environment after, what the function wrote included.
    with mock.patch.dict(os.environ):
        os.environ.pop("CUDA_DEVICE_ORDER", None)
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        export_cuda_environment("1")
        assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        os.environ["CUDA_DEVICE_ORDER"] = "FASTEST_FIRST"  # the operator's choice stands
        export_cuda_environment(None)
        assert os.environ["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_the_warm_up_covers_every_aspect_ratio_most_jobs_size_first() -> None:
    shapes = warm_up_shapes()
    assert shapes[0] == ASPECT_RATIOS["1:1"]
    assert sorted(shapes) == sorted(set(ASPECT_RATIOS.values()))


def test_the_pipeline_cache_size_is_read_under_its_old_name_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir("/")
    monkeypatch.setenv("LORA_ADAPTER_CACHE_SIZE", "3")
    assert load_settings().lora_pipeline_cache_size == 3
    monkeypatch.setenv("LORA_PIPELINE_CACHE_SIZE", "5")
    assert load_settings().lora_pipeline_cache_size == 5


def test_the_container_is_configured_with_plain_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    values = load_settings(
        internal_api_token="t0k", s3_output_bucket=None, aws_storage_bucket_name="media"
    ).container_config()
    assert values["internal_api_token"] == "t0k"
    assert values["aws_access_key_id"] is None
    assert values["output_bucket"] == "media"
