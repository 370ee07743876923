"""M3D Assistant, the Slicer module: the eight M3D tasks on the current volume (Module, parameter node, Widget,
Logic, Test).

Why this file is long: Slicer's scripted-module template keeps the Module, parameter node, Widget, Logic and self-Test
in one file; the work they do is in M3DAssistantLib.
"""

import functools
import hashlib
import importlib.util
import json
import logging
import re
import shutil
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from M3DAssistantLib.settings import MemorySettings, ModuleSettings  # standard library only

# Nothing heavy is imported here: torch and transformers never load in Slicer's process (the model runs in a worker
# process, see M3DAssistantLib/worker.py). M3DAssistantLib is imported inside the methods that need it, so nothing is
# imported or installed when Slicer starts.

DEFAULT_MODEL_SOURCE = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"

# Choices are stored in the scene as these strings (the combo boxes show them as they are).
MODEL_PHI3 = "M3D-LaMed Phi-3 4B (official)"
MODEL_LLAMA2 = "M3D-LaMed Llama-2 7B (official)"
MODEL_FOLDER = "Local checkpoint folder"
MODEL_ADAPTER = "Fine-tuned model (M3DTraining output)"
MODEL_CHOICES = [MODEL_PHI3, MODEL_LLAMA2, MODEL_FOLDER, MODEL_ADAPTER]
OFFICIAL_MODELS = {MODEL_PHI3: DEFAULT_MODEL_SOURCE, MODEL_LLAMA2: "GoodBaiBai88/M3D-LaMed-Llama-2-7B"}

RUN_AUTO = "This computer (GPU if available)"
RUN_GPU = "This computer, GPU"
RUN_CPU = "This computer, CPU"
RUN_REMOTE = "Remote server"
RUN_CHOICES = [RUN_AUTO, RUN_GPU, RUN_CPU, RUN_REMOTE]
RUN_DEVICES = {RUN_AUTO: None, RUN_GPU: "cuda", RUN_CPU: "cpu"}

WINDOW_DEFAULT = "Model default"
WINDOW_DISPLAY = "As displayed"
WINDOW_CHOICES = [WINDOW_DEFAULT, "Abdomen", "Lung", "Bone", "Brain", WINDOW_DISPLAY]

#
# M3DAssistant
#


