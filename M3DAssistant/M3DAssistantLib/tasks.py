"""The task registry: each of the eight M3D tasks, named once, with what every layer needs to know about it.

A task has one :class:`Task` entry below; every other spelling of it is derived from that entry:

* ``key`` (``segment_expression``): the engine, client, backend and session method, the HTTP route
  ``POST /v1/volumes/{id}/{key}``, the batch form ``--task key:TEXT``;
* ``logic_name`` (``segmentExpression``, derived: camelCase of ``key``): the module Logic's console method;
* ``cli_command`` (``segment-expression``, derived: ``key`` with dashes unless declared): the ``m3d`` subcommand;
* ``training_name`` (``refseg``): the dataset section, training, evaluation and ``Provenance.task``;
* ``button`` (``segmentExpressionButton``, derived from ``logic_name``): the panel's button in the .ui;
* ``label`` (``Segment by description``): the button text and the conversation view;

and, for the layers that must treat tasks differently, *kinds* instead of names: the :class:`ResultKind` of its
typed result (the wire's ``kind``), the :class:`Output` the session makes of it in the scene, and the
:class:`ArgumentKind` of each argument (how the panel, the CLI, the client and the server read and send it).

What a task computes beyond its answer is declared once too: the analysis options (:data:`OPTIONS`, fields of
:class:`~.results.AnalysisOptions`: confidence, evidence maps, refinement, the REC box next to a mask) and which
tasks take them (:attr:`Task.options`). The engine methods take them as ``analysis=``, the server's request models
as an ``analysis`` object, the CLI as flags (``--evidence``, ``--refine``...), the Logic as keywords
(``evidence=True``) and the panel as check boxes, all from this table.

Adding a ninth task: its prompt builder (and answer parser) in :mod:`.prompts`, its method on
:class:`~.engine.InferenceEngine` (which builds the prompt, runs the model and makes the typed result), an entry here,
and a button in the .ui named :attr:`Task.button`. The server's route and request model, the client
(``M3DClient.run_task``), the backends, the ``m3d`` subcommand, batch, the session (``AssistantSession.run_task``),
the Logic (``runTask``) and the panel follow from the entry; a task whose arguments or result are of a new *kind*
also needs that kind handled where kinds are handled. For users and IDEs it then gets one thin, documented method on
``M3DClient``, ``AssistantSession`` and the Logic, as the eight have (each is one call of the generic method).
``Testing/engine/test_task_registry.py`` checks that every layer offers exactly these tasks, and walks a ninth one
through them.

Light: the standard library, numpy (through :mod:`.prompts` and :mod:`.results`); Slicer's process imports it.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Callable, Optional

from . import prompts
from .errors import InputError
from .geometry import DEFAULT_CONVENTION, TaskPreprocessing, task_preprocessing
from .preprocessing import (
    DISPLAY_WINDOW,
    SEG_PERCENTILES_WINDOW,
    VOLUME_PERCENTILES_WINDOW,
    WINDOW_KINDS,
    DisplayWindow,
    WindowArg,
    default_window,
    resolve_window,
)
from .results import AnalysisOptions, BoxResult, ChoiceResult, RetrievalResult, SegmentationResult, TextResult


class ResultKind(str, enum.Enum):
    """The typed result a task returns; the value is the ``kind`` field of the server's answers."""

    TEXT = "text"
    CHOICE = "choice"
    BOX = "box"
    SEGMENTATION = "segmentation"
    RETRIEVAL = "retrieval"

    @property
    def result_type(self) -> type:
        return RESULT_TYPES[self]


RESULT_TYPES: dict[ResultKind, type] = {
    ResultKind.TEXT: TextResult, ResultKind.CHOICE: ChoiceResult, ResultKind.BOX: BoxResult,
    ResultKind.SEGMENTATION: SegmentationResult, ResultKind.RETRIEVAL: RetrievalResult,
}


