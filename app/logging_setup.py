"""Logging for the CLI: one format, LOG_LEVEL, and quiet third-party libraries."""

from __future__ import annotations

import logging
import os
import warnings


def configure_logging(level: str = "INFO") -> None:
    """Configure the root logger and silence the ML libraries' chatter below warnings."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for noisy in ("diffusers", "transformers", "huggingface_hub", "peft", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    warnings.filterwarnings("ignore", category=FutureWarning)
