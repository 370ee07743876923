"""SegVol: oracles from independent code (MONAI ViT, SAM's TwoWayTransformer, numpy, a functional re-derivation of the
decoder from the official code) and the official key names / shapes (BAAI-DCAI/M3D
LaMed/src/model/segmentation_module/segvol.py) at full size."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from M3DAssistantLib.errors import ConfigError, InputError
from M3DAssistantLib.model.segvol import SegVol, SegVolConfig, TwoWayTransformer
from M3DAssistantLib.model.vit3d import ViT3DConfig

TINY = SegVolConfig(
    image_encoder=ViT3DConfig(img_size=(16, 64, 64), patch_size=(4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=2,
                              num_heads=2, classification=False),
    transformer_num_heads=2,
    transformer_mlp_dim=48,
    iou_head_hidden_dim=16,
)


def randomise(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Non-trivial values in every parameter and buffer (LayerNorm ones / zero biases would hide swapped tensors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.copy_(torch.randn(t.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def tiny() -> SegVol:
    model = SegVol(TINY).eval()
    randomise(model, 0)
    return model


# --------------------------------------------------------------------------------------------------------------------
# (a) key names and shapes at the official size, against the reference table
# --------------------------------------------------------------------------------------------------------------------

def _linear(prefix: str, out_f: int, in_f: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_f, in_f), f"{prefix}.bias": (out_f,)}


def _attention(prefix: str, internal: int) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    for proj in ("q_proj", "k_proj", "v_proj"):
        keys |= _linear(f"{prefix}.{proj}", internal, 768)
    return keys | _linear(f"{prefix}.out_proj", 768, internal)


def _norm(prefix: str, shape: tuple[int, ...] = (768,)) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": shape, f"{prefix}.bias": shape}


def official_segvol_table() -> dict[str, tuple[int, ...]]:
    """BAAI-DCAI/M3D LaMed/src/model/segmentation_module/segvol.py, keys relative to `model.seg_module.`."""
    table: dict[str, tuple[int, ...]] = {
        "image_encoder.patch_embedding.patch_embeddings.1.weight": (768, 1024),
        "image_encoder.patch_embedding.patch_embeddings.1.bias": (768,),
        "image_encoder.patch_embedding.position_embeddings": (1, 2048, 768),
        **_norm("image_encoder.norm"),
    }
    for i in range(12):
        p = f"image_encoder.blocks.{i}"
        table |= _norm(f"{p}.norm1") | _norm(f"{p}.norm2") | {f"{p}.attn.qkv.weight": (2304, 768)}
        table |= _linear(f"{p}.attn.out_proj", 768, 768) | _linear(f"{p}.mlp.linear1", 3072, 768)
        table |= _linear(f"{p}.mlp.linear2", 768, 3072)
    # prompt encoder
    table["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = (3, 384)
    for i in range(4):
        table[f"prompt_encoder.point_embeddings.{i}.weight"] = (1, 768)
    table["prompt_encoder.not_a_point_embed.weight"] = (1, 768)
    table["prompt_encoder.no_mask_embed.weight"] = (1, 768)
    table |= {"prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2), "prompt_encoder.mask_downscaling.0.bias": (4,)}
    table |= _norm("prompt_encoder.mask_downscaling.1", (4,))
    table |= {"prompt_encoder.mask_downscaling.3.weight": (16, 4, 2, 2),
              "prompt_encoder.mask_downscaling.3.bias": (16,)}
    table |= _norm("prompt_encoder.mask_downscaling.4", (16,))
    table |= {"prompt_encoder.mask_downscaling.6.weight": (768, 16, 1, 1),
              "prompt_encoder.mask_downscaling.6.bias": (768,)}
    # mask decoder
    md = "mask_decoder"
    table |= {f"{md}.iou_token.weight": (1, 768), f"{md}.mask_tokens.weight": (4, 768)}
    table |= {f"{md}.output_upscaling.0.weight": (768, 192, 2, 2, 2), f"{md}.output_upscaling.0.bias": (192,)}
    table |= _norm(f"{md}.output_upscaling.1", (192, 16, 32, 32))
    table |= {f"{md}.output_upscaling.3.weight": (192, 96, 2, 2, 2), f"{md}.output_upscaling.3.bias": (96,)}
    for i in range(4):
        p = f"{md}.output_hypernetworks_mlps.{i}.layers"
        table |= _linear(f"{p}.0", 768, 768) | _linear(f"{p}.1", 768, 768) | _linear(f"{p}.2", 96, 768)
    p = f"{md}.iou_prediction_head.layers"
    table |= _linear(f"{p}.0", 256, 768) | _linear(f"{p}.1", 256, 256) | _linear(f"{p}.2", 4, 256)
    table |= _linear(f"{md}.txt_align_upscaled_embedding", 96, 768)
    for i in range(2):
        p = f"{md}.transformer.layers.{i}"
        table |= _attention(f"{p}.self_attn", 768)
        table |= _attention(f"{p}.cross_attn_token_to_image", 384)
        table |= _attention(f"{p}.cross_attn_image_to_token", 384)
        for n in range(1, 5):
            table |= _norm(f"{p}.norm{n}")
        table |= _linear(f"{p}.mlp.lin1", 2048, 768) | _linear(f"{p}.mlp.lin2", 768, 2048)
    table |= _attention(f"{md}.transformer.final_attn_token_to_image", 384)
    table |= _norm(f"{md}.transformer.norm_final_attn")
    return table


def test_official_keys_and_shapes_on_meta() -> None:
    with torch.device("meta"):
        model = SegVol()  # official defaults
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_segvol_table()
    # The Gaussian matrix is the only buffer, and it is persistent (in the state dict); nothing needs re-creating.
    buffers = dict(model.named_buffers())
    assert list(buffers) == ["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert model.config.image_embedding_size == (8, 16, 16) and model.config.img_size == (32, 256, 256)


# --------------------------------------------------------------------------------------------------------------------
# (b) numeric oracles
# --------------------------------------------------------------------------------------------------------------------

def test_image_encoder_matches_monai_vit(tiny: SegVol) -> None:
    pytest.importorskip("einops", reason="MONAI's ViT (the oracle) needs einops: pip install einops")
    from monai.networks.nets import ViT as MonaiViT

    vit = TINY.image_encoder
    reference = MonaiViT(in_channels=1, img_size=vit.img_size, patch_size=vit.patch_size, hidden_size=vit.hidden_size,
                         mlp_dim=vit.mlp_dim, num_layers=vit.num_layers, num_heads=vit.num_heads,
                         proj_type="perceptron", classification=False, dropout_rate=0.0).eval()
    # MONAI >= 1.4 adds an unused `norm_cross_attn` LayerNorm per block; every other name is the official one.
    mapped = {k: v for k, v in reference.state_dict().items() if ".norm_cross_attn." not in k}
    assert set(mapped) == set(tiny.image_encoder.state_dict())
    reference.load_state_dict({**reference.state_dict(), **tiny.image_encoder.state_dict()}, strict=True)

    x = torch.rand(2, 1, *vit.img_size)
    with torch.no_grad():
        ref_tokens, _ = reference(x)
        ours = tiny.encode_image(x)
    # The official SegVol.forward: transpose(1, 2).view(B, -1, d, h, w).
    expected = ref_tokens.transpose(1, 2).reshape(2, vit.hidden_size, *vit.grid_size)
    assert ours.shape == (2, 32, 4, 4, 4)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def numpy_dense_pe(gaussian: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """The reference doc's formula, written independently: voxel centres ((i+.5)/d, (j+.5)/h, (k+.5)/w) stacked as
    [axis1, axis0, axis2], mapped to [-1, 1], times G, times 2π, [sin, cos] -> [C, d, h, w]."""
    d, h, w = size
    out = np.zeros((2 * gaussian.shape[1], d, h, w))
    for i in range(d):
        for j in range(h):
            for k in range(w):
                c = np.array([(j + 0.5) / h, (i + 0.5) / d, (k + 0.5) / w])
                v = 2 * np.pi * ((2 * c - 1) @ gaussian)
                out[:, i, j, k] = np.concatenate([np.sin(v), np.cos(v)])
    return out


@pytest.mark.parametrize("size", [(4, 4, 4), (2, 3, 5), (8, 16, 16)])
def test_dense_positional_encoding_matches_numpy(size: tuple[int, int, int]) -> None:
    from M3DAssistantLib.model.segvol import PositionEmbeddingRandom

    layer = PositionEmbeddingRandom(24)
    ours = layer(size).numpy()
    expected = numpy_dense_pe(layer.positional_encoding_gaussian_matrix.double().numpy(), size)
    assert ours.shape == (48, *size)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5)


def test_get_dense_pe_uses_the_loaded_buffer(tiny: SegVol) -> None:
    gaussian = tiny.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    pe = tiny.prompt_encoder.get_dense_pe()
    assert pe.shape == (1, 32, 4, 4, 4)
    np.testing.assert_allclose(pe[0].numpy(), numpy_dense_pe(gaussian.double().numpy(), (4, 4, 4)), atol=2e-5)


def sam_two_way_transformer_class() -> type:
    """segment-anything's own TwoWayTransformer (pip install segment-anything).

    Its package __init__ imports torchvision for the image predictor; the modeling code needs only torch, so if
    torchvision is missing we import the modeling subpackage under a private alias without running that __init__.
    """
    try:
        from segment_anything.modeling.transformer import TwoWayTransformer as SamTwoWayTransformer

        return SamTwoWayTransformer
    except ModuleNotFoundError as error:
        if error.name == "segment_anything":
            pytest.skip("segment-anything (the oracle) is not installed: pip install segment-anything")
        spec = importlib.util.find_spec("segment_anything")
        alias = "_segment_anything_modeling_only"
        if alias not in sys.modules:
            package = types.ModuleType(alias)
            package.__path__ = list(spec.submodule_search_locations)  # type: ignore[union-attr]
            sys.modules[alias] = package
        return importlib.import_module(f"{alias}.modeling.transformer").TwoWayTransformer


def test_two_way_transformer_matches_segment_anything() -> None:
    sam_class = sam_two_way_transformer_class()
    ours = TwoWayTransformer(TINY).eval()
    randomise(ours, 1)
    reference = sam_class(depth=TINY.transformer_depth, embedding_dim=32, num_heads=2, mlp_dim=48,
                          attention_downsample_rate=2).eval()
    # Same parameter names: the strict load is itself the key-name check.
    reference.load_state_dict(ours.state_dict(), strict=True)

    gen = torch.Generator().manual_seed(2)
    image = torch.randn(3, 32, 4, 4, 4, generator=gen)
    pe = torch.randn(1, 32, 4, 4, 4, generator=gen)
    tokens = torch.randn(3, 6, 32, generator=gen)
    with torch.no_grad():
        our_q, our_k = ours(image, pe, tokens)
        # SAM is 2D; its transformer only flattens the spatial axes, so a 3D grid goes in as an (N, 1) "image".
        ref_q, ref_k = reference(image.reshape(3, 32, 64, 1), pe.reshape(1, 32, 64, 1).expand(3, -1, -1, -1), tokens)
    torch.testing.assert_close(our_q, ref_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_k, ref_k, rtol=0, atol=1e-5)


def _functional_attention(p: dict, prefix: str, q, k, v, heads: int):
    q = F.linear(q, p[f"{prefix}.q_proj.weight"], p[f"{prefix}.q_proj.bias"])
    k = F.linear(k, p[f"{prefix}.k_proj.weight"], p[f"{prefix}.k_proj.bias"])
    v = F.linear(v, p[f"{prefix}.v_proj.weight"], p[f"{prefix}.v_proj.bias"])
    b, nq, c = q.shape
    dh = c // heads
    q = q.view(b, nq, heads, dh).permute(0, 2, 1, 3)
    k = k.view(b, -1, heads, dh).permute(0, 2, 1, 3)
    v = v.view(b, -1, heads, dh).permute(0, 2, 1, 3)
    weights = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(dh), dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", weights, v).permute(0, 2, 1, 3).reshape(b, nq, c)
    return F.linear(out, p[f"{prefix}.out_proj.weight"], p[f"{prefix}.out_proj.bias"])


def _ln(p: dict, prefix: str, x):
    return F.layer_norm(x, p[f"{prefix}.weight"].shape, p[f"{prefix}.weight"], p[f"{prefix}.bias"])


def _mlp(p: dict, prefix: str, x, n: int):
    for i in range(n):
        x = F.linear(x, p[f"{prefix}.layers.{i}.weight"], p[f"{prefix}.layers.{i}.bias"])
        x = torch.relu(x) if i < n - 1 else x
    return x


def reference_decode(p: dict, image_embedding, text, heads: int, depth: int, out_size) -> torch.Tensor:
    """SegVol's decoder with text prompt, re-derived from the official segvol.py (BAAI-DCAI/M3D
    LaMed/src/model/segmentation_module/segvol.py) and the SAM paper, on raw tensors."""
    b, c, d, h, w = image_embedding.shape
    gaussian = p["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    pe = torch.tensor(numpy_dense_pe(gaussian.double().numpy(), (d, h, w)), dtype=torch.float32)
    key_pe = pe.reshape(c, -1).T.unsqueeze(0)  # [1, N, C]
    src = image_embedding + p["prompt_encoder.no_mask_embed.weight"].reshape(1, c, 1, 1, 1)
    keys = src.reshape(b, c, -1).transpose(1, 2)
    tokens = torch.cat([p["mask_decoder.iou_token.weight"], p["mask_decoder.mask_tokens.weight"]])
    tokens = torch.cat([tokens.unsqueeze(0).expand(b, -1, -1), text.unsqueeze(1)], dim=1)  # [B, 6, C]
    queries = tokens
    t = "mask_decoder.transformer"
    for i in range(depth):
        L = f"{t}.layers.{i}"
        if i == 0:
            queries = _functional_attention(p, f"{L}.self_attn", queries, queries, queries, heads)
        else:
            qq = queries + tokens
            queries = queries + _functional_attention(p, f"{L}.self_attn", qq, qq, queries, heads)
        queries = _ln(p, f"{L}.norm1", queries)
        queries = _ln(p, f"{L}.norm2", queries + _functional_attention(
            p, f"{L}.cross_attn_token_to_image", queries + tokens, keys + key_pe, keys, heads))
        hidden = torch.relu(F.linear(queries, p[f"{L}.mlp.lin1.weight"], p[f"{L}.mlp.lin1.bias"]))
        queries = _ln(p, f"{L}.norm3", queries + F.linear(hidden, p[f"{L}.mlp.lin2.weight"], p[f"{L}.mlp.lin2.bias"]))
        keys = _ln(p, f"{L}.norm4", keys + _functional_attention(
            p, f"{L}.cross_attn_image_to_token", keys + key_pe, queries + tokens, queries, heads))
    queries = _ln(p, f"{t}.norm_final_attn", queries + _functional_attention(
        p, f"{t}.final_attn_token_to_image", queries + tokens, keys + key_pe, keys, heads))

    u = "mask_decoder.output_upscaling"
    x = keys.transpose(1, 2).reshape(b, c, d, h, w)
    x = F.conv_transpose3d(x, p[f"{u}.0.weight"], p[f"{u}.0.bias"], stride=2)
    x = F.gelu(F.layer_norm(x, x.shape[1:], p[f"{u}.1.weight"], p[f"{u}.1.bias"]))
    x = F.gelu(F.conv_transpose3d(x, p[f"{u}.3.weight"], p[f"{u}.3.bias"], stride=2))  # [B, C/8, 4d, 4h, 4w]
    filt = _mlp(p, "mask_decoder.output_hypernetworks_mlps.0", queries[:, 1], 3)  # mask token 0 only
    txt = F.linear(text, p["mask_decoder.txt_align_upscaled_embedding.weight"],
                   p["mask_decoder.txt_align_upscaled_embedding.bias"])
    mask0 = torch.einsum("bc,bcdhw->bdhw", filt + txt, x).unsqueeze(1)  # (filter + text)·embedding
    return F.interpolate(mask0, size=out_size, mode="trilinear", align_corners=False)


def test_decode_matches_functional_reference(tiny: SegVol) -> None:
    params = {k: v.detach() for k, v in tiny.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    embedding = torch.randn(2, 32, 4, 4, 4, generator=gen)
    text = torch.randn(2, 32, generator=gen)
    with torch.no_grad():
        ours = tiny.decode(embedding, text)
        expected = reference_decode(params, embedding, text, heads=2, depth=2, out_size=TINY.img_size)
    assert ours.shape == (2, 1, 16, 64, 64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_forward_is_decode_of_encode_and_shared_image_embedding(tiny: SegVol) -> None:
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(1, 1, *TINY.img_size, generator=gen)
    texts = torch.randn(3, 32, generator=gen)
    with torch.no_grad():
        embedding = tiny.encode_image(images)
        shared = tiny.decode(embedding, texts)  # one cached volume, three prompts
        one_by_one = torch.cat([tiny(images, texts[i : i + 1]) for i in range(3)])
        _, iou = tiny.mask_decoder(embedding.expand(3, -1, -1, -1, -1), tiny.prompt_encoder.get_dense_pe(),
                                   *tiny.prompt_encoder(texts), text_embedding=texts, multimask_output=True)
    assert shared.shape == (3, 1, *TINY.img_size)
    torch.testing.assert_close(shared, one_by_one, rtol=0, atol=1e-5)
    assert iou.shape == (3, 3)  # multimask: masks 1..3
    with pytest.raises(InputError, match="image embeddings"):
        tiny.decode(torch.cat([embedding, embedding]), texts)
    with pytest.raises(InputError, match=r"\[B, 32\]"):
        tiny.decode(embedding, torch.zeros(1, 16))


def test_bfloat16_runs(tiny: SegVol) -> None:
    model = SegVol(TINY).eval()
    model.load_state_dict(tiny.state_dict())
    model.to(torch.bfloat16)
    images = torch.rand(1, 1, *TINY.img_size)
    text = torch.randn(1, 32)
    with torch.no_grad():
        low = model(images.bfloat16(), text.bfloat16())
        full = tiny(images, text)
    assert low.dtype == torch.bfloat16 and low.shape == full.shape
    # Loose: bf16 has ~3 significant digits; this only guards against a dtype path computing nonsense.
    assert torch.corrcoef(torch.stack([low.float().flatten(), full.flatten()]))[0, 1] > 0.99


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="classification"):
        SegVolConfig(image_encoder=ViT3DConfig())
    with pytest.raises(ConfigError, match="transformer_num_heads"):
        SegVolConfig(transformer_num_heads=7)
    with pytest.raises(ConfigError, match="iou_head_depth"):
        SegVolConfig(iou_head_depth=0)
    cfg = SegVolConfig()
    assert (cfg.embed_dim, cfg.num_mask_tokens, cfg.mask_in_chans) == (768, 4, 16)
