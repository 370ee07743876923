"""M3D-Bench metrics, computed offline with installable metric libraries (no hub access).

What the official evaluation scripts (``Bench/eval/*.py``) compute, and what is used here:

============  =========================================================  ===============================================
task          official                                                   here
============  =========================================================  ===============================================
report,       HF ``evaluate``: BLEU with ``max_order=1``, ROUGE-1,       sacrebleu BLEU (order 1, 13a tokens, no
vqa_open,     METEOR, BERTScore F1 (``lang="en"``), per sample, then     smoothing: the same definition), rouge-score
reg           averaged                                                   ROUGE-1 F (no stemming), METEOR (nltk) and
                                                                         BERTScore (bert-score) only when their data /
                                                                         model are on this machine -- else a message
vqa_closed    correct iff ``"{letter}."`` is in the prediction            the same rule
rec           "IoU" = intersection / volume of the ENCLOSING box          the same (``iou_official``, -1 when a box
              + 1e-6, -1 when a box cannot be parsed                     cannot be parsed) and the true IoU of the
                                                                         boxes' voxels (``iou``); accuracy at IoU > 0.5
                                                                         for both; absent-target answers separately
seg, refseg   ``BinaryDice``: 2 sum(p t) / (sum p + sum t + 1) with      MONAI ``DiceLoss(sigmoid=True, smooth_nr=0,
              p = sigmoid(logits) (soft)                                 smooth_dr=1)`` (the same formula) and MONAI
                                                                         ``compute_dice`` of sigmoid > 0.5 (binary)
============  =========================================================  ===============================================

Records (one per prediction) are dicts with ``task`` and, by task:

* text tasks: ``prediction``, ``reference`` (strings);
* ``vqa_closed``: ``prediction`` and ``answer_choice`` (the correct letter; else read from a ``reference`` such as
  "C. Liver");
* ``rec``: ``prediction`` (the decoded answer) and ``reference_box`` (6 numbers, or None when the target is absent;
  else parsed from ``reference``);
* ``seg`` / ``refseg``: ``logits`` (model output, any shape; or ``probabilities`` / ``prediction_mask``) and
  ``target_mask`` of the same shape (numpy or torch).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from M3DAssistantLib.errors import GeometryError, InputError
from M3DAssistantLib.geometry import DEFAULT_MODEL_SHAPE
from M3DAssistantLib.outputs import atomic_write_bytes, write_json
from M3DAssistantLib.prompts import parse_box_answer
from M3DAssistantLib.tasks import TASKS, TRAINING_NAMES, ResultKind

log = logging.getLogger(__name__)

__all__ = [
    "TEXT_TASKS",
    "predict_dataset",
    "bleu1",
    "box_iou",
    "box_iou_official",
    "closed_vqa_correct",
    "dice_binary",
    "dice_soft",
    "evaluate_predictions",
    "extract_box_official",
    "plot_metrics",
    "rouge1",
    "write_evaluation",
]

# the dataset tasks by the kind of their answer (the task registry's result kinds): each kind has its metrics
_BY_KIND = {kind: tuple(task.training_name for task in TASKS.values() if task.in_datasets and task.result is kind)
            for kind in ResultKind}
TEXT_TASKS = _BY_KIND[ResultKind.TEXT]  # report, vqa_open, reg: BLEU, ROUGE, METEOR, BERTScore
CHOICE_TASKS = _BY_KIND[ResultKind.CHOICE]  # vqa_closed: accuracy
BOX_TASKS = _BY_KIND[ResultKind.BOX]  # rec: IoU
SEG_TASKS = _BY_KIND[ResultKind.SEGMENTATION]  # seg, refseg: Dice
IOU_THRESHOLD = 0.5


# ----------------------------------------------------------------------------------------------------------------------
# Text metrics
# ----------------------------------------------------------------------------------------------------------------------

_bleu_scorer = None
_rouge_scorer = None


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1 in [0, 1], as HF ``evaluate``'s "bleu" with ``max_order=1`` (13a tokens, no smoothing, brevity
    penalty exp(1 - r/c) when the prediction is shorter): precision of the prediction's words times the penalty."""
    global _bleu_scorer
    if _bleu_scorer is None:
        from sacrebleu.metrics import BLEU

        _bleu_scorer = BLEU(max_ngram_order=1, tokenize="13a", smooth_method="none", effective_order=True)
    score = float(_bleu_scorer.sentence_score(prediction.strip(), [reference.strip()]).score) / 100.0
    return min(score, 1.0)  # sacrebleu's percent can exceed 100 by a rounding ulp


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure (rouge-score, no stemming: HF ``evaluate``'s "rouge" defaults)."""
    global _rouge_scorer
    if _rouge_scorer is None:
        from rouge_score import rouge_scorer

        _rouge_scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    return float(_rouge_scorer.score(reference.strip(), prediction.strip())["rouge1"].fmeasure)


def _meteor_scorer() -> tuple[Optional[Any], Optional[str]]:
    """(score function, None) when nltk and its WordNet/punkt data are on this machine, else (None, why)."""
    try:
        import nltk
        from nltk.translate import meteor_score
    except ImportError:
        return None, ("METEOR not computed: nltk is not installed (pip install nltk; it also needs its WordNet and "
                      "punkt_tab data)")
    missing = []
    for resource in ("corpora/wordnet", "tokenizers/punkt_tab"):
        try:
            nltk.data.find(resource)
        except LookupError:
            try:
                nltk.data.find(resource + ".zip")
            except LookupError:
                missing.append(resource.split("/")[1])
    if missing:
        return None, (f"METEOR not computed: NLTK's {' and '.join(missing)} data is not on this machine. On a "
                      f"machine with internet run `python -m nltk.downloader {' '.join(missing)} omw-1.4` and copy "
                      f"the nltk_data folder here (or set NLTK_DATA)")

    def score(prediction: str, reference: str) -> float:
        # HF evaluate's "meteor" (nltk >= 3.6.5): word_tokenize, alpha 0.9, beta 3, gamma 0.5.
        return float(meteor_score.single_meteor_score(nltk.word_tokenize(reference), nltk.word_tokenize(prediction),
                                                      alpha=0.9, beta=3, gamma=0.5))

    return score, None


def _bertscore_scorer(model: str, num_layers: Optional[int]) -> tuple[Optional[Any], Optional[str]]:
    """(batch score function, None) when bert-score and the model's files are on this machine, else (None, why)."""
    try:
        import bert_score
        from bert_score.utils import model2layers
    except ImportError:
        return None, (f"BERTScore not computed: the bert-score package is not installed (pip install bert-score) "
                      f"and it needs the {model} model in the local Hugging Face cache")
    layers = num_layers or model2layers.get(model)
    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            config = try_to_load_from_cache(model, "config.json")
        except Exception:  # noqa: BLE001 -- any failure means "not available locally"
            config = None
        if not isinstance(config, str):
            return None, (f"BERTScore not computed: the model {model!r} is not in the local Hugging Face cache; "
                          f"download it once where there is internet (huggingface-cli download {model}) or pass a "
                          f"local model folder")
        folder = Path(config).parent
    if not layers:
        return None, f"BERTScore not computed: give the number of layers to use for {model!r} (bertscore_num_layers)"

    def score(predictions: list[str], references: list[str]) -> list[float]:
        _, _, f1 = bert_score.score(predictions, references, model_type=str(folder), num_layers=layers,
                                    lang="en", verbose=False)
        return [float(v) for v in f1]

    return score, None


# ----------------------------------------------------------------------------------------------------------------------
# Closed VQA, boxes, Dice
# ----------------------------------------------------------------------------------------------------------------------


def closed_vqa_correct(prediction: str, answer_choice: str) -> bool:
    """The official rule: the prediction contains ``"{letter}."``."""
    return f"{answer_choice.strip()}." in prediction


_OFFICIAL_NUMBER = r"([-+]?\d*\.\d+|[-+]?\d+)"
_OFFICIAL_BOX = re.compile(r"\[" + ", ".join([_OFFICIAL_NUMBER] * 6) + r"\]")


def extract_box_official(text: str) -> Optional[list[float]]:
    """The official ``extract_box_from_text``: the first ``[a, b, c, d, e, f]`` (comma + space) in the text."""
    match = _OFFICIAL_BOX.search(text)
    return [float(v) for v in match.groups()] if match else None


def box_iou_official(box1: Sequence[float], box2: Sequence[float]) -> float:
    """M3D-Bench ``calculate_iou``: intersection volume / (volume of the enclosing box + 1e-6), on the box values."""
    x1, y1, z1, x2, y2, z2 = (float(v) for v in box1)
    x3, y3, z3, x4, y4, z4 = (float(v) for v in box2)
    inter = max(0.0, min(x2, x4) - max(x1, x3)) * max(0.0, min(y2, y4) - max(y1, y3)) * \
        max(0.0, min(z2, z4) - max(z1, z3))
    hull = (max(x2, x4) - min(x1, x3)) * (max(y2, y4) - min(y1, y3)) * (max(z2, z4) - min(z1, z3))
    return inter / (hull + 1e-6)


def box_iou(box1: Sequence[float], box2: Sequence[float], model_shape: Sequence[int] = DEFAULT_MODEL_SHAPE) -> float:
    """True IoU of the model voxels two boxes cover (:func:`M3DAssistantLib.measurements.box_iou`, the one
    definition the engine's locate-and-segment agreement uses too). -1 for a box that is not valid."""
    from M3DAssistantLib.measurements import box_iou as model_voxel_iou

    try:
        return model_voxel_iou(box1, box2, model_shape)
    except GeometryError:
        return -1.0


def _as_tensor(values: Any, what: str):
    import torch

    if values is None:
        raise InputError(f"a segmentation record has no {what}")
    t = values.detach().cpu() if hasattr(values, "detach") else torch.from_numpy(np.asarray(values))
    return t.to(torch.float32)


def _per_sample(values: Any, target: Any) -> tuple[Any, Any]:
    """Both to [1, 1, N] (one sample, one channel), after checking the shapes agree."""
    if tuple(values.shape) != tuple(target.shape):
        raise InputError(f"the prediction has shape {tuple(values.shape)} but the target mask {tuple(target.shape)}; "
                         "give both in model space")
    return values.reshape(1, 1, -1), target.reshape(1, 1, -1)


def dice_soft(logits: Any, target: Any) -> float:
    """The official Dice: ``2 sum(p t) / (sum p + sum t + 1)`` with ``p = sigmoid(logits)`` (MONAI DiceLoss with
    ``smooth_nr=0, smooth_dr=1`` gives exactly 1 minus it)."""
    from monai.losses import DiceLoss

    x, t = _per_sample(_as_tensor(logits, "logits"), (_as_tensor(target, "target_mask") > 0).float())
    loss = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1.0, reduction="none")(x, t)
    return float(1.0 - loss.flatten()[0])


