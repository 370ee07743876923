"""The M3DAssistant module's Logic and its Lib helpers (tasks, dependencies, downloads) without a Slicer application.

The module file is imported under the test harness (``Testing/helpers/slicer_harness``: real Qt widgets, real MRML from
slicer-core, Slicer's own ``slicer.util``), so the module's own self-test of the console API runs here on real nodes,
with a fake model backend. The panel as a user drives it, with the real worker: test_assistant_panel.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import subprocess
import sys
import textwrap
import threading
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from repo_paths import REPO

from M3DAssistantLib import AI_LABEL, dependencies, panel, tasks
from M3DAssistantLib.errors import CheckpointError, InputError, M3DError
from M3DAssistantLib.model import checkpoint_files, download_check
from M3DAssistantLib.progress import ProgressEvent
from M3DAssistantLib.results import ChoiceResult, Provenance, RetrievalResult, SegmentationResult, TextResult
from M3DAssistantLib.settings import MemorySettings

MODULE_FILE = REPO / "M3DAssistant" / "M3DAssistant.py"
UI_FILE = REPO / "M3DAssistant" / "Resources" / "UI" / "M3DAssistant.ui"


def prov(task: str) -> Provenance:
    return Provenance(task=task, model="fake", model_revision=None, dtype="float32", device="cpu", prompt="")


# ---------------------------------------------------------------------------------------------------------------------
# the module file on real MRML
# ---------------------------------------------------------------------------------------------------------------------


def test_module_self_test_console_api_on_real_mrml(assistant):
    """The module's own Slicer self-test of all eight console methods (fake model, real nodes)."""
    suite = unittest.TestSuite([assistant.M3DAssistantTest("test_TasksWithFakeBackend")])
    output = io.StringIO()
    result = unittest.TextTestRunner(stream=output, verbosity=2).run(suite)
    assert result.wasSuccessful(), output.getvalue()


class RecordingBackend:
    """Records the window / crop / sampling each task gets; streams its answer."""

    def __init__(self, config):
        self.config, self.calls, self.closed, self.on_progress = config, [], False, None

    def set_volume(self, array, ijk_to_ras, window=None, roi=None, display_window=None, modality=None):
        self.calls.append(("set_volume", window, roi))

    def set_display(self, display_window=None, modality=None):
        self.calls.append(("set_display", display_window, modality))

    def ask(self, question, history=(), sampling=None, on_text=None):
        self.calls.append(("ask", question, sampling.max_new_tokens))
        if self.on_progress:
            self.on_progress(ProgressEvent("generate", 0.5, "1 token"))
        if on_text:
            on_text("yes")
        return TextResult("yes", prov("vqa_open"))

    def cancel(self):
        pass

    def close(self):
        self.closed = True


def ct_node():
    import numpy as np
    import slicer

    array = np.arange(8 * 10 * 12, dtype=np.int16).reshape(8, 10, 12)
    return slicer.util.addVolumeFromArray(array, ijkToRAS=np.diag([1.0, 1.0, 2.0, 1.0]), name="ct")


def test_logic_options_progress_and_callbacks(assistant):
    logic = assistant.M3DAssistantLogic(backendFactory=RecordingBackend, settings=MemorySettings())
    volume = ct_node()
    events, chunks = [], []
    logic.progressCallback = events.append
    parameters = logic.getParameterNode()
    parameters.maxNewTokens = 17
    parameters.windowPreset = "Lung"

    assert logic.ask(volume, "Any nodule?", onText=chunks.append) == "yes"
    backend = logic._backend
    assert backend.calls == [("set_volume", "lung", None), ("ask", "Any nodule?", 17)]
    assert chunks == ["yes"] and [e.stage for e in events] == ["generate"]
    assert isinstance(logic.lastResult, TextResult)

    logic.ask(volume, "Again?", window=(40.0, 400.0), maxNewTokens=3)  # per-call overrides
    assert backend.calls[-2:] == [("set_volume", (40.0, 400.0), None), ("ask", "Again?", 3)]
    with pytest.raises(TypeError, match="unknown option"):
        logic.ask(volume, "?", temperature=2)

    request = logic.ask(volume, "Later?", wait=False)  # as the panel runs it
    assert isinstance(request, panel.TaskRequest) and request.wait(10) and request.result() == "yes"

    parameters.runOn = assistant.RUN_CPU  # another configuration: a new session; the old backend is closed
    logic.ask(volume, "On the CPU?")
    assert backend.closed and logic._backend is not backend and logic._backend.config["device"] == "cpu"
    logic.shutdown()
    assert logic._backend is None


