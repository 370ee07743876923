"""The test harness: our Slicer modules on real Qt widgets, without a Slicer application.

What runs is the real thing wherever it exists outside Slicer: Qt widgets (PySide6, offscreen), MRML and the module
logics (slicer-core), and Slicer's own ``slicer.util`` (slicer-core ships it: ``loadUI``, ``childWidgetVariables``,
``VTKObservationMixin``, ``tryWithErrorDisplay``, ``messageBox``, ``confirm...Display``, ``getModuleLogic``,
``selectModule`` run unchanged). The harness adds only what exists in the Slicer application alone, each in one
place:

* ``pythonqt``: PythonQt's conventions on PySide6 (properties as attributes, ``connect("signal(args)", slot)``,
  ``exec_``) and the ``qt`` module. PySide6 is used because it is Qt's own binding (Qt 6, as Slicer >= 5.9 builds
  it; PythonQt is also generated from Qt's C++ headers), its ``QUiLoader`` is the C++ loader ``slicer.util.loadUI``
  uses, it keeps string signal signatures (``SIGNAL("clicked(bool)")``) and PythonQt's short enum names
  (``qt.Qt.Checked``); PyQt6 has neither, PyQt5 no string signals.
* ``widgets``: ``ctkCollapsibleButton``, ``ctkPathLineEdit``, ``ctkMessageBox``, ``qMRMLWidget`` and
  ``qMRMLNodeComboBox`` (bound to the slicer-core scene), as minimal real Qt widgets.
* ``parameter_node``: ``slicer.parameterNodeWrapper`` (typed fields in the parameter node, ``connectGui``).
* ``application``: ``slicer.app``, the main window and module selector, the module manager, the layout manager's
  slice views (their MRML nodes and logics: the real layout and slice logics, no drawing),
  ``slicer.ScriptedLoadableModule``.

How to test a panel (see ``Testing/slicer/test_assistant_panel.py`` and ``Testing/slicer/test_training_panel.py``)::

    def test_my_button(slicer_harness):                    # fixture in conftest.py: a fresh scene per test
        module = slicer_harness.loadModule("M3DAssistant")  # imports M3DAssistant.py under the harness
        widget = slicer_harness.openModule("M3DAssistant")  # setup() and enter(), as opening it in Slicer
        widget.ui.myNewButton.click()                       # a real click: Qt emits clicked(bool)
        slicer_harness.waitFor(lambda: widget.ui.statusLabel.text == "Done.")
        assert slicer_harness.slotErrors == []              # nothing escaped a slot (checked after each test too)

Other user actions: ``harness.click(button)`` (from inside the event loop, for a slot that opens a dialog),
``harness.clickItem(listWidget, row)``, ``harness.dialogs.queue(qt.QMessageBox.Ok)`` / ``.queue("/path/file.json")``
(the next dialogs' answers: a button, or a path typed into a file dialog), a node's display changed through MRML
(``volume.GetDisplayNode().SetWindowLevel(...)``: the module's observers fire). The M3D Assistant panel set up for
the tiny checkpoint with its real worker: the ``assistant_panel`` fixture (``Testing/helpers/panel_user.py`` has the
user's other actions: typing, choosing, running a task).

A new widget in a .ui file needs nothing here when it is a Qt widget; a new CTK or MRML class needs a class in
``widgets.py`` (and in ``CUSTOM_WIDGETS``) with the properties and signals the module uses; a new parameter-node
field type or widget binding needs a connector in ``parameter_node.py`` that does what Slicer's connector does.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
MODULES = ("M3DAssistant", "M3DTraining")


class _Patches:
    """Sets attributes and ``sys.modules`` entries and puts them back (pytest's monkeypatch, without pytest)."""

    def __init__(self) -> None:
        self._undo = []

    def setattr(self, obj, name, value) -> None:
        missing = object()
        old = getattr(obj, name, missing)
        self._undo.append(lambda: delattr(obj, name) if old is missing else setattr(obj, name, old))
        setattr(obj, name, value)

    def setmodule(self, name, module) -> None:
        old = sys.modules.get(name)
        self._undo.append(lambda: sys.modules.pop(name, None) if old is None else sys.modules.__setitem__(name, old))
        sys.modules[name] = module

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


class DialogAnswers:
    """Answers modal dialogs as a user would: each dialog that opens gets the next answer of the queue, what was shown
    is kept in ``shown``. A ``QMessageBox.StandardButton`` is clicked on the dialog's own button; a path (str or
    ``Path``) is typed into a file dialog's file name field and accepted (Qt's own checks then run, e.g. the "replace
    it?" question, the next answer); ``QDialog.Rejected`` closes a dialog unanswered."""

    def __init__(self) -> None:
        from PySide6 import QtCore

        self.answers: list = []
        self.shown: list[dict] = []
        self._answering = None  # the file dialog being accepted (its accept runs after this timer's slot)
        self._timer = QtCore.QTimer()
        self._timer.setInterval(20)
        self._timer.timeout.connect(self._answer)
        self._timer.start()

    def queue(self, *answers) -> None:
        self.answers.extend(answers)

    def _answer(self) -> None:
        from PySide6 import QtCore, QtWidgets

        dialog = QtWidgets.QApplication.activeModalWidget()
        if dialog is None or dialog is self._answering:
            return
        record = {"title": dialog.windowTitle, "text": getattr(dialog, "text", ""),
                  "detailedText": getattr(dialog, "detailedText", ""), "class": type(dialog).__name__}
        self.shown.append(record)
        if not self.answers:
            logging.error("Test harness: a dialog opened that the test did not expect: %s", record)
            dialog.reject()
            return
        answer = self.answers.pop(0)
        if isinstance(answer, (str, Path)):
            if not isinstance(dialog, QtWidgets.QFileDialog):
                raise AssertionError(f"a path was queued for {record}, which is not a file dialog")
            dialog.findChild(QtWidgets.QLineEdit, "fileNameEdit").setText(str(answer))
            # accept() may open Qt's own question (modal, with its own event loop): not from inside this slot
            self._answering = dialog
            QtCore.QTimer.singleShot(0, dialog.accept)
            QtCore.QTimer.singleShot(0, lambda: setattr(self, "_answering", None))
            return
        button = dialog.button(answer) if isinstance(dialog, QtWidgets.QMessageBox) else None
        if button is not None:
            button.click()
        else:
            dialog.done(int(answer.value) if hasattr(answer, "value") else int(answer))

    def stop(self) -> None:
        self._timer.stop()


class UrlOpenings:
    """What ``QDesktopServices.openUrl`` was asked to open (file manager, browser): recorded, not opened."""

    def __init__(self) -> None:
        from PySide6 import QtCore

        class Receiver(QtCore.QObject):
            @QtCore.Slot(QtCore.QUrl)
            def openUrl(receiver, url):
                self.opened.append(url.toLocalFile() or url.toString())

        self.opened: list[str] = []
        self.receiver = Receiver()


class SlicerHarness:
    """Our modules under a Slicer-like application on real Qt (see the package docstring)."""

    def __init__(self, scene, logics, keepalive, settingsFolder: str | None = None) -> None:
        self.scene, self.logics, self._keepalive = scene, logics, keepalive
        self._patches = _Patches()
        self._settingsFolder = settingsFolder or tempfile.mkdtemp(prefix="m3d-harness-settings-")
        self.dialogs = None
        self.urls = None

    # ---------------------------------------------------------------------------------------------- install
    def install(self) -> SlicerHarness:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        import slicer
        import vtk  # noqa: F401  (the real vtk, before anything else imports it)

        from . import application, parameter_node, pythonqt, widgets

        qt = pythonqt.make_qt_module(widgets.CUSTOM_WIDGETS, widgets.UI_FLAG_VALUES)
        app = qt.QApplication.instance()
        if app is None:
            app = application.qSlicerApplication(["Slicer"])
            app.setApplicationName("Slicer")
            app.setOrganizationName("M3D test harness")
        if not isinstance(app, application.qSlicerApplication):
            raise RuntimeError("another QApplication exists in this process; the harness needs its own")
        from PySide6 import QtCore

        QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
        QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, self._settingsFolder)
        app.setTestingEnabled(True)
        app.temporaryPath = tempfile.gettempdir()
        app.moduleManager().modules.clear()
        app.setLayoutManager(application.qSlicerLayoutManager(self.scene, self._keepalive[0]))
        self.app = app
        ctk = types.ModuleType("ctk", "CTK widgets of the test harness")
        for cls in (widgets.ctkCollapsibleButton, widgets.ctkPathLineEdit, widgets.ctkMessageBox):
            setattr(ctk, cls.__name__, cls)
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        for name in ("parameterNodeWrapper", "Choice", "WithinRange"):
            setattr(wrapper, name, getattr(parameter_node, name))

        p = self._patches
        for name, module in (("qt", qt), ("ctk", ctk), ("slicer.i18n", i18n),
                             ("slicer.parameterNodeWrapper", wrapper)):
            p.setmodule(name, module)
        p.setmodule("slicer.ScriptedLoadableModule", application.make_scripted_loadable_module())
        self.mainWindow = application.qSlicerMainWindow()
        self.modules = types.SimpleNamespace(**{name: types.SimpleNamespace(logic=lambda lg=lg: lg)
                                                for name, lg in self.logics.items()})
        for name, value in (("app", app), ("mrmlScene", self.scene), ("modules", self.modules),
                            ("qMRMLWidget", widgets.qMRMLWidget), ("qMRMLNodeComboBox", widgets.qMRMLNodeComboBox),
                            ("qSlicerScriptedLoadableModule", application.qSlicerScriptedLoadableModule),
                            ("qSlicerScriptedLoadableModuleWidget", application.qSlicerScriptedLoadableModuleWidget)):
            p.setattr(slicer, name, value)
        p.setattr(sys, "excepthook", pythonqt.excepthook_recorder(sys.excepthook))
        for module in MODULES:
            if str(REPO / module) not in sys.path:
                sys.path.insert(0, str(REPO / module))
        self.dialogs = DialogAnswers()
        self.urls = UrlOpenings()
        qt.QDesktopServices.setUrlHandler("file", self.urls.receiver, "openUrl")
        pythonqt.SLOT_ERRORS.clear()
        return self

    def uninstall(self) -> None:
        """Close the module panels (cleanup), the windows, and undo every patch."""
        from PySide6 import QtCore, QtGui, QtWidgets

        for module in list(self.app.moduleManager().modules.values()):
            if module._widget is not None:
                if module._widget.isEntered:
                    module._widget.exit()
                module._widget._self.cleanup()
                module._widget.deleteLater()
        self.app.moduleManager().modules.clear()
        self.app.layoutManager().close()
        self.app.setLayoutManager(None)
        self.dialogs.stop()
        QtGui.QDesktopServices.unsetUrlHandler("file")
        self.mainWindow.close()
        self.mainWindow.setObjectName("")  # slicer.util.mainWindow() must not find it again
        self.mainWindow.deleteLater()
        QtWidgets.QApplication.processEvents()
        # deleted now, not when a later test's event loop starts (no loop runs here)
        QtWidgets.QApplication.sendPostedEvents(None, QtCore.QEvent.DeferredDelete)
        self._patches.undo()

    # ---------------------------------------------------------------------------------------------- modules
    def loadModule(self, name: str) -> types.ModuleType:
        """Import ``<name>/<name>.py`` (as Slicer loads a scripted module) and register it in the module manager."""
        path = REPO / name / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        self._patches.setmodule(name, module)
        spec.loader.exec_module(module)
        from .application import qSlicerScriptedLoadableModule

        entry = qSlicerScriptedLoadableModule(name, module, str(path))
        self.app.moduleManager().modules[name] = entry
        setattr(self.modules, name.lower(), entry)
        return module

    def openModule(self, name: str):
        """Select the module in the main window (its panel is set up on first use, then entered); returns the
        module's Python widget."""
        import slicer

        if self.app.moduleManager().module(name) is None:
            self.loadModule(name)
        slicer.util.selectModule(name)
        return self.app.moduleManager().module(name).widgetRepresentation().self()

    def panel(self, name: str):
        """The Qt panel of a module (what Slicer shows in its module panel)."""
        return self.app.moduleManager().module(name).widgetRepresentation()

    # ---------------------------------------------------------------------------------------------- events
    @property
    def slotErrors(self) -> list:
        from .pythonqt import SLOT_ERRORS

        return SLOT_ERRORS

    def processEvents(self, seconds: float = 0.0) -> None:
        end = time.monotonic() + seconds
        while True:
            self.app.processEvents()
            if time.monotonic() >= end:
                return
            time.sleep(0.005)

    def waitFor(self, condition, timeout: float = 60.0, what: str = "the condition") -> None:
        """Run Qt's event loop (timers fire and slots run inside a running loop, as in Slicer) until ``condition()``
        is true; AssertionError after ``timeout`` seconds."""
        from PySide6 import QtCore

        end = time.monotonic() + timeout
        failure = []
        loop = QtCore.QEventLoop()
        timer = QtCore.QTimer()
        timer.setInterval(10)

        def check():
            try:
                if condition() or time.monotonic() > end:
                    loop.quit()
            except Exception as error:  # raised here, not inside Qt
                failure.append(error)
                loop.quit()

        timer.timeout.connect(check)
        timer.start()
        try:
            if not condition():
                loop.exec()
        finally:
            timer.stop()
        if failure:
            raise failure[0]
        if not condition():
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def click(self, button) -> None:
        """Click a button from inside the event loop, as a user's click arrives in Slicer (a dialog the slot opens
        then runs as it does there)."""
        from PySide6 import QtCore

        done = []

        def press():
            try:
                button.click()
            finally:
                done.append(True)

        QtCore.QTimer.singleShot(0, press)
        self.waitFor(lambda: bool(done), 300, f"the click on {button.objectName}")

    def clickItem(self, view, row: int) -> None:
        """Click the item in ``row`` of a list view with the mouse (Qt then emits ``itemClicked``/``clicked``)."""
        from PySide6 import QtCore
        from PySide6.QtTest import QTest

        index = view.model().index(row, 0)
        if not index.isValid():
            raise AssertionError(f"{view.objectName} has no row {row}")
        view.scrollTo(index)
        QTest.mouseClick(view.viewport(), QtCore.Qt.LeftButton, QtCore.Qt.NoModifier,
                         view.visualRect(index).center())

    def grab(self, widget, path, width: int = 420) -> Path:
        """Render a widget offscreen to a PNG, laid out at ``width`` pixels and the height its contents need (word-
        wrapped labels included), outside any main window."""
        from PySide6 import QtCore

        parent = widget.parentWidget()
        widget.setParent(None)  # a top-level widget: its own size, not the (hidden) main window's
        widget.setAttribute(QtCore.Qt.WA_DontShowOnScreen, True)
        widget.show()
        try:
            height = widget.sizeHint.height()  # PythonQt: sizeHint is a property
            if widget.hasHeightForWidth():
                height = max(height, widget.heightForWidth(width))
            widget.resize(width, max(height, 100))
            widget.layout().activate()
            self.processEvents()
            if not widget.grab().save(str(path)):
                raise OSError(f"could not write {path}")
        finally:
            widget.hide()
            if parent is not None:
                parent.layout().addWidget(widget) if parent.layout() is not None else widget.setParent(parent)
                if hasattr(parent, "setCurrentWidget"):
                    parent.setCurrentWidget(widget)
        return Path(path)


def make_harness(settingsFolder: str | None = None) -> SlicerHarness:
    """A harness on a fresh slicer-core scene with the module logics (``M3DAssistantLib.scene.headless_slicer``),
    installed; ``uninstall()`` when done."""
    from M3DAssistantLib.scene import headless_slicer

    scene, logics = headless_slicer()
    keepalive = logics.pop("_keepalive")
    return SlicerHarness(scene, logics, keepalive, settingsFolder).install()
