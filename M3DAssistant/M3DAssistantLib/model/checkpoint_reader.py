"""Reading checkpoint weights into a model built on the meta device, strictly and without a second full copy.

Supported layouts (as published on the HF hub or written by ``save_pretrained``):
``model.safetensors``, ``model.safetensors.index.json`` + shards, ``pytorch_model.bin``,
``pytorch_model.bin.index.json`` + shards.

On the CPU, a safetensors tensor stored in the target dtype is mapped from its file copy-on-write (the weight is the
page cache's copy: no second copy, no fresh memory to fill -- filling fresh memory costs as much as reading the
disk; a write to a weight copies only that page), with its pages read in during the load; a tensor whose dtype
changes is read with plain file reads into one reused buffer per reading thread and converted into its destination.
Either way peak memory stays near the size of the loaded model (a mapping is made only for the tensors that use it).
On a CUDA device the tensors go straight to the GPU through two pinned buffers (the CPU never holds the model).
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from ..errors import CheckpointError
from ..progress import ProgressCallback, report_progress
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

READ_THREADS = 2
"""Tensors read at once. Filling fresh memory costs more than the copy itself (page faults; in a virtual machine the
host's too): two readers overlap that with the disk and with each other. Measured in ``benchmarks/load_time.py``."""


def _read_exact(fd: int, target: torch.Tensor, info: TensorInfo) -> None:
    """Read the tensor's bytes into ``target`` (contiguous, ``info.nbytes`` long) with positional reads (threads
    share the file descriptor)."""
    view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:]], info.offset + done)
        if n <= 0:
            raise CheckpointError(f"{info.file}: truncated while reading {info.name!r}. Download the file again.")
        done += n


def _read_safetensors_tensor(fd: int, info: TensorInfo, dtype: torch.dtype,
                             scratch: Optional[torch.Tensor]) -> torch.Tensor:
    """Read one tensor into a new CPU tensor of ``dtype``: straight into it when the dtype matches, else through
    ``scratch`` (a reused byte buffer of at least ``info.nbytes``, so converting allocates nothing but the result and
    the heap does not grow with freed temporaries)."""
    stored = _TORCH_DTYPES[info.dtype]
    result = torch.empty(info.shape, dtype=dtype)
    if not info.nbytes:
        return result
    target = result if stored == dtype else scratch[: info.nbytes]
    _read_exact(fd, target, info)
    if stored != dtype:
        result.copy_(target.view(stored).reshape(info.shape))
    return result


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python 3.11 lacks the name


def _map_copy_on_write(f) -> Optional[mmap.mmap]:
    """The whole file mapped privately (a write to a tensor copies that page; the file never changes), or None
    where it cannot be mapped."""
    try:
        if os.name == "posix":
            return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None


def _mapped_tensor(mapped: mmap.mmap, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """The tensor's bytes in the mapping, its pages read in now (so the load, not the first forward pass, waits for
    the disk): the model's weight *is* the page cache's copy, with no second copy and no fresh memory to fill."""
    if info.offset + info.nbytes > len(mapped):
        raise CheckpointError(f"{info.file}: truncated while reading {info.name!r}. Download the file again.")
    page = mmap.PAGESIZE
    first = info.offset // page * page
    try:
        mapped.madvise(MADV_POPULATE_READ, first, info.offset + info.nbytes - first)
    except (OSError, ValueError):  # an older kernel or another OS: the pages come in on first use
        pass
    return torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.offset).view(dtype).reshape(
        info.shape)


