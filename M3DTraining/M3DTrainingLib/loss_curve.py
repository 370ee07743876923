"""A job's training loss per optimizer step (:class:`LossCurve`, from progress events) and the MRML table, plot series
and chart that show it in Slicer's plot view (found again by attribute, see :mod:`.scene_nodes`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from .scene_nodes import new_node, our_node

PathLike = Union[str, os.PathLike]


class LossCurve:
    """Training loss per optimizer step, from progress events.

    A resumed run repeats the steps after its last checkpoint: their new values replace the old ones, so the curve is
    the one an uninterrupted run would have drawn.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.learning_rates: list[float] = []

    def __len__(self) -> int:
        return len(self.steps)

    def _truncate_from(self, step: int) -> bool:
        keep = next((i for i, s in enumerate(self.steps) if s >= step), len(self.steps))
        if keep == len(self.steps):
            return False
        del self.steps[keep:], self.losses[keep:], self.learning_rates[keep:]
        return True

    def add(self, events: Iterable[dict]) -> bool:
        """Take the ``train`` events (and a resumed run's ``start``); True when the curve changed."""
        changed = False
        for event in events:
            stage, step = event.get("stage"), event.get("step")
            if stage == "start" and isinstance(step, int):
                changed |= self._truncate_from(step + 1)
                continue
            loss = event.get("loss")
            if stage != "train" or not isinstance(step, int) or not isinstance(loss, (int, float)):
                continue
            if not math.isfinite(loss):
                continue  # a diverged step: the status line shows it, the plot keeps its scale
            changed |= self._truncate_from(step)
            lr = event.get("lr")
            self.steps.append(step)
            self.losses.append(float(loss))
            self.learning_rates.append(float(lr) if isinstance(lr, (int, float)) else math.nan)
            changed = True
        return changed


LOSS_COLUMNS = ("step", "loss", "learning rate")


@dataclasses.dataclass
class LossCurveNodes:
    table: Any
    series: Any
    chart: Any



def find_loss_curve_nodes(scene: Any, output_folder: PathLike) -> Optional[LossCurveNodes]:
    folder = str(Path(output_folder))
    nodes = [our_node(scene, c, r, folder) for c, r in (("vtkMRMLTableNode", "lossTable"),
                                                          ("vtkMRMLPlotSeriesNode", "lossSeries"),
                                                          ("vtkMRMLPlotChartNode", "lossChart"))]
    return LossCurveNodes(*nodes) if all(nodes) else None


def loss_curve_nodes(scene: Any, output_folder: PathLike) -> LossCurveNodes:
    """The table, plot series and chart that show the loss of the job in ``output_folder``: the ones made earlier
    for it (found by attribute, so a saved and reloaded scene keeps using them), else new ones with unique names.
    Nodes the user made are never reused or changed."""
    from vtkmodules.vtkCommonCore import vtkDoubleArray

    folder = str(Path(output_folder))
    title = f"M3D training loss ({Path(folder).name})"
    table = our_node(scene, "vtkMRMLTableNode", "lossTable", folder)
    if table is None:
        table = new_node(scene, "vtkMRMLTableNode", title, "lossTable", folder)
    for name in LOSS_COLUMNS:
        if table.GetTable().GetColumnByName(name) is None:
            column = vtkDoubleArray()
            column.SetName(name)
            column.SetNumberOfTuples(table.GetNumberOfRows())
            column.Fill(math.nan)
            table.AddColumn(column)
    series = our_node(scene, "vtkMRMLPlotSeriesNode", "lossSeries", folder)
    if series is None:
        series = new_node(scene, "vtkMRMLPlotSeriesNode", "training loss", "lossSeries", folder)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        series.SetLineWidth(2)
        series.SetColor(0.12, 0.47, 0.71)
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName("step")
    series.SetYColumnName("loss")
    chart = our_node(scene, "vtkMRMLPlotChartNode", "lossChart", folder)
    if chart is None:
        chart = new_node(scene, "vtkMRMLPlotChartNode", title, "lossChart", folder)
        chart.SetTitle(title)
        chart.SetXAxisTitle("optimizer step")
        chart.SetYAxisTitle("loss")
        chart.SetLegendVisibility(False)
    if not chart.HasPlotSeriesNodeID(series.GetID()):
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return LossCurveNodes(table, series, chart)


def fill_loss_table(table_node: Any, curve: LossCurve) -> None:
    """Write the curve into the table (all rows: a resumed run may have replaced some), one Modified event."""
    was_modifying = table_node.StartModify()
    try:
        table = table_node.GetTable()
        table.SetNumberOfRows(len(curve))
        columns = [table.GetColumnByName(name) for name in LOSS_COLUMNS]
        for i, values in enumerate(zip(curve.steps, curve.losses, curve.learning_rates)):
            for column, value in zip(columns, values):
                column.SetValue(i, float(value))
        for column in columns:
            column.Modified()
        table.Modified()
        table_node.Modified()
    finally:
        table_node.EndModify(was_modifying)
