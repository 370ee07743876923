"""The ``m3d`` command as a user runs it: a real subprocess (``python -m M3DAssistantLib``)."""

from __future__ import annotations

import os
import subprocess
import sys


def m3d(*args, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "M3DAssistantLib", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
