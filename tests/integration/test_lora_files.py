"""LoraValidator and the safetensors header reader, against the tiny model's real layers."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from adapters.diffusion.lora.files import (
    MAX_CONFIG_BYTES,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    PICKLE_SUFFIXES,
)
from adapters.diffusion.lora.layer_shapes import layer_shapes
from adapters.diffusion.lora.safetensors_header import (
    MAX_HEADER_BYTES,
    check_safetensors,
    read_safetensors,
    read_safetensors_header,
)
from adapters.diffusion.lora.validation import LoraValidator
from adapters.diffusion.tiny_model import TINY_TARGET_MODULES, build_tiny_lora
from domain.errors import ErrorCode, LoraInvalid

TARGETED_LAYERS = 32
"""Attention projections of the tiny UNet: 4 attention blocks x (attn1 + attn2) x 4."""
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
TE_FC1 = "text_model.encoder.layers.1.mlp.fc1"
ATTN = "down_blocks.2.attentions.0.transformer_blocks.0.attn1"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def unet(tiny_model_dir: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()


@pytest.fixture(scope="module")
def text_encoder(tiny_model_dir: Path) -> CLIPTextModel:
    return CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval()


@pytest.fixture(scope="module")
def validator(unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> LoraValidator:
    return LoraValidator(unet=unet, text_encoder=text_encoder)


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header (as JSON) and the data bytes of a safetensors file."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(
    dest: Path, header: dict[str, Any] | bytes, data: bytes, length: int | None = None
) -> Path:
    """Write a safetensors file from a header and data, with an optional lying length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if length is None else length
    dest.write_bytes(size.to_bytes(8, "little") + text + data)
    return dest


def copy_of(source: Path, dest: Path) -> Path:
    if source.is_dir():
        shutil.copytree(source, dest)
    else:
        shutil.copyfile(source, dest)
    return dest


