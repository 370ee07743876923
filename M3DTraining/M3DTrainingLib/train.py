"""Fine-tuning M3D-LaMed as the official recipe does (``m3d-official.md`` §7), on Hugging Face accelerate.

* Stage ``projector`` (official stage 1): the projector and the input embeddings are trained, nothing else.
* Stage ``lora`` (official stage 2): LoRA (r=16, alpha=32, dropout 0.05) on every ``nn.Linear`` of the language
  model, and the vision tower, projector, embeddings, LM head and segmentation parts trained fully.
* Loss: the model's own :meth:`~M3DAssistantLib.model.modeling_lamed.LamedMixin.training_loss` (LM cross-entropy +
  Dice + BCE on the samples that have a mask) — one model implementation for inference and training.
* Distribution is accelerate's: ``python -m M3DTrainingLib.train CONFIG.yaml`` runs one process;
  ``accelerate launch [--config_file F] -m M3DTrainingLib.train CONFIG.yaml`` runs 1..N GPUs, several machines or
  DeepSpeed ZeRO (``deepspeed_stage`` in the config, or the accelerate config). :mod:`.jobs` builds these commands.
* Checkpoints every ``save_steps`` with ``accelerator.save_state`` (trainable weights, optimizer, scheduler, RNG
  states, data position), written atomically; a killed run restarted with the same config resumes at the same step
  and reproduces the same loss curve.
* Output ``OUTPUT_DIR/adapter/``: the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``), the
  trained non-LoRA weights under their official names (``trainable.safetensors``) and ``train_config.yaml``.
  :func:`merge` turns it into a full checkpoint in the official layout.
* Progress: :class:`TrainingProgressEvent` (a :class:`~M3DAssistantLib.progress.ProgressEvent` with metrics) to a
  callback; the run also appends every event to ``OUTPUT_DIR/progress.jsonl`` (read by :mod:`.jobs` and the module).

Heavy imports (torch, transformers, peft, accelerate) happen inside the functions, so ``m3d --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from M3DAssistantLib.errors import CheckpointError, ConfigError, M3DError
from M3DAssistantLib.progress import ProgressCallback, ProgressEvent
from M3DAssistantLib.outputs import ordinary_permissions

logger = logging.getLogger(__name__)

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

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
PROGRESS_FILE = "progress.jsonl"
CONFIG_FILE = "train_config.yaml"
TRAINABLE_FILE = "trainable.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


# ------------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class TrainConfig:
    """A training run. Load from YAML with :meth:`from_yaml`; ``preset`` fills defaults, explicit keys win.

    Attributes:
        base_model: HF hub id or local folder of an M3D-LaMed checkpoint (official layout).
        dataset: dataset folder (written by :mod:`.export`).
        output_dir: where checkpoints, the adapter, ``progress.jsonl`` and logs go.
        preset: "official" or "one-24gb-gpu" (see :data:`PRESETS`); None = the dataclass defaults.
        stage: "projector" (official stage 1) or "lora" (official stage 2).
        lora_r / lora_alpha / lora_dropout: LoRA hyperparameters (official 16 / 32 / 0.05).
        lora_target_modules: module names or suffixes to wrap with LoRA; None = every ``nn.Linear`` of the language
            model (names without vision_tower / mm_projector / embed_tokens / lm_head / seg_projector / seg_module).
        trainable_parts: parts trained fully (keys of :data:`TRAINABLE_PARTS`); None = the stage's official set.
        learning_rate / weight_decay / lr_scheduler / warmup_ratio: AdamW and a transformers scheduler
            ("cosine", "linear", "constant_with_warmup", ...); warmup steps = ceil(ratio x total steps).
        num_epochs: passes over the dataset (ignored when ``max_steps`` > 0).
        per_device_batch_size / gradient_accumulation_steps: effective batch = batch x accumulation x processes.
        max_steps: stop after this many optimizer steps (> 0), else ``num_epochs``.
        max_grad_norm: gradient clipping (0 = none).
        seed: model init (LoRA), data order, dropout.
        mixed_precision: "auto" (bf16 on a CUDA GPU that supports it, fp32 on CPU), "bf16", "fp16" or "no".
            With bf16 the frozen weights are held in bf16 and the trained ones in fp32.
        gradient_checkpointing: recompute activations of the LLM layers and of trained ViT blocks in backward.
        save_steps / save_total_limit: checkpoint every N optimizer steps, keep the newest K.
        logging_steps: a progress event every N optimizer steps.
        num_workers: DataLoader workers (0: exact resume also for datasets that draw from the global RNG).
        split / augment: passed to the dataset.
        dataset_factory: "module:attribute" of the dataset class; the dataset is built as
            ``factory(dataset, tokenizer, num_image_tokens, split=, augment=, seed=, **dataset_kwargs)``.
        collate_fn: "module:attribute" of the collator; None = the dataset's own ``collate`` method.
        dataset_kwargs: extra keyword arguments for the dataset.
        num_processes: processes that :mod:`.jobs` launches through ``accelerate launch`` (one per GPU).
        accelerate_config: an ``accelerate config`` file for the launch (multi-node, DeepSpeed, GPU ids).
        deepspeed_stage: 0 = no DeepSpeed; 2 or 3 = ZeRO stage (falls back to DDP when DeepSpeed is missing).
        device: "auto" (CUDA when available) or "cpu".
        disable_dropout: set every dropout to 0 (for exact comparisons between runs of different layouts).
        resume: continue from the newest checkpoint in ``output_dir/checkpoints`` when there is one.
    """

    base_model: str = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"
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
            raise ConfigError(f"{path}: must be a mapping of keys to values (see M3DTrainingLib.train.TrainConfig).")
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
    key = str(name).strip().lower()
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise ConfigError(f"{source}: preset {name!r} unknown; use one of {sorted(PRESETS)}.")
    return key


# ------------------------------------------------------------------------------------------- progress events
@dataclasses.dataclass(frozen=True)
class TrainingProgressEvent(ProgressEvent):
    """A :class:`ProgressEvent` with the training metrics; one JSON line of ``progress.jsonl`` each.

    ``stage`` is "estimate", "start", "train", "checkpoint", "save", "done" or "error".
    """

    step: Optional[int] = None
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    loss: Optional[float] = None
    lm_loss: Optional[float] = None
    dice_loss: Optional[float] = None
    bce_loss: Optional[float] = None
    lr: Optional[float] = None
    samples_per_s: Optional[float] = None
    eta_s: Optional[float] = None
    gpu_memory_bytes: Optional[int] = None
    time: float = dataclasses.field(default_factory=time.time)
    details: Optional[dict] = None


# ----------------------------------------------------------------------------------------- model preparation
def official_lora_targets(model) -> list[str]:
    """Full names of every ``nn.Linear`` of the language model (the official ``find_all_linear_names``)."""
    from torch import nn

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(part in name for part in NON_LLM_PARTS)
    ]


def _wrap_blocks_with_checkpointing(blocks) -> None:
    """Recompute each ViT block's activations in backward (non-reentrant torch.utils.checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_m3d_checkpointed", False):
            continue
        plain_forward = block.forward

        def forward(x, _plain=plain_forward, _block=block):
            import torch

            if _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, x, use_reentrant=False)
            return _plain(x)

        block.forward = forward
        block._m3d_checkpointed = True


