"""The HTTP API's request and answer models (pydantic), and the parameters and error answers its routes declare.

The task request models (``ReportRequest``, ``AskRequest``, ...) are built from the task registry
(:func:`task_request_model`): :class:`TaskOptions` plus one field per argument of the task, typed by its
:class:`~M3DAssistantLib.tasks.ArgumentKind`, and an ``analysis`` object with the task's analysis options
(:attr:`~M3DAssistantLib.tasks.Task.options`: ``Analysis`` or, for segmentation, ``SegmentationAnalysis``).
Built rather than written out so that a new task gets its request model from its registry entry alone; the OpenAPI
schema names them as before (``Testing/serving/test_server.py`` pins it).
"""

import functools
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from fastapi import Body, Header, Path
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, create_model

from ..geometry import RasRoi
from ..preprocessing import DisplayWindow
from ..results import MAX_EVIDENCE_STEPS, AnalysisOptions
from ..tasks import STREAMING_TASKS, ArgumentKind, Option, Task


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Text = Annotated[str, Field(max_length=200_000)]
Vec3 = tuple[FiniteFloat, FiniteFloat, FiniteFloat]


class ErrorBody(BaseModel):
    """Every error answer."""

    detail: str = Field(description="what went wrong and how to fix it")
    error: str = Field(description="exception name, e.g. InputError, GeometryError, VolumeNotFoundError")


class SamplingModel(_Strict):
    """How tokens are chosen (greedy by default)."""

    max_new_tokens: int = Field(256, ge=1, le=4096, description="capped by the server's limits.max_new_tokens")
    min_new_tokens: int = Field(0, ge=0, le=4096, description="> 0 suppresses the end of the answer until then")
    do_sample: bool = False
    temperature: FiniteFloat = Field(1.0, gt=0, le=100)
    top_p: FiniteFloat = Field(0.9, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1)


class RoiModel(_Strict):
    """A box in RAS (mm): centre, full edge lengths, and the 3x3 ``axes`` matrix as a list of rows (its columns are
    the box's edge directions; identity when omitted)."""

    center: Vec3
    size: Vec3
    axes: Optional[tuple[Vec3, Vec3, Vec3]] = None


class DisplayWindowModel(_Strict):
    """The window the reader sees the volume in (Slicer's window/level, the DICOM WindowCenter/WindowWidth)."""

    center: FiniteFloat
    width: FiniteFloat = Field(gt=0)
    source: str = Field("display", max_length=32, pattern=r"^[\w .()-]*$",
                        description='where it comes from, e.g. "Slicer" or "DICOM" (shown in the provenance)')


Modality = Annotated[str, Field(max_length=16, pattern=r"^[A-Za-z0-9 _]+$", description="DICOM Modality, e.g. CT")]
DISPLAY_WINDOW_FIELD = Field(None, description="the window the reader sees the volume in: the default of the tasks "
                                               "trained on display-window images (report, VQA, retrieval) when no "
                                               "window is chosen")
MODALITY_FIELD = Field(None, description="the volume's DICOM Modality (CT, MR, ...); without it CT is recognised by "
                                         "its values")


class TaskOptions(_Strict):
    """Preprocessing of the volume (as ``InferenceEngine.set_volume``) and sampling."""

    window: Union[Annotated[str, Field(max_length=64)], tuple[FiniteFloat, FiniteFloat], None] = Field(
        None, description='a preset ("abdomen", "lung", ...), "percentile", "minmax", or [center, width] in HU; '
                          "none: each task's own default")
    display_window: Optional[DisplayWindowModel] = DISPLAY_WINDOW_FIELD
    modality: Optional[Modality] = MODALITY_FIELD
    roi: Optional[RoiModel] = Field(None, description="crop the volume to this RAS box first")
    slice_range: Optional[tuple[int, int]] = Field(None, description="half-open [start, stop) range of K indices")
    sampling: SamplingModel = Field(default_factory=SamplingModel)


class RetrieveTextsRequest(_Strict):
    """Rank texts for this volume with M3D-CLIP."""

    texts: list[Annotated[str, Field(max_length=10_000)]] = Field(min_length=1, max_length=1024)
    labels: Optional[list[Annotated[str, Field(max_length=1_000)]]] = Field(None, max_length=1024)
    window: Union[Annotated[str, Field(max_length=64)], tuple[FiniteFloat, FiniteFloat], None] = None
    display_window: Optional[DisplayWindowModel] = DISPLAY_WINDOW_FIELD
    modality: Optional[Modality] = MODALITY_FIELD


class RetrieveVolumesRequest(_Strict):
    """Rank uploaded volumes for a text with M3D-CLIP."""

    text: Text
    volume_ids: list[Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]] = Field(min_length=1, max_length=256)
    labels: Optional[list[Annotated[str, Field(max_length=1_000)]]] = Field(None, max_length=256)
    window: Union[Annotated[str, Field(max_length=64)], tuple[FiniteFloat, FiniteFloat], None] = None
    display_windows: Optional[list[Optional[DisplayWindowModel]]] = Field(
        None, max_length=256, description="one per volume (null where unknown): each volume's default window")
    modalities: Optional[list[Optional[Modality]]] = Field(None, max_length=256, description="one per volume")