def test_window_presets(assistant):
    volume = ct_node()
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(350.0, 40.0)
    window_for = assistant.M3DAssistantLogic.windowFor
    assert window_for(volume, assistant.WINDOW_DEFAULT) is None
    assert window_for(volume, "Abdomen") == "abdomen"
    assert window_for(volume, assistant.WINDOW_DISPLAY) == (40.0, 350.0)
    from M3DAssistantLib.preprocessing import WINDOW_PRESETS

    special = (assistant.WINDOW_DEFAULT, assistant.WINDOW_DISPLAY)
    named = [c.lower() for c in assistant.WINDOW_CHOICES if c not in special]
    assert set(named) <= set(WINDOW_PRESETS)  # every preset the panel offers is one the engine knows


def test_model_and_where_it_runs(assistant, tiny_phi3, tmp_path):
    logic = assistant.M3DAssistantLogic(settings=MemorySettings({"pythonExecutable": "/venv/bin/python"}))
    p = logic.getParameterNode()
    assert logic.modelSource() == "GoodBaiBai88/M3D-LaMed-Phi-3-4B"
    p.modelChoice = assistant.MODEL_LLAMA2
    assert logic.modelSource() == "GoodBaiBai88/M3D-LaMed-Llama-2-7B"
    logic.settings.set("modelRevision", "0123abcd")  # pinned: the worker resolves owner/name@revision
    assert logic.modelSource() == "GoodBaiBai88/M3D-LaMed-Llama-2-7B@0123abcd"
    logic.settings.set("modelRevision", "main; rm -rf /")
    with pytest.raises(ValueError, match="branch, tag or commit"):
        logic.modelSource()
    logic.settings.set("modelRevision", "")

    p.modelChoice, p.modelSource = assistant.MODEL_FOLDER, str(tiny_phi3)
    config = logic.configuration()
    assert config == {"remote": False, "model": str(tiny_phi3), "device": None, "python": "/venv/bin/python",
                      "hfHome": None, "clipModel": None}
    p.modelSource = str(tmp_path / "nothing here")
    with pytest.raises(CheckpointError, match="no such folder"):
        logic.modelSource()

    p.modelChoice = assistant.MODEL_ADAPTER
    output = tmp_path / "run 1"
    (output / "adapter").mkdir(parents=True)
    (output / "adapter" / "adapter_config.json").write_text("{}")
    p.modelSource = str(output)
    with pytest.raises(M3DError, match="merge it once|Merge it once"):
        logic.modelSource()

    p.runOn = assistant.RUN_REMOTE
    with pytest.raises(ValueError, match="URL"):
        logic.configuration()
    p.serverUrl = "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="token"):
        logic.session()  # a remote server needs its token (typed in the panel, kept in memory)
    logic.serverToken = "in-memory-token"
    session = logic.session()
    assert type(session.backend).__name__ == "ClientBackend" and logic.workerProcess() is None
    stored = [p.parameterNode.GetParameter(name) for name in p.parameterNode.GetParameterNames()]
    assert stored and not any("in-memory-token" in value for value in stored)  # never in the scene
    assert logic.workerStatus().startswith("Remote server")

    # https with a self-signed certificate: the certificate file set in Advanced is what the client trusts
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "server-ca.pem"))
    p.serverUrl = "https://127.0.0.1:9"
    logic.settings.set("serverCaFile", str(tmp_path / "server-ca.pem"))
    assert logic.configuration()["caFile"] == str(tmp_path / "server-ca.pem")
    assert logic.session().backend._client_for_task()._tls is not None
    logic.settings.set("serverCaFile", str(tmp_path / "missing.pem"))
    with pytest.raises(M3DError, match="cannot use .*missing.pem.* as the server's certificate"):
        logic.session()


