"""The task registry (M3DAssistantLib.tasks): every task has every field, its names derive consistently, and every
layer offers exactly the registry's tasks. The wire, CLI and provenance names are spelled out here on purpose: they
are what users, the tutorial and saved results depend on, so a change to the registry that renames one fails here."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
from ninth_task import NINTH

from M3DAssistantLib import prompts, tasks
from M3DAssistantLib.errors import InputError
from M3DAssistantLib.geometry import CONVENTIONS, DEFAULT_CONVENTION
from M3DAssistantLib.results import BoxResult, ChoiceResult, Provenance, RetrievalResult, SegmentationResult, TextResult
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
    assert {t.key: (t.convention, t.window) for t in tasks.TASKS.values()} == {
        "report": ("m3d-cap-v2", "display"), "ask": ("m3d-cap-v2", "display"), "choose": ("m3d-cap-v2", "display"),
        "locate": ("m3d-seg-v1", "percentile"), "describe_region": ("m3d-seg-v1", "percentile"),
        "segment": ("m3d-seg-v1", "percentile"), "segment_expression": ("m3d-refseg-v1", "volume-percentile"),
        "find_similar": ("m3d-cap-v2", "display")}
    for task in tasks.TASKS.values():  # by any name, as the engine (key) and the export (training name) ask
        assert tasks.convention_for(task.key) == tasks.convention_for(task.training_name) == task.convention
    assert tasks.convention_for("REFSEG") == "m3d-refseg-v1"
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
    then sampling, on_text and analysis; nothing else on the engine takes on_text."""
    from M3DAssistantLib.engine import InferenceEngine

    streaming = {t.key for t in tasks.STREAMING_TASKS}
    with_on_text = {name for name, f in inspect.getmembers(InferenceEngine, inspect.isfunction)
                    if not name.startswith("_") and "on_text" in inspect.signature(f).parameters}
    assert with_on_text == streaming
    for task in tasks.STREAMING_TASKS:
        parameters = list(inspect.signature(getattr(InferenceEngine, task.engine_method)).parameters)
        assert parameters == ["self", *(a.name for a in task.arguments), "sampling", "on_text", "analysis"], task.key
    retrieve = inspect.signature(InferenceEngine.retrieve).parameters
    assert {"texts", "text", "volumes", "labels"} <= set(retrieve)


def test_the_geometry_has_no_task_table_of_its_own():
    from M3DAssistantLib import geometry

    assert not hasattr(geometry, "TASK_CONVENTIONS") and not hasattr(geometry, "default_convention")


# ---------------------------------------------------------------------------------------------------------------------
# every layer offers exactly the registry's tasks
# ---------------------------------------------------------------------------------------------------------------------


def _task_methods(cls, parameter: str) -> set[str]:
    return {name for name, f in inspect.getmembers(cls, callable)
            if not name.startswith("_") and parameter in inspect.signature(f).parameters}


def test_client_and_backends_offer_the_streaming_tasks_with_the_engine_arguments():
    from M3DAssistantLib.backends import ClientBackend, LocalWorkerBackend
    from M3DAssistantLib.serving.client import M3DClient

    streaming = {t.key for t in tasks.STREAMING_TASKS}
    assert _task_methods(M3DClient, "on_text") == streaming | {"run_task"}
    for backend in (ClientBackend, LocalWorkerBackend):
        assert _task_methods(backend, "on_text") == streaming
    for task in tasks.STREAMING_TASKS:
        names = [a.name for a in task.arguments]
        client = list(inspect.signature(getattr(M3DClient, task.key)).parameters)
        assert client == ["self", *names, "sampling", "on_text", "on_progress", "analysis"], task.key
        backend = inspect.signature(getattr(ClientBackend, task.key))
        assert list(backend.parameters) == ["self", *names, "sampling", "on_text", "analysis"], task.key
        assert getattr(ClientBackend, task.key).__name__ == task.key


class RecordingClient:
    """What a backend hands to its client: the task, the engine method's arguments and the sampling."""

    def __init__(self):
        self.calls = []

    def run_task(self, task, *arguments, sampling=None, on_text=None, on_progress=None):
        self.calls.append((task.key, arguments, sampling))
        return f"{task.key} answered"


