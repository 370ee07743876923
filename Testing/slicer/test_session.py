"""AssistantSession on real MRML (slicer-core): a fake backend for exact bookkeeping and geometry (what is sent when,
conversations, no made-up nodes), then the real tiny engine on the real CT for every task end to end."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from forcing import forced_answer

from M3DAssistantLib import AI_LABEL
from M3DAssistantLib.errors import CancelledError, InputError, M3DError
from M3DAssistantLib.geometry import RasRoi
from M3DAssistantLib.prompts import describe_region_prompt
from M3DAssistantLib.results import (
    BoxResult,
    ChoiceResult,
    Provenance,
    RetrievalResult,
    SamplingOptions,
    SegmentationResult,
    TextResult,
)

pytestmark = pytest.mark.slicer
slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from M3DAssistantLib import scene  # noqa: E402
from M3DAssistantLib.session import AssistantSession  # noqa: E402

LIVER = 5


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def provenance(task: str, prompt: str = "") -> Provenance:
    return Provenance(task=task, model="fake", model_revision=None, dtype="float32", device="cpu", prompt=prompt)


class FakeBackend:
    """The engine's task methods, answering from ``self.answers`` (task -> result) and recording every call."""

    def __init__(self):
        self.volumes: list[dict] = []
        self.calls: list[tuple] = []
        self.answers: dict = {}
        self.cancelled = 0

    def set_volume(self, array_kji, ijk_to_ras, *, window=None, roi=None, display_window=None, modality=None):
        self.volumes.append({"array": array_kji, "ijk_to_ras": ijk_to_ras, "window": window, "roi": roi,
                             "display_window": display_window, "modality": modality})

    def set_display(self, display_window=None, modality=None):
        self.calls.append(("set_display", (display_window, modality), {}))

    def _answer(self, task, default, on_text, *args, **kwargs):
        self.calls.append((task, args, kwargs))
        result = self.answers.get(task, default)
        if isinstance(result, BaseException):
            raise result
        if on_text is not None and getattr(result, "text", ""):
            on_text(result.text)
        return result

    def report(self, *, sampling=None, on_text=None):
        return self._answer("report", TextResult("A report.", provenance("report")), on_text, sampling=sampling)

    def ask(self, question, history=(), *, sampling=None, on_text=None):
        answer = TextResult(f"answer {len(self.calls)}", provenance("vqa_open", question))
        return self._answer("ask", answer, on_text, question, history=list(history), sampling=sampling)

    def choose(self, question, choices, *, sampling=None, on_text=None):
        default = ChoiceResult("B. Coronal", list(choices), "B", choices[1], provenance("vqa_closed", question))
        return self._answer("choose", default, on_text, question, list(choices), sampling=sampling)

    def locate(self, expression, *, sampling=None, on_text=None):
        default = BoxResult("Sorry, no.", expression, None, None, provenance("rec", expression), absent=True)
        return self._answer("locate", default, on_text, expression, sampling=sampling)

    def describe_region(self, roi, *, sampling=None, on_text=None):
        return self._answer("describe_region", TextResult("A kidney.", provenance("reg")), on_text, roi,
                            sampling=sampling)

    def segment(self, target, *, sampling=None, on_text=None):
        default = SegmentationResult("No.", target, None, provenance("seg", target), parse_error="no [SEG]")
        return self._answer("segment", default, on_text, target, sampling=sampling)

    def segment_expression(self, expression, *, sampling=None, on_text=None):
        default = SegmentationResult("No.", expression, None, provenance("refseg", expression), absent=True)
        return self._answer("segment_expression", default, on_text, expression, sampling=sampling)

    def retrieve(self, *, texts=None, text=None, volumes=None, labels=None, display_windows=None, modalities=None):
        self.calls.append(("retrieve", (), {"texts": texts, "text": text, "volumes": volumes, "labels": labels,
                                            "display_windows": display_windows, "modalities": modalities}))
        names = labels or texts or []
        return RetrievalResult(text or "volume", [(i, n, 1.0 - i / 10) for i, n in enumerate(names)],
                               provenance("retrieval"))

    def cancel(self):
        self.cancelled += 1


