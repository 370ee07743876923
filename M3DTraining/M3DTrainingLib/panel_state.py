"""What the M3DTraining panel computes, without Qt: panel values -> training config, the GPU list and its memory
warnings, progress-file tailing, the loss curve (and the MRML table that shows it), evaluation results, and the short
helper processes the panel starts (GPU query, memory estimate, evaluation, merge).

``M3DTraining.py`` keeps only the Qt and Slicer wiring and calls these. Only the standard library is imported here at
import time; the training modules are imported inside the functions that need them, torch never: the trainer, the
memory estimate and the evaluation run in other processes. The MRML functions take the scene or node they work on,
so they run on slicer-core as in Slicer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Choices shown in the panel (stored in the scene as these strings) and what they mean for the trainer
# ----------------------------------------------------------------------------------------------------------------------

DEFAULT_BASE_MODEL = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"

SOURCE_CURRENT_SCENE = "Current scene"
SOURCE_SCENE_FILES = "Scene files (.mrb, .mrml)"
SOURCE_CHOICES = [SOURCE_CURRENT_SCENE, SOURCE_SCENE_FILES]

PRESET_ONE_GPU = "One 24 GB GPU (LoRA + segmentation decoder)"
PRESET_OFFICIAL = "Official recipe (several GPUs with > 40 GB)"
PRESET_CHOICES = {PRESET_ONE_GPU: "one-24gb-gpu", PRESET_OFFICIAL: "official"}
"""Panel label -> :data:`M3DTrainingLib.train.PRESETS` key."""

STAGE_LORA = "Stage 2: LoRA fine-tuning"
STAGE_PROJECTOR = "Stage 1: projector only"
STAGE_CHOICES = {STAGE_LORA: "lora", STAGE_PROJECTOR: "projector"}

DEEPSPEED_OFF = "Off"
DEEPSPEED_CHOICES = {DEEPSPEED_OFF: 0, "ZeRO-2": 2, "ZeRO-3": 3}

TASKS = ("report", "vqa_open", "vqa_closed", "rec", "reg", "seg", "refseg")
"""The export's tasks (:data:`M3DTrainingLib.export.TASKS`), in its order."""

TASK_PARAMETERS = {
    "taskReport": "report",
    "taskVqaOpen": "vqa_open",
    "taskVqaClosed": "vqa_closed",
    "taskRec": "rec",
    "taskReg": "reg",
    "taskSeg": "seg",
    "taskRefseg": "refseg",
}
"""Parameter-node field -> task of the task mix."""

# Hyperparameter fields of the parameter node that a preset sets, and their TrainConfig keys.
PRESET_PARAMETERS = {
    "learningRate": "learning_rate",
    "numEpochs": "num_epochs",
    "batchSize": "per_device_batch_size",
    "gradientAccumulation": "gradient_accumulation_steps",
    "loraRank": "lora_r",
    "loraAlpha": "lora_alpha",
    "loraDropout": "lora_dropout",
    "gradientCheckpointing": "gradient_checkpointing",
}

GIB = 1024**3

DEFAULT_ESTIMATES = {"one-24gb-gpu": 10_175_979_264, "official": 40_882_869_504}
"""Bytes per GPU that :func:`M3DTrainingLib.train.estimate_memory` gives for M3D-LaMed-Phi-3-4B with each preset's
defaults on one GPU (bf16, 512 tokens). Shown before anything runs; "Estimate memory" computes the figure for the
panel's own settings. ``Testing/test_training_module.py`` recomputes them."""

HEADROOM = 0.95
"""A GPU is too small when the estimate exceeds this share of its memory (the trainer warns at the same point)."""


