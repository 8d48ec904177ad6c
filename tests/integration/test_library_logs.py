"""diffusers', transformers' and huggingface_hub's own logging goes through the root logger.

Those libraries give their root logger a stderr handler of their own (and diffusers and
transformers turn propagation off) on first use, so their warnings would bypass the worker's
JSON formatter and secret redaction. ``route_library_logs`` undoes that, and the model's load
path calls it before the libraries log.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from adapters.diffusion.pipeline import LIBRARY_LOGGERS, route_library_logs

pytestmark = pytest.mark.model

REPOSITORY = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter, where the libraries set their logging up as in a starting worker:
# a root handler keeps every record, warnings are captured as the worker's logging setup does,
# and the libraries log once before the model is loaded (their handlers are in place then).
# Loading and running the model must then leave stderr empty: no plain log line, no tqdm bar.
WORKER = textwrap.dedent("""
    import json, logging, sys

    kept = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append([record.name, record.levelname, record.getMessage()])

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
    logging.captureWarnings(True)

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger("diffusers.probe").info("configured")
    transformers_logging.get_logger("transformers.probe").info("configured")

    from adapters.diffusion.model import DiffusersImageModel
    from domain.request import GenerationRequest

    model = DiffusersImageModel.load(model_id=sys.argv[1], device="cpu")
    request = GenerationRequest(
        generation_id=1, prompt="ink", width=256, height=256, steps=2, guidance_scale=7.5, seed=1
    )
    model.generate(request, None, lambda step, total: None)
    diffusers_logging.get_logger("diffusers.pipelines.probe").warning("diffusers after load")
    transformers_logging.get_logger("transformers.modeling_utils").warning("transformers after load")
    logging.getLogger("huggingface_hub.file_download").warning("hub after load")
    print(json.dumps(kept))
    """)


def test_loading_the_model_routes_every_library_line_through_the_root_logger(
    tiny_model_dir: Path,
) -> None:
    # As a fresh worker's: no CI flag nor verbosity another test's logging setup may have set.
    ignored = {"CI", "DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"}
    environment = {key: value for key, value in os.environ.items() if key not in ignored}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPOSITORY), os.getenv("PYTHONPATH")])
    )
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(tiny_model_dir)],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "a library wrote to stderr around the worker's logging"
    kept = set(map(tuple, json.loads(done.stdout)))
    assert {
        ("diffusers.pipelines.probe", "WARNING", "diffusers after load"),
        ("transformers.modeling_utils", "WARNING", "transformers after load"),
        ("huggingface_hub.file_download", "WARNING", "hub after load"),
    } <= kept


class Kept(logging.Handler):
    """Keeps the name and message of every record it handles."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.name, record.getMessage()))


def test_routing_is_idempotent_and_leaves_no_library_handler() -> None:
    diffusers_logging.get_logger("diffusers.probe")  # the libraries' first use: their handlers
    transformers_logging.get_logger("transformers.probe")
    route_library_logs()
    route_library_logs()
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        assert library.propagate, f"{name} does not propagate"
        # Their own handlers are plain StreamHandlers (pytest may attach subclasses of its own).
        # pylint: disable-next=unidiomatic-typecheck
        own = [h for h in library.handlers if type(h) is logging.StreamHandler]
        assert not own, f"{name} keeps its own handler {own}"
    assert not diffusers_logging.is_progress_bar_enabled()
    assert not transformers_logging.is_progress_bar_enabled()
    kept, root = Kept(), logging.getLogger()
    # Their levels are not the point (another test's logging setup may have raised them).
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    root.addHandler(kept)
    try:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("diffusers.models.probe").warning("routed from diffusers")
        logging.getLogger("transformers.tokenization_utils").warning("routed from transformers")
    finally:
        root.removeHandler(kept)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert kept.seen == [
        ("diffusers.models.probe", "routed from diffusers"),
        ("transformers.tokenization_utils", "routed from transformers"),
    ]
