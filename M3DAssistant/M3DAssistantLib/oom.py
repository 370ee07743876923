"""Out of memory -> an error that says what to change (dtype, device, crop, smaller model).

PyTorch reports running out of memory as ``torch.OutOfMemoryError`` (CUDA, also ``torch.cuda.OutOfMemoryError``) or
as a ``RuntimeError`` whose text says so (Apple MPS, the CPU allocator). Neither tells a Slicer user what to do.
:func:`translate_out_of_memory` turns them into :class:`OutOfMemoryError` (an :class:`~.errors.M3DError`), frees the
allocator's cached blocks so the next request can run, and leaves every other exception alone.

Where to call it (the engine owner wires it in; this module changes nothing by itself)::

    # engine.InferenceEngine._run, around the model work of one request
    with translate_out_of_memory(self.device, self.dtype, self.model_source, f"the {task} request"):
        view = self._view(task)
        out = self._generate(view, prompt, sampling, seg, on_text)

    # model.loading.load_model, around moving the weights to the device
    with translate_out_of_memory(device, dtype, str(source), "loading the model"):
        ...
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterator, Optional

from .errors import M3DError

SMALLER_MODEL = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"

_MESSAGE_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


class OutOfMemoryError(M3DError, MemoryError):
    """The device (GPU or RAM) had no memory left for the model or a request."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for PyTorch's out-of-memory errors on every backend (CUDA, MPS, CPU), False for anything else."""
    try:
        import torch
    except ImportError:  # the light client side: only plain MemoryError can mean this
        return isinstance(error, MemoryError) and not isinstance(error, OutOfMemoryError)
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    if isinstance(error, MemoryError) and not isinstance(error, OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _MESSAGE_MARKERS)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "?"


def out_of_memory_message(device: Any, dtype: Any, model: str = "", what: str = "the request") -> str:
    """The problem (where, during what, which model and dtype) and what to change, most effective first."""
    device_name = str(device) if device is not None else "?"
    on_gpu = device_name.startswith(("cuda", "mps"))
    where = f"GPU memory on {device_name}" if on_gpu else f"memory (RAM) on {device_name}"
    dtype_name = _dtype_name(dtype)
    model_part = f" (model {model}, {dtype_name})" if model else f" ({dtype_name})"
    fixes = []
    if dtype_name in ("float32", "float64"):
        fixes.append(f"use a 16-bit dtype: --dtype bfloat16 (or float16) halves the weights' memory instead of "
                     f"{dtype_name}")
    if on_gpu:
        fixes.append("close other programs using this GPU, or use a device with more memory (--device cuda:N); "
                     "--device cpu works too, slowly")
    else:
        fixes.append("close other programs, or run on a GPU (--device cuda) or a remote worker with more memory")
    fixes.append("crop the volume to an ROI and ask for fewer new tokens (max_new_tokens)")
    if SMALLER_MODEL not in (model or ""):
        fixes.append(f"use a smaller model: {SMALLER_MODEL} instead of the 7B one")
    return f"out of {where} while {what}{model_part}. To fit: " + "; ".join(fixes) + "."


def free_cached_memory(device: Any = None) -> None:
    """Give the allocator's cached blocks back so the next request starts from a clean state."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    name = str(device or "")
    if name.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif name.startswith("mps") and hasattr(torch, "mps") and hasattr(torch.mps, "empty_cache"):
        torch.mps.empty_cache()


@contextlib.contextmanager
def translate_out_of_memory(device: Any, dtype: Any, model: Optional[str] = "",
                            what: str = "the request") -> Iterator[None]:
    """Re-raise PyTorch's out-of-memory errors inside the block as :class:`OutOfMemoryError` with advice."""
    try:
        yield
    except BaseException as error:
        if not is_out_of_memory(error):
            raise
        free_cached_memory(device)
        raise OutOfMemoryError(out_of_memory_message(device, dtype, model or "", what)) from error
