"""3D Vision Transformer used by M3D: the LaMed vision tower, the SegVol image encoder and the M3D-CLIP image encoder.

The architecture is MONAI 1.3's ``ViT`` with the "perceptron" patch embedding, which is what the official code builds.
We define our own modules rather than importing MONAI's because MONAI >= 1.4 changed the parameter names and added
cross-attention parameters, so its state dict no longer matches the released checkpoints. Every parameter name here
is the one in the official checkpoints (BAAI-DCAI/M3D ``LaMed/src/model/multimodal_encoder/vit.py``), so they load
with ``strict=True``:

    cls_token                                        [1, 1, hidden]            (only when classification=True)
    patch_embedding.patch_embeddings.1.{weight,bias} [hidden, prod(patch)*C]   (index 0 is a parameterless rearrange)
    patch_embedding.position_embeddings              [1, num_patches, hidden]
    blocks.{i}.norm1 / attn.qkv (no bias) / attn.out_proj / norm2 / mlp.linear1 / mlp.linear2
    norm                                             LayerNorm(hidden)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError

__all__ = ["ViT3DConfig", "PatchRearrange", "PatchEmbedding", "ViT3DAttention", "ViT3DMLP", "ViT3DBlock", "ViT3D",
           "VisionTower"]


def _as_triple(name: str, value: Sequence[int] | int) -> tuple[int, int, int]:
    """Accept the list form config.json gives (and a single int) and return a (D, H, W) tuple of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value, value)
    try:
        triple = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"ViT3D: {name}={value!r} must be three integers (D, H, W).") from None
    if len(triple) != 3 or any(v <= 0 for v in triple):
        raise ConfigError(f"ViT3D: {name}={list(triple)} must be three positive integers (D, H, W).")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class ViT3DConfig:
    """Sizes of a 3D ViT; the defaults are the released M3D models' values.

    Attributes:
        in_channels: image channels (1 for CT/MR).
        img_size: input size (D, H, W); the position embeddings are learned for exactly this size.
        patch_size: patch size (D, H, W); must divide ``img_size``. Grid (8, 16, 16) -> 2048 patches by default.
        hidden_size: token width (768).
        mlp_dim: hidden width of each block's MLP (3072).
        num_layers: number of transformer blocks (12).
        num_heads: attention heads; must divide ``hidden_size`` (12 -> head dim 64).
        classification: prepend a learned ``cls_token`` (LaMed vision tower, M3D-CLIP). Like the official code this
            adds no classification head. The SegVol image encoder uses ``False``.
    """

    in_channels: int = 1
    img_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    classification: bool = True

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise list inputs (from JSON) with object.__setattr__.
        object.__setattr__(self, "img_size", _as_triple("img_size", self.img_size))
        object.__setattr__(self, "patch_size", _as_triple("patch_size", self.patch_size))
        for name in ("in_channels", "hidden_size", "mlp_dim", "num_layers", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ViT3D: {name}={value!r} must be a positive integer.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"ViT3D: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "choose a head count that divides the width."
            )
        for size, patch, axis in zip(self.img_size, self.patch_size, "DHW"):
            if size % patch:
                raise ConfigError(
                    f"ViT3D: img_size {list(self.img_size)} is not divisible by patch_size {list(self.patch_size)} "
                    f"along {axis}; the perceptron patch embedding needs whole patches."
                )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Patch grid (d, h, w), e.g. (8, 16, 16)."""
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (2048 by default), without the CLS token."""
        d, h, w = self.grid_size
        return d * h * w

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, prod(patch_size) * in_channels (1024 by default)."""
        return math.prod(self.patch_size) * self.in_channels


class PatchRearrange(nn.Module):
    """Cuts a volume into non-overlapping patches and flattens each one (no parameters).

    Same order as MONAI's einops pattern ``b c (d p1) (h p2) (w p3) -> b (d h w) (p1 p2 p3 c)``: tokens are D-major,
    then H, then W; inside a patch the values run over (pD, pH, pW, channel), channel fastest. The Linear after it
    was trained with this order, so it must not change.
    """

    def __init__(self, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        p1, p2, p3 = self.patch_size
        # [B, C, D, H, W] -> [B, C, d, p1, h, p2, w, p3]
        x = x.reshape(b, c, d // p1, p1, h // p2, p2, w // p3, p3)
        # -> [B, d, h, w, p1, p2, p3, C]
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
        # -> [B, d*h*w, p1*p2*p3*C]
        return x.reshape(b, (d // p1) * (h // p2) * (w // p3), p1 * p2 * p3 * c)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"


class PatchEmbedding(nn.Module):
    """Perceptron patch embedding: rearrange, Linear, plus a learned position embedding per patch.

    The position embeddings are added to the patch tokens only; the CLS token (if any) is concatenated afterwards.
    """

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        # Index 0 holds no parameters; it is kept so the Linear's keys are `patch_embeddings.1.*` as in MONAI.
        self.patch_embeddings = nn.Sequential(
            PatchRearrange(config.patch_size), nn.Linear(config.patch_dim, config.hidden_size)
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, D, H, W] -> [B, N, hidden]
        return self.patch_embeddings(x) + self.position_embeddings


class ViT3DAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (no bias) and an output projection (with bias).

    The qkv output features are laid out as (qkv=3, heads, head_dim), the order MONAI's SABlock uses.
    """

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, 3*C] -> [3, B, heads, N, head_dim]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(head_dim)) v, the same math as MONAI's explicit version, in a fused kernel.
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        # [B, heads, N, head_dim] -> [B, N, C]
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.out_proj(out)


