import importlib.util
import logging
import pathlib

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper

# Nothing heavy is imported here: torch, transformers, peft and accelerate never load in Slicer's process at module
# start-up. Training runs in a separate process, launched by M3DTrainingLib.

# The user-facing steps of fine-tuning and the M3DTrainingLib modules each one needs.
TRAINING_STEPS = {
    "export": (_("Export annotated scenes to an M3D dataset"), ("export",)),
    "train": (_("Fine-tune M3D-LaMed (LoRA) on a dataset"), ("data", "train", "jobs")),
    "evaluate": (_("Evaluate a fine-tuned model"), ("evaluate",)),
}


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
<li><b>Export</b>: turns annotated scenes (segments, ROIs, reports and question/answer text) into a dataset in the
M3D format.</li>
<li><b>Train</b>: fine-tunes the model with LoRA, as the official recipe does, on local GPUs in a separate
process.</li>
<li><b>Evaluate</b>: scores a fine-tuned model per task, as M3D-Bench does.</li>
</ul>
<p>This version of the panel lets you choose the dataset and output folders and shows which of these steps this
installation has; it does not run them yet.</p>
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
    The parameters needed by module.

    datasetFolder - Folder of an M3D-format dataset (exported scenes). Path() means not chosen.
    outputFolder - Folder where checkpoints, logs and metrics go. Path() means not chosen.
    """

    datasetFolder: pathlib.Path
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

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/M3DTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = M3DTrainingLogic()

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateStatus)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        # If this module is shown while the scene is closed then recreate a new parameter node immediately
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: M3DTrainingParameterNode | None) -> None:
        """
        Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateStatus)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateStatus)
            self._updateStatus()

    def _updateStatus(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        self.ui.statusLabel.text = self.logic.statusText(self._parameterNode.datasetFolder,
                                                         self._parameterNode.outputFolder)


#
# M3DTrainingLogic
#


class M3DTrainingLogic(ScriptedLoadableModuleLogic):
    """Computation of the M3DTraining module, usable from the Python console without the widget:

    .. code-block:: python

        logic = slicer.util.getModuleLogic("M3DTraining")
        print(logic.availableSteps())

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return M3DTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def availableSteps() -> dict:
        """
        Which training steps this installation has, found without importing them (so without torch).
        :return: ``{"export": bool, "train": bool, "evaluate": bool}``; a step is available when every
            M3DTrainingLib module it needs is installed
        """
        return {
            step: all(importlib.util.find_spec(f"M3DTrainingLib.{name}") is not None for name in moduleNames)
            for step, (_title, moduleNames) in TRAINING_STEPS.items()
        }

    @staticmethod
    def isFolderChosen(folder: pathlib.Path) -> bool:
        """
        Whether a folder parameter holds a choice: an empty path (``Path()``, shown as ".") means none.
        :param folder: a folder parameter of :class:`M3DTrainingParameterNode`
        """
        return str(folder) not in ("", ".")

    def describeFolder(self, folder: pathlib.Path, mustExist: bool) -> str:
        """
        One line on the state of a folder choice.
        :param folder: the chosen folder (``Path()`` when none)
        :param mustExist: True for an input folder, False for an output folder that will be created when needed
        """
        if not self.isFolderChosen(folder):
            return _("not chosen")
        folder = pathlib.Path(folder)
        if folder.is_dir():
            try:
                itemCount = sum(1 for _item in folder.iterdir())  # top level only: cheap on large datasets
            except OSError as error:
                return _("{folder} cannot be read: {error}").format(folder=folder, error=error.strerror or error)
            return _("{folder} ({count} items)").format(folder=folder, count=itemCount)
        if folder.exists():
            return _("{folder} is a file, not a folder").format(folder=folder)
        if mustExist:
            return _("{folder} does not exist").format(folder=folder)
        return _("{folder} (will be created)").format(folder=folder)

    def statusText(self, datasetFolder: pathlib.Path, outputFolder: pathlib.Path) -> str:
        """
        Text for the panel's status label: the folder choices and which training steps this installation has.
        :param datasetFolder: dataset folder parameter
        :param outputFolder: output folder parameter
        """
        lines = [
            _("Dataset folder: {state}").format(state=self.describeFolder(datasetFolder, mustExist=True)),
            _("Output folder: {state}").format(state=self.describeFolder(outputFolder, mustExist=False)),
            "",
            _("Training steps in this installation (this panel does not run them yet):"),
        ]
        available = self.availableSteps()
        for step, (title, _moduleNames) in TRAINING_STEPS.items():
            state = _("available") if available[step] else _("not available yet")
            lines.append(f"\u2022 {title}: {state}")
        logging.debug("M3DTraining steps: %s", available)
        return "\n".join(lines)


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
        self.setUp()
        self.test_ParameterNode()
        self.setUp()
        self.test_Status()

    def test_ParameterNode(self):
        """Folder choices start empty and are stored in the scene."""
        self.delayDisplay("Starting the parameter node test")
        logic = M3DTrainingLogic()
        parameterNode = logic.getParameterNode()
        self.assertFalse(logic.isFolderChosen(parameterNode.datasetFolder))
        self.assertFalse(logic.isFolderChosen(parameterNode.outputFolder))
        parameterNode.datasetFolder = pathlib.Path("/data/m3d-dataset")
        self.assertEqual(logic.getParameterNode().datasetFolder, pathlib.Path("/data/m3d-dataset"))
        self.assertTrue(logic.isFolderChosen(logic.getParameterNode().datasetFolder))
        self.delayDisplay("Test passed")

    def test_Status(self):
        """The status names each folder's state and every training step with its real availability."""
        self.delayDisplay("Starting the status test")
        import tempfile

        logic = M3DTrainingLogic()
        steps = logic.availableSteps()
        self.assertEqual(set(steps), set(TRAINING_STEPS))
        for step, (_title, moduleNames) in TRAINING_STEPS.items():
            expected = all(importlib.util.find_spec(f"M3DTrainingLib.{name}") for name in moduleNames)
            self.assertEqual(steps[step], expected)

        with tempfile.TemporaryDirectory() as folder:
            dataset = pathlib.Path(folder)
            (dataset / "a.json").write_text("{}")
            (dataset / "b.json").write_text("{}")
            text = logic.statusText(dataset, dataset / "out")
            self.assertIn("(2 items)", text)
            self.assertIn("(will be created)", text)
            self.assertIn("does not exist", logic.statusText(dataset / "missing", pathlib.Path()))
            self.assertIn("not chosen", logic.statusText(pathlib.Path(), pathlib.Path()))
        for title, _moduleNames in TRAINING_STEPS.values():
            self.assertIn(title, text)
        self.delayDisplay("Test passed")
