"""``load_model`` / ``load_clip``: an HF hub id or a local folder -> a ready model, without remote code."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import CheckpointError, ConfigError
from ..oom import translate_out_of_memory
from ..progress import ProgressCallback, report_progress
from .checkpoint_reader import load_weights
from .configuration_lamed import parse_lamed_config, read_config_json
from .hub import DEFAULT_CLIP, DEFAULT_MODEL, MODEL_ENV, resolve_checkpoint

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (as the official models were trained), fp32 elsewhere.

    On the CPU the choice is measured (``benchmarks/decode_bound.py``, README Performance): at the official Phi-3-4B
    size fp32 decodes at 84 % of the memory-bandwidth bound and bf16 3.5x slower, even on a CPU with native bf16
    (AMX); bf16 halves the memory (``--dtype bfloat16`` where fp32 does not fit)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """A torch dtype from a name; ``None`` (or "auto") picks :func:`default_dtype` for the device."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}.") from None


def parse_device(device: Union[str, torch.device, None]) -> torch.device:
    """A torch device; ``None``/"auto" picks CUDA, then Apple MPS, then CPU. Unavailable devices are an error."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but this PyTorch has no usable CUDA GPU; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device} does not exist; this machine has {torch.cuda.device_count()} GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but Apple MPS is not available here; use --device cpu.")
    return device


def load_model(
    source: Union[str, Path, None] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    revision: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
):
    """Load an M3D-LaMed checkpoint (official layout) and its tokenizer, ready for inference.

    Args:
        source: HF hub id (e.g. ``GoodBaiBai88/M3D-LaMed-Phi-3-4B``) or a local folder; default ``$M3D_MODEL``
            or the Phi-3-4B model.
        device: "cpu", "cuda", "cuda:1", "mps" or None (best available).
        dtype: torch.bfloat16 / float16 / float32 (or their names); None = :func:`default_dtype` (bf16 on CUDA,
            fp32 else: measured faster on the CPU).
        revision: hub revision (branch, tag or commit hash) to pin.

    Returns:
        ``(model, tokenizer)``; ``model.lamed_config`` is the parsed config, ``tokenizer.m3d_special_tokens`` the
        verified token ids, ``model.checkpoint_path`` the local folder, ``model.generation_config`` the checkpoint's
        generation defaults (``generation_config.json`` when present: its EOS list stops generation as in the
        official code; see :func:`checkpoint_generation_config`).
    """
    from .modeling_lamed import build_lamed_model
    from .tokenizer import load_tokenizer

    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    folder = resolve_checkpoint(source, revision, progress)
    config = parse_lamed_config(read_config_json(folder), source=str(folder / "config.json"))
    tokenizer, _ = load_tokenizer(folder, config.multimodal.seg_token_id, config.text_config.vocab_size)
    report_progress(progress, "load", 0.0, f"building {config.model_type} model")
    with torch.device("meta"):
        model = build_lamed_model(config)
    with translate_out_of_memory(device, dtype, str(folder), "loading the model"):
        load_weights(model, folder, dtype=dtype, device=device, progress=progress)
    model.eval().requires_grad_(False)
    model.checkpoint_path = folder
    model.source = str(source or os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    model.generation_config, model.generation_config_source = checkpoint_generation_config(
        folder, tokenizer.m3d_special_tokens, config.text_config.vocab_size
    )
    report_progress(progress, "load", 1.0, "model ready")
    return model, tokenizer


GENERATION_CONFIG = "generation_config.json"


def checkpoint_generation_config(folder: Path, special: Any, vocab_size: int) -> tuple[Any, Optional[str]]:
    """``(GenerationConfig, path of the file or None)``: the generation defaults transformers' ``from_pretrained``
    would give the official code for this checkpoint.

    ``generation_config.json`` when the checkpoint has one, used whole: its ``eos_token_id`` list (Phi-3's names
    ``<|end|>`` and ``<|assistant|>`` beside ``<|endoftext|>``, so the model stops where the official one stops)
    and any other field that changes outputs (e.g. ``repetition_penalty``). Fields it leaves unset fall back to the
    tokenizer's EOS and pad token. Options passed to ``generate`` (our
    :class:`~M3DAssistantLib.results.SamplingOptions`) still override it, as they do in transformers. Without the
    file: EOS and pad from the tokenizer.
    """
    from transformers import GenerationConfig

    path = Path(folder) / GENERATION_CONFIG
    if path.is_file():
        try:
            generation_config = GenerationConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot be read ({e}); re-download it or delete it to use the tokenizer's "
                              "EOS.") from e
        source = str(path)
    else:
        generation_config = GenerationConfig()
        source = None
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = special.eos
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = special.pad
    eos = generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    bad = [t for t in eos_ids + [generation_config.pad_token_id]
           if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(
            f"{path}: token id(s) {bad} are not in the model's vocabulary of {vocab_size}; this generation config "
            "belongs to another model -- re-download the checkpoint or delete the file."
        )
    return generation_config, source


def load_clip(
    source: Union[str, Path, None] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    revision: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
):
    """Load M3D-CLIP (``GoodBaiBai88/M3D-CLIP`` or a local folder) and its BERT tokenizer: ``(model, tokenizer)``."""
    from .modeling_clip import M3DCLIP, M3DCLIPConfig
    from .tokenizer import tokenizer_class_for

    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    folder = resolve_checkpoint(source or DEFAULT_CLIP, revision, progress)
    raw = read_config_json(folder)
    if raw.get("model_type") != "m3d_clip":
        raise ConfigError(f"{folder / 'config.json'}: model_type {raw.get('model_type')!r} is not 'm3d_clip'.")
    config = M3DCLIPConfig.from_dict(raw)
    with torch.device("meta"):
        model = M3DCLIP(config)
    load_weights(model, folder, dtype=dtype, device=device, ignorable=M3DCLIP.ignorable_keys, progress=progress)
    model.eval().requires_grad_(False)
    try:
        tokenizer = tokenizer_class_for(folder, default="BertTokenizer").from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(
            f"{folder}: no usable BERT tokenizer beside the M3D-CLIP weights ({type(e).__name__}); copy the "
            "bert-base-uncased tokenizer files (vocab.txt, tokenizer_config.json) into that folder."
        ) from e
    model.checkpoint_path = folder
    return model, tokenizer
