"""M3D-CLIP loads from an official-layout checkpoint and ranks image/text pairs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from M3DAssistantLib.errors import ConfigError
from M3DAssistantLib.model import load_clip


def test_clip_strict_load_and_retrieval_shapes(tiny_clip):
    model, tokenizer = load_clip(tiny_clip, device="cpu", dtype="float32")
    state = model.state_dict()
    with safe_open(str(tiny_clip / "model.safetensors"), "pt") as f:
        for key in f.keys():
            assert torch.equal(state[key], f.get_tensor(key)), key
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    images = torch.rand(3, 1, 16, 64, 64)
    texts = tokenizer(["liver lesion", "kidney", "the lungs are clear"], padding=True, return_tensors="pt")
    img = model.encode_image(images)
    txt = model.encode_text(texts.input_ids, texts.attention_mask)
    sim = model.similarity(img, txt)
    assert sim.shape == (3, 3)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    assert torch.isfinite(sim).all() and float(sim.abs().max()) <= 1.0 + 1e-5


def test_clip_checkpoint_with_old_bert_position_ids_loads(tiny_clip, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["language_encoder.embeddings.position_ids"] = torch.arange(128)[None]
    save_file(state, str(folder / "model.safetensors"))
    model, _ = load_clip(folder, device="cpu")
    assert model.language_encoder.embeddings.position_ids.shape[-1] == 128


def test_lamed_checkpoint_is_not_clip(tiny_phi3):
    with pytest.raises(ConfigError, match="is not 'm3d_clip'"):
        load_clip(tiny_phi3, device="cpu")


def test_clip_config_is_official_layout(tiny_clip):
    config = json.loads((tiny_clip / "config.json").read_text())
    for field in ("language_model_name_or_path", "in_channels", "img_size", "patch_size", "hidden_size", "mlp_dim",
                  "num_layers", "num_heads", "pos_embed", "max_text_len", "vocab_size"):
        assert field in config
