"""Slicer's PythonQt conventions on PySide6 objects, and the ``qt`` module built from PySide6.

Slicer's Python talks to Qt through PythonQt, which differs from PySide6 in a few ways. Each difference is translated
here once, for every QObject (also those Qt creates itself, such as a combo box's line edit or a scroll bar):

* **Properties are attributes**: ``label.text`` is the ``text`` Q_PROPERTY's value and ``button.enabled = False``
  writes it (PySide6: ``label.text()`` / ``button.setEnabled(False)``). A property wins over a method of the same
  name, as in PythonQt; methods that are not property getters stay methods (``setHtml``, ``setRange``, ...).
  ``obj.name`` is ``objectName`` (``slicer.util.childWidgetVariables`` relies on it).
* **String signals**: ``obj.connect("clicked(bool)", slot)`` / ``obj.disconnect(...)``. A slot that takes fewer
  arguments than the signal gets the first ones, as PythonQt does. An exception in such a slot is printed and
  recorded (PythonQt prints it to the console; the test harness fails the test unless it expected it); it never
  reaches Qt. A signal that does not exist is an error here (PythonQt would only print a warning, and the connection
  would silently do nothing in Slicer).
* Signal signatures that name VTK or MRML pointer types (``currentNodeChanged(vtkMRMLNode*)``,
  ``mrmlSceneChanged(vtkMRMLScene*)``) are the Python-object signals of the harness's MRML widgets.
* ``exec_()`` is ``exec()`` (Slicer's ``slicer.util`` calls ``exec_``).
* ``qt.QFileDialog.getOpenFileName``/``getOpenFileNames``/``getSaveFileName`` return the path(s) only, as in PythonQt.
* Enums are reached as in PythonQt (``qt.Qt.AlignLeft``, ``qt.QMessageBox.Ok``): PySide6 >= 6.4 accepts these
  short names, so nothing is translated there.

Nothing else is changed: the objects are PySide6's own, with Qt's behaviour.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import traceback
import types
from collections.abc import Callable

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

#: Exceptions raised in slots connected with string signatures: ``(signature, exception)``; the harness checks it.
SLOT_ERRORS: list[tuple[str, BaseException]] = []

# Pointer types that PythonQt passes as wrapped VTK objects; the harness's widgets declare those signals as ``object``.
_PYTHON_OBJECT_TYPES = re.compile(r"^(vtk\w+|qMRML\w+|qSlicer\w+)\s*\*$")


def _signature_parts(signature: str) -> tuple[str, list[str]]:
    name, _, rest = signature.partition("(")
    arguments = [a.strip() for a in rest.rstrip(")").split(",") if a.strip()]
    return name.strip(), arguments


def _find_signal(obj: QtCore.QObject, signature: str) -> str:
    """The meta-object signature of the signal PythonQt's ``signature`` names (translated as the module docstring
    says); AttributeError naming the signals of that name when there is none."""
    meta = QtCore.QObject.metaObject(obj)
    normalized = QtCore.QMetaObject.normalizedSignature(signature).data().decode()
    if meta.indexOfSignal(normalized) >= 0:
        return normalized
    name, wanted = _signature_parts(normalized)
    wanted = ["PyObject" if _PYTHON_OBJECT_TYPES.match(a) else a for a in wanted]
    candidates = []
    for index in range(meta.methodCount()):
        method = meta.method(index)
        if method.methodType() != QtCore.QMetaMethod.MethodType.Signal:
            continue
        found = method.methodSignature().data().decode()
        found_name, found_arguments = _signature_parts(found)
        if found_name != name:
            continue
        candidates.append(found)
        if found_arguments == wanted:
            return found
    raise AttributeError(f"{meta.className()} has no signal {signature!r}"
                         + (f" (it has {', '.join(candidates)})" if candidates else ""))


def _accepted_arguments(slot: Callable) -> int | None:
    """How many positional arguments ``slot`` takes (None: any number)."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in parameters:
        if parameter.kind is parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


class _SlotCall:
    """The callable Qt calls for a string connection: PythonQt's argument trimming and error handling."""

    def __init__(self, signature: str, slot: Callable) -> None:
        self.signature, self.slot, self.accepted = signature, slot, _accepted_arguments(slot)

    def __call__(self, *arguments):
        if self.accepted is not None:
            arguments = arguments[:self.accepted]
        try:
            self.slot(*arguments)
        except Exception as error:  # PythonQt prints it; the harness records it and fails the test
            SLOT_ERRORS.append((self.signature, error))
            logging.error("Exception in the slot of %s:\n%s", self.signature, traceback.format_exc())