@dataclasses.dataclass
class PanelState:
    """The panel's choices as plain values (the parameter node holds them as labels and paths).

    Defaults are the "One 24 GB GPU" preset's: most users have one consumer GPU.
    """

    dataset_folder: str = ""
    output_folder: str = ""
    base_model: str = DEFAULT_BASE_MODEL
    preset: str = "one-24gb-gpu"
    stage: str = "lora"
    tasks: tuple[str, ...] = TASKS
    learning_rate: float = 5e-5
    num_epochs: float = 5.0
    max_steps: int = 0  # 0: train for num_epochs
    batch_size: int = 2
    gradient_accumulation: int = 4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = True
    save_steps: int = 200
    seed: int = 42
    gpus: tuple[int, ...] = ()  # empty: the CPU
    deepspeed_stage: int = 0

    @classmethod
    def from_parameter_node(cls, p: Any) -> "PanelState":
        """Read the fields of an ``M3DTrainingParameterNode`` (or anything with the same attributes)."""
        return cls(
            dataset_folder=folder_text(p.datasetFolder),
            output_folder=folder_text(p.outputFolder),
            base_model=str(p.baseModel).strip() or DEFAULT_BASE_MODEL,
            preset=PRESET_CHOICES.get(p.preset, p.preset),
            stage=STAGE_CHOICES.get(p.stage, p.stage),
            tasks=tuple(task for name, task in TASK_PARAMETERS.items() if getattr(p, name)),
            learning_rate=float(p.learningRate),
            num_epochs=float(p.numEpochs),
            max_steps=int(p.maxSteps),
            batch_size=int(p.batchSize),
            gradient_accumulation=int(p.gradientAccumulation),
            lora_r=int(p.loraRank),
            lora_alpha=int(p.loraAlpha),
            lora_dropout=float(p.loraDropout),
            gradient_checkpointing=bool(p.gradientCheckpointing),
            save_steps=int(p.saveSteps),
            seed=int(p.seed),
            gpus=parse_gpu_selection(p.gpus),
            deepspeed_stage=DEEPSPEED_CHOICES.get(p.deepspeed, 0),
        )


def folder_text(value: Any) -> str:
    """A folder parameter as text; "" when none is chosen (an empty ``pathlib.Path`` reads as ".")."""
    text = str(value or "").strip()
    return "" if text in ("", ".") else text


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


def preset_panel_values(preset: str) -> dict[str, Any]:
    """The parameter-node hyperparameter values of a preset (key or panel label), from the trainer's presets."""
    from .config import PRESETS, canonical_preset

    values = PRESETS[canonical_preset(PRESET_CHOICES.get(preset, preset))]
    return {name: values[key] for name, key in PRESET_PARAMETERS.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Panel state -> training config
# ----------------------------------------------------------------------------------------------------------------------


def train_config_values(state: PanelState) -> dict[str, Any]:
    """The ``TrainConfig`` keys that the panel sets (the preset fills the rest)."""
    from M3DAssistantLib.errors import ConfigError

    tasks = [t for t in TASKS if t in state.tasks]
    if not tasks:
        raise ConfigError("no task is chosen in the task mix; tick at least one task.")
    values: dict[str, Any] = {
        "preset": state.preset,
        "base_model": state.base_model.strip() or DEFAULT_BASE_MODEL,
        "dataset": state.dataset_folder,
        "output_dir": state.output_folder,
        "stage": state.stage,
        "learning_rate": float(state.learning_rate),
        "num_epochs": float(state.num_epochs),
        "max_steps": int(state.max_steps) if state.max_steps > 0 else -1,
        "per_device_batch_size": int(state.batch_size),
        "gradient_accumulation_steps": int(state.gradient_accumulation),
        "gradient_checkpointing": bool(state.gradient_checkpointing),
        "lora_r": int(state.lora_r),
        "lora_alpha": int(state.lora_alpha),
        "lora_dropout": float(state.lora_dropout),
        "save_steps": int(state.save_steps),
        "seed": int(state.seed),
        "num_processes": max(1, len(state.gpus)),
        # ZeRO shards over processes: with one GPU it only adds overhead
        "deepspeed_stage": int(state.deepspeed_stage) if len(state.gpus) > 1 else 0,
        "device": "auto" if state.gpus else "cpu",
    }
    if not state.gpus:
        values["mixed_precision"] = "auto"  # float32 on the CPU (a preset may ask for bf16, meant for GPUs)
    if state.stage == "projector":
        values["trainable_parts"] = None  # the official stage-1 set (projector + embeddings), not the preset's
    if len(tasks) < len(TASKS):
        values["dataset_kwargs"] = {"tasks": tasks}
    return values


def build_train_config(state: PanelState):
    """A validated :class:`M3DTrainingLib.train.TrainConfig` from the panel (raises ``ConfigError`` with the fix)."""
    from M3DAssistantLib.errors import ConfigError

    from .config import TrainConfig

    if not state.dataset_folder:
        raise ConfigError("choose the dataset folder (Dataset section): a folder written by the export.")
    if not state.output_folder:
        raise ConfigError("choose the output folder (Training section): a new folder for checkpoints, logs and the "
                          "fine-tuned model.")
    return TrainConfig.from_dict(train_config_values(state), source="M3D Training panel")


def config_signature(state: PanelState) -> str:
    """What a memory estimate depends on (folders, seed and checkpoint frequency do not matter)."""
    values = train_config_values(state)
    for key in ("dataset", "output_dir", "seed", "save_steps"):
        values.pop(key, None)
    return json.dumps(values, sort_keys=True)


def dataset_counts(folder: PathLike) -> dict[str, dict[str, int]]:
    """Samples per task and split of an exported dataset (``dataset.json``); raises ``InputError`` with the fix."""
    from M3DAssistantLib.errors import InputError

    path = Path(folder) / "dataset.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{folder} has no dataset.json: export annotated scenes into a new folder first (Dataset "
                         "section), or choose a folder that the export wrote.") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path} cannot be read ({e}); export the scenes again into a new folder.") from e
    counts = {}
    for task in TASKS:
        section = manifest.get(task) or {}
        counts[task] = {split: len(section.get(split) or []) for split in ("train", "validation")}
    return counts


