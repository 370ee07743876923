"""AssistantSession: the eight M3D tasks on Slicer nodes, without Qt. The module's Logic is a thin layer over it.

A session talks to a *backend*: the in-process :class:`~.engine.InferenceEngine` or the HTTP client of a worker
(:mod:`.serving.client`), which has the same methods (``set_volume``, ``report``, ``ask``, ``choose``, ``locate``,
``describe_region``, ``segment``, ``segment_expression``, ``retrieve``, ``cancel``). It reads volume nodes and writes
results through :mod:`.scene` (MRML only), so it runs in Slicer and headless with slicer-core.

What the session adds on top of the backend:

* volume nodes in, nodes out: a report becomes a new text node, a box a new ROI node, a mask a new segment; a result
  without a box or mask makes no node (``None``), never an empty or made-up one;
* the volume is read and sent only when its content, geometry or the preprocessing options changed (a cheap
  fingerprint of the node, :func:`.scene.volume_signature`, is compared; the voxels are not re-read per prompt);
  after a failed request it is sent again (a restarted worker has lost it);
* what the reader sees travels with it: the display node's window/level and the DICOM Modality
  (:func:`.scene.volume_display`), read at every request, so the tasks whose default window is the display window
  (report, VQA, retrieval) use the window/level shown *now*; when only that changed, the backend gets
  ``set_display`` -- the voxels are neither read nor sent again;
* a conversation per volume node for multi-turn questions (reset when the volume's content changes);
* defaults for the window, an ROI node to crop to, the sampling options, the analysis options and a streaming
  ``on_text`` callback, each overridable per call;
* what the analysis brings, as nodes too: an evidence map becomes a new scalar volume on the volume's grid, the
  model's REC box next to a mask (``locate``) a new ROI node, and -- on request (``mask_roi=True``) -- the mask's own
  box an ROI node; the mask's measurements and confidence become ``M3D.*`` tags of its segment. They are listed in
  :attr:`AssistantSession.extra_nodes` after each task (the task's return value keeps its shape).

Blocking or not: every task method blocks by default (scripting). With ``wait=False`` it reads what it needs from
the scene, starts the backend call in a background thread and returns a :class:`PendingRequest` at once; the GUI
polls :meth:`PendingRequest.done` (e.g. from a QTimer) and then calls :meth:`PendingRequest.result` on the main
thread, which writes the nodes and returns what the blocking call would have returned. MRML is only touched on the
calling thread; in that mode ``on_text`` is called from the background thread (append to a buffer, show it when
polling). One request runs at a time per session; :meth:`cancel` may be called from any thread.

The session assumes it is the only user of its backend (it remembers which volume the backend holds).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np

from . import scene
from .errors import CancelledError, InputError, M3DError
from .geometry import RasRoi
from .results import (
    AnalysisOptions,
    BoxResult,
    ChoiceResult,
    RetrievalResult,
    SamplingOptions,
    TextResult,
)
from .tasks import (
    ASK,
    CHOOSE,
    DESCRIBE_REGION,
    LOCATE,
    REPORT,
    SEGMENT,
    SEGMENT_EXPRESSION,
    ArgumentKind,
    Output,
    ResultKind,
    Task,
)
from .tasks import get as get_task

if TYPE_CHECKING:
    import slicer

TextCallback = Callable[[str], None]
_UNSET: Any = object()


@dataclasses.dataclass
class _Volume:
    """A volume as prepared on the calling thread: its fingerprint, options and, if it must be sent, its voxels."""

    signature: tuple
    options: tuple
    window: Any
    roi: Optional[RasRoi]
    display_window: Any = None  # preprocessing.DisplayWindow: the window/level the reader sees
    modality: Optional[str] = None  # DICOM Modality, when the volume came from DICOM
    array: Optional[np.ndarray] = None  # None: the backend already holds it
    ijk_to_ras: Optional[np.ndarray] = None

    @property
    def display(self) -> tuple:
        return (self.display_window, self.modality)


@dataclasses.dataclass
class _Call:
    """One task split by thread: ``run`` talks to the backend only (any thread), ``finish`` writes MRML (caller's)."""

    volume: Optional[_Volume]
    run: Callable[[], Any]
    finish: Callable[[Any], Any]


def _read_region(roi_node: Any) -> RasRoi:
    """An ROI argument as the backend takes it (read on the calling thread: it touches MRML)."""
    return roi_node if isinstance(roi_node, RasRoi) else scene.roi_from_node(roi_node)


def _place_output(task: Task, result: Any, volume_node: Any, text: Optional[str], *, name: Optional[str] = None,
                  segmentation_node: Any = None, color: Any = None) -> Any:
    """What a task method returns, by the task's :class:`~.tasks.Output`; nodes are made only from a real result
    (a text, a box, a non-empty mask), never empty or made-up ones. A new node is named ``name``, else "<volume> M3D
    <task>" (a text node), the task's ``text`` argument (an ROI: what was located) or the result's target (a
    segment)."""
    if task.output is Output.TEXT_NODE:
        name = name or f"{volume_node.GetName()} M3D {task.key}"
        node = scene.add_text(result, name, volume_node=volume_node) if result.text.strip() else None
        return node, result
    if task.output is Output.ANSWER:
        if task.result is ResultKind.CHOICE:
            return (result.choice if result.choice is not None else result.text), result
        return result.text, result
    if task.output is Output.ROI_NODE:
        name = name or text or task.label
        node = scene.add_roi(result, name, volume_node=volume_node) if result.roi is not None else None
        return node, result
    if task.output is Output.SEGMENT:
        if result.mask is None or result.voxel_count == 0:
            return None, None, result
        node, segment_id = scene.add_segment(result, volume_node, name=name or result.target,
                                             segmentation_node=segmentation_node, color=color,
                                             attributes=mask_attributes(result))
        return node, segment_id, result
    return result


def mask_attributes(result: Any) -> dict[str, str]:
    """``M3D.*`` tags of a new segment: its measurements, its confidence and whether it was refined."""
    out: dict[str, str] = {}
    measured = getattr(result, "measurements", None)
    if measured is not None:
        units = f" {measured.units}" if measured.units else ""
        out.update({"M3D.volume_ml": f"{measured.volume_ml:.3f}",
                    "M3D.max_diameter_mm": f"{measured.max_diameter_mm:.1f}",
                    "M3D.axial_long_axis_mm": f"{measured.axial_long_axis_mm:.1f}",
                    "M3D.axial_short_axis_mm": f"{measured.axial_short_axis_mm:.1f}",
                    "M3D.mean": f"{measured.mean:.1f}{units}", "M3D.std": f"{measured.std:.1f}{units}"})
    mask_confidence = getattr(getattr(result, "confidence", None), "mask", None)
    if mask_confidence is not None and mask_confidence.mean_probability is not None:
        out["M3D.mean_probability"] = f"{mask_confidence.mean_probability:.3f}"
        out["M3D.uncertain_fraction"] = f"{mask_confidence.uncertain_fraction:.3f}"
    if getattr(result, "refinement", None) is not None:
        out["M3D.refined"] = "zoom-in"
    return out


def _place_extras(task: Task, result: Any, volume_node: Any, mask_roi: bool) -> dict[str, Any]:
    """The nodes a result's analysis brings (see the module docstring), by name: ``evidence``, ``mask_box``,
    ``located_box``."""
    nodes: dict[str, Any] = {}
    if getattr(result, "evidence", None) is not None:
        nodes["evidence"] = scene.add_evidence_volume(result, volume_node,
                                                      name=f"{volume_node.GetName()} M3D {task.key} evidence")
    if task.output is Output.SEGMENT:
        if mask_roi and result.roi is not None and result.voxel_count:
            nodes["mask_box"] = scene.add_roi(result.roi, f"{result.target} box", volume_node=volume_node,
                                              attributes=result.provenance.as_node_attributes())
        if result.located is not None and result.located.roi is not None:
            nodes["located_box"] = scene.add_roi(result.located, f"{result.target} (located)", volume_node=volume_node)
    return nodes


class PendingRequest:
    """A task running in a background thread (see ``wait=False``). Poll :meth:`done`, then call :meth:`result` on
    the thread that owns the scene (the main thread in Slicer)."""

    def __init__(self, session: "AssistantSession", call: _Call):
        self._session, self._call = session, call
        self._finished = threading.Event()
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._collected = False
        self._output: Any = None
        self._thread = threading.Thread(target=self._work, name="m3d-session-request", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            self._value = self._session._run(self._call)
        except BaseException as e:  # handed to result(), on the caller's thread
            self._error = e
        finally:
            self._finished.set()

    def done(self) -> bool:
        """True once the backend answered (or failed)."""
        return self._finished.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until done (or the timeout, in seconds); True when done."""
        return self._finished.wait(timeout)

    def cancel(self) -> None:
        """Ask the backend to stop this request; :meth:`result` then raises CancelledError."""
        self._session.cancel()

    def result(self) -> Any:
        """What the blocking call returns (creating the nodes now, once); raises the request's error.

        Call it on the thread that owns the scene, after :meth:`done` (it waits otherwise)."""
        self._finished.wait()
        if self._error is not None:
            raise self._error
        if not self._collected:
            self._output = self._call.finish(self._value)
            self._collected = True
        return self._output


class AssistantSession:
    """All eight tasks on volume nodes, for one backend (engine or client).

    Args:
        backend: an object with the :class:`~.engine.InferenceEngine` task methods.
        window: default intensity window (a preset name such as ``"abdomen"``, ``(center, width)`` in HU, or None
            for the model's default); per-call ``window=`` overrides it.
        roi_node: default ROI markup (or :class:`~.geometry.RasRoi`) to crop the volume to before the model sees it
            (None: the whole volume); per-call ``roi_node=`` overrides it.
        sampling: default :class:`~.results.SamplingOptions`.
        on_text: default callback receiving the answer's text as it is generated.
        analysis: default :class:`~.results.AnalysisOptions` (what to compute beyond the answer); per-call
            ``analysis=`` overrides it.

    Every task method takes ``wait=True``; ``wait=False`` returns a :class:`PendingRequest` instead (see the module
    docstring).

    Example (Slicer Python console)::

        session = AssistantSession(InferenceEngine())
        text_node, result = session.report(volume_node)
        answer, result = session.ask(volume_node, "Is there a liver lesion?")
        roi_node, result = session.locate(volume_node, "liver")
        segmentation_node, segment_id, result = session.segment(volume_node, "liver")
    """

    def __init__(self, backend: Any, *, window: Any = None, roi_node: Any = None,
                 sampling: Optional[SamplingOptions] = None, on_text: Optional[TextCallback] = None,
                 analysis: Optional[AnalysisOptions] = None):
        self.backend = backend
        self.window = window
        self.roi_node = roi_node
        self.sampling = sampling
        self.on_text = on_text
        self.analysis = analysis
        self.extra_nodes: dict[str, Any] = {}  # the nodes the last finished task's analysis made (see module doc)
        self._sent: Optional[tuple[tuple, tuple]] = None  # (signature, options) of the volume the backend holds
        self._sent_display: Optional[tuple] = None  # (display window, modality) the backend has for it
        self._conversations: dict[str, list[tuple[str, str]]] = {}
        self._conversation_signatures: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self._pending: Optional[PendingRequest] = None
        self.volume_uploads = 0  # how often a volume was read and sent (for tests and diagnostics)
        self.display_updates = 0  # how often only its display window / modality was sent

    # ------------------------------------------------------------------------------------------ volumes, running
    def _prepare_volume(self, volume_node: Any, window: Any = _UNSET, roi_node: Any = _UNSET) -> _Volume:
        """On the calling thread: fingerprint the volume and read its voxels only if the backend lacks them."""
        window = self.window if window is _UNSET else window
        roi_node = self.roi_node if roi_node is _UNSET else roi_node
        roi = roi_node if roi_node is None or isinstance(roi_node, RasRoi) else scene.roi_from_node(roi_node)
        signature = scene.volume_signature(volume_node)
        options = (repr(window), repr(None if roi is None else roi.to_dict()))
        node_id = volume_node.GetID()
        if self._conversation_signatures.get(node_id, signature) != signature:
            self._conversations.pop(node_id, None)  # the image changed: earlier answers were about another image
        self._conversation_signatures[node_id] = signature
        display_window, modality = scene.volume_display(volume_node)
        volume = _Volume(signature, options, window, roi, display_window, modality)
        if self._sent != (signature, options):
            volume.array, volume.ijk_to_ras = scene.read_volume_node(volume_node)
        return volume

    def _run(self, call: _Call) -> Any:
        """The backend part of a request (any thread): send the volume (or only its display) if needed, then the
        task."""
        with self._lock:
            try:
                volume = call.volume
                if volume is not None and volume.array is not None:
                    self._sent = self._sent_display = None
                    self.backend.set_volume(volume.array, volume.ijk_to_ras, window=volume.window, roi=volume.roi,
                                            display_window=volume.display_window, modality=volume.modality)
                    self._sent, self._sent_display = (volume.signature, volume.options), volume.display
                    self.volume_uploads += 1
                elif volume is not None and volume.display != self._sent_display:
                    self._sent_display = None
                    self.backend.set_display(volume.display_window, volume.modality)
                    self._sent_display = volume.display
                    self.display_updates += 1
                return call.run()
            except CancelledError:
                raise
            except BaseException:
                self._sent = None  # the backend may have lost the volume (e.g. a worker that crashed and restarted)
                raise

    def _dispatch(self, call: _Call, wait: bool) -> Any:
        if wait:
            return call.finish(self._run(call))
        self._pending = PendingRequest(self, call)
        return self._pending

    def _check_idle(self) -> None:
        if self._pending is not None and not self._pending.done():
            raise M3DError("another M3D request is still running; wait for it to finish or cancel it first")

    def invalidate_volume(self) -> None:
        """Make the next request read and send its volume again (e.g. after the worker restarted). Failed requests
        do this automatically; the backend itself is not touched."""
        self._sent = None

    def cancel(self) -> None:
        """Stop the running request at its next decoding step or encoder call (from any thread)."""
        self.backend.cancel()

    def _kwargs(self, sampling: Optional[SamplingOptions], on_text: Any) -> dict[str, Any]:
        return {"sampling": sampling if sampling is not None else self.sampling,
                "on_text": self.on_text if on_text is _UNSET else on_text}

    # ---------------------------------------------------------------------------------------------- conversation
    def history(self, volume_node: Any) -> list[tuple[str, str]]:
        """The (question, answer) turns asked about this volume so far in this session."""
        return list(self._conversations.get(volume_node.GetID(), []))

    def clear_history(self, volume_node: Any = None) -> None:
        """Forget the conversation about one volume (or all)."""
        if volume_node is None:
            self._conversations.clear()
        else:
            self._conversations.pop(volume_node.GetID(), None)

    # ----------------------------------------------------------------------------------------------------- tasks
    def run_task(self, task: Union[Task, str], *arguments: Any, window: Any = _UNSET, roi_node: Any = _UNSET,
                 sampling: Optional[SamplingOptions] = None, on_text: Any = _UNSET, wait: bool = True,
                 history: Optional[Sequence[tuple[str, str]]] = None, name: Optional[str] = None,
                 segmentation_node: Any = None, color: Any = None, analysis: Optional[AnalysisOptions] = None,
                 mask_roi: bool = False) -> Any:
        """Any task of the registry (a :class:`~.tasks.Task` or any of its names): the volume node, then the task's
        arguments in order (``session.run_task("segment", volume_node, "liver")`` is
        ``session.segment(volume_node, "liver")``). The task methods below are this, with their own signatures.

        What the call needs from the scene is read here (the volume, an ROI node to describe); the backend's method
        of the task runs (any thread); its result becomes the task's :class:`~.tasks.Output` (a text node, the
        answer, an ROI node, a segment, a ranking). ``window``, ``roi_node`` (crop), ``sampling`` and ``on_text``
        override the session's defaults; ``history`` as in :meth:`ask`; ``name``, ``segmentation_node`` and
        ``color`` say where a new node or segment goes. ``analysis`` (:class:`~.results.AnalysisOptions`) says what
        to compute beyond the answer (default: the session's); ``mask_roi`` also makes the mask's box an ROI node.
        The nodes the analysis makes are in :attr:`extra_nodes` once the task is finished."""
        task = task if isinstance(task, Task) else get_task(task)
        if not task.on_volume:
            return self.find_similar(*arguments, wait=wait)
        volume_node, *values = arguments
        positional = [a for a in task.arguments if a.kind is not ArgumentKind.HISTORY]
        if len(values) != len(positional):
            raise TypeError(f"{task.key} takes the volume node and {len(positional)} argument(s) "
                            f"({', '.join(a.name for a in positional) or 'none'}), got {len(values)}")
        self._check_idle()
        values = [_read_region(value) if argument.kind is ArgumentKind.REGION else value
                  for argument, value in zip(positional, values)]
        text = next((v for a, v in zip(positional, values) if a.kind is ArgumentKind.TEXT), None)  # the prompt
        analysis = task.check_analysis(analysis if analysis is not None else self.analysis)
        volume = self._prepare_volume(volume_node, window, roi_node)
        kwargs = self._kwargs(sampling, on_text)
        if analysis.requested():  # a backend of the plain task never sees the keyword
            kwargs["analysis"] = analysis
        record = None
        history_argument = task.takes(ArgumentKind.HISTORY)
        if history_argument is not None:  # a conversation: this session's turns about the volume, or the given ones
            record = (volume_node.GetID(), text) if history is None else None
            kwargs[history_argument.name] = self.history(volume_node) if history is None else list(history)
        run = functools.partial(getattr(self.backend, task.engine_method), *values, **kwargs)

        def finish(result: Any) -> Any:
            if record is not None:
                node_id, question = record
                self._conversations.setdefault(node_id, []).append((question, result.text))
            output = _place_output(task, result, volume_node, text, name=name, segmentation_node=segmentation_node,
                                   color=color)
            self.extra_nodes = _place_extras(task, result, volume_node, mask_roi)
            return output

        return self._dispatch(_Call(volume, run, finish), wait)

    def report(self, volume_node: Any, *, name: Optional[str] = None, window: Any = _UNSET, roi_node: Any = _UNSET,
               sampling: Optional[SamplingOptions] = None, on_text: Any = _UNSET,
               wait: bool = True,
               analysis: Optional[AnalysisOptions] = None) -> tuple[Optional["slicer.vtkMRMLTextNode"], TextResult]:
        """Report generation -> (a new text node, or None when the model wrote nothing; the result)."""
        return self.run_task(REPORT, volume_node, name=name, window=window, roi_node=roi_node, sampling=sampling,
                             on_text=on_text, wait=wait, analysis=analysis)

    def ask(self, volume_node: Any, question: str, history: Optional[Sequence[tuple[str, str]]] = None, *,
            window: Any = _UNSET, roi_node: Any = _UNSET, sampling: Optional[SamplingOptions] = None,
            on_text: Any = _UNSET, wait: bool = True,
            analysis: Optional[AnalysisOptions] = None) -> tuple[str, TextResult]:
        """Open question about the volume -> (answer, result).

        ``history=None`` continues this session's conversation about the volume (the turn is then added to it);
        pass a list (``[]`` for none) to use exactly those earlier turns instead, without recording this one."""
        return self.run_task(ASK, volume_node, question, history=history, window=window, roi_node=roi_node,
                             sampling=sampling, on_text=on_text, wait=wait, analysis=analysis)

    def choose(self, volume_node: Any, question: str, choices: Sequence[str], *, window: Any = _UNSET,
               roi_node: Any = _UNSET, sampling: Optional[SamplingOptions] = None, on_text: Any = _UNSET,
               wait: bool = True, analysis: Optional[AnalysisOptions] = None) -> tuple[str, ChoiceResult]:
        """Multiple choice -> (the chosen option's text, or the raw answer when it names none; result)."""
        return self.run_task(CHOOSE, volume_node, question, list(choices), window=window, roi_node=roi_node,
                             sampling=sampling, on_text=on_text, wait=wait, analysis=analysis)

    def locate(self, volume_node: Any, expression: str, *, name: Optional[str] = None, window: Any = _UNSET,
               roi_node: Any = _UNSET, sampling: Optional[SamplingOptions] = None, on_text: Any = _UNSET,
               wait: bool = True, analysis: Optional[AnalysisOptions] = None
               ) -> tuple[Optional["slicer.vtkMRMLMarkupsROINode"], BoxResult]:
        """Find a structure or described region -> (a new ROI node, or None when no box came back; result)."""
        return self.run_task(LOCATE, volume_node, expression, name=name, window=window, roi_node=roi_node,
                             sampling=sampling, on_text=on_text, wait=wait, analysis=analysis)

    def describe_region(self, volume_node: Any, roi_node: Any, *, window: Any = _UNSET, crop_roi_node: Any = _UNSET,
                        sampling: Optional[SamplingOptions] = None, on_text: Any = _UNSET,
                        wait: bool = True, analysis: Optional[AnalysisOptions] = None) -> tuple[str, TextResult]:
        """What is in a user-drawn ROI (markups ROI node, possibly rotated, or a RasRoi) -> (text, result).

        ``crop_roi_node`` is the crop option (``roi_node`` of the other tasks), named apart from the described ROI."""
        return self.run_task(DESCRIBE_REGION, volume_node, roi_node, window=window, roi_node=crop_roi_node,
                             sampling=sampling, on_text=on_text, wait=wait, analysis=analysis)

    def segment(self, volume_node: Any, target: str, segmentation_node: Any = None, *, name: Optional[str] = None,
                color: Any = None, window: Any = _UNSET, roi_node: Any = _UNSET,
                sampling: Optional[SamplingOptions] = None, on_text: Any = _UNSET, wait: bool = True,
                analysis: Optional[AnalysisOptions] = None, mask_roi: bool = False):
        """Segment a named structure -> (segmentation node, segment id, result); ``(None, None, result)`` when
        the model gave no mask (absent target, no [SEG], or an empty mask): nothing is created, not even in a given
        ``segmentation_node``. A new segment never replaces an existing one (``liver (2)``)."""
        return self.run_task(SEGMENT, volume_node, target, segmentation_node=segmentation_node, name=name,
                             color=color, window=window, roi_node=roi_node, sampling=sampling, on_text=on_text,
                             wait=wait, analysis=analysis, mask_roi=mask_roi)

    def segment_expression(self, volume_node: Any, expression: str, segmentation_node: Any = None, *,
                           name: Optional[str] = None, color: Any = None, window: Any = _UNSET,
                           roi_node: Any = _UNSET, sampling: Optional[SamplingOptions] = None,
                           on_text: Any = _UNSET, wait: bool = True,
                           analysis: Optional[AnalysisOptions] = None, mask_roi: bool = False):
        """Segment what a description refers to ("the lesion in the right lobe") -> as :meth:`segment`."""
        return self.run_task(SEGMENT_EXPRESSION, volume_node, expression, segmentation_node=segmentation_node,
                             name=name, color=color, window=window, roi_node=roi_node, sampling=sampling,
                             on_text=on_text, wait=wait, analysis=analysis, mask_roi=mask_roi)

    def find_similar(self, candidates: Sequence[Any], query: Any, *, wait: bool = True) -> RetrievalResult:
        """M3D-CLIP retrieval, ranked best first.

        ``candidates`` volume nodes and ``query`` a text: which volumes match the text. ``candidates`` texts and
        ``query`` a volume node: which texts describe the volume."""
        self._check_idle()
        candidates = list(candidates)
        if not candidates:
            raise InputError("find_similar needs at least one candidate (volume nodes or texts)")
        if all(isinstance(c, str) for c in candidates):
            if isinstance(query, str):
                raise InputError("to rank texts, give the volume node they should describe as the query")
            call = _Call(self._prepare_volume(query), lambda: self.backend.retrieve(texts=candidates), lambda r: r)
            return self._dispatch(call, wait)
        if not isinstance(query, str):
            raise InputError("to rank volume nodes, give a text as the query (e.g. 'liver cyst')")
        volumes = [scene.read_volume_node(node) for node in candidates]
        labels = [node.GetName() for node in candidates]
        display_windows, modalities = zip(*(scene.volume_display(node) for node in candidates))
        call = _Call(None, lambda: self.backend.retrieve(
            text=query, volumes=volumes, labels=labels, display_windows=list(display_windows),
            modalities=list(modalities)), lambda r: r)
        return self._dispatch(call, wait)

    def check_installation(self, *, conventions: str = "default", max_new_tokens: int = 64,
                           structures: Optional[Sequence[str]] = None,
                           on_progress: Optional[Callable[[Any], None]] = None, wait: bool = True) -> Any:
        """``m3d selfcheck`` on the backend's model: segmentation, boxes and a plane question on the bundled CT with
        ground-truth labels (:func:`.selfcheck.run_selfcheck`; ``structures`` by name, default liver, spleen,
        kidneys, stomach, aorta), scored -> a
        :class:`~.selfcheck.SelfCheckReport`. A server backend runs it in its worker (the model it has loaded, the
        sample of its installation); an in-process engine runs it here. ``wait=False``: a :class:`PendingRequest`.

        The check sets its own volumes on the backend, so the next task sends the user's volume again (for a
        server: its id, the voxels are not uploaded again)."""
        self._check_idle()
        options = {"conventions": conventions, "max_new_tokens": max_new_tokens}

        def run() -> Any:
            try:
                if hasattr(self.backend, "selfcheck"):  # a server's backend
                    return self.backend.selfcheck(structures=structures, **options)
                from .selfcheck import run_selfcheck, structures_named  # an in-process InferenceEngine

                return run_selfcheck(self.backend, progress=on_progress, structures=structures_named(structures),
                                     **options)
            finally:
                self._sent = self._sent_display = None

        return self._dispatch(_Call(None, run, lambda report: report), wait)