def enable_gradient_checkpointing(model) -> None:
    """Gradient checkpointing for the LLM layers (transformers' own) and the 3D ViT blocks."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x spelling
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _wrap_blocks_with_checkpointing(model.model.vision_tower.vision_tower.blocks)
    if getattr(model, "seg_enabled", False):
        _wrap_blocks_with_checkpointing(model.model.seg_module.image_encoder.blocks)


def official_name(name: str) -> str:
    """A parameter name of the training module -> its name in the official checkpoint layout."""
    for prefix in ("module.", "model.base_model.model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            if prefix == "module.":
                continue
            break
    return name


def _training_module_class():
    import torch
    from torch import nn

    class LamedTrainingModule(nn.Module):
        """What accelerate wraps: ``forward(batch) -> (loss, parts)`` through the model's ``training_loss``.

        ``self.model`` is the LaMed model, or its PEFT wrapper in stage "lora". Going through ``forward`` lets
        DDP/DeepSpeed see the step.
        """

        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        @property
        def lamed(self) -> nn.Module:
            return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

        def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor, segs: Optional[torch.Tensor] = None):
            return self.lamed.training_loss(images, input_ids, attention_mask=attention_mask, labels=labels,
                                            segs=segs)

    return LamedTrainingModule


def prepare_model(config: TrainConfig, model):
    """LoRA and trainable parts as ``config`` says, on a loaded LaMed model. Returns the training module.

    The frozen weights keep their dtype (bf16 under bf16 mixed precision); trained weights are fp32.
    """
    import torch
    from torch import nn

    model.train()
    model.requires_grad_(False)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    wrapped = model
    if config.stage == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(config.lora_target_modules or official_lora_targets(model))
        lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        wrapped = get_peft_model(model, lora_config)  # freezes everything but LoRA
    module = _training_module_class()(wrapped)
    prefixes = config.trainable_prefixes
    for name, param in module.named_parameters():
        if official_name(name).startswith(prefixes):
            param.requires_grad_(True)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if config.disable_dropout:
        for sub in module.modules():
            if isinstance(sub, nn.Dropout):
                sub.p = 0.0
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError("nothing to train: the stage and trainable_parts select no parameters.")
    return module


def trainable_state_dict(module) -> dict:
    """The trained non-LoRA weights under their official names."""
    return {
        official_name(n): p.detach()
        for n, p in module.named_parameters()
        if p.requires_grad and "lora_" not in n
    }


# ----------------------------------------------------------------------------------------------- memory estimate
@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Memory one device needs for a training step (estimated, not measured; ``benchmarks/train_step.py`` measures).

    weights: every parameter (frozen ones at their training dtype); gradients and Adam states (two fp32 moments)
    of the trained ones; activations kept for backward (LLM layers at ``tokens`` tokens, trained ViTs, SegVol
    decoder), following Korthikanti et al. 2022 with memory-efficient attention (no seq^2 term).
    """

    total_params: int
    trainable_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    tokens: int
    batch: int
    dtype: str
    gradient_checkpointing: bool
    processes: int
    deepspeed_stage: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_bytes"] = self.total_bytes
        return d

    def format(self) -> str:
        gb = 1024**3
        zero = f", ZeRO-{self.deepspeed_stage} over {self.processes} processes" if self.deepspeed_stage else ""
        lines = [
            f"Memory estimate per device ({self.dtype}, batch {self.batch} x {self.tokens} tokens, gradient "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}{zero}):",
            f"  weights       {self.weights_bytes / gb:7.2f} GB  ({self.total_params / 1e9:.2f} B parameters)",
            f"  gradients     {self.gradients_bytes / gb:7.2f} GB  ({self.trainable_params / 1e6:.1f} M trained)",
            f"  Adam states   {self.optimizer_bytes / gb:7.2f} GB",
            f"  activations   {self.activations_bytes / gb:7.2f} GB  (estimate)",
            f"  total         {self.total_bytes / gb:7.2f} GB",
        ]
        return "\n".join(lines)