def _isPythonQtSignature(signal, arguments) -> bool:
    """``"clicked(bool)", slot``: PythonQt's form (PySide6's SIGNAL() strings start with a digit)."""
    return (isinstance(signal, str) and "(" in signal and signal[:1] not in "0123456789" and len(arguments) == 1
            and callable(arguments[0]))


def _connect(self, signal, *arguments):
    """PythonQt's ``obj.connect("signal(args)", callable)``; PySide6's own forms otherwise."""
    if _isPythonQtSignature(signal, arguments):
        signature = _find_signal(self, signal)
        call = _SlotCall(signal, arguments[0])
        slots = self.__dict__.setdefault("_pythonqt_slots", {})
        slots.setdefault((signature, arguments[0]), []).append(call)
        if not _ORIGINAL["connect"](self, QtCore.SIGNAL(signature), call):
            raise RuntimeError(f"could not connect {signal} of {type(self).__name__}")
        return True
    if isinstance(signal, QtCore.QObject):  # obj.connect(sender, SIGNAL(...), slot): PySide6's static form
        return _ORIGINAL["connect"](signal, *arguments)
    return _ORIGINAL["connect"](self, signal, *arguments)


def _disconnect(self, signal=None, *arguments):
    """PythonQt's ``obj.disconnect("signal(args)", callable)``; PySide6's own forms otherwise."""
    if _isPythonQtSignature(signal, arguments):
        signature = _find_signal(self, signal)
        calls = self.__dict__.get("_pythonqt_slots", {}).get((signature, arguments[0]))
        if not calls:
            return False
        return _ORIGINAL["disconnect"](self, QtCore.SIGNAL(signature), calls.pop())
    if isinstance(signal, QtCore.QObject):
        return _ORIGINAL["disconnect"](signal, *arguments)
    return _ORIGINAL["disconnect"](self, *((signal,) if signal is not None else ()), *arguments)


_ORIGINAL: dict[str, Callable] = {}
_PYTHONQT_METHODS = {"connect": _connect, "disconnect": _disconnect}


_READING: set = set()  # (object id, property name) being read: Qt's virtual call looks the name up again
_ORIGINAL_GETATTRIBUTE: dict[type, Callable] = {}  # each binding class's own attribute lookup


def _original_getattribute(obj, name: str):
    for cls in type(obj).__mro__:
        original = _ORIGINAL_GETATTRIBUTE.get(cls)
        if original is not None:
            return original(obj, name)
    return object.__getattribute__(obj, name)


def _property(obj, name: str):
    if name[:1] == "_" or not name:
        return None
    meta = _original_getattribute(obj, "metaObject")()
    index = meta.indexOfProperty(name)
    return meta.property(index) if index >= 0 else None


def _getattribute(self, name: str):
    prop = _property(self, name)
    key = (id(self), name)
    if prop is not None and prop.isReadable() and key not in _READING:
        # A getter that is virtual (sizeHint) makes Shiboken look ``name`` up on the object to find a Python override:
        # that lookup must see the method, not the property again.
        _READING.add(key)
        try:
            return prop.read(self)
        finally:
            _READING.discard(key)
    if name == "name":
        return _original_getattribute(self, "objectName")()
    if name in _PYTHONQT_METHODS:  # Shiboken resolves these on the instance before the class: bind ours here
        return types.MethodType(_PYTHONQT_METHODS[name], self)
    return _original_getattribute(self, name)


def _setattr(self, name: str, value) -> None:
    prop = _property(self, name)
    if prop is None:
        # Python's own attribute setting (Qt's slot wrapper cannot be called once the class's slot is replaced)
        descriptor = inspect.getattr_static(type(self), name, None)
        if hasattr(type(descriptor), "__set__"):
            type(descriptor).__set__(descriptor, self, value)
        else:
            _original_getattribute(self, "__dict__")[name] = value
        return
    if not prop.isWritable():
        raise AttributeError(f"property {name!r} of {type(self).__name__} is read-only")
    if not prop.write(self, value):
        raise TypeError(f"cannot set property {name!r} of {type(self).__name__} to {value!r}")


def _binding_qobject_classes():
    for module in (QtCore, QtGui, QtWidgets, QtUiTools):
        for name in dir(module):
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, QtCore.QObject):
                yield cls


def apply_pythonqt_conventions() -> None:
    """Give every PySide6 QObject PythonQt's attribute, signal and ``exec_`` conventions (idempotent). Each binding
    class has its own attribute slots, so each is given ours."""
    if _ORIGINAL:
        return
    QObject = QtCore.QObject
    for name in ("connect", "disconnect"):
        _ORIGINAL[name] = getattr(QObject, name)
    classes = list(_binding_qobject_classes())
    for cls in classes:
        if "__getattribute__" in cls.__dict__:
            _ORIGINAL_GETATTRIBUTE[cls] = cls.__dict__["__getattribute__"]
    for cls in classes:
        cls.__getattribute__ = _getattribute
        cls.__setattr__ = _setattr
    QObject.connect = _connect
    QObject.disconnect = _disconnect
    for cls in (QtWidgets.QDialog, QtWidgets.QMessageBox, QtWidgets.QMenu, QtCore.QEventLoop,
                QtWidgets.QApplication, QtWidgets.QFileDialog):
        if "exec_" not in cls.__dict__:
            cls.exec_ = cls.exec


