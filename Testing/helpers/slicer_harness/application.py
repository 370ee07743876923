"""The application side of Slicer that scripted modules touch: ``slicer.app``, the main window with its module
selector, the module manager, ``slicer.modules.<name>``, the layout manager's slice views, and
``slicer.ScriptedLoadableModule``.

``slicer.ScriptedLoadableModule`` follows Slicer's ``Base/Python/slicer/ScriptedLoadableModule.py`` (module metadata
and resource paths, the widget's parent and layout, the parameter node of the logic, the self-test base class); the
developer section (reload/test buttons) is left out, as it is when Slicer's developer mode is off.
"""

from __future__ import annotations

import os
import types
import unittest

from PySide6 import QtCore, QtWidgets
from PySide6.QtCore import Property, Signal

from .widgets import qMRMLWidget


class qSlicerApplication(QtWidgets.QApplication):
    """``slicer.app``: the QApplication, with Slicer's testing flag, module manager and temporary folder."""

    def __init__(self, argv) -> None:
        super().__init__(argv)
        self._testing = True
        self._temporaryPath = ""
        self._moduleManager = qSlicerModuleManager()
        self._layoutManager = None

    def layoutManager(self):
        return self._layoutManager

    def setLayoutManager(self, layoutManager) -> None:
        self._layoutManager = layoutManager

    def testingEnabled(self) -> bool:
        return self._testing

    def setTestingEnabled(self, enabled: bool) -> None:
        self._testing = bool(enabled)

    def moduleManager(self):
        return self._moduleManager

    temporaryPath = Property(str, lambda self: self._temporaryPath,
                             lambda self, path: setattr(self, "_temporaryPath", path))


class qSlicerModuleManager(QtCore.QObject):
    moduleAboutToBeUnloaded = Signal(str)

    def __init__(self) -> None:
        super().__init__()
        self.modules: dict[str, qSlicerScriptedLoadableModule] = {}

    def module(self, name: str):
        return self.modules.get(name)

    def factoryManager(self):
        return types.SimpleNamespace(loadedModuleNames=lambda: list(self.modules))


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """The C++ panel that holds a scripted module's Python widget (``self()``), with ``isEntered``."""

    def __init__(self, module) -> None:
        super().__init__()
        self._module = module
        self._self = None
        self._entered = False
        QtWidgets.QWidget.setLayout(self, QtWidgets.QVBoxLayout())

    def self(self):
        return self._self

    isEntered = Property(bool, lambda self: self._entered)

    def enter(self) -> None:
        self._entered = True
        self._self.enter()

    def exit(self) -> None:
        self._self.exit()
        self._entered = False


class qSlicerScriptedLoadableModule(QtCore.QObject):
    """A loaded scripted module: its Python module, metadata (set by ``ScriptedLoadableModule.__init__``) and widget
    (made and set up on first use, as Slicer does when the module is first opened)."""

    def __init__(self, name: str, pythonModule, path: str) -> None:
        super().__init__()
        QtCore.QObject.setObjectName(self, name)
        self.pythonModule = pythonModule
        self.path = path
        self._widget = None
        self.moduleInstance = getattr(pythonModule, name)(self)

    def widgetRepresentation(self):
        if self._widget is None:
            self._widget = self.createNewWidgetRepresentation()
        return self._widget

    def createNewWidgetRepresentation(self):
        import slicer

        name = QtCore.QObject.objectName(self)
        panel = qSlicerScriptedLoadableModuleWidget(self)
        QtCore.QObject.setObjectName(panel, f"{name}ModuleWidget")
        panel.setMRMLScene(slicer.mrmlScene)
        panel._self = getattr(self.pythonModule, f"{name}Widget")(panel)
        panel._self.setup()
        return panel

    def logic(self):
        return None  # scripted modules: slicer.util.getModuleLogic takes the widget's logic


class qSlicerLayoutManager(QtCore.QObject):
    """The MRML side of the slice views of Slicer's conventional layout, made as Slicer makes it: the real layout
    logic (``vtkMRMLLayoutLogic``) creates the Red, Yellow and Green slice nodes (axial, sagittal, coronal) for the
    layout, and each view's real ``vtkMRMLSliceLogic`` its slice composite node (background / foreground volumes,
    opacity), registered with the application logic as the views register theirs. So ``slicer.util``'s
    ``setSliceViewerLayers`` and the Markups logic's ``JumpSlicesToLocation`` act on real view nodes. No views are
    drawn: ``sliceWidget`` and the 3D views are not provided."""

    def __init__(self, scene, applicationLogic) -> None:
        super().__init__()
        import slicer

        self._layoutLogic = slicer.vtkMRMLLayoutLogic()
        self._layoutLogic.SetMRMLApplicationLogic(applicationLogic)
        self._layoutLogic.SetMRMLScene(scene)
        self._layoutLogic.GetLayoutNode().SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
        self._sliceLogics = applicationLogic.GetSliceLogics()
        self._logics = {}
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            sliceNode = scene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(applicationLogic)
            logic.SetMRMLScene(scene)
            logic.SetSliceNode(sliceNode)
            self._sliceLogics.AddItem(logic)
            self._logics[sliceNode.GetLayoutName()] = logic

    def sliceViewNames(self) -> list[str]:
        return list(self._logics)

    def mrmlSliceLogics(self):
        return self._sliceLogics

    def close(self) -> None:
        for logic in self._logics.values():
            self._sliceLogics.RemoveItem(logic)
            logic.SetMRMLScene(None)
        self._logics.clear()
        self._layoutLogic.SetMRMLScene(None)


