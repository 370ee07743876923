"""A fake training Python for the training panel (its tests and Utilities/render_panels.py): it runs everything but
``-m M3DTrainingLib.train`` with the real Python, and for that writes progress.jsonl as the real trainer does, with
checkpoints and a ``hold`` file that pauses it."""

from __future__ import annotations

import stat
from pathlib import Path

# The training Python of the panel: `-m M3DTrainingLib.train CONFIG` writes progress like the trainer (waiting after
# step 3 while OUTPUT/hold exists; resuming after its last checkpoint), `--estimate-only` prints an estimate; anything
# else (package checks, evaluation, merge) runs the real Python.
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
