"""outputs: .seg.nrrd and .mrk.json files that the real Slicer (slicer-core) reads back with the right names, colours,
geometry and voxels; atomic writes that never overwrite a user's file and leave nothing behind when they fail."""

from __future__ import annotations

import errno
import gzip
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from slicer_files import assert_slicer_reads, reference_volume, segments_by_name, tag

from M3DAssistantLib import outputs
from M3DAssistantLib.errors import InputError, M3DError
from M3DAssistantLib.outputs import (
    OutputWriteError,
    unique_path,
    write_json,
    write_roi,
    write_roi_markups_json,
    write_segmentation_nrrd,
    write_text,
)

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix from angles in degrees about x, then y, then z (numpy only, independent of the code)."""
    ax, ay, az = np.radians([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return z @ y @ x


def oblique_ijk_to_ras() -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation(20, -35, 50) * np.array([0.7, 1.3, 2.9])  # columns scaled: anisotropic spacing
    m[:3, 3] = [12.5, -40.25, 7.0]
    return m


def read_nrrd(path: Path) -> tuple[dict[str, str], dict[str, str], np.ndarray]:
    """Minimal independent NRRD reader: (fields, key/values, data as written, fastest axis last)."""
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    fields, keyvalues = {}, {}
    for line in head.decode("utf-8").split("\n")[1:]:
        if line.startswith("#"):
            continue
        if ":=" in line:
            k, v = line.split(":=", 1)
            keyvalues[k] = v
        else:
            k, v = line.split(": ", 1)
            fields[k] = v
    assert fields["type"] in ("unsigned char", "uchar")
    data = gzip.decompress(body) if fields["encoding"] == "gzip" else body
    sizes = [int(s) for s in fields["sizes"].split()]
    return fields, keyvalues, np.frombuffer(data, dtype=np.uint8).reshape(sizes[::-1])


def parse_vectors(text: str) -> list[np.ndarray]:
    return [np.array([float(c) for c in v.strip("()").split(",")]) for v in text.split() if v != "none"]


def segment_fields(kv: dict[str, str]) -> dict[str, dict[str, str]]:
    """{segment name: {"Color": ..., "LabelValue": ..., ...}} from Segment<N>_<Key> fields."""
    by_index: dict[str, dict[str, str]] = {}
    for k, v in kv.items():
        if k.startswith("Segment") and not k.startswith("Segmentation_"):
            idx, key = k[len("Segment"):].split("_", 1)
            by_index.setdefault(idx, {})[key] = v
    return {d["Name"]: d for d in by_index.values()}


# ---------------------------------------------------------------------------------------------------------------------
# .seg.nrrd read by Slicer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_and_organs(ct_path, data_dir, labels_total):
    """Real CT (KJI + IJK->RAS as read_volume gives) and TotalSegmentator's liver/spleen/kidney masks on its grid."""
    pytest.importorskip("SimpleITK")
    from M3DAssistantLib.volume_io import read_volume

    ct, ijk_to_ras = read_volume(ct_path)
    seg, seg_ijk_to_ras = read_volume(data_dir / "example_seg.nii.gz")
    np.testing.assert_allclose(seg_ijk_to_ras, ijk_to_ras, atol=1e-4)
    by_name = {v: k for k, v in labels_total.items()}
    masks = {name: (seg == by_name[name]).astype(np.uint8) for name in ("liver", "spleen", "kidney_right")}
    assert all(m.sum() > 100 for m in masks.values())
    return ct, ijk_to_ras, masks


