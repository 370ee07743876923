"""The annotated test scene on real MRML (slicer-core): what a user annotates for M3DTraining's export."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from M3DAssistantLib import AI_LABEL

LABELS = {"liver": 5, "spleen": 1, "kidney_left": 3}

QA_TEXT = """Q: What organ is the largest in this image?
A: The liver.

Q: Which plane is this image in?
Choices: Axial | Coronal | Sagittal | Oblique
A: A

Q: Please segment the organ in the right upper abdomen that produces bile.
Segment: liver

Absent: gallbladder
Q: a question nobody answered
"""


def build_scene(scene, logics, data_dir: Path):
    """The annotated test scene: CT + liver/spleen/left kidney segments (+ a generic and an empty one), a liver ROI
    (REC), a spleen ROI marked REG, a report, Q/A pairs, a label map, an AI-generated text node."""
    import slicer

    ct = logics["volumes"].AddArchetypeVolume(str(data_dir / "example_ct_sm.nii.gz"), "CT")
    labels = logics["volumes"].AddArchetypeVolume(str(data_dir / "example_seg.nii.gz"), "labels", 1)
    label_array = slicer.util.arrayFromVolume(labels)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    for name, value in LABELS.items():
        segment_id = seg.GetSegmentation().AddEmptySegment(name, name)
        slicer.util.updateSegmentBinaryLabelmapFromArray((label_array == value).astype(np.uint8), seg, segment_id, ct)
    seg.GetSegmentation().AddEmptySegment("generic", "Segment_1")
    seg.GetSegmentation().AddEmptySegment("pancreas", "pancreas")  # drawn by nobody: empty
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "liver")
    roi.SetCenter(-40.0, 120.0, 130.0)
    roi.SetSize(60.0, 50.0, 40.0)
    reg = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "spleen")
    reg.SetCenter(40.0, 150.0, 130.0)
    reg.SetSize(30.0, 30.0, 30.0)
    reg.SetAttribute("M3D.task", "reg")
    report = scene.AddNewNodeByClass("vtkMRMLTextNode", "CT report")
    report.SetText("The liver is normal in size.\nNo focal lesion.")
    qa = scene.AddNewNodeByClass("vtkMRMLTextNode", "CT questions")
    qa.SetText(QA_TEXT)
    ai = scene.AddNewNodeByClass("vtkMRMLTextNode", "CT report (AI)")
    ai.SetText("Findings: ... " + AI_LABEL)
    ai.SetAttribute("M3D.label", AI_LABEL)
    return ct, seg, roi, reg