def _file_tensors(f, infos: list[TensorInfo], dtype_for: Callable[[str, torch.dtype], torch.dtype],
                  largest: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of one safetensors file, in order, on the CPU: mapped (:func:`_mapped_tensor`) where it is stored
    in the target dtype, else read and converted (:func:`_read_safetensors_tensor`), :data:`READ_THREADS` at a
    time. A file is mapped only when a tensor of it will be, and only those tensors' pages are read through the
    mapping, so a converted tensor never counts twice in memory."""
    fd = f.fileno()
    targets = [(info, dtype_for(info.name, _TORCH_DTYPES[info.dtype])) for info in infos]
    mappable = [info.nbytes and dtype == _TORCH_DTYPES[info.dtype] and info.offset % dtype.itemsize == 0
                for info, dtype in targets]
    mapped = _map_copy_on_write(f) if any(mappable) else None
    if mapped is not None and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)  # start reading ahead now, in large requests
    scratch = threading.local()  # one conversion buffer per reading thread, made when a dtype changes

    def read(info: TensorInfo, dtype: torch.dtype) -> tuple[str, torch.Tensor]:
        buffer = None
        if dtype != _TORCH_DTYPES[info.dtype]:
            if getattr(scratch, "buffer", None) is None:
                scratch.buffer = torch.empty(largest, dtype=torch.uint8)
            buffer = scratch.buffer
        return info.name, _read_safetensors_tensor(fd, info, dtype, buffer)

    pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="m3d-load")
    pending: collections.deque = collections.deque()
    try:
        for (info, dtype), map_it in zip(targets, mappable):
            if map_it and mapped is not None:
                done: Future = Future()
                done.set_result((info.name, _mapped_tensor(mapped, info, dtype)))
                pending.append(done)
            else:
                pending.append(pool.submit(read, info, dtype))
            if len(pending) > READ_THREADS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _DeviceStaging:
    """Reads tensors straight to an accelerator through two pinned host buffers: the model never exists on the CPU
    (the host holds at most two tensors' bytes), and the disk read of one tensor overlaps the host-to-device copy of
    the one before. A dtype change happens on the device."""

    def __init__(self, device: torch.device, nbytes: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.events: list = [None, None]
        self.turn = 0

    def read(self, fd: int, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        stored = _TORCH_DTYPES[info.dtype]
        result = torch.empty(info.shape, dtype=dtype, device=self.device)
        if not info.nbytes:
            return result
        k, self.turn = self.turn, 1 - self.turn
        if self.events[k] is not None:
            self.events[k].synchronize()  # the copy out of this buffer has finished: it may be overwritten
        staging = self.buffers[k][: info.nbytes]
        _read_exact(fd, staging, info)
        source = staging.view(stored).reshape(info.shape)
        if stored == dtype:
            result.copy_(source, non_blocking=self.cuda)
        else:
            result.copy_(source.to(self.device, non_blocking=self.cuda))
        if self.cuda:
            self.events[k] = torch.cuda.Event()
            self.events[k].record()
        return result

    def close(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still read a buffer we free
        self.buffers = []


def iter_checkpoint_tensors(
    files: Iterable[Path], dtype_for: Callable[[str, torch.dtype], torch.dtype],
    device: Optional[torch.device] = None,
    wanted: Optional[Callable[[str], bool]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, converted to ``dtype_for(name, stored_dtype)``: on the CPU, or, for
    safetensors files and a CUDA ``device``, read straight to that device (:class:`_DeviceStaging`). Safetensors
    tensors for which ``wanted(name)`` is false are never read (nor is memory allocated for them)."""
    for path in files:
        if path.suffix == ".safetensors":
            infos = [i for i in read_safetensors_header(path) if wanted is None or wanted(i.name)]
            largest = max((i.nbytes for i in infos), default=0)
            with open(path, "rb", buffering=0) as f:
                if device is None or device.type != "cuda":
                    yield from _file_tensors(f, infos, dtype_for, largest)
                    continue
                staging = _DeviceStaging(device, largest)
                try:
                    for info in infos:
                        yield info.name, staging.read(f.fileno(), info, dtype_for(info.name, _TORCH_DTYPES[info.dtype]))
                finally:
                    staging.close()
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
        for name, tensor in iter_checkpoint_tensors(files, dtype_for, device, wanted=wanted):
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
                report_progress(progress, "load", len(loaded) / max(total, 1), f"{len(loaded)}/{total} tensors")
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