@pytest.mark.slicer
def test_real_ct_organs_load_in_slicer(headless_slicer, ct_and_organs, ct_path, tmp_path):
    _, logics = headless_slicer
    import slicer
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    ct, ijk_to_ras, masks = ct_and_organs
    colors = {"spleen": (0.1, 0.2, 0.9)}
    attributes = {"M3D.model": "GoodBaiBai88/M3D-LaMed-Phi-3-4B", "M3D.label": "AI-generated, not for clinical use"}
    out = write_segmentation_nrrd(tmp_path / "organs.seg.nrrd", masks, ijk_to_ras, colors=colors,
                                  attributes=attributes)
    assert out == tmp_path / "organs.seg.nrrd"

    expected_colors = {"spleen": colors["spleen"], "liver": np.array([221, 130, 101]) / 255,
                       "kidney_right": np.array([185, 102, 83]) / 255}  # Slicer's GenericAnatomyColors
    seg = assert_slicer_reads(logics, out, masks, ijk_to_ras, expected_colors)
    for _, segment in segments_by_name(seg).values():
        assert tag(segment, "M3D.label") == "AI-generated, not for clinical use"

    # The same voxels against the CT as Slicer itself loads it (its own reader, its own IJK->RAS).
    ct_node = logics["volumes"].AddArchetypeVolume(str(ct_path), "ct", 0)
    m = vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(m)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(m), ijk_to_ras, atol=1e-4)
    liver_id = segments_by_name(seg)["liver"][0]
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, liver_id, ct_node) != 0,
                                  masks["liver"] != 0)

    # Non-overlapping organs share one 3D labelmap with label values 1..N, as Slicer stores them.
    fields, kv, data = read_nrrd(out)
    assert fields["dimension"] == "3" and data.shape == ct.shape
    segs = segment_fields(kv)
    assert {s["Layer"] for s in segs.values()} == {"0"}
    assert sorted(int(s["LabelValue"]) for s in segs.values()) == [1, 2, 3]
    for name, mask in masks.items():
        np.testing.assert_array_equal(data == int(segs[name]["LabelValue"]), mask != 0)


@pytest.mark.slicer
@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "overlapping"])
def test_oblique_anisotropic_volume_loads_in_slicer(headless_slicer, tmp_path, overlap):
    _, logics = headless_slicer
    m = oblique_ijk_to_ras()
    shape = (9, 11, 13)
    a = np.zeros(shape, np.uint8)
    a[2:5, 3:8, 4:10] = 1
    b = np.zeros(shape, np.uint8)
    b[5:8, 6:10, 1:6] = 1
    if overlap:
        b[4, 7, 5] = 1  # one shared voxel is enough to need a second layer
    c = np.zeros(shape, bool)
    c[0, 0, 12] = True  # a corner voxel: off-by-one and axis-order mistakes show here
    masks = {"liver": a, "lesion 1": b, "corner": c}
    out = write_segmentation_nrrd(tmp_path / "oblique.seg.nrrd", masks, m)
    assert_slicer_reads(logics, out, masks, m)

    fields, kv, data = read_nrrd(out)
    segs = segment_fields(kv)
    if overlap:
        assert fields["dimension"] == "4" and fields["kinds"] == "list domain domain domain"
        assert data.shape == shape + (2,)
        assert segs["liver"]["Layer"] != segs["lesion 1"]["Layer"]
    else:
        assert fields["dimension"] == "3" and data.shape == shape
        assert {s["Layer"] for s in segs.values()} == {"0"}
    # Header in LPS: space directions/origin are the IJK->RAS columns with x and y negated.
    lps = LPS @ m
    directions = parse_vectors(fields["space directions"])
    for axis in range(3):
        np.testing.assert_allclose(directions[axis], lps[:3, axis], rtol=0, atol=1e-12)
    np.testing.assert_allclose(parse_vectors(fields["space origin"])[0], lps[:3, 3], atol=1e-12)
    assert fields["space"] == "left-posterior-superior"


