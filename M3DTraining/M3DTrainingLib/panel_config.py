"""The M3DTraining panel's choices as plain values (:class:`PanelState`) and what they make: a validated
:class:`~.config.TrainConfig`, checked against the dataset's tasks and against the chosen GPUs' memory.

The parameter node stores the choices as the labels shown in the panel; the dicts below map them to config values.
Nothing heavy is imported: the training modules run in other processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from M3DAssistantLib.errors import ConfigError, InputError
from M3DAssistantLib.tasks import TRAINING_NAMES
from M3DAssistantLib.units import format_bytes  # standard library only

from .config import DEFAULT_BASE_MODEL, PRESETS, TrainConfig, canonical_preset
from .gpus import GpuInfo, parse_gpu_selection
from .memory import DEFAULT_ESTIMATES, HEADROOM

PathLike = Union[str, os.PathLike]

# ----------------------------------------------------------------------------------------------------------------------
# Choices shown in the panel (stored in the scene as these strings) and what they mean for the trainer
# ----------------------------------------------------------------------------------------------------------------------

SOURCE_CURRENT_SCENE = "Current scene"
SOURCE_SCENE_FILES = "Scene files (.mrb, .mrml)"
SOURCE_CHOICES = [SOURCE_CURRENT_SCENE, SOURCE_SCENE_FILES]

PRESET_ONE_GPU = "One 24 GB GPU (LoRA + segmentation decoder)"
PRESET_OFFICIAL = "Official recipe (several GPUs with > 40 GB)"
PRESET_CHOICES = {PRESET_ONE_GPU: "one-24gb-gpu", PRESET_OFFICIAL: "official"}
"""Panel label -> :data:`M3DTrainingLib.config.PRESETS` key."""

STAGE_LORA = "Stage 2: LoRA fine-tuning"
STAGE_PROJECTOR = "Stage 1: projector only"
STAGE_CHOICES = {STAGE_LORA: "lora", STAGE_PROJECTOR: "projector"}

DEEPSPEED_OFF = "Off"
DEEPSPEED_CHOICES = {DEEPSPEED_OFF: 0, "ZeRO-2": 2, "ZeRO-3": 3}

TASKS = TRAINING_NAMES
"""The export's tasks (:data:`M3DTrainingLib.export.TASKS`), in its order: the registry's training names."""

TASK_PARAMETERS = {"task" + name.title().replace("_", ""): name for name in TASKS}
"""Parameter-node field -> task of the task mix (``taskVqaOpen`` -> ``vqa_open``)."""

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



def preset_panel_values(preset: str) -> dict[str, Any]:
    """The parameter-node hyperparameter values of a preset (key or panel label), from the trainer's presets."""
    values = PRESETS[canonical_preset(PRESET_CHOICES.get(preset, preset))]
    return {name: values[key] for name, key in PRESET_PARAMETERS.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Panel state -> training config
# ----------------------------------------------------------------------------------------------------------------------


def train_config_values(state: PanelState) -> dict[str, Any]:
    """The ``TrainConfig`` keys that the panel sets (the preset fills the rest)."""
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


def build_train_config(state: PanelState) -> TrainConfig:
    """A validated :class:`M3DTrainingLib.config.TrainConfig` from the panel (raises ``ConfigError`` with the fix)."""
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
# Does it fit the chosen GPUs?
# ----------------------------------------------------------------------------------------------------------------------



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
                f"GPU {index} ({gpu.name}) has {format_bytes(gpu.memory_bytes)}, but this training needs about "
                f"{format_bytes(required_bytes)} per GPU ({source}): choose the \"{PRESET_ONE_GPU}\" preset, a smaller "
                "batch with more gradient accumulation, gradient checkpointing, or several GPUs with DeepSpeed ZeRO.")
    return warnings
