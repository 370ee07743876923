"""A small dataset folder in M3DTraining's export layout, for the dataset and training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from M3DAssistantLib.geometry import mask_to_box
from M3DTrainingLib.export import DATASET_FORMAT, DATASET_VERSION

SHAPE = (16, 64, 64)
N_IMAGE = 8  # tiny checkpoints: 16x64x64 -> 8 image tokens


def write_dataset(folder: Path, report: str = "The liver is normal. No focal lesion.") -> Path:
    """A dataset folder in the export layout. The image is bright (0.9) exactly inside the liver mask and dim (0.1)
    elsewhere, so the transformed image shows where the transformed mask must be."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "texts").mkdir()
    liver = np.zeros((1, *SHAPE), dtype=bool)
    liver[0, 3:11, 10:30, 5:25] = True
    kidney = np.zeros((1, *SHAPE), dtype=bool)
    kidney[0, 6:9, 40:48, 44:52] = True
    image = np.where(liver, 0.9, 0.1).astype(np.float32) + rng.uniform(0, 0.01, liver.shape).astype(np.float32)
    np.save(folder / "images/ct_seg.npy", image)
    np.save(folder / "images/ct_cap.npy", image)
    np.save(folder / "masks/ct_seg_liver.npy", liver)
    np.save(folder / "masks/ct_seg_left_kidney.npy", kidney)
    (folder / "texts/ct_report.txt").write_text(report + "\n")
    liver_box = list(mask_to_box(liver))
    kidney_box = list(mask_to_box(kidney))
    roi_box = [0.125, 0.25, 0.5, 0.5, 0.5, 0.75]  # voxels d 2..8, h 16..32, w 32..48
    seg = "images/ct_seg.npy"

    def box_task(label, target, box):
        return {"image": seg, "label": label, "target": target, "box": box, "volume": "ct"}

    manifest = {
        "format": DATASET_FORMAT, "version": DATASET_VERSION, "model_shape": list(SHAPE), "window": None,
        "report": {"train": [{"image": "images/ct_cap.npy", "text": "texts/ct_report.txt"}], "validation": []},
        "vqa_open": {"train": [{"Image Path": "images/ct_cap.npy", "Question": "What organ is largest?",
                                "Answer": "The liver."}], "validation": []},
        "vqa_closed": {"train": [{"Image Path": "images/ct_cap.npy", "Question": "Which organ is enlarged?",
                                  "Choice A": "Spleen", "Choice B": "Pancreas", "Choice C": "Liver",
                                  "Choice D": "Kidney", "Answer Choice": "C", "Answer": "Liver"}],
                       "validation": []},
        "rec": {"train": [box_task("masks/ct_seg_liver.npy", "liver", liver_box),
                          box_task(None, "liver", roi_box),
                          box_task(None, "gallbladder", None),
                          box_task("masks/ct_seg_left_kidney.npy", "left kidney", kidney_box)],
                "validation": [box_task("masks/ct_seg_liver.npy", "liver", liver_box)]},
        "reg": {"train": [box_task("masks/ct_seg_liver.npy", "liver", liver_box), box_task(None, "spleen", roi_box)],
                "validation": []},
        "seg": {"train": [box_task("masks/ct_seg_liver.npy", "liver", liver_box),
                          box_task(None, "gallbladder", None)], "validation": []},
        "refseg": {"train": [{"Image": seg, "Mask": "masks/ct_seg_liver.npy", "Mask_ID": 1,
                              "Question": "Please segment the organ that produces bile.", "Answer": None,
                              "target": "liver", "box": liver_box}], "validation": []},
    }
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder
