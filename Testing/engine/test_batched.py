"""Batched decoding (engine.run_batch, m3d batch --batch-size): the answers of batch size 1, token for token.

Every task runs in one batch beside the others, on two volumes, with prompts of different lengths (left padding),
rows that stop at different lengths, and a row that segments beside rows that do not; each row is compared with the
same request run alone: generated ids identical, logits equal to float rounding, parsed results and masks equal.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from m3d_cli import m3d

from M3DAssistantLib.batched import BatchRequest
from M3DAssistantLib.engine import InferenceEngine
from M3DAssistantLib.errors import CancelledError, InputError
from M3DAssistantLib.geometry import RasRoi
from M3DAssistantLib.results import SamplingOptions

ROI = RasRoi(center=np.array([-60.0, 130.0, 130.0]), size=np.array([80.0, 60.0, 40.0]))
SAMPLING = SamplingOptions(max_new_tokens=8)

# (method, arguments): every task that generates; questions of different lengths make the batch pad
EVERY_TASK = [
    ("report", ()),
    ("ask", ("Is there a hypodense lesion in the right lobe of the liver, and how large is it?",)),
    ("ask", ("Why?",)),
    ("choose", ("Which plane is this image in?", ["Axial", "Coronal", "Sagittal", "Oblique"])),
    ("locate", ("liver",)),
    ("describe_region", (ROI,)),
    ("segment", ("liver",)),
    ("segment_expression", ("the large organ in the right upper abdomen",)),
]


@pytest.fixture
def two_volumes(ct):
    """The test CT and the same voxels mirrored front to back (other image features, same grid)."""
    return [ct, (np.ascontiguousarray(ct[0][:, ::-1]), ct[1])]


class _Recorder:
    """Wraps engine._generate: asks for logits and keeps what each call returns (the one-row output a task's result
    is built from, whether it ran alone or came from a batch)."""

    def __init__(self, engine):
        self.outputs = []
        original = engine._generate

        def generate(*args, **kwargs):
            out = original(*args, **{**kwargs, "output_scores": True})
            self.outputs.append(out)
            return out

        engine._generate = generate


class ForceRows:
    """Logits processor forcing row r to produce ``tokens[r]`` (then EOS); None leaves a row free."""

    def __init__(self, tokens):
        self.tokens, self.step = tokens, 0

    def __call__(self, input_ids, scores):
        for row, tokens in enumerate(self.tokens[: scores.shape[0]]):  # a one-row call inside a batch: row 0's
            if tokens is not None and self.step < len(tokens):
                scores[row] = float("-inf")
                scores[row, tokens[self.step]] = 0
        self.step += 1
        return scores


def _force(engine, texts):
    """Make the model start row r's answer with ``texts[r]`` then EOS (None: its own answer)."""
    from transformers import LogitsProcessorList

    tok = engine.tokenizer
    tokens = [None if t is None else tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    original = engine.model.generate

    def generate(*args, **kwargs):
        return original(*args, logits_processor=LogitsProcessorList([ForceRows(tokens)]), **kwargs)

    engine.model.generate = generate
    return lambda: engine.model.__dict__.pop("generate", None)


def _alone(model, volume, request, window, forced=None):
    engine = InferenceEngine(model)
    engine.set_volume(*volume, window=window)
    recorder = _Recorder(engine)
    restore = _force(engine, [forced]) if forced is not None else (lambda: None)
    try:
        result = getattr(engine, request.method)(*request.args, sampling=SAMPLING)
    finally:
        restore()
    return result, recorder.outputs[-1]


def _comparable(result):
    """The result without provenance, probabilities rounded: a padded batch computes them to float32 rounding."""
    data = result.to_dict()
    data.pop("provenance")
    return json.loads(json.dumps(data), parse_float=lambda text: round(float(text), 5))


def _assert_same(batched, batched_out, alone, alone_out):
    assert batched_out["ids"] == alone_out["ids"]  # token for token
    torch.testing.assert_close(batched_out["logits"], alone_out["logits"], rtol=1e-4, atol=1e-4)
    assert _comparable(batched) == _comparable(alone)
    assert batched.provenance.prompt == alone.provenance.prompt
    assert batched.provenance.convention == alone.provenance.convention
    mask, mask_alone = getattr(batched, "mask", None), getattr(alone, "mask", None)
    assert (mask is None) == (mask_alone is None)
    if mask is not None:
        assert np.array_equal(mask, mask_alone)


@pytest.mark.parametrize("caching", [True, False], ids=["caching", "no-caching"])
def test_every_task_in_one_batch_equals_each_alone(tiny_phi3_model, two_volumes, caching):
    engine = InferenceEngine(tiny_phi3_model, caching=caching)
    windows = ["abdomen", None]
    handles = [engine.set_volume(*v, window=w) for v, w in zip(two_volumes, windows)]
    requests = [BatchRequest(m, a, volume=h) for h in handles for m, a in EVERY_TASK]
    recorder = _Recorder(engine)
    masks = []
    original = engine.model.generate
    engine.model.generate = lambda *a, **k: masks.append(k["attention_mask"]) or original(*a, **k)
    try:
        results = engine.run_batch(requests, sampling=SAMPLING, batch_size=len(requests))
    finally:
        engine.model.__dict__.pop("generate", None)
    assert len(masks) == 1 and masks[0].shape[0] == len(requests)
    assert (masks[0] == 0).any(), "the prompts differ in length: the batch must be left-padded"
    assert not any(isinstance(r, Exception) for r in results)
    assert len(recorder.outputs) == len(requests)
    for i, (request, result) in enumerate(zip(requests, results)):
        volume = two_volumes[handles.index(request.volume)]
        alone, alone_out = _alone(tiny_phi3_model, volume, request, windows[handles.index(request.volume)])
        _assert_same(result, recorder.outputs[i], alone, alone_out)
        assert f"decoded in a batch of {len(requests)} prompts" in result.provenance.notes[-1]


def test_analysis_options_in_a_batch_equal_each_alone(tiny_phi3_model, two_volumes):
    """Refinement (the [SEG] prompt per row), locate (a second generation inside the request, run alone at replay),
    an evidence map and confidence: each batched request gives what it gives alone."""
    from M3DAssistantLib.results import AnalysisOptions

    everything = AnalysisOptions(refine=True, locate=True, evidence=True, evidence_steps=1)
    requests_and_answers = [
        (BatchRequest("segment", ("liver",), {"analysis": everything}), " It is [SEG]."),
        (BatchRequest("ask", ("Is the spleen enlarged?",), {"analysis": AnalysisOptions(evidence=True,
                                                                                      evidence_steps=1)}), None),
        (BatchRequest("segment", ("spleen",), {"analysis": AnalysisOptions(refine=True)}), " Sure, [SEG]."),
    ]
    engine = InferenceEngine(tiny_phi3_model)
    engine.set_volume(*two_volumes[0], window="abdomen")
    restore = _force(engine, [answer for _, answer in requests_and_answers])
    try:
        results = engine.run_batch([r for r, _ in requests_and_answers], sampling=SAMPLING)
    finally:
        restore()
    assert not any(isinstance(r, Exception) for r in results)
    assert engine.counters["generate"] == 2  # the batch, then locate's own generation at replay
    for (request, answer), result in zip(requests_and_answers, results):
        alone_engine = InferenceEngine(tiny_phi3_model)
        alone_engine.set_volume(*two_volumes[0], window="abdomen")
        restore = _force(alone_engine, [answer])
        try:
            alone = getattr(alone_engine, request.method)(*request.args, sampling=SAMPLING, **request.kwargs)
        finally:
            restore()
        assert _comparable(result).keys() == _comparable(alone).keys()
        if request.method == "segment":
            assert result.mask is not None and np.array_equal(result.mask, alone.mask)
            assert not any("not refined" in note for note in result.provenance.notes)
        if request.kwargs["analysis"].locate:
            assert result.located is not None and result.located.text == alone.located.text  # its own generation
            assert result.located.provenance.prompt == alone.located.provenance.prompt != result.provenance.prompt
        assert (result.evidence is None) == (alone.evidence is None)
        if alone.evidence is not None:
            np.testing.assert_allclose(result.evidence.model_values, alone.evidence.model_values, rtol=1e-3, atol=1e-6)


def test_rows_that_stop_early_and_rows_that_segment_beside_rows_that_do_not(tiny_phi3_model, two_volumes):
    """Forced answers of different lengths: a mask, an absent target, a box, a short text, and a free row that runs
    to max_new_tokens; each equals the same request alone with the same forced answer."""
    requests_and_answers = [
        (BatchRequest("segment", ("liver",)), " It is [SEG]."),
        (BatchRequest("segment", ("pancreas",)), " Sorry, there is no pancreas."),
        (BatchRequest("locate", ("liver",)), " Coordinates are <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end>."),
        (BatchRequest("report"), " Normal."),
        (BatchRequest("ask", ("Is the spleen enlarged?",)), None),
        (BatchRequest("segment_expression", ("the organ in the right upper abdomen",)), " Sure, it is [SEG]."),
    ]
    sampling = SamplingOptions(max_new_tokens=40)
    for volume in two_volumes:
        engine = InferenceEngine(tiny_phi3_model)
        engine.set_volume(*volume, window="abdomen")
        recorder = _Recorder(engine)
        restore = _force(engine, [answer for _, answer in requests_and_answers])
        try:
            results = engine.run_batch([r for r, _ in requests_and_answers], sampling=sampling)
        finally:
            restore()
        lengths = {len(out["ids"]) for out in recorder.outputs}
        assert len(lengths) >= 4 and max(lengths) == 40  # stopped at different steps; the free row ran to the end
        assert results[0].mask is not None and results[0].parse_error is None
        assert results[1].absent and results[1].mask is None
        assert results[2].box == (0.1, 0.2, 0.3, 0.5, 0.6, 0.7) and results[3].text == "Normal."
        assert results[5].mask is not None
        for (request, answer), result, out in zip(requests_and_answers, results, recorder.outputs):
            engine_alone = InferenceEngine(tiny_phi3_model)
            engine_alone.set_volume(*volume, window="abdomen")
            alone_recorder = _Recorder(engine_alone)
            restore = _force(engine_alone, [answer])
            try:
                alone = getattr(engine_alone, request.method)(*request.args, sampling=sampling)
            finally:
                restore()
            _assert_same(result, out, alone, alone_recorder.outputs[-1])


def test_a_tokenizer_without_bos(tmp_path, two_volumes):
    """No BOS (Microsoft's current Phi-3 tokenizer config): position 0 is the first <im_patch>, the splice overwrites
    the first question token; padded rows must do the same at their own offset."""
    from M3DAssistantLib.model import load_model
    from M3DAssistantLib.model import random_checkpoint as rc

    folder = rc.write_random_lamed_checkpoint(tmp_path / "nobos", "phi3", llm=rc.TINY_LLM,
                                              multimodal=rc.TINY_MULTIMODAL, add_bos_token=False, seed=3)
    model = load_model(folder, device="cpu", dtype="float32")
    assert not model[1].m3d_special_tokens.adds_bos
    engine = InferenceEngine(model)
    handles = [engine.set_volume(*v, window="abdomen") for v in two_volumes]
    requests = [BatchRequest(m, a, volume=h) for h in handles for m, a in EVERY_TASK[:4]]
    recorder = _Recorder(engine)
    results = engine.run_batch(requests, sampling=SAMPLING)
    for i, (request, result) in enumerate(zip(requests, results)):
        alone, alone_out = _alone(model, two_volumes[handles.index(request.volume)], request, "abdomen")
        _assert_same(result, recorder.outputs[i], alone, alone_out)


def test_batches_reuse_and_keep_the_caches_of_the_single_path(tiny_phi3_model, two_volumes):
    engine = InferenceEngine(tiny_phi3_model)
    handles = [engine.set_volume(*v, window="abdomen") for v in two_volumes]
    requests = [BatchRequest(m, a, volume=h) for h in handles for m, a in EVERY_TASK[:4]]  # one convention
    engine.run_batch(requests, sampling=SAMPLING, batch_size=3)  # 3 chunks: caches filled by the first
    assert engine.counters["vision_tower"] == 2 and engine.counters["prefix"] == 2 and engine.counters["generate"] == 3
    engine.set_volume(*two_volumes[0], window="abdomen")
    alone = engine.report(sampling=SAMPLING)  # a follow-up reuses what the batch computed
    assert engine.counters["vision_tower"] == 2 and engine.counters["prefix"] == 2
    assert alone.text == engine.run_batch([BatchRequest("report", volume=handles[0])], sampling=SAMPLING)[0].text


def test_chunks_give_the_same_answers_as_one_batch(tiny_phi3_model, two_volumes):
    engine = InferenceEngine(tiny_phi3_model)
    handles = [engine.set_volume(*v, window="abdomen") for v in two_volumes]
    requests = [BatchRequest(m, a, volume=h) for m, a in EVERY_TASK for h in handles]
    whole = engine.run_batch(requests, sampling=SAMPLING, batch_size=len(requests))
    for size in (1, 3):
        chunked = engine.run_batch(requests, sampling=SAMPLING, batch_size=size)
        assert [_comparable(r) for r in chunked] == [_comparable(r) for r in whole]


def test_a_bad_request_fails_alone(tiny_phi3_model, two_volumes):
    engine = InferenceEngine(tiny_phi3_model, max_volumes=1)
    first = engine.set_volume(*two_volumes[0], window="abdomen")
    second = engine.set_volume(*two_volumes[1], window="abdomen")  # max_volumes=1: the first is dropped
    results = engine.run_batch([
        BatchRequest("report", volume=second),
        BatchRequest("ask", ("liver " * 600,), volume=second),  # longer than the 512-token context
        BatchRequest("report", volume=first),
        BatchRequest("choose", ("Which plane?", ["Axial"]), volume=second),  # too few choices
    ], sampling=SAMPLING)
    assert isinstance(results[0].text, str)
    assert isinstance(results[1], InputError) and "512" in str(results[1])
    assert isinstance(results[2], InputError) and "no longer held" in str(results[2])
    assert isinstance(results[3], InputError)


def test_requests_are_checked_before_anything_runs(tiny_phi3_model, ct):
    engine = InferenceEngine(tiny_phi3_model)
    engine.set_volume(*ct)
    with pytest.raises(InputError, match="cannot run in a batch"):
        engine.run_batch([BatchRequest("report"), BatchRequest("retrieve")])
    with pytest.raises(InputError, match="batch_size"):
        engine.run_batch([BatchRequest("report")], batch_size=0)
    assert engine.counters["vision_tower"] == 0


def test_cancel_stops_the_whole_batch(tiny_phi3_model, two_volumes):
    engine = InferenceEngine(tiny_phi3_model)
    handles = [engine.set_volume(*v) for v in two_volumes]

    def cancel_when_decoding(event):
        if event.stage == "generate":
            engine.cancel()

    engine.progress = cancel_when_decoding
    with pytest.raises(CancelledError):
        engine.run_batch([BatchRequest("report", volume=h) for h in handles], sampling=SAMPLING)
    engine.progress = None
    assert isinstance(engine.run_batch([BatchRequest("report", volume=handles[0])], sampling=SAMPLING)[0].text, str)


def test_m3d_batch_with_batch_size_writes_what_batch_size_1_writes(tiny_phi3, data_dir, tmp_path):
    import SimpleITK as sitk

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(data_dir / "example_ct_sm.nii.gz", folder / "a.nii.gz")
    image = sitk.ReadImage(str(data_dir / "example_ct_sm.nii.gz"))
    voxels = sitk.GetArrayFromImage(image)
    for name, changed in (("b", voxels[:, ::-1]), ("c", voxels[::-1, :, ::-1])):  # other anatomy, same grid
        other = sitk.GetImageFromArray(np.ascontiguousarray(changed))
        other.CopyInformation(image)
        sitk.WriteImage(other, str(folder / f"{name}.nii.gz"))
    outputs = {}
    for size in ("1", "2"):
        out = tmp_path / f"out{size}"
        result = m3d("batch", folder, "--task", "report", "--task", "ask:Is there free fluid?", "--task",
                     "segment:liver", "-o", out, "--model", tiny_phi3, "--max-new-tokens", "6", "--quiet",
                     "--batch-size", size)
        assert result.returncode == 0, result.stderr
        outputs[size] = {}
        for name in "abc":
            folder_out = out / f"{name}.nii.gz"  # named after the volume's own file
            data = json.loads((folder_out / "results.json").read_text(),
                              parse_float=lambda text: round(float(text), 5))["results"]  # probabilities: fp32
            outputs[size][name] = {k: {f: v for f, v in r.items() if f != "provenance"} for k, r in data.items()}
            outputs[size][name]["files"] = {p.name: p.read_text() for p in folder_out.glob("*.txt")}
    assert outputs["1"] == outputs["2"]
    assert len({json.dumps(outputs["1"][n], sort_keys=True) for n in "abc"}) == 3  # three different volumes


def test_m3d_batch_refuses_a_batch_size_below_1_before_loading(tmp_path):
    result = m3d("batch", tmp_path, "--task", "report", "-o", tmp_path / "out", "--batch-size", "0",
                 "--model", tmp_path / "no-model")
    assert result.returncode == 2 and "--batch-size" in result.stderr and "Traceback" not in result.stderr


def test_a_group_that_runs_out_of_memory_fails_alone(tiny_phi3_model, data_dir, tmp_path):
    """m3d batch: a group of volumes whose batch fails (out of memory) is reported failed; the next group runs."""
    from M3DAssistantLib.batch import BatchTask, run_cohort
    from M3DAssistantLib.oom import OutOfMemoryError

    folder = tmp_path / "in"
    folder.mkdir()
    for name in "abc":
        shutil.copy(data_dir / "example_ct_sm.nii.gz", folder / f"{name}.nii.gz")
    engine = InferenceEngine(tiny_phi3_model)
    original, calls = engine.run_batch, []

    def run_batch_failing_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OutOfMemoryError("out of memory (RAM) on cpu while a batch of 2 requests")
        return original(*args, **kwargs)

    engine.run_batch = run_batch_failing_first
    summary = run_cohort(engine, sorted(folder.iterdir()), [BatchTask.parse("report")], tmp_path / "out",
                         sampling=SAMPLING, batch_size=2, log=lambda _: None)
    status = summary.status
    assert status["a.nii.gz"].startswith("failed: out of memory")
    assert status["b.nii.gz"].startswith("failed: out of memory")
    assert status["c.nii.gz"] == "done" and (tmp_path / "out" / "c.nii.gz" / "results.json").is_file()
    assert not (tmp_path / "out" / "a.nii.gz").exists()
    assert len(summary.failed) == 2