def test_local_configuration_builds_a_lazy_worker(assistant, tiny_phi3, tmp_path):
    settings = MemorySettings({"hfHome": str(tmp_path / "hf cache"), "pythonExecutable": sys.executable})
    logic = assistant.M3DAssistantLogic(settings=settings)
    p = logic.getParameterNode()
    p.modelChoice, p.modelSource, p.runOn = assistant.MODEL_FOLDER, str(tiny_phi3), assistant.RUN_GPU
    logic.session()
    worker = logic.workerProcess()
    assert worker.poll().value == "stopped"  # nothing starts before a request or the Start button
    assert worker.device == "cuda" and worker.model == str(tiny_phi3) and worker.python_executable == sys.executable
    assert worker.env["HF_HOME"] == str(tmp_path / "hf cache")
    assert logic.workerStatus() == "not running"
    assert logic.workerStarting() is None
    logic.prepareWorker()  # another Python: no install; a local folder: no download check needed
    logic.shutdown()


class AllTasksBackend:
    """The engine's task methods with fixed answers, recording what each task got (for the widget test)."""

    def __init__(self, config):
        self.config, self.calls, self.on_progress = config, [], None

    def set_volume(self, array, ijk_to_ras, window=None, roi=None, display_window=None, modality=None):
        pass

    def set_display(self, display_window=None, modality=None):
        pass

    def _answer(self, key, result, on_text, *arguments):
        self.calls.append((key, *arguments))
        if on_text is not None:
            on_text(result.text)
        return result

    def report(self, sampling=None, on_text=None):
        return self._answer("report", TextResult("No findings.", prov("report")), on_text)

    def ask(self, question, history=(), sampling=None, on_text=None):
        return self._answer("ask", TextResult("Yes.", prov("vqa_open")), on_text, question, len(history))

    def choose(self, question, choices, sampling=None, on_text=None):
        return self._answer("choose", ChoiceResult("B. Lung", list(choices), "B", choices[1], prov("vqa_closed")),
                            on_text, question, list(choices))

    def locate(self, expression, sampling=None, on_text=None):
        from M3DAssistantLib.geometry import RasRoi
        from M3DAssistantLib.results import BoxResult

        return self._answer("locate", BoxResult("[0.1,0.1,0.1,0.5,0.5,0.5]", expression, (0.1,) * 3 + (0.5,) * 3,
                                                RasRoi((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)), prov("rec")),
                            on_text, expression)

    def describe_region(self, roi, sampling=None, on_text=None):
        return self._answer("describe_region", TextResult("A kidney.", prov("reg")), on_text, tuple(roi.size))

    def _mask(self, key, target, on_text):
        import numpy as np

        mask = np.zeros((8, 10, 12), np.uint8)
        mask[2:4, 3:6, 3:6] = 1
        return self._answer(key, SegmentationResult("It is [SEG].", target, mask, prov("seg")), on_text, target)

    def segment(self, target, sampling=None, on_text=None):
        return self._mask("segment", target, on_text)

    def segment_expression(self, expression, sampling=None, on_text=None):
        return self._mask("segment_expression", expression, on_text)

    def retrieve(self, texts=None, text=None, volumes=None, labels=None, display_windows=None, modalities=None):
        self.calls.append(("retrieve", text, tuple(labels)))
        return RetrievalResult(text, [(i, name, 1.0 - i / 10) for i, name in enumerate(labels)], prov("retrieval"))

    def cancel(self):
        pass

    def close(self):
        pass


@pytest.fixture
def widget(slicer_harness):
    """The module's panel after its real setup() on real Qt widgets, its Logic on AllTasksBackend."""
    slicer_harness.loadModule("M3DAssistant")
    widget = slicer_harness.openModule("M3DAssistant")
    widget.logic._backendFactory = AllTasksBackend
    widget.logic.settings = MemorySettings()
    return widget


