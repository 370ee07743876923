"""Confidence: token probabilities, multiple-choice option probabilities and mask confidence, each against an
independent computation (a teacher-forced forward pass, a brute-force resampling), forced and unforced."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from M3DAssistantLib.confidence import (
    choice_letter_ids,
    choice_probabilities,
    mask_with_confidence,
    token_confidence,
    token_pieces,
)
from M3DAssistantLib.geometry import logits_to_mask, model_values_to_volume, to_model_input
from M3DAssistantLib.results import AnalysisOptions, Confidence, SamplingOptions, TokenProbability

# ---------------------------------------------------------------------------------------------------------- tokens


def test_token_pieces_add_up_to_the_decoded_answer(tiny_phi3_model):
    from M3DAssistantLib.model.tokenizer import decode

    _, tokenizer = tiny_phi3_model
    rng = np.random.default_rng(0)
    texts = ["The liver is enlarged.", "Größe 3 cm – naïve ✓", "[SEG] it is."]
    for ids in [tokenizer(t, add_special_tokens=False).input_ids for t in texts] + [
            list(rng.integers(3, len(tokenizer), 40))]:
        ids = list(ids) + [tokenizer.eos_token_id]
        pieces = token_pieces(tokenizer, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == decode(tokenizer, ids)
        assert pieces[-1] == ""  # the end-of-answer token adds no text


def test_token_confidence_is_the_softmax_of_the_step_scores(tiny_phi3_model):
    _, tokenizer = tiny_phi3_model
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, len(tokenizer), generator=generator) * 3
    ids = [int(i) for i in torch.randint(3, len(tokenizer), (5,), generator=generator)]
    result = token_confidence(logits, ids, tokenizer)
    expected = torch.softmax(logits, dim=-1)[torch.arange(5), ids]
    np.testing.assert_allclose([t.probability for t in result.tokens], expected.numpy(), rtol=1e-5)
    assert result.mean_logprob == pytest.approx(float(torch.log(expected).mean()), rel=1e-5)
    assert token_confidence(logits[:0], [], tokenizer).mean_logprob is None


def test_low_spans_mark_the_unsure_tokens():
    tokens = [TokenProbability(1, "The ", 0.9), TokenProbability(2, "lesion", 0.2), TokenProbability(3, " is", 0.1),
              TokenProbability(4, " small", 0.8), TokenProbability(5, "", 0.01), TokenProbability(6, ".", 0.05)]
    confidence = Confidence(tokens, -1.0)
    assert confidence.low_spans() == [(4, 13), (19, 20)]
    assert confidence.low_spans(threshold=0.95) == [(0, 20)]
    assert Confidence.from_dict(confidence.to_dict()) == confidence


# ------------------------------------------------------------------------------------------------ multiple choice
@pytest.mark.parametrize("checkpoint", ["tiny_phi3", "tiny_llama"])
def test_each_letter_has_its_own_first_answer_token(checkpoint, request):
    """The token that starts "C. ..." after the prompt, as the trained sequences "prompt answer" tokenise."""
    from M3DAssistantLib.model import load_model
    from M3DAssistantLib.model.tokenizer import image_prefix
    from M3DAssistantLib.prompts import choice_prompt

    _, tokenizer = load_model(request.getfixturevalue(checkpoint), device="cpu", dtype="float32")
    prompt = choice_prompt("Which organ is enlarged?", ["Liver", "Lung", "Bone", "Brain"])
    ids = choice_letter_ids(tokenizer, prompt, "ABCD", 8)
    assert len(set(ids)) == 4 and [tokenizer.decode([i]).strip() for i in ids] == list("ABCD")
    full = tokenizer(image_prefix(8) + prompt + " C. Bone").input_ids
    base = tokenizer(image_prefix(8) + prompt).input_ids
    assert full[len(base)] == ids[2]  # what a model trained on "prompt C. Bone" learnt to write first


def test_choice_probabilities_are_normalised_over_the_offered_letters():
    logits = torch.full((100,), -5.0)
    logits[[10, 11, 12]] = torch.tensor([2.0, 1.0, 0.0])
    probabilities, mass = choice_probabilities(logits, [10, 11, 12], "ABC")
    assert sum(probabilities.values()) == pytest.approx(1.0)
    assert probabilities["A"] > probabilities["B"] > probabilities["C"]
    assert probabilities["A"] == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    assert 0 < mass < 1 and mass == pytest.approx(float(torch.softmax(logits, 0)[[10, 11, 12]].sum()))


def answer_position_logits(engine, prompt):
    """An independent forward pass (no cache, images as input): the scores at the answer position."""
    from M3DAssistantLib.model import encode_prompt

    ids = torch.tensor([encode_prompt(engine.tokenizer, prompt, engine.model.num_image_tokens)])
    with torch.no_grad():
        return engine.model(input_ids=ids, images=engine._view("choose").images, use_cache=False).logits[0, -1]


def test_option_probabilities_come_from_the_answer_position_forced_or_not(engine):
    """Unforced (random weights answer anything) and forced to "B. Lung": the option probabilities are the model's
    own at the answer position -- the same both times, equal to an independent forward pass -- and the chosen
    option's probability is read from them (forcing does not make the model sure)."""
    from forcing import forced_answer

    choices = ["Liver", "Lung", "Bone", "Brain"]
    sampling = SamplingOptions(max_new_tokens=6)
    unforced = engine.choose("Which organ?", choices, sampling=sampling)
    with forced_answer(engine, " B. Lung"):
        forced = engine.choose("Which organ?", choices, sampling=sampling)
    assert forced.letter == "B" and forced.probability == forced.confidence.choices["B"]
    for result in (unforced, forced):
        assert set(result.confidence.choices) == set("ABCD")
        assert sum(result.confidence.choices.values()) == pytest.approx(1.0)
        assert 0 < result.confidence.choice_mass <= 1
    assert forced.confidence.choices == pytest.approx(unforced.confidence.choices, rel=1e-4)
    letters = choice_letter_ids(engine.tokenizer, forced.provenance.prompt, "ABCD", engine.model.num_image_tokens)
    independent, _ = choice_probabilities(answer_position_logits(engine, forced.provenance.prompt), letters, "ABCD")
    assert forced.confidence.choices == pytest.approx(independent, rel=1e-3)
    assert forced.to_dict()["probability"] == forced.probability
    off = engine.choose("Which organ?", choices, sampling=sampling, analysis=AnalysisOptions(confidence=False))
    assert off.confidence is None and off.probability is None and off.text == unforced.text


