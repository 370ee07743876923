"""The GPUs of this computer, found without torch in Slicer's process, and the panel's choice among them.

:class:`GpuDetector` asks ``nvidia-smi`` (fast), else torch in the training Python, both as helper processes; GPUs
are numbered as nvidia-smi numbers them (PCI bus order; :mod:`.python_env` sets ``CUDA_DEVICE_ORDER`` to match).
The parameter node keeps the choice as text: :func:`parse_gpu_selection` / :func:`format_gpu_selection`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from M3DAssistantLib.units import format_bytes  # standard library only

from .helper_process import BackgroundCommand


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One GPU: its number as CUDA sees it with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, its name and total memory."""

    index: int
    name: str
    memory_bytes: Optional[int]

    def label(self) -> str:
        memory = format_bytes(self.memory_bytes) if self.memory_bytes else "memory unknown"
        return f"GPU {self.index}: {self.name} ({memory})"


NVIDIA_SMI_ARGUMENTS = ("--query-gpu=index,name,memory.total", "--format=csv,noheader")

_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB|TiB|KB|MB|GB|TB)?$", re.IGNORECASE)
_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _memory_bytes(text: str) -> tuple[bool, Optional[int]]:
    """(whether ``text`` is a memory field, its bytes or None when nvidia-smi reports it as unavailable)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):  # "[N/A]", "[Not Supported]"
        return True, None
    match = _MEMORY.match(text)
    if match is None:
        return False, None
    unit = (match.group(2) or "MiB")[0].lower()  # --format=csv,nounits prints MiB without the unit
    return True, int(float(match.group(1)) * _UNITS[unit])


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from ``nvidia-smi --query-gpu=[index,]name,memory.total --format=csv,noheader[,nounits]`` output.

    Lines that are not GPU rows (driver messages) are ignored; without an index column the GPUs are numbered in order.
    """
    gpus: list[GpuInfo] = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.strip().split(",")]
        if len(fields) < 2:
            continue
        is_memory, memory = _memory_bytes(fields[-1])
        if not is_memory:
            continue
        if len(fields) >= 3 and fields[0].isdigit():
            index, name = int(fields[0]), ", ".join(fields[1:-1])
        else:
            index, name = len(gpus), ", ".join(fields[:-1])
        if not name or ":" in name:  # "Failed to initialize NVML: ..., 2" is a message, not a GPU
            continue
        gpus.append(GpuInfo(index, name, memory))
    return gpus


TORCH_GPU_QUERY = """\
import json
import torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory)})
print("M3D-GPUS " + json.dumps(gpus))
"""
"""Run with ``python -c`` in the training Python when nvidia-smi is missing (a driver without it, ROCm builds)."""


def parse_torch_gpu_query(text: str) -> Optional[list[GpuInfo]]:
    """The GPUs printed by :data:`TORCH_GPU_QUERY`; None when its output line is missing."""
    for line in reversed(text.splitlines()):
        if line.startswith("M3D-GPUS "):
            return [GpuInfo(int(g["index"]), str(g["name"]), g.get("memory_bytes")) for g in json.loads(line[9:])]
    return None


@dataclasses.dataclass(frozen=True)
class GpuQueryResult:
    gpus: list[GpuInfo]
    source: str  # "nvidia-smi", "torch" or "" (none found)
    message: str


class GpuDetector:
    """Finds the GPUs without torch in Slicer's process: ``nvidia-smi`` first (fast), else :data:`TORCH_GPU_QUERY` in
    the training Python. Both run as helper processes; call :meth:`poll` until it returns a result, or :meth:`wait`.

    :param python: the training Python, for the torch fallback (None: no fallback)
    :param nvidia_smi: path of nvidia-smi (default: found on PATH)
    """

    def __init__(self, python: Optional[str] = None, *, nvidia_smi: Optional[str] = None, env: Optional[dict] = None,
                 smi_timeout_s: float = 15.0, torch_timeout_s: float = 120.0):
        self.python = python
        self.env = env
        self.smi_timeout_s = smi_timeout_s
        self.torch_timeout_s = torch_timeout_s
        self.notes: list[str] = []
        self._result: Optional[GpuQueryResult] = None
        self._stage = "nvidia-smi"
        self._command: Optional[BackgroundCommand] = None
        smi = nvidia_smi or shutil.which("nvidia-smi")
        if smi:
            self._command = self._start([smi, *NVIDIA_SMI_ARGUMENTS], smi_timeout_s)
        else:
            self.notes.append("nvidia-smi not found")
        if self._command is None:
            self._start_torch()

    def _start(self, command: list[str], timeout_s: float) -> Optional[BackgroundCommand]:
        try:
            return BackgroundCommand(command, env=self.env, timeout_s=timeout_s)
        except OSError as e:
            self.notes.append(f"{Path(command[0]).name} could not be started ({e.strerror or e})")
            return None

    def _start_torch(self) -> None:
        self._stage = "torch"
        self._command = self._start([self.python, "-c", TORCH_GPU_QUERY], self.torch_timeout_s) if self.python \
            else None
        if self._command is None:
            self._done([], "")

    def _done(self, gpus: list[GpuInfo], source: str) -> None:
        if gpus:
            message = f"{len(gpus)} GPU(s) found with {source}"
        else:
            why = "; ".join(self.notes) or "none found"
            message = (f"No CUDA GPU found ({why}). Training would run on the CPU: enough for a tiny test model, far "
                       "too slow for M3D-LaMed.")
        self._result = GpuQueryResult(gpus, source, message)

    def poll(self) -> Optional[GpuQueryResult]:
        if self._result is not None or self._command is None:
            return self._result
        result = self._command.poll()
        if result is None:
            return None
        if self._stage == "nvidia-smi":
            gpus = parse_nvidia_smi(result.output) if result.ok else []
            if gpus:
                self._done(gpus, "nvidia-smi")
                return self._result
            first = result.tail(1) or "no output"
            self.notes.append("nvidia-smi timed out" if result.timed_out
                              else f"nvidia-smi found no GPU ({first})")
            self._start_torch()
            return self._result
        gpus = parse_torch_gpu_query(result.output) if result.ok else None
        if gpus is None:
            self.notes.append("the torch query timed out" if result.timed_out else
                              f"torch could not be asked in {self.python} ({result.tail(1) or 'no output'})")
        self._done(gpus or [], "torch")
        return self._result

    def wait(self, timeout: Optional[float] = None) -> GpuQueryResult:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.poll()
            if result is not None:
                return result
            if end is not None and time.monotonic() > end:
                if self._command is not None:
                    self._command.cancel()
                self.notes.append("the GPU query took too long")
                self._done([], "")
                return self._result
            time.sleep(0.05)


def parse_gpu_selection(text: Any) -> tuple[int, ...]:
    """``"0, 2"`` -> ``(0, 2)``; "cpu" or "" -> () (the CPU). Unreadable entries are an error that says what is
    expected."""
    text = str(text or "").strip()
    if text.lower() == "cpu":
        return ()
    indices = []
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit():
            raise ValueError(f"GPU selection {text!r}: use GPU numbers separated by commas, e.g. '0,1'")
        if int(item) not in indices:
            indices.append(int(item))
    return tuple(indices)


def format_gpu_selection(indices: Iterable[int]) -> str:
    """``(0, 2)`` -> ``"0,2"``; () -> "" (hides every GPU from a process)."""
    return ",".join(str(int(i)) for i in indices)
