"""The M3D Training panel as a user drives it, on real Qt widgets (``Testing/helpers/slicer_harness``).

The user exports the annotated scene (the bundled CT with a liver segment and a report), picks a preset, chooses the
CPU in the GPU list, starts a job — a fake trainer that writes progress as the real one does (the real trainer needs
the official model and a GPU) — watches the progress and the loss curve from the panel's timer, cancels, reopens
the module (Slicer restarted: the running job is shown again), resumes, evaluates predictions and hands the result
to M3D Assistant. Helper processes (GPU query, memory estimate, evaluation, merge) run for real.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from fake_trainer import FAKE_TRAINING_PYTHON, executable, panel_scene

pytestmark = [pytest.mark.slicer, pytest.mark.skipif(sys.platform == "win32", reason="fake tools are POSIX scripts")]

NVIDIA_SMI_SAMPLE = "NVIDIA GeForce RTX 4090, 24564 MiB\nNVIDIA RTX A6000, 49140 MiB\n"


def chosen(combo, text: str) -> None:
    index = combo.findText(text)
    assert index >= 0, text
    combo.setCurrentIndex(index)
    combo.activated.emit(index)


@pytest.fixture
def training_panel(slicer_harness, tmp_path, monkeypatch, ct_path):
    """The M3D Training panel opened on the annotated scene, with a fake nvidia-smi (two GPUs) on PATH and the fake
    training Python in the panel's Training Python setting."""
    harness = slicer_harness
    tools = tmp_path / "bin"
    tools.mkdir()
    executable(tools / "nvidia-smi", f"#!/bin/sh\nprintf '{NVIDIA_SMI_SAMPLE}'\n")
    monkeypatch.setenv("PATH", f"{tools}:{__import__('os').environ['PATH']}")
    panel_scene(harness, ct_path)
    module = harness.loadModule("M3DTraining")
    harness.loadModule("M3DAssistant")
    widget = harness.openModule("M3DTraining")
    harness.waitFor(lambda: widget.ui.gpuListWidget.count == 2, 60, "the GPU list")
    python = executable(tmp_path / "training-python", FAKE_TRAINING_PYTHON.format(python=sys.executable))
    widget.ui.pythonPathLineEdit.currentPath = python
    yield harness, module, widget
    widget.logic.cancelHelpers()
    if widget.logic.jobState() == "running":
        widget.logic.cancelTraining()


