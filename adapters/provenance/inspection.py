"""Reading the marks back from any PNG or JPEG: what ``python -m app inspect`` prints and the
tests check (one code path for both)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from PIL import Image, UnidentifiedImageError

from adapters.provenance.credentials import CredentialsReport, read_credentials
from adapters.provenance.invisible_mark import InvisibleMark, MarkReading
from adapters.provenance.png_metadata import PngText, read_png_text

MAX_INSPECTED_PIXELS = 4096 * 4096
"""Larger images are refused before decoding (a decompression bomb is not inspected); the
worker writes at most MAX_IMAGE_SIZE (4096) on a side."""
MARK_WINDOW_PX = 2048
"""The invisible mark is looked for in a centre crop of at most this side (the mark survives
crops): the search holds a few float planes of the window at twice its size in memory."""
VERIFIED_STATES = ("valid", "untrusted")
"""Credential states whose signature and hashes check out; ``untrusted`` names a signer that
is on no trust list (the development certificate)."""
_MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg"}


class NotAnImage(ValueError):
    """The bytes are not a PNG or JPEG image this command can read."""


@dataclass(frozen=True)
class Inspection:
    """Everything one file proves about its origin."""

    format: str
    width: int
    height: int
    credentials: CredentialsReport
    text: PngText
    mark: MarkReading | None

    def verified(self, *, require_trusted: bool = False) -> bool:
        """Whether the content credentials validate (and, when asked, their signer is trusted)."""
        if require_trusted:
            return self.credentials.state == "valid"
        return self.credentials.state in VERIFIED_STATES

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``inspect --json``)."""
        credentials = {
            item.name: getattr(self.credentials, item.name) for item in fields(self.credentials)
        }
        credentials["assertions"] = dict(self.credentials.assertions)
        credentials["validation_codes"] = list(self.credentials.validation_codes)
        return {
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "content_credentials": credentials,
            "metadata": asdict(self.text),
            "invisible_mark": None if self.mark is None else _reading(self.mark),
        }


def _reading(mark: MarkReading) -> dict[str, Any]:
    return {
        "status": mark.status,
        "generation_id": mark.generation_id,
        "confidence": round(mark.confidence, 3),
        "detail": dict(mark.detail),
    }


def inspect_image(
    data: bytes, *, invisible_mark: InvisibleMark | None, trust_anchors_pem: bytes | None = None
) -> Inspection:
    """What ``data`` proves: credentials (trusted when their chain ends in one of
    ``trust_anchors_pem``), metadata chunks, and the invisible mark read with ``invisible_mark``
    (None: not looked for). ``NotAnImage`` for anything but PNG or JPEG."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format not in _MIME_TYPES:
                raise NotAnImage(f"not a PNG or JPEG image (found {opened.format})")
            if opened.width * opened.height > MAX_INSPECTED_PIXELS:
                raise NotAnImage(
                    f"{opened.width}x{opened.height} is above {MAX_INSPECTED_PIXELS} pixels"
                )
            opened.load()
            text = read_png_text(opened)
            image = opened.convert("RGB")
            image_format = str(opened.format)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        # ValueError: Pillow's own limits, e.g. a text chunk over PngImagePlugin.MAX_TEXT_CHUNK.
        raise NotAnImage(f"not a readable PNG or JPEG image: {exc}") from exc
    credentials = read_credentials(
        data, _MIME_TYPES[image_format], trust_anchors_pem=trust_anchors_pem
    )
    mark = invisible_mark.decode(_centre(image)) if invisible_mark is not None else None
    return Inspection(
        format=image_format,
        width=image.width,
        height=image.height,
        credentials=credentials,
        text=text,
        mark=mark,
    )


def _centre(image: Image.Image) -> Image.Image:
    """The centre of the image, at most ``MARK_WINDOW_PX`` on a side."""
    width, height = min(image.width, MARK_WINDOW_PX), min(image.height, MARK_WINDOW_PX)
    if (width, height) == image.size:
        return image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _manifest_lines(credentials: CredentialsReport) -> list[str]:
    """What the manifest states: who made the image and how, its author, what it may not be
    used for."""
    lines = []
    for name, value in (
        ("made by", credentials.claim_generator),
        ("source type", credentials.digital_source_type),
        ("author", credentials.author),
    ):
        if value:
            lines.append(f"{name}: {value}")
    for label, data in credentials.assertions.items():
        if label.startswith("c2pa.actions") and isinstance(data, Mapping):
            for action in data.get("actions") or []:
                if isinstance(action, Mapping) and action.get("parameters"):
                    lines.append(f"{action.get('action')}: {_compact(action['parameters'])}")
        if label.endswith("training-mining") and isinstance(data, Mapping):
            entries = data.get("entries") or {}
            if isinstance(entries, Mapping):
                uses = {
                    str(use).rsplit(".", maxsplit=1)[-1]: entry.get("use")
                    for use, entry in entries.items()
                    if isinstance(entry, Mapping)
                }
                lines.append(f"training and mining: {_compact(uses)}")
    return lines


def _compact(value: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {item}" for key, item in value.items())


def describe(inspection: Inspection) -> list[str]:
    """The human lines of ``inspect``: one per mark."""
    credentials = inspection.credentials
    lines = [f"image: {inspection.format} {inspection.width}x{inspection.height}"]
    if credentials.present:
        lines.append(
            f"content credentials: {credentials.state} (manifest {credentials.manifest_label},"
            f" signed by {credentials.signer or 'unknown'})"
        )
        if credentials.validation_codes:
            lines.append("  codes: " + ", ".join(credentials.validation_codes))
        lines.extend(f"  {line}" for line in _manifest_lines(credentials))
    else:
        lines.append("content credentials: none")
    text = inspection.text
    lines.append(f"digital source type (XMP): {text.digital_source_type or 'none'}")
    if text.generation_id is not None:
        lines.append(f"generation id (XMP): {text.generation_id}, style id: {text.style_id}")
    if text.parameters is not None:
        lines.append("parameters:")
        lines.extend(f"  {line}" for line in text.parameters.splitlines())
    else:
        lines.append("parameters: none")
    mark = inspection.mark
    if mark is None:
        lines.append("invisible mark: not read")
    elif mark.generation_id is None:
        lines.append("invisible mark: none readable")
    else:
        lines.append(
            f"invisible mark: generation id {mark.generation_id}"
            f" (confidence {mark.confidence:.2f})"
        )
    return lines
