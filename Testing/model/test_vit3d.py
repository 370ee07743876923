"""ViT3D / VisionTower: MONAI's own ViT as a numeric oracle, and the official key names and shapes."""

from __future__ import annotations

import time

import pytest
import torch

from M3DAssistantLib.errors import ConfigError, InputError
from M3DAssistantLib.model.vit3d import VisionTower, ViT3D, ViT3DConfig

pytest.importorskip("einops", reason="MONAI's ViT (the oracle) needs einops: pip install einops")
from monai.networks.nets import ViT as MonaiViT  # noqa: E402

SMALL = dict(in_channels=1, img_size=(16, 64, 64), patch_size=(4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=2,
             num_heads=2)

# BAAI-DCAI/M3D LaMed/src/model/multimodal_encoder/vit.py: the vision tower's keys (without the
# `model.vision_tower.vision_tower.` prefix) and shapes.
OFFICIAL_VIT_KEYS = {
    "cls_token": (1, 1, 768),
    "patch_embedding.patch_embeddings.1.weight": (768, 1024),
    "patch_embedding.patch_embeddings.1.bias": (768,),
    "patch_embedding.position_embeddings": (1, 2048, 768),
    "norm.weight": (768,),
    "norm.bias": (768,),
    **{
        f"blocks.{i}.{name}": shape
        for i in range(12)
        for name, shape in {
            "norm1.weight": (768,),
            "norm1.bias": (768,),
            "attn.qkv.weight": (2304, 768),
            "attn.out_proj.weight": (768, 768),
            "attn.out_proj.bias": (768,),
            "norm2.weight": (768,),
            "norm2.bias": (768,),
            "mlp.linear1.weight": (3072, 768),
            "mlp.linear1.bias": (3072,),
            "mlp.linear2.weight": (768, 3072),
            "mlp.linear2.bias": (768,),
        }.items()
    },
}


def monai_vit(config: ViT3DConfig) -> MonaiViT:
    """MONAI's ViT built the way the official code builds it (1.6 spells `pos_embed` as `proj_type`).

    The official copy of ViT comments out the classification head; MONAI's forward skips it when it is absent.
    """
    vit = MonaiViT(
        in_channels=config.in_channels,
        img_size=config.img_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        mlp_dim=config.mlp_dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        proj_type="perceptron",
        classification=config.classification,
        dropout_rate=0.0,
        qkv_bias=False,
    ).eval()
    if hasattr(vit, "classification_head"):
        del vit.classification_head
    return vit


def monai_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI >= 1.4 state dict -> official (MONAI 1.3) layout.

    The names of the shared parameters did not change; 1.4 added an unused `norm_cross_attn` LayerNorm (and a
    `cross_attn` that is an Identity unless with_cross_attention=True) to every block.
    """
    return {k: v for k, v in state.items() if ".norm_cross_attn." not in k and ".cross_attn." not in k}


def copy_monai_into_ours(monai: MonaiViT, ours: ViT3D) -> None:
    # Random non-trivial values everywhere (MONAI zero-inits biases and cls_token) so a swapped tensor shows.
    with torch.no_grad():
        for p in monai.parameters():
            p.normal_(0.0, 0.2)
    ours.load_state_dict(monai_to_official(monai.state_dict()), strict=True)


@pytest.mark.parametrize("classification", [True, False])
def test_matches_monai_vit_small(classification: bool) -> None:
    torch.manual_seed(0)
    config = ViT3DConfig(**SMALL, classification=classification)
    reference = monai_vit(config)
    ours = ViT3D(config).eval()
    copy_monai_into_ours(reference, ours)

    x = torch.rand(2, *(1, *config.img_size))
    with torch.no_grad():
        ref_last, ref_hidden = reference(x)
        our_last, our_hidden = ours(x)
    tokens = config.num_patches + (1 if classification else 0)
    assert our_last.shape == (2, tokens, config.hidden_size)
    assert len(our_hidden) == config.num_layers
    torch.testing.assert_close(our_last, ref_last, rtol=0, atol=1e-5)
    for ours_h, ref_h in zip(our_hidden, ref_hidden):
        torch.testing.assert_close(ours_h, ref_h, rtol=0, atol=1e-5)


def test_vision_tower_select_feature_and_layer() -> None:
    torch.manual_seed(1)
    config = ViT3DConfig(**SMALL)
    reference = monai_vit(config)
    patch = VisionTower(config).eval()
    copy_monai_into_ours(reference, patch.vision_tower)
    cls_patch = VisionTower(config, select_feature="cls_patch").eval()
    cls_patch.load_state_dict(patch.state_dict(), strict=True)
    block = VisionTower(config, select_layer=-2).eval()
    block.load_state_dict(patch.state_dict(), strict=True)

    x = torch.rand(1, 1, *config.img_size)
    with torch.no_grad():
        ref_last, ref_hidden = reference(x)
        out_patch, out_cls, out_block = patch(x), cls_patch(x), block(x)
    assert out_patch.shape == (1, config.num_patches, config.hidden_size) == (1, patch.num_tokens, patch.hidden_size)
    assert out_cls.shape == (1, config.num_patches + 1, config.hidden_size) == (1, cls_patch.num_tokens, 32)
    assert patch.num_patches == cls_patch.num_patches == 64
    torch.testing.assert_close(out_patch, ref_last[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_cls, ref_last, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_block, ref_hidden[-2][:, 1:], rtol=0, atol=1e-5)
    # The official key prefix is model.vision_tower.vision_tower.*: our wrapper contributes the second `vision_tower`.
    assert all(k.startswith("vision_tower.") for k in patch.state_dict())


def test_official_keys_and_shapes_on_meta() -> None:
    with torch.device("meta"):
        tower = VisionTower(ViT3DConfig())
    shapes = {k[len("vision_tower."):]: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert shapes == OFFICIAL_VIT_KEYS
    assert dict(tower.vision_tower.named_buffers()) == {}  # nothing non-persistent to re-create after meta init
    assert tower.num_patches == 2048 and tower.hidden_size == 768


def test_patch_token_order_is_d_major_then_h_then_w() -> None:
    # One bright voxel in patch (d=1, h=2, w=3) of a (2,4,4) grid must land in token 1*16 + 2*4 + 3 = 27.
    config = ViT3DConfig(img_size=(8, 64, 64), patch_size=(4, 16, 16), hidden_size=8, mlp_dim=8, num_layers=1,
                         num_heads=1)
    rearrange = ViT3D(config).patch_embedding.patch_embeddings[0]
    x = torch.zeros(1, 1, 8, 64, 64)
    x[0, 0, 4 + 1, 32 + 2, 48 + 3] = 1.0
    tokens = rearrange(x)
    assert tokens.shape == (1, 32, 1024)
    assert torch.nonzero(tokens).tolist() == [[0, 27, 1 * 256 + 2 * 16 + 3]]


def test_config_validation() -> None:
    assert ViT3DConfig(img_size=[32, 256, 256]).img_size == (32, 256, 256)  # JSON lists are accepted
    assert ViT3DConfig().grid_size == (8, 16, 16) and ViT3DConfig().patch_dim == 1024
    with pytest.raises(ConfigError, match="num_heads"):
        ViT3DConfig(hidden_size=768, num_heads=7)
    with pytest.raises(ConfigError, match="patch_size"):
        ViT3DConfig(img_size=(30, 256, 256))
    with pytest.raises(ConfigError, match="vision_select_layer"):
        VisionTower(ViT3DConfig(**SMALL), select_layer=0)
    with pytest.raises(ConfigError, match="vision_select_feature"):
        VisionTower(ViT3DConfig(**SMALL), select_feature="cls")
    with pytest.raises(ConfigError, match="classification"):
        VisionTower(ViT3DConfig(**SMALL, classification=False))
    with pytest.raises(InputError, match=r"\[B, 1, 16, 64, 64\]"):
        ViT3D(ViT3DConfig(**SMALL))(torch.zeros(1, 1, 16, 64, 32))


@pytest.mark.slow
def test_matches_monai_vit_official_size() -> None:
    torch.manual_seed(2)
    config = ViT3DConfig()
    reference = monai_vit(config)
    ours = ViT3D(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.02)
    ours.load_state_dict(monai_to_official(reference.state_dict()), strict=True)
    x = torch.rand(1, 1, *config.img_size)
    with torch.no_grad():
        start = time.perf_counter()
        ref_last, _ = reference(x)
        our_last, _ = ours(x)
        elapsed = time.perf_counter() - start
    assert our_last.shape == (1, 2049, 768)
    torch.testing.assert_close(our_last, ref_last, rtol=0, atol=1e-4)
    print(f"official-size ViT forward x2: {elapsed:.1f}s, max abs diff {(our_last - ref_last).abs().max():.2e}")
