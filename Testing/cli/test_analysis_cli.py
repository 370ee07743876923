"""The analysis options on the command line: flags from the registry, the evidence map and the mask's box as files
Slicer opens on the CT's grid, the numbers in the JSON and on stderr, bad files refused before the model loads."""

from __future__ import annotations

import json

import numpy as np

from M3DAssistantLib import cli, tasks


def test_every_option_of_the_registry_is_a_flag():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for task in tasks.STREAMING_TASKS:
        flags = {option for action in sub.choices[task.cli_command]._actions for option in action.option_strings}
        for option in task.options:
            expected = "--no-confidence" if option.name == "confidence" else option.cli_flag
            assert expected in flags, (task.key, option.name)
        assert ("--box-output" in flags) == task.segments


def test_segment_with_refinement_evidence_and_box(forced_cli, ct_path, tmp_path, capsys, headless_slicer):  # noqa: F811
    """One command: the refined mask, the evidence map as a volume Slicer loads on the CT's own grid, the mask's
    box as an ROI, and every number in the JSON."""
    from slicer import util

    from M3DAssistantLib.outputs import read_roi

    mask_path, map_path = tmp_path / "liver.seg.nrrd", tmp_path / "liver-evidence.nrrd"
    box_path = tmp_path / "liver box.mrk.json"
    code = forced_cli(" It is [SEG].", "segment", ct_path, "liver", "-o", mask_path, "--refine", "--evidence",
                      map_path, "--evidence-steps", "1", "--box-output", box_path, "--max-new-tokens", "8",
                      "--json", "--quiet")
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["refinement"]["zoom"] and data["measurements"]["volume_ml"] > 0
    assert data["confidence"]["mask"]["mean_probability"] > 0.5 and data["evidence"]["steps"] == 1
    assert data["provenance"]["analysis"]["refine"] is True and "mask" not in data  # masks are files, not JSON
    _, logics = headless_slicer
    ct = logics["volumes"].AddArchetypeVolume(str(ct_path), "ct")
    evidence = logics["volumes"].AddArchetypeVolume(str(map_path), "evidence")
    values = util.arrayFromVolume(evidence)
    assert values.shape == util.arrayFromVolume(ct).shape and values.dtype == np.float32
    assert 0 < np.abs(values).max() <= 1.0 + 1e-6
    ct_matrix, map_matrix = (util.arrayFromVTKMatrix(_ijk_to_ras(node)) for node in (ct, evidence))
    np.testing.assert_allclose(map_matrix, ct_matrix, atol=1e-6)
    roi = read_roi(box_path)
    np.testing.assert_allclose(roi.center, data["roi_ras"]["center"], atol=1e-6)


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


def test_evidence_as_nifti_and_the_numbers_on_stderr(forced_cli, ct_path, tmp_path, capsys):  # noqa: F811
    import nibabel

    from M3DAssistantLib.volume_io import read_volume

    path = tmp_path / "evidence.nii.gz"
    code = forced_cli(" B. Lung", "choose", ct_path, "Which organ?", "--choices", "Liver", "Lung", "Bone",
                      "--evidence", path, "--evidence-steps", "1", "--max-new-tokens", "6", "--quiet")
    assert code == 0
    err = capsys.readouterr().err
    assert "choice: B. Lung" in err and "B. Lung:" in err and "\u2190 answer" in err
    assert "mean token log-probability" in err and "evidence 1. slice" in err
    array, ijk_to_ras = read_volume(path)
    ct, ct_matrix = read_volume(ct_path)
    assert array.shape == ct.shape and np.allclose(ijk_to_ras, ct_matrix, atol=1e-4)
    assert nibabel.load(str(path)).header.get_xyzt_units()[0] == "mm"


def test_analysis_files_are_checked_before_the_model_loads(monkeypatch, ct_path, tmp_path, capsys):
    """case: --evidence or --box-output with a wrong extension, or a file that exists -> refused before the model
    loads, naming the extensions to use (or --overwrite); the existing file untouched"""
    loaded = []
    monkeypatch.setattr(cli, "_engine", lambda args, bar: loaded.append(1))
    for flag, name, message in (("--evidence", "map.seg.nrrd", "not a segmentation"),
                                ("--evidence", "map.png", "volume file"),
                                ("--box-output", "box.txt", "ending in .mrk.json")):
        code = cli.main(["segment", str(ct_path), "liver", flag, str(tmp_path / name)])
        assert code == 2 and message in capsys.readouterr().err
    existing = tmp_path / "exists.nrrd"
    existing.write_bytes(b"mine")
    assert cli.main(["report", str(ct_path), "--evidence", str(existing)]) == 2
    assert "exists" in capsys.readouterr().err and existing.read_bytes() == b"mine"
    assert loaded == []


def test_options_off_by_default_and_confidence_on(forced_cli, ct_path, capsys):  # noqa: F811
    assert forced_cli(" It is a liver.", "ask", ct_path, "What?", "--no-confidence", "--max-new-tokens", "4",
                      "--json", "--quiet") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["confidence"] is None and data["evidence"] is None
    assert data["provenance"]["analysis"]["confidence"] is False
