"""LoRA adapters kept loaded in a StableDiffusionPipeline between jobs: an LRU keyed by content.

Loading a LoRA costs a file read, a parse and new layers injected into the UNet; most jobs reuse
one of a few styles. So up to ``capacity`` adapters stay in the pipeline, keyed by the SHA-256 of
the LoRA's content (stable across re-downloads), and a job whose LoRA is loaded only switches: the
active adapter and its scale are set on each LoRA layer (what ``set_adapters`` does, without its
walk over every module). The least recently used adapter is evicted with ``delete_adapters``, which
removes it from every peft layer dict and from ``peft_config``: memory stays flat over any number
of swaps (the growth reported in diffusers#8532 and peft#1639 came from adapters that were never
deleted, or that a load moved back to the GPU).

A compiled UNet recompiles whenever layers are added or removed, so with ``hotswap`` the cache
keeps one fixed adapter slot instead, primed with zero weights before the first compilation
(``enable_lora_hotswap``), and copies each LoRA into it (``hotswap=True``). Parsed LoRAs then stay
in a host-memory LRU, so a warm switch reads and parses no file.

Pipeline methods run on the one thread that renders; ``stats`` may be read from any thread.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.utils.peft_utils import delete_adapter_layers
from peft import LoraConfig, set_peft_model_state_dict
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from adapters.lora_files import (
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    LoraLayout,
    LoraValidator,
    read_safetensors,
)
from domain.errors import GenerationError, GpuOutOfMemory, LoraInvalid, StorageError
from ports.storage import LoraArtifact

if TYPE_CHECKING:  # importing the pipeline logs: see ``diffusers_model.route_library_logs``
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 8
"""Adapters kept loaded (SD 1.5, rank 8 on the attention projections: ~3 MB each in fp16)."""
DEFAULT_HOTSWAP_MAX_RANK = 32
"""Rank the hot-swap slot is padded to: LoRAs up to it swap without recompiling. A higher rank
costs compute on every step (the slot always runs at this rank)."""
DEFAULT_HOTSWAP_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Layers the hot-swap slot covers: the attention projections the platform's trainer adapts."""

BASE_ADAPTER = "__base__"
"""peft's name for 'no adapter' in the ``adapter_names`` of a mixed batch."""
HOTSWAP_SLOT = "hotswap_slot"
ADAPTER_PREFIX = "lora_"

LoraCheck = Callable[[Path], LoraLayout]
"""Validates a LoRA file or PEFT folder before it is loaded (``LoraValidator.validate``)."""


@dataclass(frozen=True)
class AdapterCacheStats:
    """Counters since start. A hit reads no file; ``loaded`` is what the cache holds now.

    ``loaded`` counts adapters in the pipeline, or, in hot-swap mode, parsed LoRAs in host memory.
    """

    hits: int
    misses: int
    evictions: int
    loaded: int
    capacity: int


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA read into host memory in the form diffusers' loaders take (keys ``unet.``...)."""

    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None
    rank: int = 0
    """Its largest layer rank (from the validator's layout)."""

    @property
    def uniform(self) -> bool:
        """One rank and one alpha for every layer.

        peft's hot-swap copies weights but neither ``alpha_pattern`` nor ``rank_pattern``, so
        only such a LoRA may be swapped into the slot in place; another becomes the slot.
        """
        if self.network_alphas and len(set(self.network_alphas.values())) > 1:
            return False
        for key, value in (self.metadata or {}).items():
            if key.endswith(("alpha_pattern", "rank_pattern")) and value:
                return False
        ranks = {
            tensor.shape[0]
            for key, tensor in self.state_dict.items()
            if key.endswith(("lora_A.weight", "lora.down.weight", "lora_down.weight"))
        }
        return len(ranks) <= 1

    @property
    def has_text_encoder(self) -> bool:
        """Whether it adapts the text encoder too."""
        return any(key.startswith("text_encoder.") for key in self.state_dict)

    def metadata_for(self, component: str) -> dict[str, Any] | None:
        """The adapter metadata if it describes ``component``, else None.

        Diffusers would build an empty LoraConfig from metadata that only describes the other
        component; None makes it derive the config from the tensors instead.
        """
        prefix = component + "."
        if self.metadata is None or not any(key.startswith(prefix) for key in self.metadata):
            return None
        return self.metadata


