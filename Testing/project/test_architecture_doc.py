"""docs/architecture.md stays true: it names every product module, and every path it names exists.

A module added under ``M3DAssistant/M3DAssistantLib`` or ``M3DTraining/M3DTrainingLib`` must get its line in the
package map (as ``M3DAssistantLib/sub/name.py``), in the same commit; a module renamed or removed must leave the page.
Test files are named without their folder (``test_engine.py``), so the page holds whichever sub-folder of
``Testing/`` they live in.
"""

from __future__ import annotations

import re

from repo_paths import REPO

DOC = REPO / "docs" / "architecture.md"
PACKAGES = {"M3DAssistantLib": REPO / "M3DAssistant", "M3DTrainingLib": REPO / "M3DTraining"}
"""Package name -> the module folder that holds it (paths on the page start at the package name)."""

_LIB_PATH = re.compile(r"\b(M3D(?:Assistant|Training)Lib(?:/[A-Za-z0-9_]+)*/[A-Za-z0-9_]+\.py)\b")
_TOP_PATH = re.compile(r"\b((?:benchmarks|Utilities)/[A-Za-z0-9_]+\.py)\b")
_TEST_NAME = re.compile(r"\b(test_[A-Za-z0-9_]+\.py)\b")


def product_modules() -> list[str]:
    """Every product module as the page names it (``M3DAssistantLib/serving/app.py``); empty files are left out."""
    modules = []
    for package, parent in PACKAGES.items():
        for path in sorted((parent / package).rglob("*.py")):
            if "__pycache__" in path.parts or not path.read_text(encoding="utf-8").strip():
                continue
            modules.append(path.relative_to(parent).as_posix())
    return modules


def missing_modules(text: str, modules: list[str]) -> list[str]:
    """The modules that ``text`` does not name (as a whole path in backticks)."""
    return [module for module in modules if f"`{module}`" not in text]


def stale_paths(text: str) -> list[str]:
    """Paths and test files ``text`` names that do not exist (tests are looked for in any folder of Testing/)."""
    stale = []
    for path in sorted(set(_LIB_PATH.findall(text))):
        package = path.split("/")[0]
        if not (PACKAGES[package] / path).is_file():
            stale.append(path)
    stale += [path for path in sorted(set(_TOP_PATH.findall(text))) if not (REPO / path).is_file()]
    tests = {p.name for p in (REPO / "Testing").rglob("test_*.py")}
    stale += [name for name in sorted(set(_TEST_NAME.findall(text))) if name not in tests]
    return stale


def test_every_product_module_is_in_the_package_map():
    modules = product_modules()
    assert len(modules) > 100  # both packages were found
    missing = missing_modules(DOC.read_text(encoding="utf-8"), modules)
    assert not missing, ("docs/architecture.md does not name these modules; add a line for each to its package map:\n"
                         + "\n".join(missing))


def test_every_path_the_page_names_exists():
    stale = stale_paths(DOC.read_text(encoding="utf-8"))
    assert not stale, "docs/architecture.md names files that do not exist (renamed or removed?):\n" + "\n".join(stale)


def test_the_checks_fail_on_a_missing_module_and_a_stale_path():
    modules = ["M3DAssistantLib/engine.py", "M3DAssistantLib/serving/app.py"]
    text = "| `M3DAssistantLib/engine.py` | the engine |\n`M3DAssistantLib/serving/app.py` also appears"
    assert missing_modules(text, modules) == []
    assert missing_modules(text.replace("`M3DAssistantLib/serving/app.py`", "serving/app.py"), modules) == [
        "M3DAssistantLib/serving/app.py"]  # a bare mention is not a package-map entry
    stale = stale_paths("`M3DAssistantLib/engine.py`, `M3DTrainingLib/no_such_module.py`, `benchmarks/cohort.py`, "
                        "`benchmarks/no_such_bench.py`, `test_engine.py`, `test_no_such_thing.py`")
    assert stale == ["M3DTrainingLib/no_such_module.py", "benchmarks/no_such_bench.py", "test_no_such_thing.py"]