def result_kind(result: Any) -> ResultKind:
    """The kind of a typed result (TextResult -> ``text``, ...)."""
    for kind, cls in RESULT_TYPES.items():
        if type(result) is cls:
            return kind
    raise TypeError(f"{type(result).__name__} is not a task result; expected one of "
                    f"{', '.join(cls.__name__ for cls in RESULT_TYPES.values())}")


class Output(enum.Enum):
    """What :class:`~.session.AssistantSession` (and so the Logic and the panel) makes of a finished task."""

    TEXT_NODE = "text node"  # a new text node with the text (None when the model wrote nothing)
    ANSWER = "answer"  # the answer as a string (a choice: the chosen option's text)
    ROI_NODE = "ROI node"  # a new markups ROI node with the box (None when no box came back)
    SEGMENT = "segment"  # a new segment: (segmentation node, segment id), (None, None) without a mask
    RANKING = "ranking"  # [(candidate, score), ...] best first


class ArgumentKind(enum.Enum):
    """How an argument is entered, sent and checked. Each layer handles kinds, never task names:

    * ``TEXT``: one text. Panel: the prompt box; CLI: a positional argument; wire: a JSON string.
    * ``HISTORY``: earlier (question, answer) turns, optional. Session: the conversation about the volume; wire: a
      list of ``[question, answer]`` pairs; not on the CLI.
    * ``CHOICES``: 2 to 8 option texts. Panel: the choices box (``;``-separated); CLI: ``--NAME A B C``; wire: a list.
    * ``REGION``: a box in RAS. Panel: the "Describe ROI" node; session: a markups ROI node or
      :class:`~.geometry.RasRoi`; CLI: ``--NAME FILE.mrk.json``; wire: ``{"center", "size", "axes"}``.
    * ``CANDIDATES``: what retrieval ranks (volume nodes or texts). Panel: the scene's image volumes.
    """

    TEXT = "text"
    HISTORY = "history"
    CHOICES = "choices"
    REGION = "region"
    CANDIDATES = "candidates"


@dataclasses.dataclass(frozen=True)
class Argument:
    """One argument of a task method, in the order the methods take them.

    ``name`` is the engine's and client's parameter name; ``wire_name`` the JSON field when it differs."""

    name: str
    kind: ArgumentKind
    description: Optional[str] = None  # for the OpenAPI schema
    wire_name: Optional[str] = None

    @property
    def field(self) -> str:
        """The JSON field of the server's request body."""
        return self.wire_name or self.name

    @property
    def required(self) -> bool:
        """Every argument but the conversation history (which defaults to none)."""
        return self.kind is not ArgumentKind.HISTORY


@dataclasses.dataclass(frozen=True)
class Option:
    """One analysis option: a field of :class:`~.results.AnalysisOptions` (its type and default come from there).

    ``name`` is the engine's field and the JSON field of the request's ``analysis`` object; :attr:`cli_flag` and
    :attr:`logic_name` are its command-line and console spellings. ``segmentation`` options apply to the tasks whose
    answer carries a mask only; the others to every task the language model answers."""

    name: str
    help: str
    segmentation: bool = False
    cli_file: Optional[str] = None  # the CLI flag takes a file to write what the option computes (and turns it on)

    @property
    def default(self) -> Any:
        return getattr(AnalysisOptions(), self.name)

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def logic_name(self) -> str:
        first, *rest = self.name.split("_")
        return first + "".join(part.capitalize() for part in rest)


