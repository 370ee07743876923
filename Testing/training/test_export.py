"""export.py: annotated slicer-core scenes (the test CT, TotalSegmentator segments, ROIs, report and Q/A text nodes)
-> dataset folder, checked against the geometry functions inference uses; .mrb/.mrml files; the validation report;
seeded splits by volume; the scene is never modified and no folder is overwritten; the dataset reads back."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from annotated_scene import QA_TEXT, build_scene

from M3DAssistantLib.errors import InputError
from M3DAssistantLib.geometry import VolumeToModelMapping, mask_to_box, mask_to_model, roi_to_box, to_model_input
from M3DAssistantLib.preprocessing import WINDOW_KINDS, DisplayWindow, default_window
from M3DTrainingLib.export import _assign_splits, export_dataset, parse_qa_text, target_text

SHAPE = (16, 64, 64)


# ---------------------------------------------------------------------------------------------------------------------
# pure helpers (no Slicer)
# ---------------------------------------------------------------------------------------------------------------------


def test_target_text_reads_like_the_official_class_names():
    assert target_text("kidney_left") == "left kidney"
    assert target_text("Liver") == "liver"
    assert target_text("IVC") == "IVC"
    assert target_text("  adrenal_gland_right ") == "right adrenal gland"


def test_qa_text_blocks():
    items, problems = parse_qa_text(QA_TEXT + "Absent: appendix; aorta\nA: stray answer\nQ: two\nA: x\nA: y\n")
    kinds = [("absent" if "absent" in i else "choices" if "choices" in i else "segment" if "segment" in i else
              "open" if i.get("answer") else "none") for i in items]
    assert kinds == ["open", "choices", "segment", "absent", "none", "absent", "open"]
    assert items[1]["choices"] == ["Axial", "Coronal", "Sagittal", "Oblique"] and items[1]["answer"] == "A"
    assert items[2]["segment"] == "liver" and items[3]["absent"] == ["gallbladder"]
    assert items[5]["absent"] == ["appendix", "aorta"]
    assert items[6]["answer"] == "x"  # the second A: of a block is reported, not merged
    assert [p.split(":")[0] for p in problems] == ["line 14", "line 17"]
    assert "outside any 'Q:' block" in problems[0] and "second 'A:'" in problems[1]
    items, problems = parse_qa_text("A: before any question\nQ: multi\nline question?\nA: multi\nline answer")
    assert items == [{"question": "multi line question?", "answer": "multi line answer", "line": 2}]
    assert len(problems) == 1 and "outside any 'Q:'" in problems[0]


def test_splits_are_by_volume_seeded_and_honour_fixed_ones():
    ids = [f"v{i}" for i in range(10)]
    a = _assign_splits(ids, {}, 0.3, seed=1)
    assert a == _assign_splits(list(reversed(ids)), {}, 0.3, seed=1)  # order of the scenes does not matter
    assert sorted(a.values()).count("validation") == 3
    assert a != _assign_splits(ids, {}, 0.3, seed=2)
    fixed = _assign_splits(ids, {"v0": "validation", "v1": "train"}, 0.0, seed=1)
    assert fixed["v0"] == "validation" and list(fixed.values()).count("validation") == 1
    assert set(_assign_splits(["a", "b"], {}, 0.1, seed=0).values()) == {"train", "validation"}  # at least one held out
    assert set(_assign_splits(["a"], {}, 0.5, seed=0).values()) == {"train"}  # never everything


# ---------------------------------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------------------------------

slicer = pytest.importorskip("slicer")


def scene_state(scene) -> list[tuple]:
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [(n.GetID(), n.GetName(), n.GetMTime()) for n in nodes]


@pytest.fixture
def annotated(headless_slicer, data_dir):
    scene, logics = headless_slicer
    ct, seg, roi, reg = build_scene(scene, logics, data_dir)
    return scene, ct, seg, roi, reg


@pytest.fixture
def exported(annotated, tmp_path):
    scene = annotated[0]
    before = scene_state(scene)
    voxels = slicer.util.arrayFromVolume(annotated[1]).copy()
    result = export_dataset(scene, tmp_path / "dataset", model_shape=SHAPE)
    assert scene_state(scene) == before  # nothing added, removed or modified
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(annotated[1]), voxels)
    return result, annotated


@pytest.mark.slicer
def test_export_writes_the_official_layout_with_inference_geometry(exported):
    result, (scene, ct, seg, roi, reg) = exported
    folder = result.folder
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["model_shape"] == list(SHAPE)
    assert {t for t in manifest if t in ("report", "vqa_open", "vqa_closed", "rec", "reg", "seg", "refseg")} == \
        {"report", "vqa_open", "vqa_closed", "rec", "reg", "seg", "refseg"}

    array = slicer.util.arrayFromVolume(ct)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(ct))
    display = ct.GetDisplayNode()  # each task's own window, as at inference: report/VQA the scene's window/level
    shown = DisplayWindow(display.GetLevel(), display.GetWindow(), "Slicer")
    value_range = (float(array.min()), float(array.max()))
    windows = {kind: default_window(kind, display_window=shown, value_range=value_range) for kind in WINDOW_KINDS}
    assert windows["display"] == shown.spec
    for short, convention, kind in (("cap", "m3d-cap-v2", "display"), ("seg", "m3d-seg-v1", "percentile"),
                                    ("refseg", "m3d-refseg-v1", "volume-percentile")):
        expected, mapping = to_model_input(array, ijk_to_ras, model_shape=SHAPE, convention=convention,
                                           window=windows[kind])
        image = np.load(folder / "images" / f"ct_{short}.npy")
        assert image.dtype == np.float32 and image.shape == (1, *SHAPE)
        np.testing.assert_array_equal(image, expected)
        stored = VolumeToModelMapping.from_json((folder / "images" / f"ct_{short}.mapping.json").read_text())
        assert stored == mapping
    assert manifest["window"] is None and manifest["window_kind"]["report"] == "display"

    _, seg_mapping = to_model_input(array, ijk_to_ras, model_shape=SHAPE, convention="m3d-seg-v1")
    train = {task: manifest[task]["train"] for task in manifest if isinstance(manifest[task], dict)
             and "train" in manifest[task]}
    seg_records = {r["target"]: r for r in train["seg"]}
    assert set(seg_records) == {"liver", "spleen", "left kidney", "gallbladder"}
    for name, target in (("liver", "liver"), ("spleen", "spleen"), ("kidney_left", "left kidney")):
        record = seg_records[target]
        mask = np.load(folder / record["label"])
        reference = slicer.util.arrayFromSegmentBinaryLabelmap(seg, name, ct)
        expected_mask = mask_to_model(reference, seg_mapping) != 0
        assert mask.dtype == bool and mask.shape == (1, *SHAPE)
        np.testing.assert_array_equal(mask[0], expected_mask)
        assert record["box"] == list(mask_to_box(expected_mask))
        assert record["box_text"] == f"<bx_start>{record['box']}<bx_end>"  # the official text form
        assert record["image"] == "images/ct_seg.npy"
        for task in ("rec", "reg"):
            assert any(r["label"] == record["label"] and r["box"] == record["box"] for r in train[task])
    assert seg_records["gallbladder"]["label"] is None and seg_records["gallbladder"]["box"] is None

    from M3DAssistantLib.scene import roi_from_node

    (rec_roi,) = [r for r in train["rec"] if r["node"] == "liver"]
    assert rec_roi["label"] is None and rec_roi["box"] == list(roi_to_box(roi_from_node(roi), seg_mapping, snap=True))
    (reg_roi,) = [r for r in train["reg"] if r["node"] == "spleen"]
    assert reg_roi["box"] == list(roi_to_box(roi_from_node(reg), seg_mapping, snap=True))

    (report,) = train["report"]
    assert report["image"] == "images/ct_cap.npy"
    assert (folder / report["text"]).read_text().strip() == "The liver is normal in size. No focal lesion."
    (open_q,) = train["vqa_open"]
    assert open_q == {"Image Path": "images/ct_cap.npy", "Question": "What organ is the largest in this image?",
                      "Answer": "The liver.", "Question Type": "user", "volume": "ct",
                      "node": "CT questions (line 1)"}
    (closed,) = train["vqa_closed"]
    assert [closed[f"Choice {c}"] for c in "ABCD"] == ["Axial", "Coronal", "Sagittal", "Oblique"]
    assert closed["Answer Choice"] == "A" and closed["Answer"] == "Axial"
    (refseg,) = train["refseg"]
    # referring segmentation: image and mask in M3D-RefSeg's own orientation (m3d-refseg-v1), as at inference
    assert refseg["Image"] == "images/ct_refseg.npy" and refseg["Mask"] == "masks/ct_refseg_liver.npy"
    assert refseg["Mask_ID"] == 1 and refseg["Answer"] is None
    _, refseg_mapping = to_model_input(array, ijk_to_ras, model_shape=SHAPE, convention="m3d-refseg-v1",
                                       window=windows["volume-percentile"])
    expected_mask = mask_to_model(slicer.util.arrayFromSegmentBinaryLabelmap(seg, "liver", ct), refseg_mapping) != 0
    np.testing.assert_array_equal(np.load(folder / refseg["Mask"])[0], expected_mask)


@pytest.mark.slicer
def test_export_report_counts_and_reasons(exported):
    result, _ = exported
    saved = json.loads((result.folder / "export_report.json").read_text())
    assert saved["counts"]["seg"] == {"train": 4, "validation": 0}
    assert saved["counts"]["rec"]["train"] == 5 and saved["counts"]["reg"]["train"] == 4
    assert saved["total_samples"] == result.total == 1 + 1 + 1 + 5 + 4 + 4 + 1
    reasons = {(s["node"], s["kind"]): s["reason"] for s in saved["skipped"]}
    assert reasons[("Segmentation/Segment_1", "segment")].startswith("unmatched name")
    assert reasons[("Segmentation/pancreas", "segment")].startswith("empty segment")
    assert reasons[("labels", "node")].startswith("unsupported node")
    assert reasons[("CT report (AI)", "text")].startswith("AI-generated")
    assert reasons[("CT questions (line 12)", "qa")] == "question without an answer ('A:')"
    text = (result.folder / "export_report.txt").read_text()
    assert "Skipped (5)" in text and "unmatched name" in text and "seg " in text


@pytest.mark.slicer
def test_export_from_mrb_and_mrml_files_matches_the_live_scene(exported, tmp_path):
    result, (scene, *_rest) = exported
    mrb = tmp_path / "annotated.mrb"
    assert scene.WriteToMRB(str(mrb))
    from_mrb = export_dataset(mrb, tmp_path / "from_mrb", model_shape=SHAPE)
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(mrb) as z:
        z.extractall(unpacked)
    (mrml,) = unpacked.rglob("*.mrml")
    from_mrml = export_dataset([mrml, tmp_path / "missing.mrb"], tmp_path / "from_mrml", model_shape=SHAPE)
    assert from_mrml.skipped[-1].kind == "scene" and "does not exist" in from_mrml.skipped[-1].reason

    def comparable(folder):
        m = json.loads((folder / "dataset.json").read_text())
        m.pop("volumes")
        return m

    live = comparable(result.folder)
    assert comparable(from_mrb.folder) == live and comparable(from_mrml.folder) == live
    for rel in ("images/ct_seg.npy", "masks/ct_seg_liver.npy"):
        np.testing.assert_array_equal(np.load(from_mrb.folder / rel), np.load(result.folder / rel))


@pytest.mark.slicer
def test_export_never_overwrites_and_leaves_nothing_on_failure(annotated, tmp_path):
    scene = annotated[0]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        export_dataset(scene, existing, model_shape=SHAPE)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]

    with pytest.raises(InputError, match="nothing could be exported"):
        export_dataset(slicer.vtkMRMLScene(), tmp_path / "none", model_shape=SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no dataset, no partial folder

    empty = tmp_path / "empty"
    empty.mkdir()
    only_liver = export_dataset(scene, empty, model_shape=SHAPE, targets=["liver"], segment_tasks=["seg"])
    assert only_liver.counts["seg"]["train"] == 1 and only_liver.counts["rec"]["train"] == 1  # the liver ROI
    assert any(s.reason.startswith("unmatched name") and "spleen" in s.reason for s in only_liver.skipped)


@pytest.mark.slicer
def test_volumes_are_split_whole_and_annotations_attach_by_attribute_or_name(annotated, data_dir, tmp_path):
    scene, ct, seg, roi, reg = annotated
    scene.RemoveNode(scene.GetFirstNodeByName("labels"))
    second = slicer.modules.volumes.logic().AddArchetypeVolume(str(data_dir / "example_ct_sm.nii.gz"), "CT2")
    second_report = scene.AddNewNodeByClass("vtkMRMLTextNode", "findings")
    second_report.SetAttribute("M3D.kind", "report")
    second_report.SetAttribute("M3D.volume", second.GetID())
    second_report.SetText("Second study.")
    orphan = scene.AddNewNodeByClass("vtkMRMLTextNode", "notes report")  # two volumes, no hint: attached to none
    orphan.SetText("Unattached.")
    roi.SetAttribute("M3D.volume", "CT")  # by name

    result = export_dataset(scene, tmp_path / "split", model_shape=SHAPE, validation_fraction=0.5, seed=3)
    assert set(result.volumes) == {"ct", "ct2"}
    assert sorted(v["split"] for v in result.volumes.values()) == ["train", "validation"]
    manifest = json.loads((result.folder / "dataset.json").read_text())
    for task in ("report", "seg", "rec"):
        for split in ("train", "validation"):
            assert {r["volume"] for r in manifest[task][split]} <= {v for v, d in result.volumes.items()
                                                                    if d["split"] == split}
    assert any(r["volume"] == "ct2" for s in ("train", "validation") for r in manifest["report"][s])
    assert any(s.node == "notes report" and s.reason.startswith("no volume") for s in result.skipped)
    again = export_dataset(scene, tmp_path / "split2", model_shape=SHAPE, validation_fraction=0.5, seed=3)
    assert {v: d["split"] for v, d in again.volumes.items()} == {v: d["split"] for v, d in result.volumes.items()}
    second.SetAttribute("M3D.split", "train")
    ct.SetAttribute("M3D.split", "train")
    fixed = export_dataset(scene, tmp_path / "fixed", model_shape=SHAPE, validation_fraction=0.5, seed=3)
    assert {d["split"] for d in fixed.volumes.values()} == {"train"}


@pytest.mark.slicer
def test_dataset_reads_the_export_back(exported, tiny_phi3):
    import torch

    from M3DAssistantLib.model.tokenizer import load_tokenizer
    from M3DTrainingLib.data import M3DDataset

    config = json.loads((tiny_phi3 / "config.json").read_text())
    tokenizer, _ = load_tokenizer(tiny_phi3, config["seg_token_id"], config["vocab_size"])
    result, _ = exported
    dataset = M3DDataset(result.folder, tokenizer, num_image_tokens=8, seed=0)
    assert dataset.task_counts == {"report": 1, "vqa_open": 1, "vqa_closed": 1, "rec": 5, "reg": 4, "seg": 4,
                                   "refseg": 1}
    answers = set()
    for i in range(len(dataset)):
        example = dataset.example(i)
        answers.add(example.answer)
        assert example.image.shape == (1, *SHAPE) and example.segs.shape == (1, *SHAPE)
        if example.task in ("rec", "reg", "seg", "refseg") and example.mask is not None:
            assert example.box == mask_to_box(example.mask)
            if example.task == "rec":
                assert example.answer == f"Coordinates are <bx_start>{list(example.box)}<bx_end>."
        if example.task in ("seg", "refseg") and example.mask is not None:
            assert torch.equal(example.segs, example.mask.float())
        else:
            assert not example.segs.any()
        if example.target == "left kidney" or "bile" in example.question:
            assert not example.spatial_augment
        item = dataset[i]
        assert set(item) == {"images", "input_ids", "labels", "attention_mask", "segs", "task"}
    assert {"The liver is normal in size. No focal lesion.", "The liver.", "A. Axial", "It is [SEG].",
            "Sorry, there is no gallbladder.", "The target is spleen.",
            "The target is liver and the segmentation mask is [SEG]."} <= answers


def _ijk_to_ras(volume_node):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return m


@pytest.mark.slicer
def test_segments_follow_parent_transforms(annotated):
    """A segment stays where it is in the world when only the volume moves; moving both changes nothing."""
    import vtk

    from M3DTrainingLib.export import _segment_mask_kji

    scene, ct, seg, _roi, _reg = annotated
    untransformed = _segment_mask_kji(seg, "liver", ct)
    shift = vtk.vtkTransform()
    shift.Translate(6.0, -3.0, 0.0)  # whole voxels (3 mm): nearest neighbour stays exact
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved.SetMatrixTransformToParent(shift.GetMatrix())
    ct.SetAndObserveTransformNodeID(moved.GetID())
    only_volume = _segment_mask_kji(seg, "liver", ct)
    np.testing.assert_array_equal(only_volume, slicer.util.arrayFromSegmentBinaryLabelmap(seg, "liver", ct) != 0)
    np.testing.assert_array_equal(only_volume[:, 1:, :-2], untransformed[:, :-1, 2:])  # i - 2, j + 1
    seg.SetAndObserveTransformNodeID(moved.GetID())
    np.testing.assert_array_equal(_segment_mask_kji(seg, "liver", ct), untransformed)


@pytest.mark.slicer
def test_table_node_with_official_vqa_columns(annotated, tmp_path):
    scene = annotated[0]
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "CT VQA table")
    columns = ["Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer Choice", "Answer"]
    for name in columns:
        table.AddColumn().SetName(name)
    rows = [["Which phase is this CT?", "Arterial", "Portal venous", "Delayed", "Non-contrast", "B", "Portal venous"],
            ["What is seen in the liver?", "", "", "", "", "", "A small cyst."],
            ["Which side is the spleen on?", "Left", "Right", "", "", "Z", ""]]
    for r, values in enumerate(rows):
        table.AddEmptyRow()
        for c, value in enumerate(values):
            table.SetCellText(r, c, value)
    result = export_dataset(scene, tmp_path / "table", model_shape=SHAPE, segment_tasks=["seg"])
    manifest = json.loads((result.folder / "dataset.json").read_text())
    closed = [r for r in manifest["vqa_closed"]["train"] if r["node"].startswith("CT VQA table")]
    opened = [r for r in manifest["vqa_open"]["train"] if r["node"].startswith("CT VQA table")]
    assert [(r["Question"], r["Answer Choice"], r["Answer"]) for r in closed] == \
        [("Which phase is this CT?", "B", "Portal venous")]
    assert [(r["Question"], r["Answer"]) for r in opened] == [("What is seen in the liver?", "A small cyst.")]
    (bad,) = [s for s in result.skipped if s.node == "CT VQA table (row 3)"]
    assert "neither an option letter" in bad.reason
