"""Render the M3D Assistant and M3D Training panels offscreen to PNGs (the pictures in README.md).

The panels are the real modules on real Qt widgets under the test harness (``Testing/slicer_harness``), with the
bundled CT loaded; three states each:

* M3D Assistant: ready; answering (the Report button is Cancel, the answer streams in); with results (a
  conversation, a new segment and ROI). The answers are placeholders written by this script (a scripted backend, no
  model runs): the pictures show the panel, not what M3D-LaMed says.
* M3D Training: the dataset exported; a job training (a fake trainer writes progress as the real one does); the job
  finished with an evaluation shown.

Usage: ``python Utilities/render_panels.py [--out docs/images]`` (needs the test extra: PySide6, slicer-core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "Testing"), str(REPO / "M3DAssistant"), str(REPO / "M3DTraining")]
CT = REPO / "Testing" / "Data" / "totalsegmentator" / "example_ct_sm.nii.gz"
WIDTH = 500
PLACEHOLDER = "(placeholder answer written by the render script, not model output)"


class ScriptedBackend:
    """The engine's task methods with fixed placeholder answers; ``report`` streams and can be held mid-answer."""

    hold = threading.Event()

    def __init__(self, config):
        self.config, self.on_progress = config, None
        self.worker = type("Status", (), {"status_text": staticmethod(lambda: "scripted answers (no model)"),
                                          "ready": True, "poll": lambda self: None})()

    def set_volume(self, array, ijk_to_ras, window=None, roi=None):
        self.shape = array.shape

    def _prov(self, task):
        from M3DAssistantLib.results import Provenance

        return Provenance(task=task, model="render script", model_revision=None, dtype="-", device="-", prompt="")

    def report(self, sampling=None, on_text=None):
        from M3DAssistantLib.progress import ProgressEvent
        from M3DAssistantLib.results import TextResult

        text = f"The liver, spleen and kidneys are shown {PLACEHOLDER}."
        words = text.split(" ")
        for index, word in enumerate(words):
            if on_text:
                on_text(word + " ")
            if self.on_progress:
                self.on_progress(ProgressEvent("generate", (index + 1) / 40, f"{index + 1} tokens"))
            if index == 5:
                ScriptedBackend.hold.wait(30)
        return TextResult(text, self._prov("report"))

    def ask(self, question, history=(), sampling=None, on_text=None):
        from M3DAssistantLib.results import TextResult

        return TextResult(f"Yes {PLACEHOLDER}.", self._prov("vqa_open"))

    def segment(self, target, sampling=None, on_text=None):
        import numpy as np

        from M3DAssistantLib.results import SegmentationResult

        mask = np.zeros(self.shape, np.uint8)
        k, j, i = self.shape
        mask[k // 3:2 * k // 3, j // 3:j // 2, i // 2:3 * i // 4] = 1
        return SegmentationResult("It is [SEG].", target, mask, self._prov("seg"))

    def locate(self, expression, sampling=None, on_text=None):
        from M3DAssistantLib.geometry import RasRoi
        from M3DAssistantLib.results import BoxResult

        return BoxResult("[0.3,0.3,0.5,0.6,0.5,0.8]", expression, (0.3, 0.3, 0.5, 0.6, 0.5, 0.8),
                         RasRoi((0.0, 0.0, 0.0), (60.0, 50.0, 40.0)), self._prov("rec"))

    def cancel(self):
        ScriptedBackend.hold.set()

    def close(self):
        pass


def render_assistant(harness, out: Path) -> list[Path]:
    from M3DAssistantLib.settings import MemorySettings
    from M3DAssistantLib.tasks import TASKS

    harness.logics["volumes"].AddArchetypeVolume(str(CT), "CT")
    harness.loadModule("M3DAssistant")
    widget = harness.openModule("M3DAssistant")
    widget.logic._backendFactory = ScriptedBackend
    widget.logic.settings = MemorySettings()
    panel = harness.panel("M3DAssistant")
    # Slicer's module panel is as tall as its window: the conversation gets more room than the panel's size hint
    widget.ui.conversationView.setMinimumHeight(200)
    paths = [harness.grab(panel, out / "assistant-ready.png", WIDTH)]

    ScriptedBackend.hold.clear()
    widget.ui.reportButton.click()
    entries = widget._conversation.entries(widget._parameterNode.inputVolume.GetID())
    harness.waitFor(lambda: len(entries[-1].answer.split()) >= 6, 30, "the streamed words")
    paths.append(harness.grab(panel, out / "assistant-answering.png", WIDTH))
    ScriptedBackend.hold.set()
    harness.waitFor(lambda: widget._running is None, 30, "the report")

    for key, prompt in (("ask", "Is the liver enlarged?"), ("segment", "liver"), ("locate", "left kidney")):
        widget.ui.promptComboBox.setEditText(prompt)
        getattr(widget.ui, TASKS[key].button).click()
        harness.waitFor(lambda: widget._running is None, 30, key)
    paths.append(harness.grab(panel, out / "assistant-results.png", WIDTH))
    widget.cleanup()
    return paths


def render_training(harness, out: Path, work: Path) -> list[Path]:
    import numpy as np
    import slicer
    from test_training_panel import FAKE_TRAINING_PYTHON, executable

    volume = harness.logics["volumes"].AddArchetypeVolume(str(CT), "CT")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
    mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
    mask[tuple(slice(s // 3, 2 * s // 3) for s in mask.shape)] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment, volume)
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", "CT report").SetText("A normal abdominal CT.")

    harness.loadModule("M3DTraining")
    widget = harness.openModule("M3DTraining")
    harness.waitFor(lambda: widget.ui.refreshGpusButton.enabled, 120, "the GPU query")
    widget.ui.pythonPathLineEdit.currentPath = executable(work / "training-python",
                                                          FAKE_TRAINING_PYTHON.format(python=sys.executable))
    widget.ui.validationFractionSpinBox.value = 0.0
    widget.ui.datasetFolderPathLineEdit.currentPath = str(work / "dataset")
    harness.click(widget.ui.exportButton)
    widget.logic.setSelectedGpus([])
    for button in ("hyperparametersCollapsibleButton",):
        getattr(widget.ui, button).collapsed = True
    panel = harness.panel("M3DTraining")
    paths = [harness.grab(panel, out / "training-ready.png", WIDTH)]

    output = Path(widget.ui.outputFolderPathLineEdit.currentPath)
    output.mkdir()
    (output / "hold").write_text("")
    import qt

    harness.app.setTestingEnabled(False)  # the "runs on the CPU" warning asks first: the user answers OK
    harness.dialogs.queue(qt.QMessageBox.Ok)
    harness.click(widget.ui.startButton)
    harness.app.setTestingEnabled(True)
    harness.waitFor(lambda: "loss 3.3333" in widget.ui.jobStatusLabel.text, 60,
                    f"step 3 ({widget.logic.jobState()}: {widget.ui.jobStatusLabel.text})")
    paths.append(harness.grab(panel, out / "training-running.png", WIDTH))

    (output / "hold").unlink()
    harness.waitFor(lambda: widget.logic.jobState() == "completed", 60, "the job")
    predictions = work / "predictions.json"
    predictions.write_text(json.dumps([
        {"task": "vqa_closed", "prediction": "B. Spleen", "answer_choice": "B"},
        {"task": "vqa_closed", "prediction": "A. Liver", "answer_choice": "C"},
        {"task": "report", "prediction": "The liver is normal.", "reference": "The liver is normal in size."}]))
    results = widget.logic.evaluatePredictions(predictions)
    from M3DTrainingLib.evaluation_job import format_evaluation

    widget.ui.evaluationTextEdit.setPlainText(format_evaluation(results))
    widget._updateJobDisplay()
    paths.append(harness.grab(panel, out / "training-finished.png", WIDTH))
    widget.cleanup()
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder for the PNGs")
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    args.out.mkdir(parents=True, exist_ok=True)
    from slicer_harness import make_harness

    with tempfile.TemporaryDirectory(prefix="m3d-panels-") as work:
        paths = []
        for render in (render_assistant, render_training):
            harness = make_harness(settingsFolder=str(Path(work) / f"settings-{render.__name__}"))
            try:
                extra = (Path(work),) if render is render_training else ()
                paths += render(harness, args.out, *extra)
                if harness.slotErrors:
                    raise RuntimeError(f"errors in the panel: {harness.slotErrors}")
            except Exception:
                print(f"errors in the panel: {harness.slotErrors}", file=sys.stderr)
                raise
            finally:
                harness.uninstall()
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
