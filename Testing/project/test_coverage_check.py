"""The module-file coverage floor (Testing/helpers/coverage_check.py) measures per file and can fail."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from repo_paths import HELPERS, REPO


def test_per_file_percentages_and_the_floor(tmp_path):
    coverage = pytest.importorskip("coverage")
    from coverage_check import below, file_percentages

    (tmp_path / "half.py").write_text(textwrap.dedent("""\
        def used():
            return 1

        def unused():
            a = 1
            return a
        """))
    cov = coverage.Coverage(data_file=str(tmp_path / ".coverage"), include=[str(tmp_path / "*")])
    sys.path.insert(0, str(tmp_path))
    try:
        cov.start()
        import half

        half.used()
        cov.stop()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("half", None)
    percentages = file_percentages(cov, ["half.py"])
    (path, pct), = percentages.items()
    assert path.endswith("half.py") and pct == pytest.approx(100 * 3 / 5)  # the body of unused() never ran
    assert below(percentages, 90) == {path: pct} and below(percentages, 60) == {}


def test_a_run_below_the_floor_fails(tmp_path):
    """A pytest run that does not reach the module files fails with the option on, and names them."""
    pytest.importorskip("pytest_cov")
    test = tmp_path / "test_nothing.py"
    test.write_text("def test_nothing():\n    assert True\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(HELPERS)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "coverage_check",
                           str(test), "--rootdir", str(tmp_path), "--cov", f"--cov-config={REPO / 'pyproject.toml'}",
                           "--min-coverage-per-file=90"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode != 0, done.stdout
    assert "ERROR: M3DAssistant/M3DAssistant.py is below the coverage floor of 90 %" in done.stdout, done.stdout
    assert "ERROR: M3DTraining/M3DTraining.py is below the coverage floor of 90 %" in done.stdout