@pytest.mark.slicer
def test_header_matches_what_slicer_writes(headless_slicer, tmp_path):
    """Write the same segments with Slicer's own vtkMRMLSegmentationStorageNode and compare field by field."""
    scene, _ = headless_slicer
    import slicer

    m = oblique_ijk_to_ras()
    shape = (6, 7, 8)
    a = np.zeros(shape, np.uint8)
    a[1:3, 2:5, 3:7] = 1
    b = np.zeros(shape, np.uint8)
    b[3:6, 0:3, 0:4] = 1
    b[2, 3, 4] = 1  # overlaps a: two layers
    masks = {"liver": a, "spleen": b}
    colors = {"liver": (1.0, 0.0, 0.0), "spleen": (0.0, 0.5, 0.25)}

    ref = reference_volume(a, m)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ref)
    for name, mask in masks.items():
        seg.GetSegmentation().AddEmptySegment(name, name, list(colors[name]))
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, name, ref)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(seg)

    ours = write_segmentation_nrrd(tmp_path / "ours.seg.nrrd", masks, m, colors=colors)
    f_slicer, kv_slicer, d_slicer = read_nrrd(tmp_path / "slicer.seg.nrrd")
    f_ours, kv_ours, d_ours = read_nrrd(ours)

    for key in ("type", "dimension", "space", "sizes", "kinds", "encoding"):
        assert f_ours[key] == f_slicer[key], key
    for v_ours, v_slicer in zip(parse_vectors(f_ours["space directions"]), parse_vectors(f_slicer["space directions"])):
        np.testing.assert_allclose(v_ours, v_slicer, atol=1e-9)
    np.testing.assert_allclose(parse_vectors(f_ours["space origin"])[0], parse_vectors(f_slicer["space origin"])[0],
                               atol=1e-9)
    np.testing.assert_array_equal(d_ours, d_slicer)
    for key in ("Segmentation_MasterRepresentation", "Segmentation_ContainedRepresentationNames",
                "Segmentation_ReferenceImageExtentOffset"):
        assert kv_ours[key] == kv_slicer[key], key
    s_ours, s_slicer = segment_fields(kv_ours), segment_fields(kv_slicer)
    assert sorted(s_ours) == sorted(s_slicer)
    for name in s_ours:
        for key in ("ID", "Name", "LabelValue", "Layer"):
            assert s_ours[name][key] == s_slicer[name][key], (name, key)
        np.testing.assert_allclose([float(x) for x in s_ours[name]["Color"].split()],
                                   [float(x) for x in s_slicer[name]["Color"].split()], atol=1e-6)
        assert s_ours[name]["Tags"].startswith(s_slicer[name]["Tags"].rstrip("|"))
    # Our reference geometry conversion parameter is the one Slicer serialises for the volume.
    def reference_geometry(kv):
        params = dict(p.split("|")[:2] for p in kv["Segmentation_ConversionParameters"].split("&") if p)
        return [float(x) for x in params["Reference image geometry"].strip(";").split(";")]

    np.testing.assert_allclose(reference_geometry(kv_ours), reference_geometry(kv_slicer), atol=1e-9)


@pytest.mark.slicer
def test_attributes_and_empty_segment(headless_slicer, tmp_path):
    _, logics = headless_slicer
    sitk = pytest.importorskip("SimpleITK")
    m = np.diag([0.8, 0.9, 2.5, 1.0])
    m[:3, 3] = [10, 20, -30]
    shape = (5, 6, 7)
    a = np.zeros(shape, np.uint8)
    a[1:3, 2:4, 3:5] = 1
    prompt = 'Where is the liver? | answer with a box\nsecond line \\ backslash'
    out = write_segmentation_nrrd(tmp_path / "x.seg.nrrd", {"liver": a, "nothing found": np.zeros(shape, np.uint8)},
                                  m, attributes={"M3D.prompt": prompt, "M3D.seed": 3})
    seg = assert_slicer_reads(logics, out, {"liver": a, "nothing found": np.zeros(shape, np.uint8)}, m)
    # Exact in the NRRD key/values (read by ITK's NRRD reader); Slicer's segment tags keep a readable copy.
    image = sitk.ReadImage(str(out))
    assert image.GetMetaData("M3D.prompt") == prompt
    assert image.GetMetaData("M3D.seed") == "3"
    assert tag(segments_by_name(seg)["liver"][1], "M3D.prompt") == prompt.replace("|", "/").replace("\n", " ")
    # SimpleITK agrees on the geometry too (LPS origin and spacing).
    np.testing.assert_allclose(image.GetOrigin(), (LPS @ m)[:3, 3])
    np.testing.assert_allclose(image.GetSpacing(), [0.8, 0.9, 2.5])