def edited(source: Path, dest: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of a LoRA file (or of a PEFT folder's weights) with its tensors edited."""
    copy_of(source, dest)
    weights = dest / PEFT_WEIGHTS if dest.is_dir() else dest
    tensors = load_file(str(weights))
    metadata = split(weights)[0].get("__metadata__")
    edit(tensors)
    save_file(tensors, str(weights), metadata=metadata)
    return dest


def refused(validator: LoraValidator, path: Path, match: str) -> LoraInvalid:
    with pytest.raises(LoraInvalid, match=match) as caught:
        validator.validate(path)
    assert caught.value.code is ErrorCode.LORA_INVALID and not caught.value.retryable
    return caught.value


# -- accepted layouts -------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "tensors"), [("diffusers", 64), ("kohya", 96), ("peft", 64)])
def test_the_three_layouts_are_accepted(
    validator: LoraValidator, tiny_loras: dict[str, Path], fmt: str, tensors: int
) -> None:
    path = tiny_loras[fmt]
    layout = validator.validate(path)
    assert layout.format == fmt
    assert layout.ranks == (4,) and layout.max_rank == 4
    assert layout.target_modules == TARGETED_LAYERS
    assert layout.tensors == tensors
    assert not layout.text_encoder
    files = [path / PEFT_CONFIG, path / PEFT_WEIGHTS] if path.is_dir() else [path]
    assert layout.total_bytes == sum(file.stat().st_size for file in files)


def test_targeted_layer_count_matches_the_unet(unet: UNet2DConditionModel) -> None:
    targeted = [
        name
        for name, _ in unet.named_modules()
        if name.endswith(tuple("." + target for target in TINY_TARGET_MODULES))
    ]
    assert len(targeted) == TARGETED_LAYERS


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
def test_rank_is_reported(
    validator: LoraValidator, tiny_model_dir: Path, tmp_path: Path, fmt: str
) -> None:
    suffix = "" if fmt == "peft" else ".safetensors"
    lora = build_tiny_lora(tiny_model_dir, tmp_path / f"r8{suffix}", fmt=fmt, rank=8, alpha=16)
    assert validator.validate(lora).ranks == (8,)


def text_encoder_tensors(fmt: str) -> dict[str, torch.Tensor]:
    pairs = {TE_Q: (32, 32), TE_FC1: (32, 128)}
    tensors = {}
    for module, (inputs, outputs) in pairs.items():
        if fmt == "kohya":
            base = "lora_te_" + module.replace(".", "_")
            tensors[f"{base}.lora_down.weight"] = torch.zeros(4, inputs)
            tensors[f"{base}.lora_up.weight"] = torch.zeros(outputs, 4)
            tensors[f"{base}.alpha"] = torch.tensor(4.0)
        else:
            tensors[f"text_encoder.{module}.lora_A.weight"] = torch.zeros(4, inputs)
            tensors[f"text_encoder.{module}.lora_B.weight"] = torch.zeros(outputs, 4)
    return tensors


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_text_encoder_layers_are_checked_against_the_text_encoder(
    validator: LoraValidator,
    unet: UNet2DConditionModel,
    tiny_loras: dict[str, Path],
    tmp_path: Path,
    fmt: str,
) -> None:
    lora = edited(
        tiny_loras[fmt],
        tmp_path / "te.safetensors",
        lambda tensors: tensors.update(text_encoder_tensors(fmt)),
    )
    layout = validator.validate(lora)
    assert layout.text_encoder and layout.target_modules == TARGETED_LAYERS + 2
    unet_only = LoraValidator(unet=unet)
    refused(unet_only, lora, "is for the text encoder, which this validator was not given")


def test_older_diffusers_names_are_understood(validator: LoraValidator, tmp_path: Path) -> None:
    tensors = {
        f"unet.{ATTN}.processor.to_q_lora.down.weight": torch.zeros(2, 32),
        f"unet.{ATTN}.processor.to_q_lora.up.weight": torch.zeros(32, 2),
        f"unet.{ATTN}.processor.to_out_lora.down.weight": torch.zeros(2, 32),
        f"unet.{ATTN}.processor.to_out_lora.up.weight": torch.zeros(32, 2),
        f"unet.{ATTN}.to_k.lora.down.weight": torch.zeros(2, 32),
        f"unet.{ATTN}.to_k.lora.up.weight": torch.zeros(32, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.down.weight": torch.zeros(
            2, 32
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.up.weight": torch.zeros(
            32, 2
        ),
        f"text_encoder.{TE_FC1}.lora_linear_layer.down.weight": torch.zeros(2, 32),
        f"text_encoder.{TE_FC1}.lora_linear_layer.up.weight": torch.zeros(128, 2),
    }
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path))
    layout = validator.validate(path)
    assert (layout.format, layout.target_modules, layout.ranks) == ("diffusers", 5, (2,))
    assert layout.text_encoder


def test_conv_layers_need_conv_shapes(validator: LoraValidator, tmp_path: Path) -> None:
    base = "lora_unet_" + CONV.replace(".", "_")
    good = tmp_path / "conv.safetensors"
    save_file(
        {
            f"{base}.lora_down.weight": torch.zeros(4, 16, 3, 3),
            f"{base}.lora_up.weight": torch.zeros(16, 4, 1, 1),
            f"{base}.alpha": torch.tensor(2.0),
        },
        str(good),
    )
    assert validator.validate(good).target_modules == 1
    flat = tmp_path / "conv_flat.safetensors"
    save_file(
        {
            f"{base}.lora_down.weight": torch.zeros(4, 16),
            f"{base}.lora_up.weight": torch.zeros(16, 4),
        },
        str(flat),
    )
    refused(
        validator, flat, r"has shape \[4, 16\] but the base model's unet\..*needs \[4, 16, 3, 3\]"
    )


