"""The CTK and MRML widgets our .ui files use, as small real Qt widgets with the properties and signals we use.

Slicer's own are C++ (CTK, qMRMLWidgets); these follow their documented behaviour for what the modules touch:

* ``ctkCollapsibleButton``: a header button that shows or hides its contents (``collapsed``, ``contentsCollapsed``).
* ``ctkPathLineEdit``: a path field with a browse button (``currentPath``, ``currentPathChanged(QString)``,
  ``filters``, ``options``, ``nameFilters``, ``settingKey``).
* ``ctkMessageBox``: QMessageBox with the "don't show again" properties ``slicer.util.messageBox`` may set.
* ``qMRMLWidget``: ``setMRMLScene(scene)`` emits ``mrmlSceneChanged(vtkMRMLScene*)``.
* ``qMRMLNodeComboBox``: lists the scene's nodes of ``nodeTypes`` (exact classes unless ``showChildNodeTypes``; nodes
  hidden from editors are left out), an optional "none" entry (``noneEnabled``, ``noneDisplay``), follows nodes
  added to and removed from the scene, and emits ``currentNodeChanged(vtkMRMLNode*)`` and
  ``currentNodeIDChanged(QString)``. As in Slicer, with ``noneEnabled`` false the first node becomes current as soon
  as there is one. Creating, renaming and removing nodes from the combo box's menu are not offered.

Inside these classes Qt's getters are called through the base class (``QtWidgets.QWidget.isVisible(self)``): with
PythonQt's conventions ``self.text`` is the property's value, not the method.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtWidgets
from PySide6.QtCore import Property, Signal

# ctkPathLineEdit's Filter and Option flags have QDir's and QFileDialog's values (ctkPathLineEdit.h).
PATH_FILTERS = {"Dirs": 0x001, "Files": 0x002, "Drives": 0x004, "NoSymLinks": 0x008, "AllEntries": 0x007,
                "Readable": 0x010, "Writable": 0x020, "Executable": 0x040, "Modified": 0x080, "Hidden": 0x100,
                "System": 0x200, "CaseSensitive": 0x800, "NoDot": 0x2000, "NoDotDot": 0x4000,
                "NoDotAndDotDot": 0x6000}
PATH_OPTIONS = {"ShowDirsOnly": 0x1, "DontResolveSymlinks": 0x2, "DontConfirmOverwrite": 0x4, "ReadOnly": 0x20,
                "HideNameFilterDetails": 0x40, "DontUseNativeDialog": 0x10}


class ctkCollapsibleButton(QtWidgets.QAbstractButton):
    """A checkable header (checked = expanded) above its contents, drawn with the style's push-button panel."""

    contentsCollapsed = Signal(bool)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._collapsed = False
        QtWidgets.QAbstractButton.setCheckable(self, True)
        QtWidgets.QAbstractButton.setChecked(self, True)
        QtWidgets.QAbstractButton.toggled.__get__(self).connect(self._onToggled)
        QtWidgets.QWidget.setSizePolicy(self, QtWidgets.QSizePolicy.Preferred, QtWidgets.QSizePolicy.Preferred)
        QtWidgets.QWidget.setContentsMargins(self, 0, self._headerHeight() + 2, 0, 0)

    def _headerHeight(self) -> int:
        return QtWidgets.QWidget.fontMetrics(self).height() + 10

    def getCollapsed(self) -> bool:
        return self._collapsed

    def setCollapsed(self, collapsed: bool) -> None:
        QtWidgets.QAbstractButton.setChecked(self, not collapsed)

    collapsed = Property(bool, getCollapsed, setCollapsed, notify=contentsCollapsed)

    def _onToggled(self, checked: bool) -> None:
        self._collapsed = not checked
        for child in QtCore.QObject.children(self):
            if isinstance(child, QtWidgets.QWidget):
                QtWidgets.QWidget.setVisible(child, checked)
        QtWidgets.QWidget.updateGeometry(self)
        self.contentsCollapsed.emit(self._collapsed)

    def childEvent(self, event) -> None:
        # a child added while collapsed (the .ui sets "collapsed" before adding the contents) starts hidden
        if event.added() and self._collapsed and isinstance(event.child(), QtWidgets.QWidget):
            QtWidgets.QWidget.setVisible(event.child(), False)
        super().childEvent(event)

    def hitButton(self, pos) -> bool:
        return pos.y() < self._headerHeight()

    # Size hints, height for width: QWidget's own, from the layout and the header's top margin (as ctk's, whose
    # contents are laid out below the header the same way).

    def paintEvent(self, event) -> None:
        painter = QtWidgets.QStylePainter(self)
        option = QtWidgets.QStyleOptionButton()
        option.initFrom(self)
        option.rect = QtCore.QRect(0, 0, QtWidgets.QWidget.width(self), self._headerHeight())
        option.state |= QtWidgets.QStyle.State_Raised
        painter.drawPrimitive(QtWidgets.QStyle.PE_PanelButtonCommand, option)
        arrow = QtWidgets.QStyleOption()
        arrow.initFrom(self)
        side = self._headerHeight() // 2
        arrow.rect = QtCore.QRect(6, (self._headerHeight() - side) // 2, side, side)
        painter.drawPrimitive(QtWidgets.QStyle.PE_IndicatorArrowRight if self._collapsed
                              else QtWidgets.QStyle.PE_IndicatorArrowDown, arrow)
        painter.drawText(QtCore.QRect(side + 12, 0, QtWidgets.QWidget.width(self) - side - 12, self._headerHeight()),
                         QtCore.Qt.AlignVCenter | QtCore.Qt.AlignLeft, QtWidgets.QAbstractButton.text(self))


class ctkPathLineEdit(QtWidgets.QWidget):
    """A path field and a "..." button that opens a file dialog (files or folders, as ``filters`` says)."""

    currentPathChanged = Signal(str)
    validInputChanged = Signal(bool)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._filters = PATH_FILTERS["AllEntries"]
        self._options = 0
        self._nameFilters: list[str] = []
        self._settingKey = ""
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._lineEdit = QtWidgets.QLineEdit(self)
        self._browseButton = QtWidgets.QToolButton(self)
        QtWidgets.QAbstractButton.setText(self._browseButton, "...")
        layout.addWidget(self._lineEdit)
        layout.addWidget(self._browseButton)
        QtWidgets.QLineEdit.textChanged.__get__(self._lineEdit).connect(self.currentPathChanged.emit)
        QtWidgets.QAbstractButton.clicked.__get__(self._browseButton).connect(self.browse)

    def getCurrentPath(self) -> str:
        return QtWidgets.QLineEdit.text(self._lineEdit)

    def setCurrentPath(self, path: str) -> None:
        if path != self.getCurrentPath():
            QtWidgets.QLineEdit.setText(self._lineEdit, path or "")

    currentPath = Property(str, getCurrentPath, setCurrentPath, notify=currentPathChanged)
    filters = Property(int, lambda self: self._filters, lambda self, value: setattr(self, "_filters", int(value)))
    options = Property(int, lambda self: self._options, lambda self, value: setattr(self, "_options", int(value)))
    nameFilters = Property("QStringList", lambda self: list(self._nameFilters),
                           lambda self, value: setattr(self, "_nameFilters", list(value)))
    settingKey = Property(str, lambda self: self._settingKey, lambda self, value: setattr(self, "_settingKey", value))

    def browse(self) -> None:
        """The dialog the "..." button opens."""
        if self._filters & PATH_FILTERS["Files"]:
            path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Open", self.getCurrentPath(),
                                                            ";;".join(self._nameFilters))
        else:
            path = QtWidgets.QFileDialog.getExistingDirectory(self, "Open", self.getCurrentPath())
        if path:
            self.setCurrentPath(path)


