"""What the training needs installed: the modules the trainer and the evaluation import, what Slicer's own process
needs to start and watch a job, and the check for missing modules in
that Python (a helper process, nothing imported). The installer (``M3DTraining.ensureTrainingPython``) uses them.
"""

from __future__ import annotations

import json
import subprocess
from typing import Callable, Optional, Sequence

from .helper_process import hidden_window_kwargs

TRAINING_MODULES = ("torch", "transformers", "peft", "accelerate", "safetensors", "monai", "yaml", "psutil",
                    "M3DAssistantLib", "M3DTrainingLib")
"""What the trainer imports (checked in the training Python before a job starts)."""

EVALUATION_MODULES = ("numpy", "torch", "monai", "sacrebleu", "rouge_score", "matplotlib", "M3DAssistantLib",
                      "M3DTrainingLib")

LAUNCHER_MODULES = {"yaml": "pyyaml>=6", "psutil": "psutil>=5.9"}
"""What Slicer's own process needs to start and watch a job: writing the config, checking the job's process."""

MODULE_CHECK = "import importlib.util, json, sys; print('M3D-MISSING ' + json.dumps([m for m in sys.argv[1:] " \
               "if importlib.util.find_spec(m) is None]))"


def missing_modules(python: str, modules: Sequence[str], env: Optional[dict] = None, timeout_s: float = 120.0,
                    run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[str]:
    """Which of ``modules`` the Python ``python`` cannot import (found without importing them).

    Raises ``M3DError`` when that Python cannot be run at all.
    """
    from M3DAssistantLib.errors import M3DError

    try:
        done = run([python, "-c", MODULE_CHECK, *modules], capture_output=True, text=True, timeout=timeout_s,
                   env=env, stdin=subprocess.DEVNULL, **hidden_window_kwargs())
    except (OSError, subprocess.TimeoutExpired) as e:
        raise M3DError(f"the training Python {python} cannot be run ({e}); choose another one in the Compute "
                       "section.") from e
    for line in reversed((done.stdout or "").splitlines()):
        if line.startswith("M3D-MISSING "):
            return list(json.loads(line[12:]))
    raise M3DError(f"the training Python {python} failed (exit status {done.returncode}): "
                   f"{(done.stderr or done.stdout or '').strip()[-500:]}")
