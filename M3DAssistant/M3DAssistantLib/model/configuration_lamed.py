"""Configuration of M3D-LaMed checkpoints.

The published ``config.json`` of a LaMed checkpoint is the language model's config (Phi-3 or Llama) with the
multimodal fields written onto it at training time. We split it into two parts:

* ``text_config``: transformers' own ``Phi3Config`` / ``LlamaConfig``, built from the LLM fields;
* ``multimodal``: a :class:`MultimodalConfig` holding the vision / projector / segmentation fields.

Fields that exist only in our implementation (``vision_num_layers``, ``seg_num_layers``, ...) make the encoders
smaller for tests; they default to the official values and are absent from the official configs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from .plausibility import check_lamed_sizes

MODEL_TYPES = {"lamed_phi3": "phi3", "lamed_llama": "llama"}

# Keys the published configs carry for transformers' bookkeeping or remote code; they do not change the model.
IGNORED_KEYS = frozenset(
    {
        "auto_map",
        "architectures",
        "transformers_version",
        "_name_or_path",
        "tune_mm_mlp_adapter",
        "model_type",
        "torch_dtype",
        "dtype",
        "use_cache",
        "_attn_implementation_autoset",
    }
)


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
    """The multimodal part of a LaMed config (names as in the official config.json).

    Attributes:
        image_channel: input channels of the 3D image (1 for CT/MR).
        image_size: (D, H, W) of the model input, (32, 256, 256) for the released checkpoints.
        patch_size: (D, H, W) patch of the ViTs, (4, 16, 16).
        vision_tower: encoder kind; only "vit3d" exists.
        vision_select_layer: -1 = output of the final LayerNorm (the only path the official code supports).
        vision_select_feature: "patch" drops the CLS token, "cls_patch" keeps it.
        mm_hidden_size: width of the vision tower (768), also the SegVol prompt width.
        mm_projector_type: "spp" (spatial pooling projector) or "linear".
        proj_layer_type: "mlp" (Linear-GELU-Linear...) or "linear" (Linear stack).
        proj_layer_num: number of Linear layers in the projector.
        proj_pooling_type: "spatial" (avg_pool3d over the patch grid) or "sequence" (avg_pool1d over tokens).
        proj_pooling_size: pooling kernel/stride per axis (2 -> 8x fewer tokens).
        segmentation_module: "segvol" or None (no segmentation head).
        seg_token_id: token id of "[SEG]".
        vision_mlp_dim / vision_num_layers / vision_num_heads: vision tower sizes (ours; official 3072/12/12).
        seg_mlp_dim / seg_num_layers / seg_num_heads: SegVol image encoder sizes (ours; official 3072/12/12).
        seg_decoder_mlp_dim / seg_decoder_num_heads / seg_iou_head_hidden_dim: SegVol mask decoder sizes
            (ours; official 2048/8/256).
    """

    image_channel: int = 1
    image_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    vision_tower: str = "vit3d"
    vision_select_layer: int = -1
    vision_select_feature: str = "patch"
    mm_hidden_size: int = 768
    mm_projector_type: str = "spp"
    proj_layer_type: str = "mlp"
    proj_layer_num: int = 2
    proj_pooling_type: str = "spatial"
    proj_pooling_size: int = 2
    segmentation_module: Optional[str] = "segvol"
    seg_token_id: Optional[int] = None
    vision_mlp_dim: int = 3072
    vision_num_layers: int = 12
    vision_num_heads: int = 12
    seg_mlp_dim: int = 3072
    seg_num_layers: int = 12
    seg_num_heads: int = 12
    seg_decoder_mlp_dim: int = 2048
    seg_decoder_num_heads: int = 8
    seg_iou_head_hidden_dim: int = 256

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        return tuple(i // p for i, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_image_tokens(self) -> int:
        """Tokens the projector emits per image (256 for the released models); they fill positions 1..N."""
        grid = self.patch_grid
        if self.mm_projector_type == "linear":
            return grid[0] * grid[1] * grid[2] + (1 if self.vision_select_feature == "cls_patch" else 0)
        if self.proj_pooling_type == "spatial":
            n = 1
            for g in grid:
                n *= g // self.proj_pooling_size
            return n
        return (grid[0] * grid[1] * grid[2]) // self.proj_pooling_size**3

    def validate(self) -> None:
        """Raise ConfigError for any value our implementation (and the official one) does not support."""

        def bad(field: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"config.json: unsupported {field}={value!r}; supported: {allowed}.")

        if len(self.image_size) != 3 or len(self.patch_size) != 3:
            raise ConfigError(
                f"config.json: image_size {list(self.image_size)} and patch_size {list(self.patch_size)} must each "
                "have 3 values (D, H, W)."
            )
        for size, patch, axis in zip(self.image_size, self.patch_size, "DHW"):
            if patch <= 0 or size % patch:
                raise ConfigError(
                    f"config.json: image_size {list(self.image_size)} is not divisible by patch_size "
                    f"{list(self.patch_size)} along {axis}."
                )
        if self.image_channel != 1:
            raise bad("image_channel", self.image_channel, "1")
        if "vit3d" not in str(self.vision_tower).lower():
            raise bad("vision_tower", self.vision_tower, "'vit3d'")
        if self.vision_select_layer != -1:
            raise bad("vision_select_layer", self.vision_select_layer, "-1 (the official code's other path is broken)")
        if self.vision_select_feature not in ("patch", "cls_patch"):
            raise bad("vision_select_feature", self.vision_select_feature, "'patch', 'cls_patch'")
        if self.mm_projector_type not in ("spp", "linear"):
            raise bad("mm_projector_type", self.mm_projector_type, "'spp', 'linear'")
        if self.mm_projector_type == "spp":
            if self.vision_select_feature != "patch":
                raise ConfigError("config.json: mm_projector_type 'spp' needs vision_select_feature 'patch'.")
            if self.proj_layer_type not in ("mlp", "linear"):
                raise bad("proj_layer_type", self.proj_layer_type, "'mlp', 'linear'")
            if self.proj_layer_num < 1:
                raise bad("proj_layer_num", self.proj_layer_num, "an integer >= 1")
            if self.proj_pooling_type not in ("spatial", "sequence"):
                raise bad("proj_pooling_type", self.proj_pooling_type, "'spatial', 'sequence'")
            if self.proj_pooling_size < 1 or any(g % self.proj_pooling_size for g in self.patch_grid):
                raise bad("proj_pooling_size", self.proj_pooling_size, f"a divisor of the patch grid {self.patch_grid}")
        if self.segmentation_module is not None and "segvol" not in str(self.segmentation_module).lower():
            raise bad("segmentation_module", self.segmentation_module, "'segvol' or null")
        if self.mm_hidden_size % self.vision_num_heads or self.mm_hidden_size % self.seg_num_heads:
            raise ConfigError(
                f"config.json: mm_hidden_size {self.mm_hidden_size} must be divisible by the number of attention "
                f"heads ({self.vision_num_heads} vision, {self.seg_num_heads} SegVol)."
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"], d["patch_size"] = list(self.image_size), list(self.patch_size)
        # Keep official configs byte-compatible: only write our extra size fields when they differ from official.
        defaults = MultimodalConfig()
        for name in _EXTRA_FIELDS:
            if d[name] == getattr(defaults, name):
                del d[name]
        return d


_EXTRA_FIELDS = (
    "vision_mlp_dim",
    "vision_num_layers",
    "vision_num_heads",
    "seg_mlp_dim",
    "seg_num_layers",
    "seg_num_heads",
    "seg_decoder_mlp_dim",
    "seg_decoder_num_heads",
    "seg_iou_head_hidden_dim",
)
_MM_FIELDS = tuple(f.name for f in dataclasses.fields(MultimodalConfig))


@dataclasses.dataclass(frozen=True)
class LamedConfig:
    """A parsed LaMed config: the LLM's transformers config plus the multimodal fields."""

    model_type: str
    text_config: Any  # transformers Phi3Config | LlamaConfig
    multimodal: MultimodalConfig
    raw: dict

    @property
    def family(self) -> str:
        """'phi3' or 'llama'."""
        return MODEL_TYPES[self.model_type]

    def to_dict(self) -> dict[str, Any]:
        """The config.json content in the official layout (LLM fields + multimodal fields + model_type)."""
        d = self.text_config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            d.pop(key, None)
        d.update(self.multimodal.to_dict())
        d["model_type"] = self.model_type
        d["architectures"] = ["LamedPhi3ForCausalLM" if self.family == "phi3" else "LamedLlamaForCausalLM"]
        return d


