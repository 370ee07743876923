"""Annotated Slicer scenes -> an M3D-format training dataset folder, and a report of what was (not) exported.

Every volume goes through the same geometry code as inference (:func:`M3DAssistantLib.geometry.to_model_input`, in
the orientation convention of each task, exactly as :class:`~M3DAssistantLib.engine.InferenceEngine` preprocesses
it), so a model fine-tuned on the export sees what it will see when it is used. The scene is only read: no node is
added, changed or removed, and an existing dataset folder is never written into.

Annotation convention
=====================

What is exported, per volume (a scalar volume node that is not a label map):

=====================  ===================================================================================
Scene content           Training samples
=====================  ===================================================================================
Segment                 ``seg`` ("What is <target> in this image? ..." -> "It is [SEG]."), ``rec`` (box
                        from the mask) and ``reg`` (name from the box). The segment's name is the target
                        name (``kidney_left`` becomes "left kidney"); a generic name ("Segment_1") falls
                        back to the segment's terminology (other than Slicer's default "Tissue"), else the
                        segment is skipped. Two segments of one volume must not share a name.
ROI markup              ``rec``: "Where is <ROI name> in this image? ..." -> its box. With node attribute
                        ``M3D.task`` = ``reg``: "What target is present within <box> ?" -> "The target is
                        <ROI name>."
Text node, name ending  ``report``: its text is the report of the volume. (Or set the node attribute
in "report"              ``M3D.kind`` = ``report``; ``M3D.kind`` = ``qa`` marks Q/A text.)
Text node with ``Q:``   Question/answer pairs, one block per ``Q:`` line (keys are case-insensitive; lines
lines                   without a key continue the previous field)::

                            Q: What abnormality is seen in the liver?
                            A: A hypodense lesion in segment VII.

                            Q: Which organ is enlarged?
                            Choices: Liver | Spleen | Pancreas | Kidney
                            A: B

                            Q: Please segment where the cyst appears in the image.
                            Segment: liver cyst

                            Absent: gallbladder, appendix

                        A block with ``Choices:`` is closed VQA (``A:`` is a letter or one of the choice
                        texts); without, open VQA. A block with ``Segment: <segment name>`` is referring
                        segmentation of that segment (the answer is "The target is <target> and the
                        segmentation mask is [SEG]." unless an ``A:`` containing [SEG] is given).
                        ``Absent:`` names structures that are NOT in the image (negative ``rec``/``seg``
                        samples: "Sorry, there is no gallbladder.").
Table node              VQA pairs with the official M3D-VQA columns ``Question``, ``Answer`` and, for closed
                        questions, ``Choice A`` ... ``Choice D`` and ``Answer Choice`` (a letter).
=====================  ===================================================================================

Which volume a node belongs to: its attribute ``M3D.volume`` (the volume node's ID or name); else, for a
segmentation, the volume it was segmented on (reference image geometry); else a name starting with the volume's name
("CT report", "CT questions"); else the scene's only volume. A volume node's attribute ``M3D.split`` =
``train``/``validation`` puts it in that split; the others are split at random by volume (seeded).

Skipped, each with its reason in the report: anything attached to no volume, empty segments (or segments outside
the region the model sees), unnamed/unmatched targets, unsupported nodes (label maps, other markups, models),
model outputs (nodes or segments carrying the ``M3D.label`` "AI-generated" attribute -- check them, then remove the
attribute to use them as ground truth), malformed Q/A blocks.

Dataset folder
==============
``images/<image>.npy`` (1xDxHxW float32 in [0, 1]) and ``images/<image>.mapping.json`` (the exact mapping back to the
volume, with the intensity window used), one per volume and *view* -- orientation convention and intensity window,
each task's own as inference uses them (:attr:`~M3DAssistantLib.tasks.Task.convention`, :attr:`~M3DAssistantLib.
tasks.Task.window` through :func:`~M3DAssistantLib.preprocessing.default_window`, with the scene volume's display
window/level and DICOM Modality). Image names (:func:`image_suffixes`): ``<volume>_<convention>``, the convention's
family without ``m3d-`` and its version -- ``<volume>_cap`` (report, VQA: ``m3d-cap-v2``, display window),
``<volume>_seg`` (boxes, segmentation: ``m3d-seg-v1``, M3D-Seg percentiles), ``<volume>_refseg`` (referring
segmentation: ``m3d-refseg-v1``, M3D-RefSeg percentiles); with ``convention=`` forced, ``<volume>_<window kind>``
(``_display``, ``_percentile``, ``_volume_percentile``); with both ``convention=`` and ``window=`` forced, just
``<volume>``. ``masks/<image>_<target>.npy`` (1xDxHxW bool, model space of that image);
``texts/<volume>_report.txt``; ``dataset.json``: per task a ``{"train": [...], "validation": [...]}`` list in the
official field layout (M3D-Cap ``image``/``text``; M3D-VQA ``Image Path``/``Question``/``Choice A``../``Answer
Choice``/``Answer``; M3D-Seg ``image``/``label``; M3D-RefSeg ``Image``/``Mask``/``Mask_ID``/``Question``/``Answer``),
plus our fields (``target``, ``box`` numbers and ``box_text`` in the official text form, ``volume``, ``node``);
``export_report.json`` and ``export_report.txt``. Boxes are stored as numbers: the training text is written after
augmentation (:mod:`.data`).

Why this file is long: the scene reader and the dataset writer share the annotation convention documented above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from M3DAssistantLib import AI_LABEL, prompts, tasks
from M3DAssistantLib.errors import GeometryError, InputError, M3DError
from M3DAssistantLib.geometry import (
    DEFAULT_MODEL_SHAPE,
    format_box,
    mask_to_box,
    mask_to_model,
    resolve_convention,
    roi_to_box,
    to_model_input,
)
from M3DAssistantLib.model.tokenizer import BOX_END, BOX_START
from M3DAssistantLib.outputs import write_json, write_text
from M3DAssistantLib.preprocessing import IntensitySpec, default_window, resolve_window
from M3DAssistantLib.progress import ProgressCallback, report_progress
from M3DAssistantLib.tasks import TRAINING_NAMES, convention_for

log = logging.getLogger(__name__)

__all__ = [
    "DATASET_FORMAT",
    "DATASET_VERSION",
    "TASKS",
    "ExportResult",
    "SkippedItem",
    "box_text",
    "export_dataset",
    "image_suffixes",
    "parse_qa_text",
    "target_text",
]

DATASET_FORMAT = "m3d-slicer-dataset"
DATASET_VERSION = 1
TASKS = TRAINING_NAMES  # the dataset's sections, in order: the task registry's training names
# each task's name in the dataset (dataset.json sections, the "task" of a sample; M3D.task of an ROI is REC or REG)
REPORT, VQA_OPEN, VQA_CLOSED, REC, REG, SEG, REFSEG = (task.training_name for task in (
    tasks.REPORT, tasks.ASK, tasks.CHOOSE, tasks.LOCATE, tasks.DESCRIBE_REGION, tasks.SEGMENT,
    tasks.SEGMENT_EXPRESSION))
SPLITS = ("train", "validation")
SEGMENT_TASKS = (SEG, REC, REG)
ATTRIBUTE_VOLUME = "M3D.volume"
ATTRIBUTE_TASK = "M3D.task"
ATTRIBUTE_KIND = "M3D.kind"
ATTRIBUTE_SPLIT = "M3D.split"
ATTRIBUTE_LABEL = "M3D.label"  # set by M3DAssistant on everything the model produced

SceneSource = Union[str, os.PathLike, Any]  # a .mrb/.mrml path or a vtkMRMLScene


# ----------------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SkippedItem:
    """Something in a scene that was not exported, and why (``kind``: volume, segment, roi, text, table, qa, node,
    scene)."""

    scene: str
    node: str
    kind: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_dataset` wrote: counts per task and split, volumes, skipped items, warnings."""

    folder: Path
    counts: dict[str, dict[str, int]]
    volumes: dict[str, dict[str, Any]]
    skipped: list[SkippedItem]
    warnings: list[str]

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "total_samples": self.total,
            "counts": self.counts,
            "volumes": self.volumes,
            "skipped": [s.to_dict() for s in self.skipped],
            "warnings": list(self.warnings),
        }

    def summary(self) -> str:
        """The human-readable report (also written as ``export_report.txt``)."""
        lines = [f"M3D dataset export: {self.folder}", f"{self.total} samples from {len(self.volumes)} volume(s)", ""]
        lines.append(f"{'task':<12}{'train':>8}{'validation':>12}")
        for task in TASKS:
            c = self.counts.get(task, {})
            if any(c.values()):
                lines.append(f"{task:<12}{c.get('train', 0):>8}{c.get('validation', 0):>12}")
        lines.append("")
        for vid, v in self.volumes.items():
            lines.append(f"volume {vid!r} ({v['name']!r} from {v['scene']}): {v['split']}, {v['samples']} samples")
        if self.skipped:
            lines += ["", f"Skipped ({len(self.skipped)}):"]
            lines += [f"  - [{s.kind}] {s.node!r} in {s.scene}: {s.reason}" for s in self.skipped]
        if self.warnings:
            lines += ["", "Warnings:"] + [f"  - {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------------

_GENERIC_NAME = re.compile(r"^(segment|roi|r|box|label|mask)?[\s_-]*\d*$", re.IGNORECASE)
_SIDE_LAST = re.compile(r"^(.*\S)\s+(left|right)$", re.IGNORECASE)


def target_text(name: str) -> str:
    """A segment/ROI name -> the target as the model reads it: ``kidney_left`` -> ``left kidney``, ``Liver`` ->
    ``liver`` (an all-capitals name such as ``IVC`` is kept)."""
    text = " ".join(str(name).replace("_", " ").split())
    m = _SIDE_LAST.match(text)
    if m:
        text = f"{m.group(2)} {m.group(1)}"
    if text[:1].isupper() and not text[1:2].isupper():
        text = text[0].lower() + text[1:]
    return text


def box_text(box: Sequence[float]) -> str:
    """A box in the official text form: ``<bx_start>[0.094, 0.301, 0.223, 0.75, 0.617, 0.551]<bx_end>``."""
    return f"{BOX_START}{format_box(box)}{BOX_END}"


def _slug(text: str, default: str = "item") -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or default


def _is_generic(name: str) -> bool:
    return not name.strip() or bool(_GENERIC_NAME.match(name.strip()))


def _unique(base: str, taken: set[str]) -> str:
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


# ----------------------------------------------------------------------------------------------------------------------
# Q/A text
# ----------------------------------------------------------------------------------------------------------------------

_QA_KEYS = {
    "q": "question", "question": "question",
    "a": "answer", "answer": "answer",
    "choices": "choices", "options": "choices",
    "segment": "segment",
    "absent": "absent",
}
_KEY_LINE = re.compile(r"^\s*(q|question|a|answer|choices|options|segment|absent)\s*:\s*(.*)$", re.IGNORECASE)


def parse_qa_text(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse Q/A text (see the module docstring) -> (items, problems).

    Items are dicts with ``question`` and one of: ``answer`` (open), ``choices`` + ``answer`` (closed),
    ``segment`` (+ optional ``answer``) (referring segmentation); or ``absent``: [names]. Problems name the
    malformed lines or blocks, which are left out.
    """
    items: list[dict[str, Any]] = []
    problems: list[str] = []
    current: Optional[dict[str, Any]] = None
    field: Optional[str] = None
    for number, line in enumerate(str(text).splitlines(), start=1):
        m = _KEY_LINE.match(line)
        if m is None:
            if line.strip() and current is not None and field in ("question", "answer"):
                current[field] = f"{current[field]} {line.strip()}"
            elif line.strip():
                problems.append(f"line {number} ({line.strip()[:40]!r}) belongs to no 'Q:' block and was ignored")
            continue
        key, value = _QA_KEYS[m.group(1).lower()], m.group(2).strip()
        if key == "absent":
            names = [n.strip() for n in re.split(r"[,;]", value) if n.strip()]
            if names:
                items.append({"absent": names, "line": number})
            else:
                problems.append(f"line {number}: 'Absent:' names nothing")
            current, field = None, None  # a line of its own: it ends the block before it
            continue
        if key == "question":
            current = {"question": value, "line": number}
            items.append(current)
            field = "question"
            continue
        if current is None:
            problems.append(f"line {number}: '{m.group(1)}:' is outside any 'Q:' block and was ignored")
            continue
        if key in current:
            problems.append(f"line {number}: a second '{m.group(1)}:' in the block of line {current['line']} was "
                            "ignored")
            continue
        if key == "choices":
            current[key] = [c.strip() for c in value.split("|")]
        else:
            current[key] = value
        field = key if key in ("question", "answer") else None
    return items, problems


def _closed_answer(answer: str, choices: list[str]) -> tuple[str, str]:
    """``A:`` of a closed question (a letter, "C. Liver", or a choice's text) -> (letter, choice text)."""
    letters = prompts.CHOICE_LETTERS[: len(choices)]
    a = answer.strip()
    m = re.match(rf"^([{letters}])(?:[.)]\s*(.*))?$", a)
    if m:
        letter = m.group(1)
        chosen = choices[letters.index(letter)]
        if m.group(2) and m.group(2).strip().rstrip(".").lower() != chosen.lower():
            raise InputError(f"the answer {a!r} names option {letter} ({chosen!r}) but with another text")
        return letter, chosen
    matches = [i for i, c in enumerate(choices) if c.lower() == a.rstrip(".").lower()]
    if len(matches) == 1:
        return letters[matches[0]], choices[matches[0]]
    raise InputError(f"the answer {a!r} is neither an option letter ({', '.join(letters)}) nor one of the choices")


# ----------------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------------


def _slicer():
    try:
        import slicer
    except ImportError:
        raise M3DError("exporting scenes needs 3D Slicer's Python (or slicer-core: pip install slicer-core)") from None
    return slicer


def _is_scene(obj: Any) -> bool:
    return hasattr(obj, "GetNodesByClass") and hasattr(obj, "GetNumberOfNodes")


@contextlib.contextmanager
def _opened_scene(source: SceneSource) -> Iterator[tuple[Any, str]]:
    """A live scene as is, or a .mrb/.mrml file read into a new private scene (cleared afterwards)."""
    if _is_scene(source):
        yield source, str(source.GetURL() or "live scene")
        return
    slicer = _slicer()
    path = Path(source)
    if not path.is_file():
        raise InputError(f"scene file {path} does not exist; give a .mrb or .mrml file or a loaded scene")
    suffix = path.suffix.lower()
    if suffix not in (".mrb", ".mrml"):
        raise InputError(f"{path} is not a Slicer scene; give a .mrb (scene bundle) or .mrml file")
    template = getattr(slicer, "mrmlScene", None)
    if template is None:
        raise M3DError("reading scene files needs Slicer's main scene (slicer.mrmlScene) for the node types")
    scene = slicer.vtkMRMLScene()
    template.CopyRegisteredNodesToScene(scene)  # node classes registered by the module logics
    if template.GetCacheManager() is not None:
        scene.SetCacheManager(template.GetCacheManager())
    if template.GetDataIOManager() is not None:
        scene.SetDataIOManager(template.GetDataIOManager())
    try:
        if suffix == ".mrb":
            ok = scene.ReadFromMRB(str(path.resolve()))
        else:
            scene.SetRootDirectory(str(path.resolve().parent))
            scene.SetURL(str(path.resolve()))
            ok = scene.Import()
        if not ok:
            raise InputError(f"Slicer could not read the scene {path}; open it in Slicer to see what is wrong")
        yield scene, str(path)
    finally:
        scene.Clear(1)


def _nodes(scene: Any, class_name: str) -> list[Any]:
    collection = scene.GetNodesByClass(class_name)
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return [n for n in nodes if n is not None]


def _attr(node: Any, key: str) -> Optional[str]:
    value = node.GetAttribute(key)
    return value.strip() if value else None


def _is_ai(node: Any) -> bool:
    return _attr(node, ATTRIBUTE_LABEL) == AI_LABEL


def _segment_tag(segment: Any, key: str) -> Optional[str]:
    import vtk

    value = vtk.reference("")
    return value.get() if segment.GetTag(key, value) else None


def _terminology_name(segment: Any) -> Optional[str]:
    """The type (and modifier, e.g. "left") of a segment's terminology entry, if it has one."""
    if hasattr(segment, "GetTerminology"):
        entry = segment.GetTerminology()
    else:  # Slicer < 5.7
        entry = _segment_tag(segment, "TerminologyEntry")
    parts = (entry or "").split("~")
    if len(parts) < 3:
        return None
    meaning = parts[2].split("^")[2] if parts[2].count("^") >= 2 else ""
    modifier = parts[3].split("^")[2] if len(parts) > 3 and parts[3].count("^") >= 2 else ""
    if meaning.strip().lower() == "tissue":
        return None  # Slicer's default for a new segment: says nothing about what it is
    name = " ".join(p for p in (modifier, meaning) if p).strip()
    return name or None


def _segment_mask_kji(segmentation_node: Any, segment_id: str, volume_node: Any) -> np.ndarray:
    """A segment as a bool array on the volume's voxel grid (through any transforms between the two nodes), read
    with VTK only -- no temporary node is added to the scene."""
    slicer = _slicer()
    import vtk
    from vtkmodules.util import numpy_support

    image = slicer.vtkOrientedImageData()
    if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image):
        raise InputError("the segment has no binary labelmap (e.g. only a closed surface); convert it to a "
                         "binary labelmap in the Segmentations module")
    dims = volume_node.GetImageData().GetDimensions()
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    reference.SetImageToWorldMatrix(ijk_to_ras)
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        segmentation_node.GetParentTransformNode(), volume_node.GetParentTransformNode(), transform)
    out = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, out, False, False, transform):  # nearest, cropped to the volume
        raise GeometryError("the segment could not be resampled onto the volume's grid")
    scalars = out.GetPointData().GetScalars()
    if scalars is None or scalars.GetNumberOfTuples() == 0:
        return np.zeros(tuple(reversed(dims)), dtype=bool)
    if tuple(out.GetExtent()) != tuple(reference.GetExtent()):
        raise GeometryError(f"the segment was resampled to extent {out.GetExtent()} instead of the volume's "
                            f"{reference.GetExtent()}")
    # GetBinaryLabelmapRepresentation gives this segment alone as 0/1, whatever its label value in a shared layer.
    return numpy_support.vtk_to_numpy(scalars).reshape(tuple(reversed(out.GetDimensions()))) != 0


