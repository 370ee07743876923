"""The display window and the modality travel with the volume through every layer (issue #11): a volume node's
window/level and DICOM Modality -> session -> backend -> client -> wire -> ``m3d serve`` -> engine, and back as the
result's provenance (the engine's own record of the window it used). A new window/level between two questions changes
the next report's window without sending the voxels again. ``m3d batch`` reads each volume's DICOM window.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from serving import start_server_process, stop_server_process

from M3DAssistantLib.preprocessing import DisplayWindow
from M3DAssistantLib.results import SamplingOptions

SHORT = SamplingOptions(max_new_tokens=3)


def intensity(result) -> dict:
    """The window a result was made with, as the engine recorded it in the provenance."""
    return json.loads(result.provenance.intensity)


# ---------------------------------------------------------------------------------------------------------- engine
def test_a_new_display_window_keeps_the_volume_and_its_mask_views(tiny_phi3_model, ct):
    """The display window is how the volume is shown, not what it is: setting it again (set_volume or set_display)
    keeps the volume's cached views; only the display-window tasks get a new view."""
    from M3DAssistantLib.engine import InferenceEngine

    engine = InferenceEngine(tiny_phi3_model)
    soft = DisplayWindow(40, 400, "Slicer")
    first = engine.set_volume(*ct, display_window=soft, modality="CT")
    engine.segment("liver", sampling=SHORT)
    report = engine.report(sampling=SHORT)
    assert intensity(report)["name"] == "display (Slicer)" and intensity(report)["center"] == 40.0
    encoded = dict(engine.counters)
    assert encoded["vision_tower"] == 2 and encoded["seg_encoder"] == 1

    lung = DisplayWindow(-600, 1500, "Slicer")
    again = engine.set_volume(*ct, display_window=lung, modality="CT")  # the user changed the window/level
    assert again is first and again.display_window == lung
    report = engine.report(sampling=SHORT)
    assert (intensity(report)["center"], intensity(report)["width"]) == (-600.0, 1500.0)
    engine.segment("liver", sampling=SHORT)
    assert engine.counters["vision_tower"] == 3 and engine.counters["seg_encoder"] == 1  # the mask view was kept

    engine.set_display(soft, "CT")  # back to the first window: its view is still cached
    assert intensity(engine.report(sampling=SHORT))["center"] == 40.0
    assert engine.counters["vision_tower"] == 3
    engine.set_display(None, None)  # no display window, modality unknown: CT by its values, the abdomen preset
    assert intensity(engine.report(sampling=SHORT))["name"] == "abdomen"


# ---------------------------------------------------------------------------------------------- session, in process
@pytest.fixture
def ct_node(headless_slicer, ct_path):
    """The real CT as a volume node with a window/level set by hand (what a reader does)."""
    _scene, logics = headless_slicer
    node = logics["volumes"].AddArchetypeVolume(str(ct_path), "CT")
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(400.0, 40.0)
    return node


class Spy:
    """Records what reaches the engine's boundary (set_volume / set_display), then calls the engine."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def set_volume(self, array, ijk_to_ras, **options):
        self.calls.append(("set_volume", options.get("display_window"), options.get("modality")))
        return self.engine.set_volume(array, ijk_to_ras, **options)

    def set_display(self, display_window=None, modality=None):
        self.calls.append(("set_display", display_window, modality))
        return self.engine.set_display(display_window, modality)


def test_the_nodes_window_level_reaches_the_engine_and_a_change_is_not_a_new_upload(tiny_phi3_model, ct_node):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.session import AssistantSession

    spy = Spy(InferenceEngine(tiny_phi3_model))
    session = AssistantSession(spy, sampling=SHORT)
    _, first = session.report(ct_node)
    assert spy.calls == [("set_volume", DisplayWindow(40.0, 400.0, "Slicer"), None)]
    assert intensity(first)["name"] == "display (Slicer)" and intensity(first)["width"] == 400.0

    ct_node.GetDisplayNode().SetWindowLevel(1500.0, -600.0)  # the reader switches to a lung window
    _, second = session.report(ct_node)
    assert spy.calls[-1] == ("set_display", DisplayWindow(-600.0, 1500.0, "Slicer"), None)
    assert (intensity(second)["center"], intensity(second)["width"]) == (-600.0, 1500.0)
    _, box = session.locate(ct_node, "liver")  # masks and boxes keep M3D-Seg's percentiles
    assert intensity(box)["scheme"] == "percentile"
    assert (session.volume_uploads, session.display_updates) == (1, 1)  # the voxels were read and sent once
    session.report(ct_node)
    assert (session.volume_uploads, session.display_updates) == (1, 1)  # nothing changed: nothing sent

    session.report(ct_node, window="bone")  # a chosen window overrides every default: a new volume option
    assert intensity(session.report(ct_node, window="bone")[1])["name"] == "bone"


def test_volume_display_reads_the_dicom_modality(headless_slicer):
    """The modality of a volume loaded from DICOM: the series' subject hierarchy attribute (saved with the scene)."""
    import slicer

    from M3DAssistantLib.scene import volume_display

    node = slicer.util.addVolumeFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    assert volume_display(node)[1] is None  # not from DICOM
    constant = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16))
    assert volume_display(constant) == (None, None)  # Slicer's automatic window of a constant volume is empty
    hierarchy = node.GetScene().GetSubjectHierarchyNode()
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    hierarchy.SetItemAttribute(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(),
                               "mr ")
    window, modality = volume_display(node)
    assert modality == "MR" and window.source == "Slicer" and window.width > 0