def test_the_panel_runs_every_task_from_its_button(widget, slicer_harness):
    """Each registry task's button, clicked with the panel's inputs, runs the task in the background; the timer
    collects the streamed answer and the conversation shows the finished one (the widget's generic path)."""
    import slicer

    volume = ct_node()
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "my box")
    roi.SetCenter(1.0, 2.0, 3.0)
    roi.SetSize(4.0, 5.0, 6.0)
    p = widget._parameterNode
    p.inputVolume, p.describeRoi, p.choices = volume, roi, "Liver; Lung; Bone"
    prompts = {"report": "", "describe_region": "", "find_similar": "liver"}
    for key, task in tasks.TASKS.items():
        button = getattr(widget.ui, task.button)
        assert button.text == task.label, key
        widget.ui.promptComboBox.setEditText(prompts.get(key, "the liver"))
        button.click()
        running = widget._running
        assert running is not None and running[0] == key and button.text == "Cancel"
        slicer_harness.waitFor(lambda: widget._running is None, 10, f"{key} to finish")  # noqa: B023
        entry = widget._conversation.entries(volume.GetID())[-1]
        assert (entry.task, entry.status) == (key, "done"), entry
        assert entry.answer == panel.answer_text(task, running[1].output)
        assert button.text == task.label
    calls = widget.logic._backend.calls
    assert calls == [("report",), ("ask", "the liver", 0), ("choose", "the liver", ["Liver", "Lung", "Bone"]),
                     ("locate", "the liver"), ("describe_region", (4.0, 5.0, 6.0)), ("segment", "the liver"),
                     ("segment_expression", "the liver"), ("retrieve", "liver", ("ct",))]
    segmentation = p.outputSegmentation  # the first segment made a segmentation; the second went into it
    assert segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() == 2
    conversation = widget._conversation.entries(volume.GetID())
    assert [e.prompt for e in conversation] == ["", "the liver", "the liver (Liver; Lung; Bone)", "the liver",
                                               "my box", "the liver", "the liver", "liver"]


def test_a_task_without_its_input_says_what_to_type(widget, slicer_harness):
    import slicer

    widget._parameterNode.inputVolume = ct_node()
    for key, prompt, message in (("segment", "  ", "Segment needs a structure"),
                                 ("choose", "Which?", "at least two choices"),
                                 ("describe_region", "", "Choose the ROI to describe")):
        widget.ui.promptComboBox.setEditText(prompt)
        getattr(widget.ui, tasks.TASKS[key].button).click()
        (_, error), = slicer_harness.slotErrors  # shown by tryWithErrorDisplay, which re-raises, as in Slicer
        assert isinstance(error, InputError) and message in str(error)
        slicer_harness.slotErrors.clear()
        assert widget._running is None
    assert slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_the_logic_runs_a_task_given_as_a_registry_entry(assistant):
    """Logic.runTask takes any Task: a ninth task of the registry runs from the console without more Logic code."""
    from ninth_task import NINTH

    class Backend(RecordingBackend):
        def count_lesions(self, target, sampling=None, on_text=None):
            self.calls.append(("count_lesions", target))
            return TextResult("Three.", prov("count"))

    logic = assistant.M3DAssistantLogic(backendFactory=Backend, settings=MemorySettings())
    assert logic.runTask(NINTH, ct_node(), "liver") == "Three."
    assert logic._backend.calls[-1] == ("count_lesions", "liver") and logic.lastResult.text == "Three."
    request = logic.runTask("ask", ct_node(), "Later?", wait=False)  # by name, as the panel runs it
    assert request.task == "ask" and request.wait(10) and request.result() == "yes"
    with pytest.raises(TypeError, match="needs the volume node"):
        logic.runTask("report")


# ---------------------------------------------------------------------------------------------------------------------
# the .ui
# ---------------------------------------------------------------------------------------------------------------------


def ui_tree():
    tree = ET.parse(UI_FILE)
    widgets = {w.get("name"): w for w in tree.iter("widget")}
    bound = {name: w.findtext("property[@name='SlicerParameterName']/string") for name, w in widgets.items()
             if w.find("property[@name='SlicerParameterName']") is not None}
    return widgets, bound


def test_ui_binds_every_parameter_and_never_the_token():
    from module_files import parameter_node_fields

    widgets, bound = ui_tree()
    assert set(bound.values()) == set(parameter_node_fields("M3DAssistant"))  # every field has its widget
    assert "serverTokenLineEdit" not in bound and "rememberTokenCheckBox" not in bound
    token = widgets["serverTokenLineEdit"]
    assert token.findtext("property[@name='echoMode']/enum") == "QLineEdit::Password"
    source = MODULE_FILE.read_text(encoding="utf-8")
    for task in tasks.TASKS.values():  # one button per task, named after it (Task.button), with the task's label
        assert widgets[task.button].findtext("property[@name='text']/string") == task.label
        assert f"def {task.logic_name}(" in source and f'self.runTask("{task.logic_name}", ' in source


