"""Fidelity of what the model is fed: prompt ids exactly as the official tokenizer call, and the checkpoint's
generation defaults (``generation_config.json``) honoured as transformers' own ``from_pretrained`` + ``generate``.

Oracles that are not our own code: the tokenizer's plain call, transformers' plain Phi-3 model fed the official
positional splice, and transformers' own ``generate`` with the generation config transformers reads from the folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from M3DAssistantLib.errors import ConfigError
from M3DAssistantLib.model import encode_prompt, load_model
from M3DAssistantLib.model import random_checkpoint as rc

QUESTION = " What is liver in this image? Please output the segmentation mask."


def _tiny_copy(src, tmp_path, name="ckpt", add_bos=None, generation_config=None):
    folder = tmp_path / name
    shutil.copytree(src, folder)
    if add_bos is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["add_bos_token"] = add_bos
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


def _plain_lm(model):
    """transformers' plain Phi-3 with the checkpoint's language-model weights: an independent forward."""
    from transformers import Phi3ForCausalLM

    plain = Phi3ForCausalLM(model.lamed_config.text_config).eval()
    lm_state = {k: v for k, v in model.state_dict().items()
                if not k.startswith(("model.vision_tower", "model.mm_projector", "model.seg_"))}
    missing, unexpected = plain.load_state_dict(lm_state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return plain


def _official_embeds(plain, ids, features):
    """The official splice (lamed_arch.py): positions 1..N replaced by the image features, whatever they hold."""
    embeds = plain.get_input_embeddings()(ids).clone()
    embeds[:, 1:1 + features.shape[1]] = features
    return embeds


# ------------------------------------------------------------------------------------------------- prompt ids
@pytest.mark.parametrize("add_bos", [True, False], ids=["adds-bos", "no-bos"])
def test_logits_equal_reference_forward_on_the_plain_tokenizer_call(tiny_phi3, tmp_path, add_bos):
    model, tokenizer = load_model(_tiny_copy(tiny_phi3, tmp_path, add_bos=add_bos), device="cpu")
    n = model.num_image_tokens
    plain_ids = torch.tensor([tokenizer("<im_patch>" * n + QUESTION).input_ids])  # the official call, verbatim
    ours_ids = torch.tensor([encode_prompt(tokenizer, QUESTION, n)])
    assert torch.equal(ours_ids, plain_ids)
    assert (plain_ids[0, 0] == tokenizer.bos_token_id).item() is add_bos

    images = torch.rand(1, 1, *model.multimodal.image_size, generator=torch.Generator().manual_seed(3))
    plain = _plain_lm(model)
    with torch.no_grad():
        ours = model(images=images, input_ids=ours_ids).logits
        features = model.encode_images(images)
        reference = plain(inputs_embeds=_official_embeds(plain, plain_ids, features)).logits
        # what the old code did for a tokenizer without BOS: a BOS of its own, every position shifted by one
        shifted_ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), plain_ids], dim=1)
        shifted = plain(inputs_embeds=_official_embeds(plain, shifted_ids, features)).logits[:, 1:]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    if not add_bos:
        assert (shifted[0, -1] - reference[0, -1]).abs().max() > 1e-3  # the test would catch the old behaviour


def test_no_bos_tokenizer_cached_and_uncached_engine_answers_are_identical(tiny_phi3, tmp_path, ct):
    """The prefix KV cache covers positions 0..N, which without BOS includes the overwritten first question token."""
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.results import SamplingOptions

    loaded = load_model(_tiny_copy(tiny_phi3, tmp_path, add_bos=False), device="cpu")
    sampling = SamplingOptions(max_new_tokens=8)
    answers = []
    for caching in (True, False):
        engine = InferenceEngine(loaded, caching=caching)
        engine.set_volume(*ct, window="abdomen")
        answers.append([engine.ask(q, sampling=sampling).text for q in ("Is the liver enlarged?", "Which organ?")])
    assert answers[0] == answers[1]


# ------------------------------------------------------------------------------------------ generation config
def _greedy_ids(model, tokenizer, images, max_new_tokens=12):
    ids = torch.tensor([encode_prompt(tokenizer, QUESTION, model.num_image_tokens)])
    return model.generate(images, ids, max_new_tokens=max_new_tokens, do_sample=False)[0].tolist()


def _early_token(sequence, eos):
    """A token the model emits at step k >= 2 and not before: stopping there proves the EOS list is honoured."""
    for k in range(2, len(sequence)):
        if sequence[k] not in sequence[:k] and sequence[k] != eos:
            return k, sequence[k]
    pytest.skip("the random model repeats one token; no early stop token to test with")


def test_generation_config_eos_list_stops_generation_like_transformers(tiny_phi3, tmp_path):
    from transformers import GenerationConfig

    images = torch.rand(1, 1, 16, 64, 64, generator=torch.Generator().manual_seed(5))
    model, tokenizer = load_model(_tiny_copy(tiny_phi3, tmp_path, "without"), device="cpu")
    assert model.generation_config_source is None
    free = _greedy_ids(model, tokenizer, images, max_new_tokens=16)
    assert len(free) == 16  # runs on: the tokenizer's EOS alone never comes
    k, stop = _early_token(free, tokenizer.eos_token_id)

    folder = _tiny_copy(tiny_phi3, tmp_path, "with", generation_config={"eos_token_id": [tokenizer.eos_token_id, stop]})
    model, tokenizer = load_model(folder, device="cpu")
    assert model.generation_config_source == str(folder / "generation_config.json")
    ours = _greedy_ids(model, tokenizer, images, max_new_tokens=16)
    assert ours == free[:k + 1]  # ends at the listed token, inclusive, as transformers does

    # transformers' own: a plain Phi-3 given the generation config transformers reads from the folder
    plain = _plain_lm(model)
    plain.generation_config = GenerationConfig.from_pretrained(str(folder))
    ids = torch.tensor([encode_prompt(tokenizer, QUESTION, model.num_image_tokens)])
    with torch.no_grad():
        embeds = _official_embeds(plain, ids, model.encode_images(images))
        reference = plain.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert reference[0].tolist() == ours


def test_engine_answer_stops_at_a_generation_config_eos(tiny_phi3, tmp_path, ct):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.model.tokenizer import decode
    from M3DAssistantLib.results import SamplingOptions

    sampling = SamplingOptions(max_new_tokens=16)
    engine = InferenceEngine(load_model(_tiny_copy(tiny_phi3, tmp_path, "a"), device="cpu"))
    engine.set_volume(*ct, window="abdomen")
    free_text = engine.ask("Is the liver enlarged?", sampling=sampling).text
    ids = engine._generate(engine._view("vqa_open"), " Is the liver enlarged?", sampling, False, None)["ids"]
    k, stop = _early_token(ids, engine.tokenizer.eos_token_id)
    folder = _tiny_copy(tiny_phi3, tmp_path, "b", generation_config={"eos_token_id": stop})
    engine = InferenceEngine(load_model(folder, device="cpu"))
    engine.set_volume(*ct, window="abdomen")
    stopped = engine.ask("Is the liver enlarged?", sampling=sampling).text
    assert stopped == decode(engine.tokenizer, ids[:k + 1]) and len(stopped) < len(free_text)


def test_explicit_greedy_overrides_a_sampling_generation_config(tiny_phi3, tmp_path):
    """Llama-2-chat's generation config says do_sample with temperature 0.6; our greedy default still decides."""
    images = torch.rand(1, 1, 16, 64, 64, generator=torch.Generator().manual_seed(6))
    model, tokenizer = load_model(_tiny_copy(tiny_phi3, tmp_path, "plain"), device="cpu")
    greedy = _greedy_ids(model, tokenizer, images)
    sampling_config = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096}
    model, tokenizer = load_model(_tiny_copy(tiny_phi3, tmp_path, "sampling", generation_config=sampling_config),
                                  device="cpu")
    assert model.generation_config.do_sample is True
    assert _greedy_ids(model, tokenizer, images) == greedy


