"""Checks a training run can pass before anything heavy starts: what the dataset was exported for against the model
it is to train, from JSON files alone (no torch, no weights) -- so a mismatch is one line naming the fix, not an
error from inside the model after it loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from M3DAssistantLib.errors import ConfigError


def check_dataset_fits_model(dataset: Union[str, Path], base_model: Union[str, Path]) -> None:
    """The dataset's ``model_shape`` (``dataset.json``) equals the base model's image size (its ``config.json``).

    :raises ConfigError: naming both shapes and the ``m3d export ... --model-shape`` that re-exports for this model.
    """
    from M3DAssistantLib.model.configuration_lamed import parse_multimodal_config, read_config_json
    from M3DAssistantLib.model.hub import resolve_checkpoint

    manifest_path = Path(dataset) / "dataset.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the dataset loader reports a missing or broken dataset.json with its own message
    shape = manifest.get("model_shape") if isinstance(manifest, dict) else None
    if not shape:
        return
    folder = resolve_checkpoint(base_model, metadata_only=True)
    image_size = tuple(int(v) for v in parse_multimodal_config(read_config_json(folder)).image_size)
    if tuple(int(v) for v in shape) != image_size:
        d, h, w = image_size
        raise ConfigError(
            f"the dataset {dataset} was exported at model shape {tuple(shape)} but {base_model} takes images of "
            f"{image_size}; re-export the scenes for this model: m3d export SCENES -o NEW_DATASET --model-shape "
            f"{d} {h} {w}, then train on NEW_DATASET")


__all__ = ["check_dataset_fits_model"]
