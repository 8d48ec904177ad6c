"""The README and .env.example document every setting and every error code."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.metrics import METRICS
from app.settings import Settings, load_settings
from domain.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
ENV_EXAMPLE = (ROOT / ".env.example").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", [name.upper() for name in dict(Settings.model_fields)])
def test_every_setting_is_documented(name: str) -> None:
    assert f"\n{name}=" in ENV_EXAMPLE or f"\n# {name}=" in ENV_EXAMPLE, name
    assert f"`{name}`" in README, f"{name} missing from the README's settings table"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_documented(code: ErrorCode) -> None:
    retryable = "yes" if code.retryable else "no"
    assert f"| `{code.value}` | {retryable} |" in README


@pytest.mark.parametrize("metric", [metric.name for metric in METRICS])
def test_every_metric_is_in_the_operations_section(metric: str) -> None:
    operations = README.split("## Operations", 1)[1]
    assert f"| `{metric}` |" in operations


def test_env_example_loads_as_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(ENV_EXAMPLE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    from_example = load_settings()
    monkeypatch.chdir("/")
    assert from_example.model_dump() == load_settings().model_dump()


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert first_block.strip().splitlines()[0].startswith("make demo")
    assert first_block.strip().splitlines()[1].startswith("make test")