# ----------------------------------------------------------------------------------------------------------------------
# Collecting annotations from one scene
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Annotation:
    task: str  # a TASKS name, or "segment" (expanded into SEGMENT_TASKS), or "absent"
    node: str
    target: Optional[str] = None  # target text as the model reads it
    segment: Any = None  # (segmentation node, segment id)
    roi: Any = None  # RasRoi
    text: Optional[str] = None  # report
    question: Optional[str] = None
    answer: Optional[str] = None
    choices: Optional[list[str]] = None
    letter: Optional[str] = None


@dataclasses.dataclass
class _VolumeWork:
    node: Any
    name: str
    scene: str
    split: Optional[str]
    annotations: list[_Annotation] = dataclasses.field(default_factory=list)


class _SceneReader:
    """Reads one scene into per-volume annotation lists, recording everything it skips."""

    def __init__(self, scene: Any, label: str, skipped: list[SkippedItem], target_filter: Optional[set[str]]):
        self.scene = scene
        self.label = label
        self.skipped = skipped
        self.target_filter = target_filter
        self.volumes = [v for v in _nodes(scene, "vtkMRMLScalarVolumeNode")
                        if not v.IsA("vtkMRMLLabelMapVolumeNode")]
        self.work = {v.GetID(): _VolumeWork(v, v.GetName() or v.GetID(), label, self._split_of(v))
                     for v in self.volumes}

    def skip(self, node: Any, kind: str, reason: str) -> None:
        name = node if isinstance(node, str) else (node.GetName() or node.GetID())
        self.skipped.append(SkippedItem(self.label, name, kind, reason))

    def _split_of(self, volume: Any) -> Optional[str]:
        value = (_attr(volume, ATTRIBUTE_SPLIT) or "").lower()
        if value in ("val", "valid"):
            value = "validation"
        if value and value not in SPLITS:
            self.skip(volume, "volume", f"M3D.split={value!r} is not one of {', '.join(SPLITS)}; split at random")
            return None
        return value or None

    # -- which volume --------------------------------------------------------------------------------------------
    def volume_of(self, node: Any, kind: str) -> Optional[_VolumeWork]:
        wanted = _attr(node, ATTRIBUTE_VOLUME)
        if wanted:
            for v in self.volumes:
                if wanted in (v.GetID(), v.GetName()):
                    return self.work[v.GetID()]
            self.skip(node, kind, f"no volume: M3D.volume={wanted!r} names no image volume in the scene")
            return None
        if node.IsA("vtkMRMLSegmentationNode"):
            ref = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
            if ref is not None and ref.GetID() in self.work:
                return self.work[ref.GetID()]
        name = (node.GetName() or "").casefold()
        prefixed = [v for v in self.volumes if v.GetName() and name.startswith(v.GetName().casefold() + " ")]
        if prefixed:
            return self.work[max(prefixed, key=lambda v: len(v.GetName())).GetID()]
        if len(self.volumes) == 1:
            return self.work[self.volumes[0].GetID()]
        why = "the scene has no image volume" if not self.volumes else (
            f"the scene has {len(self.volumes)} volumes; set the node attribute M3D.volume to the volume's name, or "
            "start the node's name with the volume's name")
        self.skip(node, kind, f"no volume: {why}")
        return None

    def target_ok(self, node_name: str, target: str, kind: str) -> bool:
        if self.target_filter is not None and target.casefold() not in self.target_filter:
            self.skip(node_name, kind, f"unmatched name: target {target!r} is not in the requested targets")
            return False
        return True

    # -- node kinds ----------------------------------------------------------------------------------------------
    def read(self) -> list[_VolumeWork]:
        for node in _nodes(self.scene, "vtkMRMLSegmentationNode"):
            self.read_segmentation(node)
        for node in _nodes(self.scene, "vtkMRMLMarkupsROINode"):
            self.read_roi(node)
        for node in _nodes(self.scene, "vtkMRMLTextNode"):
            self.read_text(node)
        for node in _nodes(self.scene, "vtkMRMLTableNode"):
            self.read_table(node)
        self.report_unsupported()
        return list(self.work.values())

    def read_segmentation(self, node: Any) -> None:
        if _is_ai(node):
            return self.skip(node, "segment", _ai_reason())
        segmentation = node.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            return self.skip(node, "segment", "empty segment: the segmentation node has no segments")
        volume = self.volume_of(node, "segment")
        if volume is None:
            return
        for i in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(i)
            segment = segmentation.GetSegment(segment_id)
            label = f"{node.GetName()}/{segment.GetName()}"
            if _segment_tag(segment, ATTRIBUTE_LABEL) == AI_LABEL:
                self.skip(label, "segment", _ai_reason())
                continue
            name = segment.GetName() or ""
            if _is_generic(name):
                name = _terminology_name(segment) or ""
                if not name:
                    self.skip(label, "segment", "unmatched name: the segment has a generic name and no terminology; "
                                                "rename it to the structure it shows (e.g. 'liver')")
                    continue
            target = target_text(name)
            if self.target_ok(label, target, "segment"):
                volume.annotations.append(_Annotation("segment", label, target=target, segment=(node, segment_id)))

    def read_roi(self, node: Any) -> None:
        from M3DAssistantLib.scene import roi_from_node

        if _is_ai(node):
            return self.skip(node, "roi", _ai_reason())
        task = (_attr(node, ATTRIBUTE_TASK) or REC).lower()
        if task not in (REC, REG):
            return self.skip(node, "roi", f"unsupported node: M3D.task={task!r}; an ROI is {REC!r} (default) or "
                                          f"{REG!r}")
        if _is_generic(node.GetName() or ""):
            return self.skip(node, "roi", "unmatched name: the ROI's name is generic; name it after the structure it "
                                          "boxes (e.g. 'liver')")
        volume = self.volume_of(node, "roi")
        if volume is None:
            return
        try:
            roi = roi_from_node(node)
        except M3DError as e:
            return self.skip(node, "roi", str(e))
        target = target_text(node.GetName())
        if self.target_ok(node.GetName(), target, "roi"):
            volume.annotations.append(_Annotation(task, node.GetName(), target=target, roi=roi))

    def read_text(self, node: Any) -> None:
        text = node.GetText() or ""
        if _is_ai(node) or AI_LABEL in text:
            return self.skip(node, "text", _ai_reason())
        kind = (_attr(node, ATTRIBUTE_KIND) or "").lower()
        if not kind:
            if (node.GetName() or "").strip().lower().endswith("report"):
                kind = "report"
            elif any(_KEY_LINE.match(line) and _KEY_LINE.match(line).group(1).lower() in ("q", "question", "absent")
                     for line in text.splitlines()):
                kind = "qa"
        if kind not in ("report", "qa"):
            return self.skip(node, "text", "unsupported node: a text node is a report (name ending in 'report') or "
                                           "Q/A pairs ('Q:' / 'A:' lines); this one is neither")
        volume = self.volume_of(node, "text")
        if volume is None:
            return
        if kind == "report":
            report_text = " ".join(text.split())
            if not report_text:
                return self.skip(node, "text", "the report is empty")
            volume.annotations.append(_Annotation(REPORT, node.GetName(), text=report_text))
            return
        items, problems = parse_qa_text(text)
        for problem in problems:
            self.skip(node, "qa", problem)
        for item in items:
            self.add_qa(volume, node.GetName(), item)

    def read_table(self, node: Any) -> None:
        if _is_ai(node):
            return self.skip(node, "table", _ai_reason())
        columns = {node.GetColumnName(c).strip().lower(): c for c in range(node.GetNumberOfColumns())}
        if "question" not in columns or "answer" not in columns:
            return self.skip(node, "table", "unsupported node: a Q/A table needs the columns 'Question' and 'Answer' "
                                            "(and 'Choice A'.. 'Choice D' + 'Answer Choice' for closed questions)")
        volume = self.volume_of(node, "table")
        if volume is None:
            return
        choice_columns = [columns[k] for k in sorted(columns) if re.fullmatch(r"choice [a-h]", k)]
        for row in range(node.GetNumberOfRows()):
            def cell(c, row=row):
                return (node.GetCellText(row, c) or "").strip()

            question = cell(columns["question"])
            if not question:
                continue
            item: dict[str, Any] = {"question": question, "line": row + 1}
            choices = [cell(c) for c in choice_columns if cell(c)]
            letter = cell(columns["answer choice"]) if "answer choice" in columns else ""
            if choices:
                item["choices"] = choices
                item["answer"] = letter or cell(columns["answer"])
            else:
                item["answer"] = cell(columns["answer"])
            self.add_qa(volume, node.GetName(), item, where=f"row {row + 1}")

    def add_qa(self, volume: _VolumeWork, node_name: str, item: dict[str, Any], where: str = "") -> None:
        where = where or f"line {item.get('line')}"
        if "absent" in item:
            for name in item["absent"]:
                target = target_text(name)
                if self.target_ok(node_name, target, "qa"):
                    volume.annotations.append(_Annotation("absent", node_name, target=target))
            return
        question, answer = item.get("question", ""), item.get("answer")
        try:
            if "segment" in item:
                if answer and "[SEG]" not in answer:
                    raise InputError("the answer of a 'Segment:' block must contain [SEG] (or leave 'A:' out)")
                prompts.segment_expression_prompt(question)
                volume.annotations.append(_Annotation(REFSEG, f"{node_name} ({where})", question=question,
                                                      answer=answer or None, target=item["segment"]))
            elif not answer:
                raise InputError("question without an answer ('A:')")
            elif "choices" in item:
                choices = prompts.validate_choices(item["choices"])
                prompts.choice_prompt(question, choices)
                letter, chosen = _closed_answer(answer, choices)
                volume.annotations.append(_Annotation(VQA_CLOSED, f"{node_name} ({where})", question=question,
                                                      answer=chosen, choices=choices, letter=letter))
            else:
                prompts.question_prompt(question)
                volume.annotations.append(_Annotation(VQA_OPEN, f"{node_name} ({where})", question=question,
                                                      answer=" ".join(answer.split())))
        except InputError as e:
            self.skip(f"{node_name} ({where})", "qa", str(e))

    def report_unsupported(self) -> None:
        for cls, what in (("vtkMRMLLabelMapVolumeNode", "a label map; import it into a segmentation (Data module: "
                                                        "right-click > Convert labelmap to segmentation node)"),
                          ("vtkMRMLMarkupsNode", "a markup other than an ROI; draw an ROI box instead"),
                          ("vtkMRMLModelNode", "a surface model; convert it to a segmentation")):
            for node in _nodes(self.scene, cls):
                if node.GetHideFromEditors() or node.IsA("vtkMRMLMarkupsROINode") or _is_ai(node):
                    continue
                self.skip(node, "node", f"unsupported node: {what}")