def dice_binary(logits: Any, target: Any, threshold: float = 0.5) -> float:
    """Dice of the mask ``sigmoid(logits) > threshold`` (MONAI ``compute_dice``; 1 when both are empty)."""
    import torch
    from monai.metrics import compute_dice

    x, t = _per_sample(_as_tensor(logits, "logits"), (_as_tensor(target, "target_mask") > 0).float())
    pred = (torch.sigmoid(x) > threshold).float()
    return float(compute_dice(pred, t, include_background=True, ignore_empty=False).flatten()[0])


def _probabilities_to_logits(p: Any):
    import torch

    p = _as_tensor(p, "probabilities").clamp(0.0, 1.0)
    return torch.logit(p.double(), eps=None).float()


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(values) / len(values)) if values else None


def _text(record: dict[str, Any], key: str, index: int) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise InputError(f"record {index} ({record.get('task')}) needs {key!r} as text, got {type(value).__name__}")
    return value


def predict_dataset(
    model: Any,
    tokenizer: Any,
    folder: Union[str, os.PathLike],
    *,
    split: str = "validation",
    tasks: Optional[Sequence[str]] = None,
    max_new_tokens: int = 256,
    limit: Optional[int] = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Run ``model`` on a dataset split (as the official Bench scripts: greedy, batch 1) -> records for
    :func:`evaluate_predictions`. The prompts are the dataset's (the inference templates), images are not augmented.
    """
    import torch

    from M3DAssistantLib.model import encode_prompt
    from M3DAssistantLib.model.tokenizer import decode
    from M3DAssistantLib.progress import report_progress

    from .data import M3DDataset

    dataset = M3DDataset(folder, tokenizer, model.num_image_tokens, split=split, tasks=tasks, augment=False)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise InputError(f"{folder}: the {split!r} split has no samples{' for ' + ', '.join(tasks) if tasks else ''}.")
    param = next(model.parameters())
    records: list[dict[str, Any]] = []
    for i in range(count):
        example = dataset.example(i)
        seg = example.task in SEG_TASKS
        ids = torch.tensor([encode_prompt(tokenizer, example.question, model.num_image_tokens)], device=param.device)
        images = example.image[None].to(param.device, param.dtype)
        with torch.no_grad():
            output = model.generate(images, ids, seg_enable=seg, max_new_tokens=max_new_tokens, do_sample=False)
        output_ids, logits = output if seg else (output, None)
        record: dict[str, Any] = {"task": example.task, "prediction": decode(tokenizer, output_ids[0]),
                                  "reference": example.answer, "question": example.question}
        if example.task in BOX_TASKS:
            record["reference_box"] = list(example.box) if example.box is not None else None
        if seg:
            record["logits"] = logits[0].float().cpu()
            record["target_mask"] = example.segs
        records.append(record)
        report_progress(progress, "evaluate", (i + 1) / count, f"{i + 1}/{count} samples")
    return records


def evaluate_predictions(
    records: Sequence[dict[str, Any]],
    *,
    meteor: bool = True,
    bertscore: bool = True,
    bertscore_model: str = "roberta-large",
    bertscore_num_layers: Optional[int] = None,
    model_shape: Sequence[int] = DEFAULT_MODEL_SHAPE,
) -> dict[str, Any]:
    """Per-task M3D-Bench metrics of predictions (see the module docstring for the record fields).

    Returns ``{"tasks": {task: {"n": int, "metrics": {name: mean}, ...}}, "samples": [per-record values],
    "messages": [why a metric was not computed], "definitions": {metric: how it is computed}}``. Metrics whose data or
    model are missing here (METEOR, BERTScore) are left out with a message, never silently.
    """
    records = list(records)
    samples: list[dict[str, Any]] = []
    messages: list[str] = []
    by_task: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        task = record.get("task")
        if task not in TRAINING_NAMES:
            raise InputError(f"record {i} has task {task!r}; known tasks: {', '.join(TRAINING_NAMES)}")
        by_task.setdefault(task, []).append(i)
        samples.append({"index": i, "task": task})

    text_indices = [i for t in TEXT_TASKS for i in by_task.get(t, [])]
    meteor_fn = bert_fn = None
    if text_indices:
        if meteor:
            meteor_fn, why = _meteor_scorer()
            if why:
                messages.append(why)
        if bertscore:
            bert_fn, why = _bertscore_scorer(bertscore_model, bertscore_num_layers)
            if why:
                messages.append(why)
        for i in text_indices:
            prediction, reference = _text(records[i], "prediction", i), _text(records[i], "reference", i)
            samples[i]["bleu1"] = bleu1(prediction, reference)
            samples[i]["rouge1"] = rouge1(prediction, reference)
            if meteor_fn is not None:
                try:
                    samples[i]["meteor"] = meteor_fn(prediction, reference)
                except LookupError as e:  # nltk data present but incomplete
                    messages.append(f"METEOR not computed: {str(e).strip().splitlines()[0]}")
                    meteor_fn = None
        if bert_fn is not None:
            scores = bert_fn([records[i]["prediction"] for i in text_indices],
                             [records[i]["reference"] for i in text_indices])
            for i, s in zip(text_indices, scores):
                samples[i]["bertscore_f1"] = s

    for i in (i for t in CHOICE_TASKS for i in by_task.get(t, [])):
        record = records[i]
        letter = record.get("answer_choice")
        if not letter:
            m = re.match(r"\s*([A-H])\.", record.get("reference") or "")
            if m is None:
                raise InputError(f"record {i} ({record['task']}) needs 'answer_choice' (the correct letter) or a "
                                 "reference like 'C. Liver'")
            letter = m.group(1)
        samples[i]["correct"] = float(closed_vqa_correct(_text(record, "prediction", i), letter))

    for i in (i for t in BOX_TASKS for i in by_task.get(t, [])):
        record = records[i]
        prediction = _text(record, "prediction", i)
        if "reference_box" in record:
            reference_box = record["reference_box"]
        else:
            reference_box = extract_box_official(_text(record, "reference", i))
        if reference_box is None:  # the target is absent: the answer should say so
            samples[i]["absent_correct"] = float(parse_box_answer(prediction).absent)
            continue
        predicted = extract_box_official(prediction)
        samples[i]["iou_official"] = box_iou_official(predicted, reference_box) if predicted else -1.0
        samples[i]["iou"] = box_iou(predicted, reference_box, model_shape) if predicted else -1.0

    for t in SEG_TASKS:
        for i in by_task.get(t, []):
            record = records[i]
            if record.get("logits") is not None:
                logits = record["logits"]
            elif record.get("probabilities") is not None:
                logits = _probabilities_to_logits(record["probabilities"])
            elif record.get("prediction_mask") is not None:
                logits = _probabilities_to_logits((_as_tensor(record["prediction_mask"], "mask") > 0).float())
            else:
                raise InputError(f"record {i} ({t}) needs 'logits' (or 'probabilities' / 'prediction_mask')")
            samples[i]["dice_soft"] = dice_soft(logits, record.get("target_mask"))
            samples[i]["dice"] = dice_binary(logits, record.get("target_mask"))

    tasks: dict[str, Any] = {}
    for task, indices in by_task.items():
        rows = [samples[i] for i in indices]
        names = sorted({k for r in rows for k in r} - {"index", "task"})
        metrics: dict[str, Any] = {}
        for name in names:
            values = [r[name] for r in rows if name in r]
            if name == "correct":
                metrics["accuracy"] = _mean(values)
            elif name == "absent_correct":
                metrics["absent_accuracy"] = _mean(values)
            elif name in ("iou", "iou_official"):
                parsed = [v for v in values if v >= 0]
                metrics[name] = _mean(parsed)
                metrics[f"{name}_accuracy@{IOU_THRESHOLD}"] = _mean([float(v > IOU_THRESHOLD) for v in values])
                if name == "iou":
                    metrics["unparsable"] = len(values) - len(parsed)
            else:
                metrics[name] = _mean(values)
        tasks[task] = {"n": len(indices), "metrics": metrics}
    return {
        "tasks": tasks,
        "samples": samples,
        "messages": list(dict.fromkeys(messages)),
        "definitions": DEFINITIONS,
    }


DEFINITIONS = {
    "bleu1": "sentence BLEU with max order 1 (13a tokens, no smoothing), mean over samples (official max_order=1)",
    "rouge1": "ROUGE-1 F-measure (rouge-score, no stemming), mean over samples",
    "meteor": "METEOR (nltk; alpha 0.9, beta 3, gamma 0.5), mean over samples",
    "bertscore_f1": "BERTScore F1 (bert-score, no baseline rescaling), mean over samples",
    "accuracy": "closed VQA: share of predictions containing '<correct letter>.' (official rule)",
    "iou_official": "M3D-Bench box 'IoU': intersection / enclosing-box volume (+1e-6); mean over parsed boxes",
    "iou": "true IoU of the model voxels the boxes cover; mean over parsed boxes",
    "iou_official_accuracy@0.5": "share of samples with official IoU > 0.5 (unparsable boxes count as misses)",
    "iou_accuracy@0.5": "share of samples with true IoU > 0.5 (unparsable boxes count as misses)",
    "unparsable": "predictions without a box in the official format",
    "absent_accuracy": "targets absent from the image: share of answers that say so",
    "dice_soft": "official Dice on sigmoid(logits): 2 sum(p t) / (sum p + sum t + 1) (MONAI DiceLoss)",
    "dice": "Dice of sigmoid(logits) > 0.5 (MONAI compute_dice; 1 when both masks are empty)",
}


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------

_PLOTTED = ("bleu1", "rouge1", "meteor", "bertscore_f1", "accuracy", "absent_accuracy", "iou_official", "iou",
            "iou_accuracy@0.5", "dice_soft", "dice")


def plot_metrics(results: dict[str, Any]) -> bytes:
    """A PNG bar chart of the [0, 1] metrics, grouped by task (matplotlib's Agg canvas; no GUI, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars = [(task, name, value) for task, entry in results["tasks"].items() for name, value in entry["metrics"].items()
            if name in _PLOTTED and value is not None]
    fig = Figure(figsize=(max(4.0, 0.55 * len(bars) + 1.5), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if bars:
        tasks = list(dict.fromkeys(t for t, _, _ in bars))
        colours = {t: f"C{k % 10}" for k, t in enumerate(tasks)}
        x = np.arange(len(bars))
        ax.bar(x, [v for _, _, v in bars], color=[colours[t] for t, _, _ in bars])
        ax.set_xticks(x, [f"{t}\n{n}" for t, n, _ in bars], rotation=60, ha="right", fontsize=7)
        for xi, (_, _, v) in zip(x, bars):
            ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no metrics", ha="center", va="center")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score")
    n = sum(e["n"] for e in results["tasks"].values())
    ax.set_title(f"M3D-Bench metrics ({n} predictions)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_evaluation(results: dict[str, Any], folder: Union[str, os.PathLike], *, overwrite: bool = False,
                     stem: str = "metrics") -> tuple[Path, Path]:
    """Write ``<stem>.json`` (everything :func:`evaluate_predictions` returned) and ``<stem>.png`` (the bar chart)
    into ``folder`` (created if needed); existing files are kept unless ``overwrite``. Returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = write_json(folder / f"{stem}.json", results, overwrite=overwrite)
    png_path = atomic_write_bytes(folder / f"{stem}.png", plot_metrics(results), overwrite=overwrite)
    for message in results.get("messages", []):
        log.warning("%s", message)
    return json_path, png_path
