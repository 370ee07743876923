"""A fake training Python for the training panel (its tests and Utilities/render_panels.py): it runs everything but
``-m M3DTrainingLib.train`` with the real Python, and for that writes progress.jsonl as the real trainer does, with
checkpoints and a ``hold`` file that pauses it."""

from __future__ import annotations

import stat
from pathlib import Path

# The training Python of the panel: `-m M3DTrainingLib.train CONFIG` writes progress like the trainer (waiting after
# step 3 while OUTPUT/hold exists; resuming after its last checkpoint; what it was launched with in OUTPUT/env.json),
# `--estimate-only` prints an estimate; anything else (package checks, evaluation, merge) runs the real Python.
FAKE_TRAINING_PYTHON = """\
#!{python}
import json, os, sys, time
from pathlib import Path
if sys.argv[1:3] != ["-m", "M3DTrainingLib.train"]:
    os.execv({python!r}, [{python!r}] + sys.argv[1:])
if "--estimate-only" in sys.argv:
    print("Memory estimate per device (bf16):")
    print("  total          30.00 GiB")
    sys.exit(0)
out = Path.cwd()
# what the job launcher handed the trainer (GPU selection, the packages' path), for the tests to check
(out / "env.json").write_text(json.dumps({{k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "PYTHONPATH",
                                                                           "CUDA_DEVICE_ORDER")}}))
progress = out / "progress.jsonl"
def emit(**event):
    with open(progress, "a") as f:
        f.write(json.dumps(event) + "\\n")
total = 6
start = int((out / "checkpoint").read_text()) if (out / "checkpoint").exists() else 0
emit(stage="start", step=start, total_steps=total, fraction=start / total, message=f"training from step {{start}}")
for step in range(start + 1, total + 1):
    while (out / "hold").exists() and step > 3:
        time.sleep(0.05)
    emit(stage="train", step=step, total_steps=total, fraction=step / total, loss=10.0 / step, lr=1e-4,
         samples_per_s=2.0, eta_s=(total - step) * 0.1, epoch=step / 3, message=f"step {{step}}/{{total}}")
    if step % 2 == 0:
        (out / "checkpoint").write_text(str(step))
        emit(stage="checkpoint", step=step, total_steps=total, message=f"saved step-{{step}}")
    time.sleep(0.05)
(out / "adapter").mkdir()
(out / "adapter" / "adapter_config.json").write_text("{{}}")
emit(stage="done", step=total, total_steps=total, fraction=1.0, loss=10.0 / total, message="finished 6 steps")
"""


def executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def panel_scene(harness, ct_path):
    """The bundled CT with a liver segment and a report, as a user annotates it before opening M3D Training (the
    panel tests and Utilities/render_panels.py)."""
    import numpy as np
    import slicer

    volume = harness.logics["volumes"].AddArchetypeVolume(str(ct_path), "CT")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
    mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    mask[tuple(slice(s // 3, 2 * s // 3) for s in mask.shape)] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment, volume)
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", "CT report").SetText("A normal abdominal CT.")
    return volume
