"""``python -m app``: ``demo``, ``generate``, ``worker``, ``submit``, ``health``, ``inspect`` and
``parked``.

``health`` runs as the container's HEALTHCHECK every few seconds, so this module imports only
what every command needs; the model-side modules (the container, torch through the adapters)
are imported inside the commands that use them.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import ProxyHandler, build_opener, url2pathname

from app.argument_types import positive_int
from app.inspect_command import add_inspect
from app.logging_setup import LogFormat, configure_logging
from app.parked_command import add_parked
from app.settings import Settings, SettingsError, load_settings, secret_values
from domain.request import ASPECT_RATIOS, SIGNATURE_POSITIONS, SIGNATURE_SIZES

if TYPE_CHECKING:
    from containers import Container

EXIT_UNHEALTHY = 1
"""``health``'s status when not OK (Docker reads 1 as unhealthy; 2 is reserved there)."""
EXIT_BAD_SETTINGS = 2

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


def _run_one(container: Container, message: dict[str, Any]) -> Path | None:
    """Queue one message on the in-memory source, run it through the whole worker loop, and
    return the local path of its PNG (None when the job did not complete)."""
    source = container.task_source()
    source.put(message)
    container.job_runner().run(should_stop=lambda: False, stop_when_idle=True)
    completion = container.generation_job().stored(message["data"]["generation_id"])
    if completion is None or not completion.result_url.startswith("file:"):
        return None
    return Path(url2pathname(urlparse(completion.result_url).path))