# ---------------------------------------------------------------------------------------------------------------------
# M3DAssistantLib.tasks and M3DAssistantLib.panel
# ---------------------------------------------------------------------------------------------------------------------


def test_tasks_table_matches_the_help_and_the_session():
    from M3DAssistantLib.session import AssistantSession

    assert [spec.label for spec in tasks.TASKS.values()] == [
        "Report", "Ask", "Multiple choice", "Locate", "Describe ROI", "Segment", "Segment by description",
        "Find similar"]
    for task in tasks.TASKS.values():
        assert callable(getattr(AssistantSession, task.key))


def test_choices_prompts_and_progress_text():
    assert panel.parse_choices(" Axial; Coronal ;;Sagittal\nOblique ") == ["Axial", "Coronal", "Sagittal", "Oblique"]
    with pytest.raises(InputError, match="at least two"):
        panel.parse_choices("Axial")
    assert panel.require_prompt("report", "") == ""
    assert panel.require_prompt("ask", "  Why?  ") == "Why?"
    with pytest.raises(InputError, match="Segment needs a structure"):
        panel.require_prompt("segment", "   ")
    assert panel.progress_text(ProgressEvent("download", 0.456, "model.safetensors")) == (
        "Downloading the model: model.safetensors", 46)
    assert panel.progress_text(ProgressEvent("generate", 0.2, "12 tokens")) == ("Writing the answer", 20)
    assert panel.progress_text(ProgressEvent("load", None, "")) == ("Loading the model", None)
    assert panel.progress_text(ProgressEvent("load", None, "x" * 500))[0].endswith("...")


class FakeNode:
    def __init__(self, name, segments=None):
        self.name, self.segments = name, segments or {}

    def GetName(self):
        return self.name

    def GetSegmentation(self):
        return types.SimpleNamespace(GetSegment=lambda sid: types.SimpleNamespace(GetName=lambda: self.segments[sid]))


def test_api_values_and_answer_texts():
    import numpy as np

    text = TextResult("Fine.", prov("report"))
    node = FakeNode("ct M3D report")
    assert panel.api_value("report", (node, text)) is node and panel.typed_result("report", (node, text)) is text
    assert "saved as text node 'ct M3D report'" in panel.answer_text("report", (node, text))
    choice = ChoiceResult("C. Sagittal", ["Axial", "Coronal", "Sagittal"], "C", "Sagittal", prov("vqa_closed"))
    assert panel.api_value("choose", ("Sagittal", choice)) == "Sagittal"
    assert panel.answer_text("choose", ("Sagittal", choice)) == "C. Sagittal"
    mask = np.zeros((2, 3, 4), np.uint8)
    mask[0, 0, :3] = 1
    seg = SegmentationResult("It is [SEG].", "liver", mask, prov("seg"))
    segmentation = FakeNode("M3D segmentation", {"s1": "liver (2)"})
    assert panel.api_value("segment", (segmentation, "s1", seg)) == (segmentation, "s1")
    assert "segment 'liver (2)' added to 'M3D segmentation', 3 voxels" in panel.answer_text(
        "segment", (segmentation, "s1", seg))
    absent = SegmentationResult("No.", "liver", None, prov("seg"), absent=True)
    assert panel.api_value("segmentExpression", (None, None, absent)) == (None, None)
    assert "nothing was added" in panel.answer_text("segmentExpression", (None, None, absent))
    ranking = RetrievalResult("liver", [(1, "b", 0.9), (0, "a", 0.5)], prov("retrieval"))
    candidates = [FakeNode("a"), FakeNode("b")]
    assert panel.api_value("findSimilar", ranking, candidates) == [(candidates[1], 0.9), (candidates[0], 0.5)]
    assert panel.answer_text("findSimilar", ranking) == "1. b (0.900)\n2. a (0.500)"


