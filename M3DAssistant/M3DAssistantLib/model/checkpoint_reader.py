"""Reading checkpoint weights into a model built on the meta device, strictly and without a second full copy.

Supported layouts (as published on the HF hub or written by ``save_pretrained``):
``model.safetensors``, ``model.safetensors.index.json`` + shards, ``pytorch_model.bin``,
``pytorch_model.bin.index.json`` + shards.

Safetensors files are read tensor by tensor with plain file reads straight into the destination tensor (or into
one temporary tensor when the dtype changes), so peak memory stays near the size of the loaded model; an mmap of the
whole file would count every touched page of the file in the process's resident memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from ..errors import CheckpointError
from ..progress import ProgressCallback, report
from .checkpoint_files import TensorInfo, read_safetensors_header, weight_files

_TORCH_DTYPES = {
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

logger = logging.getLogger(__name__)

def _read_safetensors_tensor(f, info: TensorInfo, dtype: torch.dtype, scratch: torch.Tensor) -> torch.Tensor:
    """Read one tensor into a new CPU tensor of ``dtype``: straight into it when the dtype matches, else through
    ``scratch`` (one reused byte buffer, so converting allocates nothing but the result and the heap does not grow
    with freed temporaries)."""
    stored = _TORCH_DTYPES[info.dtype]
    result = torch.empty(info.shape, dtype=dtype)
    if not info.nbytes:
        return result
    target = result if stored == dtype else scratch[: info.nbytes]
    f.seek(info.offset)
    if f.readinto(memoryview(target.reshape(-1).view(torch.uint8).numpy())) != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading {info.name!r}. Download the file again.")
    if stored != dtype:
        result.copy_(target.view(stored).reshape(info.shape))
    return result


def iter_checkpoint_tensors(
    files: Iterable[Path], dtype_for: Callable[[str, torch.dtype], torch.dtype],
    wanted: Optional[Callable[[str], bool]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) one at a time, converted to ``dtype_for(name, stored_dtype)``. Safetensors tensors
    for which ``wanted(name)`` is false are never read (nor is memory allocated for them)."""
    for path in files:
        if path.suffix == ".safetensors":
            infos = [i for i in read_safetensors_header(path) if wanted is None or wanted(i.name)]
            scratch = torch.empty(max((i.nbytes for i in infos), default=0), dtype=torch.uint8)
            with open(path, "rb", buffering=0) as f:
                for info in infos:
                    yield info.name, _read_safetensors_tensor(
                        f, info, dtype_for(info.name, _TORCH_DTYPES[info.dtype]), scratch
                    )
            del scratch
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
                if wanted is None or wanted(name):
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
    unexpected: list[str] = []  # only a .bin file's tensors are known this late
    total = len(expected)

    def dtype_for(name: str, stored: torch.dtype) -> torch.dtype:
        target = expected.get(name)
        if target is not None and not target.is_floating_point():
            return target.dtype
        return dtype if stored.is_floating_point else stored

    def wanted(name: str) -> bool:
        if name not in expected and name not in ignorable:
            unexpected.append(name)
        return name in expected

    _check_stored_tensors(files, expected, ignorable, folder)  # names and shapes, before any tensor is read
    try:
        for name, tensor in iter_checkpoint_tensors(files, dtype_for, wanted=wanted):
            target = expected[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise _shape_error(folder, name, tensor.shape, target.shape)
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
        raise CheckpointError(f"{folder}: read error while loading weights ({e}).") from e

    missing = sorted(set(expected) - loaded)
    if missing or unexpected:
        raise _mismatch_error(folder, missing, unexpected)
    if hasattr(model, "materialize_non_persistent_buffers"):  # models that know their fixed buffers (M3D-CLIP's BERT)
        model.materialize_non_persistent_buffers(device)
    _materialize_meta_buffers(model, device)


def _check_stored_tensors(files: list[Path], expected: dict, ignorable: set[str], folder: Path) -> None:
    """The safetensors headers against the model built from config.json: every tensor's name known and its shape
    the model's, every expected tensor present (when no .bin file hides its names) -- before anything is allocated,
    so a stray multi-GB tensor is refused by name instead of being read."""
    stored: dict[str, TensorInfo] = {}
    for path in files:
        if path.suffix != ".safetensors":
            continue
        for info in read_safetensors_header(path):
            if info.name in stored:
                raise CheckpointError(f"{folder}: tensor {info.name!r} is stored twice ({stored[info.name].file.name} "
                                      f"and {path.name}); the checkpoint is inconsistent. Download it again.")
            stored[info.name] = info
    unexpected = sorted(name for name in stored if name not in expected and name not in ignorable)
    all_known = all(path.suffix == ".safetensors" for path in files)
    missing = sorted(set(expected) - set(stored)) if all_known else []
    if missing or unexpected:
        raise _mismatch_error(folder, missing, unexpected)
    for name, info in stored.items():
        if name in expected and tuple(expected[name].shape) != info.shape:
            raise _shape_error(folder, name, info.shape, expected[name].shape)


def _shape_error(folder: Path, name: str, stored: Iterable[int], expected: Iterable[int]) -> CheckpointError:
    return CheckpointError(
        f"{folder}: tensor {name!r} has shape {list(stored)} in the checkpoint but the model (built from config.json) "
        f"expects {list(expected)}; config.json and the weights disagree."
    )


def _mismatch_error(folder: Path, missing: list[str], unexpected: list[str]) -> CheckpointError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(sorted(unexpected)[:5])})")
    return CheckpointError(
        f"{folder}: the weights do not match the model built from config.json: {'; '.join(parts)}. "
        "Is this the right checkpoint for its config.json (model_type, sizes, segmentation_module)?"
    )


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