def _layer_activation_bytes(tokens: int, hidden: int, batch: int, bytes_per: int) -> int:
    """One transformer layer's saved activations: 34·s·b·h bytes at 16 bit (Korthikanti et al. 2022, no seq^2
    term with flash / memory-efficient attention), scaled to ``bytes_per``."""
    return int(34 * tokens * batch * hidden * bytes_per / 2)


def _stack_activation_bytes(tokens, hidden, layers, batch, bytes_per, checkpointing) -> int:
    if checkpointing:  # layer inputs kept, one layer recomputed at a time
        return layers * tokens * batch * hidden * bytes_per + _layer_activation_bytes(tokens, hidden, batch, bytes_per)
    return layers * _layer_activation_bytes(tokens, hidden, batch, bytes_per)


def resolve_mixed_precision(config: TrainConfig, cuda: Optional[bool] = None) -> str:
    """"bf16" / "fp16" / "no": ``auto`` is bf16 on a bf16-capable CUDA GPU, "no" (fp32) else."""
    if cuda is None:
        import torch

        cuda = config.device != "cpu" and torch.cuda.is_available()
    if config.mixed_precision != "auto":
        return config.mixed_precision if cuda or config.mixed_precision != "fp16" else "no"
    if not cuda:
        return "no"
    import torch

    if not torch.cuda.is_available():  # estimating for a GPU from a machine without one: assume a current GPU
        return "bf16"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def estimate_memory(config: TrainConfig, lamed_config=None, *, cuda: bool = True, tokens: int = 512,
                    processes: Optional[int] = None, mixed_precision: Optional[str] = None) -> MemoryEstimate:
    """Estimate per-device memory of ``config`` for a GPU run (``cuda=True``) or this machine's run.

    ``lamed_config`` is the base checkpoint's parsed config (read from ``config.base_model`` when None; a hub id
    fetches only its JSON files). The model is built on the meta device: no weights are read. ``mixed_precision``
    ("bf16", "fp16", "no") overrides what the config resolves to.
    """
    import torch

    from M3DAssistantLib.model.configuration_lamed import parse_lamed_config, read_config_json
    from M3DAssistantLib.model.hub import resolve_checkpoint
    from M3DAssistantLib.model.modeling_lamed import build_lamed_model

    if lamed_config is None:
        folder = resolve_checkpoint(config.base_model, metadata_only=True)
        lamed_config = parse_lamed_config(read_config_json(folder), source=str(folder / "config.json"))
    with torch.device("meta"):
        model = build_lamed_model(lamed_config)
    mp = mixed_precision or resolve_mixed_precision(config, cuda=cuda)
    frozen_bytes = 2 if mp in ("bf16", "fp16") else 4
    act_bytes = frozen_bytes
    prefixes = config.trainable_prefixes
    total = trainable = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if name.startswith(prefixes):
            trainable += param.numel()
    if config.stage == "lora":
        targets = config.lora_target_modules
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            chosen = (any(name == t or name.endswith("." + t) for t in targets) if targets
                      else not any(part in name for part in NON_LLM_PARTS))
            if chosen:
                lora = config.lora_r * (module.in_features + module.out_features)
                trainable += lora
                total += lora
    n = processes or config.num_processes
    zero = config.deepspeed_stage if n > 1 else 0
    weights = (total - trainable) * frozen_bytes + trainable * 4
    grads = trainable * 4
    optimizer = trainable * 8
    if zero >= 1:
        optimizer //= n
    if zero >= 2:
        grads //= n
    if zero >= 3:
        weights //= n

    text = lamed_config.text_config
    mm = lamed_config.multimodal
    batch = config.per_device_batch_size
    ckpt = config.gradient_checkpointing
    # LLM: activations are needed whenever anything before or inside it is trained (always, in practice)
    acts = _stack_activation_bytes(tokens, text.hidden_size, text.num_hidden_layers, batch, act_bytes, ckpt)
    acts += batch * tokens * text.vocab_size * (act_bytes + 4 + 4)  # logits, fp32 upcast for the loss, its grad
    vit_tokens = math.prod(mm.patch_grid) + 1
    if "vision_tower" in config.parts:
        acts += _stack_activation_bytes(vit_tokens, mm.mm_hidden_size, mm.vision_num_layers, batch, act_bytes, ckpt)
    if mm.segmentation_module is not None:
        if {"seg_module", "seg_encoder"} & set(config.parts):
            acts += _stack_activation_bytes(vit_tokens, mm.mm_hidden_size, mm.seg_num_layers, batch, act_bytes,
                                            ckpt)
        # decoder: upscaled features (C/4 at 2x, C/8 at 4x, ~3 saved tensors each) and full-size logits in fp32
        voxels = math.prod(mm.patch_grid)
        acts += batch * voxels * mm.mm_hidden_size * (8 * 3 // 4 + 64 * 3 // 8) * act_bytes
        acts += batch * math.prod(mm.image_size) * 4 * 6
    return MemoryEstimate(
        total_params=total,
        trainable_params=trainable,
        weights_bytes=int(weights),
        gradients_bytes=int(grads),
        optimizer_bytes=int(optimizer),
        activations_bytes=int(acts),
        tokens=tokens,
        batch=batch,
        dtype={"bf16": "bf16 weights (trained in fp32)", "fp16": "fp16", "no": "fp32"}[mp],
        gradient_checkpointing=ckpt,
        processes=n,
        deepspeed_stage=zero,
    )


# ------------------------------------------------------------------------------------------------- checkpoints
class TrainState:
    """Where the run is; saved with every checkpoint (accelerate ``register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of this epoch already consumed (per process)

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])


def _step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(output_dir: "str | Path") -> list[Path]:
    """Complete checkpoints of a run, oldest first (partial ones, from a kill during saving, are ignored)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(output_dir: "str | Path") -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _save_checkpoint(accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed when every process has written its part."""
    root = output_dir / CHECKPOINTS_DIR
    final = root / _step_dir_name(step)
    tmp = root / f".tmp-{_step_dir_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True, **_state_kwargs(accelerator, "save"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ordinary_permissions(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _state_kwargs(accelerator, action: str) -> dict:
    """Checkpoints hold the trained weights only: DeepSpeed is told so by its own options, DDP/single process by
    the hooks of :func:`_register_checkpoint_hooks` (load non-strictly, the hook checks the key set)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"exclude_frozen_parameters": True} if action == "save" else {"load_module_strict": False}
    return {} if action == "save" else {"strict": False}


def _register_checkpoint_hooks(accelerator, trainable_names: set[str]) -> None:
    """Checkpoints hold only the trained weights (not the frozen multi-GB base); loading checks that set."""

    def keep_trainable(models, weights, output_dir):
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k.removeprefix("module.") in trainable_names}

    def check_saved_keys(models, input_dir):
        from safetensors import safe_open

        if not models:  # DeepSpeed loads its own checkpoint format
            return
        path = Path(input_dir) / "model.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{input_dir}: no model.safetensors; the checkpoint is incomplete. Delete it.")
        with safe_open(str(path), "pt") as f:
            saved = {k.removeprefix("module.") for k in f.keys()}
        if saved != trainable_names:
            raise CheckpointError(
                f"{input_dir}: the checkpoint's trained weights ({len(saved)}) do not match this run's "
                f"({len(trainable_names)}); the config changed since it was written. Use the original config or a "
                "new output_dir."
            )

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(check_saved_keys)