def test_backend_task_methods_pass_the_arguments_by_position_or_name():
    from M3DAssistantLib.backends import ClientBackend

    client = RecordingClient()
    backend = ClientBackend(client)
    sampling = object()
    assert backend.ask("Why?") == "ask answered"
    backend.ask("Why?", history=[("a", "b")], sampling=sampling)
    backend.choose("Which?", ["x", "y"])
    backend.describe_region(roi="the ROI")
    backend.report()
    assert client.calls == [("ask", ("Why?", ()), None), ("ask", ("Why?", [("a", "b")]), sampling),
                            ("choose", ("Which?", ["x", "y"]), None), ("describe_region", ("the ROI",), None),
                            ("report", (), None)]
    with pytest.raises(TypeError, match="target"):
        backend.segment()
    with pytest.raises(TypeError):
        backend.locate("liver", "more")


def test_session_offers_every_task():
    from M3DAssistantLib.session import AssistantSession

    # check_installation (the self-check) also runs in the background, but is no task of the registry
    assert _task_methods(AssistantSession, "wait") == set(tasks.TASKS) | {"run_task", "check_installation"}
    for task in tasks.TASKS.values():
        parameters = list(inspect.signature(getattr(AssistantSession, task.key)).parameters)[1:]
        positional = [a for a in task.arguments if a.kind is not ArgumentKind.HISTORY]
        assert parameters[:len(positional) + task.on_volume] == ["volume_node"] * task.on_volume + [
            "roi_node" if a.kind is ArgumentKind.REGION else a.name for a in positional], task.key


# the request models as the OpenAPI schema names them: task -> (fields after the volume options, required fields)
REQUESTS = {
    "ReportRequest": ([], []),
    "AskRequest": (["question", "history"], ["question"]),
    "ChooseRequest": (["question", "choices"], ["question", "choices"]),
    "LocateRequest": (["expression"], ["expression"]),
    "DescribeRegionRequest": (["region"], ["region"]),
    "SegmentRequest": (["target"], ["target"]),
    "SegmentExpressionRequest": (["expression"], ["expression"]),
}


def test_server_routes_and_request_models_come_from_the_registry():
    pytest.importorskip("fastapi")
    from M3DAssistantLib.serving.app import create_app
    from M3DAssistantLib.serving.schemas import TaskOptions

    schema = create_app(object(), "token").openapi()
    task_paths = {p.rsplit("/", 1)[1] for p in schema["paths"] if re.fullmatch(r"/v1/volumes/\{volume_id}/\w+", p)}
    assert task_paths == {t.key for t in tasks.STREAMING_TASKS} | {"retrieve"}
    options = list(TaskOptions.model_fields)
    for task in tasks.STREAMING_TASKS:
        operation = schema["paths"][f"/v1/volumes/{{volume_id}}/{task.key}"]["post"]
        assert operation["operationId"] == task.key and operation["summary"] == task.summary
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        reference = body["$ref"] if "$ref" in body else body["anyOf"][0]["$ref"]  # report's body is optional
        assert reference == f"#/components/schemas/{task.request_model}"
        model = schema["components"]["schemas"][task.request_model]
        fields, required = REQUESTS[task.request_model]
        assert list(model["properties"]) == options + fields + ["analysis"] and model.get("required", []) == required
        analysis = schema["components"]["schemas"][model["properties"]["analysis"]["$ref"].rsplit("/", 1)[1]]
        assert list(analysis["properties"]) == [o.name for o in task.options], task.key  # the registry's options
        assert operation["requestBody"].get("required", False) == bool(required)


