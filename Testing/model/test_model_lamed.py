"""M3D-LaMed model: strict loading of official-layout checkpoints, the image splice, generation, [SEG] path.

Oracles that are not our own code: transformers' plain Phi3/Llama models fed our spliced embeddings; a numpy
re-computation of the spatial-pooling projector; a full-sequence forward for the [SEG] hidden-state alignment.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from forcing import ForceTokens

from M3DAssistantLib.errors import CheckpointError, ConfigError, InputError, TokenizerError
from M3DAssistantLib.model import encode_prompt, load_model
from M3DAssistantLib.model.configuration_lamed import parse_lamed_config, read_config_json
from M3DAssistantLib.model.modeling_lamed import build_lamed_model

QUESTION = "What is liver in this image? Please output the segmentation mask."


def _inputs(model, tokenizer, question=QUESTION, seed=0):
    ids = torch.tensor([encode_prompt(tokenizer, question, model.num_image_tokens)])
    shape = (1, 1, *model.multimodal.image_size)
    images = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return images, ids


# ------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("variant", ["tiny_phi3", "tiny_llama"])
def test_strict_load_every_tensor_from_checkpoint(variant, request):
    from safetensors import safe_open

    folder = request.getfixturevalue(variant)
    model, tokenizer = load_model(folder, device="cpu", dtype=torch.float32)
    state = model.state_dict()
    files = sorted(folder.glob("*.safetensors"))
    assert files, "fixture must write safetensors"
    seen = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                assert torch.equal(state[key], f.get_tensor(key)), key
                seen += 1
    assert seen == len(state)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    # rotary inv_freq (non-persistent) was recomputed, not left empty
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.isfinite(inv_freq).all() and inv_freq[0] == 1.0


def test_llama_fixture_is_sharded_with_index(tiny_llama):
    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_bin_checkpoint_loads_same_weights(tiny_phi3, tmp_path):
    from safetensors.torch import load_file

    from M3DAssistantLib.model.checkpoint_writer import save_state_dict

    folder = tmp_path / "bin"
    shutil.copytree(tiny_phi3, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    save_state_dict(state, folder, weights_format="bin")
    model, _ = load_model(folder, device="cpu", dtype=torch.float32)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtype_applies_to_floating_tensors(tiny_phi3, dtype):
    model, tokenizer = load_model(tiny_phi3, device="cpu", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.model.vision_tower.vision_tower.cls_token.dtype == dtype
    images, ids = _inputs(model, tokenizer)
    logits = model(images=images, input_ids=ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()


# ------------------------------------------------------------------------------------------- bad checkpoints
def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_truncated_safetensors_names_the_file(tiny_phi3, tmp_path):
    folder = _copy(tiny_phi3, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupted|truncated)"):
        load_model(folder, device="cpu")


def test_garbage_safetensors_header_names_the_file(tiny_phi3, tmp_path):
    folder = _copy(tiny_phi3, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        load_model(folder, device="cpu")


def test_missing_shard_names_the_shard(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*missing"):
        load_model(folder, device="cpu")


def test_wrong_model_type_is_refused(tiny_phi3, tmp_path):
    folder = _copy(tiny_phi3, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "phi3"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'phi3' is not an M3D-LaMed model"):
        load_model(folder, device="cpu")


def test_unsupported_field_value_is_refused_but_bookkeeping_ignored(tiny_phi3):
    raw = read_config_json(tiny_phi3)
    assert "auto_map" in raw and "architectures" in raw  # published bookkeeping fields are accepted
    parse_lamed_config(raw)
    for field, value in [("mm_projector_type", "qformer"), ("vision_select_layer", -2), ("proj_pooling_size", 3)]:
        with pytest.raises(ConfigError, match=field):
            parse_lamed_config({**raw, field: value})


def test_missing_tokenizer_names_the_folder(tiny_phi3, tmp_path):
    folder = _copy(tiny_phi3, tmp_path)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match=r"no tokenizer files"):
        load_model(folder, device="cpu")


def test_tokenizer_without_m3d_tokens_is_refused(tiny_phi3, tmp_path):
    from M3DAssistantLib.model.random_checkpoint import write_tokenizer

    folder = _copy(tiny_phi3, tmp_path)
    for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        (folder / name).unlink()
    write_tokenizer(folder, "phi3", (folder / "tokenizer.model").read_bytes(), m3d_tokens=False)
    with pytest.raises(TokenizerError, match=r"lacks the M3D token\(s\) <im_patch>, <bx_start>, <bx_end>, \[SEG\]"):
        load_model(folder, device="cpu")


def test_seg_token_id_mismatch_is_refused(tiny_phi3, tmp_path):
    folder = _copy(tiny_phi3, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["seg_token_id"] -= 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"seg_token_id=\d+ but the tokenizer maps \[SEG\] to \d+"):
        load_model(folder, device="cpu")


def test_missing_and_unexpected_keys_are_named(tiny_phi3, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_phi3, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("model.mm_projector.projector.2.bias")
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu")
    assert "model.mm_projector.projector.2.bias" in str(err.value) and "model.extra.weight" in str(err.value)


def test_shape_mismatch_names_tensor(tiny_phi3, tmp_path):
    folder = _copy(tiny_phi3, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["proj_layer_num"] = 2
    config["intermediate_size"] = 96  # the weights have 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\..*config\.json and the weights disagree"):
        load_model(folder, device="cpu")


def test_missing_local_folder_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_model(str(tmp_path / "does" / "not" / "exist"), device="cpu")


def test_hub_id_offline_says_how_to_use_a_local_folder(monkeypatch, tmp_path):
    from M3DAssistantLib.errors import ModelNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotAvailableError, match=r"--model PATH.*M3D_MODEL"):
        load_model("GoodBaiBai88/M3D-LaMed-Phi-3-4B", device="cpu")


def test_hub_revision_pinning_from_the_cache(monkeypatch, tmp_path, tiny_phi3):
    """``owner/name@revision`` or ``revision=`` picks that commit (or the commit a branch/tag points to) from the
    hub cache; without one the cache's ``main``; the engine's provenance names the commit it ran."""
    import shutil

    import huggingface_hub.constants as hc

    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.errors import CheckpointError
    from M3DAssistantLib.model.hub import resolve_checkpoint, split_revision

    cache = tmp_path / "hub"
    repo = cache / "models--GoodBaiBai88--M3D-LaMed-Phi-3-4B"
    old, new = "a" * 40, "b" * 40
    for commit in (old, new):
        shutil.copytree(tiny_phi3, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    (repo / "refs" / "v1.0").write_text(old)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    hub_id = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"
    assert resolve_checkpoint(hub_id).name == new
    assert resolve_checkpoint(f"{hub_id}@{old}").name == old
    assert resolve_checkpoint(f"{hub_id}@v1.0").name == old
    assert resolve_checkpoint(hub_id, revision="v1.0").name == old
    with pytest.raises(CheckpointError, match="give the revision once"):
        resolve_checkpoint(f"{hub_id}@v1.0", revision="main")
    assert split_revision(str(tmp_path / "my@folder")) == (str(tmp_path / "my@folder"), None)  # a path, not a pin

    engine = InferenceEngine(f"{hub_id}@v1.0", device="cpu", dtype="float32")
    assert engine.model_revision == old and engine.info()["revision"] == old


# ---------------------------------------------------------------------------------------------- key names
def _official_lamed_config(family):
    from M3DAssistantLib.model.random_checkpoint import official_config

    vocab = 32015 if family == "phi3" else 32004
    return parse_lamed_config(official_config(family, vocab_size=vocab, seg_token_id=vocab - 1,
                                              eos_token_id=32000 if family == "phi3" else 2,
                                              pad_token_id=32000 if family == "phi3" else 0))


@pytest.mark.parametrize("family,hidden", [("phi3", 3072), ("llama", 4096)])
def test_official_size_keys_and_shapes_match_reference_table(family, hidden):
    """Names and shapes of the official model (BAAI-DCAI/M3D LaMed/src/model/lamed_arch.py and its encoder,
    projector and segmentation module files), at the released sizes."""
    with torch.device("meta"):
        model = build_lamed_model(_official_lamed_config(family))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    vocab = 32015 if family == "phi3" else 32004
    expected = {
        "model.vision_tower.vision_tower.cls_token": [1, 1, 768],
        "model.vision_tower.vision_tower.patch_embedding.patch_embeddings.1.weight": [768, 1024],
        "model.vision_tower.vision_tower.patch_embedding.position_embeddings": [1, 2048, 768],
        "model.vision_tower.vision_tower.blocks.11.attn.qkv.weight": [2304, 768],
        "model.vision_tower.vision_tower.blocks.0.mlp.linear1.weight": [3072, 768],
        "model.vision_tower.vision_tower.norm.weight": [768],
        "model.mm_projector.projector.0.weight": [hidden, 768],
        "model.mm_projector.projector.2.weight": [hidden, hidden],
        "model.seg_projector.0.weight": [hidden, hidden],
        "model.seg_projector.2.weight": [768, hidden],
        "model.seg_module.image_encoder.patch_embedding.position_embeddings": [1, 2048, 768],
        "model.seg_module.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": [3, 384],
        "model.seg_module.mask_decoder.output_upscaling.1.weight": [192, 16, 32, 32],
        "model.seg_module.mask_decoder.mask_tokens.weight": [4, 768],
        "model.seg_module.mask_decoder.txt_align_upscaled_embedding.weight": [96, 768],
        "model.embed_tokens.weight": [vocab, hidden],
        "lm_head.weight": [vocab, hidden],
    }
    if family == "phi3":
        expected["model.layers.31.self_attn.qkv_proj.weight"] = [3 * 3072, 3072]
        expected["model.layers.0.mlp.gate_up_proj.weight"] = [2 * 8192, 3072]
    else:
        expected["model.layers.31.self_attn.q_proj.weight"] = [4096, 4096]
        expected["model.layers.0.mlp.gate_proj.weight"] = [11008, 4096]
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert "model.vision_tower.vision_tower.blocks.0.attn.qkv.bias" not in shapes  # qkv has no bias
    assert not any("pixel_mean" in k or "text_encoder" in k for k in shapes)
    assert model.num_image_tokens == 256


# --------------------------------------------------------------------------------------- forward and splice
def test_projector_matches_numpy_pooling(tiny_phi3_model):
    model, _ = tiny_phi3_model
    projector = model.model.mm_projector
    d, h, w = model.multimodal.patch_grid
    c = model.multimodal.mm_hidden_size
    feats = torch.randn(1, d * h * w, c)
    ours = projector(feats)[0].numpy()
    grid = feats[0].numpy().reshape(d, h, w, c)  # tokens are D-major
    k = model.multimodal.proj_pooling_size
    pooled = grid.reshape(d // k, k, h // k, k, w // k, k, c).mean(axis=(1, 3, 5)).reshape(-1, c)
    w0, b0 = (t.numpy() for t in (projector.projector[0].weight, projector.projector[0].bias))
    w2, b2 = (t.numpy() for t in (projector.projector[2].weight, projector.projector[2].bias))
    hidden = pooled @ w0.T + b0
    from scipy.special import erf

    hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))  # exact GELU
    np.testing.assert_allclose(ours, hidden @ w2.T + b2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["tiny_phi3", "tiny_llama"])
def test_logits_equal_plain_transformers_lm_on_spliced_embeddings(variant, request):
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    model, tokenizer = load_model(request.getfixturevalue(variant), device="cpu", dtype=torch.float32)
    images, ids = _inputs(model, tokenizer)
    ours = model(images=images, input_ids=ids).logits

    plain_cls = Phi3ForCausalLM if model.lamed_config.family == "phi3" else LlamaForCausalLM
    plain = plain_cls(model.lamed_config.text_config).eval()
    lm_state = {k: v for k, v in model.state_dict().items()
                if not k.startswith(("model.vision_tower", "model.mm_projector", "model.seg_"))}
    missing, unexpected = plain.load_state_dict(lm_state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    with torch.no_grad():
        feats = model.encode_images(images)
        embeds = plain.get_input_embeddings()(ids).clone()
        n = feats.shape[1]
        embeds[:, 1 : 1 + n] = feats  # the official positional splice
        reference = plain(inputs_embeds=embeds).logits
    assert n == model.num_image_tokens == 8
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_splice_puts_image_features_at_positions_1_to_n(tiny_phi3_model):
    model, tokenizer = tiny_phi3_model
    images, ids = _inputs(model, tokenizer)
    feats = model.encode_images(images)
    embeds = model.splice_image_features(ids, feats)
    n = feats.shape[1]
    token_embeds = model.get_input_embeddings()(ids)
    assert embeds.shape == token_embeds.shape
    torch.testing.assert_close(embeds[:, 0], token_embeds[:, 0])  # BOS kept
    torch.testing.assert_close(embeds[:, 1 : n + 1], feats)
    torch.testing.assert_close(embeds[:, n + 1 :], token_embeds[:, n + 1 :])  # question untouched
    assert ids[0, 0] == tokenizer.bos_token_id and (ids[0, 1 : n + 1] == tokenizer.m3d_special_tokens.image).all()


def test_images_of_wrong_shape_are_refused(tiny_phi3_model):
    model, tokenizer = tiny_phi3_model
    _, ids = _inputs(model, tokenizer)
    with pytest.raises(InputError, match=r"images must have shape \[B, 1, 16, 64, 64\]"):
        model(images=torch.rand(1, 1, 32, 256, 256), input_ids=ids)


def test_prompt_without_bos_is_the_plain_tokenizer_call(tiny_phi3, tmp_path):
    """As the official code: no BOS of our own; the splice overwrites the first question token (position N)."""
    folder = _copy(tiny_phi3, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model, tokenizer = load_model(folder, device="cpu")
    assert tokenizer.m3d_special_tokens.adds_bos is False
    n = model.num_image_tokens
    ids = encode_prompt(tokenizer, QUESTION, n)
    assert ids == tokenizer("<im_patch>" * n + QUESTION).input_ids
    assert ids[:n] == [tokenizer.m3d_special_tokens.image] * n and tokenizer.bos_token_id not in ids
    images = torch.rand(1, 1, *model.multimodal.image_size)
    embeds = model.splice_image_features(torch.tensor([ids]), model.encode_images(images))
    token_embeds = model.get_input_embeddings()(torch.tensor([ids]))
    torch.testing.assert_close(embeds[:, 0], token_embeds[:, 0])  # the first <im_patch> stays at position 0
    assert not torch.allclose(embeds[:, n], token_embeds[:, n])  # the first question token is overwritten
    torch.testing.assert_close(embeds[:, n + 1:], token_embeds[:, n + 1:])


def test_prompt_longer_than_context_is_refused(tiny_phi3_model):
    model, tokenizer = tiny_phi3_model
    with pytest.raises(InputError, match=r"prompt is \d+ tokens long .* at most 512"):
        encode_prompt(tokenizer, "liver " * 600, model.num_image_tokens)


# -------------------------------------------------------------------------------------------------- generate
def test_generate_returns_only_new_tokens_and_matches_forward_argmax(tiny_phi3_model):
    model, tokenizer = tiny_phi3_model
    images, ids = _inputs(model, tokenizer)
    out = model.generate(images, ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape == (1, 6)
    # greedy: each token is the argmax of a full forward over prompt + previous tokens
    seq = ids
    for t in range(6):
        logits = model(images=images, input_ids=seq).logits[:, -1]
        assert int(logits.argmax(-1)) == int(out[0, t])
        seq = torch.cat([seq, out[:, t : t + 1]], dim=1)


def test_seg_logits_for_forced_seg_token_match_full_forward_hidden_state(tiny_phi3_model):
    from transformers import LogitsProcessorList

    model, tokenizer = tiny_phi3_model
    images, ids = _inputs(model, tokenizer)
    seg = tokenizer.m3d_special_tokens.seg
    forced = [tokenizer.convert_tokens_to_ids("▁It"), seg, tokenizer.eos_token_id]
    out, logits = model.generate(images, ids, seg_enable=True, max_new_tokens=5, do_sample=False,
                                 logits_processor=LogitsProcessorList([ForceTokens(forced)]))
    assert out[0].tolist()[:2] == forced[:2]
    assert logits.shape == (1, 1, *model.multimodal.image_size) and torch.isfinite(logits).all()
    # independent alignment: the hidden state of the position that predicts [SEG] (the token before it)
    full = torch.cat([ids, out[:, :1]], dim=1)
    hidden = model(images=images, input_ids=full, output_hidden_states=True).hidden_states[-1][:, -1]
    prompt = model.model.seg_projector(hidden)
    reference = model.model.seg_module(images, prompt)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_seg_logits_are_minus_inf_without_seg_token(tiny_phi3_model):
    from transformers import LogitsProcessorList

    model, tokenizer = tiny_phi3_model
    images, ids = _inputs(model, tokenizer)
    forced = [tokenizer.convert_tokens_to_ids("▁Sure"), tokenizer.eos_token_id]
    out, logits = model.generate(images, ids, seg_enable=True, max_new_tokens=4, do_sample=False,
                                 logits_processor=LogitsProcessorList([ForceTokens(forced)]))
    assert tokenizer.m3d_special_tokens.seg not in out[0].tolist()
    assert torch.isneginf(logits).all()


def test_seg_token_first_is_captured(tiny_phi3_model):
    """The official code cannot segment when [SEG] is the first generated token; we use the prompt's last state."""
    from transformers import LogitsProcessorList

    model, tokenizer = tiny_phi3_model
    images, ids = _inputs(model, tokenizer)
    seg = tokenizer.m3d_special_tokens.seg
    out, logits = model.generate(images, ids, seg_enable=True, max_new_tokens=3, do_sample=False,
                                 logits_processor=LogitsProcessorList([ForceTokens([seg, tokenizer.eos_token_id])]))
    assert out[0, 0] == seg and torch.isfinite(logits).all()


