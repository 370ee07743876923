"""``m3d selfcheck``: does this installation reproduce sane results, from loading to geometry?

It runs the model on a CT with ground-truth labels (by default the bundled TotalSegmentator CT) under the default
per-task conventions -- or, with ``conventions="all"``, under every candidate -- and scores what comes back:

* **segment** each structure: Dice of the mask against the label, on the CT's own voxel grid, without and with
  zoom-in refinement (:mod:`.refinement`), so that users with the real weights see whether refinement helps;
* **locate** each structure: IoU of the box (as drawn on the CT grid) with the label's bounding box, both the true
  IoU and M3D-Bench's (intersection over the enclosing box), and whether it sits on the correct side of the body;
* **plane**: the closed question "Which plane is this image in?" on the CT and on the same voxels re-stored as a
  coronal and a sagittal series (an exact re-indexing, no resampling); the right answer is the plane of the slices
  the model is shown (:func:`~M3DAssistantLib.geometry.model_plane_for`).

A wrong orientation shows as a Dice near 0 for the liver and boxes on the wrong side; a working install with the
official weights scores well above the thresholds below (README, "Checking an installation"). Random test weights
answer with neither masks nor boxes most of the time: the report then says *inconclusive*, not *failed*.

The JSON form (:meth:`SelfCheckReport.to_dict`) has a stable schema (``schema``/``version``): see
``docs/conventions.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import AI_LABEL, __version__
from .errors import InputError
from .geometry import CONVENTIONS, RasRoi, model_plane_for, validate_ijk_to_ras
from .progress import ProgressCallback, report_progress
from .results import AnalysisOptions, SamplingOptions, utc_now
from .tasks import CHOOSE, LOCATE, SEGMENT

SCHEMA = "m3d-selfcheck"
SCHEMA_VERSION = 1

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "TotalSegmentator"
"""The bundled CT with its labels: packaged with the Slicer extension (the module's Resources, listed in its
CMakeLists.txt), so "Check installation" works in an installed extension; the same files as ``Testing/Data/
totalsegmentator`` (a test checks they are identical)."""
SAMPLE_CT = SAMPLE_DIR / "example_ct_sm.nii.gz"
SAMPLE_LABELS = SAMPLE_DIR / "example_seg.nii.gz"
SAMPLE_LABEL_NAMES = SAMPLE_DIR / "labels_total.json"

DICE_OK = 0.5
"""Dice at or above which a mask counts as right. Provisional until measured with the official weights."""
IOU_OK = 0.3
"""True box IoU at or above which a box counts as right. Provisional until measured with the official weights."""
LATERAL_MM = 20.0
"""A structure whose label centroid is this far from the body's midline has a side that a result must share."""

PLANE_QUESTION = "Which plane is this image in?"
PLANE_CHOICES = ("Axial", "Coronal", "Sagittal", "Oblique")


@dataclasses.dataclass(frozen=True)
class Structure:
    """A target to ask for (``name``, as the training templates name it) and the label names that are its truth."""

    name: str
    labels: tuple[str, ...]


DEFAULT_STRUCTURES = (
    Structure("liver", ("liver",)),
    Structure("spleen", ("spleen",)),
    Structure("right kidney", ("kidney_right",)),
    Structure("left kidney", ("kidney_left",)),
    Structure("stomach", ("stomach",)),
    Structure("aorta", ("aorta",)),
)


def structures_named(names: Optional[Sequence[str]]) -> tuple[Structure, ...]:
    """The structures to check by name: those of :data:`DEFAULT_STRUCTURES` by their name, any other name as a label
    of that name; None: the defaults."""
    if names is None:
        return DEFAULT_STRUCTURES
    known = {s.name: s for s in DEFAULT_STRUCTURES}
    return tuple(known.get(name, Structure(name, (name,))) for name in names)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics (pure numpy)
# ----------------------------------------------------------------------------------------------------------------------


def dice(prediction: np.ndarray, truth: np.ndarray) -> Optional[float]:
    """2 |A and B| / (|A| + |B|) of two binary masks of the same shape; None when both are empty."""
    a, b = np.asarray(prediction) != 0, np.asarray(truth) != 0
    if a.shape != b.shape:
        raise InputError(f"masks of different shapes {a.shape} and {b.shape}; give both on the volume's grid")
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def bounds_of(mask: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """First and last voxel index along each array axis of a binary mask (inclusive); None when empty."""
    m = np.asarray(mask) != 0
    if not m.any():
        return None
    lo, hi = [], []
    for axis in range(m.ndim):
        idx = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis)))
        lo.append(idx[0])
        hi.append(idx[-1])
    return np.array(lo), np.array(hi)