def _ai_reason() -> str:
    return ("AI-generated (M3D.label attribute): a model's output is not ground truth; check it, then remove the "
            "attribute to export it")


# ----------------------------------------------------------------------------------------------------------------------
# Views and their image names
# ----------------------------------------------------------------------------------------------------------------------


def _convention_short(name: str) -> str:
    """``m3d-cap-v2`` -> ``cap``: the family of an M3D data convention without its prefix and version."""
    match = re.fullmatch(r"m3d-([a-z0-9]+)-v\d+", name)
    return match.group(1) if match else _slug(name)


def image_suffixes(convention: Optional[str] = None, window: Any = None,
                   task_names: Sequence[str] = TRAINING_NAMES) -> dict[str, str]:
    """``{training task name: image-name suffix}``: what tells apart the views an export writes (see the module
    docstring). A view is (orientation convention, window kind); a name part is only there when the export's views
    differ in it: the convention's short name unless ``convention`` is forced (``cap``, ``seg``, ``refseg``; the full
    name if two versions of a family meet), the window kind unless ``window`` is forced and the convention alone
    does not tell the windows apart (``display``, ``percentile``, ``volume_percentile``)."""
    forced = resolve_convention(convention).name if convention is not None else None
    views = {name: (forced or tasks.by_training_name(name).convention,
                    None if window is not None else tasks.by_training_name(name).window) for name in task_names}
    conventions = {conv for conv, _ in views.values()}
    shorts = {conv: _convention_short(conv) for conv in conventions}
    if len(set(shorts.values())) < len(shorts):  # two versions of one family: the full names
        shorts = {conv: _slug(conv) for conv in conventions}
    kinds: dict[str, set] = {}
    for conv, kind in views.values():
        kinds.setdefault(conv, set()).add(kind)
    name_windows = any(len(k) > 1 for k in kinds.values())
    out = {}
    for name, (conv, kind) in views.items():
        parts = ([shorts[conv]] if len(conventions) > 1 else []) + ([_slug(kind)] if name_windows else [])
        out[name] = "_".join(parts)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Writing one volume
