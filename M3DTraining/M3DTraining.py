"""M3D Training, the Slicer module: fine-tuning on annotated scenes (Module, parameter node, Widget, Logic, Test).

Why this file is long: Slicer's scripted-module template keeps a module's Module, parameter node, Widget, Logic and
Test classes in one file, and this file is those classes; the Qt-free work they call is in M3DTrainingLib.
"""

import json
import logging
import os
import pathlib
import shutil
import sys
from collections.abc import Callable
from typing import Annotated, Any, Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The panel's choices; the Qt-free work behind the panel is in M3DTrainingLib, one module per job (gpus, panel_config,
# job_monitor, loss_curve, evaluation_job, ...). Nothing heavy is imported here: torch, transformers, peft and
# accelerate never load in Slicer's process. The trainer runs as a separate, detached process (M3DTrainingLib.jobs);
# the GPU query, the memory estimate, the evaluation and the merge run as short helper processes.
from M3DTrainingLib.config import DEFAULT_BASE_MODEL
from M3DTrainingLib.panel_config import (
    DEEPSPEED_CHOICES,
    DEEPSPEED_OFF,
    PRESET_CHOICES,
    PRESET_ONE_GPU,
    SOURCE_CHOICES,
    SOURCE_CURRENT_SCENE,
    STAGE_CHOICES,
    STAGE_LORA,
    PanelState,
)

DEFAULTS = PanelState()  # the "One 24 GB GPU" preset: most users have one consumer GPU
REQUIREMENTS_FILE = pathlib.Path(__file__).resolve().parent / "Resources" / "Requirements" / "M3DTraining.txt"
"""What the trainer needs besides torch (``M3DAssistantLib.dependencies`` installs it)."""
POLL_INTERVAL_MS = 1000


#
# M3DTraining
#