OPTIONS: tuple[Option, ...] = (
    Option("confidence", "probabilities of the answer's tokens, of each option of a multiple choice and of a mask's "
                         "voxels (no extra model call)"),
    Option("evidence", "an evidence map: which parts of the volume the answer depends on (integrated gradients on "
                       "the model input, mapped to the volume's grid), with its most relevant slice ranges",
           cli_file="the evidence map as a volume on the input's grid (.nrrd or .nii.gz)"),
    Option("evidence_steps", "integrated-gradients steps of the evidence map (1 = gradient x input; each step is a "
                             "forward and a backward pass)"),
    Option("refine", "zoom-in refinement of the mask: the region around it is shown to the model again at full "
                     "resolution, with the same [SEG] prompt", segmentation=True),
    Option("locate", "also the model's own box (its REC answer) for the same text, in the same request",
           segmentation=True),
)
"""The analysis options, in the order forms show them."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One task, as every layer sees it. See the module docstring for the names and where they are used."""

    key: str  # snake_case: engine / client / session method, HTTP route, batch name
    label: str  # the panel's button text
    training_name: str  # dataset section, training, evaluation, Provenance.task
    result: ResultKind
    output: Output
    convention: str  # the default orientation convention of its volume input (geometry.CONVENTIONS)
    window: str  # the default intensity window kind (preprocessing.WINDOW_KINDS): what its training data looked like
    summary: Optional[str]  # one line: the HTTP route's summary (None: no route of its own)
    help: str  # one line: the CLI subcommand's help
    arguments: tuple[Argument, ...] = ()
    prompt_hint: Optional[str] = None  # what the prompt box must hold ("a question"); None: no prompt needed
    build_prompt: Optional[Callable[..., str]] = None  # prompts.*_prompt: the text after the image tokens
    parse_answer: Optional[Callable[..., Any]] = None  # prompts.parse_*_answer, when the answer has structure
    streams: bool = True  # M3D-LaMed generates the answer: streamable, sampling options, an HTTP route, a CLI command
    in_datasets: bool = True  # exported, trained and evaluated by M3DTraining
    on_volume: bool = True  # the methods take the volume (node) first
    engine_method: Optional[str] = None  # the engine / client method, when it is not ``key``
    cli_command: Optional[str] = None  # the m3d subcommand, when it is not ``key`` with dashes

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z]+(_[a-z]+)*", self.key):
            raise ValueError(f"task key {self.key!r} must be snake_case")
        if self.window not in WINDOW_KINDS:
            raise ValueError(f"task {self.key!r}: window kind {self.window!r} is not one of {', '.join(WINDOW_KINDS)}")
        if self.engine_method is None:
            object.__setattr__(self, "engine_method", self.key)
        if self.cli_command is None and self.streams:
            object.__setattr__(self, "cli_command", self.key.replace("_", "-"))

    @property
    def logic_name(self) -> str:
        """The module Logic's console method (camelCase of :attr:`key`)."""
        first, *rest = self.key.split("_")
        return first + "".join(part.capitalize() for part in rest)

    @property
    def button(self) -> str:
        """The object name of the task's button in ``M3DAssistant.ui``."""
        return f"{self.logic_name}Button"

    @property
    def request_model(self) -> str:
        """The name of the server's request body model (``SegmentExpressionRequest``)."""
        return "".join(part.capitalize() for part in self.key.split("_")) + "Request"

    @property
    def segments(self) -> bool:
        """Whether the model's segmentation module runs (the answer carries a mask)."""
        return self.result is ResultKind.SEGMENTATION

    def preprocessing(
        self,
        ijk_to_ras: Any,
        *,
        convention: Optional[str] = None,
        window: WindowArg = None,
        display_window: Optional[DisplayWindow] = None,
        modality: Optional[str] = None,
        value_range: Optional[tuple[float, float]] = None,
    ) -> TaskPreprocessing:
        """How the engine will show this volume to the model for this task, before anything runs (for a panel to
        show; results' provenance records what ran): ``convention`` or the task's own, ``window`` or the task's
        default (:func:`~.preprocessing.default_window`: ``display_window`` is the window the user sees, Slicer's
        window/level or the DICOM one; ``value_range`` = (min, max) of the voxels for the CT test)."""
        spec = resolve_window(window) if window is not None else default_window(
            self.window, display_window=display_window, modality=modality, value_range=value_range)
        return task_preprocessing(self.key, ijk_to_ras, convention or self.convention, spec)

    def takes(self, kind: ArgumentKind) -> Optional[Argument]:
        """The argument of this kind, if the task takes one."""
        return next((a for a in self.arguments if a.kind is kind), None)

    @property
    def options(self) -> tuple[Option, ...]:
        """The analysis options this task takes: none without the language model (retrieval); the segmentation
        ones only when the answer carries a mask."""
        if not self.streams:
            return ()
        return tuple(o for o in OPTIONS if self.segments or not o.segmentation)

    def check_analysis(self, analysis: Optional[AnalysisOptions]) -> AnalysisOptions:
        """``analysis`` (None: the defaults) when every option it sets applies to this task; else InputError naming
        the options the task takes."""
        analysis = analysis if analysis is not None else AnalysisOptions()
        if not isinstance(analysis, AnalysisOptions):
            raise InputError(f"analysis must be AnalysisOptions, got {type(analysis).__name__}")
        names = {o.name for o in self.options}
        foreign = sorted(set(analysis.requested()) - names)
        if foreign:
            raise InputError(f"{self.key} does not take the option(s) {', '.join(foreign)}; it takes "
                             f"{', '.join(sorted(names)) or 'none'}")
        return analysis


