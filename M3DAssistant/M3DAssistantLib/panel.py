"""The module panel's non-Qt parts: what each task returns to the Python console, streamed text collected across
threads, the per-volume conversation, the prompt history, progress in words, and how confidence, measurements and
evidence maps are shown (the options' probabilities, low-probability spans marked, the mask's numbers, the list of
most relevant slice ranges).

The Widget and Logic in ``M3DAssistant.py`` stay thin: they wire these to Qt widgets and MRML nodes. Everything here
is plain Python (no ``slicer``, no Qt), so it is tested without Slicer.
"""

from __future__ import annotations

import dataclasses
import html
import queue
import threading
from typing import Any, Callable, Optional, Sequence, Union

from . import AI_LABEL
from .analysis_text import choice_lines, evidence_items, measurement_lines
from .errors import InputError
from .progress import ProgressEvent
from .results import LOW_TOKEN_PROBABILITY
from .tasks import ArgumentKind, Output, ResultKind, Task
from .tasks import get as get_task

STAGE_LABELS = {
    "load": "Loading the model",
    "download": "Downloading the model",
    "upload": "Sending the volume",
    "preprocess": "Preparing the image",
    "encode": "Reading the image",
    "generate": "Writing the answer",
    "segment": "Segmenting",
    "selfcheck": "Checking the installation",
    "refine": "Refining the mask (zoom-in)",
    "evidence": "Computing the evidence map",
}


def progress_text(event: ProgressEvent) -> tuple[str, Optional[int]]:
    """(status text, percent or None for "busy") for a progress bar."""
    label = STAGE_LABELS.get(event.stage, event.stage.capitalize() or "Working")
    percent = None if event.fraction is None else round(100 * min(max(event.fraction, 0.0), 1.0))
    message = event.message.strip()
    if event.stage == "generate":  # "12 tokens" is noise next to the streamed text
        message = ""
    if len(message) > 240:
        message = message[:237] + "..."
    return (f"{label}: {message}" if message else label), percent


def parse_choices(text: str) -> list[str]:
    """The multiple-choice options typed in one line: separated by ``;`` or new lines (``Axial; Coronal; Sagittal``)."""
    parts = [p.strip() for p in text.replace("\n", ";").split(";")]
    choices = [p for p in parts if p]
    if len(choices) < 2:
        raise InputError("give at least two choices, separated by ';' (e.g. Axial; Coronal; Sagittal; Oblique)")
    return choices


def require_prompt(task: Union[Task, str], prompt: str) -> str:
    """The prompt stripped; InputError naming what the task needs when it is empty."""
    task = _task(task)
    prompt = (prompt or "").strip()
    if task.prompt_hint and not prompt:
        raise InputError(f"{task.label} needs {task.prompt_hint}: type it in the prompt box.")
    return prompt


def task_arguments(task: Union[Task, str], prompt: str, *, choices: str = "", region: Any = None,
                   candidates: Sequence[Any] = ()) -> tuple[list[Any], str]:
    """The task's arguments (after the volume) from what the panel holds, and the question as the conversation view
    shows it. By argument kind: TEXT <- the prompt box, CHOICES <- the choices box, REGION <- the "Describe ROI" node,
    CANDIDATES <- ``candidates`` (the scene's image volumes). HISTORY is the Logic's own (the conversation about the
    volume continues)."""
    task = _task(task)
    prompt = require_prompt(task, prompt)
    arguments: list[Any] = []
    shown = prompt
    for argument in task.arguments:
        if argument.kind is ArgumentKind.TEXT:
            arguments.append(prompt)
        elif argument.kind is ArgumentKind.CHOICES:
            options = parse_choices(choices)
            arguments.append(options)
            shown = f"{prompt} ({'; '.join(options)})"
        elif argument.kind is ArgumentKind.REGION:
            if region is None:
                raise InputError("Choose the ROI to describe (or create one and draw it on the volume).")
            arguments.append(region)
            shown = _node_name(region)
        elif argument.kind is ArgumentKind.CANDIDATES:
            arguments.append(list(candidates))
    return arguments, shown


# ------------------------------------------------------------------------------------- results for the console
def api_value(task: Union[Task, str], output: Any, candidates: Optional[Sequence[Any]] = None) -> Any:
    """What the Logic's console method returns, from what the session returned, by the task's output:

    a text node (or None); the answer (str); an ROI node (or None); ``(segmentation node, segment id)``
    (``(None, None)`` without a mask); a ranking ``[(candidate, score), ...]`` best first, candidates as given (nodes
    or texts)."""
    output_kind = _task(task).output
    if output_kind is Output.SEGMENT:
        node, segment_id, _ = output
        return node, segment_id
    if output_kind is Output.RANKING:
        return [(candidates[index] if candidates is not None else label, float(score))
                for index, label, score in output.ranking]
    return output[0]


