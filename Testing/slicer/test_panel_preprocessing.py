"""What the panel shows about fidelity (issue #11): before a run, what each task will see (convention, plane and
window, following the volume, the window choice and the window/level); after it, the convention and window each
answer used; and the Check installation button (verdict, details, saved report). The Logic's ``taskPreprocessing``
agrees with what the engine then records in the provenance.

The panel runs under the test harness (``Testing/helpers/slicer_harness``: real Qt widgets, real MRML and observers);
its answers and its installation check come from the real worker process on the tiny checkpoint
(``assistant_panel``)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from panel_user import chosen, run_task, typed

from M3DAssistantLib import panel, selfcheck, tasks
from M3DAssistantLib.geometry import task_preprocessing
from M3DAssistantLib.preprocessing import DisplayWindow, IntensitySpec
from M3DAssistantLib.results import Provenance, TextResult


def provenance(convention=None, intensity=None) -> Provenance:
    return Provenance(task="report", model="fake", model_revision=None, dtype="float32", device="cpu", prompt="",
                      convention=convention, intensity=intensity)


# ------------------------------------------------------------------------------------------------- Qt-free helpers
def test_used_text_reads_the_engines_and_clips_provenance():
    engine_style = repr({"scheme": "window", "name": "display (Slicer)", "low": -160.0, "high": 240.0,
                         "center": 40.0, "width": 400.0, "percentiles": None, "version": 1})
    assert panel.used_text(TextResult("x", provenance("m3d-cap-v2@v1", engine_style))) == \
        "m3d-cap-v2, window display (Slicer) 40/400"
    clip_style = json.dumps({"scheme": "percentile", "name": "percentile", "low": -87.25, "high": 241.5})
    assert panel.used_text(TextResult("x", provenance("m3d-seg-v1", clip_style))) == \
        "m3d-seg-v1, window percentile [-87.25, 241.5]"
    custom = repr({"scheme": "window", "name": "custom", "center": -600.0, "width": 1500.0, "low": 0, "high": 1})
    assert panel.used_text(TextResult("x", provenance(None, custom))) == "window -600/1500"
    assert panel.used_text(TextResult("x", provenance("m3d-cap-v2@v1", None))) == "m3d-cap-v2"
    assert panel.used_text(TextResult("x", provenance(None, "not a record"))) == ""
    assert panel.used_text(object()) == ""


def test_preprocessing_summary_groups_tasks_that_see_the_same():
    coronal = np.array([[-1.0, 0, 0, 0], [0, 0, 3.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])  # K along anterior
    shown = DisplayWindow(40, 400, "Slicer")
    rows = [(task, task.preprocessing(coronal, display_window=shown, value_range=(-1000, 1000)))
            for task in tasks.TASKS.values()]
    lines = panel.preprocessing_summary(rows).splitlines()
    assert lines == [
        "Report, Ask, Multiple choice, Find similar: m3d-cap-v2: coronal slices (the volume's own plane); window "
        "display (Slicer) 40/400",
        "Locate, Describe ROI, Segment: m3d-seg-v1: axial slices (the volume is coronal); window percentile",
        "Segment by description: m3d-refseg-v1: axial slices (the volume is coronal); window volume-percentile"]
    lung = [(task, task_preprocessing(task.key, coronal, task.convention, IntensitySpec("window", "lung", -500, 1400)))
            for task in tasks.TASKS.values()]
    assert all(line.endswith("window lung -500/1400") for line in panel.preprocessing_summary(lung).splitlines())


def _report(verdict="pass", message="5 of 5 checks answered, within the thresholds <ok>") -> selfcheck.SelfCheckReport:
    check = selfcheck.Check("segment", "liver", "m3d-seg-v1", "percentile", "p", "a", "mask", "ok", dice=0.9)
    return selfcheck.SelfCheckReport(model={"source": "fake"}, volume={"path": "ct"}, conventions="default",
                                     checks=[check, selfcheck.Check("plane", "axial series", "m3d-cap-v2", "abdomen",
                                                                    "p", "a", "parse error", "no answer")],
                                     verdict=verdict, message=message)


def test_selfcheck_summary_is_the_verdict_in_colour():
    text = panel.selfcheck_summary(_report())
    assert "Installation check: PASS" in text and panel.VERDICT_COLORS["pass"] in text
    assert "(1 of 2 checks answered)" in text and "&lt;ok&gt;" in text and "Save report" in text
    assert panel.VERDICT_COLORS["orientation suspect"] in panel.selfcheck_summary(_report("orientation suspect"))


# ------------------------------------------------------------------------------------------- Logic, before and after
def coronal_node(name="coronal CT"):
    """A CT-like volume stored as a coronal series (K runs anterior), with a window/level set by hand."""
    import slicer

    rng = np.random.default_rng(1)
    array = rng.normal(40, 200, size=(12, 40, 36)).clip(-1000, 1500).astype(np.int16)
    array[:, :4] = -1000  # air
    ijk_to_ras = np.array([[-0.8, 0, 0, 10.0], [0, 0, 3.0, -20.0], [0, -0.8, 0, 30.0], [0, 0, 0, 1]])
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras, name=name)
    node.GetDisplayNode().SetAutoWindowLevel(False)
    node.GetDisplayNode().SetWindowLevel(400.0, 40.0)
    return node


def test_task_preprocessing_says_what_the_engine_then_uses(assistant, tiny_phi3_model):  # noqa: F811 (fixture)
    """Logic.taskPreprocessing before a run == the provenance of the run, task by task (real engine)."""
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.settings import MemorySettings

    engine = InferenceEngine(tiny_phi3_model)
    logic = assistant.M3DAssistantLogic(settings=MemorySettings(), backendFactory=lambda config: engine)
    node = coronal_node()
    report = logic.taskPreprocessing(node, "report")
    assert (report.convention, report.volume_plane, report.model_plane) == ("m3d-cap-v2", "coronal", "coronal")
    assert report.window == DisplayWindow(40.0, 400.0, "Slicer").spec
    assert logic.taskPreprocessing(node, "segmentExpression").convention == "m3d-refseg-v1"
    short = {"maxNewTokens": 2}
    for key, arguments in (("report", ()), ("locate", ("liver",)), ("segment_expression", ("the liver",))):
        before = logic.taskPreprocessing(node, key)
        logic.runTask(key, node, *arguments, **short)
        used = logic.lastResult.provenance
        mapping = json.loads(used.intensity)  # the engine's record of the window it used
        assert used.convention.split("@")[0] == before.convention, key
        assert (mapping["scheme"], mapping["name"]) == (before.window.scheme, before.window.name), key
        assert (mapping.get("center"), mapping.get("width")) == (before.window.center, before.window.width), key

    node.GetDisplayNode().SetWindowLevel(1500.0, -600.0)  # the reader changes W/L: the preview follows
    assert logic.taskPreprocessing(node, "ask").window.center == -600.0
    logic.getParameterNode().windowPreset = "Lung"  # a preset: every task
    assert {logic.taskPreprocessing(node, t).window.name for t in tasks.TASKS} == {"lung"}
    logic.getParameterNode().windowPreset = assistant.WINDOW_DISPLAY  # as displayed: every task, masks included
    assert logic.taskPreprocessing(node, "segment").window.center == -600.0
    assert logic.taskPreprocessing(node, "segment", window=None).window.name == "percentile"
    with pytest.raises(TypeError, match="unknown option"):
        logic.taskPreprocessing(node, "report", roiNode=None)


# ------------------------------------------------------------------------------------------------------ the panel
def open_panel(harness):
    harness.loadModule("M3DAssistant")
    return harness.openModule("M3DAssistant")


def test_the_preview_follows_volume_window_choice_and_window_level(slicer_harness):
    """Under the task buttons, what each task will see; it follows the input volume (the module observes its display
    node: a window/level changed in MRML, as by dragging in a slice view, updates it), the window choice, and another
    volume; showing it starts no model."""
    import slicer

    node = coronal_node()
    widget = open_panel(slicer_harness)
    assert widget.ui.inputSelector.currentNode() is node  # the only image volume is preselected
    event = slicer.vtkMRMLDisplayableNode.DisplayModifiedEvent
    assert widget.hasObserver(node, event, widget._onInputDisplayModified)
    text = widget.ui.taskPreprocessingLabel.text
    assert text.startswith("What the model will see:")
    assert "Report, Ask, Multiple choice, Find similar: m3d-cap-v2: coronal slices" in text
    assert "display (Slicer) 40/400" in text and "Segment by description: m3d-refseg-v1" in text

    node.GetDisplayNode().SetWindowLevel(1500.0, -600.0)  # the real DisplayModifiedEvent reaches the panel
    assert "display (Slicer) -600/1500" in widget.ui.taskPreprocessingLabel.text
    chosen(widget.ui.windowComboBox, "Bone")
    assert widget._parameterNode.windowPreset == "Bone"
    assert widget.ui.taskPreprocessingLabel.text.count("window bone 400/1000") == 3
    chosen(widget.ui.windowComboBox, "Model default")
    assert "display (Slicer) -600/1500" in widget.ui.taskPreprocessingLabel.text

    # Another volume: the preview and the observation move to it; the first one's window no longer matters
    second = coronal_node("second CT")
    second.GetDisplayNode().SetWindowLevel(2000.0, 300.0)
    widget.ui.inputSelector.selectByName("second CT")
    assert "display (Slicer) 300/2000" in widget.ui.taskPreprocessingLabel.text
    assert widget.hasObserver(second, event, widget._onInputDisplayModified)
    assert not widget.hasObserver(node, event, widget._onInputDisplayModified)
    shown = widget.ui.taskPreprocessingLabel.text
    node.GetDisplayNode().SetWindowLevel(80.0, 35.0)
    assert widget.ui.taskPreprocessingLabel.text == shown

    # No input volume: no preview
    slicer.mrmlScene.RemoveNode(second)
    slicer.mrmlScene.RemoveNode(node)
    assert widget._parameterNode.inputVolume is None and widget.ui.taskPreprocessingLabel.text == ""
    assert not widget.ui.reportButton.enabled

    # None of this loaded a model: the preview reads the node's geometry and display only
    assert widget.logic._backend is None and widget.logic.workerProcess() is None


def test_each_answer_says_what_the_model_was_shown(assistant_panel):
    """The real worker's answers record the convention and window they were made with; the conversation shows it
    under each answer ("Seen as ..."), and it is what the preview said before the run."""
    harness, module, widget, volume = assistant_panel
    display = volume.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(400.0, 40.0)
    preview = widget.ui.taskPreprocessingLabel.text.splitlines()
    report_line = next(line for line in preview if line.startswith("Report, Ask"))
    assert report_line.startswith("Report, Ask, Multiple choice, Find similar: m3d-cap-v2:")
    assert report_line.endswith("window display (Slicer) 40/400")
    entry = run_task(harness, widget, "report")
    assert entry.status == "done" and entry.used == "m3d-cap-v2, window display (Slicer) 40/400"
    assert "Seen as m3d-cap-v2, window display (Slicer) 40/400" in widget.ui.conversationView.toPlainText()

    segment_line = next(line for line in preview if "Segment:" in line)
    assert "m3d-seg-v1" in segment_line and segment_line.endswith("window percentile")
    typed(widget.ui.promptComboBox.lineEdit(), "liver")
    entry = run_task(harness, widget, "segment")
    assert entry.status == "done" and entry.used.startswith("m3d-seg-v1, window percentile ["), entry.used
    assert f"Seen as {entry.used}" in widget.ui.conversationView.toPlainText()


def test_check_installation_in_the_panels_worker(assistant_panel, tmp_path):
    """Check installation with the panel's own worker (started by the check): the check's steps on the progress bar,
    Cancel mid-check, then a whole check: the verdict, the table in Details, the report saved where the user says in
    the file dialog (Qt asks before replacing a file; closing the dialog saves nothing). The tiny model's random
    answers give a real, unscored report: what is checked holds for any verdict."""
    harness, module, widget, volume = assistant_panel
    import qt

    from M3DAssistantLib.panel import STAGE_LABELS
    from M3DAssistantLib.selfcheck import format_report

    ui = widget.ui
    assert ui.checkInstallationButton.enabled and not ui.saveCheckReportButton.enabled  # no report to save yet
    seen = []

    def watched(condition):
        def check():
            seen.append((ui.statusLabel.text, ui.progressBar.value))
            return condition()
        return check

    ui.checkInstallationButton.click()
    assert ui.checkInstallationButton.text == "Cancel check" and ui.checkInstallationButton.enabled
    assert ui.checkInstallationLabel.text.startswith("Checking the installation on the bundled CT")
    assert not any(button.enabled for button in widget._taskButtons.values())  # no task meanwhile
    checking = STAGE_LABELS["selfcheck"] + ": "
    harness.waitFor(watched(lambda: ui.statusLabel.text.startswith(checking + "segment")), 180, "the check's steps")
    ui.checkInstallationButton.click()  # Cancel check
    assert ui.checkInstallationLabel.text == "Cancelling the check..."
    harness.waitFor(lambda: widget._checking is None, 120, "the cancel")
    assert ui.checkInstallationLabel.text == "Check cancelled." and ui.checkInstallationButton.text == \
        "Check installation"
    assert not ui.saveCheckReportButton.enabled and all(b.enabled for b in widget._taskButtons.values())
    worker = widget.logic.workerProcess()
    assert worker.ready and worker.restarts == 0  # cancelling stops the check, not the worker
    assert widget.logic.progressCallback == widget._stream.put_progress  # tasks' progress shown again

    seen.clear()
    ui.checkInstallationButton.click()
    harness.waitFor(watched(lambda: widget._checking is None), 400, "the installation check")
    report = widget.logic.lastSelfCheck
    assert report is not None and report.model["source"] == widget._parameterNode.modelSource
    assert f"Installation check: {report.verdict.upper()}</b>" in ui.checkInstallationLabel.text
    assert ui.outputTextEdit.plainText == format_report(report)  # the table, in Advanced > Details
    assert ui.progressBar.value == 100 and ui.saveCheckReportButton.enabled
    texts = [text for text, _ in seen if text]
    assert any(text.startswith(checking + "plane question") for text in texts)
    # the bar is the whole check: the answers' token counts are not shown, the check's fraction only grows
    assert not any(text.startswith(STAGE_LABELS["generate"]) for text in texts), texts
    fractions = [value for text, value in seen if text.startswith(checking)]
    assert fractions == sorted(fractions) and fractions[-1] > 50
    assert (worker.pid, worker.restarts) == (widget.logic.workerProcess().pid, 0)

    # Save report...: the user types a file name in the dialog
    target = tmp_path / "check.json"
    harness.dialogs.queue(str(target))
    harness.click(ui.saveCheckReportButton)
    assert harness.dialogs.shown[-1]["class"] == "QFileDialog"
    saved = json.loads(target.read_text())
    assert saved == json.loads(json.dumps(report.to_dict())) and saved["schema"] == "m3d-selfcheck"
    assert ui.statusLabel.text == f"Saved the installation check report to {target}"
    # the same name again: Qt asks before replacing it; the user says yes
    target.write_text("{}")
    harness.dialogs.queue(str(target), qt.QMessageBox.Yes)
    harness.click(ui.saveCheckReportButton)
    assert "already exists" in harness.dialogs.shown[-1]["text"]
    assert json.loads(target.read_text()) == saved
    # the user closes the dialog: nothing is written
    target.write_text("{}")
    harness.dialogs.queue(qt.QDialog.Rejected)
    harness.click(ui.saveCheckReportButton)
    assert target.read_text() == "{}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_check_installation_that_cannot_run_says_why(slicer_harness):
    """A check that cannot start (no server token) is refused at once with what to enter; one whose server does not
    answer fails in the background and says why in the panel (and in a dialog outside testing mode); nothing is
    left running and there is no report to save."""
    import qt

    harness = slicer_harness
    module = harness.loadModule("M3DAssistant")
    widget = harness.openModule("M3DAssistant")
    ui = widget.ui
    chosen(ui.runOnComboBox, module.RUN_REMOTE)
    url = f"http://127.0.0.1:{closed_port()}"
    typed(ui.serverUrlLineEdit, url)

    ui.checkInstallationButton.click()
    (_, error), = harness.slotErrors  # Slicer's tryWithErrorDisplay shows the message and re-raises
    assert isinstance(error, ValueError) and "Enter the remote server's token" in str(error)
    harness.slotErrors.clear()
    assert widget._checking is None and ui.checkInstallationButton.text == "Check installation"
    assert widget.logic.progressCallback == widget._stream.put_progress
    assert ui.checkInstallationLabel.text == ""

    typed(ui.serverTokenLineEdit, "a-token")
    ui.checkInstallationButton.click()
    assert ui.checkInstallationButton.text == "Cancel check"
    harness.waitFor(lambda: widget._checking is None, 120, "the failed check")
    assert ui.checkInstallationLabel.text.startswith("The check could not run: "), ui.checkInstallationLabel.text
    assert "127.0.0.1" in ui.checkInstallationLabel.text + ui.outputTextEdit.plainText
    assert ui.outputTextEdit.plainText and ui.progressBar.value == 0  # the details
    assert not ui.saveCheckReportButton.enabled and ui.checkInstallationButton.text == "Check installation"

    harness.app.setTestingEnabled(False)
    harness.dialogs.queue(qt.QMessageBox.Ok)
    ui.checkInstallationButton.click()
    harness.waitFor(lambda: widget._checking is None and harness.dialogs.shown, 120, "the error dialog")
    assert harness.dialogs.shown[-1]["title"].strip() == "M3D Assistant"  # Slicer pads dialog titles
    assert ui.checkInstallationLabel.text.startswith("The check could not run: ")
    harness.app.setTestingEnabled(True)
