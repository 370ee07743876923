"""What the panel shows about fidelity (issue #11): before a run, what each task will see (convention, plane and
window, following the volume, the window choice and the window/level); after it, the convention and window each
answer used; and the Check installation button (verdict, details, saved report). The Logic's ``taskPreprocessing``
agrees with what the engine then records in the provenance.

The widget runs on the stand-in Qt widgets of ``test_assistant_module`` (its real ``setup()``, real MRML)."""

from __future__ import annotations

import ast
import json
import time
import types

import numpy as np
import pytest
from test_assistant_module import AllTasksBackend, QtStandIn, assistant, widget  # noqa: F401  (fixtures)

from M3DAssistantLib import panel, selfcheck, tasks
from M3DAssistantLib.errors import CancelledError, M3DError
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
        mapping = ast.literal_eval(used.intensity)  # the engine's record of the window it used
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


# ------------------------------------------------------------------------------------------------------ the widget
class ProvenanceBackend(AllTasksBackend):
    """AllTasksBackend whose answers say what they were shown, as the engine's do."""

    def report(self, sampling=None, on_text=None):
        record = repr({"scheme": "window", "name": "display (Slicer)", "center": 40.0, "width": 400.0, "low": -160.0,
                       "high": 240.0})
        return self._answer("report", TextResult("No findings.", provenance("m3d-cap-v2@v1", record)), on_text)


class Recorder:
    """A stand-in widget that remembers what was set on it."""

    def __init__(self):
        self.calls = []
        self.text = ""
        self.value = 0

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def test_the_preview_follows_volume_window_choice_and_window_level(widget):  # noqa: F811 (fixture)
    observed = []
    widget.addObserver = lambda node, event, method: observed.append((node.GetName(), event))
    node = coronal_node()
    widget._parameterNode.inputVolume = node
    widget._updateButtonStates()
    import slicer

    assert observed == [("coronal CT", slicer.vtkMRMLDisplayableNode.DisplayModifiedEvent)]
    text = widget.ui.taskPreprocessingLabel.text
    assert text.startswith("What the model will see:")
    assert "Report, Ask, Multiple choice, Find similar: m3d-cap-v2: coronal slices" in text
    assert "display (Slicer) 40/400" in text and "Segment by description: m3d-refseg-v1" in text
    node.GetDisplayNode().SetWindowLevel(1500.0, -600.0)
    widget._onInputDisplayModified()  # what the observer calls
    assert "display (Slicer) -600/1500" in widget.ui.taskPreprocessingLabel.text
    widget._parameterNode.windowPreset = "Bone"
    widget._updateButtonStates()
    assert widget.ui.taskPreprocessingLabel.text.count("window bone 400/1000") == 3
    widget._parameterNode.inputVolume = None
    widget._updateButtonStates()
    assert widget.ui.taskPreprocessingLabel.text == ""


def test_each_answer_says_what_the_model_was_shown(widget):  # noqa: F811 (fixture)
    widget.logic._backendFactory = ProvenanceBackend
    node = coronal_node()
    widget._parameterNode.inputVolume = node
    widget.ui.promptComboBox.currentText = ""
    widget.ui.reportButton.slots[0][1]()
    deadline = time.monotonic() + 10
    while widget._running is not None and time.monotonic() < deadline:
        time.sleep(0.01)
        widget._onTimer()
    entry = widget._conversation.entries(node.GetID())[-1]
    assert entry.status == "done" and entry.used == "m3d-cap-v2, window display (Slicer) 40/400"
    assert "Seen as m3d-cap-v2, window display (Slicer) 40/400" in widget._conversation.to_html(node.GetID())


class CheckingBackend(AllTasksBackend):
    """A server backend whose installation check answers ``outcome`` (a report or an exception), after ``release``."""

    outcome = None

    def __init__(self, config):
        super().__init__(config)
        import threading

        self.release, self.cancelled = threading.Event(), False

    def selfcheck(self, **options):
        self.calls.append(("selfcheck", options))
        if self.on_progress is not None:
            from M3DAssistantLib.progress import ProgressEvent

            self.on_progress(ProgressEvent("selfcheck", 0.5, "segment liver"))
            self.on_progress(ProgressEvent("generate", 0.1, "3 tokens"))  # not shown: the bar is the whole check
        self.release.wait(10)
        if self.cancelled:
            raise CancelledError("cancelled")
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True
        self.release.set()