# ------------------------------------------------------------------------------------ through a real m3d serve
@pytest.fixture(scope="module")
def served(tiny_phi3):
    proc, ready, _lines, stderr_path = start_server_process(
        ["--model", str(tiny_phi3), "--device", "cpu", "--dtype", "float32", "--port", "0"])
    yield ready
    assert stop_server_process(proc) in (0, -signal.SIGTERM)
    assert "Traceback" not in open(stderr_path).read(), open(stderr_path).read()[-3000:]


class CountingClient:
    """The real client, counting uploads of voxels."""

    def __new__(cls, url, token):
        from M3DAssistantLib.serving.client import M3DClient

        client = M3DClient(url, token, timeout=120)
        client.uploads = 0
        upload = client.upload_volume

        def counted(*args, **kwargs):
            client.uploads += 1
            return upload(*args, **kwargs)

        client.upload_volume = counted
        return client


def test_window_level_and_modality_reach_the_engine_of_a_real_server(served, ct_node):
    """Slicer node -> session -> ClientBackend -> M3DClient -> HTTP -> m3d serve (a subprocess) -> engine: the
    result's provenance says the engine used the node's window/level; after a new window/level the next report uses
    it and no voxel is uploaded again."""
    import slicer

    from M3DAssistantLib.backends import ClientBackend
    from M3DAssistantLib.session import AssistantSession

    client = CountingClient(served["url"], served["token"])
    session = AssistantSession(ClientBackend(client), sampling=SHORT)
    _, first = session.report(ct_node)
    assert intensity(first)["name"] == "display (Slicer)"
    assert (intensity(first)["center"], intensity(first)["width"]) == (40.0, 400.0)
    ct_node.GetDisplayNode().SetWindowLevel(1500.0, -600.0)
    answer, second = session.ask(ct_node, "Is the lung clear?")
    assert (intensity(second)["center"], intensity(second)["width"]) == (-600.0, 1500.0)
    assert client.uploads == 1 and (session.volume_uploads, session.display_updates) == (1, 1)
    assert client.info()["features"] == ["display-window", "selfcheck"]

    # The modality travels too: a volume whose values are not CT-like and whose window misses them entirely is
    # shown in the abdomen preset only because its DICOM Modality says CT.
    values = np.linspace(0, 2000, 8 * 10 * 12).reshape(8, 10, 12).astype(np.int16)
    node = slicer.util.addVolumeFromArray(values, ijkToRAS=np.diag([1.0, 1.0, 2.0, 1.0]), name="ct2")
    node.GetDisplayNode().SetAutoWindowLevel(False)
    node.GetDisplayNode().SetWindowLevel(10.0, 5000.0)  # [4995, 5005]: outside the values, skipped
    assert intensity(session.report(node)[1])["name"] == "percentile"  # not CT by its values
    hierarchy = node.GetScene().GetSubjectHierarchyNode()
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    hierarchy.SetItemAttribute(item, "DICOM.Modality", "CT")
    assert intensity(session.report(node)[1])["name"] == "abdomen"
    assert client.uploads == 2 and session.display_updates == 2