# ------------------------------------------------------------------------------------------------------ free text
def teacher_forced(engine, result):
    """The probabilities of the answer's tokens from one teacher-forced pass over prompt + answer (no cache)."""
    from M3DAssistantLib.model import encode_prompt

    prompt = encode_prompt(engine.tokenizer, result.provenance.prompt, engine.model.num_image_tokens)
    answer = [t.token_id for t in result.confidence.tokens]
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt + answer]), images=engine._view("ask").images,
                              use_cache=False).logits[0]
    return torch.softmax(logits[len(prompt) - 1:-1], dim=-1)[torch.arange(len(answer)), answer].numpy()


def test_token_probabilities_are_the_teacher_forced_ones(engine):
    """The per-token probabilities of a generated answer equal those of one teacher-forced pass over prompt +
    answer: they are the model's probabilities of the tokens it wrote."""
    result = engine.ask("What is seen?", sampling=SamplingOptions(max_new_tokens=12))
    tokens = result.confidence.tokens
    assert "".join(t.text for t in tokens) == result.text and 0 < len(tokens) <= 12
    expected = teacher_forced(engine, result)
    np.testing.assert_allclose([t.probability for t in tokens], expected, rtol=1e-3, atol=1e-6)
    assert result.confidence.mean_logprob == pytest.approx(float(np.log(expected).mean()), rel=1e-3)


def test_sampled_answers_report_the_unsampled_distribution(engine):
    """Sampling with a temperature and top-p changes which tokens are written, not what their probability means:
    the model's own distribution before temperature and top-p, as the teacher-forced pass gives it."""
    result = engine.ask("What is seen?", sampling=SamplingOptions(max_new_tokens=6, do_sample=True, temperature=3.0,
                                                                  top_p=0.5, seed=1))
    np.testing.assert_allclose([t.probability for t in result.confidence.tokens], teacher_forced(engine, result),
                               rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("flip", [False, True])
def test_mask_confidence_is_computed_from_the_masks_own_resampling(flip):
    """The mask is exactly logits_to_mask's; the statistics equal a brute-force pass over the full float map."""
    rng = np.random.default_rng(1)
    array = rng.normal(0, 100, (24, 40, 36)).astype(np.int16)
    ijk_to_ras = np.diag([0.8, -0.8 if flip else 0.8, 2.0, 1.0])
    _, mapping = to_model_input(array, ijk_to_ras, window="minmax", model_shape=(8, 16, 16))
    logits = (rng.normal(0, 1, (8, 16, 16)) * 3).astype(np.float32)
    mask, confidence = mask_with_confidence(logits, mapping)
    np.testing.assert_array_equal(mask, logits_to_mask(logits, mapping))
    p = 1 / (1 + np.exp(-model_values_to_volume(logits, mapping, fill=-1e6).astype(np.float64)))
    assert confidence.mean_probability == pytest.approx(p[mask == 1].mean(), rel=1e-5)
    candidate = p > 0.3
    assert confidence.candidate_voxels == candidate.sum()
    assert confidence.uncertain_voxels == (candidate & (p < 0.7)).sum()
    assert confidence.uncertain_fraction == pytest.approx((candidate & (p < 0.7)).sum() / candidate.sum(), rel=1e-5)
    none, empty = mask_with_confidence(np.full((8, 16, 16), -20.0, np.float32), mapping)
    assert not none.any() and empty.mean_probability is None and empty.uncertain_fraction is None


def test_segmentation_results_carry_mask_confidence_and_the_same_mask_without(engine):
    from forcing import forced_answer

    with forced_answer(engine, " It is [SEG]."):
        with_confidence = engine.segment("liver", sampling=SamplingOptions(max_new_tokens=8))
        without = engine.segment("liver", sampling=SamplingOptions(max_new_tokens=8),
                                 analysis=AnalysisOptions(confidence=False))
    np.testing.assert_array_equal(with_confidence.mask, without.mask)
    mask_confidence = with_confidence.confidence.mask
    assert 0.5 < mask_confidence.mean_probability <= 1.0 and 0 <= mask_confidence.uncertain_fraction <= 1
    assert mask_confidence.candidate_voxels >= with_confidence.voxel_count
    assert without.confidence is None and without.measurements is not None  # measurements come with every mask
