"""SegVol, the segmentation module of M3D-LaMed: 3D ViT image encoder, SAM-style prompt encoder and mask decoder.

LaMed prompts SegVol with a single 768-d "text embedding" (the projected hidden state of the LLM's [SEG] token); the
original SegVol's CLIP text encoder is not part of the model. The parameter names are those of the official
checkpoints (``model.seg_module.*``, see BAAI-DCAI/M3D ``LaMed/src/model/segmentation_module/segvol.py``), so a
checkpoint loads with ``strict=True``:

    image_encoder.*   3D ViT without CLS token (:class:`~.vit3d.ViT3D`, classification=False)
    prompt_encoder.*  pe_layer.positional_encoding_gaussian_matrix (persistent buffer), point_embeddings.{0..3},
                      not_a_point_embed, mask_downscaling.{0,1,3,4,6}, no_mask_embed
    mask_decoder.*    iou_token, mask_tokens, transformer.* (two-way transformer), output_upscaling.{0,1,3},
                      output_hypernetworks_mlps.{i}.layers.{0,1,2}, iou_prediction_head.layers.{0,1,2},
                      txt_align_upscaled_embedding

Point / box / mask prompts of the original SegVol are not implemented: LaMed never uses them, but their parameters
exist (and must load) so the state dict matches.

The engine encodes a volume once (:meth:`SegVol.encode_image`) and decodes every [SEG] prompt against the cached
embedding (:meth:`SegVol.decode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from .vit3d import ViT3D, ViT3DConfig

__all__ = [
    "SegVolConfig",
    "LayerNorm2d",
    "PositionEmbeddingRandom",
    "SegVolPromptEncoder",
    "TwoWayAttention",
    "TwoWayMLP",
    "TwoWayAttentionBlock",
    "TwoWayTransformer",
    "DecoderMLP",
    "SegVolMaskDecoder",
    "SegVol",
]


def _default_image_encoder() -> ViT3DConfig:
    return ViT3DConfig(classification=False)


@dataclass(frozen=True)
class SegVolConfig:
    """Sizes of SegVol; the defaults are the released model's values.

    Attributes:
        image_encoder: the 3D ViT (no CLS token). Its ``hidden_size`` is also the prompt / decoder width ("embed dim",
            768), its ``img_size`` the output size of the logits and its patch grid the image-embedding size.
        mask_in_chans: channels of the (unused) mask-prompt downscaling convs (16).
        transformer_depth: two-way attention blocks in the mask decoder (2).
        transformer_num_heads: heads of every decoder attention (8).
        transformer_mlp_dim: hidden width of the decoder blocks' MLP (2048).
        attention_downsample_rate: the cross-attentions project to ``embed_dim // rate`` channels (2 -> 384).
        num_multimask_outputs: extra mask tokens for ambiguous prompts (3 -> 4 mask tokens); LaMed keeps mask 0.
        iou_head_depth: layers of the mask-quality MLP (3).
        iou_head_hidden_dim: hidden width of the mask-quality MLP (256).
    """

    image_encoder: ViT3DConfig = field(default_factory=_default_image_encoder)
    mask_in_chans: int = 16
    transformer_depth: int = 2
    transformer_num_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    def __post_init__(self) -> None:
        if self.image_encoder.classification:
            raise ConfigError("SegVol: the image encoder has no CLS token; use ViT3DConfig(classification=False).")
        for name in ("mask_in_chans", "transformer_depth", "transformer_num_heads", "transformer_mlp_dim",
                     "attention_downsample_rate", "iou_head_depth", "iou_head_hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"SegVol: {name}={value!r} must be a positive integer.")
        if self.num_multimask_outputs < 0:
            raise ConfigError(f"SegVol: num_multimask_outputs={self.num_multimask_outputs} must be >= 0.")
        # The upscaling path uses embed/4 and embed/8 channels and the positional encoding embed/2 frequencies.
        if self.embed_dim % 8:
            raise ConfigError(f"SegVol: image_encoder.hidden_size={self.embed_dim} must be divisible by 8.")
        if self.mask_in_chans % 4:
            raise ConfigError(f"SegVol: mask_in_chans={self.mask_in_chans} must be divisible by 4.")
        for dim in (self.embed_dim, self.embed_dim // self.attention_downsample_rate):
            if dim == 0 or dim % self.transformer_num_heads:
                raise ConfigError(
                    f"SegVol: transformer_num_heads={self.transformer_num_heads} must divide the decoder attention "
                    f"width {dim} (embed_dim={self.embed_dim}, attention_downsample_rate="
                    f"{self.attention_downsample_rate})."
                )

    @property
    def embed_dim(self) -> int:
        """Prompt / decoder width = image encoder width (768)."""
        return self.image_encoder.hidden_size

    @property
    def image_embedding_size(self) -> tuple[int, int, int]:
        """Spatial size (d, h, w) of the image embedding = the ViT patch grid, (8, 16, 16)."""
        return self.image_encoder.grid_size

    @property
    def img_size(self) -> tuple[int, int, int]:
        """Input image size (D, H, W) = size of the output logits, (32, 256, 256)."""
        return self.image_encoder.img_size

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1


# --------------------------------------------------------------------------------------------------------------------
# Prompt encoder
# --------------------------------------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a [B, C, H, W] map (SAM's; only used by the unused mask-prompt path)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 3D coordinates: ``[sin(2π (2c-1) G), cos(2π (2c-1) G)]`` with a fixed Gaussian G.

    G (``positional_encoding_gaussian_matrix`` [3, num_pos_feats]) is drawn once at training time and is part of the
    checkpoint: it is a *persistent* buffer and must be loaded, not re-drawn.
    """

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats), persistent=True)

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords [..., 3] in [0, 1] -> features [..., 2 * num_pos_feats]."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Encoding of every voxel centre of a (d, h, w) grid -> [2 * num_pos_feats, d, h, w]."""
        gaussian = self.positional_encoding_gaussian_matrix
        # Coordinates in float32 (exact for these grid sizes), features cast to the buffer's dtype at the end.
        axes = [(torch.arange(n, device=gaussian.device, dtype=torch.float32) + 0.5) / n for n in size]
        c0, c1, c2 = torch.meshgrid(*axes, indexing="ij")  # each [d, h, w]
        # The coordinate order is (axis 1, axis 0, axis 2): SAM's 2D (x=width, y=height) convention carried to 3D by
        # SegVol. The Gaussian's rows were trained in this order.
        coords = torch.stack([c1, c0, c2], dim=-1)  # [d, h, w, 3]
        return self.encode(coords).to(gaussian.dtype).permute(3, 0, 1, 2)  # [C, d, h, w]