class qSlicerModuleSelector(QtCore.QObject):
    """The main window's module selector: leaving one module and entering another, as Slicer's does."""

    def __init__(self, mainWindow) -> None:
        super().__init__()
        self._mainWindow = mainWindow
        self._selected = ""

    def selectModule(self, name: str) -> None:
        import slicer

        module = slicer.app.moduleManager().module(name)
        if module is None:
            raise RuntimeError(f"Could not find module with name '{name}'")
        if self._selected == name:
            return
        previous = slicer.app.moduleManager().module(self._selected) if self._selected else None
        if previous is not None and previous._widget is not None:
            previous._widget.exit()
        panel = module.widgetRepresentation()
        stack = self._mainWindow.centralWidget()
        if stack.indexOf(panel) < 0:
            stack.addWidget(panel)
        stack.setCurrentWidget(panel)
        self._selected = name
        panel.enter()

    selectedModule = Property(str, lambda self: self._selected)


class qSlicerMainWindow(QtWidgets.QMainWindow):
    def __init__(self) -> None:
        super().__init__()
        QtCore.QObject.setObjectName(self, "qSlicerMainWindow")
        QtWidgets.QMainWindow.setCentralWidget(self, QtWidgets.QStackedWidget())
        self._selector = qSlicerModuleSelector(self)

    def moduleSelector(self):
        return self._selector


# ------------------------------------------------------------------------------ slicer.ScriptedLoadableModule
def make_scripted_loadable_module() -> types.ModuleType:
    import qt
    import slicer

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            super().__init__()
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title = ""
            parent.categories = []
            parent.dependencies = []
            parent.contributors = []
            parent.helpText = ""
            parent.acknowledgementText = ""
            moduleDir = os.path.dirname(self.parent.path)
            for extension in (".svg", ".png"):
                iconPath = os.path.join(moduleDir, "Resources/Icons", self.moduleName + extension)
                if os.path.isfile(iconPath):
                    parent.icon = qt.QIcon(iconPath)
                    break
            if not hasattr(slicer, "selfTests"):
                slicer.selfTests = {}
            slicer.selfTests[self.moduleName] = self.runTest

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

        def runTest(self, msec=100, **kwargs):
            testCase = getattr(__import__(self.__module__), self.moduleName + "Test")()
            testCase.messageDelay = msec
            testCase.runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Widget"):
                self.moduleName = self.moduleName[:-6]
            self.developerMode = slicer.util.settingsValue("Developer/DeveloperMode", False,
                                                           converter=slicer.util.toBool)
            if not parent:
                self.parent = slicer.qMRMLWidget()
                self.parent.setLayout(qt.QVBoxLayout())
                self.parent.setMRMLScene(slicer.mrmlScene)
            else:
                self.parent = parent
            self.layout = self.parent.layout()
            if not parent:
                self.setup()
                self.parent.show()
            slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

        def cleanup(self):
            pass

        def _onModuleAboutToBeUnloaded(self, moduleName):
            if moduleName == self.moduleName:
                self.cleanup()
                slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)",
                                                      self._onModuleAboutToBeUnloaded)

        def setup(self):
            pass  # Slicer adds the developer section here when developer mode is on

        def enter(self):
            pass

        def exit(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            if self.isSingletonParameterNode:
                parameterNode = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
                if parameterNode:
                    if parameterNode.GetAttribute("ModuleName") != self.moduleName:
                        parameterNode.SetAttribute("ModuleName", self.moduleName)
                    return parameterNode
            else:
                for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
                    parameterNode = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLScriptedModuleNode")
                    if parameterNode.GetAttribute("ModuleName") == self.moduleName:
                        return parameterNode
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            if self.isSingletonParameterNode:
                node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            msec = getattr(self, "messageDelay", None) or msec or requestedDelay or 100
            slicer.util.delayDisplay(message, msec)

    module = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
    return module
