"""How much memory a training step needs per device, estimated before anything is loaded.

:func:`estimate_memory` counts weights, gradients and Adam states of a config on the meta device (no weights read)
and adds the activations kept for backward; the trainer prints it before its first step and warns when it exceeds
:data:`HEADROOM` of the GPU, ``m3d train --estimate-only`` prints only it, the panel compares it with the chosen GPUs.
``benchmarks/train_step.py`` measures the real figure. torch and the model code are imported inside the function.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

from .config import NON_LLM_PARTS, TrainConfig

GIB = 1024**3

HEADROOM = 0.95
"""A GPU is too small when the estimate exceeds this share of its memory (the trainer and the panel warn)."""

DEFAULT_ESTIMATES = {"one-24gb-gpu": 10_175_979_264, "official": 40_882_869_504}
"""Bytes per GPU that :func:`estimate_memory` gives for M3D-LaMed-Phi-3-4B with each preset's defaults on one GPU
(bf16, 512 tokens). Shown before anything runs; "Estimate memory" computes the figure for the panel's own settings.
``Testing/slicer/test_training_module.py`` recomputes them."""


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
        """The table ``m3d train --estimate-only`` prints (:func:`parse_estimate_total` reads its total back)."""
        gb = GIB
        zero = f", ZeRO-{self.deepspeed_stage} over {self.processes} processes" if self.deepspeed_stage else ""
        lines = [
            f"Memory estimate per device ({self.dtype}, batch {self.batch} x {self.tokens} tokens, gradient "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}{zero}):",
            f"  weights       {self.weights_bytes / gb:7.2f} GiB  ({self.total_params / 1e9:.2f} B parameters)",
            f"  gradients     {self.gradients_bytes / gb:7.2f} GiB  ({self.trainable_params / 1e6:.1f} M trained)",
            f"  Adam states   {self.optimizer_bytes / gb:7.2f} GiB",
            f"  activations   {self.activations_bytes / gb:7.2f} GiB  (estimate)",
            f"  total         {self.total_bytes / gb:7.2f} GiB",
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


def parse_estimate_total(text: str) -> Optional[int]:
    """Bytes of the ``total`` line that ``m3d train --estimate-only`` prints (``MemoryEstimate.format``)."""
    match = re.search(r"^\s*total\s+([\d.]+)\s*GiB", text, re.MULTILINE)
    return None if match is None else int(float(match.group(1)) * GIB)