def test_layer_index_ignores_peft_wrappers_and_torch_compile(
    unet: UNet2DConditionModel, tiny_loras: dict[str, Path]
) -> None:
    plain = layer_shapes(unet)
    wrapped = copy.deepcopy(unet)
    wrapped.add_adapter(LoraConfig(r=2, target_modules=list(TINY_TARGET_MODULES)), "other")
    assert any(".base_layer" in name for name, _ in wrapped.named_modules())
    assert layer_shapes(wrapped) == plain
    compiled = torch.compile(wrapped)
    assert any(name.startswith("_orig_mod.") for name, _ in compiled.named_modules())
    assert layer_shapes(compiled) == plain
    checker = LoraValidator(unet=compiled)
    for fmt in ("diffusers", "kohya", "peft"):
        assert checker.validate(tiny_loras[fmt]).target_modules == TARGETED_LAYERS


# -- never unpickled --------------------------------------------------------------------------


class _Trap:
    """Unpickling this runs a command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def pickles(marker: Path) -> dict[str, bytes]:
    """Pickled payloads that would create ``marker`` if anything ever loaded them."""
    protocol0 = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    return {"protocol0": protocol0, "protocol4": pickle.dumps(_Trap(marker), protocol=4)}


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to unpickle fails the test loudly instead of running the payload."""

    def forbidden(*_: Any, **__: Any) -> Any:
        raise AssertionError("something tried to unpickle a LoRA")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


@pytest.mark.usefixtures("no_unpickling")
@pytest.mark.parametrize("suffix", sorted(PICKLE_SUFFIXES))
def test_pickle_suffixes_are_refused_unopened(
    validator: LoraValidator, tmp_path: Path, suffix: str
) -> None:
    marker = tmp_path / "unpickled"
    trap = tmp_path / f"style{suffix}"
    trap.write_bytes(pickles(marker)["protocol0"])
    refused(validator, trap, r"pickle formats \(.bin/.ckpt/.pt/.pth\) are refused")
    with pytest.raises(LoraInvalid, match="pickle formats"):
        check_safetensors(trap)
    assert not marker.exists()


@pytest.mark.usefixtures("no_unpickling")
@pytest.mark.parametrize("payload", ["protocol0", "protocol4", "torch.save"])
def test_a_pickle_named_safetensors_is_refused_never_unpickled(
    validator: LoraValidator, tmp_path: Path, payload: str
) -> None:
    marker = tmp_path / "unpickled"
    trap = tmp_path / "style.safetensors"
    if payload == "torch.save":
        torch.save({"weights": torch.ones(2), "trap": _Trap(marker)}, trap)
    else:
        trap.write_bytes(pickles(marker)[payload])
    refused(validator, trap, "style.safetensors is not a valid safetensors file: ")
    with pytest.raises(LoraInvalid, match="not a valid safetensors file"):
        read_safetensors(trap)
    assert not marker.exists()


