"""The sample annotated scene (Testing/Data/sample): made reproducibly by its script, loadable, and exported by
M3DTraining into every task it annotates -- the start of the tutorial's training part."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
from repo_paths import DATA, REPO

SAMPLE = DATA / "sample"


def test_the_script_makes_the_shipped_files_byte_for_byte(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "Utilities" / "make_sample_scene.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("sample_scene.mrb", "liver_roi.mrk.json"):
        digest = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest(), name


def test_the_sample_exports_every_annotated_task(headless_slicer, tmp_path):
    from M3DTrainingLib.export import export_dataset

    result = export_dataset(SAMPLE / "sample_scene.mrb", tmp_path / "dataset", model_shape=(16, 64, 64))
    manifest = json.loads((result.folder / "dataset.json").read_text())
    tasks = {task for task in ("report", "vqa_open", "vqa_closed", "rec", "reg", "seg", "refseg") if manifest.get(task)}
    assert tasks == {"report", "vqa_open", "vqa_closed", "rec", "reg", "seg", "refseg"}, result.summary()
    targets = {sample["target"] for sample in manifest["seg"]["train"] if sample["label"]}
    assert targets == {"liver", "spleen", "right kidney", "left kidney", "stomach"}


def test_the_liver_roi_file_is_the_scenes_roi_around_the_liver(data_dir):
    from M3DAssistantLib.outputs import read_roi
    from M3DAssistantLib.volume_io import read_volume

    roi = read_roi(SAMPLE / "liver_roi.mrk.json")
    labels, ijk_to_ras = read_volume(data_dir / "example_seg.nii.gz")
    k, j, i = np.nonzero(labels == 5)
    ras = (ijk_to_ras @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T
    assert np.all(np.abs(ras - roi.center) <= roi.size / 2 + 1e-6)  # every liver voxel centre is inside the box