class ViT3DMLP(nn.Module):
    """Linear - GELU (exact erf form) - Linear."""

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.linear1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.linear2 = nn.Linear(config.mlp_dim, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class ViT3DBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.attn = ViT3DAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.mlp = ViT3DMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """The 3D ViT: patch embedding, optional CLS token, pre-norm blocks, final LayerNorm (no head).

    ``forward(x [B, C, D, H, W])`` returns ``(norm(x_last) [B, N(+1), hidden],
    [block outputs, each [B, N(+1), hidden]])``
    like MONAI's ViT; the block outputs are *before* the final norm.
    """

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.patch_embedding = PatchEmbedding(config)
        if config.classification:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.blocks = nn.ModuleList([ViT3DBlock(config) for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MONAI's initialisation (truncated normal std 0.02, zero biases), for training from scratch.

        Irrelevant when a checkpoint is loaded; cheap and harmless on the meta device.
        """
        nn.init.trunc_normal_(self.patch_embedding.position_embeddings, mean=0.0, std=0.02, a=-2.0, b=2.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02, a=-2.0, b=2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.classification:
            nn.init.zeros_(self.cls_token)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        expected = (self.config.in_channels, *self.config.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            # The learned position embeddings fix the input size; say so instead of failing inside a reshape.
            raise InputError(
                f"ViT3D expects images of shape [B, {', '.join(map(str, expected))}] (B, C, D, H, W), "
                f"got {list(x.shape)}; resample the volume to {list(self.config.img_size)} first."
            )
        x = self.patch_embedding(x)  # [B, N, hidden]
        if self.config.classification:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [B, N+1, hidden]
        hidden_states: list[torch.Tensor] = []
        for block in self.blocks:
            x = block(x)
            hidden_states.append(x)
        return self.norm(x), hidden_states


class VisionTower(nn.Module):
    """LaMed's vision tower: a :class:`ViT3D` (in attribute ``vision_tower``) plus feature selection.

    In a LaMed checkpoint its weights are under ``model.vision_tower.vision_tower.*``.

    Args:
        config: ViT sizes; must have ``classification=True`` (the tower always has a CLS token).
        select_layer: -1 (released models) takes the output of the final LayerNorm. A value in
            [-num_layers, -2] takes that block's raw output (``hidden_states[select_layer]``), which is what the
            official code intended but cannot run (it indexes the list with a string), so no released model uses it.
        select_feature: "patch" drops the CLS token ([B, 2048, 768]); "cls_patch" keeps it ([B, 2049, 768]).
    """

    def __init__(self, config: ViT3DConfig, select_layer: int = -1, select_feature: str = "patch"):
        super().__init__()
        if not config.classification:
            raise ConfigError("VisionTower needs ViT3DConfig(classification=True): the LaMed tower has a CLS token.")
        if not (-config.num_layers <= select_layer <= -1):
            raise ConfigError(
                f"vision_select_layer={select_layer} is not supported; use -1 (final LayerNorm output) or a block "
                f"index from -{config.num_layers} to -2."
            )
        if select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"vision_select_feature={select_feature!r} is not supported; use 'patch' or 'cls_patch'.")
        self.config = config
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.vision_tower = ViT3D(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        last, hidden_states = self.vision_tower(images)
        features = last if self.select_layer == -1 else hidden_states[self.select_layer]  # [B, N+1, hidden]
        if self.select_feature == "patch":
            features = features[:, 1:]  # [B, N, hidden]
        return features

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches(self) -> int:
        """Patch tokens of the grid (2048), whatever ``select_feature`` is."""
        return self.config.num_patches

    @property
    def num_tokens(self) -> int:
        """Tokens :meth:`forward` returns per image: 2048 for "patch", 2049 for "cls_patch"."""
        return self.config.num_patches + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.norm.weight.device
