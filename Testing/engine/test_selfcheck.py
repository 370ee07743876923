"""``m3d selfcheck``: its metrics proven on known masks and boxes, forced answers through the whole path (a right
answer scores high, a mirrored one is caught as a wrong orientation), and the unforced run on the tiny checkpoint
(random answers: inconclusive, never a crash or a claimed failure)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from forcing import ForceTokens, forced_answer

from M3DAssistantLib import selfcheck as sc
from M3DAssistantLib.geometry import RasRoi, format_box, mask_to_box, mask_to_model
from M3DAssistantLib.results import SamplingOptions

LIVER_ONLY = (sc.Structure("liver", ("liver",)),)
LATERAL = (sc.Structure("liver", ("liver",)), sc.Structure("spleen", ("spleen",)))


# ------------------------------------------------------------------------------------------------------ metrics
def test_dice_of_known_masks():
    truth = np.zeros((4, 10, 10), bool)
    truth[1:3, 2:8, 2:8] = True  # 72 voxels
    assert sc.dice(truth, truth) == 1.0
    half = truth.copy()
    half[:, :, 5:] = False  # 36 voxels, all inside
    assert sc.dice(half, truth) == pytest.approx(2 * 36 / (36 + 72))
    elsewhere = np.zeros_like(truth)
    elsewhere[0, 0, 0] = True
    assert sc.dice(elsewhere, truth) == 0.0
    assert sc.dice(np.zeros_like(truth), np.zeros_like(truth)) is None


def test_box_iou_true_and_official():
    a = (np.array([0, 0, 0]), np.array([1, 1, 1]))  # 8 voxels
    b = (np.array([1, 1, 1]), np.array([2, 2, 2]))  # 8 voxels, 1 shared
    iou, official = sc.box_iou(a, b)
    assert iou == pytest.approx(1 / 15) and official == pytest.approx(1 / 27)  # enclosing box: 3x3x3
    assert sc.box_iou(a, a) == (1.0, 1.0)
    far = (np.array([5, 5, 5]), np.array([6, 6, 6]))
    assert sc.box_iou(a, far) == (0.0, 0.0)


def test_roi_voxel_bounds_and_restack_keep_ras_positions(ct):
    array, m = ct
    lo, hi = np.array([3, 10, 20]), np.array([12, 40, 70])  # K, J, I
    corners = np.array([[i, j, k, 1.0] for i in (lo[2] - 0.5, hi[2] + 0.5) for j in (lo[1] - 0.5, hi[1] + 0.5)
                        for k in (lo[0] - 0.5, hi[0] + 0.5)])
    ras = (m @ corners.T)[:3].T
    roi = RasRoi.from_bounds(ras.min(axis=0), ras.max(axis=0))
    got = sc.roi_voxel_bounds(roi, m, array.shape)
    np.testing.assert_array_equal(got[0], lo)
    np.testing.assert_array_equal(got[1], hi)
    from M3DAssistantLib.geometry import slice_plane

    rng = np.random.default_rng(0)
    for plane in ("axial", "coronal", "sagittal"):
        stacked, m2 = sc.restack(array, m, plane)
        assert slice_plane(m2) == plane and stacked.size == array.size
        # every sampled voxel of the re-stored array holds the value found at its RAS position in the original
        kji = np.stack([rng.integers(0, n, 50) for n in stacked.shape], axis=1)
        old = (np.linalg.inv(m) @ m2 @ np.c_[kji[:, ::-1], np.ones(50)].T)[:3].T
        old = np.rint(old).astype(int)
        np.testing.assert_array_equal(stacked[tuple(kji.T)], array[old[:, 2], old[:, 1], old[:, 0]])


# ------------------------------------------------------------------------------------------ forced answers
def _truth(ct_labels_names, name="liver"):
    labels, names = ct_labels_names
    return labels == names[name]


@pytest.fixture(scope="module")
def ct_labels_names(ct):
    return sc.load_labels(sc.SAMPLE_LABELS, sc.SAMPLE_LABEL_NAMES, ct[0].shape)


def _true_box(engine, truth, mirror=False):
    mapping = engine._view("rec").mapping
    box = mask_to_box(mask_to_model(truth.astype(np.uint8), mapping))
    if mirror:  # the same box mirrored left-right in the image (W runs patient right -> left)
        d1, h1, w1, d2, h2, w2 = box
        box = (d1, h1, round(1 - w2 - 1 / 256, 3), d2, h2, round(1 - w1 - 1 / 256, 3))
    return box


@pytest.mark.parametrize("name, mirrored_iou_below", [("liver", 0.45), ("spleen", 0.05)])
def test_a_right_box_scores_high_and_a_mirrored_one_is_caught(engine, ct, ct_labels_names, name, mirrored_iou_below):
    """The label's own box, forced as the answer, scores IoU > 0.8 on the correct side; mirrored left-right it is
    on the wrong side (the large liver still overlaps its mirror image a little; the spleen not at all)."""
    truth = _truth(ct_labels_names, name)
    array, m = ct
    midline = sc.body_midline_x(array, m)
    sampling = SamplingOptions(max_new_tokens=60)
    with forced_answer(engine, f" Coordinates are <bx_start>{format_box(_true_box(engine, truth))}<bx_end>."):
        right = sc._locate_check(engine, name, truth, m, array.shape, midline, sampling)
    assert right.outcome == "box" and right.side == "correct" and right.verdict == "ok"
    assert right.iou > 0.8 and right.iou_official > 0.8 and right.centre_error_mm < 6.0
    with forced_answer(engine, f" Coordinates are <bx_start>{format_box(_true_box(engine, truth, True))}<bx_end>."):
        mirrored = sc._locate_check(engine, name, truth, m, array.shape, midline, sampling)
    assert mirrored.outcome == "box" and mirrored.side == "wrong" and mirrored.verdict == "wrong side"
    assert mirrored.iou < mirrored_iou_below and mirrored.centre_error_mm > 50
    verdict, message = sc._verdict([right, mirrored])
    assert verdict == "orientation suspect" and f"locate {name}" in message
    assert sc._verdict([right])[0] == "pass"


def _force_mask(engine, model_mask):
    """The model answers " It is [SEG]." and its SegVol 'predicts' exactly ``model_mask`` (model space)."""
    tokens = engine.tokenizer(" It is [SEG].", add_special_tokens=False).input_ids + [engine.tokenizer.eos_token_id]
    original = engine.model.generate

    def generate(*args, seg_enable=False, **kwargs):
        from transformers import LogitsProcessorList

        out = original(*args, seg_enable=seg_enable, logits_processor=LogitsProcessorList([ForceTokens(tokens)]),
                       **kwargs)
        if not seg_enable:
            return out
        ids, _, *prompt = out  # the [SEG] prompt too when the engine refines
        return ids, torch.from_numpy(np.where(model_mask, 10.0, -10.0).astype(np.float32))[None, None], *prompt

    engine.model.generate = generate


@pytest.mark.parametrize("name, mirrored_dice_below", [("liver", 0.3), ("spleen", 0.05)])
def test_a_known_mask_scores_its_dice_and_a_mirrored_one_is_caught(engine, ct, ct_labels_names, name,
                                                                    mirrored_dice_below):
    """SegVol 'predicts' the label itself (in model space): Dice > 0.9 after the way back to the CT grid, correct
    side. Mirrored left-right, as a wrong orientation shows it: Dice far down and the wrong side."""
    truth = _truth(ct_labels_names, name)
    array, m = ct
    midline = sc.body_midline_x(array, m)
    sampling = SamplingOptions(max_new_tokens=10)
    model_mask = mask_to_model(truth.astype(np.uint8), engine._view("seg").mapping) != 0
    _force_mask(engine, model_mask)
    right = sc._segment_check(engine, name, truth, m, midline, sampling)
    engine.model.__dict__.pop("generate")
    assert right.outcome == "mask" and right.dice > 0.9 and right.side == "correct" and right.verdict == "ok"
    _force_mask(engine, model_mask[:, :, ::-1])
    mirrored = sc._segment_check(engine, name, truth, m, midline, sampling)
    engine.model.__dict__.pop("generate")
    assert mirrored.dice < mirrored_dice_below and mirrored.side == "wrong" and mirrored.verdict == "wrong side"
    assert sc._verdict([right])[0] == "pass" and sc._verdict([right, mirrored])[0] == "orientation suspect"


def test_plane_question_is_scored_against_what_the_model_is_shown(engine, ct):
    array, m = ct
    stacked, m2 = sc.restack(array, m, "coronal")
    engine.set_volume(stacked, m2)
    sampling = SamplingOptions(max_new_tokens=10)
    with forced_answer(engine, " B. Coronal"):
        right = sc._plane_check(engine, "coronal", m2, sampling)
    assert right.expected == "Coronal" and right.chosen == "Coronal" and right.verdict == "ok"
    engine.convention = "m3d-cap-v1"  # the axial option: the model is shown axial slices whatever the series
    try:
        with forced_answer(engine, " B. Coronal"):
            wrong = sc._plane_check(engine, "coronal", m2, sampling)
    finally:
        engine.convention = None
    assert wrong.convention == "m3d-cap-v1" and wrong.expected == "Axial" and wrong.verdict == "wrong"


# ------------------------------------------------------------------------------------------ unforced twins
def test_unforced_selfcheck_on_the_tiny_checkpoint_is_honest(tiny_phi3_model):
    """Random weights: whatever they answer is scored as it is; nothing crashes, and a run where nothing could be
    scored says inconclusive (exit status 0), not failed."""
    from M3DAssistantLib.engine import InferenceEngine

    report = sc.run_selfcheck(InferenceEngine(tiny_phi3_model), structures=LATERAL, max_new_tokens=6)
    data = json.loads(report.to_json())
    assert data["schema"] == "m3d-selfcheck" and data["version"] == 1
    assert set(data) >= {"model", "volume", "conventions", "thresholds", "verdict", "message", "by_convention",
                         "checks"}
    assert len(data["checks"]) == 2 * 2 + 3
    assert {c["task"] for c in data["checks"]} == {"segment", "locate", "plane"}
    assert {c["convention"] for c in data["checks"]} == {"m3d-seg-v1", "m3d-cap-v2"}
    assert [c["expected"] for c in data["checks"] if c["task"] == "plane"] == ["Axial", "Coronal", "Sagittal"]
    answered = [c for c in data["checks"] if c["verdict"] != "no answer"]
    if not answered:
        assert report.verdict == "inconclusive" and report.passed
    text = sc.format_report(report)
    assert "verdict:" in text and "liver" in text and "m3d-seg-v1" in text


def test_selfcheck_under_every_convention(tiny_phi3_model):
    from M3DAssistantLib.engine import InferenceEngine

    report = sc.run_selfcheck(InferenceEngine(tiny_phi3_model), structures=LIVER_ONLY, conventions="all",
                              max_new_tokens=3)
    assert set(report.by_convention()) == {"m3d-cap-v1", "m3d-cap-v2", "m3d-seg-v1", "m3d-refseg-v1"}
    expected = {c.convention: [] for c in report.checks}
    for c in report.checks:
        if c.task == "plane":
            expected[c.convention].append(c.expected)
    assert expected["m3d-cap-v2"] == ["Axial", "Coronal", "Sagittal"]  # plane-native
    assert expected["m3d-cap-v1"] == expected["m3d-seg-v1"] == ["Axial"] * 3


def test_selfcheck_refuses_a_volume_without_ground_truth(tiny_phi3_model, ct_path):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.errors import InputError

    engine = InferenceEngine(tiny_phi3_model)
    with pytest.raises(InputError, match="needs ground truth: pass --labels"):
        sc.run_selfcheck(engine, volume=ct_path)
    with pytest.raises(InputError, match="the label names lack pancreas_head"):
        sc.run_selfcheck(engine, structures=(sc.Structure("pancreas", ("pancreas_head",)),))


@pytest.mark.slow
def test_m3d_selfcheck_command_from_a_fresh_checkpoint(tmp_path):
    """The documented command: a tiny checkpoint written by m3d, then m3d selfcheck on it."""
    ckpt = tmp_path / "tiny"
    run = lambda *a: subprocess.run([sys.executable, "-m", "M3DAssistantLib", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path, timeout=600)
    assert run("make-test-checkpoint", str(ckpt)).returncode == 0
    result = run("selfcheck", "--model", str(ckpt), "--structures", "liver", "spleen", "--max-new-tokens", "4",
                 "--quiet")
    assert result.returncode == 0, result.stderr
    assert "verdict:" in result.stdout and "wrote" in result.stderr
    data = json.loads((tmp_path / "m3d-selfcheck.json").read_text())
    assert data["schema"] == "m3d-selfcheck" and data["model"]["source"] == str(ckpt)
    again = run("selfcheck", "--model", str(ckpt), "--structures", "liver", "--max-new-tokens", "2", "--quiet")
    assert again.returncode == 0 and (tmp_path / "m3d-selfcheck (2).json").is_file()  # never overwritten


def _check(task, target, verdict, dice=None):
    return sc.Check(task=task, target=target, convention="m3d-seg-v1", window="percentile", prompt="", answer="",
                    outcome="mask", verdict=verdict, dice=dice)


def test_verdict_rules():
    ok_liver, ok_spleen = _check("segment", "liver", "ok", 0.9), _check("segment", "spleen", "ok", 0.8)
    poor = _check("locate", "aorta", "poor")
    none = _check("segment", "stomach", "no answer")
    assert sc._verdict([none])[0] == "inconclusive"
    assert sc._verdict([none, _check("plane", "axial series", "ok")])[0] == "inconclusive"  # nothing geometric
    assert sc._verdict([ok_liver, ok_spleen, poor, none])[0] == "pass"  # 2 of 3 answered ok, the liver's among them
    assert sc._verdict([ok_liver, poor, poor])[0] == "poor"
    assert sc._verdict([_check("segment", "liver", "poor", 0.3), ok_spleen, ok_spleen])[0] == "poor"  # liver
    assert sc._verdict([ok_spleen, _check("segment", "liver", "poor", 0.05)])[0] == "orientation suspect"
    assert sc._verdict([ok_liver, _check("locate", "spleen", "wrong side")])[0] == "orientation suspect"


def test_the_selfcheck_reports_dice_with_and_without_refinement(engine, ct, ct_labels_names, monkeypatch):
    """A forced [SEG] whose coarse mask is the label seen on the model grid, and whose zoom-in (an oracle: the label
    on the zoomed region's grid) sees it finer: the check reports both Dice values, the refined one higher, and
    the table and the per-convention means carry them."""
    from M3DAssistantLib import refinement
    from M3DAssistantLib.geometry import mask_to_model

    name = "spleen"
    truth = _truth(ct_labels_names, name)
    array, m = ct
    model_mask = mask_to_model(truth.astype(np.uint8), engine._view("seg").mapping) != 0
    tokens = engine.tokenizer(" It is [SEG].", add_special_tokens=False).input_ids + [engine.tokenizer.eos_token_id]
    original = engine.model.generate

    def generate(*args, seg_enable=False, return_seg_prompt=False, **kwargs):
        from transformers import LogitsProcessorList

        ids, _ = original(*args, seg_enable=seg_enable, logits_processor=LogitsProcessorList([ForceTokens(tokens)]),
                          **kwargs)
        logits = torch.from_numpy(np.where(model_mask, 10.0, -10.0).astype(np.float32))[None, None]
        return (ids, logits, torch.zeros(1, 32)) if return_seg_prompt else (ids, logits)

    def oracle(tensor, mapping):
        return np.where(mask_to_model(truth.astype(np.uint8), mapping) != 0, 10.0, -10.0).astype(np.float32)

    real = refinement.refine_logits
    monkeypatch.setattr(refinement, "refine_logits",
                        lambda *args, **kwargs: real(*args[:4], oracle, **kwargs))
    engine.model.generate = generate
    check = sc._segment_check(engine, name, truth, m, sc.body_midline_x(array, m), SamplingOptions(max_new_tokens=10))
    engine.model.__dict__.pop("generate")
    assert check.dice is not None and check.dice_refined is not None and check.dice_refined > check.dice
    report = sc.SelfCheckReport(model={}, volume={}, conventions="default", checks=[check], verdict="pass", message="")
    assert report.by_convention()[check.convention]["mean_dice_refined"] == check.dice_refined
    table = sc.format_report(report)
    assert "Dice+z" in table and f"{check.dice_refined:.3f}" in table