# --------------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float]
    resumed_from: Optional[int]


def _import_object(spec: str, what: str):
    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what} {spec!r} cannot be imported ({type(e).__name__}: {e}).") from e


def build_dataset(config: TrainConfig, tokenizer, num_image_tokens: int):
    factory = _import_object(config.dataset_factory, "dataset_factory")
    dataset = factory(config.dataset, tokenizer, num_image_tokens, split=config.split, augment=config.augment,
                      seed=config.seed, **config.dataset_kwargs)
    if len(dataset) == 0:
        raise ConfigError(f"{config.dataset}: the {config.split!r} split has no samples.")
    if config.collate_fn is not None:
        collate = _import_object(config.collate_fn, "collate_fn")
    elif callable(getattr(dataset, "collate", None)):
        collate = dataset.collate  # pads with the tokenizer's pad id
    else:
        raise ConfigError(f"{config.dataset_factory} has no collate method; set collate_fn: 'module:function'.")
    return dataset, collate


def _make_accelerator(config: TrainConfig, find_unused: bool):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs

    cpu = config.device == "cpu" or not torch.cuda.is_available()
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=find_unused)]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not cpu and torch.distributed.is_available() and not torch.distributed.is_nccl_available():
        logger.warning("NCCL is not available in this PyTorch (Windows?); using the gloo backend between GPUs, "
                       "which is slower. On Linux, install a CUDA build of PyTorch for NCCL.")
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    deepspeed_plugin = None
    if config.deepspeed_stage and not os.environ.get("ACCELERATE_USE_DEEPSPEED"):
        from accelerate.utils import is_deepspeed_available

        if cpu or not is_deepspeed_available():
            why = ("there is no CUDA GPU" if cpu
                   else "the deepspeed package is not installed (it does not support Windows)")
            logger.warning("deepspeed_stage=%d asked for but %s; training with plain DDP instead (more memory per "
                           "GPU, see the estimate).", config.deepspeed_stage, why)
        else:
            from accelerate.utils import DeepSpeedPlugin

            deepspeed_plugin = DeepSpeedPlugin(
                zero_stage=config.deepspeed_stage,
                gradient_accumulation_steps=config.gradient_accumulation_steps,
                gradient_clipping=config.max_grad_norm or None,
                # ZeRO-3 must gather the partitioned weights into full tensors when saving (official issue #59)
                zero3_save_16bit_model=True,
            )
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(config, cuda=not cpu),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        kwargs_handlers=handlers,
        deepspeed_plugin=deepspeed_plugin,
        step_scheduler_with_optimizer=False,
    )