class M3DAssistant(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("M3D Assistant")
        self.parent.categories = ["M3D"]
        self.parent.dependencies = []
        self.parent.contributors = ["M3D for 3D Slicer contributors"]
        # _() function marks text as translatable to other languages
        self.parent.helpText = _("""
Ask M3D-LaMed, a 3D medical vision-language model, about a CT volume.
<p>The model's eight tasks:</p>
<ul>
<li><b>Report</b>: writes a radiology-style report of the whole volume.</li>
<li><b>Ask</b>: answers a free-text question about the volume (open visual question answering).</li>
<li><b>Multiple choice</b>: picks one of the given answers to a question (closed visual question answering).</li>
<li><b>Locate</b>: finds a described structure and returns its bounding box, shown as an ROI
(referring expression comprehension).</li>
<li><b>Describe ROI</b>: describes what lies inside a box you draw (referring expression generation).</li>
<li><b>Segment</b>: segments a named structure, such as "liver", as a new segment (semantic segmentation).</li>
<li><b>Segment by description</b>: segments what a sentence describes, such as "the lesion in the right lobe"
(referring expression segmentation).</li>
<li><b>Find similar</b>: ranks volumes and texts by how well they match (image-text retrieval with M3D-CLIP).</li>
</ul>
<p>Pick the volume and the model, type a prompt and press a task button; the answer streams into the conversation
view and results become new nodes (text, ROI, segment) next to the volume. Nothing existing is overwritten.</p>
<p><b>Confidence and evidence</b>: the model's probability of each multiple-choice option, its unsure words
highlighted, a mask's mean probability; on request an evidence map (where in the volume the answer comes from,
overlaid on the volume, with the most relevant slices listed: click one to go there), zoom-in refinement of masks,
the model's own box next to a mask, and the mask's box as an ROI. Every mask comes with its volume (mL), largest
diameters and mean and SD of the values inside (HU for CT). The model
runs in a separate worker process on this computer (started on first use, stopped with <b>Stop</b> or when Slicer
exits), or on a remote server you choose; Slicer stays responsive and <b>Cancel</b> stops an answer.</p>
<p>Each task sees the volume as its training images looked: the line under the task buttons says how (orientation,
plane, intensity window; with "Model default" report and questions use the window/level you see), and each answer
says what it was given. <b>Check installation</b> runs the model on a bundled CT with known anatomy and says whether
its answers are sane.</p>
<p><b>Every output is AI-generated, not for clinical use</b>: it can be wrong, and a qualified reader must review it
before it is used for anything.</p>
<p>From the Python console: <code>logic = slicer.util.getModuleLogic("M3DAssistant")</code>, then
<code>logic.report(volumeNode)</code>, <code>logic.ask(volumeNode, "...")</code>,
<code>logic.segment(volumeNode, "liver")</code>, ...</p>
<p>See the <a href="https://github.com/m3d-slicer/SlicerM3D#m3dassistant">module documentation</a>.</p>
""")
        self.parent.acknowledgementText = _("""
M3D-LaMed and M3D-CLIP are the work of Bai F., Du Y., Huang T., Meng M. Q.-H. and Zhao B.:
"M3D: Advancing 3D Medical Image Analysis with Multi-Modal Large Language Models", arXiv:2404.00578, 2024.
Official code: <a href="https://github.com/BAAI-DCAI/M3D">BAAI-DCAI/M3D</a> (MIT licence).
Model weights: <a href="https://huggingface.co/GoodBaiBai88">GoodBaiBai88</a> on the Hugging Face hub, each under
the licence stated on its model card (and the licence of the language model it is built on).
This extension is MIT licensed; it re-implements the model so that the published checkpoints load as they are.
""")


#
# M3DAssistantParameterNode
#


@parameterNodeWrapper
class M3DAssistantParameterNode:
    """
    The parameters needed by module (saved with the scene; the remote server's token is deliberately not here).

    inputVolume - The volume the model looks at.
    modelChoice - Which model: an official checkpoint, a local folder or a fine-tuned model.
    modelSource - Hugging Face hub id or folder of the checkpoint (set from modelChoice for the official ones).
    runOn - This computer (automatic device, GPU, CPU) or a remote server.
    serverUrl - The remote server's URL (only used with runOn = Remote server).
    windowPreset - Intensity window the model sees.
    cropRoi - Optional ROI to crop the volume to before the model sees it.
    describeRoi - The ROI that "Describe ROI" describes.
    outputSegmentation - Segmentation that gets new segments (None: a new one).
    maxNewTokens - Longest answer, in tokens.
    choices - The options of a multiple-choice question, separated by ";".
    confidence, evidence, evidenceSteps, refine, locate - What to compute beyond the answer (the task registry's
        analysis options, M3DAssistantLib.tasks.OPTIONS); each task uses those it takes.
    maskRoi - Also make a new mask's box an ROI node.
    evidenceOpacity - Opacity of the evidence map overlaid on the volume.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelChoice: Annotated[str, Choice(MODEL_CHOICES)] = MODEL_PHI3
    modelSource: str = DEFAULT_MODEL_SOURCE
    runOn: Annotated[str, Choice(RUN_CHOICES)] = RUN_AUTO
    serverUrl: str = ""
    windowPreset: Annotated[str, Choice(WINDOW_CHOICES)] = WINDOW_DEFAULT
    cropRoi: vtkMRMLMarkupsROINode
    describeRoi: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    maxNewTokens: Annotated[int, WithinRange(1, 1024)] = 256
    choices: str = ""
    confidence: bool = True
    evidence: bool = False
    evidenceSteps: Annotated[int, WithinRange(1, 64)] = 8
    refine: bool = False
    locate: bool = False
    maskRoi: bool = False
    evidenceOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# M3DAssistantWidget
#


class M3DAssistantWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = None  # (task key, TaskRequest, ConversationEntry) while a task runs

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)
        from M3DAssistantLib.panel import ConversationLog, PromptHistory, StreamBuffer
        from M3DAssistantLib.tasks import TASKS

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/M3DAssistant.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets (the .ui connects mrmlSceneChanged to each MRML widget's setMRMLScene).
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = M3DAssistantLogic()
        self._stream = StreamBuffer()  # text and progress from the request's thread, shown by the timer
        self.logic.progressCallback = self._stream.put_progress  # called from the request's thread: queued
        self.logic.messageCallback = self._onWorkerMessage
        self._conversation = ConversationLog()
        self._history = PromptHistory()
        self._shownHtml = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._onTimer)

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons: one per task of the registry, named after it in the .ui (Task.button)
        self._taskButtons = {task.key: getattr(self.ui, task.button) for task in TASKS.values()}
        for key, button in self._taskButtons.items():
            button.text = TASKS[key].label
            button.connect("clicked(bool)", self._taskButtonHandler(key))
        self.ui.promptComboBox.lineEdit().connect("returnPressed()", self.onPromptEntered)
        self.ui.inspectModelButton.connect("clicked(bool)", self.onInspectModelButton)
        self.ui.browseModelButton.connect("clicked(bool)", self.onBrowseModelButton)
        self.ui.startWorkerButton.connect("clicked(bool)", self.onStartWorkerButton)
        self.ui.stopWorkerButton.connect("clicked(bool)", self.onStopWorkerButton)
        self.ui.clearConversationButton.connect("clicked(bool)", self.onClearConversationButton)
        self.ui.checkInstallationButton.connect("clicked(bool)", self.onCheckInstallationButton)
        self.ui.saveCheckReportButton.connect("clicked(bool)", self.onSaveCheckReportButton)
        self._checking = None  # the installation check's request while it runs
        self._selfCheckReport = None  # its last report
        self._observedVolume = None  # the input volume whose display (window/level) the preview follows
        self._evidenceTargets = []  # RAS points of the evidence list's rows
        self.ui.evidenceRangesList.connect("itemClicked(QListWidgetItem*)", self.onEvidenceRangeClicked)

        # Per-computer settings (not in the scene). The token lives in memory unless "Remember" is checked.
        settings = self.logic.settings
        self.ui.pythonPathLineEdit.currentPath = settings.get("pythonExecutable")
        self.ui.hfHomePathLineEdit.currentPath = settings.get("hfHome")
        self.ui.clipModelLineEdit.text = settings.get("clipModel")
        self.ui.serverTokenLineEdit.text = settings.get("serverToken")
        self.ui.rememberTokenCheckBox.checked = bool(settings.get("serverToken"))
        self.logic.serverToken = self.ui.serverTokenLineEdit.text
        self.ui.pythonPathLineEdit.connect("currentPathChanged(QString)",
                                           lambda path: settings.set("pythonExecutable", path))
        self.ui.hfHomePathLineEdit.connect("currentPathChanged(QString)", self.onHfHomeChanged)
        self.ui.clipModelLineEdit.connect("editingFinished()",
                                          lambda: settings.set("clipModel", self.ui.clipModelLineEdit.text.strip()))
        self.ui.serverCertificatePathLineEdit.currentPath = settings.get("serverCaFile")
        self.ui.serverCertificatePathLineEdit.connect("currentPathChanged(QString)",
                                                      lambda path: settings.set("serverCaFile", path))
        self.ui.modelRevisionLineEdit.text = settings.get("modelRevision")
        self.ui.modelRevisionLineEdit.connect("editingFinished()", lambda: settings.set(
            "modelRevision", self.ui.modelRevisionLineEdit.text.strip()))
        self.ui.serverTokenLineEdit.connect("textChanged(QString)", self.onTokenChanged)
        self.ui.rememberTokenCheckBox.connect("toggled(bool)", lambda checked: self.onTokenChanged(
            self.ui.serverTokenLineEdit.text))
        self._updateCacheLabel()

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed: the worker stops with it."""
        self._timer.stop()
        self.removeObservers()
        self._observedVolume = None
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed
        self.initializeParameterNode()
        self._refreshWorkerStatus()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonStates)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore
        if self._running:
            self._running[1].cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        self._conversation.clear()
        self._evidenceTargets = []  # the evidence maps went with the scene: their slice ranges too
        self.ui.evidenceRangesList.clear()
        # If this module is shown while the scene is closed then recreate a new parameter node immediately
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        # Parameter node stores all user choices in parameter values, node selections, etc.
        # so that when the scene is saved and reloaded, these settings are restored.
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.inputVolume:
            images = self.logic.imageVolumes()
            if images:
                self._parameterNode.inputVolume = images[0]

    def setParameterNode(self, inputParameterNode: M3DAssistantParameterNode | None) -> None:
        """
        Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonStates)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonStates)
            self._updateButtonStates()

    # ------------------------------------------------------------------------------------------ GUI state
    def _updateButtonStates(self, caller=None, event=None) -> None:
        """Enable what can be used now; keep the official model's hub id in the model box."""
        p = self._parameterNode
        if not p:
            return
        official = OFFICIAL_MODELS.get(p.modelChoice)
        if official and p.modelSource != official:
            p.modelSource = official  # triggers this method again
            return
        self.ui.modelSourceLineEdit.readOnly = bool(official)
        self.ui.browseModelButton.enabled = not official
        remote = p.runOn == RUN_REMOTE
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit, self.ui.rememberTokenCheckBox):
            widget.enabled = remote
        self.ui.startWorkerButton.enabled = not remote
        self.ui.stopWorkerButton.enabled = not remote
        self.ui.inspectModelButton.enabled = bool(p.modelSource.strip()) and not remote
        running = self._running[0] if self._running else None
        checking = self._checking is not None
        for task, button in self._taskButtons.items():
            if running:
                button.enabled = task == running  # the running task's button is its Cancel button
                continue
            button.enabled = p.inputVolume is not None and not checking
        self.ui.choicesLineEdit.enabled = not running
        self.ui.checkInstallationButton.enabled = not running  # while checking it is the check's Cancel button
        self.ui.checkInstallationButton.text = _("Cancel check") if checking else _("Check installation")
        self.ui.saveCheckReportButton.enabled = self._selfCheckReport is not None and not checking
        self._observeInputVolume(p.inputVolume)
        self._updatePreprocessingLabel()
        self._refreshConversation()
        self._refreshWorkerStatus()

    def _observeInputVolume(self, volume) -> None:
        """Follow the input volume's display node: a new window/level changes what report and VQA will see."""
        if volume is self._observedVolume:
            return
        event = slicer.vtkMRMLDisplayableNode.DisplayModifiedEvent
        if self._observedVolume is not None:
            self.removeObserver(self._observedVolume, event, self._onInputDisplayModified)
        self._observedVolume = volume
        if volume is not None:
            self.addObserver(volume, event, self._onInputDisplayModified)

    def _onInputDisplayModified(self, caller=None, event=None) -> None:
        self._updatePreprocessingLabel()

    def _updatePreprocessingLabel(self) -> None:
        """Under the task buttons: the convention, plane and window each task will use on the input volume."""
        from M3DAssistantLib.panel import preprocessing_summary
        from M3DAssistantLib.tasks import TASKS

        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is None:
            self.ui.taskPreprocessingLabel.text = ""
            return
        try:
            rows = [(task, self.logic.taskPreprocessing(volume, task)) for task in TASKS.values()]
            text = _("What the model will see:") + "\n" + preprocessing_summary(rows)
        except Exception as error:  # a volume the tasks would refuse: say why here too
            text = _("The model cannot read this volume: {error}").format(error=str(error).split("\n")[0])
        self.ui.taskPreprocessingLabel.text = text

    def _setRunning(self, task: str | None) -> None:
        from M3DAssistantLib.tasks import TASKS

        for key, button in self._taskButtons.items():
            button.text = _("Cancel") if key == task else TASKS[key].label
        self._updateButtonStates()

    def _refreshConversation(self) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        html = self._conversation.to_html(volume.GetID() if volume else None, volume.GetName() if volume else "")
        if html != self._shownHtml:
            self._shownHtml = html
            self.ui.conversationView.setHtml(html)
            bar = self.ui.conversationView.verticalScrollBar()
            bar.setValue(bar.maximum)

    def _refreshWorkerStatus(self) -> None:
        self.ui.workerStatusLabel.text = self.logic.workerStatus() if self.logic else ""

    def _updateCacheLabel(self) -> None:
        from M3DAssistantLib.model.download_check import hub_cache_dir

        self.ui.hubCacheValueLabel.text = str(hub_cache_dir(self.logic.settings.get("hfHome") or None))

    def _onWorkerMessage(self, message: str) -> None:
        """A notice from the worker (e.g. it crashed and restarts); any thread, so it is queued."""
        from M3DAssistantLib.progress import ProgressEvent

        self._stream.put_progress(ProgressEvent("load", None, message))

    def _showProgress(self, event) -> None:
        from M3DAssistantLib.panel import progress_text

        text, percent = progress_text(event)
        self.ui.statusLabel.text = text
        if percent is None:
            self.ui.progressBar.setRange(0, 0)  # busy
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = percent

    # ------------------------------------------------------------------------------------------ settings
    def onHfHomeChanged(self, path: str) -> None:
        self.logic.settings.set("hfHome", path.strip())
        self._updateCacheLabel()

    def onTokenChanged(self, token: str) -> None:
        """The token stays in memory; it is saved in the computer's settings only when "Remember" is checked."""
        self.logic.serverToken = token.strip()
        self.logic.settings.set("serverToken", token.strip() if self.ui.rememberTokenCheckBox.checked else "")

    def onBrowseModelButton(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose the model folder"),
                                                     self._parameterNode.modelSource)
        if folder:
            self._parameterNode.modelSource = folder

    # ------------------------------------------------------------------------------------------ tasks
    def _taskButtonHandler(self, task: str):
        """The slot of a task's button (one closure per task)."""
        return lambda: self.onTaskButton(task)

    def onPromptEntered(self) -> None:
        """Enter in the prompt box asks the question; it never cancels (Qt emits returnPressed twice for an editable
        combo box's line edit, and Enter is not the Cancel button)."""
        from M3DAssistantLib.tasks import ASK

        if not self._running:
            self.onTaskButton(ASK.key)

    def onTaskButton(self, task: str) -> None:
        """Start a task, or cancel it when its button (now "Cancel") is pressed while it runs."""
        if self._running:
            if self._running[0] == task:
                self._running[1].cancel()
                self.ui.statusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the task."), waitCursor=True):
            self._startTask(task)

    def _startTask(self, key: str) -> None:
        """Run the task on the panel's volume with the panel's inputs (see ``panel.task_arguments``), in the
        background; the timer shows its text and progress."""
        from M3DAssistantLib.panel import task_arguments
        from M3DAssistantLib.tasks import TASKS, Output

        task = TASKS[key]
        p = self._parameterNode
        volume = p.inputVolume
        if volume is None:
            raise ValueError(_("Select an input volume first."))
        prompt = self.ui.promptComboBox.currentText
        arguments, shown = task_arguments(task, prompt, choices=p.choices, region=p.describeRoi,
                                          candidates=self.logic.imageVolumes())
        self._stream.drain()  # drop what earlier console calls left there
        options = {"wait": False}
        if task.streams:
            options["onText"] = self._stream.put_text
        if task.output is Output.SEGMENT:  # new segments go on into the chosen segmentation
            options["segmentationNode"] = p.outputSegmentation
        request = self.logic.runTask(key, *([volume] if task.on_volume else []), *arguments, **options)
        self._history.add(prompt)
        self._fillPromptHistory()
        entry = self._conversation.start(volume.GetID(), key, shown)
        self._running = (key, request, entry)
        self.ui.statusLabel.text = _("{task}: starting...").format(task=task.label)
        self.ui.progressBar.setRange(0, 0)
        self._setRunning(key)
        self._timer.start()

    def _fillPromptHistory(self) -> None:
        combo = self.ui.promptComboBox
        combo.blockSignals(True)
        combo.clear()
        combo.addItems(self._history.items)
        combo.setCurrentIndex(-1)
        combo.setEditText("")
        combo.blockSignals(False)

    def _onTimer(self) -> None:
        """Main thread, every 100 ms: show streamed text and progress; finish the task when it is done."""
        text, progress = self._stream.drain()
        if self._checking is not None:
            if progress is not None:
                self._showProgress(progress)
            if self._checking.done():
                self._finishCheck()
        elif self._running:
            task, request, entry = self._running
            if text:
                entry.answer += text
                self._refreshConversation()
            if progress is not None:
                self._showProgress(progress)
            if request.done():
                self._finishTask(task, request, entry)
        else:
            starting = self.logic.workerStarting()
            if starting is not None:
                self._showProgress(starting)
            else:
                self._timer.stop()
                self.ui.progressBar.setRange(0, 100)
                self.ui.progressBar.value = 0
                self.ui.statusLabel.text = ""
        self._refreshWorkerStatus()

    def _finishTask(self, task: str, request, entry) -> None:
        from M3DAssistantLib.errors import CancelledError
        from M3DAssistantLib.panel import analysis_html, answer_html, answer_text, typed_result, used_text

        self._timer.stop()
        self._running = None
        self.ui.progressBar.setRange(0, 100)
        try:
            request.result()  # writes the nodes, here on the main thread
            entry.answer, entry.status = answer_text(task, request.output), "done"
            entry.used = used_text(typed_result(task, request.output))  # what the model was shown
            entry.answer_html = answer_html(task, request.output)
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = _("Done. The answer is AI-generated, not for clinical use.")
            statistics = self._showResult(task, request.output)
            entry.details_html = analysis_html(typed_result(task, request.output), statistics)
        except CancelledError:
            entry.status = "cancelled"
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled.")
        except Exception as error:
            entry.status = "failed"
            entry.answer = (entry.answer + "\n" if entry.answer else "") + str(error)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Failed: {message}").format(message=str(error).split("\n")[0][:200])
            details = getattr(error, "log_tail", "") or traceback.format_exc()
            self.ui.outputTextEdit.setPlainText(details)
            logging.error(f"M3D {task} failed: {error}\n{details}")
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(str(error), windowTitle=_("M3D Assistant"), detailedText=details)
        finally:
            self._setRunning(None)

    def _showResult(self, key: str, output):
        """New segments go on into the same segmentation; show the new ROI / segmentation, the evidence map over
        the volume with its most relevant slices listed; a new segment's Segment Statistics where available
        (returned, for the conversation view)."""
        from M3DAssistantLib.analysis_text import evidence_items
        from M3DAssistantLib.panel import typed_result
        from M3DAssistantLib.tasks import TASKS, Output

        shown = TASKS[key].output
        statistics = None
        if shown is Output.SEGMENT and output[0] is not None:
            if self._parameterNode.outputSegmentation is None:
                self._parameterNode.outputSegmentation = output[0]
            output[0].CreateDefaultDisplayNodes()
            statistics = self.logic.segmentStatistics(output[0], output[1], self._parameterNode.inputVolume)
        elif shown is Output.ROI_NODE and output[0] is not None:
            center = [0.0, 0.0, 0.0]
            output[0].GetCenterWorld(center)
            self.logic.jumpTo(center)
        evidenceNode = self.logic.lastNodes.get("evidence")
        if evidenceNode is not None:
            self.logic.showEvidence(evidenceNode, self._parameterNode.inputVolume)
            items = evidence_items(typed_result(key, output).evidence)
            self._evidenceTargets = [point for _, point in items]
            self.ui.evidenceRangesList.clear()
            self.ui.evidenceRangesList.addItems([label for label, _ in items])
        return statistics

    def onEvidenceRangeClicked(self, item) -> None:
        """Jump the slice views to the peak of the evidence range the user clicked (again on every click)."""
        row = self.ui.evidenceRangesList.row(item)
        if 0 <= row < len(self._evidenceTargets):
            self.logic.jumpTo(self._evidenceTargets[row])

    # ------------------------------------------------------------------------------------------ other buttons
    def onStartWorkerButton(self) -> None:
        """Load the model now (in the background), so that the first answer comes faster."""
        with slicer.util.tryWithErrorDisplay(_("Could not start the M3D worker."), waitCursor=True):
            self.logic.startWorker(wait=False)
            self._timer.start()

    def onStopWorkerButton(self) -> None:
        if self._running:
            self._running[1].cancel()
        self.logic.stopWorker()
        self._refreshWorkerStatus()

    def onClearConversationButton(self) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is not None:
            self._conversation.clear(volume.GetID())
            self.logic.clearConversation(volume)
        self._refreshConversation()

    def onCheckInstallationButton(self) -> None:
        """Run the installation check in the worker (in the background), or cancel it while it runs."""
        if self._checking is not None:
            self._checking.cancel()
            self.ui.checkInstallationLabel.text = _("Cancelling the check...")
            return
        if self._running:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the installation check."), waitCursor=True):
            self._stream.drain()
            self.logic.progressCallback = self._putCheckProgress
            try:
                self._checking = self.logic.checkInstallation(wait=False)
            finally:
                if self._checking is None:
                    self.logic.progressCallback = self._stream.put_progress
            self.ui.checkInstallationLabel.text = _("Checking the installation on the bundled CT (the model is "
                                                    "loaded first; a few minutes on a CPU)...")
            self.ui.progressBar.setRange(0, 0)
            self._updateButtonStates()
            self._timer.start()

    def _putCheckProgress(self, event) -> None:
        """Progress during the check (any thread): the check's own steps and the worker's start, not the token count
        of each answer it asks for, so that the bar shows the whole check."""
        if event.stage in ("selfcheck", "load", "download", "upload"):
            self._stream.put_progress(event)

    def _finishCheck(self) -> None:
        from M3DAssistantLib.errors import CancelledError
        from M3DAssistantLib.panel import selfcheck_summary
        from M3DAssistantLib.selfcheck import format_report

        self.logic.progressCallback = self._stream.put_progress
        request, self._checking = self._checking, None
        self._timer.stop()
        self.ui.progressBar.setRange(0, 100)
        try:
            report = request.result()
            self._selfCheckReport = report
            self.ui.checkInstallationLabel.text = selfcheck_summary(report)
            self.ui.outputTextEdit.setPlainText(format_report(report))
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = ""
        except CancelledError:
            self.ui.checkInstallationLabel.text = _("Check cancelled.")
            self.ui.progressBar.value = 0
        except Exception as error:
            details = getattr(error, "log_tail", "") or traceback.format_exc()
            self.ui.checkInstallationLabel.text = _("The check could not run: {message}").format(
                message=str(error).split("\n")[0][:300])
            self.ui.outputTextEdit.setPlainText(details)
            self.ui.progressBar.value = 0
            logging.error(f"M3D installation check failed: {error}\n{details}")
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(str(error), windowTitle=_("M3D Assistant"), detailedText=details)
        finally:
            self._updateButtonStates()

    def onSaveCheckReportButton(self) -> None:
        """Save the last check's JSON report (schema m3d-selfcheck) where the user says."""
        from M3DAssistantLib.outputs import write_json

        if self._selfCheckReport is None:
            return
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Save the installation check report"),
                                              "m3d-selfcheck.json", _("JSON files (*.json)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not save the report."), waitCursor=True):
            write_json(path, self._selfCheckReport.to_dict(), overwrite=True)  # the dialog asked before replacing
            self.ui.statusLabel.text = _("Saved the installation check report to {path}").format(path=path)

    def onInspectModelButton(self) -> None:
        """Show a summary of the chosen checkpoint when user clicks "Inspect model"."""
        self.ui.outputTextEdit.clear()
        with slicer.util.tryWithErrorDisplay(_("Failed to inspect the model."), waitCursor=True):
            summary = self.logic.inspectModel(self._parameterNode.modelSource)
            self.ui.outputTextEdit.setPlainText(self.logic.formatSummary(summary))


