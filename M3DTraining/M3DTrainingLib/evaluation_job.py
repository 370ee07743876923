"""The panel's evaluation: M3D-Bench metrics of a predictions file, computed by :mod:`.evaluate` in a helper process
(:data:`EVALUATION_SCRIPT` in the training Python), written to ``OUTPUT/evaluation/metrics*.json`` and ``.png``
(never overwritten), then shown as text and as an MRML table node.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

from .config import EVALUATION_DIR
from .scene_nodes import new_node, our_node

PathLike = Union[str, os.PathLike]

EVALUATION_SCRIPT = """\
import json, sys
from pathlib import Path
from M3DTrainingLib.evaluate import evaluate_predictions, write_evaluation
source, folder, stem = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
text = source.read_text(encoding="utf-8")
if text.lstrip().startswith("["):
    records = json.loads(text)
else:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
results = evaluate_predictions(records)
json_path, png_path = write_evaluation(results, folder, stem=stem)
print("M3D-EVALUATION " + json.dumps({"json": str(json_path), "png": str(png_path)}))
"""
"""``python -c`` in the training Python: predictions file (a JSON list or JSON lines of records as
:func:`M3DTrainingLib.evaluate.evaluate_predictions` takes them), folder, file stem."""


def next_evaluation_stem(folder: PathLike, base: str = "metrics") -> str:
    """A stem whose .json and .png do not exist yet in ``folder`` (nothing is overwritten)."""
    folder = Path(folder)
    stem, n = base, 1
    while (folder / f"{stem}.json").exists() or (folder / f"{stem}.png").exists():
        n += 1
        stem = f"{base}-{n}"
    return stem


def evaluation_command(python: str, predictions: PathLike, folder: PathLike, stem: str) -> list[str]:
    return [python, "-c", EVALUATION_SCRIPT, str(predictions), str(folder), stem]


def parse_evaluation_output(text: str) -> Optional[dict[str, str]]:
    for line in reversed(text.splitlines()):
        if line.startswith("M3D-EVALUATION "):
            return json.loads(line[15:])
    return None


def latest_evaluation(output_folder: PathLike) -> Optional[Path]:
    """The newest ``metrics*.json`` in ``OUTPUT/evaluation`` (None: not evaluated yet)."""
    found = sorted((Path(output_folder) / EVALUATION_DIR).glob("metrics*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def evaluation_rows(results: dict[str, Any]) -> list[tuple[str, int, str, Optional[float]]]:
    """``(task, samples, metric, value)`` per task and metric, in the order of the results."""
    rows = []
    for task, entry in (results.get("tasks") or {}).items():
        for metric, value in (entry.get("metrics") or {}).items():
            rows.append((task, int(entry.get("n", 0)), metric, None if value is None else float(value)))
    return rows


def format_evaluation(results: dict[str, Any]) -> str:
    """The metrics per task as text, then the messages (metrics that could not be computed here, and why)."""
    lines = []
    for task, entry in (results.get("tasks") or {}).items():
        metrics = ", ".join(f"{name} {'n/a' if value is None else f'{value:.3f}'}"
                            for name, value in (entry.get("metrics") or {}).items())
        lines.append(f"{task} ({entry.get('n', 0)} samples): {metrics or 'no metric'}")
    lines += [f"Note: {m}" for m in results.get("messages") or []]
    return "\n".join(lines) if lines else "No predictions were evaluated."


def evaluation_table_node(scene: Any, results: dict[str, Any], source: PathLike) -> Any:
    """The metrics as a table node named after the results file (reused for the same file, else new)."""
    from vtkmodules.vtkCommonCore import vtkDoubleArray, vtkIntArray, vtkStringArray

    source = str(Path(source))
    node = our_node(scene, "vtkMRMLTableNode", "evaluation", source)
    if node is None:
        node = new_node(scene, "vtkMRMLTableNode", f"M3D evaluation ({Path(source).stem})", "evaluation", source)
    rows = evaluation_rows(results)
    was_modifying = node.StartModify()
    try:
        node.RemoveAllColumns()
        columns = []
        for name, cls in (("task", vtkStringArray), ("samples", vtkIntArray), ("metric", vtkStringArray),
                          ("value", vtkDoubleArray)):
            column = cls()
            column.SetName(name)
            column.SetNumberOfValues(len(rows))
            node.AddColumn(column)
            columns.append(column)
        for i, (task, n, metric, value) in enumerate(rows):
            columns[0].SetValue(i, task)
            columns[1].SetValue(i, n)
            columns[2].SetValue(i, metric)
            columns[3].SetValue(i, math.nan if value is None else value)
        node.GetTable().Modified()
        node.Modified()
    finally:
        node.EndModify(was_modifying)
    return node
