#!/usr/bin/env python3
"""Regenerate the SCRIPTS / RESOURCES lists in each module's CMakeLists.txt from the files on disk.

Slicer packages only the files a scripted module lists in ``slicerMacroBuildScriptedModule(SCRIPTS … RESOURCES …)``;
a file that is not listed is silently missing from the installed extension. Each module's CMakeLists.txt therefore
holds two generated blocks between marker comments, and this script rewrites them:

    python Utilities/update_cmake_lists.py           # rewrite the lists
    python Utilities/update_cmake_lists.py --check   # exit 1 and name the differences (used by the tests)

Scripts are all ``*.py`` files under the module folder; resources are all other files there, except the module's
``CMakeLists.txt``, its ``Testing/`` folder, caches and editor leftovers. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# One marker pair per generated block; the text after the name is free-form.
BLOCKS = ("SCRIPTS", "RESOURCES")
BEGIN = "# BEGIN generated {block}"
END = "# END generated {block}"
HINT = "(Utilities/update_cmake_lists.py; do not edit by hand)"

SKIPPED_DIR_NAMES = {"__pycache__"}
SKIPPED_TOP_DIRS = {"Testing"}  # a module's own build-time tests are not packaged
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".orig", ".rej", ".swp", ".swo", ".bak", "~")
SKIPPED_NAMES = {".DS_Store", "Thumbs.db"}


def module_dirs(root: Path = REPO_ROOT) -> list[Path]:
    """Module folders: direct subfolders of ``root`` whose CMakeLists.txt builds a scripted module."""
    found = []
    for cmake in sorted(root.glob("*/CMakeLists.txt")):
        if "slicerMacroBuildScriptedModule" in cmake.read_text(encoding="utf-8"):
            found.append(cmake.parent)
    return found


def collect_files(module_dir: Path) -> dict[str, list[str]]:
    """Files of one module as ``{"SCRIPTS": [...], "RESOURCES": [...]}``, POSIX paths relative to the module.

    The module's main script comes first; everything else is sorted.
    """
    scripts: list[str] = []
    resources: list[str] = []
    for path in sorted(module_dir.rglob("*")):
        relative = path.relative_to(module_dir)
        if not path.is_file() or _skipped(relative):
            continue
        name = relative.as_posix()
        if name == "CMakeLists.txt":
            continue
        if re.search(r"[\s;\"'$()#\\]", name):
            # CMake lists are unquoted and ';'-separated: such a name would be split or misread.
            raise ValueError(f"{module_dir.name}/{name}: rename it, file names in a module must not contain spaces, "
                             "quotes, ';', '$', '#', '\\' or parentheses")
        (scripts if path.suffix == ".py" else resources).append(name)
    main_script = f"{module_dir.name}.py"
    if main_script in scripts:
        scripts.remove(main_script)
        scripts.insert(0, main_script)
    return {"SCRIPTS": scripts, "RESOURCES": resources}


def _skipped(relative: Path) -> bool:
    parts = relative.parts
    if len(parts) > 1 and parts[0] in SKIPPED_TOP_DIRS:
        return True
    if any(part.startswith(".") or part in SKIPPED_DIR_NAMES for part in parts[:-1]):
        return True
    name = parts[-1]
    return name.startswith(".") or name in SKIPPED_NAMES or name.endswith(SKIPPED_SUFFIXES)


def render(cmake_text: str, files: dict[str, list[str]], where: str = "CMakeLists.txt") -> str:
    """Return ``cmake_text`` with each generated block replaced by ``files[block]``."""
    for block in BLOCKS:
        pattern = re.compile(
            r"^(?P<indent>[ \t]*)" + re.escape(BEGIN.format(block=block)) + r"[^\n]*\n"
            r".*?"
            r"^[ \t]*" + re.escape(END.format(block=block)) + r"[^\n]*$",
            re.MULTILINE | re.DOTALL,
        )
        match = pattern.search(cmake_text)
        if match is None:
            raise ValueError(f"{where}: no '{BEGIN.format(block=block)}' … '{END.format(block=block)}' block; "
                             "add the two marker comments inside the set(...) of that list")
        indent = match.group("indent")
        lines = [f"{indent}{BEGIN.format(block=block)} {HINT}"]
        lines += [f"{indent}{name}" for name in files[block]]
        lines.append(f"{indent}{END.format(block=block)}")
        cmake_text = cmake_text[: match.start()] + "\n".join(lines) + cmake_text[match.end():]
    return cmake_text


def listed_files(cmake_text: str, block: str) -> list[str]:
    """The names currently inside one generated block."""
    inside = re.search(
        re.escape(BEGIN.format(block=block)) + r"[^\n]*\n(.*?)^[ \t]*" + re.escape(END.format(block=block)),
        cmake_text, re.MULTILINE | re.DOTALL)
    if inside is None:
        return []
    return [line.strip() for line in inside.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def differences(module_dir: Path) -> list[str]:
    """Human-readable differences between a module's CMakeLists.txt and its files; empty when up to date."""
    cmake_text = (module_dir / "CMakeLists.txt").read_text(encoding="utf-8")
    files = collect_files(module_dir)
    problems = []
    for block in BLOCKS:
        listed = listed_files(cmake_text, block)
        missing = [name for name in files[block] if name not in listed]
        stale = [name for name in listed if name not in files[block]]
        if missing:
            problems.append(f"{module_dir.name}/CMakeLists.txt {block} does not list: {', '.join(missing)}")
        if stale:
            problems.append(f"{module_dir.name}/CMakeLists.txt {block} lists files that do not exist: "
                            f"{', '.join(stale)}")
    if not problems and render(cmake_text, files) != cmake_text:
        problems.append(f"{module_dir.name}/CMakeLists.txt: generated lists are out of order or badly formatted")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report differences; exit 1 if there are any")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="extension folder (default: this repository)")
    args = parser.parse_args(argv)

    modules = module_dirs(args.root)
    if not modules:
        print(f"No module CMakeLists.txt with slicerMacroBuildScriptedModule under {args.root}", file=sys.stderr)
        return 1
    if args.check:
        problems = [problem for module_dir in modules for problem in differences(module_dir)]
        for problem in problems:
            print(problem)
        if problems:
            print("Run: python Utilities/update_cmake_lists.py")
        return 1 if problems else 0
    for module_dir in modules:
        cmake = module_dir / "CMakeLists.txt"
        old = cmake.read_text(encoding="utf-8")
        new = render(old, collect_files(module_dir), where=str(cmake))
        if new != old:
            cmake.write_text(new, encoding="utf-8")
            print(f"updated {cmake.relative_to(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