#
# M3DAssistantLogic
#


class M3DAssistantLogic(ScriptedLoadableModuleLogic):
    """The eight M3D tasks on Slicer nodes, usable from the Python console without the widget:

    .. code-block:: python

        logic = slicer.util.getModuleLogic("M3DAssistant")
        textNode = logic.report(volumeNode)                          # a new text node with the report
        answer = logic.ask(volumeNode, "Is there a liver lesion?")   # str (the conversation continues)
        roiNode = logic.locate(volumeNode, "liver")                  # a new ROI node (None: nothing found)
        segmentationNode, segmentId = logic.segment(volumeNode, "liver")
        print(logic.lastResult.provenance)                           # the full typed result of the last call

    Every task method blocks until the answer is there (Slicer stays responsive meanwhile), uses the model and
    options of the module panel (its parameter node), and accepts ``window=``, ``roiNode=`` (crop) and
    ``maxNewTokens=`` to override them, and the analysis options the task takes: ``confidence=``, ``evidence=``,
    ``evidenceSteps=``, and for masks ``refine=``, ``locate=`` and ``maskRoi=`` (e.g.
    ``logic.segment(volumeNode, "liver", refine=True, evidence=True)``). Without a window (the panel's "Model
    default") each task sees the volume as its training data did: report, VQA and Find similar in the window/level
    it is displayed with at that moment (and its DICOM Modality), boxes and masks in the M3D-Seg percentiles;
    ``logic.taskPreprocessing(volumeNode, "report").describe()`` says what a task will use,
    ``logic.checkInstallation()`` checks the installation. ``lastResult`` holds the typed result
    (``.confidence``, ``.measurements``, ``.evidence``...), ``lastNodes`` the nodes the analysis made
    (``"evidence"``: the evidence map volume, ``"mask_box"`` / ``"located_box"``: ROI nodes).
    ``callback=f`` makes it return at once and call ``f(value)`` on the main thread when done (``errorCallback=g``
    gets the exception); ``wait=False`` returns a request object to poll (``done()``, ``result()``, ``cancel()``).
    ``onText=f`` receives the answer as it is written (from another thread).

    The model runs in a worker process (``M3DAssistantLib.worker``), started on first use, reused, restarted after a
    crash, and stopped with :meth:`stopWorker` or when Slicer exits. It is a thin layer over
    ``M3DAssistantLib.session.AssistantSession``.

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, inspector: Callable[[str], dict] | None = None, backendFactory: Callable | None = None,
                 settings: Any = None) -> None:
        """Called when the logic class is instantiated.

        :param inspector: function that summarises a checkpoint; default
            ``M3DAssistantLib.model.inspection.inspect_checkpoint``. Tests pass a fake.
        :param backendFactory: ``f(configuration) -> backend`` with the engine's task methods, instead of a worker
            process or a remote server (tests pass a fake).
        :param settings: per-computer settings (the worker's Python, the model cache folder, the M3D-CLIP model, the
            pinned revision, the remote server's certificate, and its token only when the user asked to remember
            it); default :class:`~M3DAssistantLib.settings.ModuleSettings` (QSettings), tests pass ``MemorySettings``.
        """
        ScriptedLoadableModuleLogic.__init__(self)
        self._inspector = inspector
        self._backendFactory = backendFactory
        self.settings = settings if settings is not None else ModuleSettings("M3DAssistant")
        self.serverToken = ""  # the remote server's token: in memory only, never in the scene
        self.interactive = True  # confirmation dialogs (never in testing mode)
        self.lastResult = None  # the full typed result of the last finished task
        self.lastSelfCheck = None  # the SelfCheckReport of the last installation check
        self.lastNodes = {}  # the nodes the last finished task's analysis made: "evidence", "mask_box", "located_box"
        self.progressCallback = None  # receives ProgressEvent, from the request's thread
        self.messageCallback = None  # receives notices such as "the worker crashed; restarting"
        self._session = None
        self._sessionKey = None
        self._backend = None
        self._config = {}
        self._prepared = None  # the configuration whose dependencies and weights were checked
        self._watchers = []

    def getParameterNode(self):
        return M3DAssistantParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------------------ the eight tasks
    def runTask(self, task, *arguments, wait: bool = True, callback=None, errorCallback=None, onText=None,
                name: str | None = None, segmentationNode=None, **options):
        """
        Run any task of the registry (``M3DAssistantLib.tasks``) by name: ``logic.runTask("segment", volumeNode,
        "liver")`` is ``logic.segment(volumeNode, "liver")``. The task methods below are this with their own
        signatures and documentation.
        :param task: the task's key or console name (``"segment_expression"`` or ``"segmentExpression"``), or its
            ``Task``
        :param arguments: the volume node (except for findSimilar), then the task's arguments in order
        :param name: the name of a new text or ROI node; :param segmentationNode: where a new segment goes
        :param options: ``window``, ``roiNode`` (crop), ``maxNewTokens``, and the analysis options the task takes
            (``confidence``, ``evidence``, ``evidenceSteps``, ``refine``, ``locate``, ``maskRoi``); default: the
            module panel's
        :return: what the task's own method returns; ``lastResult`` is the typed result, ``lastNodes`` the nodes
            its analysis made
        """
        from M3DAssistantLib.panel import TaskRequest, api_value, typed_result
        from M3DAssistantLib.tasks import ArgumentKind, Task
        from M3DAssistantLib.tasks import get as getTask

        task = task if isinstance(task, Task) else getTask(task)
        candidates = arguments[0] if task.takes(ArgumentKind.CANDIDATES) else None
        if task.on_volume:
            if not arguments:
                raise TypeError(f"{task.logic_name} needs the volume node first")
            placement = {"name": name, "segmentation_node": segmentationNode}
            kwargs = dict(self._taskOptions(task, arguments[0], options), on_text=onText, **placement)
        else:
            if options or name is not None or segmentationNode is not None:
                raise TypeError(f"{task.logic_name} takes no options (window=, roiNode=, maxNewTokens=, name=)")
            kwargs = {}
        session = self.session()
        self.prepareWorker()

        def finish(output):
            self.lastResult = typed_result(task, output)
            self.lastNodes = dict(session.extra_nodes) if task.on_volume else {}
            return api_value(task, output, candidates)

        request = TaskRequest(task.key, session.run_task(task, *arguments, wait=False, **kwargs), finish)
        return self._deliver(request, wait, callback, errorCallback)

    def _deliver(self, request, wait: bool, callback, errorCallback):
        """The request (``callback``/``errorCallback`` called from a QTimer, or ``wait=False``), else its result once
        done; Slicer keeps drawing while a scripted call waits."""
        if callback is not None or errorCallback is not None:
            self._watch(request, callback, errorCallback)
            return request
        if not wait:
            return request
        app = getattr(slicer, "app", None)
        while not request.wait(0.05):
            if app is not None:
                app.processEvents()  # a scripted call blocks, but Slicer keeps drawing
        return request.result()

    def taskPreprocessing(self, volumeNode, task, **options):
        """
        What a task will show the model for this volume, before it runs (reads no voxels): the orientation
        convention, the volume's plane and the plane of the slices the model sees, and the intensity window. Each
        task's own (report / VQA / retrieval: the window/level the volume is displayed with now; boxes and masks:
        the M3D-Seg intensity percentiles; referring segmentation: M3D-RefSeg's), unless the panel's Intensity window
        (or ``window=``) chooses one for every task. Results record what was used (``lastResult.provenance``).
        :param task: the task's key or console name (``"report"``, ``"segmentExpression"``...), or its ``Task``
        :return: ``TaskPreprocessing``: ``.convention``, ``.volume_plane``, ``.model_plane``, ``.window``,
            ``.describe()`` (one line, as the panel shows it)
        """
        from M3DAssistantLib.scene import volume_display, volume_geometry
        from M3DAssistantLib.tasks import Task
        from M3DAssistantLib.tasks import get as getTask

        unknown = set(options) - {"window"}
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; use window=")
        task = task if isinstance(task, Task) else getTask(task)
        window = options["window"] if "window" in options else self.windowFor(
            volumeNode, self.getParameterNode().windowPreset)
        ijkToRas, valueRange = volume_geometry(volumeNode)
        displayWindow, modality = volume_display(volumeNode)
        return task.preprocessing(ijkToRas, window=window, display_window=displayWindow, modality=modality,
                                  value_range=valueRange)

    def checkInstallation(self, *, conventions: str = "default", maxNewTokens: int = 64, structures=None,
                          wait: bool = True, callback=None, errorCallback=None):
        """
        Check the installation the tasks run on: ``m3d selfcheck`` in the worker (this computer's, started if
        needed, or the remote server) -- segmentation, boxes and "Which plane is this image in?" on the CT with
        ground-truth labels bundled with the extension, scored (Dice, box IoU, side of the body). Slicer's process
        never loads the model: the worker does, and it reuses the model it has loaded.
        :param conventions: ``"default"`` (each task's own orientation) or ``"all"`` (every convention, to compare)
        :param maxNewTokens: answer length (greedy decoding, as M3D-Bench)
        :param structures: names to segment and locate (default liver, spleen, right and left kidney, stomach, aorta)
        :return: a ``SelfCheckReport``: ``.verdict`` ("pass", "inconclusive", "orientation suspect", "poor"),
            ``.message``, ``.passed``, ``.checks``, ``.to_dict()`` / ``.to_json()`` (schema ``m3d-selfcheck``, see
            docs/conventions.md); also ``lastSelfCheck``. ``wait``, ``callback`` and ``errorCallback`` as the tasks.
        """
        from M3DAssistantLib.panel import TaskRequest

        if conventions not in ("default", "all"):
            raise ValueError(f"conventions must be 'default' or 'all', not {conventions!r}")
        session = self.session()
        self.prepareWorker()

        def finish(report):
            self.lastSelfCheck = report
            return report

        pending = session.check_installation(conventions=conventions, max_new_tokens=int(maxNewTokens),
                                             structures=structures, on_progress=self._onProgress, wait=False)
        return self._deliver(TaskRequest("selfcheck", pending, finish), wait, callback, errorCallback)

    def report(self, volumeNode, *, wait: bool = True, callback=None, errorCallback=None, onText=None, **options):
        """
        Write a radiology-style report of the volume.
        :param volumeNode: the CT (``vtkMRMLScalarVolumeNode``)
        :param options: ``window``, ``roiNode`` (crop), ``maxNewTokens``; default: the module panel's
        :return: a new ``vtkMRMLTextNode`` (None when the model wrote nothing); ``lastResult`` is the TextResult
        """
        return self.runTask("report", volumeNode, wait=wait, callback=callback, errorCallback=errorCallback,
                            onText=onText, **options)

    def ask(self, volumeNode, question: str, *, wait: bool = True, callback=None, errorCallback=None, onText=None,
            **options):
        """
        Answer a free-text question about the volume; earlier questions about it are the conversation's context.
        :return: the answer (str); ``lastResult`` is the TextResult
        """
        return self.runTask("ask", volumeNode, question, wait=wait, callback=callback, errorCallback=errorCallback,
                            onText=onText, **options)

    def choose(self, volumeNode, question: str, choices, *, wait: bool = True, callback=None, errorCallback=None,
               onText=None, **options):
        """
        Multiple choice: which of ``choices`` (2 to 8 distinct texts) answers the question.
        :return: the chosen option's text (the raw answer when it names none); ``lastResult`` is the ChoiceResult
        """
        return self.runTask("choose", volumeNode, question, list(choices), wait=wait, callback=callback,
                            errorCallback=errorCallback, onText=onText, **options)

    def locate(self, volumeNode, expression: str, *, name: str | None = None, wait: bool = True, callback=None,
               errorCallback=None, onText=None, **options):
        """
        Find a structure or described region and mark its bounding box.
        :return: a new ``vtkMRMLMarkupsROINode`` in RAS (None when no box came back); ``lastResult`` is the BoxResult
        """
        return self.runTask("locate", volumeNode, expression, name=name, wait=wait, callback=callback,
                            errorCallback=errorCallback, onText=onText, **options)

    def describeRegion(self, volumeNode, roiNode, *, wait: bool = True, callback=None, errorCallback=None,
                       onText=None, **options):
        """
        Describe what lies inside a user-drawn ROI (``vtkMRMLMarkupsROINode``, may be rotated).
        :return: the description (str); ``lastResult`` is the TextResult
        """
        return self.runTask("describeRegion", volumeNode, roiNode, wait=wait, callback=callback,
                            errorCallback=errorCallback, onText=onText, **options)

    def segment(self, volumeNode, target: str, segmentationNode=None, *, wait: bool = True, callback=None,
                errorCallback=None, onText=None, **options):
        """
        Segment a named structure ("liver") as a new segment; existing segments are never replaced.
        :param segmentationNode: where the segment goes (None: a new segmentation node)
        :return: (segmentation node, segment id), or (None, None) when the model gave no mask
        """
        return self.runTask("segment", volumeNode, target, segmentationNode=segmentationNode, wait=wait,
                            callback=callback, errorCallback=errorCallback, onText=onText, **options)

    def segmentExpression(self, volumeNode, expression: str, segmentationNode=None, *, wait: bool = True,
                          callback=None, errorCallback=None, onText=None, **options):
        """
        Segment what a description refers to ("the lesion in the right lobe"); as :meth:`segment`.
        :return: (segmentation node, segment id), or (None, None) when the model gave no mask
        """
        return self.runTask("segmentExpression", volumeNode, expression, segmentationNode=segmentationNode,
                            wait=wait, callback=callback, errorCallback=errorCallback, onText=onText, **options)

    def findSimilar(self, candidates, query, *, wait: bool = True, callback=None, errorCallback=None):
        """
        Rank with M3D-CLIP: volume nodes by a text query, or texts by a volume node query.
        :param candidates: volume nodes (then ``query`` is a text) or texts (then ``query`` is a volume node)
        :return: ``[(candidate, score), ...]``, best first; ``lastResult`` is the RetrievalResult
        """
        return self.runTask("findSimilar", list(candidates), query, wait=wait, callback=callback,
                            errorCallback=errorCallback)

    def imageVolumes(self) -> list:
        """The scene's image volumes: scalar volumes that are not label maps (what M3D can read), in scene order."""
        return [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if not node.IsA("vtkMRMLLabelMapVolumeNode")]

    def cancel(self) -> None:
        """Stop the running task at its next step (the worker keeps running)."""
        if self._session is not None:
            self._session.cancel()

    def clearConversation(self, volumeNode=None) -> None:
        """Forget the questions asked about a volume (all volumes when None)."""
        if self._session is not None:
            self._session.clear_history(volumeNode)

    # ------------------------------------------------------------------------------------------ running
    def _taskOptions(self, task, volumeNode, options: dict) -> dict:
        """The session's keyword arguments: the call's options, else the panel's (its parameter node). The panel's
        analysis options apply to the tasks that take them; one given to a task that does not take it is an error."""
        from M3DAssistantLib.results import AnalysisOptions, SamplingOptions

        analysisNames = {option.logic_name: option.name for option in task.options}
        maskRoi = ["maskRoi"] if task.segments else []
        known = {"window", "roiNode", "maxNewTokens", *analysisNames, *maskRoi}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)} for {task.logic_name}; use "
                            f"{', '.join(name + '=' for name in sorted(known))}")
        p = self.getParameterNode()
        window = options["window"] if "window" in options else self.windowFor(volumeNode, p.windowPreset)
        analysis = AnalysisOptions(**{field: options.get(logicName, getattr(p, logicName))
                                      for logicName, field in analysisNames.items()})
        return {"window": window, "roi_node": options.get("roiNode", p.cropRoi),
                "sampling": SamplingOptions(max_new_tokens=int(options.get("maxNewTokens", p.maxNewTokens))),
                "analysis": analysis, **({"mask_roi": bool(options.get("maskRoi", p.maskRoi))} if maskRoi else {})}

    def showEvidence(self, evidenceNode, volumeNode=None, opacity: float | None = None) -> None:
        """Overlay an evidence map on the slice views (foreground, ``opacity`` default: the panel's) over
        ``volumeNode`` (background); a no-op without a Slicer application (e.g. in scripts)."""
        if getattr(slicer, "app", None) is None or not hasattr(slicer.util, "setSliceViewerLayers"):
            return
        opacity = self.getParameterNode().evidenceOpacity if opacity is None else opacity
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=evidenceNode, foregroundOpacity=opacity)

    def jumpTo(self, rasPoint) -> None:
        """Center the slice views on an RAS point (e.g. an evidence range's peak)."""
        slicer.modules.markups.logic().JumpSlicesToLocation(*[float(v) for v in rasPoint], True)

    def segmentStatistics(self, segmentationNode, segmentId: str, volumeNode) -> dict | None:
        """Slicer's Segment Statistics of one segment on ``volumeNode``: ``{"volume_ml", "mean", "std",
        "feret_diameter_mm", "table"}`` (a new table node with all its measurements), or None where the Segment
        Statistics module is not available (then the result's own measurements, computed the same way, stand)."""
        try:
            import SegmentStatistics
        except ImportError:
            return None
        statisticsLogic = SegmentStatistics.SegmentStatisticsLogic()
        parameters = statisticsLogic.getParameterNode()
        parameters.SetParameter("Segmentation", segmentationNode.GetID())
        parameters.SetParameter("ScalarVolume", volumeNode.GetID())
        parameters.SetParameter("LabelmapSegmentStatisticsPlugin.feret_diameter_mm.enabled", "True")
        statisticsLogic.updateStatisticsForSegment(segmentId)
        statistics = statisticsLogic.getStatistics()
        prefix = "ScalarVolumeSegmentStatisticsPlugin."
        out = {"volume_ml": statistics.get((segmentId, prefix + "volume_cm3")),
               "mean": statistics.get((segmentId, prefix + "mean")),
               "std": statistics.get((segmentId, prefix + "stdev")),
               "feret_diameter_mm": statistics.get((segmentId, "LabelmapSegmentStatisticsPlugin.feret_diameter_mm"))}
        segmentName = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", f"{segmentName} statistics")
        statisticsLogic.exportToTable(table)
        out["table"] = table
        return {key: value for key, value in out.items() if value is not None}

    @staticmethod
    def windowFor(volumeNode, preset: str):
        """The ``window`` argument for a panel preset: None ("Model default": each task's own -- report, VQA and
        Find similar the volume's display window, which the session reads from the node at every request; boxes and
        masks the M3D-Seg percentiles), a preset name, or ("As displayed") the volume's display window as
        (center, width) for every task, boxes and masks included."""
        if preset == WINDOW_DEFAULT:
            return None
        if preset == WINDOW_DISPLAY:
            display = volumeNode.GetDisplayNode() if volumeNode is not None else None
            if display is None or display.GetWindow() <= 0:
                return None
            return (display.GetLevel(), display.GetWindow())
        return preset.lower()

    def _watch(self, request, callback, errorCallback) -> None:
        """Poll a request from a QTimer; call back on the main thread."""
        timer = qt.QTimer()
        timer.setInterval(100)

        def poll():
            if not request.done():
                return
            timer.stop()
            self._watchers.remove(timer)
            try:
                value = request.result()
            except Exception as error:
                if errorCallback is not None:
                    errorCallback(error)
                else:
                    logging.error(f"M3D {request.task} failed: {error}")
                return
            if callback is not None:
                callback(value)

        timer.connect("timeout()", poll)
        self._watchers.append(timer)
        timer.start()

    # ------------------------------------------------------------------------------------------ model, worker
    def modelSource(self, parameterNode=None) -> str:
        """What the worker loads: the official hub id (``id@revision`` when a revision is pinned in the settings), or
        the checked local / fine-tuned model folder."""
        p = parameterNode or self.getParameterNode()
        if p.modelChoice in OFFICIAL_MODELS:
            revision = self.settings.get("modelRevision").strip()
            if revision and not re.fullmatch(r"[\w./-]+", revision):
                raise ValueError(_("The pinned revision must be a branch, tag or commit hash, got '{revision}'.")
                                 .format(revision=revision))
            return OFFICIAL_MODELS[p.modelChoice] + (f"@{revision}" if revision else "")
        source = p.modelSource.strip()
        if not source:
            raise ValueError(_("Choose the model folder first."))
        from M3DAssistantLib.model.checkpoint_files import checkpoint_for_adapter, local_checkpoint

        if p.modelChoice == MODEL_ADAPTER:
            return str(checkpoint_for_adapter(source))
        return str(local_checkpoint(source))

    def workerPython(self) -> str:
        """The Python that runs the local worker: the setting, else Slicer's own (PythonSlicer)."""
        return self.settings.get("pythonExecutable") or shutil.which("PythonSlicer") or sys.executable

    def configuration(self) -> dict:
        """Where and what the model runs, from the parameter node and the computer's settings."""
        p = self.getParameterNode()
        if p.runOn == RUN_REMOTE:
            url = p.serverUrl.strip()
            if not url:
                raise ValueError(_("Enter the remote server's URL (for example http://127.0.0.1:8765)."))
            return {"remote": True, "url": url, "token": self.serverToken or self.settings.get("serverToken"),
                    "caFile": self.settings.get("serverCaFile") or None}
        return {"remote": False, "model": self.modelSource(p), "device": RUN_DEVICES.get(p.runOn),
                "python": self.workerPython(), "hfHome": self.settings.get("hfHome") or None,
                "clipModel": self.settings.get("clipModel") or None}

    def session(self):
        """The AssistantSession for the current configuration (a new one, and a new worker, when it changed)."""
        config = self.configuration()
        key = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        if self._session is None or key != self._sessionKey:
            self.shutdown()
            from M3DAssistantLib.session import AssistantSession

            self._backend = self._createBackend(config)
            self._session = AssistantSession(self._backend)
            self._sessionKey = key
            self._config = config
        self._backend.on_progress = self._onProgress
        return self._session

    def _createBackend(self, config: dict):
        if self._backendFactory is not None:
            return self._backendFactory(config)
        from M3DAssistantLib.backends import ClientBackend, LocalWorkerBackend
        from M3DAssistantLib.worker import WorkerProcess

        if config["remote"]:
            from M3DAssistantLib.serving.client import M3DClient

            if not config["token"]:
                raise ValueError(_("Enter the remote server's token (it is kept in memory only, unless you check "
                                   "Remember)."))
            return ClientBackend(M3DClient(config["url"], config["token"], ca_file=config["caFile"]))
        from M3DAssistantLib.model.download_check import worker_environment

        worker = WorkerProcess(config["python"], config["model"], device=config["device"],
                               clip_model=config["clipModel"], env=worker_environment(config["hfHome"]),
                               on_message=self._onMessage)
        return LocalWorkerBackend(worker)

    def workerProcess(self):
        """The local WorkerProcess (None for a remote server or before the first use)."""
        return getattr(self._backend, "worker", None)

    def prepareWorker(self) -> None:
        """Before a local worker first starts: the Python packages it needs (one confirmation) and room for the
        weights (a disk-space check before any download). Once per configuration."""
        config = self._config
        if config["remote"] or self._backendFactory is not None or self._prepared == self._sessionKey:
            return
        self.setupPythonRequirements()  # another Python is only checked: it manages its own packages
        self.checkWeights(config["model"], config["hfHome"])
        self._prepared = self._sessionKey

    def startWorker(self, wait: bool = False) -> None:
        """Start the local worker (load the model) now instead of on the first request."""
        self.session()
        self.prepareWorker()
        worker = self.workerProcess()
        if worker is None:
            raise ValueError(_("The model runs on a remote server; there is no local worker to start."))
        worker.start(wait=wait)

    def workerStarting(self):
        """What a starting local worker is doing (a ProgressEvent), or None when it is not starting."""
        from M3DAssistantLib.worker import WorkerState

        worker = self.workerProcess()
        if worker is None or worker.poll() is not WorkerState.STARTING:
            return None
        return worker.startup_progress()

    def workerStatus(self) -> str:
        worker = self.workerProcess()
        if worker is not None:  # the panel's label already says "Worker:"
            return worker.status_text()
        if self._backend is not None:
            from M3DAssistantLib.serving.trust import plain_http_warning

            url = self._config.get("url", "")
            status = _("Remote server: {url}").format(url=url)
            if plain_http_warning(url):  # the token and the images would travel in clear
                status += " " + _("WARNING: plain http to another machine, not encrypted (use https or an SSH "
                                  "tunnel; see the Python console)")
            return status
        return _("not running (starts on the first request)")

    def stopWorker(self) -> None:
        """Stop the local worker (its whole process tree; GPU memory is freed). The next request starts it again."""
        worker = self.workerProcess()
        if worker is not None:
            worker.stop()

    def shutdown(self) -> None:
        """Forget the session and stop its worker (called when the model or where it runs changes)."""
        if self._backend is not None:
            try:
                self._backend.close()
            finally:
                self._backend = self._session = self._sessionKey = None

    def _onProgress(self, event) -> None:
        if self.progressCallback is not None:
            self.progressCallback(event)

    def _onMessage(self, message: str) -> None:
        if self.messageCallback is not None:
            self.messageCallback(message)

    # ------------------------------------------------------------------------------------------ dependencies
    def _testing(self) -> bool:
        app = getattr(slicer, "app", None)
        return app is not None and app.testingEnabled()

    def pythonDependencies(self, config: dict | None = None):
        """
        What the worker's Python needs (``M3DAssistantLib.dependencies``, packages from
        Resources/Requirements/M3DAssistant.txt): nothing for a remote server, a check of the Worker Python setting's
        Python (never changed), else Slicer's own Python, installed after one confirmation.
        """
        from M3DAssistantLib.dependencies import ASSISTANT_REQUIREMENTS, dependencies_for, read_requirements

        config = config or self.configuration()
        return dependencies_for(
            self.settings.get("pythonExecutable") or None, read_requirements(ASSISTANT_REQUIREMENTS),
            remote=config["remote"], setting=_("Worker Python"), requester="M3D Assistant",
            purpose=_("M3D Assistant runs the model in a separate Python process, which needs these Python packages "
                      "in Slicer's Python environment"),
            declined=_("Installation declined: the local worker cannot run without these packages (or choose a remote "
                       "server)."),
            ask=self.interactive)

    def setupPythonRequirements(self) -> None:
        """
        Make sure the worker's Python has what it needs. Slicer's own: installed after ONE confirmation listing it
        all, torch through the PyTorch extension (the build for this computer's GPU), the rest with
        ``slicer.packaging.pip_ensure``; Slicer's own numpy and SimpleITK are never replaced, and nothing is installed
        in testing mode (a missing package is then an error). Another Python is checked, not changed.
        """
        self.pythonDependencies(self._config).ensure()

    def checkWeights(self, source: str, hfHome: str | None = None) -> None:
        """Before a download: where it goes, how big it is, and whether the disk has room (raises if not); asks
        once when interactive."""
        from M3DAssistantLib.errors import CancelledError
        from M3DAssistantLib.model.download_check import weights_status
        from M3DAssistantLib.units import format_bytes

        status = weights_status(source, hfHome)
        logging.info(f"M3D model: {status.describe()}")
        if not status.needs_download or not self.interactive or self._testing():
            return
        message = _("{model} is not on this computer yet. It will be downloaded from the Hugging Face hub ({size}) "
                    "into {cache} ({free} free); its progress shows in the panel. Continue?").format(
            model=source, size=format_bytes(status.download_bytes), cache=status.cache_dir,
            free=format_bytes(status.free_bytes))
        if not slicer.util.confirmOkCancelDisplay(message, windowTitle=_("M3D Assistant: download the model")):
            raise CancelledError(_("Download declined. Choose a local checkpoint folder instead."))

    # ------------------------------------------------------------------------------------------ inspect
    def inspectModel(self, source: str) -> dict:
        """
        Summarise an M3D-LaMed checkpoint from its config and weight index, without loading the weights.
        Can be used without GUI widget.
        :param source: Hugging Face hub id (e.g. ``GoodBaiBai88/M3D-LaMed-Phi-3-4B``) or local checkpoint folder
        :return: the summary as a dictionary (variant, sizes, data type, special tokens, whether it will load)
        """
        source = (source or "").strip()
        if not source:
            raise ValueError(_("No model given. Enter a Hugging Face model id such as {model} or a local "
                               "checkpoint folder.").format(model=DEFAULT_MODEL_SOURCE))
        inspector = self._inspector
        if inspector is None:
            # Imported here, not at module load: reads only config.json, the weight index and the tokenizer's JSON
            # files; compare_with_model=False keeps torch out of Slicer's process.
            from M3DAssistantLib.model.inspection import inspect_checkpoint

            inspector = functools.partial(inspect_checkpoint, compare_with_model=False)
        logging.info(f"Inspecting model {source}")
        summary = inspector(source)
        if not isinstance(summary, dict):
            raise TypeError(f"Checkpoint inspection returned {type(summary).__name__}, expected a dict")
        return summary

    @staticmethod
    def formatSummary(summary: dict) -> str:
        """
        Text for the output box: the summary as indented JSON.
        :param summary: dictionary returned by :meth:`inspectModel`
        """
        return json.dumps(summary, indent=2, default=str, ensure_ascii=False)