def typed_result(task: Union[Task, str], output: Any) -> Any:
    """The full typed result (TextResult, ChoiceResult, BoxResult, SegmentationResult, RetrievalResult)."""
    if _task(task).output is Output.RANKING:
        return output
    return output[-1]


def _node_name(node: Any) -> str:
    return node.GetName() if hasattr(node, "GetName") else str(node)


def answer_text(task: Union[Task, str], output: Any) -> str:
    """The conversation view's line for a finished task (call on the main thread: it reads node names)."""
    task = _task(task)
    result = typed_result(task, output)
    if task.output is Output.RANKING:
        return "\n".join(f"{rank}. {label} ({score:.3f})" for rank, (_, label, score) in
                         enumerate(result.ranking, start=1))
    if task.result is ResultKind.CHOICE:
        choice, _ = output
        return f"{result.letter}. {choice}" if result.letter else choice
    if task.output is Output.ROI_NODE:
        node = output[0]
        if node is None:
            return f"{result.text.strip()}\n(no box found: nothing was added)"
        return f"{result.text.strip()}\n(box added as ROI '{_node_name(node)}')"
    if task.output is Output.SEGMENT:
        node, segment_id, _ = output
        if node is None:
            return f"{result.text.strip()}\n(no mask: nothing was added)"
        segment = node.GetSegmentation().GetSegment(segment_id) if hasattr(node, "GetSegmentation") else None
        name = segment.GetName() if segment is not None else segment_id
        return f"{result.text.strip()}\n(segment '{name}' added to '{_node_name(node)}', {result.voxel_count} voxels)"
    if task.output is Output.TEXT_NODE and output[0] is not None:
        return f"{result.text.strip()}\n(saved as text node '{_node_name(output[0])}')"
    return result.text.strip()


def _task(task: Union[Task, str]) -> Task:
    return task if isinstance(task, Task) else get_task(task)


# ------------------------------------------------------------------------- what the model sees, before and after
def _window_text(scheme: str, name: str, center: Any = None, width: Any = None, low: Any = None,
                 high: Any = None) -> str:
    """``display (Slicer) 40/400``, ``abdomen 40/350``, ``40/400`` (a custom pair), ``percentile [-87, 242]``."""
    if scheme == "window":
        pair = f"{float(center):g}/{float(width):g}" if center is not None and width is not None else ""
        return pair if name == "custom" else f"{name} {pair}".strip()
    if low is not None and high is not None:
        return f"{name} [{float(low):.4g}, {float(high):.4g}]"
    return name


def preprocessing_summary(rows: Sequence[tuple[Task, Any]]) -> str:
    """What each task will see, one line per distinct preprocessing, tasks with the same one together, in the
    panel's order: ``Report, Ask, Multiple choice, Find similar: m3d-cap-v2: coronal slices (the volume's own
    plane); window display (Slicer) 40/400``. ``rows``: (task, :class:`~.geometry.TaskPreprocessing`)."""
    groups: dict[str, list[str]] = {}
    for task, preprocessing in rows:
        groups.setdefault(preprocessing.describe(), []).append(task.label)
    return "\n".join(f"{', '.join(labels)}: {text}" for text, labels in groups.items())


VERDICT_COLORS = {"pass": "#1b7f3a", "inconclusive": "#a35c00", "orientation suspect": "#b00020", "poor": "#b00020"}


def selfcheck_summary(report: Any) -> str:
    """The panel's line for a finished installation check (HTML): the verdict, coloured, its message, and where the
    details are."""
    verdict = str(report.verdict)
    color = VERDICT_COLORS.get(verdict, "#b00020")
    answered = sum(c.verdict != "no answer" for c in report.checks)
    return (f"<b style='color:{color}'>Installation check: {html.escape(verdict.upper())}</b> "
            f"({answered} of {len(report.checks)} checks answered). {html.escape(report.message)}<br>"
            "<small>The table is in Advanced &gt; Details; Save report... writes the JSON.</small>")


def _intensity_record(text: Optional[str]) -> Optional[dict[str, Any]]:
    """A provenance's intensity (the engine writes the mapping's dict repr, M3D-CLIP its JSON) as a dict."""
    if not text:
        return None
    import ast
    import json

    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError):
            continue
        if isinstance(value, dict):
            return value
    return None


