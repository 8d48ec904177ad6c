"""The image model as the container's resource: loaded, tuned, warmed up, closed on shutdown.

CUDA's environment is exported before torch initialises it.

torch is imported only inside ``init_image_model``: building the container imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from domain.request import ASPECT_RATIOS
from ports.image_model import ImageModel


def export_cuda_environment(cuda_visible_devices: str | None) -> None:
    """Export what CUDA reads once, when torch first initialises it (a value from .env must be
    in the environment before that moment to have any effect).

    Devices are numbered in PCI bus order, as nvidia-smi and NVML number them, unless the
    environment already says otherwise (CUDA's own default is fastest first): an index in
    CUDA_VISIBLE_DEVICES then names the same card for the model and for the GPU metrics.
    """
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices


def warm_up_shapes() -> list[tuple[int, int]]:
    """(width, height) of every aspect ratio of the contract, 1:1 (most jobs' size) first."""
    shapes = [ASPECT_RATIOS["1:1"]]
    return shapes + [size for size in ASPECT_RATIOS.values() if size not in shapes]


def init_image_model(
    *,
    cuda_visible_devices: str | None,
    tuning: dict[str, object],
    warmup: bool,
    **options: object,
) -> Iterator[ImageModel]:
    """Load the diffusers model, tuned and warmed up (a Resource: released on shutdown).

    ``options`` are ``DiffusersImageModel.load``'s keyword arguments; ``tuning`` the fields of
    ``GpuTuning``. The warm-up (compilation, cuDNN autotuning) runs on CUDA only.
    """
    export_cuda_environment(cuda_visible_devices)
    # Imported here so that building the container (and the unit tests) never imports torch.
    # pylint: disable=import-outside-toplevel
    from adapters.diffusion.model import DiffusersImageModel
    from adapters.diffusion.tuning import GpuTuning, warm_up

    model = DiffusersImageModel.load(tuning=GpuTuning(**tuning), **options)  # type: ignore[arg-type]
    try:
        if warmup and model.pipeline.device.type == "cuda":
            warm_up(model, shapes=warm_up_shapes(), steps=2)
        yield model
    finally:
        model.close()
