"""Utilities/render_panels.py (the README's pictures of the panels) keeps working: it renders all six states."""

from __future__ import annotations

import subprocess
import sys

import pytest
from repo_paths import REPO

PICTURES = ["assistant-ready", "assistant-answering", "assistant-results", "training-ready", "training-running",
            "training-finished"]

pytestmark = [pytest.mark.slicer, pytest.mark.skipif(sys.platform == "win32", reason="fake tools are POSIX scripts")]


def test_the_script_renders_both_panels_in_three_states(tmp_path):
    pytest.importorskip("PySide6")
    from PIL import Image

    done = subprocess.run([sys.executable, str(REPO / "Utilities" / "render_panels.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / f"{name}.png") for name in PICTURES]
    for name in PICTURES:
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.width >= 400 and image.height >= 900, (name, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50, f"{name}.png looks blank"


def test_readme_shows_the_pictures():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in PICTURES:
        assert f"docs/images/{name}.png" in readme
        assert (REPO / "docs" / "images" / f"{name}.png").is_file()
    assert "rendered by the test harness" in readme
