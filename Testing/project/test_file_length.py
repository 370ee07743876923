"""No product file over 600 lines unless it says why at its top.

A long file is usually several jobs in one; where it is one job that is long for a reason (the Slicer scripted-module
template keeps Module, Widget, Logic and Test in one file), the module docstring has a line starting with
``Why this file is long:`` followed by that reason. Product files: ``M3DAssistant/**/*.py`` and ``M3DTraining/**/*.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

from repo_paths import REPO

PRODUCT_FOLDERS = ("M3DAssistant", "M3DTraining")
MAX_LINES = 600
REASON_MARKER = "Why this file is long:"

def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def stated_reason(path: Path) -> Optional[str]:
    """The text after ``Why this file is long:`` in the module docstring, or None."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))) or ""
    for line in docstring.splitlines():
        if line.strip().startswith(REASON_MARKER):
            return line.strip()[len(REASON_MARKER):].strip() or None
    return None


def too_long(root: Path, folders=PRODUCT_FOLDERS, limit: int = MAX_LINES) -> dict[str, int]:
    """``{path relative to root: lines}`` of the files over ``limit`` that do not state why."""
    found = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            lines = line_count(path)
            if lines > limit and stated_reason(path) is None:
                found[path.relative_to(root).as_posix()] = lines
    return found


def test_no_product_file_is_long_without_a_reason():
    unexplained = too_long(REPO)
    assert not unexplained, (
        f"over {MAX_LINES} lines without a reason: {unexplained}; split the file by job, or start a line of its "
        f"module docstring with {REASON_MARKER!r} and the reason")


def test_the_check_counts_lines_and_reads_the_reason(tmp_path):
    folder = tmp_path / "M3DTraining"
    folder.mkdir()
    (folder / "short.py").write_text('"""Short."""\n' + "x = 1\n" * (MAX_LINES - 1))
    (folder / "long.py").write_text('"""Long."""\n' + "x = 1\n" * MAX_LINES)
    (folder / "explained.py").write_text(f'"""Long.\n\n{REASON_MARKER} it is one table.\n"""\n' + "x = 1\n" * MAX_LINES)
    (folder / "empty_reason.py").write_text(f'"""Long.\n\n{REASON_MARKER}\n"""\n' + "x = 1\n" * MAX_LINES)
    (folder / "reason_in_a_comment.py").write_text(f"# {REASON_MARKER} not a docstring\n" + "x = 1\n" * MAX_LINES)
    assert too_long(tmp_path, ("M3DTraining",)) == {
        "M3DTraining/empty_reason.py": MAX_LINES + 4,
        "M3DTraining/long.py": MAX_LINES + 1,
        "M3DTraining/reason_in_a_comment.py": MAX_LINES + 1,
    }
    assert stated_reason(folder / "explained.py") == "it is one table."