class SelfCheckRequest(_Strict):
    """``m3d selfcheck`` on the server's model and its bundled CT with ground-truth labels."""

    conventions: Literal["default", "all"] = Field(
        "default", description="default: each task's own convention; all: every task under every convention")
    max_new_tokens: int = Field(64, ge=1, le=512, description="answer length (greedy decoding)")
    structures: Optional[list[Annotated[str, Field(min_length=1, max_length=64)]]] = Field(
        None, min_length=1, max_length=32, description="what to segment and locate (default: liver, spleen, right and "
                                                       "left kidney, stomach, aorta)")


class CancelRequest(_Strict):
    request_id: Optional[str] = Field(None, max_length=64, description="omit to cancel every request")


# ------------------------------------------------------------------------------------------------ task requests
_CHOICE = Annotated[str, Field(max_length=10_000)]


def _argument_field(kind: ArgumentKind, description: Optional[str]) -> tuple[Any, Any]:
    """(type, pydantic Field) of a task argument's JSON field, by its kind."""
    if kind is ArgumentKind.TEXT:
        return Text, Field(description=description)
    if kind is ArgumentKind.HISTORY:
        return list[tuple[Text, Text]], Field(default_factory=list, max_length=64, description=description)
    if kind is ArgumentKind.CHOICES:
        return list[_CHOICE], Field(max_length=64, description=description)
    if kind is ArgumentKind.REGION:
        return RoiModel, Field(description=description)
    raise ValueError(f"no request field for {kind} arguments")


def _option_field(option: Option) -> tuple[Any, Any]:
    """(type, pydantic Field) of an analysis option, from its type and default in AnalysisOptions."""
    if option.type is bool:
        return bool, Field(option.default, description=option.help)
    return int, Field(option.default, ge=1, le=MAX_EVIDENCE_STEPS, description=option.help)


@functools.lru_cache(maxsize=None)
def analysis_model(options: tuple[Option, ...]) -> type[_Strict]:
    """The ``analysis`` object of a task request: one field per option the task takes."""
    name = "SegmentationAnalysis" if any(o.segmentation for o in options) else "Analysis"
    fields = {option.name: _option_field(option) for option in options}
    model = create_model(name, __base__=_Strict, __module__=__name__, **fields)
    model.__doc__ = "What to compute beyond the answer (docs/analysis.md); omitted fields keep their defaults."
    return model


@functools.lru_cache(maxsize=None)
def task_request_model(task: Task) -> type[TaskOptions]:
    """The request body of ``POST /v1/volumes/{id}/{task.key}``: the volume's options and sampling
    (:class:`TaskOptions`), then the task's arguments under their JSON names, then its ``analysis`` options."""
    fields: dict[str, Any] = {argument.field: _argument_field(argument.kind, argument.description)
                              for argument in task.arguments}
    if task.options:
        model = analysis_model(task.options)
        fields["analysis"] = (model, Field(default_factory=model))
    return create_model(task.request_model, __base__=TaskOptions, __module__=__name__, **fields)


def engine_analysis(body: TaskOptions) -> Optional[AnalysisOptions]:
    """The engine's ``analysis=`` from a request body: None when every option keeps its default (the engine method
    is then called exactly as before the options existed)."""
    model = getattr(body, "analysis", None)
    if model is None:
        return None
    analysis = AnalysisOptions(**model.model_dump())
    return analysis if analysis.requested() else None


TASK_REQUESTS: dict[str, type[TaskOptions]] = {task.key: task_request_model(task) for task in STREAMING_TASKS}


def ras_roi(model: RoiModel) -> RasRoi:
    return RasRoi(model.center, model.size, model.axes if model.axes is not None else np.eye(3))


def display_window(model: Optional[DisplayWindowModel]) -> Optional[DisplayWindow]:
    return None if model is None else DisplayWindow(model.center, model.width, model.source or "display")


def engine_arguments(task: Task, body: TaskOptions) -> tuple:
    """The engine method's positional arguments from a request body, by argument kind."""
    values = []
    for argument in task.arguments:
        value = getattr(body, argument.field)
        if argument.kind is ArgumentKind.HISTORY:
            value = [tuple(turn) for turn in value]
        elif argument.kind is ArgumentKind.CHOICES:
            value = list(value)
        elif argument.kind is ArgumentKind.REGION:
            value = ras_roi(value)
        values.append(value)
    return tuple(values)


# ----------------------------------------------------------------------------------- route parameters and errors
ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "bad input"), (401, "missing or wrong token"), (413, "too large"))}
VOLUME_ERRORS = {**ERRORS, 404: {"model": ErrorBody, "description": "unknown volume"}}
TASK_ERRORS = {**VOLUME_ERRORS, 409: {"model": ErrorBody, "description": "cancelled"},
               503: {"model": ErrorBody, "description": "queue full"}}
OPTIONAL_BODY = Body(None)
VOLUME_ID = Path(pattern=r"^[0-9a-f]{32}$", description="content hash returned by POST /v1/volumes")
REQUEST_ID = Header(None, alias="X-M3D-Request-Id", max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                    description="your id for this request, to cancel it with POST /v1/cancel")