def test_request_bodies_travel_to_the_engine_arguments():
    pytest.importorskip("fastapi")
    from M3DAssistantLib.geometry import RasRoi
    from M3DAssistantLib.serving.protocol import request_body
    from M3DAssistantLib.serving.schemas import engine_arguments, task_request_model

    roi = RasRoi((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    examples = {"report": (), "ask": ("Why?", [("q", "a")]), "choose": ("Which?", ("x", "y")),
                "locate": ("liver",), "describe_region": (roi,), "segment": ("liver",),
                "segment_expression": ("the lesion",)}
    for task in tasks.STREAMING_TASKS:
        body = request_body(task, examples[task.key])
        assert list(body) == [a.field for a in task.arguments][:len(examples[task.key])]
        back = engine_arguments(task, task_request_model(task).model_validate(body))
        expected = list(examples[task.key])
        if task.key == "describe_region":
            assert back[0].to_dict() == roi.to_dict()
            continue
        assert [list(v) if isinstance(v, tuple) else v for v in back] == [
            list(v) if isinstance(v, tuple) else v for v in expected], task.key


def test_cli_has_a_subcommand_per_streaming_task():
    from M3DAssistantLib.cli import build_parser

    parser = build_parser()
    lines = {
        "report": ["report", "ct.nii"],
        "ask": ["ask", "ct.nii", "Is there a lesion?"],
        "choose": ["choose", "ct.nii", "Which plane?", "--choices", "Axial", "Coronal"],
        "locate": ["locate", "ct.nii", "liver"],
        "describe_region": ["describe", "ct.nii", "--roi", "box.mrk.json"],
        "segment": ["segment", "ct.nii", "liver"],
        "segment_expression": ["segment-expression", "ct.nii", "the lesion"],
    }
    assert set(lines) == {t.key for t in tasks.STREAMING_TASKS}
    for key, argv in lines.items():
        args = parser.parse_args(argv)
        assert args.task is tasks.TASKS[key] and args.command == argv[0] and args.volume == "ct.nii"
    assert parser.parse_args(lines["choose"]).choices == ["Axial", "Coronal"]
    assert parser.parse_args(lines["describe_region"]).roi == "box.mrk.json"
    assert parser.parse_args(["retrieve", "ct.nii", "--text", "liver"]).command == tasks.FIND_SIMILAR.cli_command


def test_batch_runs_the_tasks_that_need_at_most_one_text():
    from M3DAssistantLib.batch import BATCH_TASKS, BatchTask, batch_task_forms

    assert list(BATCH_TASKS) == ["report", "ask", "locate", "segment", "segment_expression"]
    assert batch_task_forms() == ("report | ask:QUESTION | locate:EXPRESSION | segment:TARGET | "
                                  "segment_expression:EXPRESSION")
    spec = BatchTask.parse("segment-expression: the lesion ")
    assert spec.task is tasks.SEGMENT_EXPRESSION and spec.arguments == ("the lesion",)
    assert spec.slug.startswith("segment_expression_the_lesion_") and spec.text == "segment_expression:the lesion"
    assert BatchTask.parse("report").arguments == ()
    with pytest.raises(InputError, match="unknown batch task 'choose'; use one of report, ask, locate"):
        BatchTask.parse("choose:Which?")
    with pytest.raises(InputError, match="'segment' needs an argument"):
        BatchTask.parse("segment")


def test_panel_reads_each_task_arguments_by_kind():
    from M3DAssistantLib import panel

    class Node:
        def GetName(self):
            return "my ROI"

    region, volumes = Node(), ["ct1", "ct2"]
    expected = {
        "report": ([], ""),
        "ask": (["Why?"], "Why?"),
        "choose": (["Why?", ["A", "B"]], "Why? (A; B)"),
        "locate": (["Why?"], "Why?"),
        "describe_region": ([region], "my ROI"),
        "segment": (["Why?"], "Why?"),
        "segment_expression": (["Why?"], "Why?"),
        "find_similar": ([volumes, "Why?"], "Why?"),
    }
    for key, task in tasks.TASKS.items():
        prompt = "" if key in ("report", "describe_region") else " Why? "
        assert panel.task_arguments(task, prompt, choices="A; B", region=region, candidates=volumes) == expected[key]
    with pytest.raises(InputError, match="Describe ROI needs|Choose the ROI"):
        panel.task_arguments(tasks.DESCRIBE_REGION, "")
    with pytest.raises(InputError, match="Multiple choice needs a question"):
        panel.task_arguments(tasks.CHOOSE, "", choices="A; B")


# ---------------------------------------------------------------------------------------------------------------------
# a ninth task: what adding one takes
# ---------------------------------------------------------------------------------------------------------------------
# A task the registry does not have, declared as a new entry would be. What it needs besides this entry: its prompt
# builder (here a lambda; in the product a function in prompts.py) and its engine method (NinthTaskEngine.count_lesions
# below). The server route and request model, the client, the backend, the session, the Logic's runner, the CLI
# subcommand and the panel's arguments all come from the entry. For users and IDEs a task also gets one thin method
# on M3DClient, AssistantSession and the Logic (and a button named Task.button in the .ui); the generic paths tested
# here do not need them. The entry itself is in Testing/helpers/ninth_task.py.


class NinthTaskEngine:
    """Stands in for InferenceEngine: the server's volume plumbing plus the one method a new task adds."""

    progress = None

    def __init__(self):
        self.prompts = []

    def info(self):
        return {"model": "fake"}

    def set_volume(self, array, ijk_to_ras, *, content_key=None, **options):
        import types

        return types.SimpleNamespace(key=content_key)

    def forget_volume(self, key=None):
        pass

    def cancel(self):
        pass

    def count_lesions(self, target, *, sampling=None, on_text=None):  # what the engine gains
        prompt = NINTH.build_prompt(target)
        self.prompts.append(prompt)
        if on_text is not None:
            on_text("Three")
            on_text(" lesions.")
        prov = Provenance(task=NINTH.training_name, model="fake", model_revision=None, dtype="float32",
                          device="cpu", prompt=prompt)
        return TextResult("Three lesions.", prov)


def test_a_ninth_task_needs_only_its_entry_its_prompt_and_its_engine_method(headless_slicer, tmp_path):
    pytest.importorskip("fastapi")
    import numpy as np
    import slicer
    from fastapi import APIRouter
    from serving import serve_in_thread

    from M3DAssistantLib import panel
    from M3DAssistantLib.backends import ClientBackend, _task_method
    from M3DAssistantLib.cli import _add_task_command, build_parser
    from M3DAssistantLib.serving.app import create_app
    from M3DAssistantLib.serving.client import M3DClient
    from M3DAssistantLib.serving.routes.tasks import add_task_route
    from M3DAssistantLib.session import AssistantSession

    assert (NINTH.logic_name, NINTH.cli_command, NINTH.button, NINTH.request_model) == (
        "countLesions", "count-lesions", "countLesionsButton", "CountLesionsRequest")

    # server: the route and its request model; then the client and a backend over HTTP
    engine = NinthTaskEngine()
    app = create_app(engine, "ninth-task-token")
    router = APIRouter()
    add_task_route(router, NINTH)  # what importing the routes does for every registry entry
    app.include_router(router)
    schema = app.openapi()
    assert schema["paths"]["/v1/volumes/{volume_id}/count_lesions"]["post"]["summary"] == NINTH.summary
    assert schema["components"]["schemas"]["CountLesionsRequest"]["required"] == ["target"]
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    with serve_in_thread(app) as (url, _port):
        client = M3DClient(url, "ninth-task-token")
        client.set_volume(array, np.eye(4))
        streamed = []
        result = client.run_task(NINTH, "liver", on_text=streamed.append)
        assert result.text == "Three lesions." and "".join(streamed) == "Three lesions."
        assert result.provenance.task == "count" and engine.prompts == [" How many lesions are in the liver?"]
        with pytest.raises(InputError, match="target"):  # the request model's checks, as for every task
            client._request_task(NINTH.key, client._volume.remote.volume_id, {"target": 3}, None, None)

        backend_type = type("NinthBackend", (ClientBackend,), {NINTH.key: _task_method(NINTH)})  # as at import
        session = AssistantSession(backend_type(client))
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=np.eye(4), name="ct")
        answer, result = session.run_task(NINTH, volume, "kidney")
        assert answer == "Three lesions." and isinstance(result, TextResult)
        assert engine.prompts[-1] == " How many lesions are in the kidney?"

    # the panel: arguments from the prompt box, the console value and the conversation line by output kind
    assert panel.task_arguments(NINTH, " liver ") == (["liver"], "liver")
    with pytest.raises(InputError, match="Count lesions needs a structure"):
        panel.task_arguments(NINTH, "  ")
    assert panel.api_value(NINTH, (answer, result)) == "Three lesions."
    assert panel.answer_text(NINTH, (answer, result)) == "Three lesions."

    # the CLI subcommand
    parser = build_parser()
    _add_task_command(parser._subparsers._group_actions[0], NINTH)  # what build_parser does for every entry
    args = parser.parse_args(["count-lesions", "ct.nii", "liver", "-o", "count.txt"])
    assert args.task is NINTH and args.target == "liver" and args.output == "count.txt"