def _run_check(panel_widget, release=True):
    panel_widget.ui.checkInstallationButton.slots[0][1]()  # click
    assert panel_widget._checking is not None and panel_widget.ui.checkInstallationButton.text == "Cancel check"
    assert not any(getattr(panel_widget.ui, t.button).enabled for t in tasks.TASKS.values())  # no task meanwhile
    shown = []
    panel_widget._showProgress = shown.append
    if release:
        panel_widget.logic._backend.release.set()
    deadline = time.monotonic() + 10
    while panel_widget._checking is not None and time.monotonic() < deadline:
        time.sleep(0.01)
        panel_widget._onTimer()
    return shown


def test_check_installation_shows_the_verdict_and_saves_the_report(widget, assistant, monkeypatch,  # noqa: F811
                                                                  tmp_path):
    CheckingBackend.outcome = _report()
    widget.logic._backendFactory = CheckingBackend
    widget.ui.outputTextEdit = Recorder()
    widget._parameterNode.inputVolume = coronal_node()
    shown = _run_check(widget)
    assert [e.stage for e in shown] == ["selfcheck"]
    assert "Installation check: PASS" in widget.ui.checkInstallationLabel.text
    assert widget.ui.outputTextEdit.calls[-1][0] == "setPlainText"
    assert "verdict: PASS" in widget.ui.outputTextEdit.calls[-1][1]  # the table, in Advanced > Details
    assert widget.ui.checkInstallationButton.text == "Check installation" and widget.ui.saveCheckReportButton.enabled
    assert widget.logic.lastSelfCheck is CheckingBackend.outcome
    assert widget.logic._backend.calls[-1] == ("selfcheck", {"conventions": "default", "max_new_tokens": 64,
                                                             "structures": None})

    target = tmp_path / "check.json"
    monkeypatch.setattr(assistant.qt, "QFileDialog", types.SimpleNamespace(
        getSaveFileName=lambda *args: str(target)), raising=False)
    widget.onSaveCheckReportButton()
    saved = json.loads(target.read_text())
    assert saved["schema"] == "m3d-selfcheck" and saved["verdict"] == "pass"
    monkeypatch.setattr(assistant.qt, "QFileDialog", types.SimpleNamespace(getSaveFileName=lambda *args: ""),
                        raising=False)
    widget.onSaveCheckReportButton()  # the user closed the dialog: nothing happens
    assert json.loads(target.read_text()) == saved


def test_check_installation_cancelled_or_failed_says_so(widget):  # noqa: F811 (fixture)
    CheckingBackend.outcome = M3DError("the worker could not start: no module named torch")
    widget.logic._backendFactory = CheckingBackend
    widget.ui.outputTextEdit = Recorder()
    _run_check(widget)
    assert widget.ui.checkInstallationLabel.text.startswith("The check could not run: the worker could not start")
    assert not widget.ui.saveCheckReportButton.enabled  # no report to save

    widget.logic._backend.release.clear()  # the next check waits until it is cancelled
    widget.ui.checkInstallationButton.slots[0][1]()  # start ...
    widget.ui.checkInstallationButton.slots[0][1]()  # ... and press it again: cancel
    assert widget.ui.checkInstallationLabel.text == "Cancelling the check..."
    deadline = time.monotonic() + 10
    while widget._checking is not None and time.monotonic() < deadline:
        time.sleep(0.01)
        widget._onTimer()
    assert widget.ui.checkInstallationLabel.text == "Check cancelled."
    assert widget.ui.checkInstallationButton.text == "Check installation"


def test_the_preview_starts_no_model(widget):  # noqa: F811 (fixture)
    """Showing what each task will see reads the node's geometry and display only: no session, no worker."""
    widget._parameterNode.inputVolume = coronal_node()
    widget._updateButtonStates()
    assert "m3d-cap-v2" in widget.ui.taskPreprocessingLabel.text and widget.logic._backend is None
