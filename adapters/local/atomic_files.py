"""Whole-file writes on a local disk that readers never see half done.

Both write the bytes to a temporary file in the target's folder, flush them to disk, then
publish the file in one step: ``os.link`` for an exclusive create (the link fails if the name
exists, so of two racing writers, in threads or processes, exactly one wins), ``os.replace``
for a plain write.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``path`` unless it exists; False (nothing written) when another writer was first."""
    temporary = _written_temporary(path, data)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)
    return True


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``path``, replacing any file there."""
    temporary = _written_temporary(path, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _written_temporary(path: Path, data: bytes) -> Path:
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary
