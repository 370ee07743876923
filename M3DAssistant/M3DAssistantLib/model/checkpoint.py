"""Reading checkpoint weights into a model built on the meta device, strictly and without a second full copy.

Supported layouts (as published on the HF hub or written by ``save_pretrained``):
``model.safetensors``, ``model.safetensors.index.json`` + shards, ``pytorch_model.bin``,
``pytorch_model.bin.index.json`` + shards.

Safetensors files are read tensor by tensor with plain file reads straight into the destination tensor (or into
one temporary tensor when the dtype changes), so peak memory stays near the size of the loaded model; an mmap of the
whole file would count every touched page of the file in the process's resident memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from ..errors import CheckpointError
from ..progress import ProgressCallback, report

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a checkpoint file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset (safetensors only)
    nbytes: int = 0


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in load order; CheckpointError naming what is missing."""
    folder = Path(folder)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = folder / index_name
        if index_path.is_file():
            shards = sorted(set(read_weight_index(index_path).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{folder}: shard(s) {', '.join(missing)} listed in {index_name} are missing; the download is "
                    "incomplete. Run the download again (it resumes) or copy the missing files."
                )
            return [folder / s for s in shards]
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or "
        f"{BIN_INDEX}). Point to a complete M3D checkpoint folder."
    )


def read_weight_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index."""
    try:
        index = json.loads(Path(index_path).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        return {str(k): str(v) for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: unreadable weight index ({e}). Re-download the checkpoint.") from e


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Tensor names, dtypes, shapes and byte ranges of a .safetensors file, validated against the file size."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_len} does not fit in a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}); it is corrupted or truncated. "
                              "Delete it and download it again.") from e
    data_start = 8 + header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for {name!r} ({e}); the file is corrupted.") from e
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} claims bytes {begin}..{end} but needs {nbytes} and the file has "
                f"{size - data_start} data bytes; the file is corrupted or truncated. Delete it and download it again."
            )
        infos.append(TensorInfo(name, path, dtype, shape, data_start + begin, nbytes))
    return infos


def _read_safetensors_tensor(f, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Read one tensor into a new CPU tensor of ``dtype`` (directly when the dtype matches)."""
    raw = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        f.seek(info.offset)
        view = raw.view(-1).view(torch.uint8).numpy()
        if f.readinto(memoryview(view)) != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading {info.name!r}. Download the file again.")
    return raw if info.dtype == dtype else raw.to(dtype)


def iter_checkpoint_tensors(
    files: Iterable[Path], dtype_for: Callable[[str, torch.dtype], torch.dtype]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) one at a time, converted to ``dtype_for(name, stored_dtype)``."""
    for path in files:
        if path.suffix == ".safetensors":
            infos = read_safetensors_header(path)
            with open(path, "rb") as f:
                for info in infos:
                    yield info.name, _read_safetensors_tensor(f, info, dtype_for(info.name, info.dtype))
        else:
            try:
                # weights_only: never unpickle arbitrary objects; mmap: no full copy of the file in memory.
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises many types for a broken zip/pickle
                raise CheckpointError(
                    f"{path}: cannot be read as a PyTorch weights file ({type(e).__name__}: {e}); it is corrupted "
                    "or not a weights file. Delete it and download it again."
                ) from e
            for name in list(state):
                tensor = state.pop(name)
                yield name, tensor.to(dtype_for(name, tensor.dtype))
            del state


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), leaf


def load_weights(
    model: nn.Module,
    folder: Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    ignorable: Iterable[str] = (),
    progress: Optional[ProgressCallback] = None,
) -> None:
    """Fill ``model`` (built on the meta device) from the checkpoint in ``folder``. Strict: every parameter and
    persistent buffer must come from the checkpoint, and every checkpoint tensor must belong to the model, except
    names in ``ignorable`` (tolerated when present). Floating tensors are cast to ``dtype``; others keep theirs.
    """
    device = torch.device(device)
    files = weight_files(folder)
    expected = dict(model.state_dict(keep_vars=True))
    ignorable = set(ignorable)
    loaded: set[str] = set()
    unexpected: list[str] = []
    total = len(expected)

    def dtype_for(name: str, stored: torch.dtype) -> torch.dtype:
        target = expected.get(name)
        if target is not None and not target.is_floating_point():
            return target.dtype
        return dtype if stored.is_floating_point else stored

    current_file = None
    try:
        for name, tensor in iter_checkpoint_tensors(files, dtype_for):
            if name not in expected:
                if name not in ignorable:
                    unexpected.append(name)
                continue
            target = expected[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{folder}: tensor {name!r} has shape {list(tensor.shape)} in the checkpoint but the model "
                    f"(built from config.json) expects {list(target.shape)}; config.json and the weights disagree."
                )
            module, leaf = _owner(model, name)
            tensor = tensor.to(device)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
            else:
                module._buffers[leaf] = tensor
            loaded.add(name)
            if len(loaded) % 50 == 0 or len(loaded) == total:
                report(progress, "load", len(loaded) / max(total, 1), f"{len(loaded)}/{total} tensors")
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{current_file or folder}: read error ({e}).") from e

    missing = sorted(set(expected) - loaded)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(sorted(unexpected)[:5])})")
        raise CheckpointError(
            f"{folder}: the weights do not match the model built from config.json: {'; '.join(parts)}. "
            "Is this the right checkpoint for its config.json (model_type, sizes, segmentation_module)?"
        )
    _materialize_meta_buffers(model, device)


def _materialize_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers (rotary ``inv_freq``) that stayed on the meta device."""
    for module_name, module in model.named_modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        if "inv_freq" in meta and hasattr(module, "config"):
            # Rotary embeddings compute their buffers from the config in __init__; rebuild on CPU and move.
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
            for n in meta:
                module._buffers[n] = fresh._buffers[n].to(device)
            for attr in ("attention_scaling",):
                if hasattr(fresh, attr):
                    setattr(module, attr, getattr(fresh, attr))
            continue
        raise CheckpointError(
            f"internal: buffer(s) {meta} of {module_name or type(module).__name__} are not in the checkpoint and "
            "cannot be recomputed."
        )
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"internal: tensors left uninitialised after loading: {leftover[:5]}")
