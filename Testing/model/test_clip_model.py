"""M3D-CLIP: config.json parsing, official key names and shapes, embedding shapes and normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from official_configs import OFFICIAL_CONFIG_JSON

from M3DAssistantLib.errors import ConfigError
from M3DAssistantLib.model.modeling_clip import M3DCLIP, M3DCLIPConfig

TINY_TEXT = {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
             "max_position_embeddings": 64, "vocab_size": 100}
TINY_JSON = {**OFFICIAL_CONFIG_JSON, "img_size": [16, 64, 64], "hidden_size": 32, "mlp_dim": 64, "num_layers": 2,
             "num_heads": 2, "max_text_len": 16, "vocab_size": 100, "text_config": TINY_TEXT}


@pytest.fixture(scope="module")
def tiny() -> M3DCLIP:
    torch.manual_seed(0)
    model = M3DCLIP(M3DCLIPConfig.from_dict(TINY_JSON)).eval()
    with torch.no_grad():  # non-trivial projections and CLS token
        for p in (model.mm_vision_proj.bias, model.mm_language_proj.bias, model.vision_encoder.cls_token):
            p.normal_()
    return model


def test_from_dict_reads_official_config_and_ignores_bookkeeping() -> None:
    config = M3DCLIPConfig.from_dict(OFFICIAL_CONFIG_JSON)
    assert config == M3DCLIPConfig(language_model_name_or_path="./LaMed/pretrained_model/bert_base_uncased/")
    assert config.img_size == (32, 256, 256) and config.patch_size == (4, 16, 16)
    assert config.vision_config.classification and config.vision_config.num_patches == 2048
    bert = config.bert_config()
    assert (bert.vocab_size, bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads,
            bert.intermediate_size, bert.max_position_embeddings, bert.layer_norm_eps) == (
        30522, 768, 12, 12, 3072, 512, 1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "lamed_phi3"}, "model_type='lamed_phi3'"),
        ({"pos_embed": "conv"}, "pos_embed='conv'"),
        ({"spatial_dims": 2}, "spatial_dims=2"),
        ({"num_layers": "12"}, "num_layers='12'"),
        ({"gather_loss": "yes"}, "gather_loss='yes'"),
        ({"dropout_rate": 2}, "dropout_rate=2"),
        ({"num_heads": 7}, "num_heads=7"),
        ({"img_size": [30, 256, 256]}, "patch_size"),
        ({"max_text_len": 1024}, "max_text_len=1024"),
        ({"text_config": {"vocab_size": 5}}, "vocab_size"),
        ({"text_config": [1, 2]}, "text_config"),
    ],
)
def test_unsupported_values_are_config_errors(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        M3DCLIPConfig.from_dict({**OFFICIAL_CONFIG_JSON, **change})


def test_official_keys_and_shapes_on_meta() -> None:
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = M3DCLIP(M3DCLIPConfig.from_dict(OFFICIAL_CONFIG_JSON))
        bert = BertModel(BertConfig())  # what BertModel.from_pretrained("bert-base-uncased") builds
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # BAAI-DCAI/M3D LaMed/src/model/CLIP.py: vision_encoder.* (= LaMed's ViT keys), language_encoder.* (BertModel),
    # projections, scale.
    vision = {k[len("vision_encoder."):]: s for k, s in shapes.items() if k.startswith("vision_encoder.")}
    assert vision["cls_token"] == (1, 1, 768)
    assert vision["patch_embedding.patch_embeddings.1.weight"] == (768, 1024)
    assert vision["patch_embedding.position_embeddings"] == (1, 2048, 768)
    assert vision["blocks.11.attn.qkv.weight"] == (2304, 768) and "blocks.11.attn.qkv.bias" not in vision
    assert vision["norm.weight"] == (768,) and len(vision) == 4 + 2 + 12 * 11
    language = {k[len("language_encoder."):]: s for k, s in shapes.items() if k.startswith("language_encoder.")}
    assert language == {k: tuple(v.shape) for k, v in bert.state_dict().items()}
    assert language["embeddings.word_embeddings.weight"] == (30522, 768)
    assert language["pooler.dense.weight"] == (768, 768)
    rest = {k: s for k, s in shapes.items() if not k.startswith(("vision_encoder.", "language_encoder."))}
    assert rest == {"mm_vision_proj.weight": (768, 768), "mm_vision_proj.bias": (768,),
                    "mm_language_proj.weight": (768, 768), "mm_language_proj.bias": (768,), "logit_scale": ()}


def test_position_ids_in_checkpoint_are_tolerated_and_buffers_materialise() -> None:
    config = M3DCLIPConfig.from_dict(TINY_JSON)
    source = M3DCLIP(config)
    state = source.state_dict()
    assert not set(M3DCLIP.ignorable_keys) & set(state)  # absent from our state dict...
    with_old_buffers = {**state, "language_encoder.embeddings.position_ids": torch.arange(64).expand(1, -1)}
    target = M3DCLIP(config)
    result = target.load_state_dict(with_old_buffers, strict=False)  # ...and tolerated when a checkpoint has them
    assert not result.missing_keys and set(result.unexpected_keys) <= set(M3DCLIP.ignorable_keys)

    with torch.device("meta"):
        on_meta = M3DCLIP(config)
    on_meta.load_state_dict(state, assign=True)
    on_meta.materialize_non_persistent_buffers()
    assert not [n for n, t in list(on_meta.named_parameters()) + list(on_meta.named_buffers()) if t.is_meta]
    torch.testing.assert_close(on_meta.language_encoder.embeddings.position_ids, torch.arange(64).expand(1, -1))


def test_embeddings_shapes_normalisation_and_similarity(tiny: M3DCLIP) -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 1, 16, 64, 64, generator=gen)
    input_ids = torch.randint(1, 100, (2, 16), generator=gen)
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    attention_mask[1, 10:] = 0
    with torch.no_grad():
        img = tiny.encode_image(images)
        txt = tiny.encode_text(input_ids, attention_mask)
        sim = M3DCLIP.similarity(img, txt)
        logits_per_image, logits_per_text = tiny(images, input_ids, attention_mask)
        # The official order: project and normalise every token, then take token 0.
        tokens, _ = tiny.vision_encoder(images)
        official_img = F.normalize(tiny.mm_vision_proj(tokens), dim=-1)[:, 0]
        hidden = tiny.language_encoder(input_ids, attention_mask=attention_mask)["last_hidden_state"]
        official_txt = F.normalize(tiny.mm_language_proj(hidden), dim=-1)[:, 0]
        # Padding beyond the mask must not change a text's embedding.
        padded_differently = input_ids.clone()
        padded_differently[1, 10:] = 0
        txt_repadded = tiny.encode_text(padded_differently, attention_mask)
    assert img.shape == (3, 32) and txt.shape == (2, 32) and sim.shape == (3, 2)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    assert sim.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(img, official_img)
    torch.testing.assert_close(txt, official_txt)
    torch.testing.assert_close(txt_repadded, txt, rtol=0, atol=1e-5)
    torch.testing.assert_close(sim, torch.nn.functional.cosine_similarity(img[:, None], txt[None], dim=-1))
    assert math.isclose(tiny.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    torch.testing.assert_close(logits_per_image, tiny.logit_scale * sim)
    torch.testing.assert_close(logits_per_text, logits_per_image.T)
