#!/usr/bin/env python3
"""Write the sample annotated scene ``Testing/Data/sample/sample_scene.mrb`` (and ``liver_roi.mrk.json``) from the
bundled TotalSegmentator CT, with slicer-core, in M3DTraining's annotation convention (``M3DTrainingLib/export.py``):

* the CT (``example_ct_sm``);
* a segmentation with the liver, spleen, right and left kidney and stomach segments, from TotalSegmentator's labels
  on the same grid (a model's output, not manual truth: good enough to learn the workflow);
* an ROI ``liver`` (a box sample) -- the liver label's bounding box in RAS -- also written alone as
  ``liver_roi.mrk.json`` for ``m3d describe --roi``;
* a text node ``example_ct_sm report`` (a short description of what the labels show, written for this example) and
  ``example_ct_sm questions`` with Q/A blocks (open, multiple choice, referring segmentation, absent structures).

Reproducible: the same inputs give the same scene content (``Testing/training/test_sample_scene.py`` rebuilds it and
compares). Run from the repository root: ``python Utilities/make_sample_scene.py [OUT_FOLDER]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "Testing" / "Data" / "totalsegmentator"
OUT = REPO / "Testing" / "Data" / "sample"

SEGMENTS = {"liver": 5, "spleen": 1, "right kidney": 2, "left kidney": 3, "stomach": 6}
"""Segment name -> TotalSegmentator label value (labels_total.json)."""

REPORT = ("Abdominal CT, portal venous phase (sample annotation for the M3D tutorial, derived from reference "
          "labels).\nThe liver, spleen, both kidneys and the stomach are in the field of view.\n"
          "No annotation of lesions was made.")
QUESTIONS = """Q: Which organ is the largest in this image?
A: The liver.

Q: Which plane is this image in?
Choices: Axial | Coronal | Sagittal | Oblique
A: A

Q: Please segment the organ in the left upper abdomen that filters blood.
Segment: spleen

Absent: urinary bladder
"""


def liver_box_ras(labels: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and size (RAS, mm) of the axis-aligned box around the liver voxels (voxel edges included)."""
    k, j, i = np.nonzero(labels == SEGMENTS["liver"])
    corners = np.array([[a, b, c, 1.0] for a in (i.min() - 0.5, i.max() + 0.5) for b in (j.min() - 0.5, j.max() + 0.5)
                        for c in (k.min() - 0.5, k.max() + 0.5)])
    ras = (ijk_to_ras @ corners.T).T[:, :3]
    low, high = ras.min(axis=0), ras.max(axis=0)
    return (low + high) / 2, high - low


def build(out: Path = OUT) -> tuple[Path, Path]:
    from slicer import util
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    from M3DAssistantLib.outputs import anatomy_color, write_roi_markups_json
    from M3DAssistantLib.scene import headless_slicer

    scene, logics = headless_slicer()
    ct = logics["volumes"].AddArchetypeVolume(str(DATA / "example_ct_sm.nii.gz"), "example_ct_sm")
    labels_node = logics["volumes"].AddArchetypeVolume(str(DATA / "example_seg.nii.gz"), "labels")
    labels = util.arrayFromVolume(labels_node).astype(np.int16)
    matrix = vtkMatrix4x4()
    labels_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = util.arrayFromVTKMatrix(matrix)
    scene.RemoveNode(labels_node)  # a label map in the scene would only be reported as skipped

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "example_ct_sm segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    for name, value in SEGMENTS.items():
        segment_id = segmentation.GetSegmentation().AddEmptySegment(name.replace(" ", "_"), name)
        util.updateSegmentBinaryLabelmapFromArray((labels == value).astype(np.uint8), segmentation, segment_id, ct)
        segmentation.GetSegmentation().GetSegment(segment_id).SetColor(*anatomy_color(name))  # not random: reproducible

    center, size = liver_box_ras(labels, ijk_to_ras)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "liver")
    roi.SetCenter(*center)
    roi.SetSize(*size)
    report = scene.AddNewNodeByClass("vtkMRMLTextNode", "example_ct_sm report")
    report.SetText(REPORT)
    questions = scene.AddNewNodeByClass("vtkMRMLTextNode", "example_ct_sm questions")
    questions.SetText(QUESTIONS)

    out.mkdir(parents=True, exist_ok=True)
    mrb = out / "sample_scene.mrb"
    if mrb.exists():
        mrb.unlink()
    if not scene.WriteToMRB(str(mrb)):
        raise SystemExit(f"could not write {mrb}")
    roi_path = write_roi_markups_json(out / "liver_roi.mrk.json", center, size, name="liver", overwrite=True)
    return mrb, roi_path


if __name__ == "__main__":
    for path in build(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
