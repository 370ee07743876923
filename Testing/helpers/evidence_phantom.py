"""A tiny M3D-LaMed rebuilt to read one image patch only: the phantom behind the evidence-map tests
(``Testing/engine/test_evidence.py``) and the README's evidence picture (``Utilities/make_analysis_figures.py``)."""

from __future__ import annotations

import torch


def region_only_model(model, patch: tuple[int, int, int]) -> tuple[slice, ...]:
    """Rebuild a tiny M3D-LaMed's vision transformer so that only one patch of the image reaches the language model.

    Attention and MLP outputs are zeroed (each token keeps its own patch embedding); every other patch's position
    embedding is a huge alternating vector, so the final LayerNorm squashes its image content ~1e4-fold. The model
    is otherwise the random checkpoint: whatever it answers depends on that patch's voxels only. Returns the patch's
    model-voxel slices (d, h, w)."""
    vit = model.model.vision_tower.vision_tower
    grid = vit.config.grid_size
    index = (patch[0] * grid[1] + patch[1]) * grid[2] + patch[2]
    with torch.no_grad():
        for block in vit.blocks:
            for linear in (block.attn.out_proj, block.mlp.linear2):
                linear.weight.zero_()
                linear.bias.zero_()
        signs = torch.tensor([1.0 if i % 2 else -1.0 for i in range(vit.config.hidden_size)])
        embeddings = vit.patch_embedding.position_embeddings
        embeddings[:] = 1e4 * signs
        embeddings[0, index] = 0.0
    return tuple(slice(p * s, (p + 1) * s) for p, s in zip(patch, vit.config.patch_size))
