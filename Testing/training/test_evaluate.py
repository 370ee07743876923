"""evaluate.py: M3D-Bench metrics on known inputs against hand-computed values; missing METEOR/BERTScore data give a
message, not a crash; JSON + PNG output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from M3DAssistantLib.errors import InputError
from M3DTrainingLib import evaluate as ev
from M3DTrainingLib.evaluate import (
    bleu1,
    box_iou,
    box_iou_official,
    closed_vqa_correct,
    dice_binary,
    dice_soft,
    evaluate_predictions,
    extract_box_official,
    rouge1,
    write_evaluation,
)


def test_bleu1_is_unigram_precision_times_brevity_penalty():
    # 3 of 4 words match, same length: BP = 1
    assert bleu1("the liver is normal", "the liver is enlarged") == pytest.approx(3 / 4)
    # 2 of 2 match, but 2 words against 4: BP = exp(1 - 4/2)
    assert bleu1("liver normal", "the liver is normal") == pytest.approx(math.exp(-1))
    # longer than the reference: no penalty; precision 2/5 (13a splits the final period off)
    assert bleu1("the spleen looks enlarged.", "the spleen") == pytest.approx(2 / 5)
    # clipped counts: "the" appears once in the reference
    assert bleu1("the the the", "the liver is") == pytest.approx(1 / 3)
    assert bleu1("Liver", "liver") == 0.0  # case-sensitive, as evaluate's bleu
    assert bleu1("", "the liver") == 0.0


def test_rouge1_is_the_unigram_f_measure():
    assert rouge1("the liver is normal", "the liver is enlarged") == pytest.approx(0.75)
    # p = 2/2, r = 2/4 -> F = 2pr/(p+r) = 2/3; lower-cased, punctuation dropped
    assert rouge1("Liver, normal.", "the liver is normal") == pytest.approx(2 / 3)
    assert rouge1("spleen", "the liver") == 0.0


def test_closed_vqa_uses_the_official_substring_rule():
    assert closed_vqa_correct("C. Liver", "C")
    assert closed_vqa_correct("The answer is C. Liver", "C")
    assert not closed_vqa_correct("C Liver", "C")  # no period: not counted, as officially
    assert not closed_vqa_correct("B. Spleen", "C")


def test_boxes_official_and_true_iou():
    assert extract_box_official("Coordinates are [0.1, 0.2, 0.3, 0.4, 0.5, 0.6].") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert extract_box_official("[0.1,0.2,0.3,0.4,0.5,0.6]") is None  # the official regex wants ", "
    a, b = [0, 0, 0, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.75, 0.75, 0.75]
    # intersection 0.25^3 over the ENCLOSING box 0.75^3 (not the union 2*0.125 - 0.015625)
    assert box_iou_official(a, b) == pytest.approx(0.25 ** 3 / (0.75 ** 3 + 1e-6))
    assert box_iou_official(a, a) == pytest.approx(0.125 / (0.125 + 1e-6))
    # true IoU over whole voxels on a 10^3 grid: voxels 0..4 vs 2..6 -> 27 / (125 + 125 - 27)
    assert box_iou([0, 0, 0, 0.4, 0.4, 0.4], [0.2, 0.2, 0.2, 0.6, 0.6, 0.6], (10, 10, 10)) == pytest.approx(27 / 223)
    one_voxel = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert box_iou(one_voxel, one_voxel) == 1.0 and box_iou_official(one_voxel, one_voxel) == 0.0
    assert box_iou([0.5, 0, 0, 0.1, 1, 1], a) == -1.0  # inverted: not a box


def test_dice_soft_is_the_official_formula_and_binary_thresholds():
    logits = torch.tensor([[[2.0, -1.0], [0.0, 3.0]], [[-4.0, 1.0], [0.5, -0.5]]])
    target = torch.tensor([[[1, 0], [1, 1]], [[0, 0], [1, 0]]])
    p = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    t = target.numpy()
    expected = 2 * (p * t).sum() / (p.sum() + t.sum() + 1)  # Bench/eval/metrics.py BinaryDice, smooth 1
    assert dice_soft(logits, target) == pytest.approx(expected, rel=1e-6)
    predicted = p > 0.5  # voxels 2.0, 3.0, 1.0, 0.5 -> 3 of them in the 4-voxel target
    assert predicted.sum() == 4
    assert dice_binary(logits, target) == pytest.approx(2 * 3 / (4 + 4))
    assert dice_binary(np.full((2, 2), -9.0), np.zeros((2, 2))) == 1.0  # both empty
    assert dice_soft(np.full((2, 2), -np.inf), np.zeros((2, 2))) == 0.0  # "no [SEG]" logits (official -inf)
    with pytest.raises(InputError, match="shape"):
        dice_soft(np.zeros((2, 2)), np.zeros((3, 2)))


def test_evaluate_predictions_per_task_and_messages(monkeypatch):
    logits = np.array([[4.0, -4.0], [4.0, -4.0]])
    target = np.array([[1, 0], [1, 1]])
    records = [
        {"task": "report", "prediction": "the liver is normal", "reference": "the liver is enlarged"},
        {"task": "report", "prediction": "liver normal", "reference": "the liver is normal"},
        {"task": "vqa_closed", "prediction": "C. Liver", "reference": "C. Liver"},
        {"task": "vqa_closed", "prediction": "B. Spleen", "answer_choice": "C"},
        {"task": "rec", "prediction": "Coordinates are [0.0, 0.0, 0.0, 0.5, 0.5, 0.5].",
         "reference": "Coordinates are <bx_start>[0.0, 0.0, 0.0, 0.5, 0.5, 0.5]<bx_end>."},
        {"task": "rec", "prediction": "It is somewhere.", "reference_box": [0, 0, 0, 0.5, 0.5, 0.5]},
        {"task": "rec", "prediction": "Sorry, there is no gallbladder.", "reference_box": None},
        {"task": "reg", "prediction": "The target is liver.", "reference": "The target is liver."},
        {"task": "seg", "logits": logits, "target_mask": target},
        {"task": "refseg", "prediction_mask": target, "target_mask": target},
    ]
    result = evaluate_predictions(records, model_shape=(32, 256, 256))
    tasks = result["tasks"]
    assert tasks["report"]["n"] == 2
    assert tasks["report"]["metrics"]["bleu1"] == pytest.approx((0.75 + math.exp(-1)) / 2)
    assert tasks["report"]["metrics"]["rouge1"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert tasks["vqa_closed"]["metrics"] == {"accuracy": 0.5}
    rec = tasks["rec"]["metrics"]
    assert rec["iou_official"] == pytest.approx(0.125 / (0.125 + 1e-6))  # mean over parsed boxes
    assert rec["iou"] == 1.0 and rec["unparsable"] == 1
    assert rec["iou_accuracy@0.5"] == 0.5 and rec["iou_official_accuracy@0.5"] == 0.5  # unparsable = miss
    assert rec["absent_accuracy"] == 1.0
    assert tasks["reg"]["metrics"]["bleu1"] == 1.0
    p = 1 / (1 + np.exp(-4.0))
    # sum(p t) = p + p + (1 - p), sum(p) = 2, sum(t) = 3
    assert tasks["seg"]["metrics"]["dice_soft"] == pytest.approx(2 * (1 + p) / (2 + 3 + 1), rel=1e-5)
    assert tasks["seg"]["metrics"]["dice"] == pytest.approx(2 * 2 / (2 + 3))
    assert tasks["refseg"]["metrics"]["dice"] == 1.0
    assert tasks["refseg"]["metrics"]["dice_soft"] == pytest.approx(2 * 3 / (3 + 3 + 1))
    assert [s["task"] for s in result["samples"]] == [r["task"] for r in records]
    # METEOR / BERTScore: computed where their data are installed, otherwise a message -- never silently absent
    for metric, word in (("meteor", "METEOR"), ("bertscore_f1", "BERTScore")):
        present = metric in tasks["report"]["metrics"]
        assert present != any(m.startswith(f"{word} not computed") for m in result["messages"])

    monkeypatch.setattr(ev, "_meteor_scorer", lambda: (None, "METEOR not computed: no WordNet here"))
    monkeypatch.setattr(ev, "_bertscore_scorer", lambda *a: (None, "BERTScore not computed: no roberta-large here"))
    result = evaluate_predictions(records[:2])
    assert result["messages"] == ["METEOR not computed: no WordNet here",
                                  "BERTScore not computed: no roberta-large here"]
    assert set(result["tasks"]["report"]["metrics"]) == {"bleu1", "rouge1"}
    monkeypatch.setattr(ev, "_meteor_scorer", lambda: (lambda p, r: 0.5, None))
    monkeypatch.setattr(ev, "_bertscore_scorer", lambda *a: (lambda ps, rs: [0.9] * len(ps), None))
    result = evaluate_predictions(records[:2])
    assert result["messages"] == []
    assert result["tasks"]["report"]["metrics"]["meteor"] == 0.5
    assert result["tasks"]["report"]["metrics"]["bertscore_f1"] == pytest.approx(0.9)


def test_missing_metric_data_is_reported_not_raised():
    scorer, why = ev._bertscore_scorer("no-such-org/no-such-model-m3d", None)
    assert scorer is None and why.startswith("BERTScore not computed")
    scorer, why = ev._meteor_scorer()
    assert (scorer is None) == (why is not None)


def test_bad_records_name_the_problem():
    with pytest.raises(InputError, match="record 0 has task 'caption'"):
        evaluate_predictions([{"task": "caption", "prediction": "x", "reference": "y"}])
    with pytest.raises(InputError, match="answer_choice"):
        evaluate_predictions([{"task": "vqa_closed", "prediction": "C."}])
    with pytest.raises(InputError, match="needs 'logits'"):
        evaluate_predictions([{"task": "seg", "target_mask": np.zeros(3)}])


def test_write_evaluation_json_and_png(tmp_path):
    result = evaluate_predictions([
        {"task": "vqa_closed", "prediction": "A. Axial", "answer_choice": "A"},
        {"task": "seg", "logits": np.array([3.0, -3.0]), "target_mask": np.array([1, 0])},
    ], meteor=False, bertscore=False)
    json_path, png_path = write_evaluation(result, tmp_path / "eval")
    assert json.loads(json_path.read_text())["tasks"]["vqa_closed"]["metrics"]["accuracy"] == 1.0
    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png_path).shape[2] in (3, 4)
    with pytest.raises(InputError, match="already exists"):
        write_evaluation(result, tmp_path / "eval")
    write_evaluation(result, tmp_path / "eval", overwrite=True)