def lora_layers(model: torch.nn.Module | None) -> list[BaseTunerLayer]:
    """The peft LoRA layers inside ``model`` (none for None)."""
    if model is None:
        return []
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def adapters_of(model: torch.nn.Module | None) -> list[str]:
    """Names of the adapters ``model`` holds (its ``peft_config``)."""
    return list(getattr(model, "peft_config", None) or {})


@contextmanager
def per_sample_adapters(
    routes: Sequence[tuple[torch.nn.Module, Sequence[str]]],
) -> Iterator[None]:
    """Send sample i of every LoRA layer call in a model through its own adapter, while inside.

    ``routes`` pairs a model with one adapter name per sample of the batches it sees
    (``BASE_ADAPTER`` for none). Hooks on every LoRA layer of the model do it; they are removed
    on exit, whatever happens.

    peft's own mixed-batch forward (``adapter_names``) indexes the batch with Python lists: on
    CUDA each such index is a host-to-device copy that waits for the GPU, three per adapter per
    layer per UNet call, which would stall a mixed batch at every LoRA layer. Here the sample
    indices of each adapter are put on the model's device once per call; a pre-hook has peft
    run the base layer only (every sample ``BASE_ADAPTER``), and a forward hook adds each
    adapter's delta to its samples with ``index_select``/``index_add_``, which never wait for the
    GPU. The arithmetic is peft's (``lora_B(lora_A(dropout(x))) * scaling`` added to the base
    output), so the images are the same. Layers of another kind (embeddings, LoRA variants) keep
    peft's own routing.
    """
    handles = []
    try:
        for model, names in routes:
            names = list(names)
            groups = _sample_groups(model, names)
            base_only = [BASE_ADAPTER] * len(names)
            for layer in lora_layers(model):
                assert isinstance(layer, torch.nn.Module)
                if _routable(layer, groups):
                    handles.append(
                        layer.register_forward_pre_hook(
                            _adapter_names_hook(base_only), with_kwargs=True
                        )
                    )
                    handles.append(
                        layer.register_forward_hook(_add_deltas_hook(groups), with_kwargs=True)
                    )
                else:
                    handles.append(
                        layer.register_forward_pre_hook(
                            _adapter_names_hook(names), with_kwargs=True
                        )
                    )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sample_groups(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Each adapter of ``names`` (but the base) and the indices of its samples, on the device."""
    device = next(model.parameters()).device
    return {
        adapter: torch.tensor(
            [i for i, name in enumerate(names) if name == adapter], dtype=torch.long, device=device
        )
        for adapter in dict.fromkeys(names)
        if adapter != BASE_ADAPTER
    }


def _routable(layer: BaseTunerLayer, groups: Mapping[str, torch.Tensor]) -> bool:
    """Whether the hooks can route ``layer``: a plain LoRA Linear or Conv2d for every adapter."""
    if not isinstance(layer, (LoraLinear, LoraConv2d)):
        return False
    variants = getattr(layer, "lora_variant", {})
    return not any(adapter in variants for adapter in groups)


def _adapter_names_hook(
    names: list[str],
) -> Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], tuple[Any, dict[str, Any]]]:
    def inject(
        _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        batch = args[0].shape[0] if args else None
        if batch != len(names):
            raise RuntimeError(
                f"per-sample adapters: a LoRA layer saw a batch of {batch} for {len(names)} names"
            )
        return args, {**kwargs, "adapter_names": names}

    return inject


def _add_deltas_hook(
    groups: Mapping[str, torch.Tensor],
) -> Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any], torch.Tensor], torch.Tensor]:
    def add_deltas(
        module: torch.nn.Module,
        args: tuple[Any, ...],
        _kwargs: dict[str, Any],
        output: torch.Tensor,
    ) -> torch.Tensor:
        if module.disable_adapters:  # peft's forward adds no LoRA then either
            return output
        x = args[0]
        for adapter, index in groups.items():
            lora_a = module.lora_A[adapter] if adapter in module.lora_A else None
            if lora_a is None:  # this layer is not one the adapter adapts
                continue
            sub_batch = x.index_select(0, index).to(lora_a.weight.dtype)
            delta = (
                module.lora_B[adapter](lora_a(module.lora_dropout[adapter](sub_batch)))
                * module.scaling[adapter]
            )
            output.index_add_(0, index, delta.to(output.dtype))
        return output

    return add_deltas


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
    it could not restore is rebuilt by the next job; an adapter it could not delete stays
    loaded but inactive, outside the cache's count.
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


def release_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LoraAdapterCache:
    """Up to ``capacity`` LoRAs loaded in ``pipeline``, least recently used evicted first."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        *,
        capacity: int = DEFAULT_CAPACITY,
        validator: LoraCheck | None = None,
        hotswap: bool = False,
        hotswap_max_rank: int = DEFAULT_HOTSWAP_MAX_RANK,
        hotswap_targets: Sequence[str] = DEFAULT_HOTSWAP_TARGETS,
    ) -> None:
        if capacity < 1:
            raise ValueError(
                f"the LoRA adapter cache needs a capacity of at least 1; got {capacity}"
            )
        if hotswap_max_rank < 1:
            raise ValueError(f"hotswap_max_rank must be at least 1; got {hotswap_max_rank}")
        self._pipe = pipeline
        self._capacity = capacity
        self._validate: LoraCheck = (
            validator
            or LoraValidator(unet=pipeline.unet, text_encoder=pipeline.text_encoder).validate
        )
        self._hotswap = hotswap
        self._stats_lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0
        # Normal mode: checksum -> adapter name, least recently used first.
        self._names: OrderedDict[str, str] = OrderedDict()
        self._created = 0
        # Normal mode, what is active: adapter name -> scale ({} = LoRA off, None = unknown), and
        # the LoRA layers of the UNet and text encoder (None = to be listed again).
        self._active: dict[str, float] | None = None
        self._layers: list[BaseTunerLayer] | None = None
        # Hot-swap mode: checksum -> parsed LoRA in host memory, and the slot's state.
        self._parsed: OrderedDict[str, ParsedLora] = OrderedDict()
        self._in_slot: str | None = None
        self._slot_rank = hotswap_max_rank
        self._slot_paths: set[str] = set()
        self._slot_shapes: dict[str, torch.Size] = {}
        self._unit_scaling: list[tuple[BaseTunerLayer, float]] = []
        self._slot_scale: float | None = None
        if hotswap:
            suffixes = tuple("." + target for target in hotswap_targets)
            self._slot_paths = {
                path
                for path, module in self._unet_layers().items()
                if path.endswith(suffixes)
                and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            }
            if not self._slot_paths:
                raise ValueError(f"no UNet layer matches the hot-swap targets {hotswap_targets}")
            self._prime_slot()

    @property
    def capacity(self) -> int:
        """The most adapters (hot-swap: parsed LoRAs) held at once."""
        return self._capacity

    @property
    def hotswap(self) -> bool:
        """Whether LoRAs are copied into one fixed slot (for a compiled UNet)."""
        return self._hotswap

    @property
    def max_active(self) -> int:
        """The most distinct LoRAs that can be active in one batch."""
        return 1 if self._hotswap else self._capacity

    @property
    def adapter_names(self) -> list[str]:
        """Adapter names in the pipeline now, least recently used first (hot-swap: the slot)."""
        if self._hotswap:
            return [HOTSWAP_SLOT]
        return list(self._names.values())

    @property
    def stats(self) -> AdapterCacheStats:
        """A consistent snapshot of the counters; safe from any thread."""
        with self._stats_lock:
            loaded = len(self._parsed) if self._hotswap else len(self._names)
            return AdapterCacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                loaded=loaded,
                capacity=self._capacity,
            )

    def activate(self, lora: LoraArtifact, scale: float) -> str:
        """Make ``lora`` the only active adapter at ``scale`` (loading it on a miss); its name.

        LORA_INVALID if it cannot be loaded, GPU_OOM if loading ran out of GPU memory,
        STORAGE_ERROR if its file left the disk before it was loaded (see ``reading``).
        """
        if self._hotswap:
            self._into_slot(lora)
            self._set_slot_scale(scale)
            return HOTSWAP_SLOT
        name = self._ensure_loaded(lora, keep=())
        self._set_active({name: scale})
        return name

    def activate_mixed(
        self, entries: Sequence[tuple[LoraArtifact, float]]
    ) -> dict[str, str | GenerationError]:
        """Load and activate several LoRAs at once, each at its scale, for a mixed batch.

        Returns, per checksum, the adapter name, or the error that kept that LoRA out (the
        others stay usable). At most ``max_active`` distinct LoRAs, each with one scale.
        """
        scales: dict[str, float] = {}
        loras: dict[str, LoraArtifact] = {}
        for lora, scale in entries:
            if scales.setdefault(lora.checksum, scale) != scale:
                raise ValueError(f"LoRA {lora.ref!r} asked at two scales in one batch")
            loras[lora.checksum] = lora
        if len(loras) > self.max_active:
            raise ValueError(
                f"{len(loras)} LoRAs in one batch; at most {self.max_active} can be active"
            )
        if not loras:
            self.deactivate()
            return {}
        if self._hotswap:
            checksum, lora = next(iter(loras.items()))
            try:
                return {checksum: self.activate(lora, scales[checksum])}
            except GenerationError as error:
                self.deactivate()
                return {checksum: error}
        outcome: dict[str, str | GenerationError] = {}
        active: dict[str, float] = {}
        for checksum, lora in loras.items():
            try:
                name = self._ensure_loaded(lora, keep=loras.keys())
            except GenerationError as error:
                outcome[checksum] = error
                continue
            outcome[checksum] = name
            active[name] = scales[checksum]
        self._set_active(active)
        return outcome

    def deactivate(self) -> None:
        """Run the base model: LoRA layers off (hot-swap: the slot at scale 0, no recompile)."""
        if self._hotswap:
            if HOTSWAP_SLOT not in adapters_of(self._pipe.unet):
                # A failed load whose undo ran out of memory too left no slot: rebuild it.
                self._prime_slot()
            self._set_slot_scale(0.0)
        elif self._names and self._active != {}:
            for layer in self._tuner_layers():
                layer.enable_adapters(False)
            self._active = {}

    def clear(self) -> None:
        """Drop every loaded adapter (hot-swap: empty the slot and forget parsed LoRAs)."""
        if self._hotswap:
            with self._stats_lock:
                self._parsed.clear()
            self._zero_slot()
            return
        for checksum in list(self._names):
            self._evict(checksum, counted=False)

    def close(self) -> None:
        """Let go of the pipeline and of every parsed LoRA (the model is shutting down)."""
        with self._stats_lock:
            self._names.clear()
            self._parsed.clear()
        self._unit_scaling = []
        self._pipe = None  # type: ignore[assignment]

    # -- normal mode ----------------------------------------------------------------------------

    def _ensure_loaded(self, lora: LoraArtifact, *, keep: Collection[str]) -> str:
        """The adapter name of ``lora``, loading it (after making room) on a miss."""
        name = self._names.get(lora.checksum)
        if name is not None:
            with self._stats_lock:
                self._names.move_to_end(lora.checksum)
                self._hits += 1
            return name
        with self._stats_lock:
            self._misses += 1
        while len(self._names) >= self._capacity:
            victim = next((c for c in self._names if c not in keep), None)
            if victim is None:
                raise ValueError("every loaded adapter is needed by this batch")
            self._evict(victim)
        self._created += 1
        name = f"{ADAPTER_PREFIX}{self._created}"
        self._load(lora, name)
        with self._stats_lock:
            self._names[lora.checksum] = name
        return name

    def _evict(self, checksum: str, *, counted: bool = True) -> None:
        with self._stats_lock:
            name = self._names.pop(checksum)
            self._evictions += int(counted)
        self._remove(name)

    def _load(self, lora: LoraArtifact, name: str) -> None:
        """Validate and inject ``lora`` as adapter ``name``; nothing of it remains on failure."""
        self._layers_changed()
        path = Path(lora.path)
        with loading(lora, undo=lambda: self._remove(name)):
            self._validate(path)
            if path.is_dir():
                self._load_peft_folder(path, name)
            else:
                self._inject(parse_lora_file(self._pipe, path), name, text_encoder=True)
            if name not in adapters_of(self._pipe.unet):
                raise LoraInvalid(f"LoRA {lora.ref!r} has no weights for this model's UNet")

    def _load_peft_folder(self, path: Path, name: str) -> None:
        """A PEFT folder through peft directly (``load_lora_weights`` would ignore it)."""
        config, state = parse_peft_folder(path)
        unet = self._pipe.unet
        unet.add_adapter(config, adapter_name=name)
        result = set_peft_model_state_dict(unet, state, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise LoraInvalid(
                f"PEFT adapter has {len(unexpected)} tensors for layers this model lacks,"
                f" e.g. {unexpected[0]!r}"
            )
        # Layers the config targets but the file leaves out would keep uninitialised weights.
        missing = [
            key
            for key in getattr(result, "missing_keys", None) or []
            if ".lora_" in key and f".{name}." in key
        ]
        if missing:
            raise LoraInvalid(
                f"PEFT adapter lacks {len(missing)} tensors its config targets,"
                f" e.g. {missing[0]!r}"
            )

    def _inject(self, parsed: ParsedLora, name: str, *, text_encoder: bool) -> None:
        self._load_into_unet(parsed, name)
        if text_encoder and parsed.has_text_encoder:
            self._load_into_text_encoder(parsed, name)

    def _load_into_unet(self, parsed: ParsedLora, name: str, *, hotswap: bool = False) -> None:
        """``parsed``'s UNet part as adapter ``name`` (copied into it in place with ``hotswap``)."""
        pipe = self._pipe
        pipe.load_lora_into_unet(
            parsed.state_dict,
            network_alphas=parsed.network_alphas,
            unet=pipe.unet,
            adapter_name=name,
            metadata=parsed.metadata_for("unet"),
            _pipeline=pipe,
            hotswap=hotswap,
        )

    def _load_into_text_encoder(self, parsed: ParsedLora, name: str) -> None:
        """``parsed``'s text-encoder part as adapter ``name``."""
        pipe = self._pipe
        pipe.load_lora_into_text_encoder(
            parsed.state_dict,
            network_alphas=parsed.network_alphas,
            text_encoder=pipe.text_encoder,
            adapter_name=name,
            metadata=parsed.metadata_for("text_encoder"),
            _pipeline=pipe,
        )

    def _remove(self, name: str) -> None:
        """Delete adapter ``name`` wherever it is; a failure is logged, never raised."""
        self._layers_changed()
        pipe = self._pipe
        try:
            if name in adapters_of(pipe.unet) or name in adapters_of(pipe.text_encoder):
                pipe.delete_adapters(name)
        except Exception:  # pylint: disable=broad-exception-caught
            log.exception("adapter %s could not be removed", name)

    def _set_active(self, scales: Mapping[str, float]) -> None:
        """Activate exactly these adapters at these scales, layer by layer.

        What ``pipe.set_adapters`` + ``enable_lora`` do, without walking every module of the
        UNet and text encoder on each call (the LoRA layers are listed once per load or
        eviction); nothing at all when they are already active as asked. This is the whole cost
        of a warm switch.
        """
        if not scales:
            self.deactivate()
            return
        wanted = dict(scales)
        if self._active == wanted:
            return
        names = list(wanted)
        for layer in self._tuner_layers():
            if layer.disable_adapters:
                layer.enable_adapters(True)
            # What the layer's forward reads. peft's set_adapter also flips requires_grad on
            # every adapter's weights (a training concern: generation runs under inference_mode)
            # and that loop was most of a warm switch's cost.
            layer._active_adapter = names  # pylint: disable=protected-access
            for name, scale in wanted.items():
                layer.set_scale(name, scale)
        self._active = wanted

    def _tuner_layers(self) -> list[BaseTunerLayer]:
        if self._layers is None:
            self._layers = lora_layers(self._pipe.unet) + lora_layers(self._pipe.text_encoder)
        return self._layers

    def _layers_changed(self) -> None:
        """Adapters were added or removed: list the layers again, assume nothing is active."""
        self._layers = None
        self._active = None

    # -- hot-swap mode --------------------------------------------------------------------------

    def _prime_slot(self) -> None:
        """(Re)create the slot: zero LoRA weights at the slot rank on every slot layer."""
        layers = self._unet_layers()
        rank = self._slot_rank
        primer: dict[str, torch.Tensor] = {}
        for path in sorted(self._slot_paths):
            base = layers[path]
            if isinstance(base, torch.nn.Conv2d):
                down = base.weight.new_zeros(rank, base.in_channels, *base.kernel_size)
                up = base.weight.new_zeros(base.out_channels, rank, 1, 1)
            else:
                down = base.weight.new_zeros(rank, base.in_features)
                up = base.weight.new_zeros(base.out_features, rank)
            primer[f"unet.{path}.lora_A.weight"] = down
            primer[f"unet.{path}.lora_B.weight"] = up
        self._remove(HOTSWAP_SLOT)
        # Pads later adapters to the slot rank and turns scalings into tensors, so that neither a
        # new rank nor a new scale changes what a compiled graph depends on.
        self._pipe.enable_lora_hotswap(target_rank=rank, check_compiled="ignore")
        self._inject(ParsedLora(primer, None, None, rank=rank), HOTSWAP_SLOT, text_encoder=False)
        self._after_slot_change()
        self._in_slot = None
        self._set_slot_scale(0.0)

    def _unet_layers(self) -> dict[str, torch.nn.Module]:
        """The UNet's modules by plain path (no ``_orig_mod.``), peft wrappers unwrapped."""
        return {
            path.removeprefix("_orig_mod."): (
                module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            )
            for path, module in self._pipe.unet.named_modules()
        }

    def _into_slot(self, lora: LoraArtifact) -> None:
        """Put ``lora`` in the slot: nothing to do if there, a copy if parsed, else a read."""
        checksum = lora.checksum
        if checksum == self._in_slot:
            with self._stats_lock:
                self._hits += 1
                if checksum in self._parsed:
                    self._parsed.move_to_end(checksum)
            return
        parsed = self._parsed.get(checksum)
        with self._stats_lock:
            if parsed is None:
                self._misses += 1
            else:
                self._hits += 1
                self._parsed.move_to_end(checksum)
        if parsed is None:
            parsed = self._read(lora)
        self._swap_in(lora, parsed)
        if checksum not in self._parsed:
            with self._stats_lock:
                self._parsed[checksum] = parsed
                while len(self._parsed) > self._capacity:
                    self._parsed.popitem(last=False)
                    self._evictions += 1

    def _read(self, lora: LoraArtifact) -> ParsedLora:
        """Validate and parse ``lora`` into host memory (the one file read of a miss)."""
        path = Path(lora.path)
        with reading(lora):
            layout = self._validate(path)
            if path.is_dir():
                parsed = parse_peft_as_diffusers(path)
            else:
                parsed = parse_lora_file(self._pipe, path)
        return dataclasses.replace(parsed, rank=layout.max_rank)

    def _swap_in(self, lora: LoraArtifact, parsed: ParsedLora) -> None:
        """Copy ``parsed`` into the slot; grow the slot first when it cannot take it."""
        self._in_slot = None
        with loading(lora, undo=self._zero_slot):
            fits = parsed.rank <= self._slot_rank and parsed.uniform
            if fits:
                try:
                    self._hotswap_unet(parsed)
                    fits = self._slot_shapes == self._current_slot_shapes()
                except (ValueError, RuntimeError) as exc:
                    if is_cuda_oom(exc):
                        raise
                    log.info("LoRA %s does not fit the hot-swap slot: %s", lora.ref, exc)
                    fits = False
            if not fits:
                self._grow_slot(lora, parsed)
            self._swap_text_encoder(parsed)
        self._after_slot_change()
        self._in_slot = lora.checksum

    def _hotswap_unet(self, parsed: ParsedLora) -> None:
        self._load_into_unet(parsed, HOTSWAP_SLOT, hotswap=True)

    def _grow_slot(self, lora: LoraArtifact, parsed: ParsedLora) -> None:
        """Re-create the slot over its layers and this LoRA's, at a rank that fits it, then swap
        the LoRA in. The slot only grows, so this happens a few times in a process at most; a
        compiled UNet recompiles each time."""
        self._remove(HOTSWAP_SLOT)
        try:  # loaded once on its own: diffusers resolves every layout to the layers it adapts
            self._inject(parsed, HOTSWAP_SLOT, text_encoder=False)
            adapted = {
                path.removeprefix("_orig_mod."): int(module.r[HOTSWAP_SLOT])
                for path, module in self._pipe.unet.named_modules()
                if isinstance(module, BaseTunerLayer) and HOTSWAP_SLOT in module.r
            }
        finally:
            self._remove(HOTSWAP_SLOT)
        if not adapted:
            raise LoraInvalid(f"LoRA {lora.ref!r} has no weights for this model's UNet")
        self._slot_paths |= adapted.keys()
        self._slot_rank = max(self._slot_rank, *adapted.values())
        log.warning(
            "hot-swap slot re-created for LoRA %s: %d layers at rank %d (a compiled UNet"
            " recompiles once)",
            lora.ref,
            len(self._slot_paths),
            self._slot_rank,
        )
        self._prime_slot()
        try:
            self._hotswap_unet(parsed)
        except (ValueError, RuntimeError) as exc:
            if is_cuda_oom(exc):
                raise
            # A config the slot's cannot match (use_rslora, per-layer alphas): the LoRA itself
            # becomes the slot, padded to its rank; the next plain LoRA grows it back.
            log.warning("LoRA %s becomes the hot-swap slot itself: %s", lora.ref, exc)
            self._remove(HOTSWAP_SLOT)
            self._pipe.enable_lora_hotswap(target_rank=self._slot_rank, check_compiled="ignore")
            self._inject(parsed, HOTSWAP_SLOT, text_encoder=False)

    def _swap_text_encoder(self, parsed: ParsedLora) -> None:
        """The text encoder is not compiled: its part of the LoRA is reloaded, not hot-swapped."""
        text_encoder = self._pipe.text_encoder
        if HOTSWAP_SLOT in adapters_of(text_encoder):
            delete_adapter_layers(text_encoder, HOTSWAP_SLOT)
        if parsed.has_text_encoder:
            self._load_into_text_encoder(parsed, HOTSWAP_SLOT)

    def _zero_slot(self) -> None:
        """Leave the slot holding nothing: zero weights at scale 0 (its layers stay)."""
        self._in_slot = None
        text_encoder = self._pipe.text_encoder
        if HOTSWAP_SLOT in adapters_of(text_encoder):
            delete_adapter_layers(text_encoder, HOTSWAP_SLOT)
        if HOTSWAP_SLOT not in adapters_of(self._pipe.unet):
            self._prime_slot()
            return
        with torch.no_grad():
            for layer in lora_layers(self._pipe.unet):
                for factors in (layer.lora_A, layer.lora_B):
                    if HOTSWAP_SLOT in factors:
                        factors[HOTSWAP_SLOT].weight.zero_()
        self._after_slot_change()
        self._set_slot_scale(0.0)

    def _after_slot_change(self) -> None:
        """Record the slot's shapes and each layer's scaling at scale 1 (alpha / rank)."""
        self._slot_shapes = self._current_slot_shapes()
        self._unit_scaling = [
            (layer, float(layer.scaling[HOTSWAP_SLOT]))
            for layer in lora_layers(self._pipe.unet)
            if HOTSWAP_SLOT in layer.scaling
        ]
        self._slot_scale = None

    def _current_slot_shapes(self) -> dict[str, torch.Size]:
        marker = f".{HOTSWAP_SLOT}."
        return {
            name: param.shape
            for name, param in self._pipe.unet.named_parameters()
            if marker in name
        }

    def _set_slot_scale(self, scale: float) -> None:
        """Scale the slot in place: scalings are tensors, so a compiled UNet does not recompile."""
        if scale == self._slot_scale:
            return
        with torch.no_grad():
            for layer, unit in self._unit_scaling:
                current = layer.scaling[HOTSWAP_SLOT]
                if isinstance(current, torch.Tensor):
                    current.fill_(unit * scale)
                else:
                    layer.scaling[HOTSWAP_SLOT] = unit * scale
        text_encoder = self._pipe.text_encoder
        if HOTSWAP_SLOT in adapters_of(text_encoder):
            set_adapters_for_text_encoder([HOTSWAP_SLOT], text_encoder, [scale])
        self._slot_scale = scale


def parse_lora_file(pipeline: StableDiffusionPipeline, path: Path) -> ParsedLora:
    """Read a single-file LoRA (diffusers or kohya layout) as diffusers' loaders take it.

    Read by path, not as a tensor dict, so the diffusers layout keeps ``lora_alpha`` from the
    file's metadata. ``use_safetensors=True`` forbids diffusers' pickle fallback.
    """
    state, alphas, metadata = pipeline.lora_state_dict(
        str(path.parent),
        weight_name=path.name,
        use_safetensors=True,
        local_files_only=True,
        return_lora_metadata=True,
    )
    if not state:
        raise LoraInvalid(f"{path.name} holds no tensors")
    odd = next((key for key in state if "lora" not in key), None)
    if odd is not None:
        raise LoraInvalid(f"{path.name} is not a LoRA: it holds {odd!r}")
    return ParsedLora(dict(state), alphas or None, inference_metadata(metadata))


def inference_metadata(metadata: object) -> dict[str, Any] | None:
    """Diffusers' adapter metadata with dropout off.

    Dropout is a training setting, and peft creates its dropout modules in training mode: a
    LoRA saved with ``lora_dropout`` > 0 would otherwise drop activations at random while
    generating. (It also makes hot-swap configs compatible, which compare dropout.)
    """
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise LoraInvalid("the LoRA's adapter metadata is not a JSON object")
    return {
        key: 0.0 if key.rsplit(".", 1)[-1] == "lora_dropout" else value
        for key, value in metadata.items()
    }


def parse_peft_folder(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT folder's LoRA config (every LoRA field of the file, dropout off) and UNet tensors."""
    config_path = path / PEFT_CONFIG
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoraInvalid(f"{config_path.name} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise LoraInvalid(f"{config_path.name} does not describe a PEFT LoRA")
    # Every LoRA field counts (use_rslora, alpha_pattern, rank_pattern...); initialisation is
    # overwritten by the weights.
    known = {field.name for field in dataclasses.fields(LoraConfig)}
    fields = {k: v for k, v in raw.items() if k in known}
    config = LoraConfig(**{**fields, "lora_dropout": 0.0, "init_lora_weights": False})
    state = {
        key.removeprefix(PEFT_PREFIX).removeprefix("unet."): value
        for key, value in read_safetensors(path / PEFT_WEIGHTS).items()
    }
    return config, state


def parse_peft_as_diffusers(path: Path) -> ParsedLora:
    """A PEFT folder in diffusers' loader form: ``unet.`` keys, its config as adapter metadata."""
    config, state = parse_peft_folder(path)
    fields = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(LoraConfig)
        if field.init and field.name not in ("peft_type", "task_type", "base_model_name_or_path")
    }
    return ParsedLora(
        {f"unet.{key}": value for key, value in state.items()},
        None,
        {f"unet.{key}": value for key, value in fields.items()},
    )