def used_text(result: Any) -> str:
    """What a finished task actually used, from its provenance: ``m3d-cap-v2, window display (Slicer) 40/400``
    (convention without its version suffix; the window with the values it clipped to for percentiles). Empty when
    the result does not say (e.g. a ranking of volumes with different windows)."""
    provenance = getattr(result, "provenance", None)
    if provenance is None:
        return ""
    parts = []
    if provenance.convention:
        parts.append(str(provenance.convention).split("@")[0])
    intensity = _intensity_record(provenance.intensity)
    if intensity is not None:
        parts.append("window " + _window_text(str(intensity.get("scheme", "")), str(intensity.get("name", "?")),
                                              intensity.get("center"), intensity.get("width"),
                                              intensity.get("low"), intensity.get("high")))
    return ", ".join(parts)
# ------------------------------------------------------------------------- confidence, measurements, evidence
def answer_html(task: Union[Task, str], output: Any) -> Optional[str]:
    """The conversation view's finished answer as HTML with the low-probability spans of the model's text marked
    (None without token confidence: the plain :func:`answer_text` is shown)."""
    task = _task(task)
    result = typed_result(task, output)
    confidence = getattr(result, "confidence", None)
    if task.output is Output.RANKING or confidence is None or not confidence.tokens:
        return None
    plain = answer_text(task, output)
    stripped = result.text.strip()
    if task.result is ResultKind.CHOICE or not plain.startswith(stripped):
        return html.escape(plain).replace("\n", "<br>")  # a choice shows its option; its probabilities follow
    return marked_answer_html(result.text, confidence) + html.escape(plain[len(stripped):]).replace("\n", "<br>")


def marked_answer_html(text: str, confidence: Any, threshold: float = LOW_TOKEN_PROBABILITY) -> str:
    """The answer (stripped, as :func:`answer_text` shows it) as HTML with the spans of tokens below ``threshold``
    highlighted, their lowest probability in the tooltip, so that a reader sees which words the model was unsure
    of."""
    first, last = len(text) - len(text.lstrip()), len(text.rstrip())
    if confidence is None or not getattr(confidence, "tokens", None):
        return html.escape(text[first:last]).replace("\n", "<br>")
    probabilities, position = [], 0
    for token in confidence.tokens:
        probabilities.append((position, position + len(token.text), token.probability))
        position += len(token.text)
    parts, cursor = [], first
    for start, end in confidence.low_spans(threshold):
        start, end = max(start, first), min(end, last)
        if start >= end:
            continue
        lowest = min(p for a, b, p in probabilities if a < end and b > start)
        parts.append(html.escape(text[cursor:start]))
        parts.append(f"<span style='background-color:#ffe08a' title='lowest token probability "
                     f"{lowest:.2f}'>{html.escape(text[start:end])}</span>")
        cursor = end
    parts.append(html.escape(text[cursor:last]))
    return "".join(parts).replace("\n", "<br>")


def analysis_html(result: Any, statistics: Optional[dict] = None) -> str:
    """What the conversation view shows under a finished answer: option probabilities, the answer's mean token
    log-probability, the mask's numbers and the evidence map's slice ranges (empty when none was computed)."""
    lines = choice_lines(result) + measurement_lines(result, statistics)
    confidence = getattr(result, "confidence", None)
    if confidence is not None and confidence.mean_logprob is not None:
        low = sum(t.probability < LOW_TOKEN_PROBABILITY for t in confidence.tokens)
        lines.append(f"Mean token log-probability {confidence.mean_logprob:.2f} ({low} of {len(confidence.tokens)} "
                     f"tokens below {LOW_TOKEN_PROBABILITY:g}, highlighted)")
    evidence = getattr(result, "evidence", None)
    if evidence is not None:
        lines.append(f"Evidence map ({evidence.method}, {evidence.steps} steps): "
                     + ("; ".join(label.split(": ", 1)[0].split(". ", 1)[1] for label, _ in evidence_items(evidence))
                        or "no supporting region"))
    return "<br>".join(html.escape(line) for line in lines)


class TaskRequest:
    """A task running in the background (the session's PendingRequest) plus how to turn its output into the
    console API's value. Poll :meth:`done`; call :meth:`result` on the main thread (it creates the nodes)."""

    def __init__(self, task: str, pending: Any, finish: Callable[[Any], Any]):
        self.task = task
        self.pending = pending
        self._finish = finish
        self._collected = False
        self._value: Any = None
        self.output: Any = None  # what the session returned (nodes + typed result)

    def done(self) -> bool:
        return self.pending.done()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.pending.wait(timeout)

    def cancel(self) -> None:
        self.pending.cancel()

    def result(self) -> Any:
        if not self._collected:
            self.output = self.pending.result()  # raises the request's error
            self._value = self._finish(self.output)
            self._collected = True
        return self._value