def load_ct(logics, data_dir, name="ct"):
    return logics["volumes"].AddArchetypeVolume(str(data_dir / "example_ct_sm.nii.gz"), name)


def liver_mask(logics, data_dir):
    labels = logics["volumes"].AddArchetypeVolume(str(data_dir / "example_seg.nii.gz"), "labels", 1)
    return (slicer.util.arrayFromVolume(labels) == LIVER).astype(np.uint8)


def rotated_roi_node(scene_, center=(-40.0, 120.0, 130.0), size=(30.0, 40.0, 20.0), angle=25.0):
    node = scene_.AddNewNodeByClass("vtkMRMLMarkupsROINode", "user box")
    t = vtk.vtkTransform()
    t.Translate(*center)
    t.RotateWXYZ(angle, 0.2, 0.3, 1.0)
    node.GetObjectToNodeMatrix().DeepCopy(t.GetMatrix())
    node.SetSize(*size)
    return node


def linear_transform_node(scene_):
    t = vtk.vtkTransform()
    t.Translate(10.0, -20.0, 30.0)
    t.RotateWXYZ(25.0, 1.0, 2.0, 3.0)
    node = scene_.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(t.GetMatrix())
    return node


def count(scene_, class_name):
    return scene_.GetNumberOfNodesByClass(class_name)


@pytest.fixture
def ct(headless_slicer, data_dir):
    return load_ct(headless_slicer[1], data_dir)


@pytest.fixture
def fake():
    return FakeBackend()


# ---------------------------------------------------------------------------------------------------------------------
# fake backend: bookkeeping
# ---------------------------------------------------------------------------------------------------------------------


def test_volume_is_read_and_sent_only_when_it_changed(headless_slicer, data_dir, ct, fake):
    scene_, logics = headless_slicer
    session = AssistantSession(fake, window="abdomen")
    session.report(ct)
    session.ask(ct, "Is there a liver lesion?")
    session.choose(ct, "Which plane?", ["Axial", "Coronal"])
    session.locate(ct, "liver")
    assert session.volume_uploads == 1 and len(fake.volumes) == 1
    sent = fake.volumes[0]
    np.testing.assert_array_equal(sent["array"], slicer.util.arrayFromVolume(ct))
    assert sent["window"] == "abdomen" and sent["roi"] is None

    slicer.util.arrayFromVolume(ct)[3, 4, 5] += 100  # the user edits voxels
    slicer.util.arrayFromVolumeModified(ct)
    session.ask(ct, "And now?")
    assert len(fake.volumes) == 2 and fake.volumes[1]["array"][3, 4, 5] == sent["array"][3, 4, 5] + 100

    session.ask(ct, "Lung window?", window="lung")  # other preprocessing: sent again
    session.ask(ct, "Same again?", window="lung")
    assert [v["window"] for v in fake.volumes] == ["abdomen", "abdomen", "lung"]

    other = load_ct(logics, data_dir, "ct 2")
    session.report(other)
    session.report(ct)  # the backend now holds the other volume
    assert len(fake.volumes) == 5

    ct.SetAndObserveTransformNodeID(linear_transform_node(scene_).GetID())
    session.report(ct)
    assert len(fake.volumes) == 6
    np.testing.assert_allclose(fake.volumes[-1]["ijk_to_ras"], scene.read_volume_node(ct)[1])
    session.invalidate_volume()
    session.report(ct)
    assert len(fake.volumes) == 7


def test_a_failed_request_sends_the_volume_again_a_cancelled_one_does_not(ct, fake):
    session = AssistantSession(fake)
    fake.answers["report"] = CancelledError("cancelled by the user")
    with pytest.raises(CancelledError):
        session.report(ct)
    fake.answers["report"] = M3DError("the worker stopped; it restarts on the next request")
    with pytest.raises(M3DError):
        session.report(ct)
    assert len(fake.volumes) == 1
    del fake.answers["report"]
    session.report(ct)  # a restarted worker has lost the volume: it is sent again
    assert len(fake.volumes) == 2