def test_export_preset_gpus_and_memory(training_panel, tmp_path):
    harness, module, widget = training_panel
    import qt

    from M3DTrainingLib.panel_config import PRESET_OFFICIAL, PRESET_ONE_GPU, SOURCE_SCENE_FILES

    p = widget._parameterNode
    assert [widget.ui.gpuListWidget.item(i).text() for i in range(2)] == [
        "GPU 0: NVIDIA GeForce RTX 4090 (24.0 GiB)", "GPU 1: NVIDIA RTX A6000 (48.0 GiB)"]
    assert widget.ui.gpuStatusLabel.text == "2 GPU(s) found with nvidia-smi"
    assert p.gpus == "0" and widget.ui.gpuListWidget.item(0).checkState() == qt.Qt.Checked  # the first GPU

    # Export the current scene: the validation report is shown, the dataset summarised, an output folder suggested
    widget.ui.validationFractionSpinBox.value = 0.0
    widget.ui.datasetFolderPathLineEdit.currentPath = str(tmp_path / "dataset")
    assert "no dataset yet" in widget.ui.datasetSummaryLabel.text
    harness.click(widget.ui.exportButton)
    report = widget.ui.exportReportTextEdit.plainText
    assert "seg" in report and "report" in report, report
    assert widget.ui.datasetSummaryLabel.text.startswith("Samples (training + validation):")
    assert widget.ui.outputFolderPathLineEdit.currentPath == str(tmp_path / "dataset-finetuned")
    assert widget.ui.progressBar.value == 1000 or widget.ui.jobStatusLabel.text

    # The official preset fills the hyperparameters and warns that it does not fit GPU 0 (24 GB)
    chosen(widget.ui.presetComboBox, PRESET_OFFICIAL)
    assert (p.preset, widget.ui.batchSizeSpinBox.value) == (PRESET_OFFICIAL, p.batchSize)
    assert "GPU 0 (NVIDIA GeForce RTX 4090) has 24.0 GiB" in widget.ui.memoryLabel.text
    widget.ui.gpuListWidget.item(0).setCheckState(qt.Qt.Unchecked)
    widget.ui.gpuListWidget.item(1).setCheckState(qt.Qt.Checked)  # the 48 GB GPU
    assert p.gpus == "1" and "has 24.0 GiB" not in widget.ui.memoryLabel.text
    chosen(widget.ui.presetComboBox, PRESET_ONE_GPU)
    assert p.batchSize == widget.ui.batchSizeSpinBox.value and p.preset == PRESET_ONE_GPU

    # Estimate memory runs `m3d train --estimate-only` in the training Python (here the fake prints 30 GiB)
    harness.click(widget.ui.estimateMemoryButton)
    assert not widget.ui.estimateMemoryButton.enabled
    harness.waitFor(lambda: widget.ui.estimateMemoryButton.enabled, 60, "the estimate")
    assert "total          30.00 GiB" in widget.ui.estimateDetailsTextEdit.plainText
    assert "about 30.0 GiB (estimated for these settings)" in widget.ui.memoryLabel.text

    # Scene files instead of the current scene: the field and its button are enabled, Add... appends files
    chosen(widget.ui.exportSourceComboBox, SOURCE_SCENE_FILES)
    assert widget.ui.sceneFilesLineEdit.enabled and widget.ui.addSceneFilesButton.enabled
    picked = [str(tmp_path / "a.mrb"), str(tmp_path / "b.mrb")]
    original = qt.QFileDialog.getOpenFileNames
    qt.QFileDialog.getOpenFileNames = staticmethod(lambda *args: picked)  # what the user picked in the dialog
    try:
        harness.click(widget.ui.addSceneFilesButton)
        harness.click(widget.ui.addSceneFilesButton)  # the same files again: listed once
    finally:
        qt.QFileDialog.getOpenFileNames = original
    assert p.sceneFiles == ";".join(picked) == widget.ui.sceneFilesLineEdit.text
    harness.click(widget.ui.exportButton)  # they do not exist: the error says so, the panel stays usable
    (_, error), = harness.slotErrors
    assert "do not exist" in str(error)
    harness.slotErrors.clear()

    # The base model from a folder
    original = qt.QFileDialog.getExistingDirectory
    qt.QFileDialog.getExistingDirectory = staticmethod(lambda *args: str(tmp_path))
    try:
        harness.click(widget.ui.browseBaseModelButton)
    finally:
        qt.QFileDialog.getExistingDirectory = original
    assert p.baseModel == str(tmp_path) == widget.ui.baseModelLineEdit.text