def test_a_peft_folder_with_pickled_weights_is_refused(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    folder = copy_of(tiny_loras["peft"], tmp_path / "peft_bin")
    (folder / PEFT_WEIGHTS).rename(folder / "adapter_model.bin")
    refused(validator, folder, r"must hold adapter_model.safetensors \(adapter_model.bin: pickle")


@pytest.mark.parametrize("name", ["style.txt", "style", "style.safetensors.zip"])
def test_other_file_types_are_refused(validator: LoraValidator, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00" * 64)
    refused(validator, path, "only .safetensors LoRA files are accepted")


# -- malformed safetensors --------------------------------------------------------------------


def test_a_truncated_file_is_refused(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_loras["diffusers"].read_bytes()[:-100])
    refused(validator, cut, r"tensor data ends at byte \d+ but the file holds \d+ .*truncated")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x10\x00")
    refused(validator, tiny, "2 bytes is too short for a safetensors header")


def test_a_header_length_beyond_the_file_is_refused(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    header, data = split(tiny_loras["kohya"])
    size = 8 + len(json.dumps(header).encode()) + len(data)
    path = join(tmp_path / "long.safetensors", header, data, length=size - 7)
    refused(
        validator, path, rf"header length {size - 7} runs past the end of the file \({size} bytes\)"
    )


@pytest.mark.parametrize("length", [2**64 - 1, MAX_HEADER_BYTES + 1])
def test_a_huge_header_length_is_refused_before_reading_it(
    validator: LoraValidator, tmp_path: Path, length: int
) -> None:
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as stream:
        stream.write(length.to_bytes(8, "little") + b"{")
        stream.truncate(2 * MAX_HEADER_BYTES)  # sparse: the claimed header fits in the file
    tracemalloc.start()
    try:
        refused(validator, path, f"header length {length} exceeds the limit of {MAX_HEADER_BYTES}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"refusing the file allocated {peak} bytes"


def shifted(header: dict[str, Any], name: str, delta: int) -> dict[str, Any]:
    entry = header[name]
    entry["data_offsets"] = [entry["data_offsets"][0] + delta, entry["data_offsets"][1] + delta]
    return header


def last_tensor(header: dict[str, Any]) -> str:
    return max(
        (name for name in header if name != "__metadata__"),
        key=lambda name: header[name]["data_offsets"][0],
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("overlap", "overlaps the previous tensor"),
        ("gap", r"bytes \d+\.\.\d+ before tensor .* are unused"),
        ("beyond", r"tensor data ends at byte \d+ but the file holds \d+ data bytes"),
        ("shape", r"spans 512 bytes but F32 x \[4, 31\] needs 496"),
        ("negative", "invalid data_offsets"),
        ("float", "invalid data_offsets"),
        ("extra field", "must have exactly dtype, shape and data_offsets"),
        ("unknown dtype", "unknown dtype 'F99'"),
        ("trailing data", "100 bytes after the last tensor are unused"),
        ("metadata", "__metadata__ must map strings to strings"),
        ("not an object", "the header is not a JSON object"),
    ],
)
def test_malformed_headers_are_refused(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path, change: str, match: str
) -> None:
    header, data = split(tiny_loras["diffusers"])
    last = last_tensor(header)
    first = min(
        (name for name in header if name != "__metadata__"),
        key=lambda name: header[name]["data_offsets"][0],
    )
    if change == "overlap":
        shifted(header, last, -8)
        data = data[:-8]
    elif change == "gap":
        shifted(header, last, 8)
        data += b"\x00" * 8
    elif change == "beyond":
        header["unet.extra.lora_A.weight"] = {
            "dtype": "F32",
            "shape": [4, 32],
            "data_offsets": [len(data), len(data) + 512],
        }
    elif change == "shape":
        header[first]["shape"] = [4, 31]
    elif change == "negative":
        header[first]["data_offsets"] = [-512, 0]
    elif change == "float":
        header[first]["data_offsets"] = [0.0, 512.0]
    elif change == "extra field":
        header[first]["note"] = "hi"
    elif change == "unknown dtype":
        header[first]["dtype"] = "F99"
    elif change == "trailing data":
        data += b"\x00" * 100
    elif change == "metadata":
        header["__metadata__"] = {"format": 1}
    else:
        header = [header]  # type: ignore[assignment]
    path = join(tmp_path / "bad.safetensors", header, data)
    refused(
        validator,
        path,
        f"bad.safetensors is not a valid safetensors file: (tensor .*)?{match}",
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": 1}', "duplicate key"),
        (b'{"__metadata__": {"x": NaN}}', "NaN is not allowed"),
        (b"{" + b"[" * 100_000, "not valid JSON"),
        (b'{"\xff": 1}', "not valid JSON"),
    ],
)
def test_strict_json(validator: LoraValidator, tmp_path: Path, text: bytes, match: str) -> None:
    refused(validator, join(tmp_path / "json.safetensors", text, b"\x00" * 4), match)


def test_too_many_dimensions_or_tensors_are_refused(tmp_path: Path) -> None:
    header = {"t": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}
    with pytest.raises(LoraInvalid, match="invalid shape"):
        read_safetensors_header(join(tmp_path / "dims.safetensors", header, b"\x00" * 4))
    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(16_385)}
    with pytest.raises(LoraInvalid, match="more than 16384 tensors"):
        read_safetensors_header(join(tmp_path / "many.safetensors", many, b""))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.uint8])
