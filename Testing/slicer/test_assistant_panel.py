"""The M3D Assistant panel as a user drives it, on real Qt widgets (``Testing/helpers/slicer_harness``), with the real
worker.

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
from panel_user import chosen, press_enter, run_task, typed, volume_center

pytestmark = pytest.mark.slicer


def test_every_task_from_its_button_with_the_real_worker(assistant_panel, tmp_path):
    harness, module, widget, volume = assistant_panel
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


FORCED = {"report": " No acute findings in the abdomen.",
          "locate": " Coordinates are <bx_start>[0.2, 0.3, 0.3, 0.6, 0.7, 0.7]<bx_end>.",
          "segment": " It is [SEG].", "segment_expression": " Sure, it is [SEG]."}


def test_results_become_nodes_with_forced_answers(assistant_panel, tmp_path):
    """The forced twin of the flow above: the worker (started by the module through the Worker Python setting, here
    the forcing launcher) answers with a box and [SEG], so the ROI, the segments and the text node appear; the user's
    own segment is never touched."""
    harness, module, widget, volume = assistant_panel
    import numpy as np
    import slicer
    from forcing import write_worker_launcher

    answers = tmp_path / "answer.txt"
    widget.ui.pythonPathLineEdit.currentPath = write_worker_launcher(tmp_path, answers)
    widget.ui.maxNewTokensSpinBox.value = 64  # room for the forced answers
    user = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    user.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    user_segment = user.GetSegmentation().AddEmptySegment("liver", "liver")
    mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    mask[10:12, 20:30, 20:30] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, user, user_segment, volume)
    widget.ui.outputSegmentationSelector.selectByName("my segmentation")

    answers.write_text(FORCED["report"])
    entry = run_task(harness, widget, "report")
    assert entry.status == "done" and "No acute findings in the abdomen." in entry.answer
    text_node = slicer.mrmlScene.GetFirstNodeByName("CT M3D report")
    assert text_node is not None and "No acute findings in the abdomen." in text_node.GetText()

    answers.write_text(FORCED["locate"])
    typed(widget.ui.promptComboBox.lineEdit(), "liver")
    entry = run_task(harness, widget, "locate")
    rois = [n for n in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")]
    assert entry.status == "done" and len(rois) == 1 and rois[0].GetName().startswith("liver"), entry
    assert "ROI" in entry.answer
    center = [0.0] * 3
    rois[0].GetCenterWorld(center)  # the slice views (Red, Yellow, Green) are centered on the new box
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 3
    for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        slice_to_ras = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLSliceNode").GetSliceToRAS()
        np.testing.assert_allclose([slice_to_ras.GetElement(i, 3) for i in range(3)], center, atol=1e-3)

    for key in ("segment", "segment_expression"):
        answers.write_text(FORCED[key])
        typed(widget.ui.promptComboBox.lineEdit(), "liver")
        entry = run_task(harness, widget, key)
        assert entry.status == "done" and "added to 'my segmentation'" in entry.answer, entry
    assert user.GetSegmentation().GetNumberOfSegments() == 3  # two new segments next to the user's
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(user, user_segment, volume), mask)
    assert widget._parameterNode.outputSegmentation is user

    # without a chosen segmentation the first mask makes a new one, which is then chosen for the next
    widget.ui.outputSegmentationSelector.selectByName("Create new segmentation")
    answers.write_text(FORCED["segment"])
    typed(widget.ui.promptComboBox.lineEdit(), "spleen")
    run_task(harness, widget, "segment")
    created = widget._parameterNode.outputSegmentation
    assert created is not None and created is not user and created.GetSegmentation().GetNumberOfSegments() == 1
    assert widget.ui.outputSegmentationSelector.currentNode() is created


def test_cancel_mid_answer_failures_and_the_worker_buttons(assistant_panel, tmp_path):
    harness, module, widget, volume = assistant_panel
    from M3DAssistantLib.tasks import TASKS

    # A long answer: the Report button turns into Cancel; pressing it mid-stream stops the answer, not the worker
    widget.ui.maxNewTokensSpinBox.value = 1024
    report = TASKS["report"]
    button = getattr(widget.ui, report.button)
    button.click()
    entry = widget._conversation.entries(volume.GetID())[-1]
    harness.waitFor(lambda: len(entry.answer) > 0, 120, "the answer to stream")
    assert button.text == "Cancel" and entry.answer in widget.ui.conversationView.toPlainText()
    button.click()
    assert widget.ui.statusLabel.text == "Cancelling..."
    harness.waitFor(lambda: button.text == report.label, 60, "the cancel")
    assert entry.status == "cancelled" and widget.ui.statusLabel.text == "Cancelled."
    assert "(cancelled)" in widget.ui.conversationView.toPlainText()
    worker = widget.logic.workerProcess()
    assert worker.ready and worker.restarts == 0

    # Stop frees the worker; the next request starts it again
    widget.ui.stopWorkerButton.click()
    assert worker.poll().value == "stopped" and "not running" in widget.ui.workerStatusLabel.text
    widget.ui.maxNewTokensSpinBox.value = 4
    assert run_task(harness, widget, "report").status == "done"
    assert widget.logic.workerProcess().ready

    # A task that fails in the worker: the error is in the panel (status, details, conversation), nothing escapes
    typed(widget.ui.clipModelLineEdit, str(tmp_path / "no M3D-CLIP here"))
    press_enter(widget.ui.clipModelLineEdit)
    typed(widget.ui.promptComboBox.lineEdit(), "an abdominal CT")
    entry = run_task(harness, widget, "find_similar")
    assert entry.status == "failed" and widget.ui.statusLabel.text.startswith("Failed: ")
    assert "no M3D-CLIP here" in entry.answer or "no M3D-CLIP here" in widget.ui.outputTextEdit.plainText
    assert widget.ui.outputTextEdit.plainText  # the details (worker log or traceback)
    assert harness.slotErrors == []

    # Outside testing mode the user also gets the error dialog
    import qt

    harness.app.setTestingEnabled(False)
    harness.dialogs.queue(qt.QMessageBox.Ok)
    typed(widget.ui.promptComboBox.lineEdit(), "an abdominal CT")
    entry = run_task(harness, widget, "find_similar")
    harness.waitFor(lambda: harness.dialogs.shown, 10, "the error dialog")
    assert "no M3D-CLIP here" in harness.dialogs.shown[-1]["text"]
    assert entry.status == "failed" and "M3D Assistant" in harness.dialogs.shown[-1]["title"]
    harness.app.setTestingEnabled(True)


def test_input_errors_volumes_conversations_scene_close_and_leaving(assistant_panel, tmp_path):
    harness, module, widget, volume = assistant_panel
    import qt
    import slicer

    from M3DAssistantLib.errors import InputError

    # A task without its input: the error says what to type (Slicer's tryWithErrorDisplay shows and re-raises it)
    typed(widget.ui.promptComboBox.lineEdit(), "   ")
    widget.ui.segmentButton.click()
    assert widget.ui.segmentButton.text == "Segment" and widget._running is None
    (signature, error), = harness.slotErrors
    assert isinstance(error, InputError) and "Segment needs a structure" in str(error)
    harness.slotErrors.clear()
    harness.app.setTestingEnabled(False)
    harness.dialogs.queue(qt.QMessageBox.Ok)
    harness.click(widget.ui.describeRegionButton)  # no ROI chosen
    harness.waitFor(lambda: harness.dialogs.shown, 10, "the error dialog")
    assert "Could not start the task." in harness.dialogs.shown[-1]["text"]
    assert "Choose the ROI to describe" in harness.dialogs.shown[-1]["text"]
    assert [type(e) for _, e in harness.slotErrors] == [InputError]
    harness.slotErrors.clear()
    harness.app.setTestingEnabled(True)

    # A conversation per volume: a second volume starts empty, the first keeps its questions
    typed(widget.ui.promptComboBox.lineEdit(), "Is the liver enlarged?")
    assert run_task(harness, widget, "ask").status == "done"
    import numpy as np

    second = slicer.util.addVolumeFromArray(np.zeros((8, 16, 16), np.int16), name="second CT")
    widget.ui.inputSelector.selectByName("second CT")
    assert widget._parameterNode.inputVolume is second
    assert "No questions about second CT yet" in widget.ui.conversationView.toPlainText()
    widget.ui.inputSelector.selectByName("CT")
    assert "Is the liver enlarged?" in widget.ui.conversationView.toPlainText()
    widget.ui.clearConversationButton.click()
    assert "No questions about CT yet" in widget.ui.conversationView.toPlainText()

    # The panel's choices are in the scene's parameter node; the official model keeps its hub id read-only
    checkpoint = widget._parameterNode.modelSource
    chosen(widget.ui.modelComboBox, module.MODEL_PHI3)
    assert widget.ui.modelSourceLineEdit.text == module.DEFAULT_MODEL_SOURCE
    assert widget.ui.modelSourceLineEdit.readOnly and not widget.ui.browseModelButton.enabled
    chosen(widget.ui.modelComboBox, module.MODEL_FOLDER)
    folder = str(tmp_path)
    harness.dialogs.queue(folder)  # the user picks a folder in the dialog
    harness.click(widget.ui.browseModelButton)
    assert harness.dialogs.shown[-1]["class"] == "QFileDialog"
    assert widget._parameterNode.modelSource == folder == widget.ui.modelSourceLineEdit.text
    harness.dialogs.queue(qt.QDialog.Rejected)  # ... and closes it the next time: nothing changes
    harness.click(widget.ui.browseModelButton)
    assert widget._parameterNode.modelSource == folder
    typed(widget.ui.modelSourceLineEdit, checkpoint)

    # Leaving the module keeps the worker (it is reused when the user comes back); closing the scene cancels nothing
    # that is not running, forgets the conversations and gives the panel a new parameter node
    worker = widget.logic.workerProcess()
    harness.loadModule("M3DTraining")
    harness.openModule("M3DTraining")
    assert not harness.panel("M3DAssistant").isEntered
    harness.openModule("M3DAssistant")
    assert widget.logic.workerProcess() is worker and worker.ready
    typed(widget.ui.promptComboBox.lineEdit(), "Any lesion?")
    assert run_task(harness, widget, "ask").status == "done"
    slicer.mrmlScene.Clear(0)
    assert widget._conversation.entries(volume.GetID()) == []
    assert widget._parameterNode.modelChoice == module.MODEL_PHI3  # the scene's parameter node is reset
    assert widget.ui.inputSelector.currentNode() is None and not widget.ui.reportButton.enabled

    # Closing Slicer (cleanup) stops the worker
    harness.panel("M3DAssistant").self().cleanup()
    assert worker.poll().value == "stopped"


def test_settings_persist_and_remote_server(assistant_panel, tmp_path):
    harness, module, widget, volume = assistant_panel
    import qt
    import trustme

    widget.ui.hfHomePathLineEdit.currentPath = str(tmp_path / "hf")
    assert widget.ui.hubCacheValueLabel.text == str(tmp_path / "hf" / "hub")
    typed(widget.ui.modelRevisionLineEdit, "0123abcd")
    press_enter(widget.ui.modelRevisionLineEdit)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    widget.ui.serverCertificatePathLineEdit.currentPath = str(tmp_path / "ca.pem")

    # Remote server: URL and token fields are enabled, the local worker buttons are not
    chosen(widget.ui.runOnComboBox, module.RUN_REMOTE)
    assert widget.ui.serverUrlLineEdit.enabled and widget.ui.serverTokenLineEdit.enabled
    assert not widget.ui.startWorkerButton.enabled and not widget.ui.inspectModelButton.enabled
    typed(widget.ui.serverUrlLineEdit, "https://127.0.0.1:9")
    typed(widget.ui.serverTokenLineEdit, "a-secret-token")
    assert widget.logic.serverToken == "a-secret-token"
    settings = qt.QSettings()
    assert settings.value("M3DAssistant/serverToken") is None  # in memory only...
    widget.ui.rememberTokenCheckBox.click()
    assert settings.value("M3DAssistant/serverToken") == "a-secret-token"  # ...unless Remember is checked
    for name in widget._parameterNode.parameterNode.GetParameterNames():
        assert "a-secret-token" not in widget._parameterNode.parameterNode.GetParameter(name)
    with pytest.raises(ValueError, match="no local worker"):  # the console's way; the panel's button is disabled
        widget.logic.startWorker()
    assert widget.logic.workerStatus().startswith("Remote server")

    # Every per-computer setting is in QSettings: a new panel (Slicer restarted) shows them again
    assert settings.value("M3DAssistant/hfHome") == str(tmp_path / "hf")
    assert settings.value("M3DAssistant/modelRevision") == "0123abcd"
    assert settings.value("M3DAssistant/serverCaFile") == str(tmp_path / "ca.pem")
    assert settings.value("M3DAssistant/pythonExecutable") == sys.executable
    harness.panel("M3DAssistant").self().cleanup()
    reopened = harness.app.moduleManager().module("M3DAssistant").createNewWidgetRepresentation().self()
    assert reopened.ui.hfHomePathLineEdit.currentPath == str(tmp_path / "hf")
    assert reopened.ui.modelRevisionLineEdit.text == "0123abcd"
    assert reopened.ui.serverCertificatePathLineEdit.currentPath == str(tmp_path / "ca.pem")
    assert reopened.ui.pythonPathLineEdit.currentPath == sys.executable
    assert reopened.ui.serverTokenLineEdit.text == "a-secret-token" and reopened.ui.rememberTokenCheckBox.checked
    assert reopened.ui.runOnComboBox.currentText == module.RUN_REMOTE  # from the scene's parameter node
    reopened.ui.rememberTokenCheckBox.click()
    assert settings.value("M3DAssistant/serverToken") is None
    reopened.cleanup()


def test_inspect_model_shows_the_checkpoint_summary(assistant_panel):
    harness, module, widget, volume = assistant_panel
    widget.ui.inspectModelButton.click()
    summary = json.loads(widget.ui.outputTextEdit.plainText)
    assert summary["will_load"] is True
    widget.ui.modelSourceLineEdit.clear()
    assert not widget.ui.inspectModelButton.enabled  # nothing to inspect


@pytest.mark.parametrize("name", ["M3DAssistant", "M3DTraining"])
def test_the_modules_own_self_tests_pass_under_the_harness(slicer_harness, name):
    """What Slicer's "Reload and Test" runs (``slicer.selfTests[name]``): the module's own Test class, every test,
    M3DAssistant's with a real worker on tiny checkpoints it writes itself."""
    import slicer

    slicer_harness.loadModule(name)
    slicer.selfTests[name]()