def check_dataset_tasks(counts: dict[str, dict[str, int]], tasks: Sequence[str]) -> list[str]:
    """Warnings for chosen tasks without training samples; raises ``InputError`` when none of them has any."""
    from M3DAssistantLib.errors import InputError

    chosen = [t for t in TASKS if t in tasks]
    empty = [t for t in chosen if not counts.get(t, {}).get("train")]
    if chosen and len(empty) == len(chosen):
        available = [t for t in TASKS if counts.get(t, {}).get("train")]
        raise InputError(f"the dataset has no training samples for the chosen tasks ({', '.join(chosen)}); it has "
                         f"{', '.join(available) or 'none'}. Tick those tasks, or export annotations for these.")
    return [f"no training samples for the task {t!r}: it is left out" for t in empty]


def format_dataset_counts(counts: dict[str, dict[str, int]]) -> str:
    """One line: ``report 12 + 3, seg 40 + 10`` (training + validation samples)."""
    parts = [f"{t} {c['train']} + {c['validation']}" for t, c in counts.items() if c["train"] or c["validation"]]
    return ", ".join(parts) if parts else "no samples"


# ----------------------------------------------------------------------------------------------------------------------
# Helper processes (GPU query, memory estimate, evaluation, merge): started, then polled from a Qt timer
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """How a helper process ended: its exit status and its merged stdout/stderr."""

    returncode: Optional[int]
    output: str
    timed_out: bool = False
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.cancelled

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


def _hidden_window_kwargs() -> dict[str, Any]:
    """No console window pops up for a helper process on Windows."""
    return {"creationflags": subprocess.CREATE_NO_WINDOW} if os.name == "nt" else {}


class BackgroundCommand:
    """A short-lived helper process whose output goes to a temporary file; :meth:`poll` never blocks.

    :param command: the command line
    :param env: its environment (default: this process's)
    :param timeout_s: killed after this many seconds (None: no limit)
    """

    def __init__(self, command: Sequence[str], *, env: Optional[dict] = None, cwd: Optional[PathLike] = None,
                 timeout_s: Optional[float] = None):
        self.command = [str(c) for c in command]
        self._output = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._output,
                                             stderr=subprocess.STDOUT, env=env, cwd=cwd, **_hidden_window_kwargs())
        except OSError:
            self._output.close()
            raise
        self._deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        self._result: Optional[CommandResult] = None

    def poll(self) -> Optional[CommandResult]:
        """The result once the process has ended (or was killed for running too long), else None."""
        if self._result is not None:
            return self._result
        if self._process.poll() is None:
            if self._deadline is None or time.monotonic() < self._deadline:
                return None
            self._stop()
            return self._finish(timed_out=True)
        return self._finish()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> CommandResult:
        """Block until :meth:`poll` has a result; after ``timeout`` seconds the process is cancelled."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.poll()
            if result is not None:
                return result
            if end is not None and time.monotonic() > end:
                return self.cancel()
            time.sleep(interval)

    def cancel(self) -> CommandResult:
        if self._result is None:
            self._stop()
            self._finish(cancelled=True)
        return self._result

    def _stop(self) -> None:
        try:  # PythonSlicer is a launcher: the real Python is its child, so the whole tree is stopped
            from .jobs import kill_process_tree

            kill_process_tree(self._process.pid, timeout=5.0)
        except ImportError:  # psutil missing
            self._process.kill()
        try:
            self._process.wait(5.0)
        except subprocess.TimeoutExpired:
            pass

    def _finish(self, timed_out: bool = False, cancelled: bool = False) -> CommandResult:
        self._output.seek(0)
        text = self._output.read().decode("utf-8", errors="replace")
        self._output.close()
        self._result = CommandResult(self._process.returncode, text, timed_out, cancelled)
        return self._result


# ----------------------------------------------------------------------------------------------------------------------
# GPUs
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One GPU: its number as CUDA sees it with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, its name and total memory."""

    index: int
    name: str
    memory_bytes: Optional[int]

    def label(self) -> str:
        memory = format_gb(self.memory_bytes) if self.memory_bytes else "memory unknown"
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


