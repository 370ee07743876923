"""What confidence, evidence, refinement, measurements and the REC box become in Slicer: nodes on real MRML
(slicer-core) through the session, the Logic's console options, and the panel's Qt-free helpers."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from forcing import forced_answer

from M3DAssistantLib import panel
from M3DAssistantLib.errors import InputError
from M3DAssistantLib.geometry import RasRoi
from M3DAssistantLib.results import (
    AnalysisOptions,
    BoxResult,
    ChoiceResult,
    Confidence,
    MaskConfidence,
    Provenance,
    SamplingOptions,
    SegmentationResult,
    TextResult,
    TokenProbability,
)
from M3DAssistantLib.settings import MemorySettings

pytestmark = pytest.mark.slicer
slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from test_assistant_module import assistant  # noqa: E402, F401  (the module file on real MRML, a fixture)

from M3DAssistantLib import scene  # noqa: E402
from M3DAssistantLib.session import AssistantSession, mask_attributes  # noqa: E402

EVERYTHING = AnalysisOptions(evidence=True, evidence_steps=1, refine=True, locate=True)


def prov(task):
    return Provenance(task=task, model="fake", model_revision=None, dtype="float32", device="cpu", prompt="")


def world_bounds(roi_node):
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    return np.array(bounds)


@pytest.fixture
def ct_node(headless_slicer, data_dir):
    return headless_slicer[1]["volumes"].AddArchetypeVolume(str(data_dir / "example_ct_sm.nii.gz"), "ct")


def test_a_segmentation_with_everything_becomes_nodes(headless_slicer, ct_node, engine):
    """The real engine, forced to answer [SEG]: a segment tagged with its measurements and confidence, the evidence
    map as a new volume on the CT's own grid (same geometry, same transform) shown as a heat overlay, and the mask's
    box as an ROI covering exactly the mask's voxels; the task's return value keeps its shape."""
    scene_, _ = headless_slicer
    transform = scene_.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 12.0)
    transform.SetMatrixTransformToParent(matrix)
    ct_node.SetAndObserveTransformNodeID(transform.GetID())
    session = AssistantSession(engine, sampling=SamplingOptions(max_new_tokens=8))
    volumes_before = scene_.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with forced_answer(engine, " It is [SEG]."):
        segmentation, segment_id, result = session.segment(ct_node, "liver", analysis=EVERYTHING, mask_roi=True)
    assert result.refinement is not None and result.measurements is not None and result.evidence is not None
    tags = {}
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    for key in ("M3D.volume_ml", "M3D.max_diameter_mm", "M3D.mean", "M3D.mean_probability", "M3D.refined"):
        value = vtk.reference("")
        assert segment.GetTag(key, value), key
        tags[key] = str(value)
    assert float(tags["M3D.volume_ml"]) == pytest.approx(result.measurements.volume_ml, abs=1e-3)
    assert tags["M3D.mean"].endswith("HU") and tags["M3D.refined"] == "zoom-in"

    nodes = session.extra_nodes
    assert set(nodes) == {"evidence", "mask_box"}  # the forced answer has no box for "locate"
    evidence = nodes["evidence"]
    assert scene_.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before + 1
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(evidence), result.evidence.on_volume())
    evidence_ijk, ct_ijk = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    evidence.GetIJKToRASMatrix(evidence_ijk)
    ct_node.GetIJKToRASMatrix(ct_ijk)
    assert slicer.util.arrayFromVTKMatrix(evidence_ijk).tolist() == slicer.util.arrayFromVTKMatrix(ct_ijk).tolist()
    assert evidence.GetTransformNodeID() == transform.GetID()
    display = evidence.GetDisplayNode()
    assert display.GetColorNodeID() == scene.EVIDENCE_COLOR_NODE and display.GetApplyThreshold()
    assert (display.GetWindow(), display.GetLevel()) == (1.0, 0.5)
    assert evidence.GetAttribute("M3D.label") and "K " in evidence.GetAttribute("M3D.evidence_ranges")
    assert evidence.GetNodeReferenceID(scene.SOURCE_VOLUME_REFERENCE_ROLE) == ct_node.GetID()

    box = nodes["mask_box"]
    world = np.array(result.roi.corners())
    lo, hi = world.min(axis=0), world.max(axis=0)
    np.testing.assert_allclose(world_bounds(box)[0::2], lo, atol=1e-4)  # result ROIs are in world RAS already
    np.testing.assert_allclose(world_bounds(box)[1::2], hi, atol=1e-4)
    assert box.GetAttribute("M3D.task") == "seg"


class AnalysisBackend:
    """The engine's methods for the scene tests: records ``analysis`` and answers with canned analysed results."""

    def __init__(self, config=None):
        self.calls, self.on_progress = [], None

    def set_volume(self, array, ijk_to_ras, window=None, roi=None, display_window=None, modality=None):
        self.shape = array.shape

    def set_display(self, display_window=None, modality=None):
        pass

    def report(self, sampling=None, on_text=None, analysis=None):
        self.calls.append(("report", analysis))
        return TextResult("Liver normal.", prov("report"))

    def ask(self, question, history=(), sampling=None, on_text=None, analysis=None):
        self.calls.append(("ask", analysis))
        tokens = [TokenProbability(1, " Liver", 0.9), TokenProbability(2, " cyst", 0.1)]
        return TextResult(" Liver cyst", prov("vqa_open"), confidence=Confidence(tokens, -1.2))

    def segment(self, target, sampling=None, on_text=None, analysis=None):
        self.calls.append(("segment", analysis))
        mask = np.zeros(self.shape, np.uint8)
        mask[2:4, 3:6, 3:6] = 1
        located = BoxResult("box", target, (0.1,) * 3 + (0.5,) * 3, RasRoi((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)),
                            prov("rec"))
        return SegmentationResult("It is [SEG].", target, mask, prov("seg"), located=located, located_iou=0.4,
                                  roi=RasRoi((0.0, 0.0, 0.0), (3.0, 3.0, 4.0)))

    def cancel(self):
        pass

    def close(self):
        pass


