"""M3D-CLIP: 3D ViT image encoder + BERT text encoder with linear projections, for image <-> report retrieval.

The official model (``GoodBaiBai88/M3D-CLIP``, BAAI-DCAI/M3D ``LaMed/src/model/CLIP.py``) is a transformers
``PreTrainedModel`` whose text encoder is ``BertModel.from_pretrained("bert-base-uncased")``. We build the same
modules from config values alone (no download: the BERT weights are part of the M3D-CLIP checkpoint) with the official
parameter names:

    vision_encoder.*    3D ViT with CLS token (:class:`~.vit3d.ViT3D`)
    language_encoder.*  transformers' ``BertModel`` (with pooler, as ``from_pretrained`` builds it)
    mm_vision_proj      Linear(768, 768)
    mm_language_proj    Linear(768, 768)
    logit_scale         scalar, initialised to log(1/0.07)

An image's embedding is the projected, L2-normalised CLS token of the ViT's final LayerNorm output; a text's is the
projected, L2-normalised [CLS] hidden state of BERT. Their dot product is the cosine similarity used for retrieval.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .plausibility import check_clip_sizes
from .vit3d import ViT3D, ViT3DConfig

if TYPE_CHECKING:  # transformers is imported lazily: it is heavy
    from transformers import BertConfig

__all__ = ["M3DCLIPConfig", "M3DCLIP", "BERT_BASE_UNCASED"]

logger = logging.getLogger(__name__)

# bert-base-uncased's architecture (its config.json), so the text encoder can be built without downloading anything.
BERT_BASE_UNCASED: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"M3D-CLIP config.json: {name}={value!r} must be a positive integer.")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"M3D-CLIP config.json: {name}={value!r} must be true or false.")


@dataclass(frozen=True)
class M3DCLIPConfig:
    """The fields of the official ``M3DCLIPConfig`` (``model_type`` "m3d_clip"), defaults as released.

    Attributes:
        language_model_name_or_path: where the official training loaded BERT from. Informational only: we never
            download it; the text encoder is built from ``text_config`` and filled from the checkpoint.
        local_loss, gather_loss: distributed contrastive-loss options of the official training (no effect here).
        in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads: the ViT (see ViT3DConfig).
        pos_embed: patch embedding type; only "perceptron" (the released model's) is supported.
        dropout_rate: ViT dropout during the official training (0). Our ViT has no dropout layers (inference only).
        spatial_dims: 3.
        max_text_len: token length texts are padded/truncated to by the tokenizer (128).
        vocab_size: BERT vocabulary size (30522).
        text_config: ours, absent from official configs: overrides of the BERT architecture (``BertConfig``
            keyword arguments; default bert-base-uncased), e.g. a tiny BERT for tests.
    """

    model_type: ClassVar[str] = "m3d_clip"

    language_model_name_or_path: str = ""
    local_loss: bool = False
    gather_loss: bool = True
    in_channels: int = 1
    img_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    pos_embed: str = "perceptron"
    dropout_rate: float = 0.0
    spatial_dims: int = 3
    max_text_len: int = 128
    vocab_size: int = 30522
    text_config: Optional[Mapping[str, Any]] = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.language_model_name_or_path is None:
            object.__setattr__(self, "language_model_name_or_path", "")
        if not isinstance(self.language_model_name_or_path, str):
            raise ConfigError(
                f"M3D-CLIP config.json: language_model_name_or_path={self.language_model_name_or_path!r} must be a "
                "string."
            )
        _check_bool("local_loss", self.local_loss)
        _check_bool("gather_loss", self.gather_loss)
        for name in ("in_channels", "hidden_size", "mlp_dim", "num_layers", "num_heads", "max_text_len", "vocab_size"):
            _check_int(name, getattr(self, name))
        if self.pos_embed != "perceptron":
            raise ConfigError(
                f"M3D-CLIP config.json: unsupported pos_embed={self.pos_embed!r}; only 'perceptron' (the released "
                "model's patch embedding) is implemented."
            )
        if self.spatial_dims != 3:
            raise ConfigError(f"M3D-CLIP config.json: unsupported spatial_dims={self.spatial_dims!r}; only 3 (3D).")
        if isinstance(self.dropout_rate, bool) or not isinstance(self.dropout_rate, (int, float)) or not (
            0.0 <= self.dropout_rate <= 1.0
        ):
            raise ConfigError(f"M3D-CLIP config.json: dropout_rate={self.dropout_rate!r} must be a number in [0, 1].")
        if self.dropout_rate > 0:
            logger.warning("M3D-CLIP dropout_rate=%s is not applied: our vision encoder is inference-only.",
                           self.dropout_rate)
        if self.text_config is not None and not isinstance(self.text_config, Mapping):
            raise ConfigError(f"M3D-CLIP config.json: text_config={self.text_config!r} must be an object.")
        # Both are validated (and normalised to tuples) by ViT3DConfig; keep the normalised form here too.
        vision = self.vision_config
        object.__setattr__(self, "img_size", vision.img_size)
        object.__setattr__(self, "patch_size", vision.patch_size)
        text = self.text_config_dict()
        if self.text_config and "vocab_size" in self.text_config and self.text_config["vocab_size"] != self.vocab_size:
            raise ConfigError(
                f"M3D-CLIP config.json: vocab_size={self.vocab_size} but text_config.vocab_size="
                f"{self.text_config['vocab_size']}; they must agree (or give only one)."
            )
        if self.max_text_len > text["max_position_embeddings"]:
            raise ConfigError(
                f"M3D-CLIP config.json: max_text_len={self.max_text_len} exceeds BERT's max_position_embeddings="
                f"{text['max_position_embeddings']}."
            )

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "M3DCLIPConfig":
        """Build from a config.json dict. Keys that are not fields (``architectures``, ``auto_map``,
        ``transformers_version``, ...) are ignored; a ``model_type`` other than "m3d_clip" is refused."""
        model_type = config.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(
                f"config.json: model_type={model_type!r} is not {cls.model_type!r}; this is not an M3D-CLIP checkpoint."
            )
        check_clip_sizes(config)  # before any size is used
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def vision_config(self) -> ViT3DConfig:
        """The ViT of the image branch (with CLS token)."""
        try:
            return ViT3DConfig(
                in_channels=self.in_channels,
                img_size=self.img_size,
                patch_size=self.patch_size,
                hidden_size=self.hidden_size,
                mlp_dim=self.mlp_dim,
                num_layers=self.num_layers,
                num_heads=self.num_heads,
                classification=True,
            )
        except ConfigError as e:
            raise ConfigError(f"M3D-CLIP config.json: {e}") from None

    def text_config_dict(self) -> dict[str, Any]:
        """BertConfig keyword arguments: bert-base-uncased, our ``vocab_size``, then ``text_config`` overrides."""
        return {**BERT_BASE_UNCASED, "vocab_size": self.vocab_size, **dict(self.text_config or {})}

    def bert_config(self) -> "BertConfig":
        """transformers' BertConfig for the text encoder."""
        from transformers import BertConfig

        return BertConfig(**self.text_config_dict())


class M3DCLIP(nn.Module):
    """M3D-CLIP with the official parameter names; see the module docstring."""

    # Non-persistent buffers of BertEmbeddings that checkpoints written by older transformers versions contain; a
    # strict loader should accept them whether present or absent (their values are fixed: arange / zeros).
    ignorable_keys: ClassVar[tuple[str, ...]] = (
        "language_encoder.embeddings.position_ids",
        "language_encoder.embeddings.token_type_ids",
    )

    def __init__(self, config: M3DCLIPConfig | None = None):
        super().__init__()
        from transformers import BertModel

        self.config = config if config is not None else M3DCLIPConfig()
        bert_config = self.config.bert_config()
        self.vision_encoder = ViT3D(self.config.vision_config)
        self.language_encoder = BertModel(bert_config)
        self.mm_vision_proj = nn.Linear(self.config.hidden_size, self.config.hidden_size)
        self.mm_language_proj = nn.Linear(bert_config.hidden_size, self.config.hidden_size)
        # Used as-is (not exponentiated, not clamped) by the official loss: logits = logit_scale * cosine.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, D, H, W] -> L2-normalised embeddings [B, hidden]."""
        tokens, _ = self.vision_encoder(images)  # [B, 1+N, hidden], final LayerNorm applied
        return F.normalize(self.mm_vision_proj(tokens[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids / attention_mask [B, L] (BERT tokenizer, max_text_len) -> L2-normalised embeddings [B, hidden]."""
        hidden = self.language_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.mm_language_proj(hidden[:, 0]), dim=-1)  # [CLS] token

    @staticmethod
    def similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix [B_img, B_txt] of normalised embeddings (rank texts per image along dim 1)."""
        return image_features @ text_features.transpose(0, 1)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img]), scaled by ``logit_scale``."""
        image, text = self.encode_image(images), self.encode_text(input_ids, attention_mask)
        logits = self.logit_scale * self.similarity(image, text)
        return logits, logits.transpose(0, 1)

    @torch.no_grad()
    def materialize_non_persistent_buffers(self, device: torch.device | str | None = None) -> None:
        """Recreate BERT's non-persistent buffers (position_ids, token_type_ids).

        They are not in the state dict, so after building on the meta device and loading a checkpoint they are
        still on the meta device; call this (with the weights' device) to give them their fixed values.
        """
        embeddings = self.language_encoder.embeddings
        device = torch.device(device) if device is not None else embeddings.word_embeddings.weight.device
        positions = self.language_encoder.config.max_position_embeddings
        position_ids = torch.arange(positions, device=device).expand((1, -1))
        embeddings.position_ids = position_ids
        embeddings.token_type_ids = torch.zeros(position_ids.shape, dtype=torch.long, device=device)
