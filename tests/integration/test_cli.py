"""The CLI end to end: the demo, one job from flags, and failing fast on bad settings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.model


@pytest.fixture
def in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run in an empty folder with a clean environment for the settings."""
    monkeypatch.chdir(tmp_path)
    # main() configures the root logger onto the captured stderr; put the handlers back.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in list(os.environ):
        if name.startswith(("MODEL_", "SIGNATURE_", "MAX_", "S3_", "AWS_", "LOCAL_")):
            monkeypatch.delenv(name)
    return tmp_path


def test_demo_falls_back_to_the_tiny_model_and_prints_the_png(tmp_path: Path) -> None:
    env = {**os.environ, "MODEL_ID": str(tmp_path / "no-such-model"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "app", "demo", "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "could not be loaded" in done.stdout and "tiny built-in model" in done.stdout
    assert "[##############################] 100%" in done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.suffix == ".png"
    with Image.open(path) as image:
        assert image.size == (512, 512)


def test_generate_writes_the_png_with_the_text_signature(
    in_tmp: Path,
    tiny_model_dir: Path,
    tiny_loras: dict[str, Path],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    common = [
        "generate",
        "--prompt",
        "a lighthouse",
        "--width",
        "256",
        "--height",
        "384",
        "--steps",
        "5",
        "--seed",
        "7",
        "--lora",
        str(tiny_loras["peft"]),
        "--position",
        "top-left",
        "--size",
        "large",
        "--opacity",
        "1.0",
    ]
    monkeypatch.setenv("MODEL_ID", str(tiny_model_dir))
    assert main([*common, "--out", "plain.png"]) == 0
    assert main([*common, "--signature-text", "Ana Rivera", "--out", "signed.png"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(in_tmp / "signed.png")
    with Image.open(in_tmp / "plain.png") as plain, Image.open(in_tmp / "signed.png") as signed:
        assert plain.size == signed.size == (256, 384)
        delta = np.abs(np.asarray(plain, np.int16) - np.asarray(signed, np.int16)).sum(axis=2)
    ys, xs = np.nonzero(delta)
    # Only the top-left signature box changed: large = 35 % of 256 = 90 px wide, margin 8;
    # rounded out to the invisible mark's 8 px blocks (a block's mark follows its content, the
    # same id marks the same pixels the same way).
    assert len(xs) > 200
    assert xs.min() >= 8 and xs.max() < 104 and ys.min() >= 8 and ys.max() < 104


def test_generate_reports_bad_input_with_its_code(
    in_tmp: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pickle = in_tmp / "style.ckpt"
    pickle.write_bytes(b"not really a checkpoint")
    monkeypatch.setenv("MODEL_ID", str(tiny_model_dir))
    bad_lora = main(["generate", "--prompt", "x", "--steps", "2", "--lora", str(pickle)])
    bad_size = main(["generate", "--prompt", "x", "--width", "100"])
    err = capsys.readouterr().err
    assert bad_lora == 1 and "FAILED LORA_INVALID" in err and "pickle formats" in err
    assert bad_size == 1 and "INVALID_REQUEST" in err and "data.parameters.width" in err


def test_generate_without_weights_says_what_to_set_in_one_line(
    in_tmp: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ID", str(in_tmp / "no-such-model"))
    assert main(["generate", "--prompt", "x", "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    told = err.strip().splitlines()[-1]
    assert told.startswith("generate: cannot load the model MODEL_ID=")
    assert "Set MODEL_ID" in told and "--tiny" in told


def test_generate_on_the_tiny_model(
    in_tmp: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ID", str(in_tmp / "no-such-model"))
    out = in_tmp / "tiny.png"
    args = ["--width", "256", "--height", "256", "--steps", "2", "--out", str(out)]
    assert main(["generate", "--prompt", "x", "--tiny", *args]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    with Image.open(out) as image:
        assert image.size == (256, 256)


def test_bad_setting_fails_at_start_naming_the_variable(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MAX_CONCURRENT_GENERATIONS", "many")
    assert main(["demo"]) == 2
    assert "MAX_CONCURRENT_GENERATIONS" in capsys.readouterr().err
    assert not (in_tmp / "output").exists()