# ------------------------------------------------------------------------------------- streamed text, by thread
class StreamBuffer:
    """Text chunks and progress events put from the request's thread, drained by the GUI timer on the main thread."""

    def __init__(self) -> None:
        self._queue: "queue.SimpleQueue[tuple[str, Any]]" = queue.SimpleQueue()

    def put_text(self, chunk: str) -> None:
        self._queue.put(("text", chunk))

    def put_progress(self, event: ProgressEvent) -> None:
        self._queue.put(("progress", event))

    def drain(self) -> tuple[str, Optional[ProgressEvent]]:
        """All text since the last call, and the latest progress event (None if none came)."""
        text, progress = [], None
        while True:
            try:
                kind, item = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "text":
                text.append(item)
            else:
                progress = item
        return "".join(text), progress


# ------------------------------------------------------------------------------------------ the conversation view
@dataclasses.dataclass
class ConversationEntry:
    task: str
    prompt: str
    answer: str = ""
    status: str = "running"  # running | done | cancelled | failed
    used: str = ""  # what the model was shown (used_text): convention and window, from the result's provenance
    answer_html: Optional[str] = None  # the finished answer with its low-probability spans marked (replaces answer)
    details_html: str = ""  # confidence, measurements, evidence: shown under the answer


class ConversationLog:
    """What was asked about each volume in this Slicer session, with the answers (streamed while they come)."""

    def __init__(self) -> None:
        self._entries: dict[str, list[ConversationEntry]] = {}
        self._lock = threading.Lock()

    def start(self, volume_key: str, task: str, prompt: str) -> ConversationEntry:
        entry = ConversationEntry(task, prompt)
        with self._lock:
            self._entries.setdefault(volume_key, []).append(entry)
        return entry

    def entries(self, volume_key: Optional[str]) -> list[ConversationEntry]:
        with self._lock:
            return list(self._entries.get(volume_key or "", []))

    def clear(self, volume_key: Optional[str] = None) -> None:
        with self._lock:
            if volume_key is None:
                self._entries.clear()
            else:
                self._entries.pop(volume_key, None)

    def to_html(self, volume_key: Optional[str], volume_name: str = "") -> str:
        """The conversation about one volume as simple HTML for a QTextBrowser."""
        entries = self.entries(volume_key)
        if not entries:
            return (f"<p style='color:gray'>No questions about {html.escape(volume_name or 'this volume')} yet. "
                    f"Answers are {html.escape(AI_LABEL)}.</p>")
        parts = [f"<p style='color:gray'><i>{html.escape(AI_LABEL)}</i></p>"]
        for entry in entries:
            try:
                label = get_task(entry.task).label
            except InputError:  # not a task of ours: show what was recorded
                label = entry.task
            question = f": {html.escape(entry.prompt)}" if entry.prompt else ""
            parts.append(f"<p><b>{html.escape(label)}</b>{question}</p>")
            answer = entry.answer_html if entry.answer_html is not None and entry.status == "done" else (
                html.escape(entry.answer).replace("\n", "<br>") or "&hellip;")
            style = {"failed": "color:#b00020", "cancelled": "color:gray"}.get(entry.status, "")
            suffix = {"running": " &hellip;", "cancelled": " <i>(cancelled)</i>"}.get(entry.status, "")
            parts.append(f"<p style='margin-left:12px;{style}'>{answer}{suffix}</p>")
            if entry.used:
                parts.append(f"<p style='margin-left:12px;color:gray'><small>Seen as {html.escape(entry.used)}"
                             "</small></p>")
            if entry.details_html and entry.status == "done":
                parts.append(f"<div style='margin-left:12px;color:#444'>{entry.details_html}</div>")
        return "\n".join(parts)


class PromptHistory:
    """The prompts typed in this Slicer session, most recent first, without duplicates (kept in memory only)."""

    def __init__(self, size: int = 30) -> None:
        self.size = size
        self.items: list[str] = []

    def add(self, prompt: str) -> None:
        prompt = prompt.strip()
        if prompt:
            self.items = [prompt] + [p for p in self.items if p != prompt][: self.size - 1]


__all__ = ["STAGE_LABELS", "progress_text", "parse_choices", "require_prompt", "task_arguments", "api_value",
           "typed_result", "answer_text", "preprocessing_summary", "used_text", "selfcheck_summary",
           "VERDICT_COLORS", "TaskRequest", "StreamBuffer", "ConversationEntry", "ConversationLog", "PromptHistory",
           "answer_html", "marked_answer_html", "choice_lines", "measurement_lines", "evidence_items",
           "analysis_html"]
