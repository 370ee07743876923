import functools
import json
import logging
from collections.abc import Callable

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper

from slicer import vtkMRMLScalarVolumeNode

# Nothing heavy is imported here: torch and transformers never load in Slicer's process at module start-up.
# M3DAssistantLib is imported inside the methods that need it.

DEFAULT_MODEL_SOURCE = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"


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
<p>This version of the panel checks a model checkpoint (<b>Inspect model</b>: variant, sizes, data type and whether
it will load, read from its config.json and weight index); the task buttons come in a later version.</p>
<p><b>Every output is AI-generated, not for clinical use</b>: it can be wrong, and a qualified reader must review it
before it is used for anything.</p>
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
    The parameters needed by module.

    inputVolume - The volume the model looks at.
    modelSource - Hugging Face hub id or local folder of an M3D-LaMed checkpoint.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelSource: str = DEFAULT_MODEL_SOURCE


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

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/M3DAssistant.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets (the .ui connects mrmlSceneChanged to each MRML widget's setMRMLScene).
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = M3DAssistantLogic()

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons
        self.ui.inspectModelButton.connect("clicked(bool)", self.onInspectModelButton)

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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonStates)

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
        # Parameter node stores all user choices in parameter values, node selections, etc.
        # so that when the scene is saved and reloaded, these settings are restored.
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

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

    def _updateButtonStates(self, caller=None, event=None) -> None:
        if self._parameterNode and self._parameterNode.modelSource.strip():
            self.ui.inspectModelButton.toolTip = _("Read the checkpoint's config and weight index and show a summary")
            self.ui.inspectModelButton.enabled = True
        else:
            self.ui.inspectModelButton.toolTip = _("Enter a Hugging Face model id or a local checkpoint folder")
            self.ui.inspectModelButton.enabled = False

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
    """Computation of the M3DAssistant module, usable from the Python console without the widget:

    .. code-block:: python

        logic = slicer.util.getModuleLogic("M3DAssistant")
        print(logic.formatSummary(logic.inspectModel("GoodBaiBai88/M3D-LaMed-Phi-3-4B")))

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, inspector: Callable[[str], dict] | None = None) -> None:
        """Called when the logic class is instantiated.

        :param inspector: function that summarises a checkpoint; default
            ``M3DAssistantLib.model.inspect.inspect_checkpoint``. Tests pass a fake.
        """
        ScriptedLoadableModuleLogic.__init__(self)
        self._inspector = inspector

    def getParameterNode(self):
        return M3DAssistantParameterNode(super().getParameterNode())

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
            from M3DAssistantLib.model.inspect import inspect_checkpoint

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

    def test_ParameterNode(self):
        """The parameter node has the default model and stores the chosen volume and model in the scene."""
        self.delayDisplay("Starting the parameter node test")
        logic = M3DAssistantLogic()
        parameterNode = logic.getParameterNode()
        self.assertEqual(parameterNode.modelSource, DEFAULT_MODEL_SOURCE)
        self.assertIsNone(parameterNode.inputVolume)

        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "M3DAssistantTestVolume")
        parameterNode.inputVolume = volumeNode
        parameterNode.modelSource = "/data/checkpoints/my-m3d"
        storedNode = logic.getParameterNode()  # a new wrapper over the same MRML node
        self.assertEqual(storedNode.inputVolume.GetID(), volumeNode.GetID())
        self.assertEqual(storedNode.modelSource, "/data/checkpoints/my-m3d")
        self.assertEqual(parameterNode.parameterNode.GetParameter("modelSource"), "/data/checkpoints/my-m3d")
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