class QUiLoader(QtUiTools.QUiLoader):
    """Qt's .ui loader (``slicer.util.loadUI`` uses ``qt.QUiLoader``) with the harness's CTK and MRML widgets
    registered as Slicer's designer plugins register the real ones. The ``<connections>`` whose signals name VTK
    pointer types are made here (Qt's loader cannot: they are Python-object signals in the harness)."""

    custom_widgets: dict[str, type] = {}
    flag_values: dict[str, dict[str, dict[str, int]]] = {}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        for cls in self.custom_widgets.values():
            self.registerCustomWidget(cls)

    def load(self, device, parent=None):
        import xml.etree.ElementTree as ET

        if isinstance(device, QtCore.QIODevice):
            data = bytes(device.readAll().data())
        else:
            data = open(device, "rb").read()
        root = ET.fromstring(data)
        python_connections = []
        for connection in list(root.iterfind("connections/connection")):
            if any(_PYTHON_OBJECT_TYPES.match(a) for a in _signature_parts(connection.findtext("signal"))[1]):
                python_connections.append({c.tag: c.text for c in connection})
                root.find("connections").remove(connection)
        for widget in root.iter("widget"):  # "Class::Flag|..." of a Python widget's int property -> a number
            for name, values in self.flag_values.get(widget.get("class"), {}).items():
                prop = widget.find(f"property[@name='{name}']")
                if prop is not None and len(prop) and prop[0].tag in ("set", "enum"):
                    number = 0
                    for flag in prop[0].text.split("|"):
                        number |= values[flag.strip().split("::")[-1]]
                    prop.remove(prop[0])
                    ET.SubElement(prop, "number").text = str(number)
        buffer = QtCore.QBuffer()
        buffer.setData(QtCore.QByteArray(ET.tostring(root)))
        buffer.open(QtCore.QIODevice.ReadOnly)
        widget = super().load(buffer, parent)
        if widget is None:
            return None
        name = QtCore.QObject.objectName
        by_name = {name(widget): widget}
        by_name.update({name(w): w for w in widget.findChildren(QtCore.QObject) if name(w)})
        for connection in python_connections:
            sender, receiver = by_name[connection["sender"]], by_name[connection["receiver"]]
            slot_name = _signature_parts(connection["slot"])[0]
            sender.connect(connection["signal"], getattr(receiver, slot_name))
        return widget


class QFileDialog(QtWidgets.QFileDialog):
    """PythonQt returns the chosen path(s) of the static dialogs (the selected filter is an output argument there);
    PySide6 returns ``(path(s), selected filter)``."""

    @staticmethod
    def getOpenFileName(*arguments, **options):
        return QtWidgets.QFileDialog.getOpenFileName(*arguments, **options)[0]

    @staticmethod
    def getOpenFileNames(*arguments, **options):
        return QtWidgets.QFileDialog.getOpenFileNames(*arguments, **options)[0]

    @staticmethod
    def getSaveFileName(*arguments, **options):
        return QtWidgets.QFileDialog.getSaveFileName(*arguments, **options)[0]


def make_qt_module(custom_widgets: dict[str, type], flag_values: dict) -> types.ModuleType:
    """The ``qt`` module of Slicer's Python: QtCore, QtGui and QtWidgets in one namespace, and ``QUiLoader``."""
    apply_pythonqt_conventions()
    qt = types.ModuleType("qt", "Qt as Slicer's Python sees it (PySide6 with PythonQt's conventions, test harness)")
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if name.startswith("Q") or name == "Qt":
                setattr(qt, name, getattr(module, name))
    qt.QFileDialog = QFileDialog
    QUiLoader.custom_widgets = dict(custom_widgets)
    QUiLoader.flag_values = dict(flag_values)
    qt.QUiLoader = QUiLoader
    qt.SIGNAL, qt.SLOT = QtCore.SIGNAL, QtCore.SLOT
    return qt


def excepthook_recorder(previous=sys.excepthook):
    """A ``sys.excepthook`` that records what escapes Qt or VTK callbacks (they report errors through it)."""

    def hook(kind, value, tb):
        SLOT_ERRORS.append(("callback", value))
        previous(kind, value, tb)

    return hook