# ----------------------------------------------------------------------------------------------------------------------


class _DatasetWriter:
    """Writes images, masks and texts of one volume at a time into the dataset folder and returns its records."""

    def __init__(self, root: Path, model_shape: tuple[int, int, int], window: Any, convention: Optional[str],
                 segment_tasks: Sequence[str]):
        self.root = root
        self.model_shape = model_shape
        self.window = window
        self.convention = convention
        self.segment_tasks = tuple(segment_tasks)
        for sub in ("images", "masks", "texts"):
            (root / sub).mkdir()
        self.files: set[str] = set()
        self.volume_files: list[Path] = []
        self.suffixes = image_suffixes(convention, window)

    def _save(self, rel: str, content: Any) -> None:
        path = self.root / rel
        if isinstance(content, str):
            write_text(path, content)
        else:
            np.save(path, content)
        self.volume_files.append(path)

    def discard_volume(self) -> None:
        """Remove what the last :meth:`write_volume` wrote (a volume that gave no sample)."""
        for path in self.volume_files:
            path.unlink(missing_ok=True)
        self.volume_files = []

    def convention_for(self, task: str) -> str:
        return resolve_convention(self.convention or convention_for(task)).name

    def window_for(self, task: str, display_window: Any, modality: Optional[str],
                   value_range: tuple[float, float]) -> IntensitySpec:
        """The intensity window of ``task`` on this volume, exactly as ``InferenceEngine`` chooses it: the export's
        ``window`` if given, else the task's default (:func:`default_window` of its window kind) from the volume's
        display window, modality and value range."""
        if self.window is not None:
            return resolve_window(self.window)
        return default_window(tasks.by_training_name(task).window, display_window=display_window, modality=modality,
                              value_range=value_range)

    def write_volume(self, vid: str, work: _VolumeWork, reader: _SceneReader) -> list[tuple[str, dict[str, Any]]]:
        """Write a volume's images, masks and texts; return its ``(task, record)`` pairs."""
        from M3DAssistantLib.scene import read_volume_node, volume_display

        self.volume_files = []
        array, ijk_to_ras = read_volume_node(work.node)
        display_window, modality = volume_display(work.node)  # what the annotator saw: report/VQA's default window
        value_range = (float(array.min()), float(array.max()))
        views: dict[str, tuple[str, Any]] = {}  # image id -> (image id, mapping)
        computed: dict[tuple[str, IntensitySpec], tuple[np.ndarray, Any]] = {}  # (convention, window) -> view

        def view(task: str) -> tuple[str, Any]:
            image_id = "_".join(part for part in (vid, self.suffixes[task]) if part)
            if image_id not in views:
                conv = self.convention_for(task)
                spec = self.window_for(task, display_window, modality, value_range)
                if (conv, spec) not in computed:  # two window kinds may resolve to one window (an MR volume)
                    computed[(conv, spec)] = to_model_input(array, ijk_to_ras, window=spec,
                                                            model_shape=self.model_shape, convention=conv)
                tensor, mapping = computed[(conv, spec)]
                self._save(f"images/{image_id}.npy", tensor.astype(np.float32, copy=False))
                self._save(f"images/{image_id}.mapping.json", mapping.to_json() + "\n")
                views[image_id] = (image_id, mapping)
            return views[image_id]

        def image_path(task: str) -> str:
            return f"images/{view(task)[0]}.npy"

        out: list[tuple[str, dict[str, Any]]] = []
        masks: dict[tuple[str, str], tuple[str, Any]] = {}  # (image id, target) -> (mask file, box)
        targets_seen: set[str] = set()

        # Segments first: they give seg/REC/REG samples and the masks that 'Segment:' and 'Absent:' lines refer to.
        for a in (a for a in work.annotations if a.task == "segment"):
            if a.target.casefold() in targets_seen:
                reader.skip(a.node, "segment", f"duplicate target: another segment of this volume is also named "
                                               f"{a.target!r}; rename or merge them")
                continue
            seg_node, segment_id = a.segment
            try:
                mask_kji = _segment_mask_kji(seg_node, segment_id, work.node)
            except M3DError as e:
                reader.skip(a.node, "segment", str(e))
                continue
            if not mask_kji.any():
                reader.skip(a.node, "segment", "empty segment: it has no voxels on this volume")
                continue
            targets_seen.add(a.target.casefold())
            new: list[tuple[str, dict[str, Any]]] = []
            for task in dict.fromkeys(self.segment_tasks + (REFSEG,)):  # refseg: the mask, if a block names it
                image_id, mapping = view(task)
                key = (image_id, a.target.casefold())  # the crop to the foreground depends on the window too
                if key not in masks:
                    model_mask = mask_to_model(mask_kji.view(np.uint8), mapping) != 0
                    box = mask_to_box(model_mask)
                    if box is None:
                        break
                    rel = self._unique_file(f"masks/{image_id}_{_slug(a.target, 'target')}.npy")
                    self._save(rel, model_mask[None])
                    masks[key] = (rel, box)
                if task != REFSEG:
                    rel, box = masks[key]
                    new.append((task, {"image": image_path(task), "label": rel, "target": a.target,
                                       "box": list(box), "box_text": box_text(box), "volume": vid,
                                       "node": a.node}))
            else:
                out.extend(new)
                continue
            reader.skip(a.node, "segment", "empty segment: it lies outside the region the model sees (the "
                                           "foreground crop of the volume)")

        for a in (a for a in work.annotations if a.task != "segment"):
            if a.task == REPORT:
                rel = self._unique_file(f"texts/{vid}_report.txt")
                self._save(rel, a.text + "\n")
                out.append((REPORT, {"image": image_path(REPORT), "text": rel, "volume": vid, "node": a.node}))
            elif a.task in (VQA_OPEN, VQA_CLOSED):
                record: dict[str, Any] = {"Image Path": image_path(a.task), "Question": a.question}
                if a.task == VQA_CLOSED:
                    record.update({f"Choice {letter}": c for letter, c in zip(prompts.CHOICE_LETTERS, a.choices)})
                    record["Answer Choice"] = a.letter
                record.update({"Answer": a.answer, "Question Type": "user", "volume": vid, "node": a.node})
                out.append((a.task, record))
            elif a.task in (REC, REG):
                _, mapping = view(a.task)
                try:
                    box = roi_to_box(a.roi, mapping, snap=True)
                except M3DError as e:
                    reader.skip(a.node, "roi", str(e))
                    continue
                out.append((a.task, {"image": image_path(a.task), "label": None, "target": a.target,
                                     "box": list(box), "box_text": box_text(box), "volume": vid, "node": a.node}))
            elif a.task == "absent":
                if a.target.casefold() in targets_seen:
                    reader.skip(a.node, "qa", f"'Absent: {a.target}' contradicts a segment of that name; left out")
                    continue
                for task in (REC, SEG):
                    out.append((task, {"image": image_path(task), "label": None, "target": a.target, "box": None,
                                       "volume": vid, "node": a.node}))
            elif a.task == REFSEG:
                name = target_text(a.target)
                found = masks.get((view(REFSEG)[0], name.casefold()))
                if found is None:
                    reader.skip(a.node, "qa", f"unmatched name: no non-empty segment named {a.target!r} on this "
                                              "volume for the 'Segment:' line")
                    continue
                out.append((REFSEG, {"Image": image_path(REFSEG), "Mask": found[0], "Mask_ID": 1,
                                       "Question": a.question, "Answer": a.answer, "target": name,
                                       "box": list(found[1]), "volume": vid, "node": a.node}))
        return out

    def _unique_file(self, rel: str) -> str:
        stem, _, ext = rel.rpartition(".")
        candidate, k = rel, 2
        while candidate in self.files:
            candidate, k = f"{stem}_{k}.{ext}", k + 1
        self.files.add(candidate)
        return candidate


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def _assign_splits(volume_ids: Sequence[str], fixed: dict[str, Optional[str]], validation_fraction: float,
                   seed: int) -> dict[str, str]:
    """Seeded split by volume: ``round(n * fraction)`` of the volumes without a fixed split go to validation (at
    least one when the fraction is > 0 and two or more volumes are free)."""
    free = sorted(v for v in volume_ids if not fixed.get(v))
    random.Random(seed).shuffle(free)
    n_val = int(round(len(free) * validation_fraction))
    if validation_fraction > 0 and n_val == 0 and len(free) >= 2:
        n_val = 1
    n_val = min(n_val, max(0, len(free) - 1)) if validation_fraction < 1 else len(free)
    splits = {v: s for v, s in fixed.items() if s}
    splits.update({v: ("validation" if i < n_val else "train") for i, v in enumerate(free)})
    return splits


