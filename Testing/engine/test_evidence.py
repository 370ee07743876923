"""Evidence maps: the attribution's mathematics on functions with known answers, the slice ranges, and the whole
engine path on a phantom CT with a tiny M3D-LaMed constructed so that its answer depends on one region only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evidence_phantom import region_only_model

from M3DAssistantLib.evidence import integrated_gradients, relevant_ranges
from M3DAssistantLib.geometry import to_model_input
from M3DAssistantLib.results import AnalysisOptions, SamplingOptions

# ------------------------------------------------------------------------------------------- the attribution maths


def test_integrated_gradients_is_exact_for_a_linear_function_and_complete():
    """For f(x) = w . x integrated gradients give w * x whatever the steps, and add up to f(x) - f(0)."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(1, 1, 4, 6, 5, generator=generator)
    x = torch.rand(1, 1, 4, 6, 5, generator=generator)
    for steps in (1, 3, 8):
        attributions, at_x, at_zero = integrated_gradients(lambda t: (w * t).sum() + 2.0, x, steps)
        torch.testing.assert_close(attributions, w * x, rtol=1e-5, atol=1e-6)
        assert at_zero == pytest.approx(2.0) and at_x == pytest.approx(float((w * x).sum()) + 2.0, rel=1e-5)
        assert float(attributions.sum()) == pytest.approx(at_x - at_zero, rel=1e-4)


