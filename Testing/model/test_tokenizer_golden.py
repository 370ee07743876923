"""Golden token ids: our prompt encoding vs an independent implementation of the slow SentencePiece rules.

The reference below uses the ``sentencepiece`` library directly and re-states the rules transformers' slow
``LlamaTokenizer`` applied when M3D was trained (split on added tokens; ``legacy=False``: one "▁" prefix for the
whole text, no dummy prefix after an added token; ``legacy=True``: a dummy prefix on every chunk). [SEG] is a normal
added token: it survives decoding with ``skip_special_tokens=True``; the box and image tokens do not.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import sentencepiece as spm

from M3DAssistantLib.model import encode_prompt, load_model
from M3DAssistantLib.model.tokenizer import decode

N_IMAGE = 8  # tiny checkpoints: 16x64x64 image -> 8 image tokens

# Official prompt shapes (BAAI-DCAI/M3D LaMed/src/dataset/multi_dataset.py): caption without a space after the image
# tokens, the other tasks with one.
PROMPTS = [
    "Please generate a medical report based on this image.",
    "Can you provide a caption consists of findings for this medical image?",
    " Which plane is this image in? Choices: A. Axial B. Coronal C. Sagittal D. Oblique",
    " What abnormality is seen in the left lobe of the liver?",
    " Where is liver in this image? Please output the box.",
    " Can you find the aorta in this image? Give coordinates.",
    " What target is present within the coordinates <bx_start>[0.094, 0.301, 0.223, 0.75, 0.617, 0.551]<bx_end> ?",
    " Do you know what it is in the bounding box <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end>?",
    " Can you segment the liver in this image?",
    " What is liver in this image? Please respond with segmentation mask.",
    " Description: an organ in the upper right abdomen that filters blood and produces bile. "
    "Please answer and segment.",
    "  two  spaces and ümlauts 42%",
]


def slow_reference_ids(sp: spm.SentencePieceProcessor, added: dict[str, int], text: str, legacy: bool) -> list[int]:
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    if not legacy:
        text = "▁" + text.replace("▁", " ")
    chunks = [c for c in re.split(pattern, text) if c != ""]
    if not legacy and chunks[0] == "▁" and len(chunks) > 1 and chunks[1] in added:
        chunks = chunks[1:]  # text that starts with an added token gets no prefix
    unk_len = len(sp.encode("<unk>"))
    ids: list[int] = []
    for chunk in chunks:
        if chunk in added:
            ids.append(added[chunk])
        elif legacy:
            ids += sp.encode(chunk)
        else:
            ids += sp.encode("<unk>" + chunk)[unk_len:]  # no dummy prefix inside the text
    return ids


@pytest.fixture(scope="module", params=[(False, True), (True, True), (False, False), (True, False)],
                ids=["legacy-false", "legacy-true", "legacy-false-no-bos", "legacy-true-no-bos"])
def tokenizer_case(request, tiny_phi3, tmp_path_factory):
    """``(model, tokenizer, sp, added, legacy, add_bos)`` for a copy of the tiny checkpoint with that tokenizer config
    (``add_bos_token: false`` as in Microsoft's current Phi-3 tokenizer config)."""
    legacy, add_bos = request.param
    folder = tmp_path_factory.mktemp("tok") / "ckpt"
    shutil.copytree(tiny_phi3, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["legacy"] = legacy
    config["add_bos_token"] = add_bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model, tokenizer = load_model(folder, device="cpu")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = {k: v for k, v in json.loads((folder / "added_tokens.json").read_text()).items()}
    return model, tokenizer, sp, added, legacy, add_bos


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_equal_slow_sentencepiece_reference(tokenizer_case, prompt, request):
    """The ids the slow tokenizer gave in training: BOS only where the tokenizer adds one, nothing of ours."""
    model, tokenizer, sp, added, legacy, add_bos = tokenizer_case
    if legacy and prompt.startswith(" "):
        # Known limitation (warned at load): transformers 5 cannot reproduce the old slow legacy=True spacing.
        request.applymarker(pytest.mark.xfail(strict=True, reason="legacy=True spacing after special tokens"))
    ours = encode_prompt(tokenizer, prompt, N_IMAGE)
    reference = [sp.bos_id()] * add_bos + slow_reference_ids(sp, added, "<im_patch>" * N_IMAGE + prompt, legacy)
    assert ours == reference


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_are_the_plain_tokenizer_call(tokenizer_case, prompt):
    """Exactly ``tokenizer("<im_patch>" * N + text).input_ids``, the call of every official script."""
    _, tokenizer, _, _, _, add_bos = tokenizer_case
    ours = encode_prompt(tokenizer, prompt, N_IMAGE)
    assert ours == tokenizer("<im_patch>" * N_IMAGE + prompt).input_ids
    assert (ours[0] == tokenizer.bos_token_id) == add_bos == tokenizer.m3d_special_tokens.adds_bos


def test_added_token_ids_follow_official_order(tokenizer_case):
    _, tokenizer, sp, added, _, _ = tokenizer_case
    special = tokenizer.m3d_special_tokens
    base = sp.get_piece_size() + 11  # Phi-3: 32000 SentencePiece pieces + 11 chat tokens, then M3D's four
    assert (special.image, special.box_start, special.box_end, special.seg) == (base, base + 1, base + 2, base + 3)


def test_decode_keeps_seg_and_drops_box_markers(tokenizer_case):
    _, tokenizer, sp, added, legacy, _ = tokenizer_case
    answer = (" The target is liver and the coordinates is <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end>. "
              "It is [SEG].")
    ids = slow_reference_ids(sp, added, answer, legacy)
    text = decode(tokenizer, ids)
    assert "[SEG]" in text and "<bx_start>" not in text and "[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]" in text


def test_legacy_spacing_is_warned(tokenizer_case, caplog):
    _, _, _, _, legacy, _ = tokenizer_case
    from M3DAssistantLib.model.tokenizer import _warn_if_legacy_spacing

    folder = tokenizer_case[0].checkpoint_path
    with caplog.at_level("WARNING"):
        _warn_if_legacy_spacing(folder)
    assert ("legacy SentencePiece spacing" in caplog.text) == legacy
