"""What confidence, evidence, refinement, measurements and the REC box become in Slicer: nodes on real MRML
(slicer-core) through the session, the Logic's console options, the panel's Qt-free helpers, and the panel's
"Confidence, evidence and masks" section as a user drives it (real Qt widgets and slice views under the test harness,
the real worker on the tiny checkpoint).

Slicer's Segment Statistics module is part of the Slicer application, not of slicer-core: where it is needed a
documented stand-in (:class:`SegmentStatisticsStandIn`) answers the calls our Logic makes, so what is tested is our
side of it (the parameters we set, the numbers we read, the table we export, what the panel shows)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from forcing import forced_answer
from panel_user import run_task, typed

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


class SegmentStatisticsStandIn:
    """A stand-in for ``SegmentStatistics.SegmentStatisticsLogic`` (Slicer's Segment Statistics module, in the
    application only): the parameter node, ``updateStatisticsForSegment``, ``getStatistics`` (fixed numbers, keyed as
    Slicer's: ``(segment id, "Plugin.measurement")``) and ``exportToTable``; each call is recorded in ``calls``."""

    calls: dict = {}

    def __init__(self):
        self.parameters = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
        self.segment = None

    def getParameterNode(self):
        return self.parameters

    def updateStatisticsForSegment(self, segment):
        self.segment = segment
        self.calls["segment"] = segment
        self.calls["parameters"] = {name: self.parameters.GetParameter(name) for name in (
            "Segmentation", "ScalarVolume", "LabelmapSegmentStatisticsPlugin.feret_diameter_mm.enabled")}

    def getStatistics(self):
        prefix = "ScalarVolumeSegmentStatisticsPlugin."
        return {(self.segment, prefix + "volume_cm3"): 1.5, (self.segment, prefix + "mean"): 12.5,
                (self.segment, prefix + "stdev"): 3.0}

    def exportToTable(self, table):
        self.calls["table"] = table


def with_segment_statistics(monkeypatch):
    SegmentStatisticsStandIn.calls = {}
    monkeypatch.setitem(sys.modules, "SegmentStatistics",
                        types.SimpleNamespace(SegmentStatisticsLogic=SegmentStatisticsStandIn))
    return SegmentStatisticsStandIn.calls


def test_segment_statistics_where_the_module_is_available(assistant, monkeypatch):  # noqa: F811
    """With Slicer's Segment Statistics module (the application has it; slicer-core does not: the stand-in), the
    Logic runs it on the new segment and the volume and exports its table; without it, None (the result's own numbers
    stand)."""
    logic = assistant.M3DAssistantLogic(backendFactory=AnalysisBackend, settings=MemorySettings())
    volume = small_volume()
    segmentation, segment_id = logic.segment(volume, "liver")
    assert logic.segmentStatistics(segmentation, segment_id, volume) is None

    calls = with_segment_statistics(monkeypatch)
    statistics = logic.segmentStatistics(segmentation, segment_id, volume)
    assert calls["segment"] == segment_id and calls["parameters"] == {
        "Segmentation": segmentation.GetID(), "ScalarVolume": volume.GetID(),
        "LabelmapSegmentStatisticsPlugin.feret_diameter_mm.enabled": "True"}
    assert statistics["volume_ml"] == 1.5 and statistics["std"] == 3.0 and statistics["table"] is calls["table"]
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


# ------------------------------------------------------------------------- the panel's section, real Qt, real worker
# The answer a forced worker gives every prompt: a box for "locate" and [SEG] for the mask, so that both exist.
FORCED_BOX_AND_MASK = " Coordinates are <bx_start>[0.2, 0.3, 0.3, 0.6, 0.7, 0.7]<bx_end>. It is [SEG]."


def slice_views():
    """The slice views' MRML nodes (the harness's layout: Red, Yellow, Green): ``{name: (slice, composite)}``."""
    views = {}
    for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
        composite = slicer.mrmlScene.GetSingletonNode(node.GetLayoutName(), "vtkMRMLSliceCompositeNode")
        views[node.GetLayoutName()] = (node, composite)
    assert set(views) == {"Red", "Yellow", "Green"}
    return views


def slice_centers():
    """Where each slice view is centered (RAS): the translation of its slice-to-RAS matrix."""
    return {name: [node.GetSliceToRAS().GetElement(i, 3) for i in range(3)]
            for name, (node, _) in slice_views().items()}


def set_analysis_options(widget, **checked):
    """Tick the section's check boxes as a user does (a click toggles one), then check the parameter node."""
    boxes = {"confidence": widget.ui.confidenceCheckBox, "evidence": widget.ui.evidenceCheckBox,
             "refine": widget.ui.refineCheckBox, "locate": widget.ui.locateCheckBox,
             "maskRoi": widget.ui.maskRoiCheckBox}
    for name, value in checked.items():
        if boxes[name].checked != value:
            boxes[name].click()
        assert getattr(widget._parameterNode, name) is value, name


def test_the_panel_shows_the_evidence_and_the_numbers_of_a_segment(assistant_panel, tmp_path, monkeypatch):
    """The section's options on a segment (the worker forced to answer a box and [SEG]): the evidence map overlaid
    on the CT in the slice views at the chosen opacity, its slice ranges listed (a click centers the views on a
    range's peak, again on every click), the mask's box and the model's own box as ROIs, and the mask's numbers under
    the answer (with Segment Statistics where the module is there)."""
    harness, module, widget, volume = assistant_panel
    from forcing import write_worker_launcher

    answers = tmp_path / "answer.txt"
    answers.write_text(FORCED_BOX_AND_MASK)
    widget.ui.pythonPathLineEdit.currentPath = write_worker_launcher(tmp_path, answers)
    widget.ui.maxNewTokensSpinBox.value = 64  # room for the forced answer
    section = widget.ui.analysisCollapsibleButton
    assert not section.collapsed and widget.ui.evidenceCheckBox.isVisibleTo(section)
    section.click()  # the header folds the section away and opens it again
    assert section.collapsed and not widget.ui.evidenceCheckBox.isVisibleTo(section)
    section.click()
    assert not section.collapsed and widget.ui.evidenceRangesList.isVisibleTo(section)
    set_analysis_options(widget, confidence=True, evidence=True, refine=True, locate=True, maskRoi=True)
    widget.ui.evidenceStepsSpinBox.value = 1
    widget.ui.evidenceOpacitySpinBox.value = 0.7
    p = widget._parameterNode
    assert (p.evidenceSteps, p.evidenceOpacity) == (1, pytest.approx(0.7))
    assert widget.ui.evidenceRangesList.count == 0

    typed(widget.ui.promptComboBox.lineEdit(), "liver")
    entry = run_task(harness, widget, "segment", timeout=300)
    assert entry.status == "done", entry.answer
    result = widget.logic.lastResult
    assert result.mask is not None and result.refinement is not None and result.evidence is not None
    assert result.located is not None and result.evidence.steps == 1
    nodes = widget.logic.lastNodes
    assert set(nodes) == {"evidence", "mask_box", "located_box"}
    assert nodes["located_box"].GetName() == "liver (located)"

    # The evidence map over the CT in every slice view, at the chosen opacity
    for name, (_, composite) in slice_views().items():
        assert composite.GetBackgroundVolumeID() == volume.GetID(), name
        assert composite.GetForegroundVolumeID() == nodes["evidence"].GetID(), name
        assert composite.GetForegroundOpacity() == pytest.approx(0.7), name

    # Its most relevant slices listed; a click centers the slice views on that range's peak, every time
    items = panel.evidence_items(result.evidence)
    listed = widget.ui.evidenceRangesList
    assert [listed.item(row).text() for row in range(listed.count)] == [label for label, _ in items]
    for row in (0, len(items) - 1, 0):
        harness.clickItem(listed, row)
        for name, center in slice_centers().items():
            np.testing.assert_allclose(center, items[row][1], atol=1e-3, err_msg=name)
    slicer.modules.markups.logic().JumpSlicesToLocation(0.0, 0.0, 0.0, True)  # the user moves on...
    harness.clickItem(listed, 0)  # ... and clicks the same range again
    np.testing.assert_allclose(slice_centers()["Red"], items[0][1], atol=1e-3)

    # The mask's numbers and the evidence under the answer
    assert "Volume " in entry.details_html and "Refined by zoom-in" in entry.details_html
    assert "Evidence map (gradient-x-input, 1 steps)" in entry.details_html
    assert "(Segment Statistics)" not in entry.details_html  # slicer-core has no Segment Statistics module
    shown = widget.ui.conversationView.toPlainText()
    assert "Refined by zoom-in" in shown and "Evidence map" in shown

    # Where Slicer's Segment Statistics module is there (the stand-in), the panel shows its volume
    calls = with_segment_statistics(monkeypatch)
    set_analysis_options(widget, evidence=False, refine=False, locate=False, maskRoi=False)
    typed(widget.ui.promptComboBox.lineEdit(), "spleen")
    entry = run_task(harness, widget, "segment", timeout=300)
    segmentation = p.outputSegmentation
    assert calls["parameters"]["Segmentation"] == segmentation.GetID()
    assert calls["parameters"]["ScalarVolume"] == volume.GetID()
    assert segmentation.GetSegmentation().GetSegment(calls["segment"]).GetName().startswith("spleen")
    assert "Volume 1.5 mL (Segment Statistics)" in entry.details_html
    assert calls["table"].GetName().startswith("spleen") and calls["table"].GetName().endswith(" statistics")
    assert set(widget.logic.lastNodes) == set() and widget.logic.lastResult.evidence is None
    assert listed.count == len(items)  # the list keeps the last evidence map's ranges...
    slicer.mrmlScene.Clear(0)
    assert listed.count == 0  # ... until the scene (and the map) is closed


def test_the_panels_analysis_options_on_the_models_own_answers(assistant_panel):
    """The unforced twin: the tiny model's random answers. An evidence map is computed for any answer (Ask), listed
    and shown; confidence marks the answer and can be turned off; a segment request with every mask option gives
    the mask's ROI exactly when the model gave a mask."""
    harness, module, widget, volume = assistant_panel
    set_analysis_options(widget, confidence=True, evidence=True)
    widget.ui.evidenceStepsSpinBox.value = 1

    typed(widget.ui.promptComboBox.lineEdit(), "Is the liver enlarged?")
    entry = run_task(harness, widget, "ask", timeout=300)
    assert entry.status == "done"
    result = widget.logic.lastResult
    assert result.confidence is not None and result.evidence is not None
    assert "Mean token log-probability" in entry.details_html
    assert entry.answer_html is not None  # the answer with its unsure words marked
    evidence = widget.logic.lastNodes["evidence"]
    assert all(composite.GetForegroundVolumeID() == evidence.GetID() for _, composite in slice_views().values())
    items = panel.evidence_items(result.evidence)
    listed = widget.ui.evidenceRangesList
    assert listed.count == len(items) > 0
    harness.clickItem(listed, listed.count - 1)
    np.testing.assert_allclose(slice_centers()["Green"], items[-1][1], atol=1e-3)

    set_analysis_options(widget, confidence=False, evidence=False)
    typed(widget.ui.promptComboBox.lineEdit(), "Is the spleen enlarged?")
    entry = run_task(harness, widget, "ask", timeout=300)
    assert entry.status == "done" and widget.logic.lastResult.confidence is None
    assert "Mean token log-probability" not in (entry.details_html or "")

    set_analysis_options(widget, refine=True, locate=True, maskRoi=True)
    typed(widget.ui.promptComboBox.lineEdit(), "liver")
    entry = run_task(harness, widget, "segment", timeout=300)
    assert entry.status == "done"
    result = widget.logic.lastResult
    assert result.located is not None  # the model was asked for its box too, whatever it answered
    assert ("mask_box" in widget.logic.lastNodes) == bool(result.roi is not None and result.voxel_count)
    assert ("located_box" in widget.logic.lastNodes) == (result.located.roi is not None)