def test_crop_roi_option_sends_the_roi_in_world_coordinates(headless_slicer, ct, fake):
    scene_, _ = headless_slicer
    crop = rotated_roi_node(scene_)
    session = AssistantSession(fake, roi_node=crop)
    session.report(ct)
    np.testing.assert_allclose(fake.volumes[-1]["roi"].corners(), scene.roi_from_node(crop).corners())
    session.report(ct)
    assert len(fake.volumes) == 1
    crop.SetSize(10.0, 10.0, 10.0)  # the user resizes the crop box: sent again with the new box
    session.report(ct)
    assert len(fake.volumes) == 2
    np.testing.assert_allclose(fake.volumes[-1]["roi"].size, [10.0, 10.0, 10.0])
    session.report(ct, roi_node=None)  # per-call override: whole volume
    assert fake.volumes[-1]["roi"] is None


def test_conversation_is_kept_per_volume(headless_slicer, data_dir, ct, fake):
    _, logics = headless_slicer
    other = load_ct(logics, data_dir, "other")
    session = AssistantSession(fake)
    first, _ = session.ask(ct, "q1")
    second, _ = session.ask(ct, "q2")
    session.ask(other, "about the other one")
    third, _ = session.ask(ct, "q3")
    histories = [(c[1][0], c[2]["history"]) for c in fake.calls if c[0] == "ask"]
    assert histories == [("q1", []), ("q2", [("q1", first)]), ("about the other one", []),
                         ("q3", [("q1", first), ("q2", second)])]
    assert session.history(ct) == [("q1", first), ("q2", second), ("q3", third)]
    session.ask(ct, "one-off", history=[])  # explicit history: used as given, not recorded
    assert fake.calls[-1][2]["history"] == [] and len(session.history(ct)) == 3
    slicer.util.arrayFromVolume(ct)[0, 0, 0] += 1  # another image: the conversation starts over
    slicer.util.arrayFromVolumeModified(ct)
    session.ask(ct, "fresh")
    assert fake.calls[-1][2]["history"] == [] and [q for q, _ in session.history(ct)] == ["fresh"]
    session.clear_history(other)
    assert session.history(other) == [] and len(session.history(ct)) == 1


def test_results_without_box_or_mask_create_no_node(headless_slicer, ct, fake):
    scene_, _ = headless_slicer
    session = AssistantSession(fake)
    before = {c: count(scene_, c) for c in ("vtkMRMLMarkupsROINode", "vtkMRMLSegmentationNode", "vtkMRMLTextNode")}
    roi_node, box = session.locate(ct, "pancreas")
    assert roi_node is None and box.absent
    assert session.segment(ct, "liver")[:2] == (None, None)
    existing = scene_.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    before["vtkMRMLSegmentationNode"] += 1
    node, segment_id, result = session.segment_expression(ct, "the lesion", segmentation_node=existing)
    assert (node, segment_id) == (None, None) and result.absent
    assert existing.GetSegmentation().GetNumberOfSegments() == 0
    fake.answers["segment"] = SegmentationResult("It is [SEG].", "liver", np.zeros((30, 101, 122), np.uint8),
                                                 provenance("seg"))
    assert session.segment(ct, "liver")[:2] == (None, None)  # [SEG] but an empty mask: still nothing
    fake.answers["report"] = TextResult("  ", provenance("report"))
    assert session.report(ct)[0] is None
    assert {c: count(scene_, c) for c in before} == before