#
# M3DAssistantTest
#


class M3DAssistantTest(ScriptedLoadableModuleTest):
    """
    This is the test case for your scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_ParameterNode()
        self.setUp()
        self.test_InspectModel()
        self.setUp()
        self.test_TasksWithFakeBackend()
        self.setUp()
        self.test_FullFlowWithTinyCheckpoint()

    def test_ParameterNode(self):
        """The parameter node has the default model and stores the chosen volume and model in the scene."""
        self.delayDisplay("Starting the parameter node test")
        logic = M3DAssistantLogic()
        parameterNode = logic.getParameterNode()
        self.assertEqual(parameterNode.modelSource, DEFAULT_MODEL_SOURCE)
        self.assertEqual(parameterNode.modelChoice, MODEL_PHI3)
        self.assertIsNone(parameterNode.inputVolume)

        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "M3DAssistantTestVolume")
        parameterNode.inputVolume = volumeNode
        parameterNode.modelChoice = MODEL_FOLDER
        parameterNode.modelSource = "/data/checkpoints/my-m3d"
        parameterNode.runOn = RUN_REMOTE
        parameterNode.serverUrl = "http://gpu-box:8765"
        storedNode = logic.getParameterNode()  # a new wrapper over the same MRML node
        self.assertEqual(storedNode.inputVolume.GetID(), volumeNode.GetID())
        self.assertEqual(storedNode.modelSource, "/data/checkpoints/my-m3d")
        self.assertEqual(storedNode.runOn, RUN_REMOTE)
        self.assertEqual(parameterNode.parameterNode.GetParameter("modelSource"), "/data/checkpoints/my-m3d")
        logic.serverToken = "secret-token-not-for-the-scene"
        for name in parameterNode.parameterNode.GetParameterNames():
            self.assertNotIn("secret-token", parameterNode.parameterNode.GetParameter(name))
        self.delayDisplay("Test passed")

    def test_InspectModel(self):
        """inspectModel strips the source, passes it to the inspector and returns its dictionary."""
        self.delayDisplay("Starting the inspect model test")
        calls = []

        def fakeInspector(source):
            calls.append(source)
            return {"model_type": "lamed_phi3", "will_load": True}

        logic = M3DAssistantLogic(inspector=fakeInspector)
        summary = logic.inspectModel("  GoodBaiBai88/M3D-LaMed-Phi-3-4B \n")
        self.assertEqual(calls, ["GoodBaiBai88/M3D-LaMed-Phi-3-4B"])
        self.assertEqual(summary, {"model_type": "lamed_phi3", "will_load": True})
        self.assertIn('"model_type": "lamed_phi3"', logic.formatSummary(summary))
        with self.assertRaises(ValueError):
            logic.inspectModel("   ")
        self.assertEqual(len(calls), 1)
        self.delayDisplay("Test passed")

    def _ctVolume(self, name="M3DAssistantTestCT"):
        import numpy as np

        array = np.random.default_rng(0).normal(40, 80, size=(24, 48, 40)).clip(-1000, 1000).astype(np.int16)
        ijkToRas = np.diag([-0.8, -0.8, 2.5, 1.0])
        return slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRas, name=name)

    def _userNodes(self, volumeNode):
        """Nodes a user already has, named as M3D would name its outputs: none may change."""
        import numpy as np

        text = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTextNode", f"{volumeNode.GetName()} M3D report")
        text.SetText("my own notes")
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "liver")
        roi.SetCenter(0.0, 0.0, 20.0)
        roi.SetSize(10.0, 10.0, 10.0)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
        mask = np.zeros(slicer.util.arrayFromVolume(volumeNode).shape, np.uint8)
        mask[5:10, 10:20, 10:20] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segmentId, volumeNode)
        return text, roi, segmentation, segmentId, mask

    def _assertUserNodesUnchanged(self, userNodes, volumeNode):
        import numpy as np

        text, roi, segmentation, segmentId, mask = userNodes
        self.assertEqual(text.GetText(), "my own notes")
        self.assertEqual(text.GetName(), f"{volumeNode.GetName()} M3D report")
        self.assertEqual(roi.GetName(), "liver")
        self.assertEqual(list(roi.GetSize()), [10.0, 10.0, 10.0])
        segment = segmentation.GetSegmentation().GetSegment(segmentId)
        self.assertEqual(segment.GetName(), "liver")
        np.testing.assert_array_equal(
            slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volumeNode), mask)

    def test_TasksWithFakeBackend(self):
        """All eight console methods return the documented types, keep the typed result, and never overwrite."""
        self.delayDisplay("Starting the console API test (fake model)")
        import numpy as np

        from M3DAssistantLib.geometry import RasRoi
        from M3DAssistantLib.results import (
            BoxResult,
            ChoiceResult,
            Provenance,
            RetrievalResult,
            SegmentationResult,
            TextResult,
        )

        volume = self._ctVolume()
        shape = slicer.util.arrayFromVolume(volume).shape
        userNodes = self._userNodes(volume)

        def prov(task):
            return Provenance(task=task, model="fake", model_revision=None, dtype="float32", device="cpu", prompt="")

        class FakeBackend:
            """The engine's task methods with fixed answers: a box, a mask, a choice."""

            def __init__(self, config):
                self.config, self.volumes, self.on_progress = config, 0, None

            def set_volume(self, array, ijkToRas, window=None, roi=None, display_window=None, modality=None):
                self.volumes += 1

            def set_display(self, display_window=None, modality=None):
                pass

            def report(self, sampling=None, on_text=None):
                on_text and on_text("No acute findings.")
                return TextResult("No acute findings.", prov("report"))

            def ask(self, question, history=(), sampling=None, on_text=None):
                return TextResult(f"answer {len(history)}", prov("vqa_open"))

            def choose(self, question, choices, sampling=None, on_text=None):
                return ChoiceResult("C. Sagittal", list(choices), "C", choices[2], prov("vqa_closed"))

            def locate(self, expression, sampling=None, on_text=None):
                return BoxResult("<box>", expression, (0.1, 0.1, 0.1, 0.5, 0.5, 0.5),
                                 RasRoi((-5.0, -6.0, 20.0), (8.0, 9.0, 10.0)), prov("rec"))

            def describe_region(self, roi, sampling=None, on_text=None):
                return TextResult("A kidney.", prov("reg"))

            def segment(self, target, sampling=None, on_text=None):
                mask = np.zeros(shape, np.uint8)
                mask[2:6, 4:9, 4:9] = 1
                return SegmentationResult("It is [SEG].", target, mask, prov("seg"))

            def segment_expression(self, expression, sampling=None, on_text=None):
                return SegmentationResult("No.", expression, None, prov("refseg"), absent=True)

            def retrieve(self, texts=None, text=None, volumes=None, labels=None, display_windows=None,
                         modalities=None):
                names = labels or texts
                return RetrievalResult(text or "volume", [(i, n, 1.0 - i / 10) for i, n in
                                                          reversed(list(enumerate(names)))], prov("retrieval"))

            def cancel(self):
                pass

            def close(self):
                self.closed = True

        logic = M3DAssistantLogic(backendFactory=FakeBackend, settings=MemorySettings())
        parameterNode = logic.getParameterNode()
        parameterNode.runOn = RUN_CPU
        parameterNode.windowPreset = "Abdomen"

        chunks = []
        textNode = logic.report(volume, onText=chunks.append)
        self.assertTrue(textNode.IsA("vtkMRMLTextNode"))
        self.assertNotEqual(textNode.GetID(), userNodes[0].GetID())
        self.assertIn("No acute findings.", textNode.GetText())
        self.assertIn("AI-generated, not for clinical use", textNode.GetText())
        self.assertEqual(chunks, ["No acute findings."])
        self.assertIsInstance(logic.lastResult, TextResult)

        self.assertEqual(logic.ask(volume, "Is the liver enlarged?"), "answer 0")
        self.assertEqual(logic.ask(volume, "And the spleen?"), "answer 1")  # the conversation continues
        self.assertEqual(logic.choose(volume, "Which plane?", ["Axial", "Coronal", "Sagittal", "Oblique"]),
                         "Sagittal")
        self.assertEqual(logic.lastResult.letter, "C")

        roiNode = logic.locate(volume, "liver")
        self.assertTrue(roiNode.IsA("vtkMRMLMarkupsROINode"))
        self.assertNotEqual(roiNode.GetID(), userNodes[1].GetID())
        self.assertIsInstance(logic.lastResult, BoxResult)
        self.assertEqual(logic.describeRegion(volume, userNodes[1]), "A kidney.")

        segmentationNode, segmentId = logic.segment(volume, "liver", userNodes[2])
        self.assertEqual(segmentationNode.GetID(), userNodes[2].GetID())
        self.assertNotEqual(segmentId, userNodes[3])
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 2)
        self.assertEqual(int(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume).sum()),
                         4 * 5 * 5)
        self.assertEqual(logic.segmentExpression(volume, "the lesion"), (None, None))  # no mask: nothing added
        self.assertEqual(logic._backend.volumes, 1)  # the volume was sent once for all of these

        ranking = logic.findSimilar(["a liver cyst", "a normal chest"], volume)
        self.assertEqual([text for text, _ in ranking], ["a normal chest", "a liver cyst"])
        self.assertIsInstance(logic.lastResult, RetrievalResult)

        request = logic.ask(volume, "Non-blocking?", wait=False)  # the panel's way
        self.assertTrue(request.wait(10))
        self.assertEqual(request.result(), "answer 2")

        self._assertUserNodesUnchanged(userNodes, volume)
        backend = logic._backend
        parameterNode.runOn = RUN_AUTO  # another configuration: a new session, the old backend is closed
        logic.session()
        self.assertTrue(backend.closed)
        self.delayDisplay("Test passed")

    def test_FullFlowWithTinyCheckpoint(self):
        """Every task through a real worker process on a tiny random checkpoint: node types, nothing overwritten."""
        missing = [name for name in ("torch", "transformers", "fastapi", "uvicorn", "safetensors", "psutil")
                   if importlib.util.find_spec(name) is None]
        if missing:
            self.delayDisplay(f"Skipping the full-flow test: {', '.join(missing)} not installed in Slicer's Python")
            return
        self.delayDisplay("Starting the full-flow test (tiny checkpoint, real worker)")
        import subprocess
        from pathlib import Path

        from M3DAssistantLib.results import BoxResult, RetrievalResult, SegmentationResult, TextResult
        from M3DAssistantLib.worker import LIB_PARENT

        # The tiny random checkpoints are written by another process: torch never loads in Slicer's own.
        folder = Path(slicer.util.tempDirectory("M3DAssistantTest"))
        checkpoint, clip = folder / "phi3", folder / "clip"
        script = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                  "from M3DAssistantLib.model import random_checkpoint as rc; "
                  "rc.write_random_lamed_checkpoint(Path(sys.argv[2]), 'phi3', llm=rc.TINY_LLM, "
                  "multimodal=rc.TINY_MULTIMODAL); rc.write_random_clip_checkpoint(Path(sys.argv[3]), tiny=True)")
        subprocess.run([self._workerPython(), "-c", script, str(LIB_PARENT), str(checkpoint), str(clip)],
                       check=True, timeout=600)
        logic = M3DAssistantLogic(settings=MemorySettings({"clipModel": str(clip),
                                                            "pythonExecutable": self._workerPython()}))
        parameterNode = logic.getParameterNode()
        parameterNode.modelChoice = MODEL_FOLDER
        parameterNode.modelSource = str(checkpoint)
        parameterNode.runOn = RUN_CPU
        parameterNode.maxNewTokens = 8
        parameterNode.windowPreset = "Abdomen"
        volume = self._ctVolume()
        userNodes = self._userNodes(volume)
        try:
            textNode = logic.report(volume)
            self.assertIsInstance(logic.lastResult, TextResult)
            if logic.lastResult.text.strip():
                self.assertTrue(textNode.IsA("vtkMRMLTextNode"))
                self.assertNotEqual(textNode.GetID(), userNodes[0].GetID())
            worker = logic.workerProcess()
            pid = worker.pid
            self.assertIsNotNone(pid)
            self.assertIsInstance(logic.ask(volume, "Is there a lesion?"), str)
            self.assertIsInstance(logic.choose(volume, "Which plane?", ["Axial", "Coronal", "Sagittal", "Oblique"]),
                                  str)
            roiNode = logic.locate(volume, "liver")
            self.assertIsInstance(logic.lastResult, BoxResult)
            self.assertTrue(roiNode is None or roiNode.IsA("vtkMRMLMarkupsROINode"))
            self.assertIsInstance(logic.describeRegion(volume, userNodes[1]), str)
            segmentationNode, segmentId = logic.segment(volume, "liver", userNodes[2])
            self.assertIsInstance(logic.lastResult, SegmentationResult)
            self.assertTrue(segmentationNode is None or segmentationNode.GetID() == userNodes[2].GetID())
            self.assertTrue(segmentId is None or segmentId != userNodes[3])
            logic.segmentExpression(volume, "the lesion in the right lobe")
            self.assertIsInstance(logic.lastResult, SegmentationResult)
            ranking = logic.findSimilar(["a liver cyst", "a normal chest"], volume)
            self.assertEqual(sorted(text for text, _ in ranking), ["a liver cyst", "a normal chest"])
            self.assertIsInstance(logic.lastResult, RetrievalResult)
            self.assertEqual((worker.pid, worker.restarts), (pid, 0))  # one worker for everything
            self._assertUserNodesUnchanged(userNodes, volume)
        finally:
            logic.shutdown()
        self.assertIsNone(logic.workerProcess())
        self.delayDisplay("Test passed")

    @staticmethod
    def _workerPython() -> str:
        """Slicer's Python for the worker (as the setting, it is only checked: nothing is installed)."""
        return shutil.which("PythonSlicer") or sys.executable