def format_gb(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GB"


def parse_estimate_total(text: str) -> Optional[int]:
    """Bytes of the ``total`` line that ``m3d train --estimate-only`` prints (``MemoryEstimate.format``)."""
    match = re.search(r"^\s*total\s+([\d.]+)\s*GB", text, re.MULTILINE)
    return None if match is None else int(float(match.group(1)) * GIB)


def required_memory(state: PanelState, estimates: Optional[dict[str, int]] = None) -> tuple[Optional[int], str]:
    """Bytes per GPU this configuration needs, and where the figure comes from.

    :param estimates: ``{config_signature: bytes}`` computed for the panel's own settings ("Estimate memory")
    """
    try:
        signature = config_signature(state)
    except Exception:  # no task chosen: nothing to estimate
        signature = None
    if estimates and signature in estimates:
        return estimates[signature], "estimated for these settings"
    default = DEFAULT_ESTIMATES.get(state.preset)
    if default is None:
        return None, "no estimate"
    return default, "estimate for the preset's defaults with M3D-LaMed-Phi-3-4B"


def memory_warnings(gpus: Sequence[GpuInfo], selected: Sequence[int], required_bytes: Optional[int],
                    source: str = "estimate") -> list[str]:
    """What is wrong with the chosen GPUs for a run that needs ``required_bytes`` per GPU (empty: nothing)."""
    if not selected:
        return ["No GPU chosen: training runs on the CPU in float32, enough for a tiny test model, far too slow for "
                "M3D-LaMed." + (" Tick a GPU in the list." if gpus else "")]
    by_index = {g.index: g for g in gpus}
    warnings = []
    for index in selected:
        gpu = by_index.get(index)
        if gpu is None:
            warnings.append(f"GPU {index} is not among the detected GPUs; refresh the list and choose again.")
        elif gpu.memory_bytes is None:
            warnings.append(f"GPU {index} ({gpu.name}) does not report its memory: it cannot be checked that the "
                            "training fits.")
        elif required_bytes and required_bytes > HEADROOM * gpu.memory_bytes:
            warnings.append(
                f"GPU {index} ({gpu.name}) has {format_gb(gpu.memory_bytes)}, but this training needs about "
                f"{format_gb(required_bytes)} per GPU ({source}): choose the \"{PRESET_ONE_GPU}\" preset, a smaller "
                "batch with more gradient accumulation, gradient checkpointing, or several GPUs with DeepSpeed ZeRO.")
    return warnings


# ----------------------------------------------------------------------------------------------------------------------
# The training Python and the job's environment
# ----------------------------------------------------------------------------------------------------------------------

TRAINING_MODULES = ("torch", "transformers", "peft", "accelerate", "safetensors", "monai", "yaml", "psutil",
                    "M3DAssistantLib", "M3DTrainingLib")
"""What the trainer imports (checked in the training Python before a job starts)."""

EVALUATION_MODULES = ("numpy", "torch", "monai", "sacrebleu", "rouge_score", "matplotlib", "M3DAssistantLib",
                      "M3DTrainingLib")

LAUNCHER_MODULES = {"yaml": "pyyaml>=6", "psutil": "psutil>=5.9"}
"""What Slicer's own process needs to start and watch a job: writing the config, checking the job's process."""

TRAINING_REQUIREMENTS = (
    "transformers>=5.24,<6", "tokenizers>=0.22", "sentencepiece>=0.2", "protobuf>=4", "safetensors>=0.4.3",
    "huggingface_hub>=1.0", "scipy>=1.11", "monai>=1.4", "peft>=0.17", "accelerate>=1.2", "pyyaml>=6", "psutil>=5.9",
    "sacrebleu>=2.3", "rouge-score>=0.1.2", "matplotlib>=3.7",
)
"""pip requirements of training in Slicer's Python besides torch (PyTorchUtils installs that) and what Slicer ships
(numpy, SimpleITK): pyproject.toml's ``training`` extra."""


def library_paths() -> list[str]:
    """Folders that hold M3DTrainingLib and M3DAssistantLib: Slicer puts module folders on its own ``sys.path`` only,
    so a helper process gets them on its PYTHONPATH."""
    import importlib.util

    paths = [str(Path(__file__).resolve().parent.parent)]
    spec = importlib.util.find_spec("M3DAssistantLib")
    if spec is not None and spec.submodule_search_locations:
        paths.append(str(Path(list(spec.submodule_search_locations)[0]).resolve().parent))
    return list(dict.fromkeys(paths))


def helper_environment(gpus: Optional[Sequence[int]] = None, base: Optional[dict] = None) -> dict[str, str]:
    """Variables a helper process or job needs on top of ``base``: PYTHONPATH with the Lib folders and, when
    ``gpus`` is given, the chosen GPUs (numbered as nvidia-smi numbers them; () hides every GPU)."""
    base = os.environ if base is None else base
    entries = library_paths() + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(entries))}
    if gpus is not None:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's default order is "fastest first", nvidia-smi's is PCI
        env["CUDA_VISIBLE_DEVICES"] = format_gpu_selection(gpus)
    return env