def _loss_vector(loss, parts: dict):
    """[loss, lm, dice, bce, has_seg] of one micro-batch: the same shape on every process (one all-reduce, even
    when only some processes had samples with masks)."""
    import torch

    has_seg = "dice" in parts
    zero = torch.zeros((), device=loss.device)
    values = [loss.detach(), parts.get("lm", zero), parts.get("dice", zero), parts.get("bce", zero)]
    return torch.stack([v.detach().float().reshape(()) for v in values] + [zero + float(has_seg)])


def _mean_losses(accelerator, window: list) -> dict[str, Optional[float]]:
    """Mean over the micro-batches of a step and over processes; dice/bce over the micro-batches that had masks."""
    import torch

    summed = accelerator.reduce(torch.stack(window).sum(dim=0), "sum").tolist()
    count = len(window) * accelerator.num_processes
    seg_count = summed[4]
    return {
        "loss": summed[0] / count,
        "lm": summed[1] / count,
        "dice": summed[2] / seg_count if seg_count else None,
        "bce": summed[3] / seg_count if seg_count else None,
    }


def _gpu_memory(accelerator) -> Optional[int]:
    import torch

    if accelerator.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(accelerator.device))
    return None


def train(config: TrainConfig, progress: Optional[ProgressCallback] = None) -> TrainResult:
    """Run (or resume) the training described by ``config`` in this process (one rank of an accelerate launch).

    Events go to ``progress`` and, on the main process, to ``OUTPUT_DIR/progress.jsonl``.
    """
    import torch
    from accelerate.utils import set_seed
    from safetensors.torch import save_file
    from transformers import get_scheduler

    from M3DAssistantLib.model import load_model

    from .jobs import ProgressLog

    config = config.with_absolute_paths()
    output_dir = Path(config.output_dir)
    adapter_dir = output_dir / ADAPTER_DIR
    if adapter_dir.exists():
        raise ConfigError(f"{output_dir} already holds a finished run ({adapter_dir}); choose a new output_dir "
                          "(nothing is overwritten).")
    seg_parts = {"seg_projector", "seg_module", "seg_encoder", "seg_decoder"}
    accelerator = _make_accelerator(config, find_unused=bool(seg_parts & set(config.parts)))
    main = accelerator.is_main_process
    sinks: list[ProgressCallback] = []
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        sinks.append(ProgressLog(output_dir / PROGRESS_FILE))
        if progress is not None:
            sinks.append(progress)

    def emit(event: ProgressEvent) -> None:
        for sink in sinks:
            sink(event)

    set_seed(config.seed)
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    model, tokenizer = load_model(config.base_model, device=accelerator.device, dtype=dtype)
    estimate = estimate_memory(config, model.lamed_config, cuda=accelerator.device.type == "cuda",
                               processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision)
    if main:
        print(estimate.format(), flush=True)
        message = estimate.format().splitlines()[0]
        if accelerator.device.type == "cuda":
            available = torch.cuda.get_device_properties(accelerator.device).total_memory
            if estimate.total_bytes > 0.95 * available:
                message = (f"the estimate ({estimate.total_bytes / 1024**3:.1f} GB) exceeds this GPU's "
                           f"{available / 1024**3:.1f} GB: use the one-24gb-gpu preset, a smaller batch with more "
                           "accumulation, gradient checkpointing, or more GPUs with DeepSpeed")
                logger.warning(message)
        emit(TrainingProgressEvent("estimate", None, message, details=estimate.to_dict()))
        config.to_yaml(output_dir / CONFIG_FILE)
    module = prepare_model(config, model)
    trainable = [p for p in module.parameters() if p.requires_grad]
    trainable_names = {n for n, p in module.named_parameters() if p.requires_grad}

    dataset, collate = build_dataset(config, tokenizer, model.num_image_tokens)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.per_device_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=config.num_workers,
        drop_last=False,
        # its own generator: creating a loader iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(config.seed),
    )
    decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in module.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    if len(loader) == 0:
        raise ConfigError(f"{config.dataset}: too few samples for {accelerator.num_processes} process(es).")
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_epochs * steps_per_epoch)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    _register_checkpoint_hooks(accelerator, trainable_names)

    resumed_from = None
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None and not config.resume:
        raise ConfigError(f"{output_dir} holds checkpoints of an earlier run ({checkpoint.name}) and resume is off; "
                          "set resume: true to continue it, or choose a new output_dir (nothing is overwritten).")
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint), **_state_kwargs(accelerator, "load"))
        resumed_from = state.global_step
        logger.info("resumed from %s (step %d)", checkpoint, state.global_step)
    emit(TrainingProgressEvent(
        "start", state.global_step / total_steps,
        f"resuming at step {state.global_step}/{total_steps}" if resumed_from is not None
        else f"training {total_steps} steps",
        step=state.global_step, total_steps=total_steps,
        details={"resumed_from": resumed_from, "num_processes": accelerator.num_processes, "pid": os.getpid(),
                 "trainable_params": sum(p.numel() for p in trainable)},
    ))

    samples_per_step = config.per_device_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    losses: list[float] = []
    window: list = []  # per micro-batch loss vectors of the current optimizer step
    run_start = time.perf_counter()
    steps_this_run = 0
    log_start, log_steps = run_start, 0
    module.train()
    while state.global_step < total_steps:
        loader.set_epoch(state.epoch)
        if hasattr(dataset, "set_epoch"):  # datasets that seed their augmentation per epoch
            dataset.set_epoch(state.epoch)
        epoch_loader = (accelerator.skip_first_batches(loader, state.batches_in_epoch)
                        if state.batches_in_epoch else loader)
        if state.batches_in_epoch:
            epoch_loader.set_epoch(state.epoch)
        for batch in epoch_loader:
            with accelerator.accumulate(module):
                loss, parts = module(
                    images=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], segs=batch.get("segs"),
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            window.append(_loss_vector(loss, parts))
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            state.global_step += 1
            steps_this_run += 1
            log_steps += 1
            means = _mean_losses(accelerator, window)
            window.clear()
            step_loss = means["loss"]
            losses.append(step_loss)
            if state.global_step % config.logging_steps == 0 or state.global_step == total_steps:
                now = time.perf_counter()
                rate = log_steps * samples_per_step / max(now - log_start, 1e-9)
                eta = (total_steps - state.global_step) * (now - run_start) / steps_this_run
                emit(TrainingProgressEvent(
                    "train", state.global_step / total_steps,
                    f"step {state.global_step}/{total_steps} loss {step_loss:.4f} lr {lr:.2e}",
                    step=state.global_step, total_steps=total_steps,
                    epoch=state.epoch + state.batches_in_epoch / len(loader),
                    loss=step_loss, lm_loss=means["lm"], dice_loss=means["dice"], bce_loss=means["bce"],
                    lr=lr, samples_per_s=rate, eta_s=eta, gpu_memory_bytes=_gpu_memory(accelerator),
                ))
                log_start, log_steps = now, 0
            if state.global_step % config.save_steps == 0 and state.global_step < total_steps:
                # at an epoch's end batches_in_epoch == len(loader): a resume skips them all and starts the next
                path = _save_checkpoint(accelerator, output_dir, state.global_step, config.save_total_limit)
                emit(TrainingProgressEvent("checkpoint", state.global_step / total_steps, f"saved {path.name}",
                                           step=state.global_step, total_steps=total_steps))
            if state.global_step >= total_steps:
                break
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    _save_outputs(accelerator, module, config, output_dir, save_file)
    emit(TrainingProgressEvent("done", 1.0, f"finished {total_steps} steps; adapter in {adapter_dir}",
                               step=state.global_step, total_steps=total_steps,
                               loss=losses[-1] if losses else None))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir, adapter_dir, state.global_step, losses, resumed_from)


