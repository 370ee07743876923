"""InferenceEngine on the tiny official-layout checkpoint and the real test CT: every task, caching, cancellation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from forcing import force_answer

from M3DAssistantLib import AI_LABEL
from M3DAssistantLib.engine import InferenceEngine
from M3DAssistantLib.errors import CancelledError, InputError
from M3DAssistantLib.geometry import RasRoi
from M3DAssistantLib.results import SamplingOptions

SHORT = SamplingOptions(max_new_tokens=6)


def test_report_and_provenance(engine, ct):
    result = engine.report(sampling=SHORT)
    assert isinstance(result.text, str)
    prov = result.provenance
    assert prov.task == "report" and prov.label == AI_LABEL and prov.model.endswith("phi3")
    assert prov.model_revision.startswith("local-") and prov.dtype == "float32" and prov.device == "cpu"
    assert prov.prompt == "Please generate a medical report based on this image."
    assert prov.convention == "m3d-cap-v2@v1" and prov.sampling["max_new_tokens"] == 6
    assert result.to_dict()["provenance"]["label"] == AI_LABEL


def test_features_are_computed_once_per_volume_and_convention(engine, ct):
    engine.report(sampling=SHORT)
    engine.ask("Is the liver enlarged?", sampling=SHORT)
    engine.choose("Which plane?", ["Axial", "Coronal", "Sagittal", "Oblique"], sampling=SHORT)
    assert engine.counters["vision_tower"] == 1 and engine.counters["prefix"] == 1
    engine.locate("liver", sampling=SHORT)  # boxes use the M3D-Seg orientation: one more encoding
    engine.describe_region(RasRoi(center=np.array([-60.0, 130.0, 130.0]), size=np.array([80.0, 60.0, 40.0])),
                           sampling=SHORT)
    assert engine.counters["vision_tower"] == 2 and engine.counters["prefix"] == 2
    engine.set_volume(*ct, window="abdomen")  # same content and window: nothing recomputed
    engine.report(sampling=SHORT)
    assert engine.counters["vision_tower"] == 2
    engine.set_volume(*ct, window="lung")  # new window: new features
    engine.report(sampling=SHORT)
    assert engine.counters["vision_tower"] == 3
    edited = ct[0].copy()
    edited[0, 0, 0] += 1  # new content: new features
    engine.set_volume(edited, ct[1], window="lung")
    engine.report(sampling=SHORT)
    assert engine.counters["vision_tower"] == 4


TASKS = {
    "report": (lambda e, s: e._generate(e._view("report"), " Please generate a medical report based on this image.",
                                        s, False, None, True), None),
    "ask": (lambda e, s: e._generate(e._view("vqa_open"), " Is there a lesion?", s, False, None, True), None),
    "locate": (lambda e, s: e._generate(e._view("rec"), " Where is liver in this image? Please output the box.",
                                        s, False, None, True), None),
    "segment": (lambda e, s: e._generate(e._view("seg"),
                                         " What is liver in this image? Please respond with segmentation mask.",
                                         s, True, None, True), " It is [SEG]."),
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_cached_and_uncached_runs_are_identical(tiny_phi3_model, ct, task):
    run, forced = TASKS[task]
    outputs = []
    for caching in (True, False):
        engine = InferenceEngine(tiny_phi3_model, caching=caching)
        engine.set_volume(*ct, window="abdomen")
        restore = force_answer(engine, forced) if forced else None
        try:
            run(engine, SamplingOptions(max_new_tokens=8))  # warm the caches (no-op without caching)
            outputs.append(run(engine, SamplingOptions(max_new_tokens=8)))
        finally:
            if restore:
                restore()
    cached, plain = outputs
    assert cached["ids"] == plain["ids"]
    torch.testing.assert_close(cached["logits"], plain["logits"], rtol=1e-4, atol=1e-4)
    if forced:
        assert torch.isfinite(cached["seg_logits"]).all()
        torch.testing.assert_close(cached["seg_logits"], plain["seg_logits"], rtol=1e-4, atol=1e-4)


def test_segment_maps_mask_to_the_original_grid(engine, ct):
    restore = force_answer(engine, " It is [SEG].")
    try:
        result = engine.segment("liver", sampling=SHORT)
    finally:
        restore()
    assert "[SEG]" in result.text and result.parse_error is None
    assert result.mask is not None and result.mask.shape == ct[0].shape and result.mask.dtype == np.uint8
    assert result.provenance.convention == "m3d-seg-v1@v1"
    assert engine.counters["seg_encoder"] == 1
    engine.segment("spleen", sampling=SHORT)
    assert engine.counters["seg_encoder"] == 1  # SegVol embedding reused
    result2 = engine.segment_expression("the large organ in the right upper abdomen", sampling=SHORT)
    assert result2.provenance.convention == "m3d-refseg-v1@v1"  # M3D-RefSeg's own orientation: a new view
    assert engine.counters["seg_encoder"] == 2
    assert result2.mask is None and result2.parse_error  # random answer: no [SEG], no mask, no exception


def test_segment_absent_target(engine):
    restore = force_answer(engine, " Sorry, there is no pancreas.")
    try:
        result = engine.segment("pancreas", sampling=SHORT)
    finally:
        restore()
    assert result.absent and result.mask is None and result.parse_error is None


def test_locate_parses_box_and_maps_to_ras(engine):
    restore = force_answer(engine, " Coordinates are <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end>.")
    try:
        result = engine.locate("liver", sampling=SamplingOptions(max_new_tokens=40))
    finally:
        restore()
    assert result.box == (0.1, 0.2, 0.3, 0.5, 0.6, 0.7)
    assert result.roi is not None and np.all(np.asarray(result.roi.size) > 0)
    assert result.to_dict()["roi_ras"]["center"] == pytest.approx(list(result.roi.center))


def test_malformed_box_answer_is_reported_not_raised(engine):
    restore = force_answer(engine, " Coordinates are [0.1, 0.2, oops].")
    try:
        result = engine.locate("liver", sampling=SamplingOptions(max_new_tokens=30))
    finally:
        restore()
    assert result.box is None and result.roi is None and "could not read a box" in result.parse_error


def test_choose_parses_letter(engine):
    restore = force_answer(engine, " C. Sagittal")
    try:
        result = engine.choose("Which plane is this?", ["Axial", "Coronal", "Sagittal", "Oblique"], sampling=SHORT)
    finally:
        restore()
    assert (result.letter, result.choice) == ("C", "Sagittal")


@pytest.mark.parametrize("choices,message", [([], "between 2 and 8"), (["Liver", "liver"], "duplicates")])
def test_bad_choices(engine, choices, message):
    with pytest.raises(InputError, match=message):
        engine.choose("Which organ?", choices)


@pytest.mark.parametrize("question", ["", "   \n", "x" * 100_000])
def test_bad_questions(engine, question):
    with pytest.raises(InputError):
        engine.ask(question)


def test_history_is_trimmed_to_fit_the_context(engine):
    history = [("What is seen in the liver " * 10, "A lesion in the right lobe " * 10)] * 5
    result = engine.ask("And the kidneys?", history=history, sampling=SHORT)
    assert any("dropped the" in note for note in result.provenance.notes)


def test_streaming_yields_text_then_result(engine):
    items = list(engine.stream("report", sampling=SamplingOptions(max_new_tokens=8)))
    *chunks, result = items
    assert all(isinstance(c, str) for c in chunks)
    assert "".join(chunks) == result.text


def test_cancel_from_another_thread_stops_generation(engine):
    started = threading.Event()

    def on_text(_):
        started.set()
        engine.cancel()

    with pytest.raises(CancelledError):
        engine.report(sampling=SamplingOptions(max_new_tokens=200), on_text=on_text)
    assert started.is_set()
    engine.report(sampling=SHORT)  # the next request runs normally


def test_no_volume_is_a_clear_error(tiny_phi3_model):
    with pytest.raises(InputError, match="no volume is set"):
        InferenceEngine(tiny_phi3_model).report()