MODULE_CHECK = "import importlib.util, json, sys; print('M3D-MISSING ' + json.dumps([m for m in sys.argv[1:] " \
               "if importlib.util.find_spec(m) is None]))"


def missing_modules(python: str, modules: Sequence[str], env: Optional[dict] = None, timeout_s: float = 120.0,
                    run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[str]:
    """Which of ``modules`` the Python ``python`` cannot import (found without importing them).

    Raises ``M3DError`` when that Python cannot be run at all.
    """
    from M3DAssistantLib.errors import M3DError

    try:
        done = run([python, "-c", MODULE_CHECK, *modules], capture_output=True, text=True, timeout=timeout_s,
                   env=env, stdin=subprocess.DEVNULL, **_hidden_window_kwargs())
    except (OSError, subprocess.TimeoutExpired) as e:
        raise M3DError(f"the training Python {python} cannot be run ({e}); choose another one in the Compute "
                       "section.") from e
    for line in reversed((done.stdout or "").splitlines()):
        if line.startswith("M3D-MISSING "):
            return list(json.loads(line[12:]))
    raise M3DError(f"the training Python {python} failed (exit status {done.returncode}): "
                   f"{(done.stderr or done.stdout or '').strip()[-500:]}")


# ----------------------------------------------------------------------------------------------------------------------
# Progress of a job: the new lines of progress.jsonl, the loss curve, the status line
# ----------------------------------------------------------------------------------------------------------------------


class ProgressTail:
    """Reads a job's ``progress.jsonl`` incrementally: each call returns only the events added since the previous
    one (an unfinished last line waits for the next call); a replaced or truncated file is read again from the start.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.offset = 0
        self._identity: Optional[tuple[int, int]] = None

    def read_new(self) -> tuple[list[dict], bool]:
        """``(events, restarted)``; ``restarted`` says that earlier events no longer hold (the file was replaced)."""
        from .progress_log import ProgressLog

        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            restarted = self.offset > 0
            self.offset, self._identity = 0, None
            return [], restarted
        identity = (stat.st_dev, stat.st_ino)
        restarted = self._identity is not None and (identity != self._identity or stat.st_size < self.offset)
        if restarted:
            self.offset = 0
        self._identity = identity
        if stat.st_size == self.offset:
            return [], restarted
        events, self.offset = ProgressLog.read(self.path, self.offset)
        return events, restarted


class LossCurve:
    """Training loss per optimizer step, from progress events.

    A resumed run repeats the steps after its last checkpoint: their new values replace the old ones, so the curve is
    the one an uninterrupted run would have drawn.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.learning_rates: list[float] = []

    def __len__(self) -> int:
        return len(self.steps)

    def _truncate_from(self, step: int) -> bool:
        keep = next((i for i, s in enumerate(self.steps) if s >= step), len(self.steps))
        if keep == len(self.steps):
            return False
        del self.steps[keep:], self.losses[keep:], self.learning_rates[keep:]
        return True

    def add(self, events: Iterable[dict]) -> bool:
        """Take the ``train`` events (and a resumed run's ``start``); True when the curve changed."""
        changed = False
        for event in events:
            stage, step = event.get("stage"), event.get("step")
            if stage == "start" and isinstance(step, int):
                changed |= self._truncate_from(step + 1)
                continue
            loss = event.get("loss")
            if stage != "train" or not isinstance(step, int) or not isinstance(loss, (int, float)):
                continue
            if not math.isfinite(loss):
                continue  # a diverged step: the status line shows it, the plot keeps its scale
            changed |= self._truncate_from(step)
            lr = event.get("lr")
            self.steps.append(step)
            self.losses.append(float(loss))
            self.learning_rates.append(float(lr) if isinstance(lr, (int, float)) else math.nan)
            changed = True
        return changed


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0)))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def format_progress(event: Optional[dict]) -> str:
    """One line from the last ``train`` event: step, epoch, loss, learning rate, throughput, ETA, GPU memory."""
    if not event:
        return ""
    parts = []
    if event.get("step") is not None:
        total = event.get("total_steps")
        parts.append(f"step {event['step']}/{total}" if total else f"step {event['step']}")
    if event.get("epoch") is not None:
        parts.append(f"epoch {event['epoch']:.2f}")
    if event.get("loss") is not None:
        parts.append(f"loss {event['loss']:.4f}")
    if event.get("lr") is not None:
        parts.append(f"lr {event['lr']:.2e}")
    if event.get("samples_per_s") is not None:
        parts.append(f"{event['samples_per_s']:.2f} samples/s")
    if event.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(event['eta_s'])}")
    if event.get("gpu_memory_bytes"):
        parts.append(f"GPU memory {format_gb(event['gpu_memory_bytes'])}")
    return " \u00b7 ".join(parts)


