"""A trained run made usable: the base model with the trained weights and the LoRA adapter, merged into a FULL
checkpoint in the official layout (``m3d merge``), which ``load_model``, every ``m3d`` command and M3DAssistant load.

:func:`load_trained_model` gives base + adapter in memory (unmerged or merged); :func:`merge` writes the checkpoint
(``config.json``, ``model.safetensors`` under the official names, the base's tokenizer files, the training config for
provenance) into a new folder, never over an existing one. :func:`finished_model` tells what a run folder holds for
M3DAssistant; the panel runs :func:`merge_command` as a helper process. torch, safetensors and peft are imported
inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

from M3DAssistantLib.errors import CheckpointError, ConfigError
from M3DAssistantLib.progress import ProgressCallback

from .config import ADAPTER_CONFIG_FILE, ADAPTER_DIR, CONFIG_FILE, MERGED_DIR, TRAINABLE_FILE, TrainConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def _adapter_folder(path: Path) -> Path:
    path = Path(path)
    if (path / ADAPTER_DIR / CONFIG_FILE).is_file():
        return path / ADAPTER_DIR
    if (path / CONFIG_FILE).is_file() and ((path / TRAINABLE_FILE).is_file()
                                           or (path / ADAPTER_CONFIG_FILE).is_file()):
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
    if (folder / ADAPTER_CONFIG_FILE).is_file():
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

    from M3DAssistantLib.model.checkpoint_writer import save_state_dict
    from M3DAssistantLib.model.loading import parse_dtype
    from M3DAssistantLib.progress import report_progress

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new folder (nothing is overwritten).")
    report_progress(progress, "merge", 0.0, "loading base model and adapter")
    model, _ = load_trained_model(adapter_dir, base_model, device="cpu", dtype="float32", merge_lora=True)
    base_folder = Path(model.checkpoint_path)
    lamed_config = model.lamed_config
    target = parse_dtype(dtype or lamed_config.raw.get("torch_dtype") or "float32", torch.device("cpu"))
    report_progress(progress, "merge", 0.5, "writing merged weights")
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
    report_progress(progress, "merge", 1.0, f"merged checkpoint in {out_dir}")
    return out_dir


def finished_model(output_folder: Union[str, os.PathLike]) -> Optional[str]:
    """What M3DAssistant can use from a training output folder: "merged" (a full checkpoint), "adapter" (to be
    merged first) or None (not finished)."""
    folder = Path(output_folder)
    if (folder / MERGED_DIR / "config.json").is_file():
        return "merged"
    if any((folder / ADAPTER_DIR / name).is_file() for name in (ADAPTER_CONFIG_FILE, TRAINABLE_FILE)):
        return "adapter"
    return None


def merge_command(python: str, output_folder: Union[str, os.PathLike]) -> list[str]:
    """``m3d merge OUTPUT OUTPUT/merged``: the full checkpoint in the official layout that M3DAssistant loads."""
    folder = Path(output_folder)
    return [python, "-m", "M3DAssistantLib.cli", "merge", str(folder), str(folder / MERGED_DIR)]
