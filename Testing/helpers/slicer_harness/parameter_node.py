"""``slicer.parameterNodeWrapper`` for the field and widget types our modules use, as Slicer's works.

Follows Slicer's ``Base/Python/slicer/parameterNodeWrapper`` (wrapper.py, serializers.py, validators.py,
guiConnectors.py):

* ``@parameterNodeWrapper`` turns the annotated fields into properties stored in the MRML parameter node
  (``vtkMRMLScriptedModuleNode``): str as is, int/float as ``str(value)``, bool as "True"/"False", ``pathlib.Path`` as
  ``str(path)``, MRML nodes as node references (with an empty parameter of the same name). A missing parameter is
  written with the default when the wrapper is made (the class attribute, else "", 0, False, ``Path()``, None).
* Validation on write, as Slicer's serializers: not None and ``isinstance`` (a float field takes ints, an int field
  does not take floats), ``Choice`` and ``WithinRange`` (ValueError / TypeError, nothing is written).
* ``connectGui(ui)`` binds each widget whose ``SlicerParameterName`` dynamic property names a field, through the
  connector Slicer picks for that widget type (exact type, as Slicer checks): QCheckBox - bool (``stateChanged``),
  QSpinBox/QSlider - int (``valueChanged``, range from ``WithinRange``), QDoubleSpinBox - float or int (``decimals``
  0 for int, range from ``WithinRange``), QComboBox - a ``Choice`` of str/int/float/bool (filled with the choices,
  ``currentIndexChanged``), QLineEdit - str (``textChanged``), ctkPathLineEdit - Path (``currentPathChanged``),
  qMRMLNodeComboBox - node (``nodeTypes`` set from the field's class, ``currentNodeChanged``). The GUI is written from
  the node at once and on every Modified event of the node; a widget change writes the node. Any other pair is an
  error, as in Slicer ("Unable to create GUI connector").
* ``disconnectGui(tag)``; ``StartModify``/``EndModify``/``AddObserver``/``RemoveObserver``/``Modified`` pass to the
  node, so ``VTKObservationMixin`` and ``slicer.util.NodeModify`` work on the wrapper.

Not provided (our modules do not use them): parameter packs, lists/tuples/dicts/unions/enums as fields, value caching
(values are read from the node each time; what a caller sees is the same).
"""

from __future__ import annotations

import pathlib
import typing

import slicer
import vtk

PARAMETER_NAME_PROPERTY = "SlicerParameterName"


class Validator:
    def validate(self, value) -> None:
        raise NotImplementedError


class Choice(Validator):
    def __init__(self, choices) -> None:
        self.choices = choices

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class WithinRange(Validator):
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


def _split(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, list(extras)
    return annotation, []


def _isNodeType(datatype) -> bool:
    return isinstance(datatype, type) and issubclass(datatype, slicer.vtkMRMLNode)


class _Field:
    """One field: its serialization and validation (Slicer's ValidatedSerializer around the type's serializer)."""

    def __init__(self, name: str, annotation, default) -> None:
        self.name, self.annotation = name, annotation
        self.type, self.validators = _split(annotation)
        if self.type not in (str, int, float, bool, pathlib.Path) and not _isNodeType(self.type):
            raise Exception(f"Unable to create serializer for member {name} of type {self.type}")
        if default is _NO_DEFAULT:
            default = {str: "", int: 0, float: 0, bool: False, pathlib.Path: pathlib.Path()}.get(self.type)
        self.default = default

    def validate(self, value) -> None:
        if _isNodeType(self.type):
            if value is not None and not isinstance(value, self.type):
                raise TypeError(f"Value must be of type '{self.type}', is type '{type(value)}' value '{value}'")
        else:
            if value is None:
                raise ValueError("Value must not be None")
            allowed = (int, float) if self.type is float else self.type
            if not isinstance(value, allowed):
                raise TypeError(f"Value must be of type '{allowed}', is type '{type(value)}' value '{value}'")
        for validator in self.validators:
            validator.validate(value)

    def isIn(self, node) -> bool:
        return bool(node.HasParameter(self.name))

    def write(self, node, value) -> None:
        self.validate(value)
        if _isNodeType(self.type):
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(self.name, "True" if value else "False")
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node):
        if _isNodeType(self.type):
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.type is bool:
            return text == "True"
        return self.type(text)


