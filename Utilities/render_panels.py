"""Render the M3D Assistant and M3D Training panels offscreen to PNGs (the pictures in README.md).

The panels are the real modules on real Qt widgets under the test harness (``Testing/helpers/slicer_harness``), with the
bundled CT loaded; three states each:

* M3D Assistant: ready (with what each task will see); answering (the Report button is Cancel, the answer streams
  in); with results (a conversation with what each answer was shown, a new segment with its numbers and evidence,
  the evidence map's slice ranges listed, an ROI). The answers, their token probabilities and the evidence map are
  placeholders written by this script (a scripted backend, no model runs): the pictures show the panel, not what
  M3D-LaMed says. What is computed is real: each task's preprocessing of the CT (the "Seen as" lines) and the
  placeholder mask's measurements on the CT.
* M3D Training: the dataset exported; a job training (a fake trainer writes progress as the real one does); the job
  finished with an evaluation shown.

Usage: ``python Utilities/render_panels.py [--out docs/images]`` (needs the test extra: PySide6, slicer-core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "Testing" / "helpers"), str(REPO / "M3DAssistant"), str(REPO / "M3DTraining")]
CT = REPO / "Testing" / "Data" / "totalsegmentator" / "example_ct_sm.nii.gz"
WIDTH = 500
PLACEHOLDER = "(placeholder answer written by the render script, not model output)"


def placeholder_evidence(mask, mapping, steps: int):
    """An evidence map that is a smooth blob around the placeholder mask's centre on the model grid (not an
    attribution: no model runs here), with its slice ranges found by the real ``relevant_ranges``."""
    import numpy as np

    from M3DAssistantLib.evidence import relevant_ranges
    from M3DAssistantLib.results import EvidenceMap

    d, h, w = mapping.model_shape
    grid = np.stack(np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 3)
    ras = (np.c_[grid, np.ones(len(grid))] @ mapping.model_to_ras.T)[:, :3]
    k, j, i = np.argwhere(mask).mean(axis=0)
    centre = (mapping.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]
    values = np.exp(-((ras - centre) ** 2).sum(axis=1) / (2 * 30.0 ** 2)).reshape(d, h, w).astype(np.float32)
    return EvidenceMap(method="placeholder", steps=steps, model_values=values, mapping=mapping, answer_logprob=0.0,
                       baseline_logprob=0.0, attribution_sum=float(values.sum()),
                       ranges=relevant_ranges(values, mapping))


class ScriptedBackend:
    """The engine's task methods with fixed placeholder answers; ``report`` streams and can be held mid-answer. Each
    answer's provenance is what the engine would record: the task's real preprocessing of the CT (convention and
    window); a mask gets its box and measurements as the engine computes them."""

    hold = threading.Event()

    def __init__(self, config):
        self.config, self.on_progress = config, None
        self.worker = type("Status", (), {"status_text": staticmethod(lambda: "scripted answers (no model)"),
                                          "ready": True, "poll": lambda self: None})()

    def set_volume(self, array, ijk_to_ras, window=None, roi=None, display_window=None, modality=None):
        self.array, self.ijk_to_ras, self.window = array, ijk_to_ras, window
        self.set_display(display_window, modality)

    def set_display(self, display_window=None, modality=None):
        self.display_window, self.modality = display_window, modality

    def _shown(self, key: str):
        """The model input's mapping for a task, prepared as the engine prepares it."""
        from M3DAssistantLib.geometry import to_model_input
        from M3DAssistantLib.tasks import TASKS

        plan = TASKS[key].preprocessing(self.ijk_to_ras, window=self.window, display_window=self.display_window,
                                        modality=self.modality,
                                        value_range=(float(self.array.min()), float(self.array.max())))
        return to_model_input(self.array, self.ijk_to_ras, window=plan.window, convention=plan.convention)[1]

    def _prov(self, task: str, mapping):
        from M3DAssistantLib.results import Provenance

        return Provenance(task=task, model="render script", model_revision=None, dtype="-", device="-", prompt="",
                          convention=f"{mapping.convention}@v{mapping.version}", intensity=repr(mapping.intensity))

    def report(self, sampling=None, on_text=None, analysis=None):
        from M3DAssistantLib.progress import ProgressEvent
        from M3DAssistantLib.results import TextResult

        provenance = self._prov("report", self._shown("report"))
        text = f"The liver, spleen and kidneys are shown {PLACEHOLDER}."
        words = text.split(" ")
        for index, word in enumerate(words):
            if on_text:
                on_text(word + " ")
            if self.on_progress:
                self.on_progress(ProgressEvent("generate", (index + 1) / 40, f"{index + 1} tokens"))
            if index == 5:
                ScriptedBackend.hold.wait(30)
        return TextResult(text, provenance)

    def ask(self, question, history=(), sampling=None, on_text=None, analysis=None):
        from M3DAssistantLib.results import Confidence, TextResult, TokenProbability

        text = f" Yes, mildly {PLACEHOLDER}."
        confidence = None
        if analysis is not None and analysis.confidence:  # placeholder probabilities: "mildly" marked as unsure
            pieces = text.split(" ")[1:]
            tokens = [TokenProbability(n, " " + piece, 0.18 if piece == "mildly" else 0.92)
                      for n, piece in enumerate(pieces)]
            confidence = Confidence(tokens, sum(math.log(t.probability) for t in tokens) / len(tokens))
        return TextResult(text, self._prov("vqa_open", self._shown("ask")), confidence=confidence)

    def segment(self, target, sampling=None, on_text=None, analysis=None):
        import numpy as np

        from M3DAssistantLib.measurements import describe_mask
        from M3DAssistantLib.results import SegmentationResult

        mapping = self._shown("segment")
        mask = np.zeros(self.array.shape, np.uint8)
        k, j, i = self.array.shape
        mask[k // 3:2 * k // 3, j // 3:j // 2, i // 2:3 * i // 4] = 1
        result = SegmentationResult("It is [SEG].", target, mask, self._prov("seg", mapping))
        describe_mask(result, self.array, self.ijk_to_ras, mapping, units="HU")
        if analysis is not None and analysis.evidence:
            result.evidence = placeholder_evidence(mask, mapping, analysis.evidence_steps)
        return result

    def locate(self, expression, sampling=None, on_text=None, analysis=None):
        from M3DAssistantLib.geometry import RasRoi
        from M3DAssistantLib.results import BoxResult

        return BoxResult("[0.3,0.3,0.5,0.6,0.5,0.8]", expression, (0.3, 0.3, 0.5, 0.6, 0.5, 0.8),
                         RasRoi((0.0, 0.0, 0.0), (60.0, 50.0, 40.0)), self._prov("rec", self._shown("locate")))

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

    # The user turns on the evidence map and the mask's box, asks, segments and locates
    widget.ui.evidenceCheckBox.click()
    widget.ui.maskRoiCheckBox.click()
    widget.ui.evidenceStepsSpinBox.value = 1
    for key, prompt in (("ask", "Is the liver enlarged?"), ("segment", "liver"), ("locate", "left kidney")):
        widget.ui.promptComboBox.setEditText(prompt)
        getattr(widget.ui, TASKS[key].button).click()
        harness.waitFor(lambda: widget._running is None, 60, key)
    failed = [(e.task, e.answer) for e in entries if e.status != "done"]
    if failed:
        raise RuntimeError(f"answers failed in the panel: {failed}")
    if not widget.ui.evidenceRangesList.count:
        raise RuntimeError("the evidence list is empty")
    harness.clickItem(widget.ui.evidenceRangesList, 0)  # the user goes to the first range
    widget.ui.modelCollapsibleButton.collapsed = True  # set up once: the user folds the model section away
    widget.ui.conversationView.setMinimumHeight(440)
    paths.append(harness.grab(panel, out / "assistant-results.png", WIDTH))
    widget.cleanup()
    return paths


def render_training(harness, out: Path, work: Path) -> list[Path]:
    from fake_trainer import FAKE_TRAINING_PYTHON, executable, panel_scene

    panel_scene(harness, CT)

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