def test_the_models_own_box_next_to_a_mask_becomes_an_roi(headless_slicer, ct_node):
    session = AssistantSession(AnalysisBackend())
    _, _, result = session.segment(ct_node, "liver", analysis=AnalysisOptions(locate=True))
    located = session.extra_nodes["located_box"]
    assert located.GetName() == "liver (located)" and "mask_box" not in session.extra_nodes  # not asked for
    assert list(located.GetSize()) == [4.0, 5.0, 6.0]
    assert session.backend.calls[-1] == ("segment", AnalysisOptions(locate=True))
    session.report(ct_node)
    assert session.backend.calls[-1] == ("report", None) and session.extra_nodes == {}  # plain: no keyword
    with pytest.raises(InputError, match="does not take the option"):
        session.report(ct_node, analysis=AnalysisOptions(refine=True))


def test_an_evidence_map_from_another_grid_is_refused(headless_slicer, ct_node, engine):
    """case: an evidence map added to a volume of another grid (or a result without one) -> InputError naming the
    shapes; no node is created"""
    engine.set_volume(np.zeros((8, 9, 10), np.int16) + np.arange(10, dtype=np.int16), np.eye(4))
    result = engine.ask("Why?", sampling=SamplingOptions(max_new_tokens=2),
                        analysis=AnalysisOptions(evidence=True, evidence_steps=1))
    with pytest.raises(InputError, match="computed on"):
        scene.add_evidence_volume(result, ct_node)
    with pytest.raises(InputError, match="no evidence map"):
        scene.add_evidence_volume(TextResult("x", prov("x")), ct_node)


# ------------------------------------------------------------------------------------------------- the Logic
def small_volume():
    array = np.arange(8 * 10 * 12, dtype=np.int16).reshape(8, 10, 12)
    return slicer.util.addVolumeFromArray(array, ijkToRAS=np.diag([1.0, 1.0, 2.0, 1.0]), name="ct")