_NO_DEFAULT = object()


def _property(field: _Field):
    return property(lambda self: field.read(self.parameterNode), lambda self, value: field.write(self.parameterNode,
                                                                                                  value))


# ------------------------------------------------------------------------------------------------------ GUI connectors
class _Connector:
    """Slicer's GuiConnector: ``read``/``write`` the widget; ``onChanged(callback)`` connects (None disconnects)."""

    signal = ""

    def __init__(self, widget, field: _Field) -> None:
        self.widget, self.field, self._callback = widget, field, None

    def onChanged(self, callback) -> None:
        signal = getattr(self.widget, self.signal)
        if callback is None and self._callback is not None:
            signal.disconnect(self.changed)
        elif callback is not None and self._callback is None:
            signal.connect(self.changed)
        self._callback = callback

    def changed(self, *arguments) -> None:
        if self._callback:
            self._callback()


class _CheckBoxConnector(_Connector):
    signal = "stateChanged"

    def read(self):
        return self.widget.checked

    def write(self, value) -> None:
        self.widget.checked = value


class _IntConnector(_Connector):
    signal = "valueChanged"

    def __init__(self, widget, field) -> None:
        super().__init__(widget, field)
        withinRange = next((v for v in field.validators if isinstance(v, WithinRange)), None)
        if withinRange is not None:
            widget.setRange(withinRange.minimum, withinRange.maximum)
        else:
            widget.setMinimum(-(2**31))
            widget.setMaximum(2**31 - 1)

    def read(self):
        return self.widget.value

    def write(self, value) -> None:
        self.widget.value = value


class _DoubleConnector(_Connector):
    signal = "valueChanged"

    def __init__(self, widget, field) -> None:
        super().__init__(widget, field)
        if field.type is int:
            widget.decimals = 0
        withinRange = next((v for v in field.validators if isinstance(v, WithinRange)), None)
        widget.minimum = withinRange.minimum if withinRange is not None else float("-inf")
        widget.maximum = withinRange.maximum if withinRange is not None else float("inf")

    def read(self):
        return int(self.widget.value) if self.field.type is int else self.widget.value

    def write(self, value) -> None:
        self.widget.value = int(value) if self.field.type is int else value


class _ComboBoxConnector(_Connector):
    signal = "currentIndexChanged"

    def __init__(self, widget, field) -> None:
        super().__init__(widget, field)
        choice = next((v for v in field.validators if isinstance(v, Choice)), None)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        self.choices = list(choice.choices)
        widget.clear()
        for value in self.choices:
            widget.addItem(str(value))

    def read(self):
        return self.choices[self.widget.currentIndex]

    def write(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Unable to find value {value} in choices {self.choices}")
        self.widget.currentIndex = self.choices.index(value)


class _LineEditConnector(_Connector):
    signal = "textChanged"

    def read(self):
        return self.widget.text

    def write(self, value) -> None:
        if value != self.widget.text:  # as Slicer: writing the same text would move the cursor
            self.widget.text = value


class _PathConnector(_Connector):
    signal = "currentPathChanged"

    def read(self):
        return pathlib.Path(self.widget.currentPath)

    def write(self, value) -> None:
        self.widget.currentPath = str(value)


class _NodeComboBoxConnector(_Connector):
    signal = "currentNodeChanged"

    def __init__(self, widget, field) -> None:
        super().__init__(widget, field)
        widget.nodeTypes = [field.type.__name__]

    def read(self):
        return self.widget.currentNode()

    def write(self, value) -> None:
        self.widget.setCurrentNode(value)


def _createConnector(widget, field: _Field) -> _Connector:
    import ctk
    import qt

    kind = type(widget)
    if field.type is bool and kind is qt.QCheckBox:
        return _CheckBoxConnector(widget, field)
    if field.type is int and kind in (qt.QSpinBox, qt.QSlider):
        return _IntConnector(widget, field)
    if field.type in (int, float) and kind is qt.QDoubleSpinBox:
        return _DoubleConnector(widget, field)
    if field.type in (int, float, str, bool) and kind is qt.QComboBox:
        return _ComboBoxConnector(widget, field)
    if field.type is str and kind is qt.QLineEdit:
        return _LineEditConnector(widget, field)
    if field.type is pathlib.Path and kind is ctk.ctkPathLineEdit:
        return _PathConnector(widget, field)
    if _isNodeType(field.type) and kind is slicer.qMRMLNodeComboBox:
        return _NodeComboBoxConnector(widget, field)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{field.annotation}' to widget type "
                       f"'{kind.__name__}'")


