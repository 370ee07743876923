"""The output formats radiology tools read, checked with those tools' own readers: NIfTI label maps (nibabel and
SimpleITK), DICOM SEG (highdicom and pydicom), and provenance that survives Slicer's loaders (slicer-core)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from M3DAssistantLib import AI_LABEL, cli
from M3DAssistantLib.outputs import write_result
from M3DAssistantLib.results import BoxResult, Provenance, SegmentationResult
from M3DAssistantLib.volume_io import dicom_series_files, read_volume


def _provenance(task="seg") -> Provenance:
    return Provenance(task=task, model="GoodBaiBai88/M3D-LaMed-Phi-3-4B", model_revision="0123abc", dtype="float32",
                      device="cpu", prompt="What is liver in this image?", convention="m3d-seg-v1@v1",
                      intensity=json.dumps({"name": "percentile"}), sampling={"max_new_tokens": 8})


def _liver(data_dir, shape):
    """TotalSegmentator's liver label as a stand-in mask (on the CT's grid)."""
    labels, _ = read_volume(data_dir / "example_seg.nii.gz")
    assert labels.shape == shape
    return (labels == 5).astype(np.uint8)


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory, data_dir):
    """The bundled 20-slice series as a PACS exports it: the same files with their study, series and instance UIDs
    (the bundled copy was anonymised without them; the instance UIDs are the ones in its file meta)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("pacs") / "ct_dicom"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    for f in sorted((data_dir / "example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series, 3
        ds.save_as(str(folder / f.name))
    return folder


def test_nifti_label_map_is_on_the_ct_grid_for_nibabel_and_simpleitk(data_dir, ct_path, tmp_path):
    """case: -o liver.nii.gz (NRRD bytes under a NIfTI name before) -> a real NIfTI label map: nibabel and SimpleITK
    read the mask's voxels at the CT's own affine"""
    import nibabel as nib
    import SimpleITK as sitk

    array, ijk_to_ras = read_volume(ct_path)
    mask = _liver(data_dir, array.shape)
    result = SegmentationResult("It is [SEG].", "liver", mask, _provenance())
    for name in ("liver.nii.gz", "liver.nii"):
        path = write_result(tmp_path / name, result, ijk_to_ras)
        source, written = nib.load(str(ct_path)), nib.load(str(path))
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
        assert written.shape == source.shape and written.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(written.dataobj), mask.transpose(2, 1, 0))
        assert written.header.get_intent()[0] == "label" and b"AI-generated" in written.header["descrip"].tobytes()
        provenance = json.loads(written.header.extensions[0].get_content())
        assert provenance["M3D.model"] == "GoodBaiBai88/M3D-LaMed-Phi-3-4B" and provenance["label"] == AI_LABEL
        source_itk, written_itk = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(path))
        np.testing.assert_allclose(written_itk.GetOrigin(), source_itk.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written_itk.GetSpacing(), source_itk.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(written_itk.GetDirection(), source_itk.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written_itk), mask)
    with open(tmp_path / "liver.nii.gz", "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # gzip, as the extension says


def test_nifti_of_a_dicom_series_keeps_the_series_grid(data_dir, tmp_path):
    import SimpleITK as sitk

    folder = data_dir / "example_ct_dicom"
    array, ijk_to_ras = read_volume(folder)
    mask = np.zeros(array.shape, np.uint8)
    mask[3:9, 200:260, 100:220] = 1
    path = write_result(tmp_path / "m.nii.gz", SegmentationResult("", "x", mask, _provenance()), ijk_to_ras)
    back, back_matrix = read_volume(path)
    np.testing.assert_array_equal(back, mask)
    np.testing.assert_allclose(back_matrix, ijk_to_ras, atol=1e-4)
    assert sitk.ReadImage(str(path)).GetSize() == (512, 512, 20)


def test_dicom_seg_references_the_source_series_and_reads_back(dicom_series, data_dir, tmp_path):
    """case: -o liver.dcm for a DICOM series -> a DICOM SEG (highdicom) referencing the source series and instances,
    SNOMED-coded liver, algorithm M3D-LaMed with the model revision, "AI-generated"; highdicom and pydicom read back
    the mask on the source frames"""
    import highdicom as hd
    import pydicom

    array, ijk_to_ras = read_volume(dicom_series)
    labels, _ = read_volume(data_dir / "example_seg_dicom.nii.gz")
    mask = (labels == 5).astype(np.uint8)
    assert mask.shape == array.shape and mask.any()
    result = SegmentationResult("It is [SEG].", "liver", mask, _provenance())
    path = write_result(tmp_path / "liver.dcm", result, ijk_to_ras, source_path=dicom_series)

    seg = hd.seg.segread(str(path))
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in dicom_series_files(dicom_series)]
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} <= \
        {s.SOPInstanceUID for s in sources}
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "liver" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED CT liver
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "M3D-LaMed" and algorithm.AlgorithmVersion == "0123abc"
    assert "AI-generated" in seg.SeriesDescription and "AI-generated" in seg.ContentDescription
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
                                               segment_numbers=[1], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(pixels[..., 0], mask)
    plain = pydicom.dcmread(str(path))  # a plain DICOM reader sees a valid Segmentation Storage object
    assert plain.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and plain.Modality == "SEG"