def test_the_logic_takes_the_registry_options_and_the_panels(assistant):  # noqa: F811
    """Console keywords (camelCase of the registry's options) and the panel's check boxes reach the backend as
    AnalysisOptions, each task only the options it takes; lastNodes lists what the analysis made."""
    logic = assistant.M3DAssistantLogic(backendFactory=AnalysisBackend, settings=MemorySettings())
    volume = small_volume()
    assert logic.segment(volume, "liver", refine=True, evidenceSteps=3, maskRoi=True)[0] is not None
    assert logic._backend.calls[-1] == ("segment", AnalysisOptions(refine=True, evidence_steps=3))
    assert set(logic.lastNodes) == {"mask_box", "located_box"}
    parameters = logic.getParameterNode()
    parameters.refine, parameters.evidenceSteps, parameters.confidence = True, 5, False
    assert logic.ask(volume, "What?") == " Liver cyst"  # the panel's refine does not apply to a question
    assert logic._backend.calls[-1] == ("ask", AnalysisOptions(confidence=False, evidence_steps=5))
    assert logic.lastNodes == {}
    with pytest.raises(TypeError, match="unknown option"):
        logic.report(volume, refine=True)
    with pytest.raises(TypeError, match="unknown option"):
        logic.ask(volume, "x", maskRoi=True)


def test_segment_statistics_where_the_module_is_available(assistant, monkeypatch):  # noqa: F811
    """With Slicer's Segment Statistics module (the application has it; slicer-core does not), the Logic runs it
    on the new segment and the volume and exports its table; without it, None (the result's own numbers stand)."""
    logic = assistant.M3DAssistantLogic(backendFactory=AnalysisBackend, settings=MemorySettings())
    volume = small_volume()
    segmentation, segment_id = logic.segment(volume, "liver")
    assert logic.segmentStatistics(segmentation, segment_id, volume) is None

    calls = {}

    class FakeStatisticsLogic:
        def __init__(self):
            self.parameters = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

        def getParameterNode(self):
            return self.parameters

        def updateStatisticsForSegment(self, segment):
            calls["segment"] = segment
            calls["parameters"] = {name: self.parameters.GetParameter(name) for name in (
                "Segmentation", "ScalarVolume", "LabelmapSegmentStatisticsPlugin.feret_diameter_mm.enabled")}

        def getStatistics(self):
            prefix = "ScalarVolumeSegmentStatisticsPlugin."
            return {(segment_id, prefix + "volume_cm3"): 0.036, (segment_id, prefix + "mean"): 12.5,
                    (segment_id, prefix + "stdev"): 3.0}

        def exportToTable(self, table):
            calls["table"] = table

    monkeypatch.setitem(sys.modules, "SegmentStatistics",
                        types.SimpleNamespace(SegmentStatisticsLogic=FakeStatisticsLogic))
    statistics = logic.segmentStatistics(segmentation, segment_id, volume)
    assert calls["segment"] == segment_id and calls["parameters"] == {
        "Segmentation": segmentation.GetID(), "ScalarVolume": volume.GetID(),
        "LabelmapSegmentStatisticsPlugin.feret_diameter_mm.enabled": "True"}
    assert statistics["volume_ml"] == 0.036 and statistics["std"] == 3.0 and statistics["table"] is calls["table"]
    assert calls["table"].GetName() == "liver statistics"


# -------------------------------------------------------------------------------------------- panel helpers
def test_the_conversation_marks_unsure_words_and_lists_the_options():
    tokens = [TokenProbability(1, " The", 0.95), TokenProbability(2, " lesion", 0.12), TokenProbability(3, "<", 0.2),
              TokenProbability(4, " is", 0.9)]
    text = " The lesion< is"
    html_text = panel.marked_answer_html(text, Confidence(tokens, -1.0))
    assert html_text.startswith("The<span") and "> lesion&lt;</span> is" in html_text  # tokens carry their space
    assert "title='lowest token probability 0.12'" in html_text
    assert panel.marked_answer_html(text, None) == "The lesion&lt; is"
    choice = ChoiceResult("B. Lung", ["Liver", "Lung", "Bone"], "B", "Lung", prov("vqa_closed"),
                          confidence=Confidence(choices={"A": 0.2, "B": 0.7, "C": 0.1}, choice_mass=0.3))
    lines = panel.choice_lines(choice)
    assert lines[0] == "B. Lung: 70% \u2190 answer" and lines[1].startswith("A. Liver: 20%")
    assert "did not answer in the trained format" in lines[-1]
    html_block = panel.analysis_html(choice)
    assert "B. Lung: 70%" in html_block and panel.answer_html("choose", ("Lung", choice)) is None  # no tokens
    choice.confidence.tokens = [TokenProbability(7, "B. Lung", 0.1)]
    assert panel.answer_html("choose", ("Lung", choice)) == "B. Lung"  # the option, probabilities below it
    asked = TextResult(" The lesion< is", prov("vqa_open"), confidence=Confidence(tokens, -1.0))
    assert panel.answer_html("ask", (asked.text, asked)) == html_text
    assert "Mean token log-probability -1.00 (2 of 4 tokens below 0.3" in panel.analysis_html(asked)