def test_box_and_mask_results_become_nodes_with_exact_geometry(headless_slicer, data_dir, ct, fake):
    scene_, logics = headless_slicer
    liver = liver_mask(logics, data_dir)
    roi = RasRoi(center=[-40.0, 120.0, 130.0], size=[30.0, 45.0, 24.0])
    fake.answers["locate"] = BoxResult("<bx_start>[...]<bx_end>", "liver", (0.1,) * 6, roi, provenance("rec"))
    fake.answers["segment"] = SegmentationResult("It is [SEG].", "liver", liver, provenance("seg", "seg liver"))
    session = AssistantSession(fake)

    roi_node, _ = session.locate(ct, "liver")
    center, size = np.zeros(3), np.zeros(3)
    roi_node.GetCenterWorld(center)
    roi_node.GetSizeWorld(size)
    np.testing.assert_allclose(center, roi.center)
    np.testing.assert_allclose(size, roi.size)
    assert roi_node.GetName() == "liver" and roi_node.GetAttribute("M3D.label") == AI_LABEL

    user = scene_.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    user.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    user_voxels = np.zeros_like(liver)
    user_voxels[2:8, 10:20, 10:20] = 1
    user_id = user.GetSegmentation().AddEmptySegment("liver", "liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(user_voxels, user, user_id, ct)

    node, segment_id, _ = session.segment(ct, "liver", segmentation_node=user)
    assert node is user and node.GetSegmentation().GetSegment(segment_id).GetName() == "liver (2)"
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(user, segment_id, ct), liver)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(user, user_id, ct), user_voxels)
    new_node, new_id, _ = session.segment(ct, "liver")  # no node given: a new one
    assert new_node is not user and new_node.GetSegmentation().GetSegment(new_id).GetName() == "liver"
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(new_node, new_id, ct), liver)


def test_report_choose_describe_and_streaming(headless_slicer, ct, fake):
    scene_, _ = headless_slicer
    chunks = []
    session = AssistantSession(fake, on_text=chunks.append, sampling=SamplingOptions(max_new_tokens=5))
    text_node, _ = session.report(ct)
    assert text_node.IsA("vtkMRMLTextNode") and text_node.GetName() == "ct M3D report"
    assert AI_LABEL in text_node.GetText() and "A report." in text_node.GetText()
    assert session.report(ct)[0].GetName() == "ct M3D report (2)"
    assert fake.calls[0][2]["sampling"].max_new_tokens == 5 and chunks == ["A report.", "A report."]

    answer, choice = session.choose(ct, "Which plane?", ["Axial", "Coronal", "Sagittal"], on_text=None)
    assert answer == "Coronal" and choice.letter == "B" and len(chunks) == 2
    fake.answers["choose"] = ChoiceResult("I cannot tell", ["Axial", "Coronal"], None, None,
                                          provenance("vqa_closed"), parse_error="no letter")
    assert session.choose(ct, "Which plane?", ["Axial", "Coronal"])[0] == "I cannot tell"

    user_roi = rotated_roi_node(scene_)
    text, _ = session.describe_region(ct, user_roi)
    assert text == "A kidney."
    sent_roi = fake.calls[-1][1][0]
    assert isinstance(sent_roi, RasRoi)
    np.testing.assert_allclose(sent_roi.corners(), scene.roi_from_node(user_roi).corners())
    assert not np.allclose(sent_roi.axes, np.eye(3))  # the rotation is kept

    session.cancel()
    assert fake.cancelled == 1


def test_non_blocking_requests_write_nodes_only_when_collected(headless_slicer, ct, fake):
    scene_, _ = headless_slicer
    gate = threading.Event()
    threads = []
    roi = RasRoi(center=[-40.0, 120.0, 130.0], size=[30.0, 45.0, 24.0])
    box = BoxResult("<bx_start>[...]<bx_end>", "liver", (0.1,) * 6, roi, provenance("rec"))
    original = fake.locate

    def slow_locate(expression, **kwargs):
        threads.append(threading.current_thread())
        assert gate.wait(10)
        return box

    fake.locate = slow_locate
    session = AssistantSession(fake, on_text=None)
    pending = session.locate(ct, "liver", wait=False)
    assert not pending.done() and count(scene_, "vtkMRMLMarkupsROINode") == 0
    with pytest.raises(M3DError, match="still running"):
        session.report(ct)
    gate.set()
    assert pending.wait(10) and pending.done()
    assert threads[0] is not threading.current_thread()
    assert count(scene_, "vtkMRMLMarkupsROINode") == 0  # MRML is written by result(), on this thread
    roi_node, result = pending.result()
    assert result is box and roi_node.GetName() == "liver" and count(scene_, "vtkMRMLMarkupsROINode") == 1
    assert pending.result()[0] is roi_node  # collected once
    fake.locate = original

    fake.answers["report"] = CancelledError("cancelled by the user")
    pending = session.report(ct, wait=False)
    pending.cancel()
    pending.wait(10)
    with pytest.raises(CancelledError):
        pending.result()
    assert fake.cancelled == 1 and count(scene_, "vtkMRMLTextNode") == 0
    del fake.answers["report"]
    text_node, _ = session.report(ct)  # the session is free again
    assert text_node is not None and session.volume_uploads == 1