def test_a_server_without_the_display_window_says_so_and_a_chosen_window_still_works(served, ct):
    """A server older than the display window (no feature in /v1/info): the client refuses to send it with a message
    naming both versions and the way out; with a chosen window nothing of the kind is sent and the task runs."""
    from M3DAssistantLib.serving.client import M3DClient, ProtocolMismatchError

    client = M3DClient(served["url"], served["token"], timeout=120)
    client.set_volume(*ct, display_window=(40, 400), modality="CT")
    client._info["features"] = []  # what an older server answers
    with pytest.raises(ProtocolMismatchError, match=r"does not take the volume's display window.*m3d-slicer .*"
                                                    r"Update m3d-slicer where the server runs.*choose an intensity"):
        client.report(sampling=SHORT)
    client.set_volume(*ct, window="abdomen", display_window=(40, 400), modality="CT")
    assert intensity(client.report(sampling=SHORT))["name"] == "abdomen"
    with pytest.raises(ProtocolMismatchError, match="installation check"):
        client.selfcheck()


def test_the_wire_checks_display_windows_and_modalities(served, ct):
    from M3DAssistantLib.errors import InputError
    from M3DAssistantLib.serving.client import M3DClient
    from M3DAssistantLib.serving.protocol import display_window_json, modality_json

    assert display_window_json(DisplayWindow(40, 400, "DICOM")) == {"center": 40.0, "width": 400.0,
                                                                   "source": "DICOM"}
    assert display_window_json((40, 400)) == {"center": 40.0, "width": 400.0, "source": "display"}
    assert modality_json(" ct ") == "CT" and modality_json("") is None
    for bad in ((40, 0), (40,), "abdomen"):
        with pytest.raises(InputError, match="display window|display_window"):
            display_window_json(bad)
    with pytest.raises(InputError, match="DICOM Modality"):
        modality_json("CT; DROP")
    client = M3DClient(served["url"], served["token"], timeout=120)
    volume = client.set_volume(*ct)
    import http.client

    def post(body):
        conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
        conn.request("POST", f"/v1/volumes/{volume.volume_id}/report", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {served['token']}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    # what a client older than the display window sends: still answered, each task's default from the values
    status, answer = post({"window": None, "roi": None, "slice_range": None, "sampling": {"max_new_tokens": 2}})
    assert status == 200 and json.loads(answer["provenance"]["intensity"])["name"] == "abdomen"
    status, answer = post({"display_window": {"center": 40, "width": -5}, "sampling": {"max_new_tokens": 2}})
    assert status == 400 and "width" in answer["detail"]
    status, answer = post({"modality": "C/T", "sampling": {"max_new_tokens": 2}})
    assert status == 400 and "modality" in answer["detail"]
    status, answer = post({"display_window": {"center": -600, "width": 1500, "source": "DICOM"}, "modality": "CT",
                           "sampling": {"max_new_tokens": 2}})
    assert status == 200 and json.loads(answer["provenance"]["intensity"])["name"] == "display (DICOM)"


# ------------------------------------------------------------------------------------------------------ m3d batch
def test_batch_reads_each_volumes_dicom_window(tiny_phi3_model, data_dir, tmp_path):
    """The DICOM series gets its WindowCenter/Width (40/300) for the report; the NIfTI file, which has none, the
    abdomen preset (a CT by its values)."""
    from M3DAssistantLib.batch import BatchTask, find_volumes, run_cohort
    from M3DAssistantLib.engine import InferenceEngine

    folder = tmp_path / "cohort"
    folder.mkdir()
    (folder / "dicom_ct").symlink_to(data_dir / "example_ct_dicom", target_is_directory=True)
    (folder / "nifti_ct.nii.gz").symlink_to(data_dir / "example_ct_sm.nii.gz")
    summary = run_cohort(InferenceEngine(tiny_phi3_model), find_volumes(folder), [BatchTask.parse("report")],
                         tmp_path / "out", sampling=SamplingOptions(max_new_tokens=2), log=lambda message: None)
    status = summary.status
    assert status == {"dicom_ct": "done", "nifti_ct.nii.gz": "done"}  # folders named after the volumes' entries
    used = {}
    for name in status:
        results = json.loads((tmp_path / "out" / name / "results.json").read_text())["results"]
        used[name] = json.loads(results["report"]["provenance"]["intensity"])
    assert (used["dicom_ct"]["name"], used["dicom_ct"]["center"], used["dicom_ct"]["width"]) == \
        ("display (DICOM)", 40.0, 300.0)
    assert used["nifti_ct.nii.gz"]["name"] == "abdomen"
