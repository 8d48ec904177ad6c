"""GpuMonitor against a hand-written NVML binding, and against the real one on this CPU machine."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from adapters.nvml import GpuMonitor, GpuSample

GIB = 1024**3


class NVMLError(Exception):
    """Stands in for ``pynvml.NVMLError``."""


class NVMLError_NotSupported(NVMLError):  # pylint: disable=invalid-name
    """Stands in for ``pynvml.NVMLError_NotSupported``."""


@dataclass
class FakeDevice:
    name: str
    uuid: str
    utilization: int | None
    used: int
    total: int


@dataclass
class FakeNvml:
    """The slice of pynvml that GpuMonitor uses, over a list of fake devices; records calls."""

    # pylint: disable=invalid-name  # pynvml's own names

    devices: list[FakeDevice]
    init_error: bool = False
    failing: bool = False
    calls: list[str] = field(default_factory=list)
    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error:
            raise NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.devices):
            raise NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for index, device in enumerate(self.devices):
            if device.uuid == uuid:
                return index
        raise NVMLError("Not Found")

    def nvmlDeviceGetIndex(self, handle: int) -> int:
        return handle

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.devices[handle].name

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        self.calls.append(f"memory {handle}")
        if self.failing:
            raise NVMLError("GPU is lost")
        device = self.devices[handle]
        return SimpleNamespace(
            total=device.total, free=device.total - device.used, used=device.used
        )

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        utilization = self.devices[handle].utilization
        if utilization is None:
            raise NVMLError_NotSupported("Not Supported")
        return SimpleNamespace(gpu=utilization, memory=0)


def three_gpus() -> FakeNvml:
    return FakeNvml(
        devices=[
            FakeDevice("NVIDIA H100 80GB HBM3", "GPU-aaaa", 97, 30 * GIB, 80 * GIB),
            FakeDevice("NVIDIA GeForce RTX 4090", "GPU-bbbb", 12, 3 * GIB, 24 * GIB),
            FakeDevice("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "GPU-cccc", None, 1 * GIB, 5 * GIB),
        ]
    )


def test_samples_every_device_when_no_devices_are_pinned() -> None:
    nvml = three_gpus()
    monitor = GpuMonitor(nvml=nvml, visible_devices=None)

    assert not nvml.calls  # lazy: nothing happens before the first use
    assert monitor.available
    assert monitor.sample() == [
        GpuSample(0, "NVIDIA H100 80GB HBM3", 97.0, 30 * GIB, 80 * GIB),
        GpuSample(1, "NVIDIA GeForce RTX 4090", 12.0, 3 * GIB, 24 * GIB),
        GpuSample(2, "NVIDIA A100-SXM4-40GB MIG 1g.5gb", None, 1 * GIB, 5 * GIB),
    ]
    assert nvml.calls.count("init") == 1


def test_reports_only_the_devices_cuda_visible_devices_lists_in_its_order() -> None:
    monitor = GpuMonitor(nvml=three_gpus(), visible_devices="2,0")

    assert [(s.index, s.name) for s in monitor.sample()] == [
        (2, "NVIDIA A100-SXM4-40GB MIG 1g.5gb"),
        (0, "NVIDIA H100 80GB HBM3"),
    ]


def test_uuids_in_cuda_visible_devices_select_devices_too() -> None:
    monitor = GpuMonitor(nvml=three_gpus(), visible_devices="GPU-bbbb")

    assert [s.index for s in monitor.sample()] == [1]


@pytest.mark.parametrize(
    ("visible", "expected"),
    [("1,7,0", [1]), ("0,-1,2", [0]), ("1,GPU-zzzz,0", [1]), ("0,0,1", [0, 1])],
)
def test_stops_at_the_first_entry_cuda_cannot_use(visible: str, expected: list[int]) -> None:
    assert [s.index for s in GpuMonitor(nvml=three_gpus(), visible_devices=visible).sample()] == (
        expected
    )


def test_reads_cuda_visible_devices_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")

    assert [s.index for s in GpuMonitor(nvml=three_gpus()).sample()] == [1]


@pytest.mark.parametrize("visible", ["", "-1", "MIG-1234"])
def test_no_visible_device_means_unavailable_and_nvml_shut_down(visible: str) -> None:
    nvml = three_gpus()
    monitor = GpuMonitor(nvml=nvml, visible_devices=visible)

    assert not monitor.available
    assert monitor.sample() == []
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_that_cannot_start_means_unavailable() -> None:
    nvml = three_gpus()
    nvml.init_error = True
    monitor = GpuMonitor(nvml=nvml, visible_devices=None)

    assert monitor.sample() == []
    assert not monitor.available
    assert nvml.calls == ["init"]  # tried once, not on every scrape


def test_an_nvml_error_mid_sample_gives_no_samples_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = three_gpus()
    monitor = GpuMonitor(nvml=nvml, visible_devices="0,1")
    assert len(monitor.sample()) == 2

    nvml.failing = True
    with caplog.at_level(logging.INFO, logger="adapters.nvml"):
        assert monitor.sample() == []
        assert monitor.sample() == []
        failures = [r for r in caplog.records if "GPU sample failed" in r.getMessage()]
        assert len(failures) == 1
        assert failures[0].levelno == logging.WARNING

        nvml.failing = False
        assert [s.index for s in monitor.sample()] == [0, 1]
        assert any("readable again" in r.getMessage() for r in caplog.records)


def test_close_shuts_nvml_down_once_and_later_samples_are_empty() -> None:
    nvml = three_gpus()
    with GpuMonitor(nvml=nvml, visible_devices=None) as monitor:
        assert monitor.sample()
    monitor.close()

    assert monitor.sample() == []
    assert not monitor.available
    assert nvml.calls.count("shutdown") == 1


def test_close_before_first_use_never_starts_nvml() -> None:
    nvml = three_gpus()
    monitor = GpuMonitor(nvml=nvml, visible_devices=None)
    monitor.close()

    assert monitor.sample() == []
    assert not nvml.calls


def test_without_the_nvml_binding_the_monitor_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes ``import pynvml`` fail
    monitor = GpuMonitor(visible_devices=None)

    assert not monitor.available
    assert monitor.sample() == []


def test_real_nvml_on_a_machine_without_a_driver_is_unavailable() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVIDIA driver")
    monitor = GpuMonitor()

    assert not monitor.available
    assert monitor.sample() == []