def test_default_colours_are_anatomical_or_distinct():
    names = ["Liver", "kidney_left", "left kidney", "thing A", "thing B", "thing C"]
    colors = outputs.default_colors(names)
    assert np.allclose(colors["Liver"], np.array([221, 130, 101]) / 255)
    assert np.allclose(colors["kidney_left"], np.array([185, 102, 83]) / 255)
    assert colors["kidney_left"] == colors["left kidney"]
    others = [colors[n] for n in ("thing A", "thing B", "thing C")]
    assert len(set(others)) == 3 and colors["Liver"] not in others
    assert outputs.parse_color((255, 0, 0)) == (1.0, 0.0, 0.0)
    assert outputs.parse_color("#00ff00") == (0.0, 1.0, 0.0)
    assert outputs.parse_color((0.5, 0.5, 0.5)) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("case", ["empty", "float", "2d", "shapes", "matrix", "singular", "colour_name", "colour",
                                  "name", "attribute"])
def test_segmentation_bad_input(tmp_path, case):
    ok = np.zeros((2, 3, 4), np.uint8)
    kwargs: dict = {"masks": {"a": ok}, "ijk_to_ras": np.eye(4)}
    if case == "empty":
        kwargs["masks"] = {}
    elif case == "float":
        kwargs["masks"] = {"a": ok.astype(np.float32)}
    elif case == "2d":
        kwargs["masks"] = {"a": ok[0]}
    elif case == "shapes":
        kwargs["masks"] = {"a": ok, "b": np.zeros((2, 3, 5), np.uint8)}
    elif case == "matrix":
        kwargs["ijk_to_ras"] = np.eye(3)
    elif case == "singular":
        kwargs["ijk_to_ras"] = np.diag([1.0, 0.0, 1.0, 1.0])
    elif case == "colour_name":
        kwargs["colors"] = {"b": (1, 0, 0)}
    elif case == "colour":
        kwargs["colors"] = {"a": (1, 0)}
    elif case == "name":
        kwargs["masks"] = {"two\nlines": ok}
    elif case == "attribute":
        kwargs["attributes"] = {"Segment0_Name": "x"}
    with pytest.raises(InputError):
        write_segmentation_nrrd(tmp_path / "x.seg.nrrd", **kwargs)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# ROI markups JSON read by Slicer
# ---------------------------------------------------------------------------------------------------------------------