def test_the_panel_shows_measurements_confidence_and_evidence(engine):
    with forced_answer(engine, " It is [SEG]."):
        result = engine.segment("liver", sampling=SamplingOptions(max_new_tokens=8),
                                analysis=AnalysisOptions(refine=True, evidence=True, evidence_steps=1))
    lines = panel.measurement_lines(result)
    assert lines[0].startswith(f"Volume {result.measurements.volume_ml:.1f} mL; largest diameter")
    assert "HU" in lines[2] and lines[3].startswith("Mask confidence") and lines[4].startswith("Refined by zoom-in")
    statistics = {"volume_ml": 1.5, "mean": 40.0, "std": 2.0}
    assert panel.measurement_lines(result, statistics)[0].startswith("Volume 1.5 mL (Segment Statistics)")
    items = panel.evidence_items(result.evidence)
    assert items and items[0][0].startswith("1. slice") and items[0][1] == result.evidence.ranges[0].peak_ras
    assert "Evidence map (gradient-x-input, 1 steps)" in panel.analysis_html(result)
    log = panel.ConversationLog()
    entry = log.start("v", "segment", "liver")
    entry.answer, entry.details_html, entry.status = "It is [SEG].", panel.analysis_html(result), "done"
    assert "Mask confidence" in log.to_html("v")
    assert mask_attributes(result)["M3D.refined"] == "zoom-in"
    assert panel.progress_text(panel.ProgressEvent("evidence", 0.5, "step 1"))[0].startswith("Computing the evidence")
    assert MaskConfidence(None, None, 0, 0).to_dict()["band"] == [0.3, 0.7]


# ------------------------------------------------------------------------------------ the widget on stand-in Qt
from test_assistant_module import widget  # noqa: E402, F401  (the module's widget on stand-in Qt widgets, a fixture)


def test_the_panel_shows_the_evidence_and_the_numbers_of_a_segment(widget, engine, monkeypatch):  # noqa: F811
    """The panel's path with the analysis check boxes on (the real tiny engine as the backend, [SEG] forced): the
    evidence map is overlaid on the input volume, its slice ranges fill the list and a click jumps there, and the
    conversation shows the mask's numbers under the answer. (On stand-in Qt widgets: what the widgets draw is the
    Qt harness's to check.)"""
    import time

    layers, jumps = [], []
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kwargs: layers.append(kwargs), raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(markups=types.SimpleNamespace(
        logic=lambda: types.SimpleNamespace(JumpSlicesToLocation=lambda *args: jumps.append(args)))))
    widget.logic._backendFactory = lambda config: engine
    volume = slicer.util.addVolumeFromArray(np.asarray(engine._volume().array), ijkToRAS=np.eye(4), name="ct")
    p = widget._parameterNode
    p.inputVolume, p.evidence, p.evidenceSteps, p.refine, p.maskRoi = volume, True, 1, True, True
    p.maxNewTokens = 8
    widget.ui.promptComboBox.currentText = "liver"
    with forced_answer(engine, " It is [SEG]."):
        widget.ui.segmentButton.slots[0][1]()
        deadline = time.monotonic() + 120
        while widget._running is not None and time.monotonic() < deadline:
            time.sleep(0.02)
            widget._onTimer()
    entry = widget._conversation.entries(volume.GetID())[-1]
    assert entry.status == "done", entry.answer
    result = widget.logic.lastResult
    assert result.refinement is not None and result.evidence is not None
    assert set(widget.logic.lastNodes) == {"evidence", "mask_box"}
    assert layers == [{"background": volume, "foreground": widget.logic.lastNodes["evidence"],
                       "foregroundOpacity": p.evidenceOpacity}]
    assert widget._evidenceTargets == [r.peak_ras for r in result.evidence.ranges]
    widget.ui.evidenceRangesList.row = lambda item: 0
    widget.onEvidenceRangeClicked(object())
    assert jumps[-1] == (*result.evidence.ranges[0].peak_ras, True)
    assert "Volume " in entry.details_html and "Refined by zoom-in" in entry.details_html
    assert "Evidence map (gradient-x-input, 1 steps)" in entry.details_html
