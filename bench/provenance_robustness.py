"""The invisible mark against copies of the image, side by side with the packaged imwatermark.

For each image (photographs bundled with scikit-image, centre-cropped to a square, and generated
smooth scenes; at 512 and 1024 pixels a side) both methods mark it, then every attack below is
applied and the copy decoded. OUR method (adapters.provenance.invisible_mark, a 40-bit id) reads
an exact id, "none", or a wrong id; imwatermark's dwtDctSvd (a 32-bit value) always returns 32
bits, so its miss is a wrong value. imwatermark is given the copy resized back to the original
size after a resize (it cannot search scales; this favours it); crops are decoded as they are.
Then the false-positive count on unmarked images, timings and PSNR.

    .venv/bin/python -m bench.provenance_robustness           # the full run (about 3 minutes)
    .venv/bin/python -m bench.provenance_robustness --quick   # fewer images (under a minute)

Prints a Markdown table; writes bench/results/provenance_robustness.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from adapters.provenance.invisible_mark import METHOD, InvisibleMark

RESULTS = Path(__file__).parent / "results" / "provenance_robustness.json"
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket")
"""scikit-image's bundled colour photographs (its data module ships them in the wheel)."""

Attack = Callable[[Image.Image], Image.Image]


def jpeg(quality: int) -> Attack:
    """Re-encode as JPEG at this quality (Pillow's default 4:2:0 chroma subsampling)."""

    def attack(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    return attack


def resize(factor: float) -> Attack:
    """Resize both sides by this factor (bicubic)."""
    return lambda image: image.resize(
        (round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC
    )


def crop_centre(fraction: float) -> Attack:
    """Remove this fraction of the width and of the height, half on each side: keep the centre."""

    def attack(image: Image.Image) -> Image.Image:
        cut_x, cut_y = round(image.width * fraction), round(image.height * fraction)
        box = (cut_x // 2, cut_y // 2, image.width - (cut_x - cut_x // 2))
        return image.crop((*box, image.height - (cut_y - cut_y // 2)))

    return attack


def crop_corner(fraction: float) -> Attack:
    """Remove this fraction of the width and of the height on the right and bottom."""
    return lambda image: image.crop(
        (0, 0, round(image.width * (1 - fraction)), round(image.height * (1 - fraction)))
    )


def brighter(amount: int) -> Attack:
    """Add this amount to every channel, clipped to 0..255."""
    return lambda image: Image.fromarray(
        np.clip(np.asarray(image, dtype=np.int16) + amount, 0, 255).astype(np.uint8)
    )


def rotate(degrees: float) -> Attack:
    """Rotate about the centre, same size, bicubic."""
    return lambda image: image.rotate(degrees, Image.Resampling.BICUBIC)


def chain(*attacks: Attack) -> Attack:
    """The attacks applied in order."""

    def attack(image: Image.Image) -> Image.Image:
        for step in attacks:
            image = step(image)
        return image

    return attack


ATTACKS: dict[str, Attack] = {
    "none": lambda image: image,
    "jpeg 90": jpeg(90),
    "jpeg 80": jpeg(80),
    "jpeg 50": jpeg(50),
    "resize 75%": resize(0.75),
    "resize 50%": resize(0.5),
    "crop 5% (centre)": crop_centre(0.05),
    "crop 10% (centre)": crop_centre(0.10),
    "brightness +20": brighter(20),
}
"""The attacks the brief names."""

LIMITS: dict[str, Attack] = {
    "crop 10% (corner)": crop_corner(0.10),
    "crop 25% (corner)": crop_corner(0.25),
    "crop 50% (centre)": crop_centre(0.50),
    "jpeg 30": jpeg(30),
    "resize 90%": resize(0.9),
    "resize 60%": resize(0.6),
    "resize 50% + jpeg 80": chain(resize(0.5), jpeg(80)),
    "rotate 1°": rotate(1.0),
    "rotate 5°": rotate(5.0),
    "mirror": lambda image: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
}
"""Further copies, to show where the method stops."""


def smooth_scene(size: int, seed: int) -> Image.Image:
    """A generated picture with a sky-like gradient, soft shapes and low-frequency texture."""
    rng = np.random.default_rng(seed)
    grid_y, grid_x = np.mgrid[0:size, 0:size] / size
    colours = rng.uniform(30, 225, size=(3, 3))
    base = colours[0] + np.outer(grid_y.ravel(), colours[1] - colours[0]).reshape(size, size, 3)
    base += 0.3 * np.outer(grid_x.ravel(), colours[2] - colours[0]).reshape(size, size, 3)
    noise = Image.fromarray(rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8))
    texture = np.asarray(noise.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    picture = Image.fromarray(np.clip(base + 0.35 * (texture - 128), 0, 255).astype(np.uint8))
    shapes = ImageDraw.Draw(picture)
    for _ in range(6):
        x, y = rng.uniform(0, size, 2)
        radius = rng.uniform(size / 16, size / 4)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        shapes.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    return picture.filter(ImageFilter.GaussianBlur(size / 200))


def photographs(size: int, names: tuple[str, ...]) -> dict[str, Image.Image]:
    """The bundled photographs, centre-cropped to squares and resized to size (empty if absent)."""
    try:
        from skimage import data  # pylint: disable=import-outside-toplevel
    except ImportError:
        print("scikit-image is not installed: photographs skipped (pip install scikit-image)")
        return {}
    found = {}
    for name in names:
        pixels = getattr(data, name)()
        side = min(pixels.shape[:2])
        top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
        square = Image.fromarray(pixels[top : top + side, left : left + side])
        found[name] = square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return found


class OurMethod:
    """The invisible mark: a 40-bit id; a reading is an id or None."""

    name = METHOD

    def __init__(self) -> None:
        self._mark = InvisibleMark()

    def embed(self, image: Image.Image, value: int) -> Image.Image:
        """The image marked with value."""
        return self._mark.embed(image, value)

    def decode(self, image: Image.Image, original_size: tuple[int, int]) -> int | None:
        """The id read, or None; the decoder searches the scale itself."""
        del original_size
        return self._mark.decode(image).generation_id

    def expected(self, value: int) -> int:
        """What a correct read returns for this value."""
        return value


class Imwatermark:
    """imwatermark's dwtDctSvd with a 32-bit value; always returns 32 bits."""

    name = "imwatermark dwtDctSvd (32 bits)"

    def __init__(self) -> None:
        # pylint: disable-next=import-outside-toplevel
        from imwatermark import WatermarkDecoder, WatermarkEncoder

        self._encoder_type = WatermarkEncoder
        self._decoder = WatermarkDecoder("bits", 32)

    def embed(self, image: Image.Image, value: int) -> Image.Image:
        """The image marked with the value's low 32 bits."""
        encoder = self._encoder_type()
        encoder.set_watermark("bits", [int(b) for b in f"{self.expected(value):032b}"])
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        marked = encoder.encode(bgr, "dwtDctSvd")
        return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))

    def decode(self, image: Image.Image, original_size: tuple[int, int]) -> int | None:
        """The 32 bits read, after resizing a resized copy back to the original size."""
        if image.size != original_size and abs(image.width / original_size[0] - 1) > 0.2:
            image = image.resize(original_size, Image.Resampling.BICUBIC)
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        bits = self._decoder.decode(bgr, "dwtDctSvd")
        return int("".join("1" if b else "0" for b in bits), 2)

    def expected(self, value: int) -> int:
        """What a correct read returns for this value: its low 32 bits."""
        return value & 0xFFFFFFFF


def psnr(original: Image.Image, marked: Image.Image) -> float:
    """Peak signal-to-noise ratio of the marked image against the original, in dB."""
    error = np.asarray(original, dtype=np.float64) - np.asarray(marked, dtype=np.float64)
    return float(10 * np.log10(255.0**2 / max(np.mean(error**2), 1e-12)))


def methods() -> list[Any]:
    """Our method, and imwatermark where it imports."""
    found: list[Any] = [OurMethod()]
    try:
        found.append(Imwatermark())
    except ImportError as error:
        print(f"imwatermark cannot be imported ({error}): its column is skipped")
    return found


def robustness(
    images: dict[str, Image.Image], contenders: list[Any], seed: int
) -> dict[str, dict[str, Any]]:
    """Per method: PSNR, timings, and per attack the exact/wrong/none counts."""
    rng = np.random.default_rng(seed)
    report: dict[str, dict[str, Any]] = {
        m.name: {"psnr": [], "embed_ms": {}, "decode_ms": {}, "attacks": {}} for m in contenders
    }
    for label, image in images.items():
        value = int(rng.integers(0, 2**40))
        for method in contenders:
            attack_copies(method, label, image, value, report[method.name])
    return report


def attack_copies(method: Any, label: str, image: Image.Image, value: int, entry: dict) -> None:
    """Mark the image, decode every attacked copy, and count the outcomes into entry."""
    started = time.perf_counter()
    marked = method.embed(image, value)
    size = str(image.width)
    entry["embed_ms"].setdefault(size, []).append(1000 * (time.perf_counter() - started))
    entry["psnr"].append(psnr(image, marked))
    for attack_name, attack in {**ATTACKS, **LIMITS}.items():
        copy = attack(marked)
        started = time.perf_counter()
        read = method.decode(copy, image.size)
        if attack_name == "none":
            entry["decode_ms"].setdefault(size, []).append(1000 * (time.perf_counter() - started))
        counts = entry["attacks"].setdefault(
            attack_name, {"exact": 0, "wrong": 0, "none": 0, "failed_on": []}
        )
        outcome = "none" if read is None else "exact" if read == method.expected(value) else "wrong"
        counts[outcome] += 1
        if outcome != "exact":
            counts["failed_on"].append(label)


def unmarked_images(count: int, seed: int) -> list[Image.Image]:
    """Unmarked images of several kinds: noise, flat colours, smooth scenes, attacked photos."""
    rng = np.random.default_rng(seed)
    photos = list(photographs(512, SAMPLES).values())
    kinds = ["noise", "flat", "scene", "photo"] if photos else ["noise", "flat", "scene"]
    images = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        size = int(rng.choice([256, 384, 512, 640]))
        if kind == "noise":
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            images.append(Image.fromarray(pixels))
        elif kind == "flat":
            images.append(
                Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
            )
        elif kind == "scene":
            images.append(smooth_scene(size, seed=10_000 + index))
        else:
            attack = list(ATTACKS.values())[index % len(ATTACKS)]
            images.append(attack(photos[index % len(photos)]))
    return images


def false_positives(count: int, seed: int) -> dict[str, Any]:
    """How many unmarked images our decoder reads an id from (should be none of them)."""
    mark = InvisibleMark()
    found, best_z, started = [], [], time.perf_counter()
    for index, image in enumerate(unmarked_images(count, seed)):
        reading = mark.decode(image)
        best_z.append(float(reading.detail.get("best_sync_z", reading.detail.get("sync_z", 0.0))))
        if reading.generation_id is not None:
            found.append({"index": index, "id": reading.generation_id})
    return {
        "images": count,
        "ids_read": len(found),
        "reads": found,
        "max_sync_z": max(best_z),
        "decode_ms_mean": 1000 * (time.perf_counter() - started) / count,
    }


def full_search_ms() -> dict[str, float]:
    """The worst-case decode time: an unmarked image, where every scale and offset is searched."""
    mark = InvisibleMark()
    times = {}
    for size in (512, 1024):
        image = smooth_scene(size, seed=99)
        started = time.perf_counter()
        mark.decode(image)
        times[str(size)] = 1000 * (time.perf_counter() - started)
    return times


def table(report: dict[str, dict[str, Any]], images: int) -> str:
    """The Markdown table: exact / wrong / none per attack and method, then PSNR and timings."""
    names = list(report)
    lines = [
        "| copy | " + " | ".join(f"{n}: exact / wrong / none" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for attack_name in {**ATTACKS, **LIMITS}:
        cells = []
        for name in names:
            counts = report[name]["attacks"][attack_name]
            cells.append(f"{counts['exact']}/{images} / {counts['wrong']} / {counts['none']}")
        lines.append(f"| {attack_name} | " + " | ".join(cells) + " |")
    lines.append(
        "| PSNR dB (min / median) | "
        + " | ".join(
            f"{min(report[n]['psnr']):.1f} / {statistics.median(report[n]['psnr']):.1f}"
            for n in names
        )
        + " |"
    )
    for kind in ("embed_ms", "decode_ms"):
        for size in sorted(report[names[0]][kind], key=int):
            lines.append(
                f"| {kind.replace('_ms', '')} ms, {size} px (median) | "
                + " | ".join(f"{statistics.median(report[n][kind][size]):.0f}" for n in names)
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two photos and one scene, N=40")
    parser.add_argument("--unmarked", type=int, default=None, help="images for the FP count")
    args = parser.parse_args()
    samples = SAMPLES[:2] if args.quick else SAMPLES
    scenes = 1 if args.quick else 3
    unmarked = args.unmarked or (40 if args.quick else 200)
    started = time.perf_counter()
    images: dict[str, Image.Image] = {}
    for size in (512, 1024):
        images |= {f"{k} {size}": v for k, v in photographs(size, samples).items()}
        images |= {f"scene {s} {size}": smooth_scene(size, seed=s) for s in range(scenes)}
    contenders = methods()
    report = robustness(images, contenders, seed=7)
    fp = false_positives(unmarked, seed=11)
    search_ms = full_search_ms()
    text = table(report, images=len(images))
    print(f"\n{len(images)} images ({', '.join(images)})\n")
    print(text)
    print(
        f"\nFalse positives: {fp['ids_read']} ids read from {fp['images']} unmarked images "
        f"(max sync z {fp['max_sync_z']:.2f}); full-search decode of an unmarked image: "
        + ", ".join(f"{ms:.0f} ms at {size} px" for size, ms in search_ms.items())
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python -m bench.provenance_robustness"
                + (" --quick" if args.quick else ""),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "machine": {"platform": platform.platform(), "python": platform.python_version()},
                "versions": {
                    pkg: importlib.metadata.version(pkg) for pkg in ("numpy", "pillow", "reedsolo")
                },
                "method": METHOD,
                "images": list(images),
                "attacks": {"brief": list(ATTACKS), "limits": list(LIMITS)},
                "results": report,
                "false_positives": fp,
                "unmarked_full_search_decode_ms": search_ms,
                "table": text,
                "seconds": time.perf_counter() - started,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"\nwrote {RESULTS} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
