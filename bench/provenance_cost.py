"""What the provenance marks cost per image, step by step, measured side by side in one run.

For 512x512 and 1024x1024 generated-looking images (smooth scenes, not noise): milliseconds of the
plain PNG encoding the worker did before (the baseline), the metadata chunks, the invisible mark
and the C2PA signature (the development certificate), and the bytes each adds. Steps are
interleaved round by round, so drift of a shared machine hits each alike; medians are printed.
Writes bench/results/provenance_cost.json.

    make bench        # or: .venv/bin/python -m bench.provenance_cost --rounds 15
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from adapters.provenance.credentials import ContentCredentials, CredentialFacts
from adapters.provenance.invisible_mark import InvisibleMark
from adapters.provenance.marks import ProvenanceMarks
from adapters.provenance.png_metadata import (
    PARAMETERS_KEY,
    XMP_KEY,
    encode_png,
    parameters_text,
    xmp_packet,
)
from bench.provenance_robustness import smooth_scene
from ports.provenance import ProvenanceFacts

RESULTS = Path(__file__).parent / "results" / "provenance_cost.json"
SIZES = (512, 1024)


def facts(size: int) -> ProvenanceFacts:
    """A generation as the worker marks it."""
    return ProvenanceFacts(
        generation_id=123456,
        task_id="bench",
        style_id=42,
        artist="Bench Artist",
        prompt="a lighthouse at dusk, watercolor",
        negative_prompt="blurry",
        steps=30,
        guidance_scale=7.5,
        seed=7,
        width=size,
        height=size,
        scheduler="dpmsolver++",
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        lora_checksum="ab" * 32,
        lora_scale=1.0,
    )


def plain_png(image: Image.Image) -> bytes:
    """The PNG the worker stored before provenance: no chunks."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    """Milliseconds of one call, and its result."""
    began = time.perf_counter()
    result = action()
    return (time.perf_counter() - began) * 1000, result


def measure(  # pylint: disable=too-many-locals
    size: int, rounds: int, credentials: ContentCredentials
) -> dict[str, Any]:
    """Median milliseconds of each step at one size, and the bytes each adds."""
    mark = InvisibleMark()
    marks = ProvenanceMarks(include_prompt=False, invisible_mark=mark, credentials=credentials)
    the_facts = facts(size)
    software = marks.software
    text = {
        PARAMETERS_KEY: parameters_text(the_facts, software=software, include_prompt=False),
        XMP_KEY: xmp_packet(the_facts, software=software),
    }
    credential_facts = CredentialFacts(
        generation_id=the_facts.generation_id,
        style_id=the_facts.style_id,
        base_model=the_facts.model,
        lora_checksum=the_facts.lora_checksum,
        artist=the_facts.artist,
        worker_version="bench",
    )
    times: dict[str, list[float]] = {
        "plain_png": [],
        "metadata": [],
        "invisible_mark": [],
        "signing": [],
        "all_marks": [],
    }
    sizes: dict[str, int] = {}
    for round_index in range(rounds):
        image = smooth_scene(size, seed=round_index)
        elapsed, plain = timed(lambda image=image: plain_png(image))
        times["plain_png"].append(elapsed)
        elapsed, with_text = timed(lambda image=image: encode_png(image, text))
        times["metadata"].append(elapsed - times["plain_png"][-1])
        elapsed, _ = timed(lambda image=image: mark.embed(image, the_facts.generation_id))
        times["invisible_mark"].append(elapsed)
        elapsed, signed = timed(
            lambda png=with_text: credentials.sign_png(png, credential_facts)  # type: ignore[misc]
        )
        times["signing"].append(elapsed)
        elapsed, marked = timed(lambda image=image: marks.mark(image, the_facts))
        times["all_marks"].append(elapsed)
        sizes = {
            "plain_png": len(plain),
            "metadata": len(with_text) - len(plain),
            "signing": signed.bytes_added,
            "all_marks": len(marked.png) - len(plain),
        }
    return {
        "size": f"{size}x{size}",
        "milliseconds": {name: round(statistics.median(v), 2) for name, v in times.items()},
        "bytes": sizes,
    }


def main() -> None:
    """Measure both sizes and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    credentials = ContentCredentials.development()
    rows = [measure(size, args.rounds, credentials) for size in SIZES]
    results = {
        "rounds": args.rounds,
        "rows": rows,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        "| Image | plain PNG (before) | + metadata | + invisible mark | + C2PA signing |"
        " all marks, end to end | bytes added (metadata + C2PA) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ms, size = row["milliseconds"], row["bytes"]
        print(
            f"| {row['size']} | {ms['plain_png']} ms ({size['plain_png']:,} B) |"
            f" {ms['metadata']} ms | {ms['invisible_mark']} ms | {ms['signing']} ms |"
            f" {ms['all_marks']} ms | {size['all_marks']:,} B ({size['metadata']:,} +"
            f" {size['signing']:,}) |"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