# Each task sees the volume as its training data did (evidence: docs/conventions.md): report and VQA come from
# M3D-Cap / M3D-VQA (slice stacks in their own plane, JPEGs in a display window), boxes and masks from M3D-Seg,
# referring segmentation from M3D-RefSeg.
_CAP = ("m3d-cap-v2", DISPLAY_WINDOW)
_SEG = ("m3d-seg-v1", SEG_PERCENTILES_WINDOW)
_REFSEG = ("m3d-refseg-v1", VOLUME_PERCENTILES_WINDOW)
_TEXT = ArgumentKind.TEXT

REPORT = Task(
    "report", "Report", "report", ResultKind.TEXT, Output.TEXT_NODE, *_CAP,
    summary="Report generation", help="write a findings report",
    build_prompt=prompts.report_prompt)
ASK = Task(
    "ask", "Ask", "vqa_open", ResultKind.TEXT, Output.ANSWER, *_CAP,
    summary="Open question (VQA)", help="answer an open question",
    arguments=(Argument("question", _TEXT),
               Argument("history", ArgumentKind.HISTORY, "earlier [question, answer] turns (experimental)")),
    prompt_hint="a question", build_prompt=prompts.question_prompt)
CHOOSE = Task(
    "choose", "Multiple choice", "vqa_closed", ResultKind.CHOICE, Output.ANSWER, *_CAP,
    summary="Multiple choice (closed VQA)", help="answer a multiple-choice question",
    arguments=(Argument("question", _TEXT), Argument("choices", ArgumentKind.CHOICES)),
    prompt_hint="a question", build_prompt=prompts.choice_prompt, parse_answer=prompts.parse_choice_answer)
LOCATE = Task(
    "locate", "Locate", "rec", ResultKind.BOX, Output.ROI_NODE, *_SEG,
    summary="Box for a target or description (REC)", help="find a target: 3D box (-o ROI.mrk.json)",
    arguments=(Argument("expression", _TEXT),),
    prompt_hint="what to find (e.g. liver)", build_prompt=prompts.locate_prompt, parse_answer=prompts.parse_box_answer)
DESCRIBE_REGION = Task(
    "describe_region", "Describe ROI", "reg", ResultKind.TEXT, Output.ANSWER, *_SEG,
    summary="Describe an RAS box (REG)", help="say what is inside a box (--roi ROI.mrk.json)",
    arguments=(Argument("roi", ArgumentKind.REGION, "the RAS box to describe", wire_name="region"),),
    build_prompt=prompts.describe_region_prompt, cli_command="describe")
SEGMENT = Task(
    "segment", "Segment", "seg", ResultKind.SEGMENTATION, Output.SEGMENT, *_SEG,
    summary="Segment a named structure", help="segment a named structure (-o NAME.seg.nrrd)",
    arguments=(Argument("target", _TEXT),),
    prompt_hint="a structure (e.g. liver)", build_prompt=prompts.segment_prompt,
    parse_answer=prompts.parse_segmentation_answer)
