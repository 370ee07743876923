"""``load_model`` / ``load_clip``: an HF hub id or a local folder -> a ready model, without remote code.

The hub is used through huggingface_hub (cache, resume, progress). Offline, a model that is not in the cache gives a
:class:`ModelNotAvailableError` that says how to point at a local folder.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import CheckpointError, ConfigError, ModelNotAvailableError
from ..progress import ProgressCallback, report
from .checkpoint import load_weights
from .configuration_lamed import parse_lamed_config, read_config_json

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"
DEFAULT_CLIP = "GoodBaiBai88/M3D-CLIP"
MODEL_ENV = "M3D_MODEL"
# What a checkpoint needs; remote-code .py files and other extras on the hub repos are not downloaded.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """A torch dtype from a name; ``None`` picks bf16 on CUDA (as the official models were trained) and fp32 else."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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


def is_hub_id(source: str) -> bool:
    """``owner/name`` as on the Hugging Face hub (a relative path of two parts looks the same: folders win)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", source) is not None


def resolve_checkpoint(
    source: Union[str, Path, None] = None,
    revision: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
) -> Path:
    """A local folder holding the checkpoint ``source`` (local folder, or hub id downloaded/cached).

    ``source=None`` uses ``$M3D_MODEL`` and then the default model.
    """
    source = str(source or os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that contains config.json.")
    if not is_hub_id(source):
        raise CheckpointError(
            f"{source}: no such folder. Pass an existing checkpoint folder, or a Hugging Face hub id such as "
            f"{DEFAULT_MODEL}."
        )
    return _download(source, revision, progress)


def _download(repo_id: str, revision: Optional[str], progress: Optional[ProgressCallback]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:  # a cached snapshot works offline and costs no network round trip
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS, local_files_only=True))
    except Exception:
        pass
    report(progress, "download", None, f"downloading {repo_id} from the Hugging Face hub")
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS, tqdm_class=_progress_tqdm(progress)
        )
    except Exception as e:  # network errors come in many types (requests, httpx, hub-specific)
        name = type(e).__name__
        raise ModelNotAvailableError(
            f"{repo_id} is not in the Hugging Face cache ({HF_HUB_CACHE}) and could not be downloaded ({name}). "
            "If this machine is offline, download the model elsewhere (`hf download "
            f"{repo_id} --local-dir M3D-model`), copy the folder here and pass it with --model PATH "
            f"(or set {MODEL_ENV}=PATH)."
        ) from None
    report(progress, "download", 1.0, f"{repo_id} ready")
    return Path(folder)


def _progress_tqdm(progress: Optional[ProgressCallback]):
    """A tqdm class that also forwards download progress to ``progress`` (the CLI shows tqdm's own bar)."""
    from tqdm.auto import tqdm

    if progress is None:
        return tqdm

    class ProgressTqdm(tqdm):
        def update(self, n=1):
            result = super().update(n)
            if self.total:
                report(progress, "download", self.n / self.total, str(self.desc or ""))
            return result

    return ProgressTqdm


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
        dtype: torch.bfloat16 / float16 / float32 (or their names); None = bf16 on CUDA, fp32 else.
        revision: hub revision (branch, tag or commit hash) to pin.

    Returns:
        ``(model, tokenizer)``; ``model.lamed_config`` is the parsed config, ``tokenizer.m3d_special_tokens`` the
        verified token ids, ``model.checkpoint_path`` the local folder.
    """
    from .modeling_lamed import build_lamed_model
    from .tokenizer import load_tokenizer

    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    folder = resolve_checkpoint(source, revision, progress)
    config = parse_lamed_config(read_config_json(folder), source=str(folder / "config.json"))
    tokenizer, _ = load_tokenizer(folder, config.multimodal.seg_token_id, config.text_config.vocab_size)
    report(progress, "load", 0.0, f"building {config.model_type} model")
    with torch.device("meta"):
        model = build_lamed_model(config)
    load_weights(model, folder, dtype=dtype, device=device, progress=progress)
    model.eval().requires_grad_(False)
    model.checkpoint_path = folder
    model.source = str(source or os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    model.generation_config.pad_token_id = tokenizer.m3d_special_tokens.pad
    model.generation_config.eos_token_id = tokenizer.m3d_special_tokens.eos
    report(progress, "load", 1.0, "model ready")
    return model, tokenizer


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