def parse_multimodal_config(raw: dict, source: str = "config.json") -> MultimodalConfig:
    """The validated multimodal part of a LaMed config.json dict (no torch/transformers needed). Every size of the
    file, the language model's too, is checked for plausibility first (:mod:`.plausibility`)."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not an M3D-LaMed model; expected one of "
            f"{sorted(MODEL_TYPES)} (for M3D-CLIP use load_clip)."
        )
    check_lamed_sizes(raw, source)  # before any size is used: no division by zero, no 100000-layer build
    mm_kwargs = {}
    for name in _MM_FIELDS:
        if name in raw:
            value = raw[name]
            if name in ("image_size", "patch_size"):
                value = tuple(int(v) for v in value)
            mm_kwargs[name] = value
    if "vision_tower" not in raw:
        raise ConfigError(f"{source}: no 'vision_tower' field, so this is a plain language model, not M3D-LaMed.")
    multimodal = MultimodalConfig(**mm_kwargs)
    try:
        multimodal.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).removeprefix('config.json: ')}") from None
    return multimodal


def parse_lamed_config(raw: dict, source: str = "config.json") -> LamedConfig:
    """Build a :class:`LamedConfig` from a config.json dict; raise ConfigError naming the problem."""
    from transformers import LlamaConfig, Phi3Config

    multimodal = parse_multimodal_config(raw, source)
    model_type = raw["model_type"]
    text_kwargs = {k: v for k, v in raw.items() if k not in _MM_FIELDS and k not in IGNORED_KEYS}
    if text_kwargs.get("rope_scaling", 0) is None:
        del text_kwargs["rope_scaling"]  # transformers 5 spells "no scaling" as rope_parameters; null means default
    if text_kwargs.get("head_dim", 0) is None:
        del text_kwargs["head_dim"]  # null: the width follows from hidden_size / num_attention_heads
    config_class = Phi3Config if MODEL_TYPES[model_type] == "phi3" else LlamaConfig
    try:
        text_config = config_class(**text_kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: the language-model fields are invalid: {e}") from e
    if multimodal.segmentation_module is not None:
        if multimodal.seg_token_id is None:
            raise ConfigError(f"{source}: segmentation_module is set but seg_token_id is missing.")
        if not 0 <= multimodal.seg_token_id < text_config.vocab_size:
            raise ConfigError(
                f"{source}: seg_token_id {multimodal.seg_token_id} is outside the vocabulary (size "
                f"{text_config.vocab_size})."
            )
    return LamedConfig(model_type=model_type, text_config=text_config, multimodal=multimodal, raw=dict(raw))


def read_config_json(folder: Path) -> dict:
    """Read ``folder/config.json``; raise CheckpointError-style ConfigError naming the file when unreadable."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found. A checkpoint folder must contain config.json.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}). Re-download the checkpoint.") from e