def _embedded_container(settings: Settings, storage_root: Path) -> Container:
    from containers import build_container  # pylint: disable=import-outside-toplevel

    embedded = settings.model_copy(update={**EMBEDDED, "local_storage_dir": str(storage_root)})
    return build_container(embedded.container_config())


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """One sample job, as the backend would send it, through the embedded adapters."""
    from app import demo  # pylint: disable=import-outside-toplevel

    storage_root = Path(args.output_dir).resolve() / "storage"
    container = _embedded_container(settings, storage_root)
    model_id = demo.load_model_or_tiny(container, settings.model_id)
    try:
        signature = demo.write_sample_signature(storage_root / "signature-source.png")
        signature_ref = demo.copy_into(
            signature, storage_root, settings.aws_storage_bucket_name, "signatures/demo.png"
        )
        lora_ref = None
        if model_id != settings.model_id:
            # Only the tiny model has a matching LoRA here: the trainer's PEFT folder layout.
            from adapters.diffusion.tiny_model import (  # pylint: disable=import-outside-toplevel
                build_tiny_lora,
            )

            with tempfile.TemporaryDirectory() as scratch:
                lora = build_tiny_lora(model_id, Path(scratch) / "style", fmt="peft")
                lora_ref = demo.copy_into(
                    lora, storage_root, settings.aws_storage_bucket_name, "styles/1"
                )
        message = _message(
            {
                "generation_id": args.generation_id,
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
            demo.forget_generation(container, settings, storage_root, args.generation_id)
        path = _run_one(container, message)
    finally:
        container.shutdown_resources()
    if path is None:
        print("demo: the job did not complete (see above)", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    """One job from flags to a PNG."""
    from app import demo  # pylint: disable=import-outside-toplevel
    from domain.errors import GenerationError  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory(prefix="generate-") as scratch:
        storage_root = Path(scratch)
        container = _embedded_container(settings, storage_root)
        try:
            try:
                if args.tiny:
                    demo.use_tiny_model(container, report=lambda line: print(line, file=sys.stderr))
                else:
                    container.image_model.init()
            except GenerationError as exc:
                print(
                    f"generate: cannot load the model MODEL_ID={settings.model_id!r}:"
                    f" {demo.first_line(exc)}. Set MODEL_ID to a local Stable Diffusion 1.5"
                    " folder (or a hub id with network access), or add --tiny to run on the"
                    " tiny built-in model (random weights).",
                    file=sys.stderr,
                )
                return 1
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
                data["lora_path"] = demo.copy_into(
                    Path(args.lora),
                    storage_root,
                    settings.aws_storage_bucket_name,
                    "styles/" + Path(args.lora).name,
                )
            if args.signature:
                data["signature_path"] = demo.copy_into(
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
            path = _run_one(container, _message(data))
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


def submit_message(args: argparse.Namespace, generation_id: int) -> dict[str, Any]:
    """The queue message for ``submit``: the backend's code shape (``data.parameters`` too when
    steps, guidance or an explicit size are given, as the backend's docs show it)."""
    data: dict[str, Any] = {
        "generation_id": generation_id,
        "style_id": args.style_id,
        "prompt": args.prompt,
        "prompt_tags": args.tag or [],
        "aspect_ratio": args.aspect_ratio,
        "seed": args.seed,
        "signature_config": {
            "position": args.position,
            "size": args.size,
            "opacity": args.opacity,
        },
    }
    optional = {
        "lora_path": args.lora_path,
        "signature_path": args.signature_path,
        "negative_prompt": args.negative_prompt,
        "artist_name": args.artist_name,
    }
    data.update({key: value for key, value in optional.items() if value is not None})
    parameters = {
        key: value
        for key, value in (
            ("width", args.width),
            ("height", args.height),
            ("steps", args.steps),
            ("cfg_scale", args.cfg_scale),
        )
        if value is not None
    }
    if parameters:
        data["parameters"] = parameters
    return _message(data)


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    """Publish jobs exactly as the backend does; print each message (one JSON line each)."""
    import pika  # pylint: disable=import-outside-toplevel
    from pika.exceptions import AMQPError  # pylint: disable=import-outside-toplevel

    first_id = args.generation_id or random.randint(1_000_000, 2**31 - args.count)
    parameters = pika.ConnectionParameters(
        host=settings.rabbitmq_host,
        port=settings.rabbitmq_port,
        virtual_host=settings.rabbitmq_vhost,
        credentials=pika.PlainCredentials(
            settings.rabbitmq_user, settings.rabbitmq_pass.get_secret_value()
        ),
        connection_attempts=1,
        socket_timeout=args.timeout,
        blocked_connection_timeout=args.timeout,
    )
    where = f"{settings.rabbitmq_host}:{settings.rabbitmq_port}"
    try:
        connection = pika.BlockingConnection(parameters)
    except (AMQPError, OSError) as exc:
        print(f"submit: RabbitMQ at {where} is not reachable: {exc!r}", file=sys.stderr)
        return 1
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for offset in range(args.count):
            message = submit_message(args, first_id + offset)
            # As the backend's code does before every publish: durable, no arguments.
            channel.queue_declare(queue=settings.rabbitmq_queue, durable=True)
            channel.basic_publish(
                exchange="",
                routing_key=settings.rabbitmq_queue,
                body=json.dumps(message),
                properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                mandatory=True,
            )
            print(json.dumps(message), flush=True)
    except AMQPError as exc:
        print(f"submit: publishing to {settings.rabbitmq_queue!r} failed: {exc!r}", file=sys.stderr)
        return 1
    finally:
        if connection.is_open:
            connection.close()
    return 0


def probe(url: str, timeout: float) -> tuple[bool, str]:
    """GET ``url`` (no proxy); ``(status is 200, body)``; an unreachable URL gives a JSON error."""
    opener = build_opener(ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status == 200, response.read().decode("utf-8", "replace").strip()
    except HTTPError as exc:
        return False, exc.read().decode("utf-8", "replace").strip()
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, json.dumps({"error": f"{url} did not answer: {reason}"})


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """The container's HEALTHCHECK: /readyz (or /healthz with --live) of the local worker."""
    port = args.port if args.port is not None else settings.metrics_port
    host = args.host or settings.metrics_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    path = "/healthz" if args.live else "/readyz"
    ok, body = probe(f"http://{host}:{port}{path}", args.timeout)
    print(body)
    return 0 if ok else EXIT_UNHEALTHY


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
    generate.add_argument(
        "--tiny",
        action="store_true",
        help="run on the tiny built-in model (random weights) instead of MODEL_ID",
    )
    generate.set_defaults(handler=cmd_generate)

    worker = commands.add_parser("worker", help="consume jobs from RabbitMQ")
    worker.set_defaults(handler=cmd_worker, log_format="json")

    _add_submit(commands)
    _add_health(commands)
    add_inspect(commands)
    add_parked(commands)
    return parser


def _add_submit(commands: Any) -> None:
    submit = commands.add_parser(
        "submit", help="publish a job to RabbitMQ exactly as the backend does"
    )
    submit.add_argument("--prompt", default="watercolor, portrait, vintage")
    submit.add_argument("--tag", action="append", help="a prompt tag (repeatable)")
    submit.add_argument("--negative-prompt")
    submit.add_argument("--generation-id", type=int, help="default: a random id")
    submit.add_argument("--style-id", type=int, default=1)
    submit.add_argument("--lora-path", help="s3://bucket/key or a key in S3_MODELS_BUCKET")
    submit.add_argument("--signature-path", help="s3://bucket/key or a key in the media bucket")
    submit.add_argument("--artist-name", help="text signature when there is no image")
    submit.add_argument("--aspect-ratio", choices=sorted(ASPECT_RATIOS), default="1:1")
    submit.add_argument("--width", type=int)
    submit.add_argument("--height", type=int)
    submit.add_argument("--steps", type=int)
    submit.add_argument("--cfg-scale", type=float)
    submit.add_argument("--seed", type=int, help="default: none, the worker picks one")
    submit.add_argument("--position", choices=SIGNATURE_POSITIONS, default="bottom-right")
    submit.add_argument("--size", choices=sorted(SIGNATURE_SIZES), default="medium")
    submit.add_argument("--opacity", type=float, default=0.7)
    submit.add_argument(
        "--count", type=positive_int, default=1, help="publish this many jobs (consecutive ids)"
    )
    submit.add_argument("--timeout", type=float, default=10.0, help="broker timeout (seconds)")
    submit.set_defaults(handler=cmd_submit)


def _add_health(commands: Any) -> None:
    health = commands.add_parser(
        "health", help="exit 0 when the local worker is ready (the container's HEALTHCHECK)"
    )
    health.add_argument(
        "--live", action="store_true", help="ask /healthz (alive) instead of /readyz (ready)"
    )
    health.add_argument("--host", help="default: METRICS_HOST, or 127.0.0.1 when it is 0.0.0.0")
    health.add_argument("--port", type=int, help="default: METRICS_PORT")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds")
    health.set_defaults(handler=cmd_health, bad_settings_status=EXIT_UNHEALTHY)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, read settings (failing fast on a bad one), set up logging, run the command."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(args, "bad_settings_status", EXIT_BAD_SETTINGS))
    log_format: LogFormat = settings.log_format or getattr(args, "log_format", "text")
    configure_logging(settings.log_level, fmt=log_format, secrets=secret_values(settings))
    try:
        return int(args.handler(settings, args))
    except Exception as exc:  # pylint: disable=broad-exception-caught
        # Every entry point ends in one line naming the cause, never a traceback (the
        # traceback goes to the log at DEBUG).
        logging.getLogger(__name__).debug("%s failed", args.command, exc_info=True)
        detail = " ".join(str(getattr(exc, "message", exc)).split())[:300]
        print(f"{args.command}: {type(exc).__name__}: {detail}", file=sys.stderr)
        return 1
