"""README tells the truth about installing and about the output formats."""

from __future__ import annotations

import re

from repo_paths import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_installs_from_a_clone_not_from_a_package_index():
    """case: README's install line (and the missing-package messages) named a package that is on no index -> they
    install from a clone"""
    assert not re.search(r"pip install [\"']?m3d-slicer", README)
    for source in (REPO / "M3DAssistant").rglob("*.py"):
        assert not re.search(r"pip install [\"']?m3d-slicer", source.read_text(encoding="utf-8")), source
    assert "pip install -e \".[inference]\"" in README and "clone" in README.split("## Install")[1][:800]


def test_readme_lists_every_output_format_with_the_tools_that_open_it():
    from M3DAssistantLib.outputs import FORMATS

    table = README.split("### Output formats and the tools that open them")[1].split("\n\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for extension in FORMATS:
        row = next((r for r in rows if f"`{extension}`" in r.split("|")[1]), None)
        assert row is not None, f"README's output format table has no row for {extension}"
        assert row.split("|")[4].strip(), f"README names no tool that opens {extension}"


def test_performance_table_has_numbers():
    assert "STARTUP_" not in README