def _prepare_output(output: Path) -> Path:
    if output.exists():
        if not output.is_dir() or any(output.iterdir()):
            raise InputError(f"{output} already exists and was left unchanged; choose a new folder for the dataset")
    if not output.parent.is_dir():
        raise InputError(f"cannot create {output}: the folder {output.parent} does not exist")
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))


def export_dataset(
    scenes: Union[SceneSource, Sequence[SceneSource]],
    output: Union[str, os.PathLike],
    *,
    model_shape: Sequence[int] = DEFAULT_MODEL_SHAPE,
    window: Any = None,
    convention: Optional[str] = None,
    validation_fraction: float = 0.0,
    seed: int = 0,
    targets: Optional[Iterable[str]] = None,
    segment_tasks: Sequence[str] = SEGMENT_TASKS,
    progress: Optional[ProgressCallback] = None,
) -> ExportResult:
    """Export annotated scenes to a new M3D dataset folder ``output`` (see the module docstring for the convention).

    Args:
        scenes: a .mrb/.mrml path, a vtkMRMLScene, or a list of them. Scenes are only read.
        output: the dataset folder to create; it must not exist (or be empty). Written atomically: a failed export
            leaves nothing behind.
        model_shape: (D, H, W) of the model input (the released models: (32, 256, 256)).
        window: one intensity window for every task (a preset such as "abdomen", "percentile", (C, W)); None: each
            task's own default, exactly as inference (report/VQA the volume's window/level as displayed in the scene,
            boxes and masks the M3D-Seg percentiles, referring segmentation the M3D-RefSeg percentiles).
        convention: force one orientation convention for every task; default: each task's own, as inference does.
        validation_fraction: fraction of the volumes (those without an ``M3D.split`` attribute) held out for
            validation, drawn with ``seed``.
        targets: when given, only segments/ROIs/absent names with these target names are exported (the others are
            reported as unmatched).
        segment_tasks: which samples each segment gives (default seg, rec and reg, as the official data).

    Returns an :class:`ExportResult`; raises :class:`InputError` when nothing at all could be exported (the message
    lists why) or when ``output`` exists.
    """
    sources = [scenes] if (_is_scene(scenes) or isinstance(scenes, (str, os.PathLike))) else list(scenes)
    if not sources:
        raise InputError("no scenes given; pass a .mrb/.mrml file, a loaded scene, or a list of them")
    if not 0.0 <= float(validation_fraction) <= 1.0:
        raise InputError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    unknown = sorted(set(segment_tasks) - set(SEGMENT_TASKS))
    if unknown:
        raise InputError(f"segment_tasks {unknown} unknown; choose from {', '.join(SEGMENT_TASKS)}")
    if convention is not None:
        convention = resolve_convention(convention).name
    shape = tuple(int(v) for v in model_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"model_shape must be three positive integers (D, H, W), got {model_shape!r}")
    target_filter = {target_text(t).casefold() for t in targets} if targets is not None else None
    output = Path(output)
    tmp = _prepare_output(output)
    skipped: list[SkippedItem] = []
    warnings: list[str] = []
    try:
        writer = _DatasetWriter(tmp, shape, window, convention, segment_tasks)  # type: ignore[arg-type]
        volumes: dict[str, dict[str, Any]] = {}
        records: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        taken_ids: set[str] = set()
        for s_index, source in enumerate(sources):
            report_progress(progress, "export", s_index / len(sources),
                            f"reading scene {s_index + 1} of {len(sources)}")
            with contextlib.ExitStack() as stack:
                try:
                    scene, label = stack.enter_context(_opened_scene(source))
                except InputError as e:
                    skipped.append(SkippedItem(str(source), str(source), "scene", str(e)))
                    continue
                reader = _SceneReader(scene, label, skipped, target_filter)
                for work in reader.read():
                    if not work.annotations:
                        continue
                    vid = _unique(_slug(work.name, "volume"), taken_ids)
                    report_progress(progress, "export", s_index / len(sources), f"volume {work.name!r}")
                    try:
                        records[vid] = writer.write_volume(vid, work, reader)
                    except M3DError as e:
                        reader.skip(work.node, "volume", str(e))
                        records[vid] = []
                    if not records[vid]:
                        writer.discard_volume()
                    else:
                        volumes[vid] = {"name": work.name, "scene": label, "split": work.split,
                                        "samples": len(records[vid])}

        splits = _assign_splits(list(volumes), {v: d["split"] for v, d in volumes.items()}, validation_fraction, seed)
        sections: dict[str, dict[str, list[dict[str, Any]]]] = {t: {s: [] for s in SPLITS} for t in TASKS}
        for vid in volumes:
            volumes[vid]["split"] = splits[vid]
            for task, record in records[vid]:
                sections[task][splits[vid]].append(record)
        counts = {t: {s: len(sections[t][s]) for s in SPLITS} for t in TASKS}
        if validation_fraction > 0 and not any(c["validation"] for c in counts.values()):
            warnings.append("no validation samples: too few volumes to hold one out")
        result = ExportResult(output, counts, volumes, skipped, warnings)
        if result.total == 0:
            raise InputError("nothing could be exported:\n" + result.summary())
        manifest: dict[str, Any] = {
            "format": DATASET_FORMAT,
            "version": DATASET_VERSION,
            "model_shape": list(shape),
            "window": window if window is None or isinstance(window, str) else list(window),
            # window None: each task's window kind (preprocessing.WINDOW_KINDS); each image's mapping.json has the
            # window it got
            "window_kind": {t: (tasks.by_training_name(t).window if window is None else "chosen") for t in TASKS},
            "convention": {t: writer.convention_for(t) for t in TASKS},
            "volumes": volumes,
        }
        manifest.update({t: sections[t] for t in TASKS if any(sections[t].values())})
        write_json(tmp / "dataset.json", manifest)
        write_json(tmp / "export_report.json", {k: v for k, v in result.to_dict().items() if k != "folder"})
        write_text(tmp / "export_report.txt", result.summary())
        if output.exists():
            output.rmdir()  # empty (checked above)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report_progress(progress, "export", 1.0, f"exported {result.total} samples to {output}")
    log.info("exported %d samples from %d volumes to %s (%d skipped)", result.total, len(volumes), output,
             len(skipped))
    return result
