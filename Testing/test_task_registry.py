"""The task registry (M3DAssistantLib.tasks): every task has every field, its names derive consistently, and every
layer offers exactly the registry's tasks. The wire, CLI and provenance names are spelled out here on purpose: they
are what users, the tutorial and saved results depend on, so a change to the registry that renames one fails here."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
from M3DAssistantLib import prompts, tasks
from M3DAssistantLib.errors import InputError
from M3DAssistantLib.geometry import CONVENTIONS, DEFAULT_CONVENTION
from M3DAssistantLib.results import BoxResult, ChoiceResult, Provenance, RetrievalResult, SegmentationResult
from M3DAssistantLib.results import TextResult
from M3DAssistantLib.tasks import ArgumentKind, Output, ResultKind

# key -> (Logic method, m3d subcommand, dataset / provenance name, result kind): the published names
PUBLISHED = {
    "report": ("report", "report", "report", "text"),
    "ask": ("ask", "ask", "vqa_open", "text"),
    "choose": ("choose", "choose", "vqa_closed", "choice"),
    "locate": ("locate", "locate", "rec", "box"),
    "describe_region": ("describeRegion", "describe", "reg", "text"),
    "segment": ("segment", "segment", "seg", "segmentation"),
    "segment_expression": ("segmentExpression", "segment-expression", "refseg", "segmentation"),
    "find_similar": ("findSimilar", "retrieve", "retrieval", "retrieval"),
}


def test_the_registry_holds_the_eight_tasks_under_their_published_names():
    assert list(tasks.TASKS) == list(PUBLISHED)
    for key, (logic, command, training, kind) in PUBLISHED.items():
        task = tasks.TASKS[key]
        assert (task.key, task.logic_name, task.cli_command, task.training_name, task.result.value) == (
            key, logic, command, training, kind)
    assert [t.key for t in tasks.STREAMING_TASKS] == list(PUBLISHED)[:7]  # every task but retrieval
    assert tasks.TRAINING_NAMES == ("report", "vqa_open", "vqa_closed", "rec", "reg", "seg", "refseg")
    assert tasks.FIND_SIMILAR.engine_method == "retrieve"
    assert all(t.engine_method == t.key for t in tasks.STREAMING_TASKS)


@pytest.mark.parametrize("task", list(tasks.TASKS.values()), ids=list(tasks.TASKS))
def test_every_task_has_every_field(task):
    for field in dataclasses.fields(tasks.Task):
        value = getattr(task, field.name)
        if field.name in ("parse_answer", "prompt_hint") or (field.name == "summary" and not task.streams):
            continue  # optional by nature: a text answer has no structure, a report needs no prompt
        if field.name == "build_prompt" and not task.streams:
            assert value is None  # M3D-CLIP ranks; it writes no prompt
            continue
        assert value not in (None, ""), f"{task.key}.{field.name} is empty"
    assert task.label[0].isupper() and task.help == task.help.strip()
    assert task.convention in CONVENTIONS
    assert isinstance(task.result, ResultKind) and isinstance(task.output, Output)
    assert all(isinstance(a, tasks.Argument) and isinstance(a.kind, ArgumentKind) for a in task.arguments)
    assert len({a.name for a in task.arguments}) == len(task.arguments)
    if task.streams:  # what the prompt box must hold is said exactly when the task reads it
        assert (task.prompt_hint is not None) == (task.takes(ArgumentKind.TEXT) is not None)
        assert task.build_prompt.__module__ == prompts.__name__
        assert task.parse_answer is None or task.parse_answer.__module__ == prompts.__name__
        assert re.fullmatch(r"[A-Z].*", task.summary)


def test_names_derive_from_the_key():
    for task in tasks.TASKS.values():
        parts = task.key.split("_")
        assert task.logic_name == parts[0] + "".join(p.title() for p in parts[1:])
        assert task.button == task.logic_name + "Button"
        assert task.request_model == "".join(p.title() for p in parts) + "Request"
        assert task.segments == (task.result is ResultKind.SEGMENTATION)
    # declared only where the published name is not the derived one
    declared = {t.key for t in tasks.TASKS.values() if t.cli_command != t.key.replace("_", "-")}
    assert declared == {"describe_region", "find_similar"}


def test_every_spelling_finds_its_task_and_nothing_else():
    seen = {}
    for task in tasks.TASKS.values():
        for name in {task.key, task.logic_name, task.cli_command, task.training_name}:
            assert tasks.get(name) is task
            assert seen.setdefault(name, task) is task, f"{name!r} names two tasks"
    with pytest.raises(InputError, match="unknown task 'segmentation'; the tasks are report, ask, choose"):
        tasks.get("segmentation")
    assert tasks.by_training_name("refseg") is tasks.SEGMENT_EXPRESSION
    for name in ("segment_expression", "retrieval", "caption"):  # a key, a task outside the datasets, a stranger
        with pytest.raises(InputError, match="the tasks are report, vqa_open, vqa_closed, rec, reg, seg, refseg"):
            tasks.by_training_name(name)


def test_conventions_come_from_the_registry():
    assert {t.key: t.convention for t in tasks.TASKS.values()} == {
        "report": "m3d-cap-v1", "ask": "m3d-cap-v1", "choose": "m3d-cap-v1", "locate": "m3d-seg-v1",
        "describe_region": "m3d-seg-v1", "segment": "m3d-seg-v1", "segment_expression": "m3d-seg-v1",
        "find_similar": DEFAULT_CONVENTION}
    for task in tasks.TASKS.values():  # by any name, as the engine (key) and the export (training name) ask
        assert tasks.convention_for(task.key) == tasks.convention_for(task.training_name) == task.convention
    assert tasks.convention_for("REFSEG") == "m3d-seg-v1"
    assert tasks.convention_for(None) == tasks.convention_for("vqa") == DEFAULT_CONVENTION


def test_result_kinds_are_the_result_types():
    prov = Provenance(task="x", model="m", model_revision=None, dtype="float32", device="cpu", prompt="")
    examples = [TextResult("t", prov), ChoiceResult("t", ["a", "b"], None, None, prov),
                BoxResult("t", "liver", None, None, prov), SegmentationResult("t", "liver", None, prov),
                RetrievalResult("q", [], prov)]
    assert [tasks.result_kind(r) for r in examples] == list(ResultKind)
    assert [kind.result_type for kind in ResultKind] == [type(r) for r in examples]
    with pytest.raises(TypeError, match="not a task result"):
        tasks.result_kind(prov)


def test_engine_methods_take_the_registry_arguments():
    """The engine's task methods are the registry's streaming tasks, each taking the registry's arguments in order,
    then sampling and on_text; nothing else on the engine takes on_text."""
    from M3DAssistantLib.engine import InferenceEngine

    streaming = {t.key for t in tasks.STREAMING_TASKS}
    with_on_text = {name for name, f in inspect.getmembers(InferenceEngine, inspect.isfunction)
                    if not name.startswith("_") and "on_text" in inspect.signature(f).parameters}
    assert with_on_text == streaming
    for task in tasks.STREAMING_TASKS:
        parameters = list(inspect.signature(getattr(InferenceEngine, task.engine_method)).parameters)
        assert parameters == ["self", *(a.name for a in task.arguments), "sampling", "on_text"], task.key
    retrieve = inspect.signature(InferenceEngine.retrieve).parameters
    assert {"texts", "text", "volumes", "labels"} <= set(retrieve)


def test_the_geometry_has_no_task_table_of_its_own():
    from M3DAssistantLib import geometry

    assert not hasattr(geometry, "TASK_CONVENTIONS") and not hasattr(geometry, "default_convention")
