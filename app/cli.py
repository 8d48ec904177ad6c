"""``python -m app``: ``demo``, ``generate`` and ``worker``."""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from app.demo import copy_into, load_model_or_tiny, write_sample_signature
from app.logging_setup import configure_logging
from app.settings import Settings, SettingsError, load_settings
from containers import Container, build_container
from domain.job import JobResult, Outcome
from domain.request import ASPECT_RATIOS, SIGNATURE_POSITIONS, SIGNATURE_SIZES

EMBEDDED = {
    "storage_backend": "local",
    "notifier_backend": "console",
    "task_source_backend": "memory",
}


def _message(data: dict[str, Any]) -> dict[str, Any]:
    """A queue message in the shape the backend's code publishes."""
    generation_id = data["generation_id"]
    return {
        "task_id": str(uuid.uuid4()),
        "type": "image_generation",
        "data": data,
        "webhook_url": f"https://api.example.com/api/webhooks/generation/{generation_id}/status",
    }


def _run_one(container: Container, message: dict[str, Any]) -> JobResult | None:
    """Queue one message on the in-memory source and run it through the whole use case."""
    source = container.task_source()
    source.put(message)
    runner = container.job_runner()
    delivery = source.receive(0)
    return runner.handle(delivery) if delivery else None


def _local_path(result: JobResult | None) -> Path | None:
    if result is None or result.outcome is not Outcome.COMPLETED or not result.result_url:
        return None
    return Path(url2pathname(urlparse(result.result_url).path))


def _embedded_container(settings: Settings, storage_root: Path) -> Container:
    embedded = settings.model_copy(update={**EMBEDDED, "local_storage_dir": str(storage_root)})
    return build_container(embedded)


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """One sample job, as the backend would send it, through the embedded adapters."""
    storage_root = Path(args.output_dir).resolve() / "storage"
    container = _embedded_container(settings, storage_root)
    model_id = load_model_or_tiny(container, settings.model_id)
    try:
        signature = write_sample_signature(storage_root / "signature-source.png")
        signature_ref = copy_into(
            signature, storage_root, settings.aws_storage_bucket_name, "signatures/demo.png"
        )
        lora_ref = None
        if model_id != settings.model_id:
            # Only the tiny model has a matching LoRA here: the trainer's PEFT folder layout.
            from adapters.tiny_model import (  # pylint: disable=import-outside-toplevel
                build_tiny_lora,
            )

            with tempfile.TemporaryDirectory() as scratch:
                lora = build_tiny_lora(model_id, Path(scratch) / "style", fmt="peft")
                lora_ref = copy_into(lora, storage_root, settings.s3_models_bucket, "styles/1")
        generation_id = args.generation_id
        message = _message(
            {
                "generation_id": generation_id,
                "style_id": 1,
                "lora_path": lora_ref,
                "prompt": "watercolor, portrait, vintage",
                "prompt_tags": ["watercolor", "portrait", "vintage"],
                "aspect_ratio": "1:1",
                "seed": args.seed,
                "signature_path": signature_ref,
                "signature_config": {"position": "bottom-right", "size": "medium", "opacity": 0.8},
            }
        )
        if args.fresh:
            key = container.generation_job().output_key(generation_id)
            container.storage().path_of(key, settings.output_bucket).unlink(missing_ok=True)
        path = _local_path(_run_one(container, message))
    finally:
        container.shutdown_resources()
    if path is None:
        print("demo: the job did not complete (see above)", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    """One job from flags to a PNG."""
    with tempfile.TemporaryDirectory(prefix="generate-") as scratch:
        storage_root = Path(scratch)
        container = _embedded_container(settings, storage_root)
        try:
            container.image_model.init()
            data: dict[str, Any] = {
                "generation_id": args.generation_id,
                "prompt": args.prompt,
                "prompt_tags": args.tag or [],
                "negative_prompt": args.negative_prompt,
                "seed": args.seed,
                "parameters": {"steps": args.steps, "cfg_scale": args.cfg_scale},
            }
            if args.aspect_ratio:
                data["aspect_ratio"] = args.aspect_ratio
            for name in ("width", "height"):
                if getattr(args, name) is not None:
                    data["parameters"][name] = getattr(args, name)
            if args.lora:
                data["lora_path"] = copy_into(
                    Path(args.lora), storage_root, settings.s3_models_bucket, Path(args.lora).name
                )
            if args.signature:
                data["signature_path"] = copy_into(
                    Path(args.signature),
                    storage_root,
                    settings.aws_storage_bucket_name,
                    "signature" + Path(args.signature).suffix,
                )
            data["artist_name"] = args.signature_text
            data["signature_config"] = {
                "position": args.position,
                "size": args.size,
                "opacity": args.opacity,
            }
            path = _local_path(_run_one(container, _message(data)))
            if path is None:
                return 1
            out = Path(args.out).resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(path.read_bytes())
        finally:
            container.shutdown_resources()
    print(out)
    return 0


def cmd_worker(settings: Settings, _args: argparse.Namespace) -> int:
    """Consume the queue with the configured adapters until SIGTERM/SIGINT."""
    # Imported here: the worker's runtime (signals, threads) is not needed by other commands.
    from app.worker import run_worker  # pylint: disable=import-outside-toplevel

    return run_worker(settings)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run one sample job with embedded adapters")
    demo.add_argument("--output-dir", default="output", help="where the demo storage lives")
    demo.add_argument("--generation-id", type=int, default=1)
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument(
        "--fresh",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="regenerate even if the output exists (--no-fresh shows idempotent redelivery)",
    )
    demo.set_defaults(handler=cmd_demo)

    generate = commands.add_parser("generate", help="one job from flags to a PNG")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--tag", action="append", help="a prompt tag (repeatable)")
    generate.add_argument("--negative-prompt")
    generate.add_argument("--aspect-ratio", choices=sorted(ASPECT_RATIOS))
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--steps", type=int)
    generate.add_argument("--cfg-scale", type=float)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--lora", help="a .safetensors LoRA file or a PEFT folder")
    generate.add_argument("--signature", help="a PNG signature image")
    generate.add_argument("--signature-text", help="text signature when no image is given")
    generate.add_argument("--position", choices=SIGNATURE_POSITIONS, default="bottom-right")
    generate.add_argument("--size", choices=sorted(SIGNATURE_SIZES), default="medium")
    generate.add_argument("--opacity", type=float, default=0.7)
    generate.add_argument("--generation-id", type=int, default=1)
    generate.add_argument("--out", default="output/generated.png")
    generate.set_defaults(handler=cmd_generate)

    worker = commands.add_parser("worker", help="consume jobs from RabbitMQ")
    worker.set_defaults(handler=cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, read settings (failing fast on a bad one), run the command."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return args.handler(settings, args)
