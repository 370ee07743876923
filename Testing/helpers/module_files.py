"""The Slicer module files read as files (their .ui, their parameter node's fields) and their own Slicer self-tests run
under unittest, for the packaging and panel tests."""

from __future__ import annotations

import ast
import io
import unittest
import xml.etree.ElementTree as ET

from repo_paths import REPO


def ui_widgets(module: str) -> tuple[ET.ElementTree, dict[str, ET.Element]]:
    tree = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui")
    return tree, {w.get("name"): w for w in tree.iter("widget")}


def module_source(module: str) -> str:
    return (REPO / module / f"{module}.py").read_text(encoding="utf-8")


def parameter_node_fields(module: str) -> dict[str, str]:
    """Annotated fields of the module's @parameterNodeWrapper class, as source text."""
    tree = ast.parse(module_source(module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


def run_slicer_self_test(test_class, *names):
    suite = unittest.TestSuite(test_class(name) for name in names)
    output = io.StringIO()
    result = unittest.TextTestRunner(stream=output, verbosity=2).run(suite)
    assert result.wasSuccessful(), output.getvalue()
    assert result.testsRun == len(names)