# ------------------------------------------------------------------------------------------------------ the wrapper
def _init(self, parameterNode) -> None:
    self.parameterNode = parameterNode
    self._parameterGUIs = {}
    self._guiObserverTags = {}
    self._nextTag = 0
    self._updatingGUI = False
    for field in self.allParameters.values():
        if not field.isIn(parameterNode):
            field.write(parameterNode, field.default)


def _updateGUIFromParameterNode(self) -> None:
    if self._updatingGUI:
        return
    self._updatingGUI = True
    try:
        with slicer.util.NodeModify(self):
            for mapping in self._parameterGUIs.values():
                for name, connector in mapping.items():
                    connector.write(getattr(self, name))
    finally:
        self._updatingGUI = False


def _connectParametersToGui(self, mapping: dict) -> int:
    connectors = {name: _createConnector(widget, self.allParameters[name]) for name, widget in mapping.items()}
    tag = self._nextTag
    self._nextTag += 1
    self._parameterGUIs[tag] = connectors
    for name, connector in connectors.items():
        connector.write(getattr(self, name))

        def guiChanged(name=name, connector=connector):
            with slicer.util.NodeModify(self):
                if not self._updatingGUI:
                    setattr(self, name, connector.read())

        connector.onChanged(guiChanged)
    self._guiObserverTags[tag] = self.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                                  lambda caller, event: _updateGUIFromParameterNode(self))
    return tag


def _connectGui(self, gui) -> int:
    """Bind the widgets of ``gui`` (a widget: its children; else the attributes of a ``childWidgetVariables``
    object) that have a ``SlicerParameterName`` property."""
    if getattr(gui, "isWidgetType", lambda: False)():
        widgets = gui.findChildren(__import__("qt").QWidget)
    else:
        widgets = list(gui.__dict__.values())
    mapping = {}
    for widget in widgets:
        name = widget.property(PARAMETER_NAME_PROPERTY)
        if name:
            if name not in self.allParameters:
                raise ValueError(f"Cannot find a param with the given name: {name}")
            mapping[name] = widget
    return _connectParametersToGui(self, mapping)


def _disconnectGui(self, tag) -> None:
    for connector in self._parameterGUIs.pop(tag, {}).values():
        connector.onChanged(None)
    if tag in self._guiObserverTags:
        self.RemoveObserver(self._guiObserverTags.pop(tag))


def parameterNodeWrapper(classtype=None):
    """Class decorator: typed properties over a parameter node and GUI binding (see the module docstring)."""

    def wrap(cls):
        fields = {}
        for name, annotation in typing.get_type_hints(cls, include_extras=True).items():
            field = _Field(name, annotation, cls.__dict__.get(name, _NO_DEFAULT))
            fields[name] = field
            setattr(cls, name, _property(field))
        cls.allParameters = fields
        cls.__init__ = _init
        cls.dataType = staticmethod(lambda name: fields[name].annotation)
        cls.default = lambda self, name: fields[name].default
        cls.getValue = lambda self, name: getattr(self, name)
        cls.setValue = lambda self, name, value: setattr(self, name, value)
        cls.connectGui = _connectGui
        cls.connectParametersToGui = _connectParametersToGui
        cls.disconnectGui = _disconnectGui
        cls.StartModify = lambda self: self.parameterNode.StartModify()
        cls.EndModify = lambda self, wasModifying: self.parameterNode.EndModify(wasModifying)
        cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
            event, callback, priority)
        cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
        cls.Modified = lambda self: self.parameterNode.Modified()
        cls._is_parameter_node_wrapper = True
        return cls

    return wrap if classtype is None else wrap(classtype)
