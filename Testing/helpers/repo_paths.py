"""Where things are, for every test: the repository, the Testing folder and its bundled data.

``Testing/helpers`` is on pytest's ``pythonpath`` (pyproject.toml), so tests import this as ``from repo_paths import
REPO``; no test computes paths from its own ``__file__`` (the layer folders would make those depths differ).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTING = REPO / "Testing"
HELPERS = TESTING / "helpers"
DATA = TESTING / "Data"