def roi_node_geometry(node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import slicer

    center = [0.0, 0.0, 0.0]
    node.GetCenterWorld(center)
    object_to_node = slicer.util.arrayFromVTKMatrix(node.GetObjectToNodeMatrix())
    return np.array(center), np.array(node.GetSize()), object_to_node[:3, :3]


@pytest.mark.slicer
def test_oblique_roi_loads_in_slicer(headless_slicer, tmp_path):
    scene, logics = headless_slicer
    axes = rotation(-25, 10, 30)
    center, size = np.array([10.0, -20.0, 35.5]), np.array([40.0, 25.0, 12.0])
    out = write_roi_markups_json(tmp_path / "liver box.mrk.json", center, size, axes, "liver box",
                                 attributes={"M3D.label": "AI-generated, not for clinical use"})
    node_id = logics["markups"].LoadMarkups(str(out))
    assert node_id, "Slicer could not load the ROI"
    node = scene.GetNodeByID(node_id)
    assert node.GetClassName() == "vtkMRMLMarkupsROINode"
    assert node.GetName() == "liver box"
    got_center, got_size, got_axes = roi_node_geometry(node)
    np.testing.assert_allclose(got_center, center, atol=1e-9)
    np.testing.assert_allclose(got_size, size, atol=1e-9)
    np.testing.assert_allclose(got_axes, axes, atol=1e-9)
    # Points inside/outside agree with the box maths: a point just inside each face along an oblique axis.
    for c in range(3):
        for sign in (-1, 1):
            inside = center + sign * 0.49 * size[c] * axes[:, c]
            outside = center + sign * 0.51 * size[c] * axes[:, c]
            assert node.IsPointInROIWorld(list(inside)) and not node.IsPointInROIWorld(list(outside))
    doc = json.loads(out.read_text())
    assert doc["markups"][0]["coordinateSystem"] == "LPS"
    assert doc["markups"][0]["attributes"]["M3D.label"] == "AI-generated, not for clinical use"


@pytest.mark.slicer
def test_roi_matches_what_slicer_writes(headless_slicer, tmp_path):
    scene, _ = headless_slicer
    import vtk

    axes = rotation(15, -40, 70)
    center, size = np.array([-3.0, 8.5, 120.0]), np.array([5.0, 6.0, 7.0])
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    node.SetSize(*size)
    mat = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            mat.SetElement(r, c, axes[r, c])
        mat.SetElement(r, 3, center[r])
    node.GetObjectToNodeMatrix().DeepCopy(mat)
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "slicer.mrk.json"))
    assert storage.WriteData(node)
    theirs = json.loads((tmp_path / "slicer.mrk.json").read_text())["markups"][0]
    ours = json.loads(write_roi_markups_json(tmp_path / "ours.mrk.json", center, size, axes, "box").read_text())
    ours = ours["markups"][0]
    for key in ("type", "coordinateSystem", "roiType", "insideOut"):
        assert ours[key] == theirs[key], key
    for key in ("center", "orientation", "size"):
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-9, err_msg=key)
    np.testing.assert_allclose(ours["controlPoints"][0]["position"], theirs["controlPoints"][0]["position"],
                               atol=1e-9)


@pytest.mark.slicer
def test_write_roi_from_rasroi(headless_slicer, tmp_path):
    scene, logics = headless_slicer
    from M3DAssistantLib.geometry import RasRoi

    roi = RasRoi(center=[1.0, 2.0, 3.0], size=[4.0, 5.0, 6.0], axes=rotation(0, 0, 33))
    out = write_roi(tmp_path / "r.mrk.json", roi, "found")
    node = scene.GetNodeByID(logics["markups"].LoadMarkups(str(out)))
    got_center, got_size, got_axes = roi_node_geometry(node)
    np.testing.assert_allclose(got_center, roi.center, atol=1e-9)
    np.testing.assert_allclose(got_size, roi.size, atol=1e-9)
    np.testing.assert_allclose(got_axes, roi.axes, atol=1e-9)
    assert np.all([node.IsPointInROIWorld(list(p * 0.999 + roi.center * 0.001)) for p in roi.corners()])


@pytest.mark.slicer
def test_left_handed_roi_axes_give_the_same_box(headless_slicer, tmp_path):
    """Axes taken from an LPS-ordered volume are left-handed; Slicer needs a rotation, and the box is the same."""
    scene, logics = headless_slicer
    axes = rotation(10, 20, 30) @ np.diag([-1.0, 1.0, 1.0])
    center, size = np.array([5.0, 6.0, 7.0]), np.array([10.0, 20.0, 30.0])
    out = write_roi_markups_json(tmp_path / "lh.mrk.json", center, size, axes, "lh")
    node = scene.GetNodeByID(logics["markups"].LoadMarkups(str(out)))
    got_center, got_size, got_axes = roi_node_geometry(node)
    assert np.linalg.det(got_axes) == pytest.approx(1.0)
    np.testing.assert_allclose(got_center, center, atol=1e-9)
    np.testing.assert_allclose(got_size, size, atol=1e-9)
    np.testing.assert_allclose(np.abs(got_axes.T @ axes), np.eye(3), atol=1e-9)  # same edges, up to direction


