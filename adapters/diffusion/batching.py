"""Batch planning: which samples share one pipeline call, and each sample's progress callback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from domain.request import BatchKey, GenerationRequest, batch_key
from ports.image_model import BatchItem, StepCallback
from ports.storage import LoraArtifact

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 4
"""The most samples one pipeline call runs together (MAX_BATCH_SIZE)."""


class SampleProgress:
    """One sample's step callback: monotonic across OOM retries, and never fatal to the batch."""

    def __init__(self, on_step: StepCallback, generation_id: int) -> None:
        self._on_step = on_step
        self._generation_id = generation_id
        self._reported = 0
        self._failed = False

    def __call__(self, step: int, total: int) -> None:
        if step <= self._reported:  # a retry after an OOM replays steps already reported
            return
        self._reported = step
        try:
            self._on_step(step, total)
        except Exception:  # pylint: disable=broad-exception-caught
            if not self._failed:  # progress never fails an image, nor the others of its batch
                self._failed = True
                log.exception("progress callback of generation %s failed", self._generation_id)


@dataclass(frozen=True)
class Sample:
    """One sample of a batch as the model runs it: its request, its LoRA and its progress."""

    request: GenerationRequest
    lora: LoraArtifact | None
    progress: SampleProgress


@dataclass
class _Plan:
    """Samples planned into one pipeline call."""

    key: BatchKey
    indices: list[int] = field(default_factory=list)
    loras: dict[str, float] = field(default_factory=dict)  # checksum -> scale
    has_base: bool = False


def plan_batches(
    items: Sequence[BatchItem], *, max_size: int, max_loras: int, mixed: bool
) -> list[list[int]]:
    """Group the indices of ``items`` (the samples) into pipeline calls, first fit, keeping each
    call's samples in order.

    A call holds at most ``max_size`` samples sharing one ``batch_key``. With ``mixed`` it holds
    up to ``max_loras`` distinct LoRAs and base-model samples together, a LoRA at one scale only
    (a pipeline LoRA has one scale); without, one LoRA at one scale, or only base-model samples.
    """
    plans: list[_Plan] = []
    for index, item in enumerate(items):
        key = batch_key(item.request)
        lora = item.lora
        scale = item.request.lora_scale
        for plan in plans:
            if plan.key != key or len(plan.indices) >= max_size:
                continue
            if lora is None:
                fits = mixed or not plan.loras
            elif lora.checksum in plan.loras:
                fits = plan.loras[lora.checksum] == scale
            elif mixed:
                fits = len(plan.loras) < max_loras
            else:
                fits = not plan.loras and not plan.has_base
            if fits:
                break
        else:
            plan = _Plan(key=key)
            plans.append(plan)
        plan.indices.append(index)
        if lora is None:
            plan.has_base = True
        else:
            plan.loras[lora.checksum] = scale
    return [plan.indices for plan in plans]