def box_iou(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """``(true IoU, M3D-Bench IoU)`` of two boxes given as inclusive voxel-index bounds: intersection over union,
    and intersection over the enclosing box (``calculate_iou`` of the official ``LaMed/src/utils/utils.py``)."""
    (alo, ahi), (blo, bhi) = a, b
    size = lambda lo, hi: float(np.prod(np.maximum(hi - lo + 1, 0)))  # noqa: E731
    inter = size(np.maximum(alo, blo), np.minimum(ahi, bhi))
    union = size(alo, ahi) + size(blo, bhi) - inter
    enclosing = size(np.minimum(alo, blo), np.maximum(ahi, bhi))
    return inter / union, inter / enclosing


def roi_voxel_bounds(
    roi: RasRoi, ijk_to_ras: np.ndarray, shape_kji: Sequence[int]
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The (K, J, I) bounds of the voxels whose centres lie in ``roi``; None when it holds none."""
    m = validate_ijk_to_ras(ijk_to_ras)
    ijk = (np.linalg.inv(m) @ np.c_[roi.corners(), np.ones(8)].T)[:3].T
    lo = np.maximum(np.ceil(ijk.min(axis=0) - 1e-6), 0)[::-1]
    hi = np.minimum(np.floor(ijk.max(axis=0) + 1e-6), np.array(shape_kji[::-1]) - 1)[::-1]
    if np.any(hi < lo):
        return None
    return lo.astype(int), hi.astype(int)


def centroid_ras(mask: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(np.asarray(mask))
    return (np.asarray(ijk_to_ras) @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]


def body_midline_x(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> float:
    """RAS x (patient right is +x) of the centroid of the voxels above the volume's mean: the body's midline."""
    return float(centroid_ras(array_kji > array_kji.mean(), ijk_to_ras)[0])


def side_of(x: float, midline_x: float) -> str:
    return "right" if x > midline_x else "left"  # RAS: +x is the patient's right


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    """One question put to the model and how its answer scores. ``verdict``: "ok", "poor", "wrong side", "wrong"
    (plane), or "no answer" (no mask, no box or no choice in the answer: ``outcome`` says which)."""

    task: str  # "segment" | "locate" | "plane"
    target: str  # the structure, or the plane the volume is stored in for "plane"
    convention: str
    window: str
    prompt: str
    answer: str
    outcome: str  # "mask" | "box" | "choice" | "absent" | "no [SEG]" | "empty mask" | "no mask" | "parse error"
    verdict: str
    dice: Optional[float] = None
    dice_refined: Optional[float] = None  # segment: Dice of the zoom-in refined mask (None: no mask to refine)
    iou: Optional[float] = None
    iou_official: Optional[float] = None
    centre_error_mm: Optional[float] = None
    side: Optional[str] = None  # "correct" | "wrong" | None (structure on the midline, or no result)
    expected: Optional[str] = None  # plane: the plane of the slices the model is shown
    chosen: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SelfCheckReport:
    """What :func:`run_selfcheck` found. ``verdict``: "pass" (at least two thirds of the answered checks within the
    thresholds, the liver's among them, none on the wrong side), "inconclusive" (no mask or box could be scored, as
    with random test weights), "orientation suspect" (a structure on the wrong side of the body, or the liver
    missed entirely) or "poor" (too many answers below the thresholds)."""

    model: dict[str, Any]
    volume: dict[str, Any]
    conventions: str
    checks: list[Check]
    verdict: str
    message: str
    thresholds: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"dice_ok": DICE_OK, "iou_ok": IOU_OK, "lateral_mm": LATERAL_MM})
    created: str = dataclasses.field(default_factory=utc_now)

    @property
    def passed(self) -> bool:
        return self.verdict in ("pass", "inconclusive")

    def by_convention(self) -> dict[str, dict[str, Any]]:
        """Per convention: how many checks were answered, how many were ok, mean Dice and IoU of the answered."""
        out: dict[str, dict[str, Any]] = {}
        for name in dict.fromkeys(c.convention for c in self.checks):
            mine = [c for c in self.checks if c.convention == name]
            dices = [c.dice for c in mine if c.dice is not None and c.task == "segment"]
            refined = [c.dice_refined for c in mine if c.dice_refined is not None]
            ious = [c.iou for c in mine if c.iou is not None]
            out[name] = {
                "checks": len(mine),
                "answered": sum(c.verdict != "no answer" for c in mine),
                "ok": sum(c.verdict == "ok" for c in mine),
                "wrong_side": sum(c.verdict == "wrong side" for c in mine),
                "mean_dice": round(float(np.mean(dices)), 4) if dices else None,
                "mean_dice_refined": round(float(np.mean(refined)), 4) if refined else None,
                "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "created": self.created,
            "software": f"m3d-slicer {__version__}",
            "label": AI_LABEL,
            "model": self.model,
            "volume": self.volume,
            "conventions": self.conventions,
            "thresholds": self.thresholds,
            "verdict": self.verdict,
            "message": self.message,
            "by_convention": self.by_convention(),
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SelfCheckReport":
        """The inverse of :meth:`to_dict` (a report read back from JSON or from a server); fields a later version
        added are ignored, a report of another schema is an InputError."""
        if data.get("schema") != SCHEMA:
            raise InputError(f"not a self-check report (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        if int(data.get("version", 0)) > SCHEMA_VERSION:
            raise InputError(f"the self-check report has schema version {data.get('version')}; this version of "
                             f"m3d-slicer reads version {SCHEMA_VERSION}: update m3d-slicer")
        names = {f.name for f in dataclasses.fields(Check)}
        checks = [Check(**{k: v for k, v in c.items() if k in names}) for c in data.get("checks", [])]
        return cls(model=dict(data.get("model", {})), volume=dict(data.get("volume", {})),
                   conventions=str(data.get("conventions", "default")), checks=checks,
                   verdict=str(data["verdict"]), message=str(data.get("message", "")),
                   thresholds=dict(data.get("thresholds", {})), created=str(data.get("created", "")))


def format_report(report_: SelfCheckReport) -> str:
    """A readable table for the terminal."""
    m = report_.model
    lines = [f"model    {m.get('source')} ({m.get('model_type')}, {m.get('device')}, {m.get('dtype')}, revision "
             f"{m.get('revision')})",
             f"volume   {report_.volume.get('path')} {tuple(report_.volume.get('shape', ()))} (K,J,I), "
             f"{report_.volume.get('plane')} series",
             "",
             f"{'task':8} {'target':15} {'convention':14} {'window':18} {'result':11} {'Dice':>6} {'Dice+z':>6} "
             f"{'IoU':>6} {'IoU*':>6} {'off mm':>7}  {'side/plane':12} verdict"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for c in report_.checks:
        extra = c.side or "-"
        if c.task == "plane":
            extra = f"{c.chosen or '?'} / {c.expected}"
        lines.append(f"{c.task:8} {c.target[:15]:15} {c.convention:14} {c.window[:18]:18} {c.outcome[:11]:11} "
                     f"{fmt(c.dice, '.3f'):>6} {fmt(c.dice_refined, '.3f'):>6} {fmt(c.iou, '.3f'):>6} "
                     f"{fmt(c.iou_official, '.3f'):>6} "
                     f"{fmt(c.centre_error_mm, '.1f'):>7}  {extra[:12]:12} {c.verdict}")
    lines += ["", "Dice+z = Dice after zoom-in refinement; IoU* = M3D-Bench box IoU (intersection / enclosing box); "
              "off mm = distance of the result's centre from the label's", ""]
    for name, s in report_.by_convention().items():
        lines.append(f"{name:14} answered {s['answered']}/{s['checks']}, ok {s['ok']}, wrong side {s['wrong_side']}, "
                     f"mean Dice {fmt(s['mean_dice'], '.3f')} (refined {fmt(s['mean_dice_refined'], '.3f')}), "
                     f"mean IoU {fmt(s['mean_iou'], '.3f')}")
    lines += ["", f"verdict: {report_.verdict.upper()} -- {report_.message}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------------------------------


def load_labels(labels_path: Union[str, os.PathLike], names_path: Optional[Union[str, os.PathLike]],
                shape_kji: Sequence[int]) -> tuple[np.ndarray, dict[str, int]]:
    """A label map on the volume's grid and ``{name: value}`` from a JSON of ``{"value": "name"}`` (TotalSegmentator's
    ``labels_total.json`` layout)."""
    from .volume_io import read_volume

    labels, _ = read_volume(Path(labels_path))
    if tuple(labels.shape) != tuple(shape_kji):
        raise InputError(f"the labels {labels_path} have shape {labels.shape} (K, J, I) but the volume has "
                         f"{tuple(shape_kji)}; give a label map on the volume's own grid")
    if names_path is None:
        raise InputError("give the label names (--label-names NAMES.json: {\"1\": \"spleen\", ...}) with --labels")
    try:
        names = {str(v): int(k) for k, v in json.loads(Path(names_path).read_text(encoding="utf-8")).items()}
    except (OSError, ValueError) as e:
        raise InputError(
            f"{names_path}: cannot read the label names ({e}); it must be JSON {{\"1\": \"spleen\", ...}}"
        ) from None
    return labels, names


def restack(array_kji: np.ndarray, ijk_to_ras: np.ndarray, plane: str) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored as a series whose K axis is the voxel axis nearest to the plane's normal (coronal:
    anterior-posterior, sagittal: right-left; axial: as they are if K is already nearest to S). Exact: the array is
    re-indexed (no resampling) and the matrix adjusted, so every voxel keeps its RAS position."""
    m = validate_ijk_to_ras(ijk_to_ras)
    normal = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    ijk_axis = int(np.argmax(np.abs(m[normal, :3]) / np.linalg.norm(m[:3, :3], axis=0)))
    array_axis = 2 - ijk_axis
    perm = [array_axis] + [a for a in range(3) if a != array_axis]  # new K first, then the others in order
    new = np.ascontiguousarray(np.transpose(array_kji, perm))
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1.0
    for new_axis, old_axis in enumerate(perm):
        new_to_old[2 - old_axis, 2 - new_axis] = 1.0
    return new, m @ new_to_old


def run_selfcheck(
    engine: Any = None,
    *,
    model: Union[str, os.PathLike, None] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    volume: Union[str, os.PathLike, None] = None,
    labels: Union[str, os.PathLike, None] = None,
    label_names: Union[str, os.PathLike, None] = None,
    structures: Sequence[Structure] = DEFAULT_STRUCTURES,
    conventions: str = "default",
    max_new_tokens: int = 64,
    progress: Optional[ProgressCallback] = None,
) -> SelfCheckReport:
    """Run the self-check and return its report (see the module docstring).

    Args:
        engine: an :class:`~M3DAssistantLib.engine.InferenceEngine` to use; else one is loaded from ``model``
            (hub id or folder; default ``$M3D_MODEL`` / the Phi-3-4B model) on ``device`` with ``dtype``.
        volume, labels, label_names: a CT, its label map on the same grid and the JSON naming the label values;
            default the bundled TotalSegmentator CT and its labels.
        structures: what to segment and locate (default liver, spleen, kidneys, stomach, aorta).
        conventions: "default" (each task's own) or "all" (every task under every convention of
            :data:`~M3DAssistantLib.geometry.CONVENTIONS`).
        max_new_tokens: answer length (greedy decoding, as M3D-Bench).
    """
    from .volume_io import read_volume, read_volume_metadata

    if conventions not in ("default", "all"):
        raise InputError(f"conventions must be 'default' or 'all', not {conventions!r}")
    if engine is None:
        from .engine import InferenceEngine

        engine = InferenceEngine(model, device=device, dtype=dtype, progress=progress)
    if volume is None:
        if not SAMPLE_CT.is_file():
            raise InputError(f"the bundled sample CT ({SAMPLE_CT}) is not part of this installation; pass a CT with "
                             "its labels: --volume CT --labels LABELS --label-names NAMES.json")
        volume, labels, label_names = SAMPLE_CT, SAMPLE_LABELS, SAMPLE_LABEL_NAMES
    elif labels is None:
        raise InputError("a self-check needs ground truth: pass --labels (a label map on the volume's grid) and "
                         "--label-names with --volume")
    array, ijk_to_ras = read_volume(Path(volume))
    meta = read_volume_metadata(Path(volume))
    label_map, names = load_labels(labels, label_names, array.shape)
    missing = [label for s in structures for label in s.labels if label not in names]
    if missing:
        raise InputError(f"the label names lack {', '.join(missing)}; they have {', '.join(sorted(names)[:12])} ...")

    sampling = SamplingOptions(max_new_tokens=max_new_tokens, do_sample=False)
    midline = body_midline_x(array, ijk_to_ras)
    truths = {s.name: np.isin(label_map, [names[label] for label in s.labels]) for s in structures}
    empty = [name for name, mask in truths.items() if not mask.any()]
    if empty:
        raise InputError(f"the labels hold no voxel of {', '.join(empty)}; choose structures the volume shows")
    names_to_run = list(CONVENTIONS) if conventions == "all" else [None]
    total = len(names_to_run) * (2 * len(structures) + 3)
    checks: list[Check] = []
    saved_convention = engine.convention
    try:
        for convention in names_to_run:
            engine.convention = convention
            engine.set_volume(array, ijk_to_ras, display_window=meta.display_window, modality=meta.modality)
            for s in structures:
                report_progress(progress, "selfcheck", len(checks) / total, f"segment {s.name}")
                checks.append(_segment_check(engine, s.name, truths[s.name], ijk_to_ras, midline, sampling))
                report_progress(progress, "selfcheck", len(checks) / total, f"locate {s.name}")
                checks.append(_locate_check(engine, s.name, truths[s.name], ijk_to_ras, array.shape, midline,
                                            sampling))
            for plane in ("axial", "coronal", "sagittal"):
                report_progress(progress, "selfcheck", len(checks) / total, f"plane question ({plane} series)")
                stacked, matrix = restack(array, ijk_to_ras, plane)
                engine.set_volume(stacked, matrix, display_window=meta.display_window, modality=meta.modality)
                checks.append(_plane_check(engine, plane, matrix, sampling))
    finally:
        engine.convention = saved_convention
    report_progress(progress, "selfcheck", 1.0, "done")
    info = engine.info()
    if conventions == "all":  # the verdict is the defaults'; the others are there to compare with
        own = {"segment": SEGMENT.convention, "locate": LOCATE.convention, "plane": CHOOSE.convention}
        verdict, message = _verdict([c for c in checks if c.convention == own[c.task]])
        message += " (Verdict from each task's default convention; compare the others in the table.)"
    else:
        verdict, message = _verdict(checks)
    from .geometry import slice_plane

    return SelfCheckReport(
        model={"source": info.get("model"), "revision": info.get("revision"), "model_type": info.get("model_type"),
               "device": info.get("device"), "dtype": info.get("dtype")},
        volume={"path": str(volume), "labels": str(labels), "shape": list(array.shape),
                "plane": slice_plane(ijk_to_ras), "modality": meta.modality,
                "display_window": dataclasses.asdict(meta.display_window) if meta.display_window else None},
        conventions=conventions, checks=checks, verdict=verdict, message=message)


def _used(result: Any) -> tuple[str, str]:
    """Convention name and window name from a result's provenance."""
    convention = (result.provenance.convention or "?").split("@")[0]
    window = "?"
    if result.provenance.intensity:
        try:
            window = str(json.loads(result.provenance.intensity).get("name", "?"))
        except (ValueError, AttributeError):
            pass
    return convention, window


def _side(pred_x: float, truth_x: float, midline: float) -> Optional[str]:
    if abs(truth_x - midline) < LATERAL_MM:
        return None
    return "correct" if side_of(pred_x, midline) == side_of(truth_x, midline) else "wrong"


def _segment_check(engine, target, truth, ijk_to_ras, midline, sampling) -> Check:
    result = engine.segment(target, sampling=sampling)
    convention, window = _used(result)
    base = dict(task="segment", target=target, convention=convention, window=window,
                prompt=result.provenance.prompt, answer=result.text)
    if result.mask is None or not result.mask.any():
        if result.mask is not None:
            outcome = "empty mask"  # [SEG] given, but SegVol marked no voxel
        else:
            outcome = "absent" if result.absent else "no [SEG]" if result.parse_error else "no mask"
        return Check(**base, outcome=outcome, verdict="no answer")
    truth_c = centroid_ras(truth, ijk_to_ras)
    pred_c = centroid_ras(result.mask, ijk_to_ras)
    score = dice(result.mask, truth)
    side = _side(pred_c[0], truth_c[0], midline)
    verdict = "wrong side" if side == "wrong" else "ok" if score >= DICE_OK else "poor"
    refined = engine.segment(target, sampling=sampling, analysis=AnalysisOptions(refine=True))
    refined_score = dice(refined.mask, truth) if refined.refinement is not None and refined.mask is not None else None
    return Check(**base, outcome="mask", verdict=verdict, dice=round(score, 4),
                 dice_refined=round(refined_score, 4) if refined_score is not None else None,
                 centre_error_mm=round(float(np.linalg.norm(pred_c - truth_c)), 2), side=side)


def _locate_check(engine, target, truth, ijk_to_ras, shape, midline, sampling) -> Check:
    result = engine.locate(target, sampling=sampling)
    convention, window = _used(result)
    base = dict(task="locate", target=target, convention=convention, window=window,
                prompt=result.provenance.prompt, answer=result.text)
    pred = roi_voxel_bounds(result.roi, ijk_to_ras, shape) if result.roi is not None else None
    if pred is None:
        outcome = "absent" if result.absent else "parse error" if result.parse_error else "no box"
        return Check(**base, outcome=outcome, verdict="no answer")
    true_bounds = bounds_of(truth)
    iou, iou_official = box_iou(pred, true_bounds)
    truth_c = centroid_ras(truth, ijk_to_ras)
    pred_c = np.asarray(result.roi.center, dtype=float)
    box_c = (np.asarray(ijk_to_ras) @ np.append(((true_bounds[0] + true_bounds[1]) / 2.0)[::-1], 1.0))[:3]
    side = _side(pred_c[0], truth_c[0], midline)
    verdict = "wrong side" if side == "wrong" else "ok" if iou >= IOU_OK else "poor"
    return Check(**base, outcome="box", verdict=verdict, iou=round(iou, 4), iou_official=round(iou_official, 4),
                 centre_error_mm=round(float(np.linalg.norm(pred_c - box_c)), 2), side=side)


def _plane_check(engine, stored_plane, ijk_to_ras, sampling) -> Check:
    result = engine.choose(PLANE_QUESTION, list(PLANE_CHOICES), sampling=sampling)
    convention, window = _used(result)
    expected = model_plane_for(ijk_to_ras, convention).capitalize()
    base = dict(task="plane", target=f"{stored_plane} series", convention=convention, window=window,
                prompt=result.provenance.prompt, answer=result.text, expected=expected)
    if result.choice is None:
        return Check(**base, outcome="parse error", verdict="no answer")
    return Check(**base, outcome="choice", chosen=result.choice,
                 verdict="ok" if result.choice == expected else "wrong")


def _verdict(checks: Sequence[Check]) -> tuple[str, str]:
    answered = [c for c in checks if c.verdict != "no answer"]
    if not answered:
        return "inconclusive", (
            "the model gave no mask, box or plane choice that could be scored. Expected with random test weights "
            "(m3d make-test-checkpoint); with the official weights it means the model, its tokenizer or its "
            "inputs are broken -- run m3d inspect on the checkpoint.")
    wrong_side = [c for c in answered if c.verdict == "wrong side"]
    liver_missed = [c for c in answered if c.task == "segment" and c.target == "liver" and (c.dice or 0.0) < 0.1]
    if wrong_side or liver_missed:
        what = ", ".join(sorted({f"{c.task} {c.target} ({c.convention})" for c in wrong_side + liver_missed}))
        return "orientation suspect", (
            f"results on the wrong side of the body or missing the liver entirely: {what}. The model is seeing the "
            "volume in an orientation it was not trained on (or the weights are wrong); compare conventions with "
            "m3d selfcheck --conventions all.")
    ok = [c for c in answered if c.verdict == "ok"]
    liver = [c for c in answered if c.target == "liver"]
    if not [c for c in answered if c.task != "plane"]:
        return "inconclusive", (
            f"no mask or box came back (only {len(answered)} plane answer(s)); nothing to score the geometry by.")
    if 3 * len(ok) >= 2 * len(answered) and (not liver or any(c.verdict == "ok" for c in liver)):
        return "pass", (f"{len(answered)} of {len(checks)} checks answered, {len(ok)} within the thresholds "
                        f"(Dice {DICE_OK}, IoU {IOU_OK}), none on the wrong side.")
    return "poor", (f"{len(answered) - len(ok)} of {len(answered)} answered checks are below the thresholds (Dice "
                    f"{DICE_OK}, IoU {IOU_OK}) or name the wrong plane, though none is on the wrong side; see the "
                    "table.")