def test_non_lora_dtypes_are_refused(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path, dtype: torch.dtype
) -> None:
    def cast(tensors: dict[str, torch.Tensor]) -> None:
        name = next(iter(tensors))
        tensors[name] = tensors[name].to(dtype)

    lora = edited(tiny_loras["diffusers"], tmp_path / "dtype.safetensors", cast)
    refused(validator, lora, r"has dtype (I64|F64|U8); LoRA tensors must be BF16, F16, F32")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_accepted(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path, dtype: torch.dtype
) -> None:
    def cast(tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            tensors[name] = tensor.to(dtype)

    lora = edited(tiny_loras["kohya"], tmp_path / "half.safetensors", cast)
    assert validator.validate(lora).format == "kohya"


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
def test_oversize_loras_are_refused_before_reading(
    unet: UNet2DConditionModel, tiny_loras: dict[str, Path], fmt: str
) -> None:
    small = LoraValidator(unet=unet, max_bytes=10_000)
    refused(small, tiny_loras[fmt], r"is \d+ bytes; the limit is 10000")


# -- names and shapes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name", "match"),
    [
        ("diffusers", "unet.conv_in.weight", "unknown tensor name 'unet.conv_in.weight'"),
        ("diffusers", "down_blocks.0.resnets.0.conv1.lora_A.weight", "unknown tensor name"),
        ("diffusers", f"unet.{ATTN}.to_q.alpha", "unknown tensor name"),
        ("diffusers", f"unet.{ATTN}.to_q.lora_magnitude_vector", "unknown tensor name"),
        ("kohya", f"lora_unet_{ATTN.replace('.', '_')}_to_q.hada_w1_a", "unknown tensor name"),
        ("kohya", "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "unknown"),
        ("kohya", f"lora_unet_{ATTN.replace('.', '_')}_to_q.dora_scale", "unknown tensor name"),
        ("diffusers", f"base_model.model.{ATTN}.to_q.lora_A.weight", "in the PEFT layout"),
        ("diffusers", "lora_unet_conv_in.lora_down.weight", "mixes the diffusers and kohya"),
        ("diffusers", "unet.not_a_block.to_q.lora_A.weight", "names no layer of the base model"),
        ("kohya", "lora_unet_input_blocks_1_1_proj_in.lora_down.weight", "names no layer"),
    ],
)
def test_unknown_tensor_names_are_refused(
    validator: LoraValidator,
    tiny_loras: dict[str, Path],
    tmp_path: Path,
    fmt: str,
    name: str,
    match: str,
) -> None:
    lora = edited(
        tiny_loras[fmt], tmp_path / "extra.safetensors", lambda t: t.update({name: torch.ones(1)})
    )
    refused(validator, lora, match)


def other_architecture(tiny_model_dir: Path, dest: Path) -> Path:
    """A model folder whose UNet has twice the channels (only its config: enough for LoRAs)."""
    config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 64]
    (dest / "unet").mkdir(parents=True)
    (dest / "unet" / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
def test_a_lora_for_another_architecture_is_refused(
    validator: LoraValidator, tiny_model_dir: Path, tmp_path: Path, fmt: str
) -> None:
    other = other_architecture(tiny_model_dir, tmp_path / "other-model")
    suffix = "" if fmt == "peft" else ".safetensors"
    lora = build_tiny_lora(other, tmp_path / f"alien{suffix}", fmt=fmt)
    refused(
        validator,
        lora,
        r"has shape \[(4, 64|64, 4)\] but the base model's unet\..* needs \[(4, 32|32, 4)\]"
        r" \(a LoRA for another model\?\)",
    )


@pytest.mark.parametrize(("fmt", "dropped"), [("diffusers", "lora_B"), ("kohya", "lora_down")])
def test_a_down_without_its_up_is_refused(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path, fmt: str, dropped: str
) -> None:
    def drop(tensors: dict[str, torch.Tensor]) -> None:
        name = next(name for name in sorted(tensors) if dropped in name)
        del tensors[name]

    lora = edited(tiny_loras[fmt], tmp_path / "half.safetensors", drop)
    missing = "up" if dropped == "lora_B" else "down"
    refused(validator, lora, rf"layer unet\..* has '.*' but no {missing} weight")


def test_two_names_for_one_weight_are_refused(validator: LoraValidator, tmp_path: Path) -> None:
    path = tmp_path / "twice.safetensors"
    save_file(
        {
            f"unet.{ATTN}.to_q.lora_A.weight": torch.zeros(2, 32),
            f"unet.{ATTN}.to_q.lora.down.weight": torch.zeros(2, 32),
            f"unet.{ATTN}.to_q.lora_B.weight": torch.zeros(32, 2),
        },
        str(path),
    )
    refused(validator, path, "are both the down weight of unet")


def test_rank_above_the_cap_is_refused(
    unet: UNet2DConditionModel, tiny_loras: dict[str, Path]
) -> None:
    capped = LoraValidator(unet=unet, max_rank=2)
    refused(capped, tiny_loras["kohya"], "has rank 4; the limit is 2")
    refused(capped, tiny_loras["peft"], r"r=4 must be an integer from 1 to 2")


def test_kohya_alpha_must_be_a_scalar(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    def widen(tensors: dict[str, torch.Tensor]) -> None:
        name = next(name for name in sorted(tensors) if name.endswith(".alpha"))
        tensors[name] = torch.ones(2)

    lora = edited(tiny_loras["kohya"], tmp_path / "alpha.safetensors", widen)
    refused(validator, lora, r"alpha '.*' must be a scalar, not shape \[2\]")


def test_diffusers_metadata_must_agree_with_the_tensors(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    header, data = split(tiny_loras["diffusers"])
    document = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    document["unet.r"] = 8
    header["__metadata__"]["lora_adapter_metadata"] = json.dumps(document)
    path = join(tmp_path / "meta.safetensors", header, data)
    refused(validator, path, r"unet\..* has rank 4; the config says 8")


# -- PEFT folders -----------------------------------------------------------------------------


def with_config(source: Path, dest: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    folder = copy_of(source, dest)
    config = json.loads((folder / PEFT_CONFIG).read_text())
    change(config)
    (folder / PEFT_CONFIG).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(peft_type="LOHA"), "peft_type 'LOHA'; only LORA is accepted"),
        (lambda c: c.pop("peft_type"), "peft_type None; only LORA is accepted"),
        (lambda c: c.update(r=0), "r=0 must be an integer from 1 to 256"),
        (lambda c: c.update(r=True), "r=True must be an integer"),
        (lambda c: c.update(r=8), r"has rank 4; the config says 8"),
        (lambda c: c.update(lora_alpha=-1), "lora_alpha=-1 must be a number above 0"),
        (lambda c: c.update(lora_alpha=1e9), "lora_alpha=1000000000.0 must be a number"),
        (lambda c: c.update(target_modules=".*attn.*"), "a regular expression"),
        (lambda c: c.update(target_modules=["to_q"]), "do not include it"),
        (lambda c: c.update(target_modules=[]), "target_modules is empty"),
        (lambda c: c.update(target_modules=None), "must list its target_modules"),
        (lambda c: c["target_modules"].append("fc_missing"), "'fc_missing' matches no layer"),
        (lambda c: c["target_modules"].append("ff.net.2"), "lacks 4 tensors its config targets"),
        (lambda c: c.update(exclude_modules=["attn2.to_q"]), "do not include it"),
        (lambda c: c.update(rank_pattern={"to_q": 8}), r"to_q has rank 4; the config says 8"),
        (lambda c: c.update(rank_pattern={"(a+)+$": 4}), "rank_pattern must map module names"),
        (lambda c: c.update(alpha_pattern={"to_q": 0}), r"alpha_pattern\['to_q'\]=0"),
        (lambda c: c.update(use_dora=True), "DoRA adapters"),
        (lambda c: c.update(modules_to_save=["conv_in"]), "modules_to_save is not supported"),
        (lambda c: c.update(layers_to_transform=[0]), "layers_to_transform is not supported"),
        (lambda c: c.update(padding="x" * MAX_CONFIG_BYTES), f"the limit is {MAX_CONFIG_BYTES}"),
    ],
)
def test_peft_config_is_checked(
    validator: LoraValidator,
    tiny_loras: dict[str, Path],
    tmp_path: Path,
    change: Callable[[dict[str, Any]], Any],
    match: str,
) -> None:
    refused(validator, with_config(tiny_loras["peft"], tmp_path / "peft", change), match)


def test_peft_config_that_agrees_in_other_words_is_accepted(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    def reword(config: dict[str, Any]) -> None:
        config["target_modules"] = ["attn1.to_q", "to_k", "to_v", "to_out.0", "attn2.to_q"]
        config["rank_pattern"] = {"to_v": 4}
        config["alpha_pattern"] = {"to_k": 8.0}
        config["exclude_modules"] = ["proj_in"]

    folder = with_config(tiny_loras["peft"], tmp_path / "peft", reword)
    assert validator.validate(folder).target_modules == TARGETED_LAYERS


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", "adapter_config.json is not valid JSON"),
        (b'["LORA"]', "adapter_config.json is not a JSON object"),
        (b'{"r": 4, "r": 8}', "duplicate key 'r'"),
        (b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}', "NaN is not allowed"),
    ],
)
def test_unreadable_peft_configs_are_refused(
    validator: LoraValidator,
    tiny_loras: dict[str, Path],
    tmp_path: Path,
    content: bytes,
    match: str,
) -> None:
    folder = copy_of(tiny_loras["peft"], tmp_path / "peft")
    (folder / PEFT_CONFIG).write_bytes(content)
    refused(validator, folder, match)


