"""Training sees what inference sees: the image ``m3d export`` writes for a task equals, value for value, the tensor
the engine feeds the model for that task on the same volume -- same orientation convention, same window (the scene
volume's window/level for report/VQA, percentiles for masks), same crop and resampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from M3DAssistantLib import tasks

slicer = pytest.importorskip("slicer")


@pytest.fixture
def scene_with_ct(headless_slicer, ct_path):
    """A scene with the real CT (a window/level set by hand), a liver segment, a report and a question: every dataset
    section has a sample."""
    scene, logics = headless_slicer
    ct = logics["volumes"].AddArchetypeVolume(str(ct_path), "CT")
    ct.GetDisplayNode().SetAutoWindowLevel(False)
    ct.GetDisplayNode().SetWindowLevel(350.0, 50.0)
    labels = logics["volumes"].AddArchetypeVolume(str(ct_path.parent / "example_seg.nii.gz"), "labels", 1)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
    liver = (slicer.util.arrayFromVolume(labels) == 5).astype(np.uint8)
    slicer.util.updateSegmentBinaryLabelmapFromArray(liver, segmentation, segment_id, ct)
    scene.RemoveNode(labels)
    report = scene.AddNewNodeByClass("vtkMRMLTextNode", "CT report")
    report.SetText("The liver is normal.")
    questions = scene.AddNewNodeByClass("vtkMRMLTextNode", "CT questions")
    questions.SetText("Q: Which organ is largest?\nA: The liver.\n\nQ: Which plane?\nChoices: Axial | Coronal\nA: A\n\n"
                      "Q: Please segment the largest organ.\nSegment: liver\n")
    return scene, ct


def _exported_images(folder) -> dict[str, str]:
    """{training task name: image path} from dataset.json."""
    manifest = json.loads((folder / "dataset.json").read_text())
    images = {}
    for name in tasks.TRAINING_NAMES:
        record = manifest[name]["train"][0]
        images[name] = record.get("image") or record.get("Image Path") or record.get("Image")
    return images


def _engine_inputs(engine, ct) -> dict[str, np.ndarray]:
    """What the engine feeds the model for each dataset task, for this volume node as the session sends it."""
    from M3DAssistantLib.scene import read_volume_node, volume_display

    array, ijk_to_ras = read_volume_node(ct)
    display_window, modality = volume_display(ct)
    engine.set_volume(array, ijk_to_ras, display_window=display_window, modality=modality)
    return {name: engine._view(tasks.by_training_name(name)).images[0].cpu().numpy() for name in tasks.TRAINING_NAMES}


@pytest.mark.slicer
def test_exported_images_equal_what_the_engine_feeds_the_model(scene_with_ct, tiny_phi3_model, tmp_path):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DTrainingLib.export import export_dataset

    scene, ct = scene_with_ct
    engine = InferenceEngine(tiny_phi3_model)
    for round_, (level, width) in enumerate([(50.0, 350.0), (-600.0, 1500.0)]):  # the reader changes W/L
        ct.GetDisplayNode().SetWindowLevel(width, level)
        folder = tmp_path / f"dataset{round_}"
        export_dataset(scene, folder, model_shape=engine.model_shape)
        images = _exported_images(folder)
        assert images == {"report": "images/ct_cap.npy", "vqa_open": "images/ct_cap.npy",
                          "vqa_closed": "images/ct_cap.npy", "rec": "images/ct_seg.npy", "reg": "images/ct_seg.npy",
                          "seg": "images/ct_seg.npy", "refseg": "images/ct_refseg.npy"}
        fed = _engine_inputs(engine, ct)
        for name, path in images.items():
            np.testing.assert_array_equal(np.load(folder / path), fed[name], err_msg=name)
        mapping = json.loads((folder / "images" / "ct_cap.mapping.json").read_text())
        assert (mapping["intensity"]["name"], mapping["intensity"]["center"]) == ("display (Slicer)", level)
    # the display window changed the report's image, not the masks'
    assert not np.array_equal(np.load(tmp_path / "dataset0/images/ct_cap.npy"),
                              np.load(tmp_path / "dataset1/images/ct_cap.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "dataset0/images/ct_seg.npy"),
                                  np.load(tmp_path / "dataset1/images/ct_seg.npy"))


@pytest.mark.slicer
def test_forced_convention_and_window_export_equals_the_engine_forced_alike(scene_with_ct, tiny_phi3_model, tmp_path):
    """``convention=`` / ``window=`` forced for every task, in the export and in the engine: still identical, and
    the image names say what tells the views apart."""
    from M3DAssistantLib.engine import InferenceEngine
    from M3DTrainingLib.export import export_dataset, image_suffixes

    scene, ct = scene_with_ct
    assert image_suffixes() == {"report": "cap", "vqa_open": "cap", "vqa_closed": "cap", "rec": "seg", "reg": "seg",
                                "seg": "seg", "refseg": "refseg"}
    assert set(image_suffixes(convention="m3d-seg-v1").values()) == {"display", "percentile", "volume_percentile"}
    assert set(image_suffixes(window="abdomen").values()) == {"cap", "seg", "refseg"}
    assert set(image_suffixes(convention="axial", window="lung").values()) == {""}

    engine = InferenceEngine(tiny_phi3_model, convention="m3d-seg-v1")
    folder = tmp_path / "forced_convention"
    export_dataset(scene, folder, model_shape=engine.model_shape, convention="m3d-seg-v1")
    images = _exported_images(folder)
    assert images["report"] == "images/ct_display.npy" and images["seg"] == "images/ct_percentile.npy"
    fed = _engine_inputs(engine, ct)
    for name, path in images.items():
        np.testing.assert_array_equal(np.load(folder / path), fed[name], err_msg=name)

    engine = InferenceEngine(tiny_phi3_model)
    folder = tmp_path / "forced_window"
    export_dataset(scene, folder, model_shape=engine.model_shape, window="lung")
    from M3DAssistantLib.scene import read_volume_node

    engine.set_volume(*read_volume_node(ct), window="lung")
    for name, path in _exported_images(folder).items():
        view = engine._view(tasks.by_training_name(name))
        np.testing.assert_array_equal(np.load(folder / path), view.images[0].cpu().numpy(), err_msg=name)
