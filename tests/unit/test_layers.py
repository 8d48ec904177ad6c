"""The layers hold: the import-linter contracts of pyproject.toml ([tool.importlinter]) are kept.

Domain and ports import no adapter, entry point, composition root or infrastructure library
(torch, diffusers, pika, boto3, requests...), directly or through another module; adapters
import no entry point and no composition root.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_every_layer_contract_is_kept() -> None:
    out = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 4 kept, 0 broken." in out.stdout