class M3DTraining(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("M3D Training")
        self.parent.categories = ["M3D"]
        self.parent.dependencies = []
        self.parent.contributors = ["M3D for 3D Slicer contributors"]
        # _() function marks text as translatable to other languages
        self.parent.helpText = _("""
Fine-tune M3D-LaMed on your own annotated scenes.
<ul>
<li><b>Dataset</b>: exports annotated scenes (segments, ROIs, reports and question/answer text nodes) to a dataset
in the M3D format, with a report of what was exported and what was skipped and why.</li>
<li><b>Model and tasks</b>: the base model, a preset (one 24 GB GPU, or the official recipe), the task mix and the
hyperparameters.</li>
<li><b>Compute</b>: the GPUs found on this computer with their memory, and a warning when the training will not
fit.</li>
<li><b>Training</b>: runs in its own process, keeps running when Slicer closes, and is shown again when the module is
reopened; the loss curve is drawn live. Cancel keeps the checkpoints; Resume continues from the newest.</li>
<li><b>Evaluation</b>: M3D-Bench metrics of predictions, and "Use in M3D Assistant" for the fine-tuned model.</li>
</ul>
<p>A fine-tuned model's outputs are <b>AI-generated, not for clinical use</b>, as are the base model's.</p>
<p>See the <a href="https://github.com/m3d-slicer/SlicerM3D#m3dtraining">module documentation</a>.</p>
""")
        self.parent.acknowledgementText = _("""
M3D-LaMed and its training recipe are the work of Bai F., Du Y., Huang T., Meng M. Q.-H. and Zhao B.:
"M3D: Advancing 3D Medical Image Analysis with Multi-Modal Large Language Models", arXiv:2404.00578, 2024.
Official code: <a href="https://github.com/BAAI-DCAI/M3D">BAAI-DCAI/M3D</a> (MIT licence).
Model weights: <a href="https://huggingface.co/GoodBaiBai88">GoodBaiBai88</a> on the Hugging Face hub, each under
the licence stated on its model card. This extension is MIT licensed.
""")


#
# M3DTrainingParameterNode
#


@parameterNodeWrapper
class M3DTrainingParameterNode:
    """
    The parameters needed by module (saved with the scene; the training Python is a per-computer setting).

    exportSource - Export the current scene or scene files.
    sceneFiles - The .mrb/.mrml files to export, separated by ";".
    validationFraction - Share of the volumes held out for validation (drawn with the seed).
    datasetFolder - M3D-format dataset folder: written by the export, read by the training. Path() means not chosen.
    baseModel - Hugging Face hub id or folder of the M3D-LaMed checkpoint to fine-tune.
    preset - Training preset; choosing one fills the hyperparameters.
    stage - Official stage 1 (projector) or stage 2 (LoRA).
    taskReport ... taskRefseg - The task mix: which kinds of samples are trained.
    learningRate, numEpochs, maxSteps (0: by epochs), batchSize (per GPU), gradientAccumulation, loraRank, loraAlpha,
    loraDropout, gradientCheckpointing, saveSteps (checkpoint every N steps), seed - Hyperparameters.
    deepspeed - DeepSpeed ZeRO stage for several GPUs.
    gpus - The chosen GPUs, as numbers separated by commas; "cpu" for none; "" before the GPUs were detected.
    outputFolder - Folder of the training job: checkpoints, logs, progress, the fine-tuned model, evaluations.
    """

    exportSource: Annotated[str, Choice(SOURCE_CHOICES)] = SOURCE_CURRENT_SCENE
    sceneFiles: str = ""
    validationFraction: Annotated[float, WithinRange(0.0, 0.9)] = 0.2
    datasetFolder: pathlib.Path
    baseModel: str = DEFAULT_BASE_MODEL
    preset: Annotated[str, Choice(list(PRESET_CHOICES))] = PRESET_ONE_GPU
    stage: Annotated[str, Choice(list(STAGE_CHOICES))] = STAGE_LORA
    taskReport: bool = True
    taskVqaOpen: bool = True
    taskVqaClosed: bool = True
    taskRec: bool = True
    taskReg: bool = True
    taskSeg: bool = True
    taskRefseg: bool = True
    learningRate: Annotated[float, WithinRange(1e-6, 1e-2)] = DEFAULTS.learning_rate
    numEpochs: Annotated[float, WithinRange(0.1, 1000.0)] = DEFAULTS.num_epochs
    maxSteps: Annotated[int, WithinRange(0, 10_000_000)] = DEFAULTS.max_steps
    batchSize: Annotated[int, WithinRange(1, 512)] = DEFAULTS.batch_size
    gradientAccumulation: Annotated[int, WithinRange(1, 512)] = DEFAULTS.gradient_accumulation
    loraRank: Annotated[int, WithinRange(1, 1024)] = DEFAULTS.lora_r
    loraAlpha: Annotated[int, WithinRange(1, 4096)] = DEFAULTS.lora_alpha
    loraDropout: Annotated[float, WithinRange(0.0, 0.9)] = DEFAULTS.lora_dropout
    gradientCheckpointing: bool = DEFAULTS.gradient_checkpointing
    saveSteps: Annotated[int, WithinRange(1, 1_000_000)] = DEFAULTS.save_steps
    seed: Annotated[int, WithinRange(0, 2_147_483_647)] = DEFAULTS.seed
    deepspeed: Annotated[str, Choice(list(DEEPSPEED_CHOICES))] = DEEPSPEED_OFF
    gpus: str = ""
    outputFolder: pathlib.Path


#
# M3DTrainingWidget
#


class M3DTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
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
        self._updatingGpuList = False
        self._shownFolder = None  # the output folder whose evaluation is shown
        self._merging = False  # "Use in M3D Assistant" is merging the adapter (the button stays disabled)

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/M3DTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = M3DTrainingLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._onTimer)

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.addSceneFilesButton.connect("clicked(bool)", self.onAddSceneFilesButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.browseBaseModelButton.connect("clicked(bool)", self.onBrowseBaseModelButton)
        self.ui.presetComboBox.connect("activated(int)", self.onPresetActivated)  # the user's choice only
        self.ui.refreshGpusButton.connect("clicked(bool)", self.onRefreshGpusButton)
        self.ui.gpuListWidget.connect("itemChanged(QListWidgetItem*)", self.onGpuItemChanged)
        self.ui.estimateMemoryButton.connect("clicked(bool)", self.onEstimateMemoryButton)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.showLossCurveButton.connect("clicked(bool)", self.onShowLossCurveButton)
        self.ui.openOutputFolderButton.connect("clicked(bool)", self.onOpenOutputFolderButton)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluateButton)
        self.ui.useInAssistantButton.connect("clicked(bool)", self.onUseInAssistantButton)

        # Per-computer setting (not in the scene): which Python runs the training.
        self.ui.pythonPathLineEdit.currentPath = self.logic.settings.get("pythonExecutable")
        self.ui.pythonPathLineEdit.connect("currentPathChanged(QString)",
                                           lambda path: self.logic.settings.set("pythonExecutable", path.strip()))

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()
        self._reconnectToJob()
        self.onRefreshGpusButton()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        # The training job is NOT stopped: it runs detached and the module shows it again when it is reopened.
        self._timer.stop()
        if self.logic:
            self.logic.cancelHelpers()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed
        self.initializeParameterNode()
        self._startPolling()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module).
        # The timer keeps running: the loss curve stays live in the layout while other modules are used.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        # If this module is shown while the scene is closed then recreate a new parameter node immediately
        if self.parent.isEntered:
            self.initializeParameterNode()
            self._reconnectToJob()  # a job that still runs is shown again in the new scene

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[M3DTrainingParameterNode]) -> None:
        """
        Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    # ------------------------------------------------------------------------------------------ GUI state
    def _updateGui(self, caller=None, event=None) -> None:
        """Show the state of the chosen folders, GPUs and job; enable what can be used now."""
        p = self._parameterNode
        if not p:
            return
        self.ui.sceneFilesLineEdit.enabled = p.exportSource != SOURCE_CURRENT_SCENE
        self.ui.addSceneFilesButton.enabled = p.exportSource != SOURCE_CURRENT_SCENE
        self.ui.datasetSummaryLabel.text = self.logic.datasetSummary(p.datasetFolder)
        self._syncGpuChecks()
        warnings, note = self.logic.memoryReport(p)
        self.ui.memoryLabel.text = "\n".join([note] + warnings)
        self.ui.memoryLabel.setStyleSheet("color: #c0392b" if warnings else "")
        try:
            self.logic.attachJob(p.outputFolder)  # the panel shows the job of the chosen output folder
        except Exception as error:  # an unreadable job.json: logged, nothing else breaks
            logging.warning("M3DTraining: %s", error)
        self._showLatestEvaluation()
        self._updateJobDisplay()

    def _showLatestEvaluation(self) -> None:
        """When another output folder is chosen: its newest evaluation, if it has one."""
        from M3DTrainingLib.evaluation_job import format_evaluation

        folder = self.logic.folderText(self._parameterNode.outputFolder)
        if folder == self._shownFolder:
            return
        self._shownFolder = folder
        try:
            results = self.logic.latestEvaluation(folder) if folder else None
        except (OSError, ValueError) as error:
            results = None
            logging.warning("M3DTraining: %s", error)
        self.ui.evaluationTextEdit.setPlainText(format_evaluation(results) if results else "")

    def _updateJobDisplay(self) -> None:
        state = self.logic.jobState()
        running = state == "running"
        self.ui.startButton.text = _("Cancel training") if running else _("Start training")
        self.ui.startButton.toolTip = (_("Stop the job; its checkpoints are kept and Resume continues from the "
                                         "newest.") if running else
                                       _("Write the training config to the output folder and start the training "
                                         "in its own process."))
        self.ui.resumeButton.enabled = self.logic.canResume()
        folder = self.logic.folderText(self._parameterNode.outputFolder) if self._parameterNode else ""
        self.ui.openOutputFolderButton.enabled = bool(folder)
        self.ui.showLossCurveButton.enabled = self.logic.job is not None
        self.ui.evaluateButton.enabled = bool(folder)
        self.ui.useInAssistantButton.enabled = (bool(folder) and not self._merging
                                                and self.logic.finishedModel(folder) is not None)
        self.ui.jobStatusLabel.text = self.logic.statusText()
        fraction = self.logic.progressFraction()
        if running and fraction is None:
            self.ui.progressBar.setRange(0, 0)  # busy: loading the model, first step
        else:
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.value = int(1000 * (fraction or 0.0))

    def _syncGpuChecks(self) -> None:
        """Tick the GPUs of the parameter node (it may come from a loaded scene)."""
        try:
            chosen = set(self.logic.selectedGpus(self._parameterNode))
        except ValueError:
            chosen = set()
        self._updatingGpuList = True
        try:
            for row in range(self.ui.gpuListWidget.count):
                item = self.ui.gpuListWidget.item(row)
                state = qt.Qt.Checked if item.data(qt.Qt.UserRole) in chosen else qt.Qt.Unchecked
                if item.checkState() != state:
                    item.setCheckState(state)
        finally:
            self._updatingGpuList = False

    def _startPolling(self) -> None:
        if self.logic.needsPolling() and not self._timer.isActive():
            self._timer.start()

    def _onTimer(self) -> None:
        """Main thread, every second: new progress lines -> loss curve and status; finished helper processes."""
        try:
            self.logic.poll()
        except Exception as error:
            logging.error("M3DTraining: %s", error)
        self._updateJobDisplay()
        if not self.logic.needsPolling():
            self._timer.stop()

    def _reconnectToJob(self) -> None:
        """On opening: show the job of the scene's output folder, else a job from an earlier session that still runs.

        No dialog here: a problem is logged and the panel opens anyway."""
        try:
            folder = self.logic.jobFolderToShow(self._parameterNode)
        except Exception as error:
            logging.warning("M3DTraining: running jobs cannot be looked up: %s", error)
            return
        if folder and self._parameterNode and self.logic.folderText(self._parameterNode.outputFolder) != folder:
            self._parameterNode.outputFolder = pathlib.Path(folder)  # attaches through _updateGui
        if self.logic.jobState() == "running":
            self.logic.showLossCurve()
        self._startPolling()

    # ------------------------------------------------------------------------------------------ dataset
    def onAddSceneFilesButton(self) -> None:
        files = qt.QFileDialog.getOpenFileNames(slicer.util.mainWindow(), _("Annotated scenes to export"), "",
                                                _("Slicer scenes (*.mrb *.mrml)"))
        if files:
            current = [f for f in self._parameterNode.sceneFiles.split(";") if f.strip()]
            self._parameterNode.sceneFiles = ";".join(dict.fromkeys(current + list(files)))

    def onExportButton(self) -> None:
        self.ui.exportReportTextEdit.setPlainText("")
        try:
            with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
                result = self.logic.exportDataset(progress=self._showExportProgress)
                self.ui.exportReportTextEdit.setPlainText(result.summary())
        finally:
            self._updateGui()

    def _showExportProgress(self, event) -> None:
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.value = int(1000 * (event.fraction or 0.0))
        self.ui.jobStatusLabel.text = event.message
        slicer.app.processEvents()  # the export reads the scene on the main thread (MRML is not thread-safe)

    # ------------------------------------------------------------------------------------------ model, compute
    def onBrowseBaseModelButton(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("M3D-LaMed checkpoint folder"),
                                                     self._parameterNode.baseModel)
        if folder:
            self._parameterNode.baseModel = folder

    def onPresetActivated(self, index: int) -> None:
        with slicer.util.tryWithErrorDisplay(_("The preset could not be applied.")):
            self.logic.applyPreset(self.ui.presetComboBox.currentText)

    def onRefreshGpusButton(self) -> None:
        self.ui.refreshGpusButton.enabled = False
        self.ui.gpuStatusLabel.text = _("Looking for GPUs...")
        try:
            self.logic.detectGpus(wait=False, callback=self._onGpusDetected)
        except Exception as error:  # no dialog: this also runs when the panel opens
            self.ui.gpuStatusLabel.text = str(error)
            self.ui.refreshGpusButton.enabled = True
        self._startPolling()

    def _onGpusDetected(self, result) -> None:
        self.ui.refreshGpusButton.enabled = True
        if isinstance(result, Exception):
            self.ui.gpuStatusLabel.text = str(result)
            return
        self._updatingGpuList = True
        try:
            self.ui.gpuListWidget.clear()
            for gpu in result.gpus:
                item = qt.QListWidgetItem(gpu.label())
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setData(qt.Qt.UserRole, gpu.index)
                item.setCheckState(qt.Qt.Unchecked)
                self.ui.gpuListWidget.addItem(item)
        finally:
            self._updatingGpuList = False
        self.ui.gpuStatusLabel.text = result.message
        self._updateGui()

    def onGpuItemChanged(self, item) -> None:
        if self._updatingGpuList or not self._parameterNode:
            return
        chosen = [self.ui.gpuListWidget.item(row).data(qt.Qt.UserRole) for row in range(self.ui.gpuListWidget.count)
                  if self.ui.gpuListWidget.item(row).checkState() == qt.Qt.Checked]
        self.logic.setSelectedGpus(chosen)

    def onEstimateMemoryButton(self) -> None:
        self.ui.estimateMemoryButton.enabled = False
        self.ui.memoryLabel.text = _("Estimating (builds the model without weights in a helper process)...")
        started = False
        try:
            with slicer.util.tryWithErrorDisplay(_("The memory estimate could not start."), waitCursor=True):
                self.logic.estimateMemory(wait=False, callback=self._onMemoryEstimated)
                started = True
        finally:
            if not started:
                self.ui.estimateMemoryButton.enabled = True
                self._updateGui()
        self._startPolling()

    def _onMemoryEstimated(self, result) -> None:
        self.ui.estimateMemoryButton.enabled = True
        if isinstance(result, Exception):
            slicer.util.errorDisplay(_("The memory estimate failed."), detailedText=str(result))
        else:
            self.ui.estimateDetailsTextEdit.setPlainText(result)
        self._updateGui()

    # ------------------------------------------------------------------------------------------ training
    def onStartButton(self) -> None:
        if self.logic.jobState() == "running":
            if slicer.util.confirmYesNoDisplay(_("Cancel the training? Its checkpoints are kept: Resume continues "
                                                 "from the newest.")):
                try:
                    with slicer.util.tryWithErrorDisplay(_("The training could not be cancelled."), waitCursor=True):
                        self.logic.cancelTraining()
                finally:
                    self._updateJobDisplay()
            return
        warnings, _note = self.logic.memoryReport()
        if warnings and not slicer.util.confirmOkCancelDisplay(
                _("Before starting:") + "\n\n" + "\n".join(warnings) + "\n\n" +
                _("Start anyway?"), windowTitle=_("M3D Training")):
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("The training could not start."), waitCursor=True):
                self.logic.ensureTrainingPython()
                self.logic.startTraining(checkPython=False)
                self.logic.showLossCurve()
        finally:
            self._startPolling()
            self._updateGui()

    def onResumeButton(self) -> None:
        try:
            with slicer.util.tryWithErrorDisplay(_("The training could not be resumed."), waitCursor=True):
                self.logic.resumeTraining()
                self.logic.showLossCurve()
        finally:
            self._startPolling()
            self._updateJobDisplay()

    def onShowLossCurveButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The loss curve could not be shown.")):
            self.logic.showLossCurve()

    def onOpenOutputFolderButton(self) -> None:
        folder = self.logic.folderText(self._parameterNode.outputFolder)
        if folder and os.path.isdir(folder):
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    # ------------------------------------------------------------------------------------------ evaluation
    def onEvaluateButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Predictions to evaluate (records with task, prediction, reference)"), "",
            _("Predictions (*.json *.jsonl)"))
        if not path:
            return
        self.ui.evaluationTextEdit.setPlainText(_("Evaluating {path}...").format(path=path))
        with slicer.util.tryWithErrorDisplay(_("The evaluation could not start."), waitCursor=True):
            self.logic.evaluatePredictions(path, wait=False, callback=self._onEvaluated)
        self._startPolling()

    def _onEvaluated(self, result) -> None:
        if isinstance(result, Exception):
            self.ui.evaluationTextEdit.setPlainText(str(result))
            slicer.util.errorDisplay(_("The evaluation failed."), detailedText=str(result))
            return
        from M3DTrainingLib.evaluation_job import format_evaluation

        self.ui.evaluationTextEdit.setPlainText(format_evaluation(result))

    def onUseInAssistantButton(self) -> None:
        kind = self.logic.finishedModel()
        if kind == "adapter":
            if not slicer.util.confirmOkCancelDisplay(
                    _("M3D Assistant loads full checkpoints. Merge the fine-tuned adapter into the base model now? It "
                      "is written to the 'merged' folder in the output folder (several GB, a few minutes)."),
                    windowTitle=_("M3D Training")):
                return
            self._merging = True  # the polling timer must not enable the button again meanwhile
            self.ui.useInAssistantButton.enabled = False
            self.ui.jobStatusLabel.text = _("Merging the adapter into the base model...")
            started = False
            try:
                with slicer.util.tryWithErrorDisplay(_("The merge could not start."), waitCursor=True):
                    self.logic.mergeModel(wait=False, callback=self._onMerged)
                    started = True
            finally:
                if not started:
                    self._merging = False
                    self._updateJobDisplay()
            self._startPolling()
            return
        self._useInAssistant()

    def _onMerged(self, result) -> None:
        self._merging = False
        if isinstance(result, Exception):
            slicer.util.errorDisplay(_("The merge failed."), detailedText=str(result))
            self._updateJobDisplay()
            return
        self._useInAssistant()

    def _useInAssistant(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The model could not be set in M3D Assistant.")):
            self.logic.useInAssistant()
            slicer.util.selectModule("M3DAssistant")


#
# M3DTrainingLogic
#


class M3DTrainingLogic(ScriptedLoadableModuleLogic):
    """Fine-tuning from annotated scenes, usable from the Python console without the widget:

    .. code-block:: python

        logic = slicer.util.getModuleLogic("M3DTraining")
        p = logic.getParameterNode()                      # the panel's choices; set them here or in the panel
        p.datasetFolder = pathlib.Path("/data/my-dataset")
        p.outputFolder = pathlib.Path("/data/my-finetune")
        result = logic.exportDataset()                    # the current scene -> dataset folder
        print(result.summary())                           # what was exported, what was skipped and why
        logic.detectGpus()                                # nvidia-smi, else torch in the training Python
        logic.setSelectedGpus([0])
        job = logic.startTraining()                       # a detached process: it survives Slicer
        status = logic.waitForTraining()                  # or logic.poll() from a timer; the loss curve is live
        logic.useInAssistant()                            # M3D Assistant then uses the fine-tuned model

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, settings: Any = None) -> None:
        """Called when the logic class is instantiated.

        :param settings: per-computer settings (the training Python and the output folders of recent jobs, looked at
            when the module opens to show a job that is still running); default
            :class:`~M3DAssistantLib.settings.ModuleSettings` (QSettings), tests pass ``MemorySettings``.
        """
        from M3DAssistantLib.settings import ModuleSettings

        ScriptedLoadableModuleLogic.__init__(self)
        self.settings = settings if settings is not None else ModuleSettings("M3DTraining")
        self.interactive = True  # confirmation dialogs (never in testing mode)
        self.gpuResult = None  # GpuQueryResult of the last detection
        self.memoryEstimates = {}  # config signature -> bytes per GPU ("Estimate memory")
        self.monitor = None  # job_monitor.JobMonitor of the output folder's job, if there is one
        self.lossNodes = None
        self.lastEvaluation = None
        self._helpers = None  # job_monitor.HelperQueue: GPU query, estimate, evaluation, merge
        self._datasetSummaryCache = (None, None, "")

    @property
    def job(self):
        """The ``M3DTrainingLib.jobs.Job`` shown (None: the output folder holds no job)."""
        return self.monitor.job if self.monitor is not None else None

    @property
    def lossCurve(self):
        return self.monitor.curve if self.monitor is not None else None

    @property
    def helpers(self):
        if self._helpers is None:
            from M3DTrainingLib.job_monitor import HelperQueue

            self._helpers = HelperQueue()
        return self._helpers

    def getParameterNode(self):
        return M3DTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def folderText(folder) -> str:
        """A folder parameter as text; "" when none is chosen (``Path()`` reads as ".")."""
        from M3DTrainingLib.panel_config import folder_text

        return folder_text(folder)

    def panelState(self, parameterNode=None):
        """The panel's choices as a :class:`M3DTrainingLib.panel_config.PanelState`.

        :param parameterNode: default: the module's parameter node
        """
        from M3DTrainingLib.panel_config import PanelState

        return PanelState.from_parameter_node(parameterNode or self.getParameterNode())

    # ------------------------------------------------------------------------------------------ dataset
    def exportDataset(self, parameterNode=None, progress: Optional[Callable] = None):
        """
        Export the panel's scenes (the current scene or scene files) to its dataset folder, a new folder.
        Can be used without GUI widget.

        :param parameterNode: default: the module's parameter node
        :param progress: receives ``ProgressEvent`` (stage, fraction, message)
        :return: ``M3DTrainingLib.export.ExportResult``; ``summary()`` is the validation report (also written as
            ``export_report.txt`` in the dataset folder)
        """
        from M3DAssistantLib.errors import InputError
        from M3DTrainingLib.export import export_dataset

        p = parameterNode or self.getParameterNode()
        folder = self.folderText(p.datasetFolder)
        if not folder:
            raise InputError(_("Choose the dataset folder: a new folder that the export creates."))
        if p.exportSource == SOURCE_CURRENT_SCENE:
            scenes = slicer.mrmlScene
        else:
            scenes = [f.strip() for f in p.sceneFiles.split(";") if f.strip()]
            if not scenes:
                raise InputError(_("Add the scene files (.mrb or .mrml) to export."))
            absent = [f for f in scenes if not os.path.isfile(f)]
            if absent:
                raise InputError(_("These scene files do not exist: {files}").format(files=", ".join(absent)))
        result = export_dataset(scenes, folder, validation_fraction=float(p.validationFraction), seed=int(p.seed),
                                progress=progress)
        if not self.folderText(p.outputFolder):  # a suggestion next to the dataset; never an existing folder
            dataset = pathlib.Path(folder)
            suggestion = dataset.with_name(dataset.name + "-finetuned")
            if not suggestion.exists():
                p.outputFolder = suggestion
        return result

    def datasetSummary(self, folder) -> str:
        """One line on the dataset folder: samples per task (training + validation), or what is wrong."""
        from M3DTrainingLib.panel_config import dataset_counts, format_dataset_counts

        folder = self.folderText(folder)
        if not folder:
            return _("No dataset folder chosen.")
        manifest = pathlib.Path(folder) / "dataset.json"
        try:
            mtime = manifest.stat().st_mtime
        except OSError:
            return _("{folder}: no dataset yet (Export writes one).").format(folder=folder)
        if self._datasetSummaryCache[:2] == (folder, mtime):
            return self._datasetSummaryCache[2]
        try:
            text = _("Samples (training + validation): {counts}").format(
                counts=format_dataset_counts(dataset_counts(folder)))
        except Exception as error:
            text = str(error)
        self._datasetSummaryCache = (folder, mtime, text)
        return text

    # ------------------------------------------------------------------------------------------ model, presets
    def applyPreset(self, preset: str, parameterNode=None) -> None:
        """
        Fill the hyperparameters with a preset's values.

        :param preset: a panel label or a key of ``M3DTrainingLib.config.PRESETS`` ("official", "one-24gb-gpu")
        """
        from M3DTrainingLib.panel_config import PRESET_CHOICES, preset_panel_values

        p = parameterNode or self.getParameterNode()
        values = preset_panel_values(preset)
        label = next((k for k, v in PRESET_CHOICES.items() if preset in (k, v)), None)
        node = getattr(p, "parameterNode", None)  # the MRML node: one Modified event for all the fields
        wasModifying = node.StartModify() if hasattr(node, "StartModify") else None
        try:
            if label is not None:
                p.preset = label
            for name, value in values.items():
                setattr(p, name, value)
        finally:
            if wasModifying is not None:
                node.EndModify(wasModifying)

    def buildTrainConfig(self, parameterNode=None):
        """
        The training config of the panel's choices, validated.

        :return: ``M3DTrainingLib.config.TrainConfig`` (raises ``ConfigError`` naming the problem and the fix)
        """
        from M3DTrainingLib.panel_config import build_train_config

        return build_train_config(self.panelState(parameterNode))

    # ------------------------------------------------------------------------------------------ compute
    def trainingPython(self) -> str:
        """The Python that runs the training and the helper processes: the setting, else Slicer's own."""
        return self.settings.get("pythonExecutable") or shutil.which("PythonSlicer") or sys.executable

    def usesSlicerPython(self) -> bool:
        return not self.settings.get("pythonExecutable")

    def helperEnvironment(self, gpus=None) -> dict:
        """The full environment of a helper process or job (see ``python_env.helper_environment``)."""
        from M3DTrainingLib.python_env import helper_environment

        env = dict(os.environ)
        env.update(helper_environment(gpus))
        return env

    def detectGpus(self, wait: bool = True, callback: Optional[Callable] = None, nvidiaSmi: Optional[str] = None):
        """
        Find the GPUs with their memory, without torch in Slicer: ``nvidia-smi``, else a torch query in the
        training Python (a helper process).

        :param wait: block until done and return the ``GpuQueryResult``; else return None and call ``callback``
            from :meth:`poll`
        :param callback: receives the ``GpuQueryResult`` (or the exception)
        :param nvidiaSmi: path of nvidia-smi (default: found on PATH)
        """
        from M3DTrainingLib.gpus import GpuDetector

        detector = GpuDetector(self.trainingPython(), nvidia_smi=nvidiaSmi, env=self.helperEnvironment())

        def finish(result):
            self.gpuResult = result
            p = self.getParameterNode()
            if not p.gpus.strip():  # first detection: one GPU (the presets are for one GPU), else the CPU
                p.gpus = str(result.gpus[0].index) if result.gpus else "cpu"
            return result

        if wait:
            return finish(detector.wait(timeout=300))
        self.helpers.add(detector, finish, callback)
        return None

    def selectedGpus(self, parameterNode=None) -> tuple:
        """The chosen GPU numbers (() for the CPU)."""
        from M3DTrainingLib.gpus import parse_gpu_selection

        return parse_gpu_selection((parameterNode or self.getParameterNode()).gpus)

    def setSelectedGpus(self, indices, parameterNode=None) -> None:
        """Choose GPUs by number; an empty list chooses the CPU."""
        from M3DTrainingLib.gpus import format_gpu_selection

        (parameterNode or self.getParameterNode()).gpus = format_gpu_selection(indices) or "cpu"

    def memoryReport(self, parameterNode=None) -> tuple:
        """
        Whether the training fits the chosen GPUs.

        :return: ``(warnings, note)``: what is wrong (empty: nothing) and one line on the memory needed
        """
        from M3DAssistantLib.units import format_bytes
        from M3DTrainingLib.panel_config import memory_warnings, required_memory

        try:
            state = self.panelState(parameterNode)
        except ValueError as error:
            return [str(error)], ""
        required, source = required_memory(state, self.memoryEstimates)
        note = (_("Memory needed per GPU: about {memory} ({source}).").format(memory=format_bytes(required),
                                                                              source=source)
                if required else _("Memory needed: not estimated."))
        if self.gpuResult is None:
            return [], note  # the GPUs are not detected yet: nothing to compare with
        return memory_warnings(self.gpuResult.gpus, state.gpus, required, source), note

    def estimateMemory(self, parameterNode=None, wait: bool = True, callback: Optional[Callable] = None):
        """
        Estimate the memory per GPU of the panel's settings: ``m3d train CONFIG --estimate-only`` in a helper process
        (the model is built without weights; a hub model's config.json is fetched if it is not cached).

        :return: the estimate's text (with ``wait``); the figure is kept for :meth:`memoryReport`
        """
        import tempfile

        from M3DAssistantLib.errors import M3DError
        from M3DTrainingLib.config import TrainConfig
        from M3DTrainingLib.helper_process import BackgroundCommand
        from M3DTrainingLib.memory import parse_estimate_total
        from M3DTrainingLib.panel_config import config_signature, train_config_values

        self.ensureLauncherModules()
        state = self.panelState(parameterNode)
        values = train_config_values(state)
        values["dataset"] = values["dataset"] or "(not needed for the estimate)"
        values["output_dir"] = values["output_dir"] or "(not needed for the estimate)"
        config = TrainConfig.from_dict(values, source="M3D Training panel")
        folder = tempfile.mkdtemp(prefix="m3d-estimate-")
        configPath = config.to_yaml(pathlib.Path(folder) / "train_config.yaml")
        signature = config_signature(state)
        command = BackgroundCommand([self.trainingPython(), "-m", "M3DTrainingLib.train", str(configPath),
                                     "--estimate-only"], env=self.helperEnvironment(), timeout_s=600)

        def finish(result):
            shutil.rmtree(folder, ignore_errors=True)
            total = parse_estimate_total(result.output) if result.ok else None
            if total is None:
                raise M3DError(_("The memory estimate failed: {output}").format(output=result.tail()))
            self.memoryEstimates[signature] = total
            return result.output.strip()

        if wait:
            return finish(command.wait())
        self.helpers.add(command, finish, callback)
        return None

    # ------------------------------------------------------------------------------------------ dependencies
    def ensureLauncherModules(self) -> None:
        """
        What Slicer's own process needs to start and watch a job (PyYAML for the config, psutil for the process):
        installed after one confirmation when missing (``M3DAssistantLib.dependencies``).
        """
        from M3DAssistantLib.dependencies import SlicerPythonDependencies
        from M3DTrainingLib.requirements import LAUNCHER_MODULES

        SlicerPythonDependencies(
            list(LAUNCHER_MODULES.values()), torch=None, requester="M3D Training", ask=self.interactive,
            purpose=_("M3D Training needs these small Python packages in Slicer's Python to start and watch training "
                      "jobs"),
            declined=_("Installation declined: training jobs cannot be started without these packages.")).ensure()

    def trainingDependencies(self):
        """
        What the training Python needs (``M3DAssistantLib.dependencies``, packages from
        Resources/Requirements/M3DTraining.txt): Slicer's own Python is installed into after one confirmation; the
        Training Python setting's Python is checked, never changed.
        """
        from M3DAssistantLib.dependencies import dependencies_for, read_requirements

        return dependencies_for(
            self.settings.get("pythonExecutable") or None, read_requirements(REQUIREMENTS_FILE),
            setting=_("Training Python"), requester="M3D Training", env=self.helperEnvironment(), ask=self.interactive,
            purpose=_("Training runs in a separate Python process, which needs these Python packages in Slicer's "
                      "Python environment"),
            declined=_("Installation declined: the training cannot run without these packages."))

    def ensureTrainingPython(self) -> None:
        """
        Make sure the training Python has what the trainer needs (:meth:`trainingDependencies`: one confirmation
        before installing into Slicer's Python; torch through the PyTorch extension, which picks the build for the
        GPU; another Python is never changed, the error says what to install there), then that it imports the
        trainer's modules.
        """
        from M3DAssistantLib.errors import M3DError
        from M3DTrainingLib.requirements import TRAINING_MODULES, missing_modules

        self.trainingDependencies().ensure()
        python = self.trainingPython()
        missing = missing_modules(python, TRAINING_MODULES, env=self.helperEnvironment())
        if missing:
            raise M3DError(_("The training Python {python} cannot import {modules}; see the Python console.").format(
                python=python, modules=", ".join(missing)))

    # ------------------------------------------------------------------------------------------ jobs
    def startTraining(self, parameterNode=None, checkPython: bool = True):
        """
        Start the training of the panel's settings as a detached process (it keeps running when Slicer closes).
        Can be used without GUI widget.

        :param parameterNode: default: the module's parameter node
        :param checkPython: first check that the training Python has the trainer's packages
        :return: the ``M3DTrainingLib.jobs.Job``; :meth:`poll` reads its progress
        """
        from M3DAssistantLib.errors import M3DError
        from M3DTrainingLib.jobs import Job
        from M3DTrainingLib.panel_config import build_train_config, check_dataset_tasks, dataset_counts
        from M3DTrainingLib.python_env import helper_environment
        from M3DTrainingLib.requirements import TRAINING_MODULES, missing_modules

        p = parameterNode or self.getParameterNode()
        state = self.panelState(p)
        config = build_train_config(state)
        warnings = check_dataset_tasks(dataset_counts(state.dataset_folder), state.tasks)
        if warnings:
            logging.warning("M3DTraining: %s", "; ".join(warnings))
        if not p.gpus.strip():  # never the CPU by accident, before the GPUs were detected
            raise M3DError(_("Choose the GPUs first: tick them in the Compute section when the list appears "
                             "(console: logic.detectGpus(), then logic.setSelectedGpus([0])), or choose the CPU "
                             "with logic.setSelectedGpus([])."))
        self.ensureLauncherModules()
        python = self.trainingPython()
        if checkPython:
            missing = missing_modules(python, TRAINING_MODULES, env=self.helperEnvironment(state.gpus))
            if missing:
                raise M3DError(_("The training Python {python} lacks {modules}.").format(
                    python=python, modules=", ".join(missing)))
        job = Job.start(config, python=python, env=helper_environment(state.gpus))
        self._setJob(job)
        self._rememberJob(job.output_dir)
        self._updateLossNodes()
        return job

    def jobFolderToShow(self, parameterNode=None) -> str:
        """The output folder whose job the panel shows on opening: the parameter node's when it holds a job, else
        the newest job from an earlier session that still runs ("" when none)."""
        from M3DTrainingLib.config import STATE_FILE
        from M3DTrainingLib.jobs import running_jobs

        folder = self.folderText((parameterNode or self.getParameterNode()).outputFolder)
        if folder and (pathlib.Path(folder) / STATE_FILE).is_file():
            return folder
        recent = [f for f in self._recentJobs() if (pathlib.Path(f) / STATE_FILE).is_file()]
        if not recent:
            return ""
        self.ensureLauncherModulesQuietly()
        jobs = running_jobs(recent)
        return str(jobs[0].output_dir) if jobs else ""

    def ensureLauncherModulesQuietly(self) -> None:
        """Raise (no dialog) when psutil is missing: a job of an earlier session cannot be checked without it."""
        import importlib.util

        from M3DAssistantLib.errors import M3DError

        if importlib.util.find_spec("psutil") is None:
            raise M3DError("psutil is not installed in Slicer's Python (Start installs it)")

    def attachJob(self, outputFolder):
        """
        Show the job of ``outputFolder`` (started here or in an earlier session, running or not): its whole progress
        is read, then :meth:`poll` reads only what is added.

        :return: the ``Job``, or None when the folder holds no job
        """
        from M3DTrainingLib.config import STATE_FILE
        from M3DTrainingLib.jobs import Job

        folder = self.folderText(outputFolder)
        if self.job is not None and folder and pathlib.Path(folder) == pathlib.Path(self.job.output_dir):
            return self.job
        self.detachJob()
        if not folder or not (pathlib.Path(folder) / STATE_FILE).is_file():
            return None
        self._setJob(Job.reconnect(folder))
        self.pollJob()
        return self.job

    def detachJob(self) -> None:
        """Stop showing the job (it keeps running)."""
        self.monitor = None
        self.lossNodes = None

    def _setJob(self, job) -> None:
        from M3DTrainingLib.job_monitor import JobMonitor

        self.detachJob()
        self.monitor = JobMonitor(job)

    def pollJob(self) -> list:
        """
        Read the job's new progress lines (only those added since the last call), update the loss curve nodes and
        the job's state.

        :return: the new progress events (dicts)
        """
        if self.monitor is None:
            return []
        events, curveChanged = self.monitor.poll()
        if curveChanged:
            self._updateLossNodes()
        return events

    def poll(self) -> list:
        """
        One polling round (the widget calls it every second): the job's new progress, then the helper processes
        that finished (their callbacks are called here, on the caller's thread).

        :return: the job's new progress events
        """
        events = self.pollJob()
        self.helpers.poll()
        return events

    def needsPolling(self) -> bool:
        return bool(self.helpers) or self.jobState() == "running"

    def cancelHelpers(self) -> None:
        """Stop the helper processes (GPU query, estimate, evaluation, merge); the training job is left running."""
        self.helpers.cancel_all()

    def jobState(self) -> Optional[str]:
        """None (no job), "running", "completed", "failed", "cancelled" or "interrupted"."""
        return None if self.monitor is None else self.monitor.state

    def canResume(self) -> bool:
        return self.monitor is not None and self.monitor.can_resume()

    def progressFraction(self) -> Optional[float]:
        return None if self.monitor is None else self.monitor.fraction()

    def statusText(self) -> str:
        """The job's state and its last metrics (step, epoch, loss, lr, samples/s, ETA, GPU memory)."""
        if self.monitor is None:
            return _("No training job in the output folder.")
        return self.monitor.status_text()

    def waitForTraining(self, timeout: Optional[float] = None, interval: float = 1.0):
        """
        Block until the job ends (or ``timeout`` seconds), polling its progress.

        :return: the job's ``JobStatus``
        """
        import time

        from M3DAssistantLib.errors import M3DError

        if self.job is None:
            raise M3DError(_("No training job: start one or choose its output folder."))
        end = None if timeout is None else time.monotonic() + timeout
        while self.jobState() == "running" and (end is None or time.monotonic() < end):
            time.sleep(interval)
            self.poll()
        return self.monitor.final_status or self.job.status()

    def cancelTraining(self):
        """Stop the job's whole process tree; checkpoints and logs are kept. :return: its ``JobStatus``"""
        from M3DAssistantLib.errors import M3DError

        if self.job is None:
            raise M3DError(_("No training job to cancel."))
        status = self.job.cancel()
        self.monitor.cancelled(status)
        return status

    def resumeTraining(self):
        """Relaunch the stopped job; it continues from its newest checkpoint. :return: the ``Job``"""
        from M3DAssistantLib.errors import M3DError

        if self.job is None:
            raise M3DError(_("No training job to resume: choose its output folder."))
        self.ensureLauncherModules()
        self.job.resume()
        self.monitor.resumed()
        self._rememberJob(self.job.output_dir)
        return self.job

    def _recentJobs(self) -> list:
        try:
            folders = json.loads(self.settings.get("recentJobs") or "[]")
        except ValueError:
            return []
        return [str(f) for f in folders if isinstance(f, str)]

    def _rememberJob(self, folder) -> None:
        from M3DTrainingLib.job_monitor import remember_folder

        self.settings.set("recentJobs", json.dumps(remember_folder(self._recentJobs(), str(folder))))

    # ------------------------------------------------------------------------------------------ loss curve
    def _updateLossNodes(self) -> None:
        from M3DTrainingLib.loss_curve import fill_loss_table, loss_curve_nodes

        scene = getattr(slicer, "mrmlScene", None)
        if self.job is None or scene is None or not hasattr(scene, "AddNewNodeByClass"):
            return
        self.lossNodes = loss_curve_nodes(scene, self.job.output_dir)  # ours, found again or recreated
        fill_loss_table(self.lossNodes.table, self.lossCurve)

    def showLossCurve(self) -> None:
        """Show the job's loss chart in a plot view of the layout (the nodes are created if needed)."""
        self._updateLossNodes()
        plots = getattr(getattr(slicer, "modules", None), "plots", None)
        if self.lossNodes is not None and plots is not None:
            plots.logic().ShowChartInLayout(self.lossNodes.chart)

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluatePredictions(self, predictions, outputFolder=None, wait: bool = True,
                            callback: Optional[Callable] = None):
        """
        M3D-Bench metrics of a predictions file, computed offline in a helper process; the results go to
        ``OUTPUT/evaluation/metrics*.json`` and ``.png`` (never overwritten) and a table node.

        :param predictions: a JSON list (or JSON lines) of records as ``M3DTrainingLib.evaluate.evaluate_predictions``
            takes them (``task``, ``prediction``, ``reference``, ...)
        :param outputFolder: default: the panel's output folder
        :return: the results dict (with ``wait``)
        """
        from M3DAssistantLib.errors import InputError, M3DError
        from M3DTrainingLib.config import EVALUATION_DIR
        from M3DTrainingLib.evaluation_job import evaluation_command, next_evaluation_stem, parse_evaluation_output
        from M3DTrainingLib.helper_process import BackgroundCommand

        folder = self.folderText(outputFolder) or self.folderText(self.getParameterNode().outputFolder)
        if not folder:
            raise InputError(_("Choose the output folder: the evaluation is written into it."))
        if not os.path.isfile(str(predictions)):
            raise InputError(_("{path} does not exist.").format(path=predictions))
        target = pathlib.Path(folder) / EVALUATION_DIR
        target.mkdir(parents=True, exist_ok=True)
        command = BackgroundCommand(evaluation_command(self.trainingPython(), predictions, target,
                                                       next_evaluation_stem(target)),
                                    env=self.helperEnvironment(), timeout_s=3 * 3600)

        def finish(result):
            paths = parse_evaluation_output(result.output) if result.ok else None
            if paths is None:
                raise M3DError(_("The evaluation failed: {output}").format(output=result.tail()))
            return self.showEvaluation(paths["json"])

        if wait:
            return finish(command.wait())
        self.helpers.add(command, finish, callback)
        return None

    def showEvaluation(self, resultsFile):
        """
        Read an evaluation's results and show them as a table node (reused for the same file).

        :return: the results dict
        """
        from M3DTrainingLib.evaluation_job import evaluation_table_node

        results = json.loads(pathlib.Path(resultsFile).read_text(encoding="utf-8"))
        self.lastEvaluation = results
        scene = getattr(slicer, "mrmlScene", None)
        if scene is not None and hasattr(scene, "AddNewNodeByClass"):
            evaluation_table_node(scene, results, resultsFile)
        return results

    def latestEvaluation(self, outputFolder=None):
        """The newest evaluation results of the output folder, or None."""
        from M3DTrainingLib.evaluation_job import latest_evaluation

        folder = self.folderText(outputFolder) or self.folderText(self.getParameterNode().outputFolder)
        path = latest_evaluation(folder) if folder else None
        return None if path is None else json.loads(path.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------------------------------ M3DAssistant
    def finishedModel(self, outputFolder=None) -> Optional[str]:
        """"merged", "adapter" (to be merged for M3D Assistant) or None (no finished training there)."""
        from M3DTrainingLib.merge import finished_model

        folder = self.folderText(outputFolder) or self.folderText(self.getParameterNode().outputFolder)
        return finished_model(folder) if folder else None

    def mergeModel(self, outputFolder=None, wait: bool = True, callback: Optional[Callable] = None):
        """
        ``m3d merge``: the adapter merged into the base model, written to ``OUTPUT/merged`` in the official layout
        (a helper process; minutes, several GB).

        :return: the merged folder (with ``wait``)
        """
        from M3DAssistantLib.errors import M3DError
        from M3DTrainingLib.config import MERGED_DIR
        from M3DTrainingLib.helper_process import BackgroundCommand
        from M3DTrainingLib.merge import merge_command

        folder = self.folderText(outputFolder) or self.folderText(self.getParameterNode().outputFolder)
        if self.finishedModel(folder) != "adapter":
            raise M3DError(_("{folder} has no fine-tuned adapter to merge.").format(folder=folder))
        command = BackgroundCommand(merge_command(self.trainingPython(), folder), env=self.helperEnvironment())

        def finish(result):
            if not result.ok or self.finishedModel(folder) != "merged":
                raise M3DError(_("The merge failed: {output}").format(output=result.tail()))
            return pathlib.Path(folder) / MERGED_DIR

        if wait:
            return finish(command.wait())
        self.helpers.add(command, finish, callback)
        return None

    def useInAssistant(self, outputFolder=None):
        """
        Make M3D Assistant use the fine-tuned model: its model choice becomes the fine-tuned model and its model
        source this output folder (through its parameter node).

        :return: M3D Assistant's parameter node
        """
        from M3DAssistantLib.errors import M3DError

        folder = self.folderText(outputFolder) or self.folderText(self.getParameterNode().outputFolder)
        if not folder or self.finishedModel(folder) is None:
            raise M3DError(_("{folder} holds no finished training yet (no adapter or merged model): wait until the "
                             "job has completed.").format(folder=folder or _("The output folder")))
        assistantLogic, assistantModule = self._assistant()
        parameterNode = assistantLogic.getParameterNode()
        adapterChoice = getattr(assistantModule, "MODEL_ADAPTER", None)
        if adapterChoice is not None and hasattr(parameterNode, "modelChoice"):
            parameterNode.modelChoice = adapterChoice  # first: an official choice would reset the source
        parameterNode.modelSource = folder
        return parameterNode

    @staticmethod
    def _assistant():
        """M3D Assistant's logic and Python module; an error that says what to do when it is not there."""
        import importlib

        from M3DAssistantLib.errors import M3DError

        logic = None
        getModuleLogic = getattr(slicer.util, "getModuleLogic", None)
        if getModuleLogic is not None:
            try:
                logic = getModuleLogic("M3DAssistant")
            except Exception:  # the module is not loaded
                logic = None
        try:
            module = sys.modules.get("M3DAssistant") or importlib.import_module("M3DAssistant")
        except ImportError:
            module = None
        if logic is None and module is not None and hasattr(module, "M3DAssistantLogic"):
            logic = module.M3DAssistantLogic()
        if logic is None or not hasattr(logic, "getParameterNode"):
            raise M3DError(_("The M3D Assistant module is not available: install or enable the M3D extension's "
                             "M3DAssistant module, or load the model there by its folder."))
        return logic, module


#
# M3DTrainingTest
#


class M3DTrainingTest(ScriptedLoadableModuleTest):
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
        for test in (self.test_ParameterNode, self.test_TrainConfig, self.test_ProgressAndLossCurve,
                     self.test_UseInAssistant):
            self.setUp()
            test()

    @staticmethod
    def _logic():
        from M3DAssistantLib.settings import MemorySettings

        return M3DTrainingLogic(settings=MemorySettings())

    def test_ParameterNode(self):
        """The defaults are the one-GPU preset's; choosing the official preset fills its hyperparameters."""
        self.delayDisplay("Starting the parameter node test")
        from M3DTrainingLib.config import PRESETS

        logic = self._logic()
        p = logic.getParameterNode()
        one = PRESETS["one-24gb-gpu"]
        self.assertEqual((p.batchSize, p.gradientAccumulation, p.gradientCheckpointing, p.loraRank),
                         (one["per_device_batch_size"], one["gradient_accumulation_steps"],
                          one["gradient_checkpointing"], one["lora_r"]))
        self.assertEqual(logic.folderText(p.datasetFolder), "")
        logic.applyPreset("official")
        official = PRESETS["official"]
        self.assertEqual((p.batchSize, p.gradientAccumulation, p.gradientCheckpointing),
                         (official["per_device_batch_size"], official["gradient_accumulation_steps"],
                          official["gradient_checkpointing"]))
        self.assertEqual(logic.panelState().preset, "official")
        p.datasetFolder = pathlib.Path("/data/m3d-dataset")
        self.assertEqual(logic.getParameterNode().datasetFolder, pathlib.Path("/data/m3d-dataset"))
        self.delayDisplay("Test passed")

    def test_TrainConfig(self):
        """The panel's choices become a validated training config: GPUs, task mix, stage."""
        self.delayDisplay("Starting the training config test")
        logic = self._logic()
        p = logic.getParameterNode()
        p.datasetFolder = pathlib.Path("/data/ds")
        p.outputFolder = pathlib.Path("/data/run1")
        p.taskReport = False
        p.taskVqaOpen = False
        logic.setSelectedGpus([0, 1])
        p.deepspeed = "ZeRO-2"
        config = logic.buildTrainConfig()
        self.assertEqual((config.num_processes, config.deepspeed_stage, config.device), (2, 2, "auto"))
        self.assertEqual(config.dataset_kwargs["tasks"], ["vqa_closed", "rec", "reg", "seg", "refseg"])
        self.assertEqual(config.per_device_batch_size, p.batchSize)
        logic.setSelectedGpus([])
        self.assertEqual(p.gpus, "cpu")
        config = logic.buildTrainConfig()
        self.assertEqual((config.num_processes, config.deepspeed_stage, config.device), (1, 0, "cpu"))
        for name in ("taskVqaClosed", "taskRec", "taskReg", "taskSeg", "taskRefseg"):
            setattr(p, name, False)
        from M3DAssistantLib.errors import ConfigError

        with self.assertRaises(ConfigError):  # no task chosen
            logic.buildTrainConfig()
        self.delayDisplay("Test passed")

    def test_ProgressAndLossCurve(self):
        """A job's progress file is read incrementally into our loss table; a user's node is never touched."""
        self.delayDisplay("Starting the progress and loss curve test")
        import tempfile

        logic = self._logic()
        userTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "M3D training loss (run)")
        with tempfile.TemporaryDirectory() as tmp:
            folder = pathlib.Path(tmp) / "run"
            folder.mkdir()
            (folder / "job.json").write_text(json.dumps({"version": 1, "output_dir": str(folder), "command": ["x"],
                                                         "env": {}, "launches": [], "cancel_requested": False}))
            progress = folder / "progress.jsonl"

            def write(*events):
                with open(progress, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(e) + "\n" for e in events)

            write({"stage": "start", "step": 0, "total_steps": 4, "fraction": 0.0, "message": "training 4 steps"},
                  *({"stage": "train", "step": s, "total_steps": 4, "loss": 2.0 / s, "lr": 1e-4,
                     "fraction": s / 4, "message": f"step {s}"} for s in (1, 2, 3)))
            self.assertIs(logic.attachJob(folder), logic.job)
            table = logic.lossNodes.table
            self.assertIsNot(table, userTable)
            self.assertNotEqual(table.GetName(), userTable.GetName())
            self.assertEqual(table.GetNumberOfRows(), 3)
            self.assertAlmostEqual(float(table.GetCellText(2, 1)), 2.0 / 3, places=5)
            self.assertEqual(logic.jobState(), "interrupted")  # no process, no final event
            self.assertTrue(logic.canResume())
            # a resumed run repeats step 3 (after the checkpoint at step 2) and finishes
            write({"stage": "start", "step": 2, "total_steps": 4, "message": "resuming at step 2/4"},
                  {"stage": "train", "step": 3, "total_steps": 4, "loss": 0.5, "fraction": 0.75},
                  {"stage": "train", "step": 4, "total_steps": 4, "loss": 0.25, "fraction": 1.0},
                  {"stage": "done", "step": 4, "fraction": 1.0, "message": "finished 4 steps"})
            self.assertEqual(len(logic.poll()), 5)  # only the new lines: the recorded interruption, the resumed run
            self.assertEqual(logic.poll(), [])
            self.assertEqual([float(table.GetCellText(r, 1)) for r in range(table.GetNumberOfRows())],
                             [2.0, 1.0, 0.5, 0.25])
            self.assertEqual(logic.jobState(), "completed")
            self.assertIn("loss 0.2500", logic.statusText())
            self.assertEqual(userTable.GetNumberOfRows(), 0)
            self.assertEqual(userTable.GetName(), "M3D training loss (run)")
            # a second logic (the module reopened) finds the same nodes again
            other = self._logic()
            other.attachJob(folder)
            self.assertIs(other.lossNodes.table, table)
            self.assertEqual(table.GetNumberOfRows(), 4)
        self.delayDisplay("Test passed")

    def test_UseInAssistant(self):
        """A finished training output becomes M3D Assistant's model source; an unfinished one is refused."""
        self.delayDisplay("Starting the M3D Assistant test")
        import tempfile

        from M3DAssistantLib.errors import M3DError

        logic = self._logic()
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaises(M3DError):
                logic.useInAssistant(tmp)
            (pathlib.Path(tmp) / "adapter").mkdir()
            (pathlib.Path(tmp) / "adapter" / "adapter_config.json").write_text("{}")
            self.assertEqual(logic.finishedModel(tmp), "adapter")
            parameterNode = logic.useInAssistant(tmp)
            self.assertEqual(parameterNode.modelSource, tmp)
            assistant = sys.modules.get("M3DAssistant")
            if assistant is not None and hasattr(assistant, "MODEL_ADAPTER"):
                self.assertEqual(parameterNode.modelChoice, assistant.MODEL_ADAPTER)
        self.delayDisplay("Test passed")