def remember_folder(folders: Sequence[str], folder: str, limit: int = 10) -> list[str]:
    """``folder`` first, then the others (no duplicates), at most ``limit``: the jobs to look for on reopening."""
    folder = str(Path(folder))
    return [folder] + [f for f in folders if f and str(Path(f)) != folder][: limit - 1]


# ----------------------------------------------------------------------------------------------------------------------
# MRML: the loss curve as table + plot series + chart nodes, the evaluation as a table node
# ----------------------------------------------------------------------------------------------------------------------

ROLE_ATTRIBUTE = "M3DTraining.role"
FOLDER_ATTRIBUTE = "M3DTraining.outputFolder"
LOSS_COLUMNS = ("step", "loss", "learning rate")


@dataclasses.dataclass
class LossCurveNodes:
    table: Any
    series: Any
    chart: Any


def _our_node(scene: Any, class_name: str, role: str, folder: str) -> Any:
    """The node of ``class_name`` that this module made for ``folder`` in this ``role`` (never a user's node)."""
    nodes = scene.GetNodesByClass(class_name)
    nodes.UnRegister(None)  # the collection returned by GetNodesByClass is owned by the caller
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(ROLE_ATTRIBUTE) == role and node.GetAttribute(FOLDER_ATTRIBUTE) == folder:
            return node
    return None


def _new_node(scene: Any, class_name: str, name: str, role: str, folder: str) -> Any:
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetAttribute(FOLDER_ATTRIBUTE, folder)
    return node


def find_loss_curve_nodes(scene: Any, output_folder: PathLike) -> Optional[LossCurveNodes]:
    folder = str(Path(output_folder))
    nodes = [_our_node(scene, c, r, folder) for c, r in (("vtkMRMLTableNode", "lossTable"),
                                                          ("vtkMRMLPlotSeriesNode", "lossSeries"),
                                                          ("vtkMRMLPlotChartNode", "lossChart"))]
    return LossCurveNodes(*nodes) if all(nodes) else None


def loss_curve_nodes(scene: Any, output_folder: PathLike) -> LossCurveNodes:
    """The table, plot series and chart that show the loss of the job in ``output_folder``: the ones made earlier
    for it (found by attribute, so a saved and reloaded scene keeps using them), else new ones with unique names.
    Nodes the user made are never reused or changed."""
    from vtkmodules.vtkCommonCore import vtkDoubleArray

    folder = str(Path(output_folder))
    title = f"M3D training loss ({Path(folder).name})"
    table = _our_node(scene, "vtkMRMLTableNode", "lossTable", folder)
    if table is None:
        table = _new_node(scene, "vtkMRMLTableNode", title, "lossTable", folder)
    for name in LOSS_COLUMNS:
        if table.GetTable().GetColumnByName(name) is None:
            column = vtkDoubleArray()
            column.SetName(name)
            column.SetNumberOfTuples(table.GetNumberOfRows())
            column.Fill(math.nan)
            table.AddColumn(column)
    series = _our_node(scene, "vtkMRMLPlotSeriesNode", "lossSeries", folder)
    if series is None:
        series = _new_node(scene, "vtkMRMLPlotSeriesNode", "training loss", "lossSeries", folder)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        series.SetLineWidth(2)
        series.SetColor(0.12, 0.47, 0.71)
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName("step")
    series.SetYColumnName("loss")
    chart = _our_node(scene, "vtkMRMLPlotChartNode", "lossChart", folder)
    if chart is None:
        chart = _new_node(scene, "vtkMRMLPlotChartNode", title, "lossChart", folder)
        chart.SetTitle(title)
        chart.SetXAxisTitle("optimizer step")
        chart.SetYAxisTitle("loss")
        chart.SetLegendVisibility(False)
    if not chart.HasPlotSeriesNodeID(series.GetID()):
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return LossCurveNodes(table, series, chart)