SEGMENT_EXPRESSION = Task(
    "segment_expression", "Segment by description", "refseg", ResultKind.SEGMENTATION, Output.SEGMENT, *_REFSEG,
    summary="Segment a description", help="segment what a description refers to (-o NAME.seg.nrrd)",
    arguments=(Argument("expression", _TEXT),),
    prompt_hint="a description (e.g. the lesion in the right lobe)",
    build_prompt=prompts.segment_expression_prompt, parse_answer=prompts.parse_segmentation_answer)
# M3D-CLIP was trained on M3D-Cap's image-report pairs (the same display-window JPEG stacks as report/VQA).
FIND_SIMILAR = Task(
    "find_similar", "Find similar", "retrieval", ResultKind.RETRIEVAL, Output.RANKING, *_CAP,
    summary=None, help="M3D-CLIP: rank texts for a volume, or volumes for a text",
    arguments=(Argument("candidates", ArgumentKind.CANDIDATES), Argument("query", _TEXT)),
    prompt_hint="a text to rank the loaded volumes by", streams=False, in_datasets=False, on_volume=False,
    engine_method="retrieve", cli_command="retrieve")

TASKS: dict[str, Task] = {task.key: task for task in (
    REPORT, ASK, CHOOSE, LOCATE, DESCRIBE_REGION, SEGMENT, SEGMENT_EXPRESSION, FIND_SIMILAR)}
"""Every task by key, in the panel's order."""

STREAMING_TASKS: tuple[Task, ...] = tuple(task for task in TASKS.values() if task.streams)
"""The M3D-LaMed tasks: engine, client and backend methods with sampling and ``on_text``, one HTTP route each,
one ``m3d`` subcommand each."""

TRAINING_NAMES: tuple[str, ...] = tuple(task.training_name for task in TASKS.values() if task.in_datasets)
"""The tasks of M3D datasets (``dataset.json`` sections) as export, training and evaluation name them, in order."""


def _names(task: Task) -> set[str]:
    return {task.key, task.logic_name, task.training_name} | ({task.cli_command} if task.cli_command else set())


_BY_NAME: dict[str, Task] = {}
for _task in TASKS.values():
    for _name in _names(_task):
        if _BY_NAME.setdefault(_name, _task) is not _task:
            raise ValueError(f"{_name!r} names two tasks")


def get(name: str) -> Task:
    """The task with this name in any of its spellings (``segment_expression``, ``segmentExpression``,
    ``segment-expression``, ``refseg``); InputError naming the tasks otherwise."""
    task = _BY_NAME.get(str(name).strip())
    if task is None:
        raise InputError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    return task


def by_training_name(name: str) -> Task:
    """The dataset task ``name`` (``report``, ``vqa_open``, ..., ``refseg``); InputError naming them otherwise."""
    task = _BY_NAME.get(str(name).strip())
    if task is None or task.training_name != name or not task.in_datasets:
        raise InputError(f"unknown task {name!r}; the tasks are {', '.join(TRAINING_NAMES)}")
    return task


def convention_for(name: Optional[str]) -> str:
    """The default orientation convention of a task, by any of its names; the default convention otherwise."""
    name = (name or "").strip()
    task = _BY_NAME.get(name) or _BY_NAME.get(name.lower())
    return task.convention if task is not None else DEFAULT_CONVENTION


__all__ = ["ResultKind", "RESULT_TYPES", "result_kind", "Output", "ArgumentKind", "Argument", "Option", "OPTIONS",
           "Task", "REPORT", "ASK",
           "CHOOSE", "LOCATE", "DESCRIBE_REGION", "SEGMENT", "SEGMENT_EXPRESSION", "FIND_SIMILAR", "TASKS",
           "STREAMING_TASKS", "TRAINING_NAMES", "get", "by_training_name", "convention_for"]
