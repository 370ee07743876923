"""What a user does in the M3D Assistant panel under the test harness (``Testing/helpers/slicer_harness``): type, press
Enter, pick from a list, load a CT, run a task and wait for its answer. The panel set up for the tiny checkpoint with
its real worker is the ``assistant_panel`` fixture (conftest.py, :func:`open_assistant_panel`)."""

from __future__ import annotations

import sys


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


def volume_center(volume):
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    return [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]


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


def open_assistant_panel(harness, ct_path, tiny_phi3, tiny_clip):
    """Open the M3D Assistant panel with the CT loaded and set it up as a user does for the tiny checkpoint on the
    CPU (the worker starts on the first task); returns ``(module, widget, volume)``."""
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
    return module, widget, volume