def fill_loss_table(table_node: Any, curve: LossCurve) -> None:
    """Write the curve into the table (all rows: a resumed run may have replaced some), one Modified event."""
    was_modifying = table_node.StartModify()
    try:
        table = table_node.GetTable()
        table.SetNumberOfRows(len(curve))
        columns = [table.GetColumnByName(name) for name in LOSS_COLUMNS]
        for i, values in enumerate(zip(curve.steps, curve.losses, curve.learning_rates)):
            for column, value in zip(columns, values):
                column.SetValue(i, float(value))
        for column in columns:
            column.Modified()
        table.Modified()
        table_node.Modified()
    finally:
        table_node.EndModify(was_modifying)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------

EVALUATION_FOLDER = "evaluation"

EVALUATION_SCRIPT = """\
import json, sys
from pathlib import Path
from M3DTrainingLib.evaluate import evaluate_predictions, write_evaluation
source, folder, stem = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
text = source.read_text(encoding="utf-8")
if text.lstrip().startswith("["):
    records = json.loads(text)
else:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
results = evaluate_predictions(records)
json_path, png_path = write_evaluation(results, folder, stem=stem)
print("M3D-EVALUATION " + json.dumps({"json": str(json_path), "png": str(png_path)}))
"""
"""``python -c`` in the training Python: predictions file (a JSON list or JSON lines of records as
:func:`M3DTrainingLib.evaluate.evaluate_predictions` takes them), folder, file stem."""


def next_evaluation_stem(folder: PathLike, base: str = "metrics") -> str:
    """A stem whose .json and .png do not exist yet in ``folder`` (nothing is overwritten)."""
    folder = Path(folder)
    stem, n = base, 1
    while (folder / f"{stem}.json").exists() or (folder / f"{stem}.png").exists():
        n += 1
        stem = f"{base}-{n}"
    return stem


def evaluation_command(python: str, predictions: PathLike, folder: PathLike, stem: str) -> list[str]:
    return [python, "-c", EVALUATION_SCRIPT, str(predictions), str(folder), stem]


def parse_evaluation_output(text: str) -> Optional[dict[str, str]]:
    for line in reversed(text.splitlines()):
        if line.startswith("M3D-EVALUATION "):
            return json.loads(line[15:])
    return None