class SegVolPromptEncoder(nn.Module):
    """Embeds SegVol prompts. LaMed uses the text prompt only: sparse = the text embedding, dense =
    ``no_mask_embed``."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        embed_dim = config.embed_dim
        self.embed_dim = embed_dim
        self.image_embedding_size = config.image_embedding_size
        self.input_image_size = config.img_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # Point / box-corner embeddings (positive, negative point; two box corners): kept for checkpoint parity.
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        # The original SAM mask-prompt path, 2D convs left unchanged by SegVol; unused, kept for checkpoint parity.
        chans = config.mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(chans // 4),
            nn.GELU(),
            nn.Conv2d(chans // 4, chans, kernel_size=2, stride=2),
            LayerNorm2d(chans),
            nn.GELU(),
            nn.Conv2d(chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, [1, C, d, h, w]."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def forward(self, text_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text_embedding [B, C] -> (sparse [B, 1, C], dense [B, C, d, h, w])."""
        sparse = text_embedding.unsqueeze(1)  # [B, 1, C]
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
            text_embedding.shape[0], -1, *self.image_embedding_size
        )  # [B, C, d, h, w]
        return sparse, dense


# --------------------------------------------------------------------------------------------------------------------
# Two-way transformer (SAM's, dimension-agnostic: it sees flattened image tokens)
# --------------------------------------------------------------------------------------------------------------------


class TwoWayAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate`` (SAM's Attention)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, heads, N, c/heads]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B, Nq, C], k/v [B, Nk, C] -> [B, Nq, C]
        q, k, v = (self._split_heads(self.q_proj(q)), self._split_heads(self.k_proj(k)),
                   self._split_heads(self.v_proj(v)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c/heads)) v
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


class TwoWayMLP(nn.Module):
    """Linear - ReLU - Linear (SAM's MLPBlock)."""

    def __init__(self, embedding_dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Tokens self-attend, tokens attend to the image, token MLP, image attends to the tokens (post-norm each).

    Positional encodings are re-added to queries and keys before every attention (values never get them). The first
    block skips the query PE in self-attention *and* its residual: there the tokens are replaced by the attention
    output, exactly as in SAM.
    """

    def __init__(self, config: SegVolConfig, skip_first_layer_pe: bool):
        super().__init__()
        dim, heads, rate = config.embed_dim, config.transformer_num_heads, config.attention_downsample_rate
        self.self_attn = TwoWayAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TwoWayAttention(dim, heads, downsample_rate=rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TwoWayMLP(dim, config.transformer_mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TwoWayAttention(dim, heads, downsample_rate=rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # queries/query_pe [B, T, C] (tokens), keys/key_pe [B, N, C] (image)
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer: ``depth`` blocks, then a last token-to-image attention and LayerNorm."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        dim = config.embed_dim
        self.layers = nn.ModuleList(
            [TwoWayAttentionBlock(config, skip_first_layer_pe=(i == 0)) for i in range(config.transformer_depth)]
        )
        self.final_attn_token_to_image = TwoWayAttention(
            dim, config.transformer_num_heads, downsample_rate=config.attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding [B, C, d, h, w], image_pe [B or 1, C, d, h, w], point_embedding (tokens) [B, T, C]
        -> (tokens [B, T, C], image tokens [B, d*h*w, C]); image tokens in (d, h, w) row-major order."""
        keys = image_embedding.flatten(2).transpose(1, 2)  # [B, N, C]
        key_pe = image_pe.flatten(2).transpose(1, 2).expand_as(keys)  # [B, N, C]
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


# --------------------------------------------------------------------------------------------------------------------
# Mask decoder
# --------------------------------------------------------------------------------------------------------------------


class DecoderMLP(nn.Module):
    """``num_layers`` Linears with ReLU between them (none after the last); keys ``layers.{i}``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList([nn.Linear(i, o) for i, o in zip(dims_in, dims_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class SegVolMaskDecoder(nn.Module):
    """SAM's mask decoder in 3D, plus SegVol's text-alignment term.

    Tokens [iou, mask_0..mask_M-1, prompt tokens] run through the two-way transformer with the image embedding; the
    image side is upscaled 4x by two transposed convs; each mask token's hypernetwork MLP gives a per-channel filter
    that is dotted with the upscaled embedding; the projected text embedding is dotted with it too and added to every
    mask.
    """

    def __init__(self, config: SegVolConfig):
        super().__init__()
        dim = config.embed_dim
        self.num_mask_tokens = config.num_mask_tokens
        self.transformer = TwoWayTransformer(config)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        d, h, w = config.image_embedding_size
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            # Normalises over channels AND space (shape (C/4, 2d, 2h, 2w)), with per-voxel affine weights: that is
            # what SegVol trained, unlike SAM's channel-only LayerNorm2d.
            nn.LayerNorm((dim // 4, 2 * d, 2 * h, 2 * w)),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            [DecoderMLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = DecoderMLP(dim, config.iou_head_hidden_dim, self.num_mask_tokens,
                                              config.iou_head_depth)
        self.txt_align_upscaled_embedding = nn.Linear(dim, dim // 8)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        text_embedding: torch.Tensor | None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings [B, C, d, h, w], image_pe [1, C, d, h, w], sparse [B, T, C], dense [B, C, d, h, w],
        text_embedding [B, C] or None -> (masks [B, 1 (or M-1), 4d, 4h, 4w], iou predictions [B, 1 (or M-1)])."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # [1+M, C]
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)
        src = image_embeddings + dense_prompt_embeddings  # [B, C, d, h, w]
        b, c, d, h, w = src.shape

        hs, src = self.transformer(src, image_pe, tokens)  # [B, 1+M+T, C], [B, N, C]
        iou_token_out = hs[:, 0]  # [B, C]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]  # [B, M, C]

        src = src.transpose(1, 2).reshape(b, c, d, h, w)
        upscaled = self.output_upscaling(src)  # [B, C/8, 4d, 4h, 4w]
        _, c8, ud, uh, uw = upscaled.shape
        upscaled = upscaled.reshape(b, c8, ud * uh * uw)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # [B, M, C/8]
        masks = hyper_in @ upscaled  # [B, M, 4d*4h*4w]
        if text_embedding is not None:
            text_down = self.txt_align_upscaled_embedding(text_embedding).unsqueeze(1)  # [B, 1, C/8]
            masks = masks + text_down @ upscaled  # same similarity map added to every mask
        masks = masks.reshape(b, self.num_mask_tokens, ud, uh, uw)
        iou_pred = self.iou_prediction_head(iou_token_out)  # [B, M]

        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]


# --------------------------------------------------------------------------------------------------------------------
# SegVol
# --------------------------------------------------------------------------------------------------------------------


class SegVol(nn.Module):
    """SegVol as LaMed uses it: image [B, 1, D, H, W] + text embedding [B, C] -> mask logits [B, 1, D, H, W]."""

    def __init__(self, config: SegVolConfig | None = None):
        super().__init__()
        self.config = config if config is not None else SegVolConfig()
        self.image_encoder = ViT3D(self.config.image_encoder)
        self.prompt_encoder = SegVolPromptEncoder(self.config)
        self.mask_decoder = SegVolMaskDecoder(self.config)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 1, D, H, W] (0-1 normalised, same tensor as the vision tower) -> embedding [B, C, d, h, w]."""
        tokens, _ = self.image_encoder(images)  # [B, N, C], N in (d, h, w) row-major order
        b, _, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, *self.config.image_embedding_size)

    def decode(self, image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """image_embedding [B or 1, C, d, h, w], text_embedding [B, C] -> logits [B, 1, D, H, W].

        One cached image embedding (batch 1) may be decoded against several prompts at once.
        """
        if text_embedding.dim() != 2 or text_embedding.shape[1] != self.config.embed_dim:
            raise InputError(
                f"SegVol.decode: text_embedding must be [B, {self.config.embed_dim}], got {list(text_embedding.shape)}."
            )
        n_img, n_txt = image_embedding.shape[0], text_embedding.shape[0]
        if n_img != n_txt:
            if n_img != 1:
                raise InputError(
                    f"SegVol.decode: {n_img} image embeddings but {n_txt} text embeddings; give one image embedding "
                    "per prompt or a single one shared by all prompts."
                )
            image_embedding = image_embedding.expand(n_txt, -1, -1, -1, -1)
        sparse, dense = self.prompt_encoder(text_embedding)
        low_res, _ = self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            text_embedding=text_embedding,
            multimask_output=False,
        )  # [B, 1, 4d, 4h, 4w]
        return F.interpolate(low_res, size=self.config.img_size, mode="trilinear", align_corners=False)

    def forward(self, images: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """images [B, 1, D, H, W], text_embedding [B, C] -> logits [B, 1, D, H, W]."""
        return self.decode(self.encode_image(images), text_embedding)
