"""The configuration of a training run: :class:`TrainConfig`, its presets, and the names of what a run writes.

Like transformers' ``configuration_*.py`` files, this module knows nothing of the model or the trainer: it imports
neither torch nor :mod:`.train`, :mod:`.jobs` or any other module of this package, so the panel, the job launcher,
the trainer and the merge share one definition of the config and of the run folder.

The run folder (``output_dir``) holds::

    train_config.yaml            CONFIG_FILE       the config as trained (paths absolute)
    job.json                     STATE_FILE        the job's command, pid, launches, cancel flag (:mod:`.jobs`)
    progress.jsonl               PROGRESS_FILE     one progress event per line (:mod:`.progress_log`)
    train.log                    LOG_FILE          stdout and stderr of every launch
    run.lock                     LOCK_FILE         held by the trainer: one run per folder (:mod:`.run_lock`)
    checkpoints/step-0000200/    CHECKPOINTS_DIR   every ``save_steps``, with a manifest (:mod:`.checkpoints`)
    adapter/                     ADAPTER_DIR       the result: PEFT adapter (ADAPTER_CONFIG_FILE + its weights), the
                                                   fully trained weights (TRAINABLE_FILE) and CONFIG_FILE
    merged/                      MERGED_DIR        the panel's ``m3d merge`` output, a full checkpoint (:mod:`.merge`)
    evaluation/                  EVALUATION_DIR    the panel's metrics*.json / *.png (:mod:`.evaluation_job`)

Why one flat config rather than nested sub-configs (as ``LlavaConfig`` nests its vision and text configs): the keys
are the public format of ``train_config.yaml`` -- what users write, what ``--set KEY=VALUE`` overrides and what
every finished adapter carries for ``m3d merge`` to read back -- and a flat mapping, as transformers'
``TrainingArguments`` and accelerate's config, keeps every existing file valid. The fields are documented in groups.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

from M3DAssistantLib.errors import ConfigError

# ----------------------------------------------------------------------------------------------------- run folder
CONFIG_FILE = "train_config.yaml"
STATE_FILE = "job.json"
PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "train.log"
LOCK_FILE = "run.lock"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's name
TRAINABLE_FILE = "trainable.safetensors"
MERGED_DIR = "merged"
EVALUATION_DIR = "evaluation"


def checkpoint_dir_name(step: int) -> str:
    """``step-0000200``: the folder of the checkpoint after ``step`` optimizer steps (sorts by step)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a checkpoint folder name, None for any other name (a partial ``.tmp-step-…`` one)."""
    digits = name[len(CHECKPOINT_PREFIX):]
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


# ---------------------------------------------------------------------------------------------- parts and presets
DEFAULT_BASE_MODEL = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"  # the model the presets and their memory figures are for

# Module names that hold the multimodal parts, the embeddings and the head: never LoRA targets (official rule).
NON_LLM_PARTS = ("vision_tower", "mm_projector", "embed_tokens", "lm_head", "seg_projector", "seg_module")

# Parts that can be trained fully (not LoRA), by name -> module-name prefixes in the LaMed model.
TRAINABLE_PARTS: dict[str, tuple[str, ...]] = {
    "vision_tower": ("model.vision_tower.",),
    "mm_projector": ("model.mm_projector.",),
    "embed_tokens": ("model.embed_tokens.",),
    "lm_head": ("lm_head.",),
    "seg_projector": ("model.seg_projector.",),
    "seg_module": ("model.seg_module.",),
    "seg_encoder": ("model.seg_module.image_encoder.",),
    "seg_decoder": ("model.seg_module.prompt_encoder.", "model.seg_module.mask_decoder."),
}
OFFICIAL_PARTS = {
    "projector": ("mm_projector", "embed_tokens"),
    "lora": ("vision_tower", "mm_projector", "embed_tokens", "lm_head", "seg_projector", "seg_module"),
}

PRESETS: dict[str, dict[str, Any]] = {
    # Everything the official stage-2 script trains; the official runs used 8 GPUs (DeepSpeed, bf16).
    "official": {
        "stage": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "trainable_parts": list(OFFICIAL_PARTS["lora"]),
        "learning_rate": 5e-5,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.03,
        "num_epochs": 5,
        "per_device_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,
        "mixed_precision": "auto",
    },
    # One consumer GPU: LoRA + projector + [SEG] projector + SegVol decoder; both image encoders frozen;
    # gradient checkpointing, bf16 weights for the frozen parts; effective batch 8 through accumulation.
    "one-24gb-gpu": {
        "stage": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "trainable_parts": ["mm_projector", "seg_projector", "seg_decoder"],
        "learning_rate": 5e-5,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.03,
        "num_epochs": 5,
        "per_device_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
    },
}
PRESET_ALIASES = {"one 24 gb gpu": "one-24gb-gpu", "one-24-gb-gpu": "one-24gb-gpu", "24gb": "one-24gb-gpu"}


# ---------------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class TrainConfig:
    """A training run. Load from YAML with :meth:`from_yaml`; ``preset`` fills defaults, explicit keys win.

    Data:
        dataset: dataset folder (written by :mod:`.export`).
        split / augment: passed to the dataset.
        dataset_factory: "module:attribute" of the dataset class; the dataset is built as
            ``factory(dataset, tokenizer, num_image_tokens, split=, augment=, seed=, **dataset_kwargs)``.
        collate_fn: "module:attribute" of the collator; None = the dataset's own ``collate`` method.
        dataset_kwargs: extra keyword arguments for the dataset (the panel's task mix: ``{"tasks": [...]}``).
        num_workers: DataLoader workers (0: exact resume also for datasets that draw from the global RNG).

    Model and what trains:
        base_model: HF hub id or local folder of an M3D-LaMed checkpoint (official layout).
        preset: "official" or "one-24gb-gpu" (see :data:`PRESETS`); None = the dataclass defaults.
        stage: "projector" (official stage 1) or "lora" (official stage 2).
        lora_r / lora_alpha / lora_dropout: LoRA hyperparameters (official 16 / 32 / 0.05).
        lora_target_modules: module names or suffixes to wrap with LoRA; None = every ``nn.Linear`` of the language
            model (names without vision_tower / mm_projector / embed_tokens / lm_head / seg_projector / seg_module).
        trainable_parts: parts trained fully (keys of :data:`TRAINABLE_PARTS`); None = the stage's official set.
        disable_dropout: set every dropout to 0 (for exact comparisons between runs of different layouts).

    Optimisation:
        learning_rate / weight_decay / lr_scheduler / warmup_ratio: AdamW and a transformers scheduler
            ("cosine", "linear", "constant_with_warmup", ...); warmup steps = ceil(ratio x total steps).
        num_epochs: passes over the dataset (ignored when ``max_steps`` > 0).
        per_device_batch_size / gradient_accumulation_steps: effective batch = batch x accumulation x processes.
        max_steps: stop after this many optimizer steps (> 0), else ``num_epochs``.
        max_grad_norm: gradient clipping (0 = none).
        seed: model init (LoRA), data order, dropout.

    Precision and memory:
        mixed_precision: "auto" (bf16 on a CUDA GPU that supports it, fp32 on CPU), "bf16", "fp16" or "no".
            With bf16 the frozen weights are held in bf16 and the trained ones in fp32.
        gradient_checkpointing: recompute activations of the LLM layers and of trained ViT blocks in backward.

    Output and checkpoints:
        output_dir: the run folder (see the module docstring): checkpoints, the adapter, ``progress.jsonl``, logs.
        save_steps / save_total_limit: checkpoint every N optimizer steps, keep the newest K.
        logging_steps: a progress event every N optimizer steps.
        resume: continue from the newest checkpoint in ``output_dir/checkpoints`` when there is one.

    Processes:
        num_processes: processes that :mod:`.jobs` launches through ``accelerate launch`` (one per GPU).
        accelerate_config: an ``accelerate config`` file for the launch (multi-node, DeepSpeed, GPU ids).
        deepspeed_stage: 0 = no DeepSpeed; 2 or 3 = ZeRO stage (falls back to DDP when DeepSpeed is missing).
        device: "auto" (CUDA when available) or "cpu".

    Example:

    >>> from M3DTrainingLib.config import TrainConfig
    >>> config = TrainConfig.from_dict({"preset": "one 24 GB GPU", "dataset": "data/liver",
    ...                                 "output_dir": "runs/liver-v1", "num_epochs": 3})
    >>> config.preset, config.stage, config.per_device_batch_size, config.gradient_accumulation_steps
    ('one-24gb-gpu', 'lora', 2, 4)
    >>> config.num_epochs, config.lora_r, config.mixed_precision
    (3, 16, 'bf16')
    >>> config.parts  # trained fully; LoRA covers the language model's linear layers
    ['mm_projector', 'seg_projector', 'seg_decoder']
    >>> TrainConfig.from_dict({**config.to_dict(), "stage": "projector", "trainable_parts": None}).parts
    ['mm_projector', 'embed_tokens']
    >>> TrainConfig.from_dict({"dataset": "data/liver", "output_dir": "runs/x", "lora_rank": 8})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    M3DAssistantLib.errors.ConfigError: training config: unknown key(s) lora_rank; valid keys: accelerate_config, ...
    """

    base_model: str = DEFAULT_BASE_MODEL
    dataset: str = ""
    output_dir: str = ""
    preset: Optional[str] = None
    stage: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: Optional[list[str]] = None
    trainable_parts: Optional[list[str]] = None
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    num_epochs: float = 5.0
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    save_steps: int = 1000
    save_total_limit: int = 2
    logging_steps: int = 1
    num_workers: int = 0
    split: str = "train"
    augment: bool = True
    dataset_factory: str = "M3DTrainingLib.data:M3DDataset"
    collate_fn: Optional[str] = None
    dataset_kwargs: dict = dataclasses.field(default_factory=dict)
    num_processes: int = 1
    accelerate_config: Optional[str] = None
    deepspeed_stage: int = 0
    device: str = "auto"
    disable_dropout: bool = False
    resume: bool = True

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, values: dict, source: str = "training config") -> "TrainConfig":
        """Defaults < preset < ``values``. Unknown keys are an error that lists the valid ones."""
        values = dict(values or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: "
                              f"{', '.join(sorted(fields))}.")
        merged: dict[str, Any] = {}
        preset = values.get("preset")
        if preset is not None:
            preset = canonical_preset(preset, source)
            merged.update(PRESETS[preset])
            values["preset"] = preset
        merged.update(values)
        config = cls(**merged)
        config.validate(source)
        return config

    @classmethod
    def from_yaml(cls, path: "str | Path", overrides: Sequence[str] = ()) -> "TrainConfig":
        """Read a YAML file; ``overrides`` are ``KEY=VALUE`` strings (VALUE parsed as YAML)."""
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e}).") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e}).") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: must be a mapping of keys to values (see M3DTrainingLib.config.TrainConfig).")
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set max_steps=100.")
            values[key.strip()] = yaml.safe_load(raw)
        # relative paths in the file are relative to the file, as a user writing it expects
        for key in ("dataset", "output_dir", "accelerate_config"):
            value = values.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                values[key] = str((path.parent / value).resolve())
        base = values.get("base_model")
        if isinstance(base, str) and base.startswith((".", "~")):
            values["base_model"] = str((path.parent / Path(base).expanduser()).resolve())
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> "TrainConfig":
        """A copy whose local paths are absolute, so the config works from any working directory (a job's)."""
        changes: dict[str, Any] = {}
        for key in ("dataset", "output_dir", "accelerate_config"):
            value = getattr(self, key)
            if value:
                changes[key] = str(Path(value).expanduser().resolve())
        if Path(self.base_model).expanduser().exists():  # a local folder, not a hub id
            changes["base_model"] = str(Path(self.base_model).expanduser().resolve())
        return dataclasses.replace(self, **changes)

    def to_yaml(self, path: "str | Path") -> Path:
        import yaml

        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path

    # ---------------------------------------------------------------------------------------------- checking
    def validate(self, source: str = "training config") -> None:
        def bad(message: str) -> ConfigError:
            return ConfigError(f"{source}: {message}")

        if not self.dataset:
            raise bad("'dataset' is missing; set it to the dataset folder written by the M3DTraining export.")
        if not self.output_dir:
            raise bad("'output_dir' is missing; set it to a new folder for checkpoints and the adapter.")
        if self.stage not in OFFICIAL_PARTS:
            raise bad(f"stage {self.stage!r} is not one of 'projector' (official stage 1), 'lora' (stage 2).")
        unknown = sorted(set(self.parts) - set(TRAINABLE_PARTS))
        if unknown:
            raise bad(f"trainable_parts {unknown} unknown; choose from {sorted(TRAINABLE_PARTS)}.")
        if self.stage == "lora":
            if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
                raise bad("lora_r must be >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1.")
            for target in self.lora_target_modules or ():
                if any(part in target for part in NON_LLM_PARTS if part in self.parts):
                    raise bad(f"lora_target_modules entry {target!r} lies in a fully trained part; drop one of them.")
        positive = ("per_device_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps",
                    "save_total_limit")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise bad(f"{name} must be >= 1.")
        if self.learning_rate <= 0:
            raise bad("learning_rate must be > 0.")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise bad("set num_epochs > 0 or max_steps > 0.")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio must be in [0, 1).")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise bad(f"mixed_precision {self.mixed_precision!r}: use auto, bf16, fp16 or no.")
        if self.deepspeed_stage not in (0, 1, 2, 3):
            raise bad("deepspeed_stage must be 0 (off), 1, 2 or 3.")
        if self.device not in ("auto", "cpu"):
            raise bad("device must be 'auto' (CUDA when available) or 'cpu'.")
        if self.num_processes < 1:
            raise bad("num_processes must be >= 1.")
        for name in ("dataset_factory", "collate_fn"):
            if getattr(self, name) is not None and ":" not in getattr(self, name):
                raise bad(f"{name} must look like 'package.module:attribute'.")

    @property
    def parts(self) -> list[str]:
        """The fully trained parts (the stage's official set when not given)."""
        return list(self.trainable_parts if self.trainable_parts is not None else OFFICIAL_PARTS[self.stage])

    @property
    def trainable_prefixes(self) -> tuple[str, ...]:
        return tuple(p for part in self.parts for p in TRAINABLE_PARTS[part])


def canonical_preset(name: str, source: str = "training config") -> str:
    """The :data:`PRESETS` key of ``name`` (a key or an alias, any case); ``ConfigError`` listing them else."""
    key = str(name).strip().lower()
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise ConfigError(f"{source}: preset {name!r} unknown; use one of {sorted(PRESETS)}.")
    return key