def latest_evaluation(output_folder: PathLike) -> Optional[Path]:
    """The newest ``metrics*.json`` in ``OUTPUT/evaluation`` (None: not evaluated yet)."""
    found = sorted((Path(output_folder) / EVALUATION_FOLDER).glob("metrics*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def evaluation_rows(results: dict[str, Any]) -> list[tuple[str, int, str, Optional[float]]]:
    """``(task, samples, metric, value)`` per task and metric, in the order of the results."""
    rows = []
    for task, entry in (results.get("tasks") or {}).items():
        for metric, value in (entry.get("metrics") or {}).items():
            rows.append((task, int(entry.get("n", 0)), metric, None if value is None else float(value)))
    return rows


def format_evaluation(results: dict[str, Any]) -> str:
    """The metrics per task as text, then the messages (metrics that could not be computed here, and why)."""
    lines = []
    for task, entry in (results.get("tasks") or {}).items():
        metrics = ", ".join(f"{name} {'n/a' if value is None else f'{value:.3f}'}"
                            for name, value in (entry.get("metrics") or {}).items())
        lines.append(f"{task} ({entry.get('n', 0)} samples): {metrics or 'no metric'}")
    lines += [f"Note: {m}" for m in results.get("messages") or []]
    return "\n".join(lines) if lines else "No predictions were evaluated."


def evaluation_table_node(scene: Any, results: dict[str, Any], source: PathLike) -> Any:
    """The metrics as a table node named after the results file (reused for the same file, else new)."""
    from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkIntArray, vtkStringArray

    source = str(Path(source))
    node = _our_node(scene, "vtkMRMLTableNode", "evaluation", source)
    if node is None:
        node = _new_node(scene, "vtkMRMLTableNode", f"M3D evaluation ({Path(source).stem})", "evaluation", source)
    rows = evaluation_rows(results)
    was_modifying = node.StartModify()
    try:
        node.RemoveAllColumns()
        columns = []
        for name, cls in (("task", vtkStringArray), ("samples", vtkIntArray), ("metric", vtkStringArray),
                          ("value", vtkDoubleArray)):
            column = cls()
            column.SetName(name)
            column.SetNumberOfValues(len(rows))
            node.AddColumn(column)
            columns.append(column)
        for i, (task, n, metric, value) in enumerate(rows):
            columns[0].SetValue(i, task)
            columns[1].SetValue(i, n)
            columns[2].SetValue(i, metric)
            columns[3].SetValue(i, math.nan if value is None else value)
        node.GetTable().Modified()
        node.Modified()
    finally:
        node.EndModify(was_modifying)
    return node


def finished_model(output_folder: PathLike) -> Optional[str]:
    """What M3DAssistant can use from a training output folder: "merged" (a full checkpoint), "adapter" (to be
    merged first) or None (not finished)."""
    folder = Path(output_folder)
    if (folder / "merged" / "config.json").is_file():
        return "merged"
    if any((folder / "adapter" / name).is_file() for name in ("adapter_config.json", "trainable.safetensors")):
        return "adapter"
    return None


def merge_command(python: str, output_folder: PathLike) -> list[str]:
    """``m3d merge OUTPUT OUTPUT/merged``: the full checkpoint in the official layout that M3DAssistant loads."""
    folder = Path(output_folder)
    return [python, "-m", "M3DAssistantLib.cli", "merge", str(folder), str(folder / "merged")]


# ----------------------------------------------------------------------------------------------------------------------
# What the panel shows of a job, and the helper processes it waits for
# ----------------------------------------------------------------------------------------------------------------------


class JobMonitor:
    """One job as the panel sees it: its progress read incrementally, its loss curve, its state.

    :param job: an :class:`M3DTrainingLib.jobs.Job` (started here or reconnected from its output folder)
    """

    RESUMABLE = ("cancelled", "interrupted", "failed")

    def __init__(self, job: Any):
        self.job = job
        self.tail = ProgressTail(job.progress_path)
        self.curve = LossCurve()
        self.last_event: Optional[dict] = None
        self.last_train_event: Optional[dict] = None
        self.final_status: Any = None  # the JobStatus once the job's process has ended

    def poll(self) -> tuple[list[dict], bool]:
        """``(new events, whether the loss curve changed)``; checks the process while it runs (or when new events
        come after it ended: a resume from elsewhere)."""
        events, restarted = self.tail.read_new()
        if restarted:
            self.curve = LossCurve()
            self.last_event = self.last_train_event = None
        for event in events:
            self.last_event = event
            if event.get("stage") == "train":
                self.last_train_event = event
        changed = self.curve.add(events) or restarted
        if self.final_status is None or events:
            try:
                alive = self.job.is_alive()
            except ImportError:  # psutil missing: a job of an earlier session cannot be checked
                alive = False
            self.final_status = None if alive else self.job.status()
        return events, changed

    @property
    def state(self) -> str:
        """"running", or the ended job's state ("completed", "failed", "cancelled", "interrupted")."""
        return "running" if self.final_status is None else self.final_status.state

    def can_resume(self) -> bool:
        return self.state in self.RESUMABLE and not (Path(self.job.output_dir) / "adapter").exists()

    def fraction(self) -> Optional[float]:
        if self.state == "completed":
            return 1.0
        event = self.last_train_event or self.last_event
        return None if not event or event.get("fraction") is None else float(event["fraction"])

    def status_text(self) -> str:
        """The state with the last message, then the metrics line of the last training step."""
        if self.state == "running":
            message = (self.last_event or {}).get("message") or "starting"
            head = f"Running (process {self.job.pid}): {message}"
        else:
            head = f"{self.state.capitalize()}: {self.final_status.message}"
        metrics = format_progress(self.last_train_event)
        return head + ("\n" + metrics if metrics else "")

    def cancelled(self, status: Any) -> None:
        self.poll()
        self.final_status = status

    def resumed(self) -> None:
        self.final_status = None


class HelperQueue:
    """Helper processes (anything with ``poll()`` returning None until done) and what to do with their results;
    :meth:`poll` runs on the caller's thread (the panel's timer), so callbacks may touch Qt and MRML."""

    def __init__(self) -> None:
        self._items: list[tuple[Any, Callable[[Any], Any], Optional[Callable[[Any], None]]]] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, helper: Any, finish: Callable[[Any], Any], callback: Optional[Callable[[Any], None]]) -> None:
        """``finish(result)`` turns the helper's result into a value (or raises); ``callback`` receives the value or
        the exception."""
        self._items.append((helper, finish, callback))

    def poll(self) -> None:
        for item in list(self._items):
            helper, finish, callback = item
            result = helper.poll()
            if result is None:
                continue
            self._items.remove(item)
            try:
                value = finish(result)
            except Exception as error:  # handed to the callback: the panel shows it
                value = error
            if callback is not None:
                callback(value)
            elif isinstance(value, Exception):
                log.error("%s", value)

    def cancel_all(self) -> None:
        for helper, _finish, _callback in self._items:
            cancel = getattr(helper, "cancel", None)
            if cancel is not None:
                cancel()
        self._items = []