@pytest.mark.parametrize("bad", [{"center_ras": [0, 0]}, {"size": [1, -1, 1]}, {"axes_ras": np.diag([1, 1, 2])},
                                 {"center_ras": [0, np.nan, 0]}, {"name": "two\nlines"}],
                         ids=["center", "size", "not-orthonormal", "nan", "name"])
def test_roi_bad_input(tmp_path, bad):
    args = {"center_ras": [0, 0, 0], "size": [1, 1, 1], "axes_ras": np.eye(3), "name": "r"} | bad
    with pytest.raises(InputError):
        write_roi_markups_json(tmp_path / "r.mrk.json", **args)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes, no overwriting
# ---------------------------------------------------------------------------------------------------------------------


def writers():
    mask = {"a": np.ones((2, 2, 2), np.uint8)}
    return {
        "seg": lambda p, **kw: write_segmentation_nrrd(p, mask, np.eye(4), **kw),
        "roi": lambda p, **kw: write_roi_markups_json(p, [0, 0, 0], [1, 1, 1], None, "r", **kw),
        "json": lambda p, **kw: write_json(p, {"answer": "yes"}, **kw),
        "text": lambda p, **kw: write_text(p, "the answer\n", **kw),
    }


@pytest.mark.parametrize("kind", ["seg", "roi", "json", "text"])
def test_never_overwrites_without_permission(tmp_path, kind):
    target = tmp_path / "result.out"
    target.write_text("user data")
    with pytest.raises(InputError) as info:
        writers()[kind](target)
    assert str(target) in str(info.value) and "overwrite=True" in str(info.value)
    assert target.read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.out"]
    writers()[kind](target, overwrite=True)
    assert target.read_bytes() != b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.out"]


def test_unique_path(tmp_path):
    p = tmp_path / "liver.seg.nrrd"
    assert unique_path(p) == p
    p.write_text("x")
    assert unique_path(p) == tmp_path / "liver (2).seg.nrrd"
    (tmp_path / "liver (2).seg.nrrd").write_text("x")
    assert unique_path(p) == tmp_path / "liver (3).seg.nrrd"
    (tmp_path / "answer.txt").write_text("x")
    assert unique_path(tmp_path / "answer.txt") == tmp_path / "answer (2).txt"
    (tmp_path / "README").write_text("x")
    assert unique_path(tmp_path / "README") == tmp_path / "README (2)"
    (tmp_path / "roi.mrk.json").write_text("x")
    assert unique_path(tmp_path / "roi.mrk.json") == tmp_path / "roi (2).mrk.json"


