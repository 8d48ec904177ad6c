"""Sample inputs for ``demo`` and ``generate``: a signature image, the tiny model fallback."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from adapters.fonts import SignatureFonts
from app.settings import Settings
from containers import Container
from domain.errors import ModelError

log = logging.getLogger(__name__)

TINY_MODEL_DIR = Path(".cache") / "tiny-sd"


def write_sample_signature(path: Path, text: str = "A. Rivera") -> Path:
    """A PNG with alpha: the artist's name over a stroke, like a scanned signature."""
    fonts = SignatureFonts()
    font = fonts(96)
    left, top, right, bottom = font.getbbox(text)
    width, height = right - left + 40, bottom - top + 60
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.text((20 - left, 10 - top), text, font=font, fill=(250, 240, 220, 255))
    draw.line((20, height - 22, width - 20, height - 30), fill=(250, 240, 220, 255), width=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def first_line(exc: BaseException) -> str:
    """The cause of a model error on one short line."""
    cause = str(getattr(exc, "__cause__", None) or getattr(exc, "message", exc)).splitlines()
    line = cause[0] if cause else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def load_model_or_tiny(
    container: Container, model_id: str, report: Callable[[str], None] = print
) -> str:
    """Initialise the container's model from ``model_id``; if it cannot load, use the tiny model.

    Returns the model id in use. The fallback is said plainly: the tiny model has random weights,
    so its images show the pipeline working, not a picture.
    """
    try:
        container.image_model.init()
        return model_id
    except ModelError as exc:
        report(f"Stable Diffusion weights could not be loaded from {model_id!r}: {first_line(exc)}")
    return use_tiny_model(container, report)


def use_tiny_model(container: Container, report: Callable[[str], None] = print) -> str:
    """Build (once) and load the tiny built-in model instead of MODEL_ID; its path."""
    # Imported here: only this path needs the builder (and torch).
    from adapters.diffusion.tiny_model import (  # pylint: disable=import-outside-toplevel
        build_tiny_model,
    )

    tiny = build_tiny_model(TINY_MODEL_DIR.resolve())
    report(
        f"Using the tiny built-in model at {tiny} (random weights: the image shows the"
        " whole pipeline working, not a picture). Set MODEL_ID to an SD 1.5 folder or hub id"
        " with network access for real images."
    )
    container.config.model_id.from_value(str(tiny))
    container.image_model.init()
    return str(tiny)


def forget_generation(
    container: Container, settings: Settings, storage_root: Path, generation_id: int
) -> None:
    """Remove a generation's image and outcome records from the demo's local storage, so the
    demo renders it again instead of reporting the stored image."""
    key = container.generation_job().output_key(generation_id)
    output = storage_root / settings.output_bucket / key
    for path in output.parent.glob(output.name + "*"):
        path.unlink(missing_ok=True)
    records = storage_root / settings.output_bucket / settings.outcome_records_prefix
    shutil.rmtree(records / str(generation_id), ignore_errors=True)


def copy_into(source: Path, storage_root: Path, bucket: str, key: str) -> str:
    """Copy a local file or folder into the local storage layout; its ``s3://`` reference."""
    target = storage_root / bucket / key
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
        return f"s3://{bucket}/{key}/"
    shutil.copyfile(source, target)
    return f"s3://{bucket}/{key}"