def test_find_similar_in_both_directions(headless_slicer, data_dir, ct, fake):
    _, logics = headless_slicer
    other = load_ct(logics, data_dir, "other ct")
    session = AssistantSession(fake)
    ranking = session.find_similar([ct, other], "liver cyst")
    call = fake.calls[-1][2]
    assert call["text"] == "liver cyst" and call["labels"] == ["ct", "other ct"] and len(call["volumes"]) == 2
    np.testing.assert_array_equal(call["volumes"][1][0], slicer.util.arrayFromVolume(other))
    assert [label for _, label, _ in ranking.ranking] == ["ct", "other ct"]
    assert not fake.volumes  # ranking volumes does not change the current volume

    session.find_similar(["a liver cyst", "a normal chest"], ct)
    assert fake.calls[-1][2]["texts"] == ["a liver cyst", "a normal chest"] and len(fake.volumes) == 1
    for candidates, query in (([], "x"), (["a", "b"], "text"), ([ct], ct)):
        with pytest.raises(InputError):
            session.find_similar(candidates, query)


def test_bad_volumes_are_refused_before_the_backend_is_called(headless_slicer, data_dir, fake):
    _, logics = headless_slicer
    labels = logics["volumes"].AddArchetypeVolume(str(data_dir / "example_seg.nii.gz"), "labels", 1)
    session = AssistantSession(fake)
    with pytest.raises(InputError, match="label map"):
        session.report(labels)
    assert not fake.calls and not fake.volumes


# ---------------------------------------------------------------------------------------------------------------------
# the real engine (tiny random checkpoint) on the real CT
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_phi3_model, tiny_clip):
    from M3DAssistantLib.engine import InferenceEngine

    return InferenceEngine(tiny_phi3_model, clip_model=tiny_clip)


SHORT = SamplingOptions(max_new_tokens=6)


