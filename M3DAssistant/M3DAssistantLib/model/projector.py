"""Projectors: vision features -> LLM token embeddings, and LLM hidden state -> SegVol prompt."""

from __future__ import annotations

import torch
from torch import nn

from .configuration_lamed import MultimodalConfig


def _linear_stack(in_dim: int, out_dim: int, layer_type: str, num_layers: int) -> nn.Sequential:
    """Linear(in, out) then (GELU?, Linear(out, out)) x (num_layers - 1); indices match the official keys."""
    modules: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, num_layers):
        if layer_type == "mlp":
            modules.append(nn.GELU())
        modules.append(nn.Linear(out_dim, out_dim))
    return nn.Sequential(*modules)


class SpatialPoolingProjector(nn.Module):
    """Average-pools the ViT patch grid (8x16x16 -> 4x8x8) and maps each pooled token to the LLM width.

    Keys: ``projector.{0,2}.{weight,bias}`` for the official 2-layer MLP.
    """

    def __init__(self, config: MultimodalConfig, out_dim: int):
        super().__init__()
        self.grid = config.patch_grid
        self.pooling_type = config.proj_pooling_type
        self.pooling_size = config.proj_pooling_size
        self.projector = _linear_stack(config.mm_hidden_size, out_dim, config.proj_layer_type, config.proj_layer_num)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: [B, N=d*h*w, C], tokens in D-major order
        # Average pooling written as reshape + mean: the same numbers as avg_pool3d/avg_pool1d (kernel = stride),
        # accumulated in fp32, and it also runs in bf16 on CPU where avg_pool3d has no kernel.
        b, n, c = features.shape
        k = self.pooling_size
        x = features.float()
        if self.pooling_type == "spatial":
            d, h, w = self.grid
            x = x.reshape(b, d // k, k, h // k, k, w // k, k, c).mean(dim=(2, 4, 6))  # [B, d/k, h/k, w/k, C]
        else:
            x = x.reshape(b, n // k**3, k**3, c).mean(dim=2)
        tokens = x.reshape(b, -1, c).to(features.dtype)  # [B, N / k^3, C], D-major as before
        return self.projector(tokens)  # [B, num_image_tokens, hidden]


def build_mm_projector(config: MultimodalConfig, out_dim: int) -> nn.Module:
    if config.mm_projector_type == "spp":
        return SpatialPoolingProjector(config, out_dim)
    # "linear": the projector IS the Linear (official key ``mm_projector.weight``), one token per patch.
    return nn.Linear(config.mm_hidden_size, out_dim)


def build_seg_projector(hidden_size: int, prompt_dim: int) -> nn.Sequential:
    """LLM hidden state of the [SEG]-predicting position -> SegVol text prompt (keys ``0.*`` and ``2.*``)."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size),
        nn.ReLU(),
        nn.Linear(hidden_size, prompt_dim),
        nn.Dropout(0.1),
    )
