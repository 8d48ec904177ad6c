"""What a failed LoRA load becomes: LORA_INVALID, STORAGE_ERROR or GPU_OOM.

STORAGE_ERROR when its file left the disk cache; what the load left in the pipeline is undone
first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.diffusion.cuda_memory import forget_frames, is_cuda_oom, release_memory
from domain.errors import GenerationError, GpuOutOfMemory, LoraInvalid, StorageError
from ports.storage import LoraArtifact

log = logging.getLogger(__name__)


@contextmanager
def reading(lora: LoraArtifact) -> Iterator[None]:
    """Turn a failure to read or load ``lora`` into the error its job reports.

    STORAGE_ERROR (retryable) when the LoRA is no longer on disk: its path is gone, or a
    ``FileNotFoundError`` caused the failure. The LoRA disk cache (shared by the worker
    processes of a host) may evict it between the job's fetch and this load, and a retry
    fetches it again. Any other failure is LORA_INVALID; a ``GenerationError`` stays as it is
    and a CUDA out-of-memory error passes through for the caller.
    """
    try:
        yield
    except LoraInvalid as exc:
        if left_the_disk(lora, exc):
            raise _left_the_cache(lora) from exc
        raise
    except GenerationError:
        raise
    except Exception as exc:  # pylint: disable=broad-exception-caught
        if is_cuda_oom(exc):
            raise
        if left_the_disk(lora, exc):
            raise _left_the_cache(lora) from exc
        raise LoraInvalid(f"LoRA {lora.ref!r} cannot be loaded: {exc}") from exc


def left_the_disk(lora: LoraArtifact, exc: BaseException) -> bool:
    """Whether the failure ``exc`` came from ``lora``'s file or folder no longer being on disk."""
    if not Path(lora.path).exists():
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, FileNotFoundError):
            return True
        seen.add(id(current))
        if current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__
    return False


def _left_the_cache(lora: LoraArtifact) -> StorageError:
    return StorageError(
        f"LoRA {lora.ref!r} left the local cache before the model loaded it"
        f" ({lora.path} is gone); it is fetched again on retry"
    )


@contextmanager
def loading(lora: LoraArtifact, *, undo: Callable[[], None]) -> Iterator[None]:
    """Map a failed load as ``reading`` does, or to GPU_OOM, after ``undo`` removed what it left.

    On an OOM the failed call's frames are dropped and the memory released, outside the
    ``except`` block (so that no traceback keeps its tensors alive), before ``undo`` runs. An
    ``undo`` that fails then still ends in GPU_OOM, never in a raw CUDA error: a hot-swap slot
    it could not restore is rebuilt by the next job; a resident LoRA it could not delete stays
    loaded but inactive, outside the count of resident LoRAs.
    """
    failure: str | None = None
    try:
        with reading(lora):
            yield
    except GenerationError:
        undo()
        raise
    except Exception as exc:  # pylint: disable=broad-exception-caught
        # ``reading`` lets only CUDA out-of-memory errors through.
        forget_frames(exc)
        failure = str(exc)
    if failure is None:
        return
    release_memory()
    undone = _undo_after_oom(undo)
    if not undone:
        release_memory()
    raise GpuOutOfMemory(f"GPU out of memory loading LoRA {lora.ref!r}: {failure}")


def _undo_after_oom(undo: Callable[[], None]) -> bool:
    """Run ``undo`` after a load ran out of memory; False if it failed too (logged)."""
    try:
        undo()
    except Exception as exc:  # pylint: disable=broad-exception-caught
        forget_frames(exc)
        if is_cuda_oom(exc):
            log.warning("out of memory again while undoing a failed LoRA load: %s", exc)
        else:
            log.error("undoing a LoRA load that ran out of memory failed: %r", exc)
        return False
    return True
