"""No import cycle in M3DAssistantLib or M3DTrainingLib.

The graph is built from the source with ``ast`` (nothing is imported): one node per module of the two packages, one
edge per ``import`` / ``from ... import`` of another of their modules, relative imports resolved, ``from package import
name`` pointing at the submodule when ``name`` is one. Imports inside functions are edges too: a lazy import still
means "this module needs that one", and a cycle through it is the tangle a newcomer trips over even when Python
happens to import it without error. Two kinds of import are not edges, because they never run:

* imports under ``if TYPE_CHECKING:`` (annotations only);
* the implicit import of a package's ``__init__`` by its submodules: Python has the package in ``sys.modules`` before
  its submodules run, so ``package/__init__.py`` importing ``package.sub`` is never a cycle by itself.

``importlib.import_module("literal.name")`` (and ``(".sub", package)``) is an edge; a computed name (the lazy export
table of ``M3DAssistantLib/model/__init__.py``, the ``dataset_factory`` of a training config) cannot be read
statically and is not.

A cycle is reported as a path ``a -> b -> c -> a``; every strongly connected component is listed.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Optional

from repo_paths import REPO

PACKAGES = {
    "M3DAssistantLib": REPO / "M3DAssistant" / "M3DAssistantLib",
    "M3DTrainingLib": REPO / "M3DTraining" / "M3DTrainingLib",
}


# ----------------------------------------------------------------------------------------------------- the graph
def module_files(name: str, root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of a package and its subpackages (folders with an ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(not (root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(len(parts))):
            continue  # not inside a package (a stray script folder)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((name, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _literal_import_module(node: ast.AST) -> Optional[ast.ImportFrom]:
    """``importlib.import_module("a.b")`` / ``import_module(".b", __name__)`` as the import statement it amounts to."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    target = node.args[0]
    if name != "import_module" or not isinstance(target, ast.Constant) or not isinstance(target.value, str):
        return None
    text = target.value
    level = len(text) - len(text.lstrip("."))
    return ast.ImportFrom(module=text[level:] or None, names=[], level=level)


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        dynamic = _literal_import_module(node)
        if dynamic is not None:
            yield dynamic
        stack.extend(ast.iter_child_nodes(node))


def _resolve_relative(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules of the packages it imports}`` for every module of ``packages``."""
    files = {m: p for name, root in packages.items() for m, p in module_files(name, root).items()}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                        else node.module or "")
                # `from pkg import sub` imports the submodule; `from pkg import name` needs only pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names] or [base]
            for target in targets:
                # `import a.b.c` needs a.b.c; the nearest module of ours is the edge
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path per strongly connected component with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(start: str) -> None:  # iterative Tarjan: the graph may be deep
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_cycle_path(graph, set(c)) for c in components)


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & component):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in parents:
                parents[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def _format(found: list[list[str]]) -> str:
    return "\n".join(" -> ".join(path) for path in found)


GRAPH = import_graph(PACKAGES)
CYCLES = cycles(GRAPH)


# ----------------------------------------------------------------------------------------------------- the checks
def test_no_import_cycle_through_M3DTrainingLib():
    found = [path for path in CYCLES if any(m.startswith("M3DTrainingLib") for m in path)]
    assert not found, "import cycles through M3DTrainingLib:\n" + _format(found)


def test_no_import_cycle_in_M3DAssistantLib():
    found = [path for path in CYCLES if all(m.startswith("M3DAssistantLib") for m in path)]
    assert not found, "import cycles in M3DAssistantLib:\n" + _format(found)


def test_the_graph_covers_both_packages():
    """A sanity check of the parser on the real code: known edges are found, including lazy and relative ones."""
    assert {"M3DTrainingLib.config", "M3DTrainingLib.train", "M3DAssistantLib.cli",
            "M3DAssistantLib.model.loading"} <= set(GRAPH)
    assert "M3DTrainingLib.config" in GRAPH["M3DTrainingLib.jobs"]  # `from .config import ...`
    assert "M3DTrainingLib.cli" in GRAPH["M3DAssistantLib.cli"]  # inside build_parser()
    assert "M3DAssistantLib.errors" in GRAPH["M3DTrainingLib.config"]


def test_cycles_are_found_through_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from . import b\nA = 1\n")
    (pkg / "b.py").write_text("def f():\n    from .sub.c import C\n    return C\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..d import D\n"
                                      "def g():\n    import pkg.a\n")
    (pkg / "d.py").write_text("import importlib\ndef h():\n    return importlib.import_module('.sub.c', 'pkg')\n")
    graph = import_graph({"pkg": pkg})
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.sub.c"] == {"pkg.a"}  # the TYPE_CHECKING import of d is not an edge
    assert graph["pkg.d"] == {"pkg.sub.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    (pkg / "sub" / "c.py").write_text("C = 3\n")
    assert cycles(import_graph({"pkg": pkg})) == []