def test_every_task_on_the_real_ct_makes_the_right_nodes(headless_slicer, ct, engine):
    scene_, _ = headless_slicer
    session = AssistantSession(engine, window="abdomen", sampling=SHORT)

    text_node, report = session.report(ct)
    assert report.text.strip() and report.provenance.task == "report" and report.provenance.label == AI_LABEL
    assert text_node.IsA("vtkMRMLTextNode") and text_node.GetName() == "ct M3D report"
    assert AI_LABEL in text_node.GetText() and report.text.strip() in text_node.GetText()
    assert text_node.GetAttribute("M3D.prompt") == report.provenance.prompt

    answer, result = session.ask(ct, "Is the liver enlarged?")
    assert isinstance(answer, str) and answer == result.text
    assert session.history(ct) == [("Is the liver enlarged?", answer)]
    session.ask(ct, "And the spleen?")
    assert len(session.history(ct)) == 2

    with forced_answer(engine, " C. Sagittal"):
        choice, result = session.choose(ct, "Which plane is this?", ["Axial", "Coronal", "Sagittal", "Oblique"])
    assert choice == "Sagittal" and result.letter == "C"

    # a box on the training grid (d in k/32, h and w in k/256), as the model gives them
    with forced_answer(engine, " Coordinates are <bx_start>[0.125, 0.203, 0.297, 0.5, 0.594, 0.703]<bx_end>."):
        roi_node, box = session.locate(ct, "liver", sampling=SamplingOptions(max_new_tokens=60))
    assert box.box == (0.125, 0.203, 0.297, 0.5, 0.594, 0.703)
    assert roi_node.IsA("vtkMRMLMarkupsROINode") and roi_node.GetName() == "liver"
    np.testing.assert_allclose(scene.roi_from_node(roi_node).corners(), box.roi.corners(), atol=1e-6)
    assert roi_node.GetAttribute("M3D.task") == "rec" and roi_node.GetAttribute("M3D.convention") == "m3d-seg-v1@v1"

    description, result = session.describe_region(ct, roi_node)  # the box just found, as a user ROI
    assert isinstance(description, str) and result.provenance.task == "reg"
    assert result.provenance.prompt == describe_region_prompt(box.box)  # ROI node -> the same box again

    with forced_answer(engine, " It is [SEG]."):
        seg_node, segment_id, seg = session.segment(ct, "liver")
    assert seg.mask is not None and seg.mask.shape == (30, 101, 122)
    assert seg.voxel_count > 0  # the tiny checkpoint's random SegVol (fixed seed) gives a non-empty mask
    assert seg_node.IsA("vtkMRMLSegmentationNode")
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "liver"
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, segment_id, ct), seg.mask)
    value = vtk.reference("")
    assert segment.GetTag("M3D.label", value) and value.get() == AI_LABEL

    before = count(scene_, "vtkMRMLSegmentationNode")
    node, segment_id, unforced = session.segment_expression(ct, "the large organ in the right upper abdomen")
    assert unforced.mask is None and (node, segment_id) == (None, None)  # random answer: no [SEG], no node
    assert count(scene_, "vtkMRMLSegmentationNode") == before

    ranking = session.find_similar(["a liver cyst", "a normal chest", "a fractured femur"], ct)
    assert sorted(i for i, _, _ in ranking.ranking) == [0, 1, 2]

    assert session.volume_uploads == 1  # one upload for all of it


def test_real_engine_streams_and_ranks_volume_nodes(ct, engine):
    chunks = []
    session = AssistantSession(engine, sampling=SamplingOptions(max_new_tokens=8))
    _, result = session.ask(ct, "What organ is this?", on_text=chunks.append)
    assert "".join(chunks) == result.text
    background = []
    pending = session.ask(ct, "And this?", on_text=background.append, wait=False)  # as the GUI runs it
    assert pending.wait(60)
    answer, result = pending.result()
    assert "".join(background) == answer == result.text and [q for q, _ in session.history(ct)] == [
        "What organ is this?", "And this?"]
    flipped = slicer.util.addVolumeFromArray(slicer.util.arrayFromVolume(ct)[::-1].copy(),
                                             ijkToRAS=scene.read_volume_node(ct)[1], name="flipped")
    ranking = session.find_similar([ct, flipped], "liver")
    assert sorted(label for _, label, _ in ranking.ranking) == ["ct", "flipped"]


def test_real_engine_on_a_transformed_volume_gives_world_boxes(headless_slicer, ct, engine):
    """A volume under a rotation + translation and the same voxels with that geometry baked in give the same ROI."""
    scene_, _ = headless_slicer
    ct.SetAndObserveTransformNodeID(linear_transform_node(scene_).GetID())
    array, world = scene.read_volume_node(ct)
    hardened = slicer.util.addVolumeFromArray(array, ijkToRAS=world, name="hardened")
    session = AssistantSession(engine, window="abdomen")
    answer = " Coordinates are <bx_start>[0.2, 0.2, 0.2, 0.6, 0.7, 0.8]<bx_end>."
    rois = []
    for volume in (ct, hardened):
        with forced_answer(engine, answer):
            roi_node, _ = session.locate(volume, "liver", sampling=SamplingOptions(max_new_tokens=40))
        rois.append(scene.roi_from_node(roi_node))
    np.testing.assert_allclose(rois[0].center, rois[1].center, atol=1e-6)
    np.testing.assert_allclose(rois[0].corners(), rois[1].corners(), atol=1e-6)
    # and the box really is in the transformed volume's world space: its centre maps inside the voxel grid
    ijk = np.linalg.solve(world, np.append(rois[0].center, 1.0))[:3]
    assert np.all(ijk > -0.5) and np.all(ijk < np.array(array.shape[::-1]) - 0.5)
