"""The environment of a helper process or training job: the Lib folders on PYTHONPATH and the chosen GPUs.

Slicer puts module folders on its own ``sys.path`` only; a process it starts (PythonSlicer or another Python) finds
M3DTrainingLib and M3DAssistantLib through the PYTHONPATH of :func:`helper_environment`. Only the standard library.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from .gpus import format_gpu_selection


def library_paths() -> list[str]:
    """Folders that hold M3DTrainingLib and M3DAssistantLib: Slicer puts module folders on its own ``sys.path`` only,
    so a helper process gets them on its PYTHONPATH."""
    import importlib.util

    paths = [str(Path(__file__).resolve().parent.parent)]
    spec = importlib.util.find_spec("M3DAssistantLib")
    if spec is not None and spec.submodule_search_locations:
        paths.append(str(Path(list(spec.submodule_search_locations)[0]).resolve().parent))
    return list(dict.fromkeys(paths))


def helper_environment(gpus: Optional[Sequence[int]] = None, base: Optional[dict] = None) -> dict[str, str]:
    """Variables a helper process or job needs on top of ``base``: PYTHONPATH with the Lib folders and, when
    ``gpus`` is given, the chosen GPUs (numbered as nvidia-smi numbers them; () hides every GPU)."""
    base = os.environ if base is None else base
    entries = library_paths() + [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(entries))}
    if gpus is not None:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's default order is "fastest first", nvidia-smi's is PCI
        env["CUDA_VISIBLE_DEVICES"] = format_gpu_selection(gpus)
    return env