def test_streamer_and_stopping_criteria_pass_through(tiny_phi3_model):
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            self.ended = True

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 3, dtype=torch.bool)

    model, tokenizer = tiny_phi3_model
    images, ids = _inputs(model, tokenizer)
    streamer = Collect()
    out = model.generate(images, ids, max_new_tokens=10, do_sample=False, streamer=streamer,
                         stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert out.shape[1] == 3 and streamer.ended
    assert streamer.tokens[-3:] == out[0].tolist()


def test_prefix_kv_cache_gives_identical_tokens(tiny_phi3_model):
    """The engine's hook: a cache of BOS + image tokens computed once, copied per question."""
    from transformers import DynamicCache

    model, tokenizer = tiny_phi3_model
    images, ids = _inputs(model, tokenizer)
    n = model.num_image_tokens + 1
    feats = model.encode_images(images)
    prefix = DynamicCache(config=model.config)
    with torch.no_grad():
        model(images=images, input_ids=ids[:, :n], use_cache=True, cache=prefix)
    plain = model.generate(image_features=feats, input_ids=ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    cached = model.generate(image_features=feats, input_ids=ids, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                            cache=copy.deepcopy(prefix))
    assert plain.tolist() == cached.tolist()
    assert prefix.get_seq_length() == n  # the shared prefix was not mutated through the copy


def test_sampling_is_seeded(tiny_phi3_model):
    model, tokenizer = tiny_phi3_model
    images, ids = _inputs(model, tokenizer)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(images, ids, max_new_tokens=5, do_sample=True, temperature=1.0, top_p=0.9).tolist())
    assert runs[0] == runs[1]