def test_train_watch_cancel_reopen_resume_evaluate_and_use(training_panel, tmp_path, tiny_phi3):
    harness, module, widget = training_panel
    import qt
    import slicer

    p = widget._parameterNode
    widget.ui.validationFractionSpinBox.value = 0.0
    widget.ui.datasetFolderPathLineEdit.currentPath = str(tmp_path / "dataset")
    harness.click(widget.ui.exportButton)
    output = Path(widget.ui.outputFolderPathLineEdit.currentPath)
    widget.ui.gpuListWidget.item(0).setCheckState(qt.Qt.Unchecked)  # no GPU ticked: the CPU
    assert p.gpus == "cpu" and "runs on the CPU" in widget.ui.memoryLabel.text
    assert widget.ui.startButton.text == "Start training" and not widget.ui.resumeButton.enabled

    # The memory warning asks first: Cancel starts nothing
    harness.app.setTestingEnabled(False)
    harness.dialogs.queue(qt.QMessageBox.Cancel)
    harness.click(widget.ui.startButton)
    assert "runs on the CPU" in harness.dialogs.shown[-1]["text"] and widget.logic.job is None
    output.mkdir()
    (output / "hold").write_text("")  # the fake trainer waits after step 3
    harness.dialogs.queue(qt.QMessageBox.Ok)
    harness.click(widget.ui.startButton)
    harness.app.setTestingEnabled(True)
    assert widget.logic.jobState() == "running", widget.ui.jobStatusLabel.text
    assert widget.ui.startButton.text == "Cancel training" and widget.ui.showLossCurveButton.enabled

    # The panel's timer reads the progress: status, progress bar, loss curve table
    harness.waitFor(lambda: "loss 3.3333" in widget.ui.jobStatusLabel.text, 60, "step 3 in the status")
    assert widget.ui.progressBar.value == 500  # 3 of 6 steps
    table = widget.logic.lossNodes.table
    assert table.GetNumberOfRows() == 3 and float(table.GetCellText(2, 1)) == pytest.approx(10.0 / 3, abs=1e-4)
    harness.click(widget.ui.showLossCurveButton)
    harness.click(widget.ui.openOutputFolderButton)
    assert harness.urls.opened == [str(output)]

    # Slicer restarts while the job runs: a new scene, a new panel; the job is found again and shown running
    panel = harness.panel("M3DTraining")
    panel.self().exit()
    panel.self().cleanup()
    slicer.mrmlScene.Clear(0)
    reopened = harness.app.moduleManager().module("M3DTraining").createNewWidgetRepresentation().self()
    reopened.parent._entered = True
    reopened.enter()
    assert reopened.logic.jobState() == "running"
    assert reopened.ui.outputFolderPathLineEdit.currentPath == str(output)
    assert reopened.ui.startButton.text == "Cancel training"
    harness.waitFor(lambda: "loss 3.3333" in reopened.ui.jobStatusLabel.text, 30, "the job's status")

    # Cancel keeps the checkpoints; the user is asked first (No keeps it running)
    harness.app.setTestingEnabled(False)
    harness.dialogs.queue(qt.QMessageBox.No)
    harness.click(reopened.ui.startButton)
    assert reopened.logic.jobState() == "running"
    harness.dialogs.queue(qt.QMessageBox.Yes)
    harness.click(reopened.ui.startButton)
    harness.app.setTestingEnabled(True)
    assert reopened.logic.jobState() == "cancelled" and reopened.ui.resumeButton.enabled
    assert "Cancelled" in reopened.ui.jobStatusLabel.text and reopened.ui.startButton.text == "Start training"

    # Resume continues from the newest checkpoint to the end
    (output / "hold").unlink()
    harness.click(reopened.ui.resumeButton)
    harness.waitFor(lambda: reopened.logic.jobState() == "completed", 60, "the job to complete")
    assert "Completed: finished 6 steps" in reopened.ui.jobStatusLabel.text
    assert reopened.ui.progressBar.value == 1000 and not reopened.ui.resumeButton.enabled
    assert reopened.ui.useInAssistantButton.enabled  # the adapter is there

    # Evaluate predictions: the helper computes the metrics, the panel shows them
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"task": "vqa_closed", "prediction": "B. Spleen", "answer_choice": "B"}]))
    original = qt.QFileDialog.getOpenFileName
    qt.QFileDialog.getOpenFileName = staticmethod(lambda *args: str(predictions))
    try:
        harness.click(reopened.ui.evaluateButton)
    finally:
        qt.QFileDialog.getOpenFileName = original
    assert reopened.ui.evaluationTextEdit.plainText.startswith("Evaluating")
    harness.waitFor(lambda: "accuracy" in reopened.ui.evaluationTextEdit.plainText, 120, "the evaluation")

    # Use in M3D Assistant: the adapter must be merged first (asked); the merge of this fake adapter fails and the
    # error is shown
    harness.app.setTestingEnabled(False)
    harness.dialogs.queue(qt.QMessageBox.Ok, qt.QMessageBox.Ok)
    shown = len(harness.dialogs.shown)
    harness.click(reopened.ui.useInAssistantButton)
    harness.waitFor(lambda: len(harness.dialogs.shown) == shown + 2, 300, "the merge to fail")
    harness.app.setTestingEnabled(True)
    assert "Merge the fine-tuned adapter" in harness.dialogs.shown[-2]["text"]
    assert harness.dialogs.shown[-1]["text"] == "The merge failed." and harness.dialogs.shown[-1]["detailedText"]
    assert reopened.ui.useInAssistantButton.enabled and not (output / "merged" / "config.json").exists()
    # a merged model (copied here) is used directly: M3D Assistant opens with it
    shutil.copytree(tiny_phi3, output / "merged")
    reopened._updateJobDisplay()
    harness.click(reopened.ui.useInAssistantButton)
    assistant = harness.panel("M3DAssistant").self()
    assert harness.panel("M3DAssistant").isEntered
    assistant_module = harness.app.moduleManager().module("M3DAssistant").pythonModule
    assert assistant._parameterNode.modelChoice == assistant_module.MODEL_ADAPTER
    assert assistant.ui.modelSourceLineEdit.text == str(output)
    reopened.cleanup()
