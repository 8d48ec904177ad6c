"""GPU utilization and memory through NVML (nvidia-ml-py), read at metrics-scrape time.

NVML is initialised lazily, on the first ``available`` or ``sample()``, never at import or
construction. Without the library, a driver or a device the monitor is unavailable and
``sample()`` returns an empty list: the metrics adapter then exports nothing for the GPU rather
than zeros that would read as an idle card. ``CUDA_VISIBLE_DEVICES`` is honoured the way CUDA
reads it (indices or ``GPU-`` UUIDs, up to the first entry it cannot use), so a worker pinned to
one card of a multi-GPU host reports that card only.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    """One device at one instant; ``index`` is NVML's (and nvidia-smi's) number for it.

    ``utilization_percent`` is the share of the last sample period in which a kernel ran
    (0-100), None where the device does not report it (a MIG instance, for one).
    """

    index: int
    name: str
    utilization_percent: float | None
    memory_used_bytes: int
    memory_total_bytes: int


class GpuMonitor:
    """Samples the visible GPUs through NVML; thread-safe, cheap enough for every scrape.

    ``nvml`` is the NVML binding module (``pynvml`` from nvidia-ml-py when None; tests pass a
    fake). ``visible_devices`` defaults to ``CUDA_VISIBLE_DEVICES``; None or unset means all.
    """

    def __init__(
        self, *, nvml: ModuleType | Any | None = None, visible_devices: str | None = None
    ) -> None:
        self._nvml = nvml
        self._visible = (
            visible_devices
            if visible_devices is not None
            else os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        self._lock = threading.Lock()
        self._state = "new"  # new -> ready | unavailable -> closed
        self._handles: list[tuple[int, Any]] = []
        self._failing = False

    @property
    def available(self) -> bool:
        """Whether NVML is up and at least one visible device can be sampled."""
        with self._lock:
            self._ensure_started()
            return self._state == "ready"

    def sample(self) -> list[GpuSample]:
        """One sample per visible device, in ``CUDA_VISIBLE_DEVICES`` order; [] if none can be read.

        An NVML error mid-sample (a lost GPU, a driver reload) gives [] for that scrape and is
        logged once until a sample succeeds again; it is never raised to the caller.
        """
        with self._lock:
            self._ensure_started()
            if self._state != "ready":
                return []
            nvml = self._nvml
            try:
                samples = [self._read(nvml, index, handle) for index, handle in self._handles]
            except nvml.NVMLError as exc:
                if not self._failing:
                    log.warning("GPU sample failed (NVML: %s); reporting no GPU metrics", exc)
                    self._failing = True
                return []
            if self._failing:
                log.info("GPU samples are readable again")
                self._failing = False
            return samples

    def close(self) -> None:
        """Shut NVML down (once); later samples are empty."""
        with self._lock:
            if self._state == "ready":
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError as exc:
                    log.warning("NVML shutdown failed: %s", exc)
            self._state = "closed"
            self._handles = []

    def __enter__(self) -> GpuMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _ensure_started(self) -> None:
        """Initialise NVML and resolve the visible devices on first use (lock held)."""
        if self._state != "new":
            return
        self._state = "unavailable"
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError:
                log.info("GPU metrics off: nvidia-ml-py (pynvml) is not installed")
                return
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            log.info("GPU metrics off: NVML cannot start (%s)", exc)
            return
        try:
            handles = self._visible_handles(nvml)
        except nvml.NVMLError as exc:
            log.warning("GPU metrics off: NVML cannot list the devices (%s)", exc)
            handles = []
        if not handles:
            log.info("GPU metrics off: no visible GPU")
            self._shutdown_quietly(nvml)
            return
        self._handles = handles
        self._state = "ready"
        log.info("GPU metrics on for NVML device(s) %s", [index for index, _ in handles])

    def _visible_handles(self, nvml: Any) -> list[tuple[int, Any]]:
        """(NVML index, handle) of each device CUDA would show this process."""
        count = nvml.nvmlDeviceGetCount()
        if self._visible is None:
            return [(index, nvml.nvmlDeviceGetHandleByIndex(index)) for index in range(count)]
        handles: list[tuple[int, Any]] = []
        for entry in (part.strip() for part in self._visible.split(",")):
            handle = self._handle_for(nvml, entry, count)
            if handle is None:
                # CUDA ignores the entry it cannot use and every one after it.
                break
            if all(index != handle[0] for index, _ in handles):
                handles.append(handle)
        return handles

    @staticmethod
    def _handle_for(nvml: Any, entry: str, count: int) -> tuple[int, Any] | None:
        if entry.isdigit():
            index = int(entry)
            if index >= count:
                log.warning("CUDA_VISIBLE_DEVICES names device %d; NVML sees %d", index, count)
                return None
            return index, nvml.nvmlDeviceGetHandleByIndex(index)
        if entry.startswith("GPU-"):
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(entry)
            except nvml.NVMLError as exc:
                log.warning(
                    "CUDA_VISIBLE_DEVICES names %s, which NVML cannot find (%s)", entry, exc
                )
                return None
            return nvml.nvmlDeviceGetIndex(handle), handle
        if entry:
            log.warning(
                "CUDA_VISIBLE_DEVICES entry %r is not an index or a GPU UUID (MIG instances are not"
                " sampled); GPU metrics cover the entries before it",
                entry,
            )
        return None

    @staticmethod
    def _read(nvml: Any, index: int, handle: Any) -> GpuSample:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            utilization: float | None = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError_NotSupported:
            utilization = None
        name = nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return GpuSample(
            index=index,
            name=name,
            utilization_percent=utilization,
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
        )

    @staticmethod
    def _shutdown_quietly(nvml: Any) -> None:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
