"""The M3D Assistant panel as a user drives it, on real Qt widgets (``Testing/slicer_harness``), with the real worker.

The module is opened in the harness's main window (``setup``, ``enter``), the user picks the bundled CT and the tiny
random checkpoint folder, and presses the buttons; the module's own code starts ``m3d serve`` (its worker) in a
separate process, as in Slicer. The tiny model answers random text, so the unforced flow checks what must hold for any
answer (streaming, the Cancel button, the conversation, nothing overwritten, the panel's state) and the forced flow —
the same worker started through ``forcing.write_worker_launcher`` — checks the new ROI and segment.
"""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.slicer


def typed(line_edit, text: str) -> None:
    """Replace the text of a line edit (or an editable combo box's) by typing it, as a user does."""
    from PySide6.QtTest import QTest

    line_edit.clear()
    QTest.keyClicks(line_edit, text)


def press_enter(widget) -> None:
    from PySide6 import QtCore
    from PySide6.QtTest import QTest

    QTest.keyClick(widget, QtCore.Qt.Key_Return)


def chosen(combo, text: str) -> None:
    """Pick an entry of a combo box, as a user does (the list's activated signal with it)."""
    index = combo.findText(text)
    assert index >= 0, f"{text!r} is not in {[combo.itemText(i) for i in range(combo.count)]}"
    combo.setCurrentIndex(index)
    combo.activated.emit(index)


def load_ct(harness, ct_path, name="CT"):
    volume = harness.logics["volumes"].AddArchetypeVolume(str(ct_path), name)
    assert volume is not None
    return volume


def run_task(harness, widget, key: str, timeout: float = 120.0):
    """Press a task's button and wait for the answer; returns the conversation entry."""
    from M3DAssistantLib.tasks import TASKS

    task = TASKS[key]
    button = getattr(widget.ui, task.button)
    assert button.enabled, f"{task.label} is disabled"
    button.click()
    volume = widget._parameterNode.inputVolume
    assert button.text == "Cancel", f"{task.label} did not start: {widget.ui.statusLabel.text}"
    assert all(not b.enabled for k, b in widget._taskButtons.items() if k != key)  # one task at a time
    harness.waitFor(lambda: button.text == task.label, timeout, f"{task.label} to finish")
    return widget._conversation.entries(volume.GetID())[-1]


@pytest.fixture
def assistant(slicer_harness, ct_path, tiny_phi3, tiny_clip):
    """The opened M3D Assistant panel with the CT loaded, set up by the user for the tiny checkpoint on the CPU."""
    harness = slicer_harness
    volume = load_ct(harness, ct_path)
    module = harness.loadModule("M3DAssistant")
    widget = harness.openModule("M3DAssistant")
    assert widget.ui.inputSelector.currentNode() is volume  # the only image volume is preselected
    chosen(widget.ui.modelComboBox, module.MODEL_FOLDER)
    assert widget.ui.browseModelButton.enabled and not widget.ui.modelSourceLineEdit.readOnly
    typed(widget.ui.modelSourceLineEdit, str(tiny_phi3))
    chosen(widget.ui.runOnComboBox, module.RUN_CPU)
    widget.ui.advancedCollapsibleButton.collapsed = False
    widget.ui.maxNewTokensSpinBox.value = 8
    widget.ui.pythonPathLineEdit.currentPath = sys.executable
    typed(widget.ui.clipModelLineEdit, str(tiny_clip))
    press_enter(widget.ui.clipModelLineEdit)
    p = widget._parameterNode
    assert (p.modelChoice, p.modelSource, p.runOn, p.maxNewTokens) == (module.MODEL_FOLDER, str(tiny_phi3),
                                                                       module.RUN_CPU, 8)
    yield harness, module, widget, volume
    widget.logic.shutdown()


def test_every_task_from_its_button_with_the_real_worker(assistant, tmp_path):
    harness, module, widget, volume = assistant
    import slicer
    from M3DAssistantLib import AI_LABEL
    from M3DAssistantLib.tasks import TASKS

    # Start loads the model in the background; the status shows it starting, then ready
    widget.ui.startWorkerButton.click()
    harness.waitFor(lambda: widget.logic.workerProcess() is not None and widget.logic.workerProcess().ready,
                    180, "the worker to start")
    worker = widget.logic.workerProcess()
    pid = worker.pid
    harness.waitFor(lambda: "ready" in widget.ui.workerStatusLabel.text or "running" in
                    widget.ui.workerStatusLabel.text, 10, "the worker status")

    # Report: the answer streams into the conversation, then a text node with it
    entry = run_task(harness, widget, "report")
    assert entry.status == "done", (entry, widget.ui.statusLabel.text, widget.ui.outputTextEdit.plainText)
    assert widget.ui.statusLabel.text.startswith("Done.")
    html = widget.ui.conversationView.toHtml()
    assert AI_LABEL in widget.ui.conversationView.toPlainText()
    assert "Report" in html

    # Ask with Enter in the prompt box: the prompt goes into the history
    typed(widget.ui.promptComboBox.lineEdit(), "Is there free fluid?")
    press_enter(widget.ui.promptComboBox.lineEdit())
    ask = TASKS["ask"]
    harness.waitFor(lambda: getattr(widget.ui, ask.button).text == ask.label, 120, "Ask to finish")
    entry = widget._conversation.entries(volume.GetID())[-1]
    assert (entry.task, entry.prompt, entry.status) == ("ask", "Is there free fluid?", "done")
    assert widget.ui.promptComboBox.itemText(0) == "Is there free fluid?"
    assert widget.ui.promptComboBox.currentText == ""  # cleared for the next prompt

    # Multiple choice with the choices field
    typed(widget.ui.promptComboBox.lineEdit(), "Which plane is this?")
    typed(widget.ui.choicesLineEdit, "Axial; Coronal; Sagittal; Oblique")
    entry = run_task(harness, widget, "choose")
    assert entry.status == "done" and entry.prompt == "Which plane is this? (Axial; Coronal; Sagittal; Oblique)"

    # Locate, Segment, Segment by description: random answers rarely hold a box or [SEG]; the panel says so
    for key in ("locate", "segment", "segment_expression"):
        typed(widget.ui.promptComboBox.lineEdit(), "liver")
        entry = run_task(harness, widget, key)
        assert entry.status == "done", (key, entry)

    # Describe ROI: the user draws a box and picks it
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "my box")
    roi.SetCenter(*volume_center(volume))
    roi.SetSize(40.0, 40.0, 40.0)
    widget.ui.describeRoiSelector.selectByName("my box")
    assert widget._parameterNode.describeRoi is roi
    entry = run_task(harness, widget, "describe_region")
    assert entry.status == "done" and entry.prompt == "my box"

    # Find similar ranks the scene's volumes by the prompt with M3D-CLIP (the tiny one from the Advanced setting)
    typed(widget.ui.promptComboBox.lineEdit(), "an abdominal CT")
    entry = run_task(harness, widget, "find_similar")
    assert entry.status == "done" and entry.answer.startswith("1. CT (")

    assert [e.task for e in widget._conversation.entries(volume.GetID())] == [
        "report", "ask", "choose", "locate", "segment", "segment_expression", "describe_region", "find_similar"]
    assert (worker.pid, worker.restarts) == (pid, 0)  # one worker for all of it
    assert widget.ui.promptComboBox.count == 4  # the distinct prompts, newest first
    assert [widget.ui.promptComboBox.itemText(i) for i in range(4)] == [
        "an abdominal CT", "liver", "Which plane is this?", "Is there free fluid?"]


def volume_center(volume):
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    return [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