def test_stream_buffer_across_threads_and_conversation_html():
    buffer = panel.StreamBuffer()
    threads = [threading.Thread(target=lambda i=i: [buffer.put_text(f"{i}") for _ in range(100)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    buffer.put_progress(ProgressEvent("encode"))
    buffer.put_progress(ProgressEvent("generate", 0.1))
    text, progress = buffer.drain()
    assert sorted(text) == sorted("0123" * 100) and progress == ProgressEvent("generate", 0.1)
    assert buffer.drain() == ("", None)

    log = panel.ConversationLog()
    assert "No questions about ct yet" in log.to_html("vtkMRMLScalarVolumeNode1", "ct")
    entry = log.start("vtkMRMLScalarVolumeNode1", "ask", "Is <this> & that?")
    entry.answer = "Yes\nreally"
    html = log.to_html("vtkMRMLScalarVolumeNode1")
    assert "Is &lt;this&gt; &amp; that?" in html and "Yes<br>really" in html and "&hellip;" in html
    assert AI_LABEL in html
    entry.status = "done"
    log.start("vtkMRMLScalarVolumeNode1", "report", "").status = "cancelled"
    html = log.to_html("vtkMRMLScalarVolumeNode1")
    assert "(cancelled)" in html and log.entries("vtkMRMLScalarVolumeNode2") == []
    log.clear("vtkMRMLScalarVolumeNode1")
    assert log.entries("vtkMRMLScalarVolumeNode1") == []

    history = panel.PromptHistory(size=3)
    for prompt in ["a", "b", "a", " ", "c", "d"]:
        history.add(prompt)
    assert history.items == ["d", "c", "a"]


# ---------------------------------------------------------------------------------------------------------------------
# M3DAssistantLib.dependencies
# ---------------------------------------------------------------------------------------------------------------------


def test_requirements_never_touch_slicers_own_packages(tmp_path):
    names = {dependencies.canonical_name(dependencies.requirement_name(r)) for r in dependencies.read_requirements()}
    assert names and not names & {"numpy", "simpleitk", "torch", "vtk"}
    assert {"transformers", "fastapi", "uvicorn", "huggingface-hub", "psutil"} <= names
    raw = (REPO / "M3DAssistant" / "Resources" / "Requirements" / "M3DAssistant.txt").read_text()
    assert "\nnumpy" not in raw and "SimpleITK" not in raw.replace("# numpy and SimpleITK", "")

    custom = tmp_path / "requirements.txt"
    custom.write_text("# comment\n-c constraints.txt\nnumpy>=2\nSimpleITK\ntorch>=2.4\nfoo-bar>=1.0  # why\n")
    assert dependencies.read_requirements(custom) == ["foo-bar>=1.0"]


def test_worker_python_is_checked_with_the_one_installer(assistant, tiny_phi3, tmp_path, monkeypatch):
    """The Worker Python setting's Python is checked before the worker starts (never changed); a remote server needs
    nothing here. Slicer's own Python, installing: test_dependencies.py."""
    logic = assistant.M3DAssistantLogic(settings=MemorySettings({"pythonExecutable": sys.executable}))
    p = logic.getParameterNode()
    p.modelChoice, p.modelSource, p.runOn = assistant.MODEL_FOLDER, str(tiny_phi3), assistant.RUN_CPU
    requirements = tmp_path / "M3DAssistant.txt"
    requirements.write_text("pytest>=1\nno-such-worker-package>=1.0\n")
    monkeypatch.setattr(dependencies, "ASSISTANT_REQUIREMENTS", requirements)
    logic.session()
    with pytest.raises(M3DError, match=r"The worker Python .* lacks no-such-worker-package>=1\.0\. .*clear the "
                                       r"Worker Python setting"):
        logic.prepareWorker()
    assert logic.workerProcess().poll().value == "stopped"  # nothing was started
    logic.shutdown()
    p.runOn, p.serverUrl = assistant.RUN_REMOTE, "http://127.0.0.1:9"
    assert isinstance(logic.pythonDependencies(), dependencies.RemoteServerDependencies)


def test_install_plan_lists_everything_once():
    installed = {"torch": "2.3.0", "transformers": "5.30.0", "fastapi": "0.100.0"}

    def version_of(name):
        try:
            return installed[name]
        except KeyError:
            raise importlib.metadata.PackageNotFoundError(name) from None

    plan = dependencies.plan_installation(["transformers>=5.24,<6", "fastapi>=0.110", "uvicorn>=0.30"], version_of)
    assert plan.torch == "torch>=2.4"  # too old
    assert plan.packages == ["fastapi>=0.110", "uvicorn>=0.30"]
    text = plan.describe()
    for item in ("torch>=2.4", "PyTorch extension", "fastapi>=0.110", "uvicorn>=0.30", "numpy and SimpleITK"):
        assert item in text
    installed.update(torch="2.13.0+cpu", fastapi="0.120.0", uvicorn="0.31.0")
    assert not dependencies.plan_installation(["transformers>=5.24,<6", "fastapi>=0.110", "uvicorn>=0.30"],
                                              version_of).needed
    assert dependencies.is_satisfied("pywin32>=300; sys_platform == 'nt-never'", version_of)  # marker: not needed


# ---------------------------------------------------------------------------------------------------------------------
# M3DAssistantLib.model.download_check and .checkpoint_files (local folders)
# ---------------------------------------------------------------------------------------------------------------------


def test_hub_cache_location():
    home = Path("~").expanduser()
    assert download_check.hub_cache_dir(environ={}) == home / ".cache" / "huggingface" / "hub"
    assert download_check.hub_cache_dir(environ={"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert download_check.hub_cache_dir(environ={"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}) == Path("/h/hub")
    assert download_check.hub_cache_dir(environ={"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}) == Path("/c")
    assert download_check.hub_cache_dir("/big disk/hf", environ={"HF_HUB_CACHE": "/c"}) == Path("/big disk/hf/hub")
    assert download_check.worker_environment(None) == {}
    env = download_check.worker_environment("/big disk/hf")
    assert env["HF_HOME"] == str(Path("/big disk/hf")) and env["HF_HUB_CACHE"] == str(Path("/big disk/hf/hub"))


def test_cached_models_are_not_downloaded_and_space_is_checked(tmp_path, tiny_phi3, monkeypatch):
    import shutil

    cache = tmp_path / "hf" / "hub"
    snapshot = cache / "models--GoodBaiBai88--M3D-LaMed-Phi-3-4B" / "snapshots" / "abc123"
    partial = cache / "models--GoodBaiBai88--M3D-LaMed-Llama-2-7B" / "snapshots" / "def456"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # weights not there yet: the download resumes
    shutil.copytree(tiny_phi3, snapshot)
    assert download_check.cached_snapshot("GoodBaiBai88/M3D-LaMed-Phi-3-4B", cache) == snapshot
    assert download_check.cached_snapshot("GoodBaiBai88/M3D-LaMed-Llama-2-7B", cache) is None

    sizes = []
    status = download_check.weights_status("GoodBaiBai88/M3D-LaMed-Phi-3-4B", str(tmp_path / "hf"),
                                           size_of=lambda repo, revision: sizes.append((repo, revision)))
    assert status.local_path == snapshot and not status.needs_download and sizes == []  # no hub query
    # a pinned revision counts only when that commit (or the commit a cached branch/tag points to) is there
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "v1.0").write_text("abc123")
    for pinned in ("abc123", "v1.0"):
        status = download_check.weights_status(f"GoodBaiBai88/M3D-LaMed-Phi-3-4B@{pinned}", str(tmp_path / "hf"),
                                               size_of=lambda repo, revision: sizes.append((repo, revision)))
        assert status.local_path == snapshot and sizes == []
    status = download_check.weights_status("GoodBaiBai88/M3D-LaMed-Phi-3-4B@fff999", str(tmp_path / "hf"),
                                           size_of=lambda repo, revision: sizes.append((repo, revision)))
    assert status.needs_download and sizes == [("GoodBaiBai88/M3D-LaMed-Phi-3-4B", "fff999")]

    free = shutil.disk_usage(tmp_path).free
    status = download_check.weights_status("GoodBaiBai88/M3D-LaMed-Llama-2-7B", str(tmp_path / "hf"),
                                           size_of=lambda repo, revision: 1000)
    assert status.needs_download and status.download_bytes == 1000
    assert "will be downloaded (1000 B)" in status.describe()
    with pytest.raises(download_check.InsufficientDiskSpaceError, match="only .* free") as error:
        download_check.weights_status("GoodBaiBai88/M3D-LaMed-Llama-2-7B", str(tmp_path / "hf"),
                                      size_of=lambda repo, revision: free * 2)
    assert "local checkpoint" in str(error.value)
    unknown = download_check.weights_status("GoodBaiBai88/M3D-LaMed-Llama-2-7B", str(tmp_path / "hf"),
                                            size_of=lambda repo, revision: None)
    assert unknown.download_bytes is None and "unknown size" in unknown.describe()  # offline: no check possible

    assert download_check.free_bytes(tmp_path / "not" / "yet" / "there") == download_check.free_bytes(tmp_path)
    assert download_check.weights_status(str(tiny_phi3)).local_path == tiny_phi3  # a local folder: nothing to download


def test_local_and_fine_tuned_folders(tmp_path, tiny_phi3):
    import shutil

    assert checkpoint_files.local_checkpoint(tiny_phi3) == tiny_phi3
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint_files.local_checkpoint(tmp_path)
    output = tmp_path / "training run"
    (output / "adapter").mkdir(parents=True)
    (output / "adapter" / "train_config.yaml").write_text("base_model: x\n")
    with pytest.raises(M3DError, match="Merge it once") as error:
        checkpoint_files.checkpoint_for_adapter(output)
    assert str(output / "merged") in str(error.value)
    shutil.copytree(tiny_phi3, output / "merged")
    assert checkpoint_files.checkpoint_for_adapter(output) == output / "merged"
    assert checkpoint_files.checkpoint_for_adapter(output / "adapter") == output / "merged"
    assert checkpoint_files.checkpoint_for_adapter(tiny_phi3) == tiny_phi3  # an already merged model
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        checkpoint_files.checkpoint_for_adapter(tmp_path / "empty")


def test_slicer_side_helpers_stay_light():
    """What Slicer's process imports for the panel and the worker: no torch, no transformers, no server stack."""
    paths = [str(REPO / "M3DAssistant")]
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = {paths!r}
        import M3DAssistantLib.worker, M3DAssistantLib.backends, M3DAssistantLib.processes
        import M3DAssistantLib.tasks, M3DAssistantLib.panel, M3DAssistantLib.dependencies
        import M3DAssistantLib.model.download_check, M3DAssistantLib.model.checkpoint_files
        import M3DAssistantLib.session
        heavy = sorted(m for m in ("torch", "transformers", "fastapi", "uvicorn", "huggingface_hub", "safetensors")
                       if m in sys.modules)
        assert not heavy, heavy
        print("light")
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "light" in result.stdout, result.stdout + result.stderr


def test_image_volumes_leave_out_label_maps(assistant):
    """Find similar ranks (and the panel preselects) image volumes only: a label map in the scene is not one."""
    import numpy as np
    import slicer

    first = ct_node()
    slicer.util.addVolumeFromArray(np.zeros((8, 10, 12), np.uint8), name="labels",
                                   nodeClassName="vtkMRMLLabelMapVolumeNode")
    second = ct_node()
    images = assistant.M3DAssistantLogic(settings=MemorySettings()).imageVolumes()
    assert [n.GetID() for n in images][-2:] == [first.GetID(), second.GetID()]
    assert not any(n.IsA("vtkMRMLLabelMapVolumeNode") for n in images)


def test_console_callbacks_are_called_on_the_main_thread(assistant, slicer_harness, caplog):
    """``callback=`` / ``errorCallback=``: the request is polled by a QTimer and the functions run from Qt's event loop
    (Slicer's main thread); without errorCallback the failure is logged."""
    import threading

    class FailingBackend(RecordingBackend):
        def ask(self, question, history=(), sampling=None, on_text=None):
            if question == "fail":
                raise M3DError("the model is unhappy")
            return super().ask(question, history, sampling, on_text)

    logic = assistant.M3DAssistantLogic(backendFactory=FailingBackend, settings=MemorySettings())
    volume = ct_node()
    got, errors, threads = [], [], []
    logic.ask(volume, "Fine?", callback=lambda value: (got.append(value), threads.append(threading.current_thread())))
    logic.ask(volume, "fail", callback=got.append, errorCallback=errors.append)
    request = logic.ask(volume, "fail", callback=got.append)
    slicer_harness.waitFor(lambda: got and errors and not logic._watchers, 10, "the callbacks")
    assert got == ["yes"] and threads == [threading.main_thread()]
    assert [str(e) for e in errors] == ["the model is unhappy"]
    assert request.done() and "M3D ask failed: the model is unhappy" in caplog.text
    with pytest.raises(TypeError, match="takes no options"):
        logic.runTask("findSimilar", ["a"], volume, window="lung")
    logic.cancel()
    logic.clearConversation(volume)
    logic.shutdown()