def test_peft_folder_missing_targeted_tensors_is_refused(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    def drop_to_k(tensors: dict[str, torch.Tensor]) -> None:
        for name in [name for name in tensors if ".to_k." in name]:
            del tensors[name]

    folder = edited(tiny_loras["peft"], tmp_path / "partial", drop_to_k)
    refused(
        validator, folder, r"lacks 8 tensors its config targets, e.g. 'base_model.model\..*to_k"
    )


@pytest.mark.parametrize("missing", [PEFT_CONFIG, PEFT_WEIGHTS])
def test_incomplete_peft_folders_are_refused(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path, missing: str
) -> None:
    folder = copy_of(tiny_loras["peft"], tmp_path / "peft")
    (folder / missing).unlink()
    refused(validator, folder, f"must hold {missing}")


def test_peft_tensors_need_the_peft_prefix(
    validator: LoraValidator, tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    def rename(tensors: dict[str, torch.Tensor]) -> None:
        name = next(iter(sorted(tensors)))
        tensors["unet." + name.removeprefix("base_model.model.")] = tensors.pop(name)

    folder = edited(tiny_loras["peft"], tmp_path / "peft", rename)
    refused(validator, folder, "unknown tensor name 'unet.down_blocks")


# -- the helpers the model adapter uses -------------------------------------------------------


def test_check_and_read_safetensors_keep_their_behaviour(
    tiny_loras: dict[str, Path], tmp_path: Path
) -> None:
    path = tiny_loras["diffusers"]
    header = check_safetensors(path)
    tensors = read_safetensors(path)
    assert set(tensors) == set(header.tensors)
    reference = load_file(str(path))
    assert all(torch.equal(tensors[name], reference[name]) for name in reference)
    assert header.file_bytes == path.stat().st_size
    assert header.metadata["format"] == "pt"
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(LoraInvalid, match="empty.safetensors holds no tensors"):
        check_safetensors(empty)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(LoraInvalid, match="broken.safetensors is not a valid safetensors file"):
        check_safetensors(broken)
