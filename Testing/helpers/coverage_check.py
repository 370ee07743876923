"""Per-file line coverage floor for the two Slicer module files (pytest option ``--min-coverage-per-file=PCT``).

coverage.py's ``fail_under`` checks the total over all measured files; the module files must each reach the floor
(one well-tested file must not hide the other). The README's test command turns it on together with ``--cov``; the
files measured are ``[tool.coverage.run] include`` in pyproject.toml.
"""

from __future__ import annotations

import os

import pytest


def file_percentages(cov, patterns=None) -> dict[str, float]:
    """``{measured file: percent of its statements run}`` from a ``coverage.Coverage`` object after the run."""
    result = {}
    for path in sorted(cov.get_data().measured_files()):
        if patterns and not any(path.replace(os.sep, "/").endswith(p) for p in patterns):
            continue
        _, statements, _, missing, _ = cov.analysis2(path)
        if statements:
            result[path] = 100.0 * (len(statements) - len(missing)) / len(statements)
    return result


def below(percentages: dict[str, float], minimum: float) -> dict[str, float]:
    return {path: pct for path, pct in percentages.items() if pct < minimum}


MODULE_FILES = ("M3DAssistant/M3DAssistant.py", "M3DTraining/M3DTraining.py")


def pytest_addoption(parser) -> None:
    parser.addoption("--min-coverage-per-file", type=float, default=None, metavar="PCT",
                     help="fail when a Slicer module file (M3DAssistant.py, M3DTraining.py) has less line coverage "
                          "(needs --cov)")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtestloop(session):
    """Outermost around pytest-cov's own wrapper: its measurement has stopped when this checks the module files."""
    result = yield
    check_session(session)
    return result


def check_session(session) -> None:
    """After pytest-cov has stopped measuring: print each module file's coverage, fail the run below the floor."""
    minimum = session.config.getoption("--min-coverage-per-file")
    plugin = session.config.pluginmanager.getplugin("_cov")
    if minimum is None:
        return
    controller = getattr(plugin, "cov_controller", None)
    reporter = session.config.pluginmanager.getplugin("terminalreporter")
    if controller is None or controller.cov is None:
        raise pytest.UsageError("--min-coverage-per-file needs --cov")
    percentages = file_percentages(controller.cov, MODULE_FILES)
    reporter.write("\n")
    for name in MODULE_FILES:
        found = [pct for path, pct in percentages.items() if path.replace(os.sep, "/").endswith(name)]
        line = f"{name}: {found[0]:.1f} % of lines" if found else f"{name}: not measured"
        reporter.write_line(f"module file coverage: {line} (floor {minimum:.0f} %)")
        if not found or found[0] < minimum:
            reporter.write_line(f"ERROR: {name} is below the coverage floor of {minimum:.0f} %", red=True, bold=True)
            session.testsfailed += 1