def _save_outputs(accelerator, module, config: TrainConfig, output_dir: Path, save_file) -> None:
    """``OUTPUT_DIR/adapter``: PEFT adapter, trained non-LoRA weights (official names), training config."""
    # Collective under DeepSpeed ZeRO-3: gathers the partitioned parameters into full tensors first; saving
    # the partitions directly gives the empty tensors of official issue #59.
    state = accelerator.get_state_dict(module)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(module)
    trained = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    final = output_dir / ADAPTER_DIR
    tmp = output_dir / f".tmp-{ADAPTER_DIR}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if config.stage == "lora":
        peft_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        unwrapped.model.save_pretrained(str(tmp), state_dict=peft_state, safe_serialization=True,
                                        save_embedding_layers=False)
    weights = {official_name(n): state[n].detach().to("cpu").contiguous()
               for n in sorted(trained) if "lora_" not in n}
    if weights:
        save_file(weights, str(tmp / TRAINABLE_FILE), metadata={"format": "pt"})
    config.to_yaml(tmp / CONFIG_FILE)
    ordinary_permissions(tmp)
    tmp.rename(final)


# ------------------------------------------------------------------------------------------------------- merge
def _adapter_folder(path: Path) -> Path:
    path = Path(path)
    if (path / ADAPTER_DIR / CONFIG_FILE).is_file():
        return path / ADAPTER_DIR
    if (path / CONFIG_FILE).is_file() and ((path / TRAINABLE_FILE).is_file()
                                           or (path / "adapter_config.json").is_file()):
        return path
    raise CheckpointError(f"{path}: no trained adapter here (expected {CONFIG_FILE} with adapter_config.json and/or "
                          f"{TRAINABLE_FILE}); pass a training output_dir or its '{ADAPTER_DIR}' folder.")