def test_unknown_structures_get_the_generic_code(dicom_series, tmp_path):
    import highdicom as hd

    from M3DAssistantLib.outputs.dicom_seg import structure_codes

    assert structure_codes("Left kidney")[1].value == structure_codes("kidney_right")[1].value == "64033007"
    array, ijk_to_ras = read_volume(dicom_series)
    mask = np.zeros(array.shape, np.uint8)
    mask[4:6, 250:260, 250:260] = 1
    path = write_result(tmp_path / "x.dcm", SegmentationResult("", "the cyst in the right kidney", mask,
                                                               _provenance()), ijk_to_ras, source_path=dicom_series)
    segment = hd.seg.segread(str(path)).SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"
    assert segment.SegmentLabel == "the cyst in the right kidney"


def test_dicom_seg_is_refused_before_the_model_for_non_dicom_or_uid_less_input(monkeypatch, ct_path, data_dir,
                                                                               tmp_path, capsys):
    """case: -o mask.dcm for a NIfTI input, or for a DICOM series anonymised without UIDs -> refused before the
    model loads, naming .nii.gz / .seg.nrrd instead"""
    monkeypatch.setattr(cli, "_engine", lambda args, bar: pytest.fail("the model was loaded"))
    assert cli.main(["segment", str(ct_path), "liver", "-o", str(tmp_path / "liver.dcm"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs a DICOM input" in err and ".nii.gz" in err
    assert cli.main(["segment", str(data_dir / "example_ct_dicom"), "liver", "-o", str(tmp_path / "liver.dcm"),
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "StudyInstanceUID" in err and "anonymised without UIDs" in err and not list(tmp_path.iterdir())


def test_provenance_survives_slicers_loaders(headless_slicer, ct_path, tmp_path):
    """case: a .mrk.json / .seg.nrrd loaded into a scene (Slicer's reader drops markups node attributes) -> the
    loaded ROI's control point and the loaded segment's tags still say AI-generated and which model, as JSON"""
    import vtk

    from M3DAssistantLib.geometry import RasRoi
    from M3DAssistantLib.outputs.markups import parse_provenance_description

    scene, logics = headless_slicer
    array, ijk_to_ras = read_volume(ct_path)
    box = BoxResult("[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]", "liver", (0.1, 0.2, 0.3, 0.5, 0.6, 0.7),
                    RasRoi(center=np.array([1.0, 2.0, 3.0]), size=np.array([40.0, 50.0, 60.0]), axes=np.eye(3)),
                    _provenance("rec"))
    roi_path = write_result(tmp_path / "liver.mrk.json", box)
    roi = scene.GetNodeByID(logics["markups"].LoadMarkups(str(roi_path)))
    assert roi.GetAttribute("M3D.model") is None  # what Slicer's reader drops ...
    description = roi.GetNthControlPointDescription(0)
    assert description.startswith(AI_LABEL)  # ... and what a reader sees in the Markups module
    kept = parse_provenance_description(description)
    assert kept["M3D.model"] == "GoodBaiBai88/M3D-LaMed-Phi-3-4B" and kept["M3D.model_revision"] == "0123abc"
    assert json.loads(kept["M3D.sampling"]) == {"max_new_tokens": 8}  # JSON values, not Python reprs

    mask = np.zeros(array.shape, np.uint8)
    mask[10:20, 30:60, 40:80] = 1
    seg_path = write_result(tmp_path / "liver.seg.nrrd", SegmentationResult("", "liver", mask, _provenance()),
                            ijk_to_ras)
    node = logics["segmentations"].LoadSegmentationFromFile(str(seg_path), False)
    segment = node.GetSegmentation().GetSegment(node.GetSegmentation().GetSegmentIdBySegmentName("liver"))
    for key, expected in (("M3D.label", AI_LABEL), ("M3D.model", "GoodBaiBai88/M3D-LaMed-Phi-3-4B"),
                          ("M3D.model_revision", "0123abc")):
        value = vtk.reference("")
        assert segment.GetTag(key, value) and str(value) == expected
    value = vtk.reference("")
    assert segment.GetTag("M3D.sampling", value) and json.loads(str(value)) == {"max_new_tokens": 8}


def test_cli_segment_writes_every_mask_format(monkeypatch, tiny_phi3_model, dicom_series, tmp_path, capsys):
    from forcing import force_answer

    from M3DAssistantLib.engine import InferenceEngine

    restore = []

    def make_engine(args, bar):
        engine = InferenceEngine(tiny_phi3_model)
        restore.append(force_answer(engine, " It is [SEG]."))
        return engine

    monkeypatch.setattr(cli, "_engine", make_engine)
    try:
        for name in ("liver.nii.gz", "liver.dcm", "liver.seg.nrrd"):
            code = cli.main(["segment", str(dicom_series), "liver", "-o", str(tmp_path / name), "--quiet",
                             "--max-new-tokens", "8"])
            assert code == 0, capsys.readouterr().err
            restore.pop()()
    finally:
        for undo in restore:
            undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liver.dcm", "liver.nii.gz", "liver.seg.nrrd"]
    shutil.rmtree(tmp_path)


def test_dicom_sr_holds_the_box_as_a_3d_region_of_the_series(dicom_series, tmp_path):
    """case: -o box.sr.dcm for a DICOM series -> a Comprehensive 3D SR (TID 1500) whose volumetric ROI is the box's
    six faces in the series' frame of reference, coded finding, algorithm and revision, "AI-generated"; read back
    with highdicom and pydicom, the corners are the box's"""
    import highdicom as hd
    import pydicom

    from M3DAssistantLib.geometry import RasRoi

    array, ijk_to_ras = read_volume(dicom_series)
    axes = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])  # an oblique box
    roi = RasRoi(center=np.array([-10.0, 200.0, -790.0]), size=np.array([60.0, 50.0, 20.0]), axes=axes)
    box = BoxResult("[...]", "liver", (0.1, 0.2, 0.3, 0.5, 0.6, 0.7), roi, _provenance("rec"))
    path = write_result(tmp_path / "liver.sr.dcm", box, ijk_to_ras, source_path=dicom_series)

    plain = pydicom.dcmread(str(path))
    assert plain.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and plain.Modality == "SR"  # Comprehensive 3D SR
    assert "AI-generated" in plain.SeriesDescription
    source = pydicom.dcmread(str(dicom_series_files(dicom_series)[0]), stop_before_pixels=True)
    assert plain.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == \
        source.SeriesInstanceUID
    report = hd.sr.srread(str(path))
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    assert group.finding_type.value == "10200004" and group.reference_type.meaning == "Volume Surface"
    text = str(plain)  # algorithm name and version in the measurement group
    assert "M3D-LaMed" in text and "0123abc" in text
    surface = group.roi
    assert surface.frame_of_reference_uid == source.FrameOfReferenceUID
    corners_lps = np.unique(np.round(np.concatenate(list(surface.graphic_data)), 6), axis=0)
    corners_ras = [roi.center + axes @ ((2 * np.array(s) - 1) * roi.size / 2) for s in np.ndindex(2, 2, 2)]
    expected_lps = np.unique(np.round([[-c[0], -c[1], c[2]] for c in corners_ras], 6), axis=0)
    assert len(expected_lps) == len(corners_lps) == 8
    np.testing.assert_allclose(corners_lps, expected_lps, atol=1e-4)


def test_a_box_as_dcm_names_sr_dcm(no_model_cli, ct_path, tmp_path, capsys):
    assert cli.main(["locate", str(ct_path), "liver", "-o", str(tmp_path / "liver.dcm")]) == 2
    err = capsys.readouterr().err
    assert "a .dcm file holds a mask" in err and ".sr.dcm" in err


@pytest.fixture
def no_model_cli(monkeypatch):
    monkeypatch.setattr(cli, "_engine", lambda args, bar: pytest.fail("the model was loaded"))