class _DiskFull:
    """A file object that accepts ``budget`` bytes, then fails as a full disk does."""

    def __init__(self, real, budget: int):
        self.real, self.budget = real, budget

    def write(self, b):
        if len(b) > self.budget:
            self.real.write(bytes(b)[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(b)
        return self.real.write(b)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


@pytest.mark.parametrize("kind", ["seg", "roi", "json", "text"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
@pytest.mark.parametrize("when", ["first-bytes", "last-byte"])
def test_disk_full_leaves_nothing_half_written(tmp_path, monkeypatch, kind, existing, when):
    full_size = writers()[kind](tmp_path / "complete.out").stat().st_size
    (tmp_path / "complete.out").unlink()
    target = tmp_path / "result.out"
    if existing:
        target.write_text("previous result")
    budget = 10 if when == "first-bytes" else full_size - 1
    real_fdopen = os.fdopen
    monkeypatch.setattr(outputs.atomic.os, "fdopen", lambda fd, *a, **k: _DiskFull(real_fdopen(fd, *a, **k), budget))
    with pytest.raises(OutputWriteError) as info:
        writers()[kind](target, overwrite=existing)
    assert isinstance(info.value, M3DError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC
    assert str(target) in str(info.value) and "disk space" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["result.out"] if existing else [])
    if existing:
        assert target.read_text() == "previous result"


def test_interrupt_and_fsync_failure_leave_no_temp_file(tmp_path, monkeypatch):
    def chunks():
        yield b"first part"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outputs.atomic_write_bytes(tmp_path / "a.bin", chunks())
    assert list(tmp_path.iterdir()) == []

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(outputs.atomic.os, "fsync", failing_fsync)
    with pytest.raises(OutputWriteError):
        write_text(tmp_path / "b.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_file_appearing_during_the_write_is_not_replaced(tmp_path):
    target = tmp_path / "race.txt"

    def chunks():
        yield b"ours"
        target.write_text("someone else's")  # created after the up-front check, before the rename

    with pytest.raises(InputError):
        outputs.atomic_write_bytes(target, chunks())
    assert target.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.txt"]


def test_missing_folder_and_directory_target(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_text(tmp_path / "no" / "such" / "a.txt", "x")
    with pytest.raises(InputError, match="folder"):
        write_text(tmp_path, "x", overwrite=True)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_ordinary_permissions(tmp_path):
    p = write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    p.chmod(0o640)
    write_text(p, "y", overwrite=True)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640  # a replaced file keeps its permissions


def test_json_and_text_content(tmp_path):
    from M3DAssistantLib.geometry import RasRoi

    data = {"box": np.array([0.1, 0.2, 0.3]), "n": np.int64(3), "path": tmp_path, "roi": RasRoi([0, 0, 0], [1, 1, 1]),
            "text": "naïve [ 1, 2 ] ✓"}
    p = write_json(tmp_path / "a.json", data)
    back = json.loads(p.read_text(encoding="utf-8"))
    assert back["box"] == [0.1, 0.2, 0.3] and back["n"] == 3 and back["path"] == str(tmp_path)
    assert back["roi"]["size"] == [1.0, 1.0, 1.0] and back["text"] == data["text"]
    assert '"box": [0.1, 0.2, 0.3]' in p.read_text(encoding="utf-8")
    with pytest.raises(InputError, match="NaN"):
        write_json(tmp_path / "b.json", {"x": float("nan")})
    with pytest.raises(InputError):
        write_json(tmp_path / "c.json", {"x": object()})
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.json"]
    t = write_text(tmp_path / "r.txt", "line 1\r\nline 2 — ünïcode\n")
    assert t.read_bytes() == "line 1\r\nline 2 — ünïcode\n".encode()


def test_read_roi_inverts_write_roi_for_an_oblique_box(tmp_path):
    from M3DAssistantLib.geometry import RasRoi
    from M3DAssistantLib.outputs import read_roi, write_roi

    angle = np.deg2rad(25)
    axes = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    roi = RasRoi(center=np.array([-12.5, 40.0, 7.25]), size=np.array([30.0, 20.0, 10.0]), axes=axes)
    path = write_roi(tmp_path / "box.mrk.json", roi, "box")
    back = read_roi(path)
    np.testing.assert_allclose(back.center, roi.center, atol=1e-9)
    np.testing.assert_allclose(back.size, roi.size, atol=1e-9)
    np.testing.assert_allclose(back.axes, roi.axes, atol=1e-9)


def test_read_roi_without_roi_is_a_clear_error(tmp_path):
    from M3DAssistantLib.errors import InputError
    from M3DAssistantLib.outputs import read_roi

    path = tmp_path / "points.mrk.json"
    path.write_text('{"markups": [{"type": "Fiducial", "controlPoints": []}]}')
    with pytest.raises(InputError, match="no ROI markup"):
        read_roi(path)


# ---------------------------------------------------------------------------------------------------------------------
# write_result: the extension picks the format
# ---------------------------------------------------------------------------------------------------------------------


def _results():
    from M3DAssistantLib.geometry import RasRoi
    from M3DAssistantLib.results import BoxResult, Provenance, SegmentationResult, TextResult

    def prov(task):
        return Provenance(task=task, model="fake", model_revision=None, dtype="float32", device="cpu", prompt="")

    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[1:3, 2:4, 3:5] = 1
    roi = RasRoi(center=np.array([1.0, 2.0, 3.0]), size=np.array([4.0, 5.0, 6.0]))
    return {
        "text": TextResult("No abnormality.", prov("report")),
        "mask": SegmentationResult("It is [SEG].", "liver", mask, prov("segment")),
        "absent": SegmentationResult("Sorry, there is no liver.", "liver", None, prov("segment"), absent=True),
        "box": BoxResult("Coordinates are ...", "liver", (0.1, 0.2, 0.3, 0.5, 0.6, 0.7), roi, prov("locate")),
    }


def test_write_result_picks_the_format_by_extension(tmp_path, headless_slicer):
    from M3DAssistantLib.outputs import FORMATS, read_roi, write_result

    results = _results()
    m = np.diag([0.8, 0.8, 2.0, 1.0])
    seg = write_result(tmp_path / "liver.SEG.NRRD", results["mask"], m)  # case-insensitive
    scene, logics = headless_slicer
    node = logics["segmentations"].LoadSegmentationFromFile(str(seg), False)
    assert node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    assert write_result(tmp_path / "liver.nrrd", results["mask"], m).read_bytes().startswith(b"NRRD0004")
    np.testing.assert_allclose(read_roi(write_result(tmp_path / "liver.mrk.json", results["box"])).center,
                               [1.0, 2.0, 3.0])
    record = json.loads(write_result(tmp_path / "liver.json", results["box"]).read_text())
    assert record["roi_ras"]["center"] == [1.0, 2.0, 3.0] and record["provenance"]["task"] == "locate"
    text = write_result(tmp_path / "report.txt", results["text"]).read_text()
    assert text.startswith("No abnormality.") and text.rstrip().endswith("[AI-generated, not for clinical use]")
    assert write_result(tmp_path / "mask.txt", results["mask"]).read_text().startswith("It is [SEG].")
    assert write_result(tmp_path / "absent.seg.nrrd", results["absent"], m) is None  # nothing to write, no file
    assert not (tmp_path / "absent.seg.nrrd").exists()
    assert set(FORMATS) == {".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".dcm", ".mrk.json", ".sr.dcm", ".json", ".txt"}


def test_write_result_refuses_what_the_extension_cannot_hold(tmp_path):
    from M3DAssistantLib.outputs import format_for, write_result

    results = _results()
    with pytest.raises(InputError, match=r"unknown file extension; use \.seg\.nrrd .*\.txt"):
        write_result(tmp_path / "liver.vtk", results["mask"], np.eye(4))
    with pytest.raises(InputError, match=r"holds a mask, which a report result does not have; use \.json .*\.txt"):
        write_result(tmp_path / "report.seg.nrrd", results["text"])
    with pytest.raises(InputError, match=r"holds a box, which a segment result does not have"):
        write_result(tmp_path / "liver.mrk.json", results["mask"], np.eye(4))
    with pytest.raises(InputError, match="IJK-to-RAS"):
        write_result(tmp_path / "liver.seg.nrrd", results["mask"])
    with pytest.raises(InputError, match="unknown file extension"):
        format_for(tmp_path / ".json")  # a hidden file, not an extension
    assert sorted(tmp_path.iterdir()) == []  # nothing was written
    assert format_for("a.mrk.json").holds == "box" and format_for("a.json").holds == "record"
