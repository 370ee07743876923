"""Writing model weights in the published layout: one file, or shards with their index json, as the hub repos hold
them and :func:`~.loading.load_model` reads them back strictly.

Product code: ``M3DTrainingLib``'s merge writes fine-tuned checkpoints with it, ``m3d make-test-checkpoint``
(:mod:`.random_checkpoint`) random ones. The files get the permissions an ordinary ``open()`` gives (safetensors
makes them owner-only), so a model folder can be shared between the users of a lab.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch


def save_state_dict(state: dict[str, torch.Tensor], folder: Path, weights_format: str = "safetensors",
                    max_shard_bytes: Optional[int] = None) -> list[Path]:
    """Save weights as the hub repos do: one file, or shards plus an index json."""
    from safetensors.torch import save_file

    from ..outputs.atomic import ordinary_permissions

    folder = Path(folder)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    ext = "safetensors" if weights_format == "safetensors" else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"

    def write(part: dict[str, torch.Tensor], name: str) -> Path:
        path = folder / name
        if ext == "safetensors":
            save_file(part, str(path), metadata={"format": "pt"})
            ordinary_permissions(path)  # safetensors makes it owner-only
        else:
            torch.save(part, path)
        return path

    total = sum(t.numel() * t.element_size() for t in state.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        return [write(state, f"{stem}.{ext}")]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    n = len(shards)
    weight_map, paths = {}, []
    for i, part in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{n:05d}.{ext}"
        paths.append(write(part, name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return paths


__all__ = ["save_state_dict"]
