"""Plausible sizes in a checkpoint's config.json, checked before any model is built or any tensor is read.

A config with ``num_hidden_layers: 100000`` would build for minutes while memory grows, ``num_attention_heads: 0``
divides by zero, negative or fractional sizes fail deep inside torch: each is refused here in one line that names the
field, its value and the range taken. The ranges are generous -- far above Llama-2-7B (hidden 4096, 32 layers,
vocabulary 32000), Phi-3 (3072, 32, 32064) and today's largest open models (hidden 16384, 126 layers, 128 heads,
vocabulary 256000, contexts of a million tokens) -- so that a real future model is never refused, while a typo or a
hostile file is.

No torch, no transformers: ``m3d inspect`` and Slicer's process use this too.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import ConfigError

K = 1024
# field -> (lowest, highest) whole number taken; a field that is absent keeps the library default.
LLM_BOUNDS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 4 * K * K),
    "hidden_size": (1, 64 * K),
    "intermediate_size": (1, 256 * K),
    "num_hidden_layers": (1, K),
    "num_attention_heads": (1, K),
    "num_key_value_heads": (1, K),
    "head_dim": (1, K),
    "max_position_embeddings": (1, 16 * K * K),
    "original_max_position_embeddings": (1, 16 * K * K),
    "sliding_window": (1, 16 * K * K),
}
MULTIMODAL_BOUNDS: dict[str, tuple[int, int]] = {
    "mm_hidden_size": (1, 64 * K),
    "proj_layer_num": (1, 64),
    "proj_pooling_size": (1, K),
    "vision_mlp_dim": (1, 256 * K),
    "vision_num_layers": (1, K),
    "vision_num_heads": (1, K),
    "seg_mlp_dim": (1, 256 * K),
    "seg_num_layers": (1, K),
    "seg_num_heads": (1, K),
    "seg_decoder_mlp_dim": (1, 256 * K),
    "seg_decoder_num_heads": (1, K),
    "seg_iou_head_hidden_dim": (1, 64 * K),
    "seg_token_id": (0, 4 * K * K),
}
CLIP_BOUNDS: dict[str, tuple[int, int]] = {  # M3D-CLIP's ViT and its BERT (text_config) fields
    "hidden_size": (1, 64 * K),
    "mlp_dim": (1, 256 * K),
    "num_layers": (1, K),
    "num_heads": (1, K),
    "vocab_size": (1, 4 * K * K),
    "max_text_len": (1, 64 * K),
    "intermediate_size": (1, 256 * K),
    "num_hidden_layers": (1, K),
    "num_attention_heads": (1, K),
    "max_position_embeddings": (1, 64 * K),
    "type_vocab_size": (1, K),
}
IMAGE_SIZE_BOUNDS = (1, 4 * K)  # voxels of the model input along each of D, H, W
PATCH_SIZE_BOUNDS = (1, K)
MAX_PATCHES = K * K  # patches per image (the released models: 8 x 16 x 16 = 2048)
IMAGE_FIELDS = {"image_size": IMAGE_SIZE_BOUNDS, "patch_size": PATCH_SIZE_BOUNDS, "img_size": IMAGE_SIZE_BOUNDS}


def whole_number(source: str, field: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``, else ConfigError naming the field, the value and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{source}: {field}={value!r} is not plausible; expected an integer from {low:,} to "
                          f"{high:,}. Is the file corrupted or edited by hand?")
    return value


def _triple(source: str, field: str, value: Any, bounds: tuple[int, int]) -> tuple[int, int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{source}: {field}={value!r} is not plausible; expected 3 whole numbers (D, H, W), each "
                          f"from {bounds[0]:,} to {bounds[1]:,}.")
    return tuple(whole_number(source, f"{field}[{i}]", v, *bounds) for i, v in enumerate(value))  # type: ignore


NULLABLE = frozenset({"num_key_value_heads", "head_dim", "sliding_window", "seg_token_id"})
"""Fields whose null means something (as many key/value heads as heads, the width from hidden_size, no sliding
window, no segmentation); any other size may be absent (the library default) but not null."""


def check_sizes(raw: Mapping[str, Any], bounds: Mapping[str, tuple[int, int]], source: str) -> None:
    """Every field of ``bounds`` present in ``raw``."""
    for field, (low, high) in bounds.items():
        if field in raw and not (raw[field] is None and field in NULLABLE):
            whole_number(source, field, raw[field], low, high)


def check_image_sizes(raw: Mapping[str, Any], source: str, image_field: str = "image_size") -> None:
    """The input size and patch size (three whole numbers each) and the number of patches they make."""
    image = _triple(source, image_field, raw[image_field], IMAGE_SIZE_BOUNDS) if image_field in raw else None
    patch = _triple(source, "patch_size", raw["patch_size"], PATCH_SIZE_BOUNDS) if "patch_size" in raw else None
    if image and patch:
        patches = math.prod(i // p for i, p in zip(image, patch))
        if patches > MAX_PATCHES:
            raise ConfigError(f"{source}: {image_field} {list(image)} with patch_size {list(patch)} makes {patches:,} "
                              f"patches per image; at most {MAX_PATCHES:,} are plausible (the released models: 2,048).")


def check_lamed_sizes(raw: Mapping[str, Any], source: str = "config.json") -> None:
    """A LaMed config.json: the language model's sizes, the multimodal sizes, and how they must divide."""
    check_sizes(raw, LLM_BOUNDS, source)
    check_sizes(raw, MULTIMODAL_BOUNDS, source)
    check_image_sizes(raw, source)
    heads, kv_heads, head_dim = raw.get("num_attention_heads"), raw.get("num_key_value_heads"), raw.get("head_dim")
    if heads is not None and raw.get("hidden_size") is not None and head_dim is None:
        if raw["hidden_size"] % heads:
            raise ConfigError(f"{source}: hidden_size={raw['hidden_size']} is not divisible by num_attention_heads="
                              f"{heads}; each head must get the same width.")
        head_dim = raw["hidden_size"] // heads
    if head_dim is not None and head_dim % 2:
        raise ConfigError(f"{source}: the attention head width is {head_dim} (head_dim, or hidden_size / "
                          f"num_attention_heads); rotary position embeddings need an even width.")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
                          f"{kv_heads}; grouped-query attention shares each key/value head among whole groups.")
    width = raw.get("mm_hidden_size")
    for field in ("seg_decoder_num_heads",):
        if width is not None and raw.get(field) is not None and width % raw[field]:
            raise ConfigError(f"{source}: mm_hidden_size={width} is not divisible by {field}={raw[field]}.")


def check_clip_sizes(raw: Mapping[str, Any], source: str = "M3D-CLIP config.json") -> None:
    """An M3D-CLIP config.json: its ViT, its BERT overrides (``text_config``) and the image sizes."""
    check_sizes(raw, CLIP_BOUNDS, source)
    check_image_sizes(raw, source, "img_size")
    text = raw.get("text_config")
    if isinstance(text, Mapping):
        check_sizes(text, CLIP_BOUNDS, f"{source} (text_config)")
        heads = text.get("num_attention_heads")
        if heads is not None and text.get("hidden_size") is not None and text["hidden_size"] % heads:
            raise ConfigError(f"{source} (text_config): hidden_size={text['hidden_size']} is not divisible by "
                              f"num_attention_heads={heads}.")


__all__ = ["CLIP_BOUNDS", "LLM_BOUNDS", "MULTIMODAL_BOUNDS", "check_clip_sizes", "check_lamed_sizes", "whole_number"]