def test_one_step_is_gradient_times_input_and_more_steps_converge_on_a_curved_function():
    """f(x) = sum(w x^3): one step is x * f'(x) = 3 w x^3 (gradient x input, which overshoots: it is not complete);
    n steps converge to the exact integrated gradients w x^3, whose sum is f(x) - f(0)."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(2, 3, 4, generator=generator)
    x = torch.rand(2, 3, 4, generator=generator) + 0.5
    f = lambda t: (w * t**3).sum()  # noqa: E731
    one, _, _ = integrated_gradients(f, x, 1)
    torch.testing.assert_close(one, 3 * w * x**3)
    errors = []
    for steps in (2, 8, 32):
        attributions, at_x, at_zero = integrated_gradients(f, x, steps)
        errors.append(float((attributions - w * x**3).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1 * float((w * x**3).abs().max())
    assert float(attributions.sum()) == pytest.approx(at_x - at_zero, rel=0.1)


def test_cancel_and_progress_between_steps():
    from M3DAssistantLib.errors import CancelledError

    seen = []

    def cancel():
        if len(seen) == 2:
            raise CancelledError("stop")

    with pytest.raises(CancelledError):
        integrated_gradients(lambda t: t.sum(), torch.ones(3), 5, check_cancel=cancel, progress=seen.append)
    assert [e.stage for e in seen] == ["evidence", "evidence"]


def test_analysis_options_refuse_bad_step_counts():
    from M3DAssistantLib.errors import InputError

    for steps in (0, 65, 2.5, True, "8"):
        with pytest.raises(InputError, match="evidence_steps"):
            AnalysisOptions(evidence=True, evidence_steps=steps)
    assert AnalysisOptions(evidence_steps=np.int64(4)).evidence_steps == 4


# ------------------------------------------------------------------------------------------------- slice ranges


@pytest.mark.parametrize("flip", [False, True])
def test_relevant_ranges_find_the_blob_on_the_volume_grid(flip):
    """A blob of positive evidence in model space comes back as the slice range and peak voxel of the volume where
    the blob is, whichever way the volume is stored."""
    array = np.zeros((30, 40, 50), np.int16)
    array[1:-1, 1:-1, 1:-1] = 100  # no foreground crop beyond the border
    ijk_to_ras = np.diag([0.7, 0.7, 2.0, 1.0])
    if flip:
        ijk_to_ras[2, 2] = -2.0  # K runs inferior: the model's D axis reads it backwards
    _, mapping = to_model_input(array, ijk_to_ras, model_shape=(16, 32, 32), window="minmax")
    values = np.zeros((16, 32, 32), np.float32)
    values[4:6, 10:14, 20:24] = 1.0
    values[12, 2, 2] = 0.2  # a weak second spot
    values[0, 0, 0] = -5.0  # negative evidence is not "relevant"
    ranges = relevant_ranges(values, mapping)
    assert ranges and ranges[0].share > 0.5
    centre = np.array([5.0, 11.5, 21.5, 1.0])  # (d, h, w) of the blob's centre
    i, j, k = (mapping.model_to_ijk @ centre)[:3]
    assert ranges[0].start <= k < ranges[0].stop
    pi, pj, pk = ranges[0].peak_ijk
    assert abs(pi - i) <= 2 and abs(pj - j) <= 2 and abs(pk - k) <= 2
    np.testing.assert_allclose(ranges[0].peak_ras, (mapping.ijk_to_ras @ [pi, pj, pk, 1])[:3], atol=1e-3)
    assert sum(r.share for r in ranges) <= 1.0 + 1e-9
    assert relevant_ranges(-np.abs(values), mapping) == []  # nothing supports the answer: no range


# ------------------------------------------------------------------------------------------ the phantom, end to end
PATCH = (2, 1, 2)  # the ViT patch (d, h, w) the constructed model looks at


@pytest.fixture(scope="module")
def phantom_engine(tiny_phi3):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.model import load_model

    model, tokenizer = load_model(tiny_phi3, device="cpu", dtype="float32")
    region = region_only_model(model, PATCH)
    return InferenceEngine((model, tokenizer)), region


def phantom_ct(seed=0):
    """Noise everywhere (so that every region has content), stored with a flip and anisotropic spacing."""
    rng = np.random.default_rng(seed)
    array = rng.normal(0.0, 50.0, (20, 70, 60)).astype(np.int16)
    ijk_to_ras = np.diag([-0.8, 0.9, 2.5, 1.0])
    ijk_to_ras[:3, 3] = (10.0, -20.0, 5.0)
    return array, ijk_to_ras


def test_the_evidence_map_peaks_in_the_only_region_the_answer_depends_on(phantom_engine):
    """Engine path (generate, then integrated gradients, then the volume's grid): the map peaks in the phantom's
    region the model reads, its top slice range holds it, and the attributions add up (completeness)."""
    engine, region = phantom_engine
    array, ijk_to_ras = phantom_ct()
    engine.set_volume(array, ijk_to_ras, window="minmax")
    result = engine.ask("Is it bright?", sampling=SamplingOptions(max_new_tokens=3),
                        analysis=AnalysisOptions(evidence=True, evidence_steps=8))
    evidence = result.evidence
    assert evidence.method == "integrated-gradients" and evidence.steps == 8
    values = evidence.model_values
    inside = np.zeros(values.shape, bool)
    inside[region] = True
    assert inside.flat[np.argmax(np.abs(values))]
    assert np.abs(values[inside]).sum() > 0.99 * np.abs(values).sum()
    gap = evidence.answer_logprob - evidence.baseline_logprob
    assert evidence.attribution_sum == pytest.approx(gap, rel=0.2, abs=1e-5)

    # on the CT's own grid: the strongest voxel lies in the CT voxels that the model region reads
    volume = evidence.on_volume()
    assert volume.shape == array.shape and volume.dtype == np.float32 and np.abs(volume).max() <= 1.0 + 1e-6
    k, j, i = np.unravel_index(np.argmax(np.abs(volume)), volume.shape)
    d, h, w = (evidence.mapping.ijk_to_model @ [i, j, k, 1.0])[:3]
    assert all(s.start - 0.5 <= c <= s.stop - 0.5 for c, s in zip((d, h, w), region)), (d, h, w)
    top = evidence.ranges[0]
    assert top.share > 0.5 and top.start <= k < top.stop
    from M3DAssistantLib.tasks import ASK

    assert evidence.mapping == to_model_input(array, ijk_to_ras, window="minmax", model_shape=values.shape,
                                              convention=ASK.convention)[1]  # the model input's own mapping


def test_the_peak_moves_with_the_region(tiny_phi3):
    """Twin of the test above with the model reading another patch: the map follows it (the peak is the model's
    dependence, not something in the image)."""
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.model import load_model

    model, tokenizer = load_model(tiny_phi3, device="cpu", dtype="float32")
    region = region_only_model(model, patch=(0, 3, 0))
    engine = InferenceEngine((model, tokenizer))
    engine.set_volume(*phantom_ct(), window="minmax")
    values = engine.ask("Is it bright?", sampling=SamplingOptions(max_new_tokens=3),
                        analysis=AnalysisOptions(evidence=True, evidence_steps=1)).evidence.model_values
    d, h, w = np.unravel_index(np.argmax(np.abs(values)), values.shape)
    assert all(s.start <= c < s.stop for c, s in zip((d, h, w), region))


def test_every_task_can_explain_itself_and_the_plain_task_is_unchanged(engine):
    """Evidence maps for a text, a choice, a box and a mask answer (random tiny weights: whatever they say); the
    answer is the same with or without the map."""
    from forcing import forced_answer

    plain = engine.choose("Which organ?", ["Liver", "Lung"], sampling=SamplingOptions(max_new_tokens=4))
    explained = engine.choose("Which organ?", ["Liver", "Lung"], sampling=SamplingOptions(max_new_tokens=4),
                              analysis=AnalysisOptions(evidence=True, evidence_steps=1))
    assert explained.text == plain.text and plain.evidence is None
    assert explained.evidence.mapping.volume_shape == engine._volume().array.shape
    assert explained.provenance.analysis["evidence"] is True
    with forced_answer(engine, " It is [SEG]."):
        seg = engine.segment("liver", sampling=SamplingOptions(max_new_tokens=8),
                             analysis=AnalysisOptions(evidence=True, evidence_steps=1))
    assert seg.evidence is not None and seg.evidence.model_values.shape == tuple(engine.model_shape)
    assert engine.counters["evidence"] == 2
