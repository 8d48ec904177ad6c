"""An exclusive ``flock`` on a lock file that its holder may delete (the LoRA disk cache's lock).

How the processes sharing the LoRA disk cache's folder take turns (Linux, on a local file system).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType


class FileLock:
    """An exclusive ``flock`` on the file at ``path``, which its holder may delete (``unlink``).

    A process that was waiting on a deleted file finds, once it holds that file's lock, that the
    path names another file or none, and locks the file at the path instead. Locks conflict
    between processes and between two ``FileLock`` objects of one process alike.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._descriptor: int | None = None

    def acquire(self, *, blocking: bool = True) -> bool:
        """Take the lock, waiting for it unless not ``blocking``; whether it was taken."""
        operation = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        while True:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:  # the locks' folder was removed behind the cache
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(descriptor, operation)
            except BlockingIOError:
                os.close(descriptor)
                return False
            except BaseException:
                os.close(descriptor)
                raise
            if _names_file(self.path, descriptor):
                self._descriptor = descriptor
                return True
            os.close(descriptor)  # deleted by its holder meanwhile: lock the one there now

    def release(self) -> None:
        """Let go of the lock (nothing if not held)."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def unlink(self) -> None:
        """Delete the lock file; only while holding the lock."""
        if self._descriptor is None:
            raise RuntimeError(f"{self.path} is not locked by this object")
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        _kind: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.release()


def _names_file(path: Path, descriptor: int) -> bool:
    """Whether ``path`` still names the file open as ``descriptor``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