def load_trained_model(adapter_dir: "str | Path", base_model: Optional[str] = None, device="cpu",
                       dtype="float32", merge_lora: bool = False):
    """Base model + trained weights + LoRA adapter, ready for inference: ``(model, tokenizer)``.

    ``merge_lora=False`` returns the PEFT-wrapped model (base + adapter, unmerged); ``True`` merges the LoRA
    weights into the base layers and returns the plain LaMed model.
    """
    import torch
    from safetensors.torch import load_file

    from M3DAssistantLib.model import load_model

    folder = _adapter_folder(Path(adapter_dir))
    config = TrainConfig.from_yaml(folder / CONFIG_FILE)
    model, tokenizer = load_model(base_model or config.base_model, device=device, dtype=dtype)
    trained_path = folder / TRAINABLE_FILE
    if trained_path.is_file():
        weights = load_file(str(trained_path), device=str(model.device))
        params = dict(model.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise CheckpointError(f"{trained_path}: weights {unknown[:5]} are not in the base model; was it trained "
                                  f"from another base than {base_model or config.base_model}?")
        with torch.no_grad():
            for name, tensor in weights.items():
                if params[name].shape != tensor.shape:
                    raise CheckpointError(f"{trained_path}: {name} has shape {list(tensor.shape)}, the base model "
                                          f"{list(params[name].shape)}; wrong base model.")
                params[name].copy_(tensor)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        if merge_lora:
            model = peft_model.merge_and_unload()
        else:
            model = peft_model
    model.eval().requires_grad_(False)
    return model, tokenizer


def merge(adapter_dir: "str | Path", out_dir: "str | Path", base_model: Optional[str] = None,
          dtype: Optional[str] = None, progress: Optional[ProgressCallback] = None) -> Path:
    """Write a FULL checkpoint in the official layout: base + trained weights + merged LoRA.

    ``out_dir`` gets ``config.json`` (:meth:`LamedConfig.to_dict`), ``model.safetensors`` with the official key
    names, and the base checkpoint's tokenizer files; :func:`~M3DAssistantLib.model.load_model` loads it strictly.
    ``dtype`` (float32 / bfloat16 / float16) defaults to the base checkpoint's ``torch_dtype``.
    """
    import torch

    from M3DAssistantLib.model.loading import parse_dtype
    from M3DAssistantLib.model.checkpoint_writer import save_state_dict
    from M3DAssistantLib.progress import report

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new folder (nothing is overwritten).")
    report(progress, "merge", 0.0, "loading base model and adapter")
    model, _ = load_trained_model(adapter_dir, base_model, device="cpu", dtype="float32", merge_lora=True)
    base_folder = Path(model.checkpoint_path)
    lamed_config = model.lamed_config
    target = parse_dtype(dtype or lamed_config.raw.get("torch_dtype") or "float32", torch.device("cpu"))
    report(progress, "merge", 0.5, "writing merged weights")
    state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_state_dict(state, tmp, weights_format="safetensors", max_shard_bytes=5 * 1024**3)
    config = lamed_config.to_dict()
    config["torch_dtype"] = str(target).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (base_folder / name).is_file():
            shutil.copy2(base_folder / name, tmp / name)
    shutil.copy2(_adapter_folder(Path(adapter_dir)) / CONFIG_FILE, tmp / CONFIG_FILE)  # provenance
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    report(progress, "merge", 1.0, f"merged checkpoint in {out_dir}")
    return out_dir


# --------------------------------------------------------------------------------------------------------- CLI
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``m3d train`` (also ``python -m M3DTrainingLib.train``)."""
    parser.add_argument("config", help="training config YAML (keys: M3DTrainingLib.train.TrainConfig)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, VALUE as YAML (repeatable), e.g. --set max_steps=100")
    parser.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)} (overrides the file's preset)")
    parser.add_argument("--estimate-only", action="store_true", help="print the memory estimate and exit")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="launch N processes through accelerate launch (one per GPU; gloo on CPU)")
    parser.add_argument("--detach", action="store_true",
                        help="run as a background job that survives this shell; follow OUTPUT_DIR/progress.jsonl")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.set or [])
    if args.preset:
        overrides.append(f"preset={args.preset}")
    if args.num_processes:
        overrides.append(f"num_processes={args.num_processes}")
    return TrainConfig.from_yaml(args.config, overrides)


def _print_event(event: ProgressEvent) -> None:
    print(f"[{event.stage}] {event.message}", file=sys.stderr, flush=True)


def run_train(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    if args.estimate_only:
        print(estimate_memory(config).format())
        return 0
    inside_launch = "LOCAL_RANK" in os.environ
    if not inside_launch and (args.detach or config.num_processes > 1):
        from .jobs import Job

        job = Job.start(config)
        print(f"started training job (pid {job.pid}); progress: {job.progress_path}, log: {job.log_path}")
        if args.detach:
            return 0
        status = job.wait(on_event=None if args.quiet else _print_event)
        print(f"training {status.state}: {status.message}")
        return 0 if status.state == "completed" else 1
    try:
        result = train(config, progress=None if args.quiet else _print_event)
    except BaseException as e:
        _record_failure(config, e)
        raise
    print(f"trained {result.steps} steps; adapter: {result.adapter_dir}")
    return 0


def _record_failure(config: TrainConfig, error: BaseException) -> None:
    """The last line of progress.jsonl says why the run stopped (for jobs and the module)."""
    if os.environ.get("RANK", "0") != "0" or not config.output_dir:
        return
    if (Path(config.output_dir) / ADAPTER_DIR).exists():  # refused to touch a finished run: leave its log as is
        return
    from .jobs import ProgressLog

    message = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    try:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        ProgressLog(Path(config.output_dir) / PROGRESS_FILE)(TrainingProgressEvent("error", None, message))
    except OSError:
        pass


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``m3d merge``."""
    parser.add_argument("adapter", help="training output_dir (or its 'adapter' folder)")
    parser.add_argument("output", help="new folder for the merged checkpoint (official layout)")
    parser.add_argument("--base-model", default=None, help="base checkpoint (default: the one in train_config.yaml)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the base's torch_dtype)")


def run_merge(args: argparse.Namespace) -> int:
    out = merge(args.adapter, args.output, base_model=args.base_model, dtype=args.dtype)
    print(f"wrote merged checkpoint {out}; use it with --model {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m M3DTrainingLib.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_train(args)
    except M3DError as e:
        print(f"m3d train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