def test_official_generation_config_is_written_with_this_tokenizers_ids(tmp_path):
    folder = rc.write_random_lamed_checkpoint(tmp_path / "ckpt", "phi3", llm=rc.TINY_LLM,
                                              multimodal=rc.TINY_MULTIMODAL, generation_config="official",
                                              add_bos_token=False)
    model, tokenizer = load_model(folder, device="cpu")
    vocab = tokenizer.get_vocab()
    assert model.generation_config.eos_token_id == [vocab["<|endoftext|>"], vocab["<|assistant|>"], vocab["<|end|>"]]
    assert model.generation_config.pad_token_id == vocab["<|endoftext|>"]
    assert tokenizer.m3d_special_tokens.adds_bos is False


def test_generation_config_of_another_model_is_refused(tiny_phi3, tmp_path):
    folder = _tiny_copy(tiny_phi3, tmp_path, generation_config={"eos_token_id": [32000, 32007]})
    with pytest.raises(ConfigError, match=r"generation_config.json: token id\(s\) \[32000, 32007\] are not in"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize("add_bos", [True, False, None], ids=["true", "false", "unset"])
def test_inspect_prints_add_bos_token_and_its_meaning(tiny_phi3, tmp_path, add_bos):
    from M3DAssistantLib.model.inspection import format_report, inspect_checkpoint

    folder = _tiny_copy(tiny_phi3, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if add_bos is None:
        del config["add_bos_token"]  # LlamaTokenizer's default then: true
    else:
        config["add_bos_token"] = add_bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    text = format_report(inspect_checkpoint(folder, compare_with_model=False))
    line = next(ln for ln in text.splitlines() if ln.startswith("add_bos_token"))
    if add_bos is False:
        assert "false: prompts are <im_patch> x N + question, no BOS" in line and "overwritten" in line
    else:
        assert "true: prompts are BOS + <im_patch> x N + question" in line
    _, tokenizer = load_model(folder, device="cpu")
    assert tokenizer.m3d_special_tokens.adds_bos is (add_bos is not False)  # what inspect says is what loads
