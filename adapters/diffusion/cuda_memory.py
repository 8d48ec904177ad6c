"""CUDA memory helpers: which errors are out of memory, and giving a failed call's memory back.

A failed call's memory is given back by dropping the frames its traceback holds and emptying the
allocator's cache.
"""

from __future__ import annotations

import gc
import traceback

import torch

CUDA_OOM_MESSAGES = (
    "CUDA out of memory",  # the caching allocator, when not raised as OutOfMemoryError
    "CUDA error: out of memory",  # a cudaMalloc outside it (handles, workspaces, kernel launches)
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)


def is_cuda_oom(exc: BaseException) -> bool:
    """CUDA allocation failures, also those that do not arrive as ``OutOfMemoryError``.

    Allocations outside PyTorch's caching allocator (cuBLAS and cuDNN handles and workspaces)
    fail as a plain ``RuntimeError`` (``torch.AcceleratorError``) with one of
    ``CUDA_OOM_MESSAGES``; they are out-of-memory errors all the same, so the batch is split.
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(message in text for message in CUDA_OOM_MESSAGES)


def forget_frames(exc: BaseException) -> None:
    """Drop the locals of the frames ``exc`` passed through (latents, activations), so that the
    exception, or a log record holding it, keeps no tensor alive."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def release_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