class ctkMessageBox(QtWidgets.QMessageBox):
    """QMessageBox with ctkMessageBox's "don't show again" properties (not acted on: tests never set them)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._dontShowAgain = False
        self._dontShowAgainKey = ""

    dontShowAgain = Property(bool, lambda self: self._dontShowAgain,
                             lambda self, value: setattr(self, "_dontShowAgain", bool(value)))
    dontShowAgainSettingsKey = Property(str, lambda self: self._dontShowAgainKey,
                                        lambda self, value: setattr(self, "_dontShowAgainKey", value))


class qMRMLWidget(QtWidgets.QWidget):
    """A widget that holds the MRML scene and hands it on through ``mrmlSceneChanged``."""

    mrmlSceneChanged = Signal(object)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None

    def mrmlScene(self):
        return self._scene

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)


class qMRMLNodeComboBox(QtWidgets.QWidget):
    """A combo box of the scene's nodes of some classes (see the module docstring for what it does)."""

    currentNodeChanged = Signal(object)
    currentNodeIDChanged = Signal(str)
    nodeAdded = Signal(object)
    mrmlSceneChanged = Signal(object)

    _SCENE_EVENTS = ("NodeAddedEvent", "NodeRemovedEvent", "EndCloseEvent", "EndImportEvent", "EndBatchProcessEvent",
                     "EndRestoreEvent")

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None
        self._observations: list[int] = []
        self._nodeTypes: list[str] = []
        self._showChildNodeTypes = True
        self._noneEnabled = False
        self._noneDisplay = "None"
        self._flags = {"addEnabled": True, "removeEnabled": True, "renameEnabled": False,
                       "selectNodeUponCreation": True}
        self._currentID = ""
        self._refreshing = False
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._combo = QtWidgets.QComboBox(self)
        QtWidgets.QWidget.setSizePolicy(self._combo, QtWidgets.QSizePolicy.Expanding, QtWidgets.QSizePolicy.Fixed)
        layout.addWidget(self._combo)
        QtWidgets.QComboBox.currentIndexChanged.__get__(self._combo).connect(self._onIndexChanged)

    # -------------------------------------------------------------------------------------------------- properties
    def _setNodeTypes(self, types) -> None:
        self._nodeTypes = [str(t) for t in types]
        self._refresh()

    def _setNoneEnabled(self, enabled) -> None:
        self._noneEnabled = bool(enabled)
        self._refresh()

    def _setNoneDisplay(self, text) -> None:
        self._noneDisplay = str(text)
        self._refresh()

    def _setShowChildNodeTypes(self, show) -> None:
        self._showChildNodeTypes = bool(show)
        self._refresh()

    nodeTypes = Property("QStringList", lambda self: list(self._nodeTypes), _setNodeTypes)
    noneEnabled = Property(bool, lambda self: self._noneEnabled, _setNoneEnabled)
    noneDisplay = Property(str, lambda self: self._noneDisplay, _setNoneDisplay)
    showChildNodeTypes = Property(bool, lambda self: self._showChildNodeTypes, _setShowChildNodeTypes)
    addEnabled = Property(bool, lambda self: self._flags["addEnabled"],
                          lambda self, v: self._flags.__setitem__("addEnabled", bool(v)))
    removeEnabled = Property(bool, lambda self: self._flags["removeEnabled"],
                             lambda self, v: self._flags.__setitem__("removeEnabled", bool(v)))
    renameEnabled = Property(bool, lambda self: self._flags["renameEnabled"],
                             lambda self, v: self._flags.__setitem__("renameEnabled", bool(v)))
    selectNodeUponCreation = Property(bool, lambda self: self._flags["selectNodeUponCreation"],
                                      lambda self, v: self._flags.__setitem__("selectNodeUponCreation", bool(v)))
    currentNodeID = Property(str, lambda self: self._currentID, lambda self, nodeID: self.setCurrentNodeID(nodeID))

    # -------------------------------------------------------------------------------------------------- scene
    def mrmlScene(self):
        return self._scene

    def setMRMLScene(self, scene) -> None:
        if self._scene is not None:
            for tag in self._observations:
                self._scene.RemoveObserver(tag)
        self._observations = []
        self._scene = scene
        if scene is not None:
            for event in self._SCENE_EVENTS:
                self._observations.append(scene.AddObserver(getattr(scene, event), self._onSceneEvent))
            # as Slicer's destructor does: a deleted combo box observes the scene no more
            tags = list(self._observations)
            QtCore.QObject.destroyed.__get__(self).connect(
                lambda *args, scene=scene, tags=tags: [scene.RemoveObserver(tag) for tag in tags])
        self._refresh()
        self.mrmlSceneChanged.emit(scene)

    def _onSceneEvent(self, caller, event) -> None:
        if self._scene is not None and self._scene.IsBatchProcessing():
            return  # refreshed once at EndBatchProcessEvent
        self._refresh()

    def _matches(self, node) -> bool:
        if node.GetHideFromEditors():
            return False
        if self._showChildNodeTypes:
            return any(node.IsA(t) for t in self._nodeTypes)
        return node.GetClassName() in self._nodeTypes

    def nodes(self) -> list:
        if self._scene is None:
            return []
        found = []
        for index in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(index)
            if self._matches(node):
                found.append(node)
        return found

    def nodeCount(self) -> int:
        return len(self.nodes())

    def _refresh(self) -> None:
        """Rebuild the list from the scene, keeping the current node when it is still there."""
        self._refreshing = True
        try:
            self._combo.clear()
            if self._noneEnabled:
                self._combo.addItem(self._noneDisplay, "")
            for node in self.nodes():
                self._combo.addItem(node.GetName(), node.GetID())
            index = QtWidgets.QComboBox.findData(self._combo, self._currentID) if self._currentID else -1
            if index < 0:
                index = 0 if QtWidgets.QComboBox.count(self._combo) else -1
            QtWidgets.QComboBox.setCurrentIndex(self._combo, index)
        finally:
            self._refreshing = False
        self._updateCurrent()

    def _onIndexChanged(self, index: int) -> None:
        if not self._refreshing:
            self._updateCurrent()

    def _updateCurrent(self) -> None:
        index = QtWidgets.QComboBox.currentIndex(self._combo)
        nodeID = QtWidgets.QComboBox.itemData(self._combo, index) if index >= 0 else ""
        nodeID = nodeID or ""
        if nodeID != self._currentID:
            self._currentID = nodeID
            self.currentNodeIDChanged.emit(nodeID)
            self.currentNodeChanged.emit(self.currentNode())

    # -------------------------------------------------------------------------------------------------- selection
    def currentNode(self):
        if not self._currentID or self._scene is None:
            return None
        return self._scene.GetNodeByID(self._currentID)

    def setCurrentNode(self, node) -> None:
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, nodeID: str) -> None:
        index = QtWidgets.QComboBox.findData(self._combo, nodeID) if nodeID else (0 if self._noneEnabled else -1)
        if nodeID and index < 0:
            return  # not listed (another class, or not in the scene): Slicer's combo box ignores it too
        QtWidgets.QComboBox.setCurrentIndex(self._combo, index)

    def selectByName(self, name: str) -> None:
        """What a user does: pick the entry with this text in the list (the "none" entry's text selects none)."""
        index = QtWidgets.QComboBox.findText(self._combo, name)
        if index < 0:
            raise ValueError(f"{name!r} is not in the list {self.itemTexts()}")
        QtWidgets.QComboBox.setCurrentIndex(self._combo, index)

    def itemTexts(self) -> list[str]:
        return [QtWidgets.QComboBox.itemText(self._combo, i) for i in range(QtWidgets.QComboBox.count(self._combo))]


CUSTOM_WIDGETS = {cls.__name__: cls for cls in (ctkCollapsibleButton, ctkPathLineEdit, qMRMLWidget, qMRMLNodeComboBox)}

# Flag values the .ui files write as "ctkPathLineEdit::Files|...": Qt's loader needs them as numbers for a Python
# widget's property.
UI_FLAG_VALUES = {"ctkPathLineEdit": {"filters": PATH_FILTERS, "options": PATH_OPTIONS}}

__all__ = ["CUSTOM_WIDGETS", "UI_FLAG_VALUES", "ctkCollapsibleButton", "ctkMessageBox", "ctkPathLineEdit",
           "qMRMLNodeComboBox", "qMRMLWidget", "QtGui"]
