"""scene.py against real MRML (slicer-core): reading volume nodes (transforms, refusals), writing segments / ROIs /
text nodes with exact geometry, never overwriting anything, provenance, subject hierarchy, and a .mrb round trip."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from repo_paths import REPO

from M3DAssistantLib import AI_LABEL
from M3DAssistantLib.errors import GeometryError, InputError
from M3DAssistantLib.geometry import RasRoi, box_to_roi, to_model_input
from M3DAssistantLib.results import BoxResult, Provenance, SegmentationResult, TextResult

pytestmark = pytest.mark.slicer
slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from M3DAssistantLib import scene  # noqa: E402  (after the skip: scene's functions need slicer)

LIVER = 5  # TotalSegmentator label


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def provenance(task: str = "seg", prompt: str = "Can you segment the liver in this image?") -> Provenance:
    return Provenance(task=task, model="tiny/phi3", model_revision="local-abc", dtype="float32", device="cpu",
                      prompt=prompt, convention="m3d-seg-v1@v1", sampling={"max_new_tokens": 6}, seed=7)


def load_ct(logics, data_dir, name="ct"):
    return logics["volumes"].AddArchetypeVolume(str(data_dir / "example_ct_sm.nii.gz"), name)


def load_liver(logics, data_dir):
    labels = logics["volumes"].AddArchetypeVolume(str(data_dir / "example_seg.nii.gz"), "labels", 1)
    return (slicer.util.arrayFromVolume(labels) == LIVER).astype(np.uint8)


def matrix(node_getter) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node_getter(m)
    return slicer.util.arrayFromVTKMatrix(m)


def rotation(angle_deg: float, axis) -> np.ndarray:
    t = vtk.vtkTransform()
    t.RotateWXYZ(angle_deg, *axis)
    return slicer.util.arrayFromVTKMatrix(t.GetMatrix())[:3, :3]


def linear_transform_node(scene_, rotation_deg=25.0, axis=(1, 2, 3), translation=(10.0, -20.0, 30.0)):
    t = vtk.vtkTransform()
    t.Translate(*translation)
    t.RotateWXYZ(rotation_deg, *axis)
    node = scene_.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(t.GetMatrix())
    return node


def segment_mask(segmentation_node, segment_id, volume_node) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)


def segment_world_points(segmentation_node, segment_id) -> np.ndarray:
    """RAS (world of the segmentation node's own coordinates, then through its parent transform) of its voxels."""
    image = slicer.vtkOrientedImageData()
    assert segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    from vtkmodules.util import numpy_support

    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    scalars = image.GetPointData().GetScalars()
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(tuple(reversed(image.GetDimensions())))
    ext = image.GetExtent()
    k, j, i = np.nonzero(voxels == label)
    image_to_node = matrix(image.GetImageToWorldMatrix)
    points = (image_to_node @ np.stack([i + ext[0], j + ext[2], k + ext[4], np.ones_like(i)]))[:3].T
    parent = segmentation_node.GetParentTransformNode()
    if parent is not None:
        to_world = matrix(parent.GetMatrixTransformToWorld)
        points = (to_world @ np.c_[points, np.ones(len(points))].T)[:3].T
    return points


def mask_world_points(mask: np.ndarray, ijk_to_world: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    return (ijk_to_world @ np.stack([i, j, k, np.ones_like(i)]))[:3].T


def same_point_sets(a: np.ndarray, b: np.ndarray, atol=1e-4) -> bool:
    if a.shape != b.shape:
        return False
    order = lambda p: p[np.lexsort(np.round(p, 3).T[::-1])]  # noqa: E731
    return np.allclose(order(a), order(b), atol=atol)


def roi_node_geometry(node):
    """Centre, size and axes of an ROI node in world RAS, straight from MRML."""
    center, size = np.zeros(3), np.zeros(3)
    node.GetCenterWorld(center)
    node.GetSizeWorld(size)
    axes = np.zeros((3, 3))
    for c, getter in enumerate((node.GetXAxisWorld, node.GetYAxisWorld, node.GetZAxisWorld)):
        axis = np.zeros(3)
        getter(axis)
        axes[:, c] = axis
    return center, size, axes


def tag(segment, key):
    value = vtk.reference("")
    assert segment.GetTag(key, value), f"segment has no tag {key}"
    return value.get()


def oblique_volume(scene_, left_handed=False):
    """Synthetic oblique CT-like volume (bright block in the middle), rotated 30 deg about an oblique axis."""
    arr = np.full((20, 24, 28), -1000, np.int16)
    arr[5:15, 6:18, 7:21] = 60
    directions = rotation(30.0, (1.0, 0.5, 0.2))
    if left_handed:
        directions = directions @ np.diag([1.0, 1.0, -1.0])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = directions @ np.diag([1.5, 1.2, 2.5])
    ijk_to_ras[:3, 3] = [-20.0, 15.0, 40.0]
    return slicer.util.addVolumeFromArray(arr, ijkToRAS=ijk_to_ras, name="oblique"), arr, ijk_to_ras


@pytest.fixture
def ct(headless_slicer, data_dir):
    _, logics = headless_slicer
    return load_ct(logics, data_dir)


@pytest.fixture
def liver(headless_slicer, data_dir):
    _, logics = headless_slicer
    return load_liver(logics, data_dir)


# ---------------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------------


def test_read_volume_node_gives_a_copy_and_the_ijk_to_ras(ct):
    array, ijk_to_ras = scene.read_volume_node(ct)
    assert array.shape == (30, 101, 122) and array.dtype == np.int16
    np.testing.assert_array_equal(array, slicer.util.arrayFromVolume(ct))
    np.testing.assert_allclose(ijk_to_ras, matrix(ct.GetIJKToRASMatrix))
    array[:] = 0  # a copy: the node keeps its voxels
    assert slicer.util.arrayFromVolume(ct).any()


def test_read_volume_node_uses_world_geometry_under_linear_transforms(headless_slicer, ct):
    scene_, _ = headless_slicer
    parent = linear_transform_node(scene_)
    grandparent = linear_transform_node(scene_, rotation_deg=-40.0, axis=(0, 0, 1), translation=(5.0, 6.0, -7.0))
    parent.SetAndObserveTransformNodeID(grandparent.GetID())
    ct.SetAndObserveTransformNodeID(parent.GetID())
    _, ijk_to_world = scene.read_volume_node(ct)
    local = matrix(ct.GetIJKToRASMatrix)
    for ijk in ([0, 0, 0], [121, 100, 29], [17, 53, 8]):
        expected = [0.0, 0.0, 0.0]
        ct.TransformPointToWorld((local @ [*ijk, 1.0])[:3], expected)  # Slicer's own world mapping
        np.testing.assert_allclose((ijk_to_world @ [*ijk, 1.0])[:3], expected, atol=1e-6)
    assert not np.allclose(ijk_to_world, local)


def test_read_volume_node_refuses_a_non_linear_transform(headless_slicer, ct):
    scene_, _ = headless_slicer
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in (((0, 0, 0), (0, 0, 0)), ((100, 0, 0), (105, 3, 0)), ((0, 100, 0), (0, 100, 8)),
                 ((0, 0, 100), (4, 0, 100)), ((50, 50, 50), (55, 45, 50))):
        source.InsertNextPoint(p)
        target.InsertNextPoint(q)
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    node = scene_.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    node.SetAndObserveTransformToParent(spline)
    ct.SetAndObserveTransformNodeID(node.GetID())
    with pytest.raises(GeometryError, match="non-linear transform 'warp'.*Harden transform"):
        scene.read_volume_node(ct)


def test_read_volume_node_refuses_what_the_model_cannot_use(headless_slicer, data_dir):
    scene_, logics = headless_slicer
    labels = logics["volumes"].AddArchetypeVolume(str(data_dir / "example_seg.nii.gz"), "labels", 1)
    vector = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6, 3), np.uint8), nodeClassName="vtkMRMLVectorVolumeNode")
    flat = slicer.util.addVolumeFromArray(np.zeros((1, 5, 6), np.int16), name="flat")
    empty = scene_.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    segmentation = scene_.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    cases = [(labels, "label map"), (vector, "vector"), (flat, "is 2D"), (empty, "no voxels loaded"),
             (segmentation, "not a volume"), (None, "no volume given")]
    for node, message in cases:
        with pytest.raises(InputError, match=message):
            scene.read_volume_node(node)


def test_volume_signature_changes_with_voxels_geometry_and_transform(headless_slicer, ct):
    scene_, _ = headless_slicer
    first = scene.volume_signature(ct)
    assert scene.volume_signature(ct) == first
    ct.SetAttribute("note", "display or attribute changes do not count")
    assert scene.volume_signature(ct) == first
    slicer.util.arrayFromVolume(ct)[0, 0, 0] += 1
    slicer.util.arrayFromVolumeModified(ct)
    second = scene.volume_signature(ct)
    assert second != first
    ct.SetOrigin(1.0, 2.0, 3.0)
    third = scene.volume_signature(ct)
    assert third != second
    ct.SetAndObserveTransformNodeID(linear_transform_node(scene_).GetID())
    assert scene.volume_signature(ct) != third


# ---------------------------------------------------------------------------------------------------------------------
# segments
# ---------------------------------------------------------------------------------------------------------------------


def test_liver_segment_overlaps_the_label_exactly(headless_slicer, ct, liver):
    result = SegmentationResult(text="It is [SEG].", target="liver", mask=liver, provenance=provenance())
    node, segment_id = scene.add_segment(result, ct)
    np.testing.assert_array_equal(segment_mask(node, segment_id, ct), liver)
    segment = node.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "liver"
    assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    assert segment.GetColor() == pytest.approx((221 / 255, 130 / 255, 101 / 255))  # Slicer's anatomical liver colour
    # the new node's reference geometry is the volume
    assert node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole()) == ct.GetID()
    assert node.GetNodeReferenceID(scene.SOURCE_VOLUME_REFERENCE_ROLE) == ct.GetID()
    # provenance: segment tags and node attributes
    assert tag(segment, "M3D.label") == AI_LABEL
    assert tag(segment, "M3D.prompt") == "Can you segment the liver in this image?"
    assert tag(segment, "M3D.model") == "tiny/phi3" and tag(segment, "M3D.seed") == "7"
    assert node.GetAttribute("M3D.label") == AI_LABEL and node.GetAttribute("M3D.task") == "seg"
    assert node.GetAttribute("M3D.convention") == "m3d-seg-v1@v1"
    assert node.GetAttribute(scene.AI_SEGMENTS_ATTRIBUTE) == segment_id


def test_existing_segments_are_never_overwritten(headless_slicer, ct, liver):
    scene_, _ = headless_slicer
    user = scene_.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    user.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    user_liver = np.zeros_like(liver)
    user_liver[10:20, 30:60, 40:80] = 1
    user_id = user.GetSegmentation().AddEmptySegment("liver", "liver", [0.1, 0.2, 0.3])
    slicer.util.updateSegmentBinaryLabelmapFromArray(user_liver, user, user_id, ct)

    node, second = scene.add_segment(liver, ct, "liver", segmentation_node=user)
    node_again, third = scene.add_segment(liver, ct, "Liver", segmentation_node=user)
    assert node is user and node_again is user and user.GetName() == "my segmentation"
    assert user.GetAttribute(scene.AI_SEGMENTS_ATTRIBUTE) == f"{second},{third}"
    assert user.GetAttribute("M3D.label") is None  # the user's node as a whole is not labelled AI-generated
    segmentation = user.GetSegmentation()
    assert len({user_id, second, third}) == 3 and segmentation.GetNumberOfSegments() == 3
    assert [segmentation.GetSegment(s).GetName() for s in (user_id, second, third)] == ["liver", "liver (2)",
                                                                                         "Liver (3)"]
    assert segmentation.GetSegment(user_id).GetColor() == pytest.approx((0.1, 0.2, 0.3))
    np.testing.assert_array_equal(segment_mask(user, user_id, ct), user_liver)  # the user's voxels are untouched
    np.testing.assert_array_equal(segment_mask(user, second, ct), liver)
    np.testing.assert_array_equal(segment_mask(user, third, ct), liver)


def test_new_segmentation_nodes_get_unique_names_and_distinct_colours(ct, liver):
    first, a = scene.add_segment(liver, ct, "mystery structure")
    second, _ = scene.add_segment(liver, ct, "mystery structure")
    assert first is not second and first.GetName() == "ct M3D segmentation"
    assert second.GetName() == "ct M3D segmentation (2)"
    _, c = scene.add_segment(liver, ct, "another unknown thing", segmentation_node=first)
    colours = [first.GetSegmentation().GetSegment(s).GetColor() for s in (a, c)]
    assert colours[0] != pytest.approx(colours[1])  # no anatomical colour: distinct palette colours
    _, d = scene.add_segment(liver, ct, "x", segmentation_node=first, color="#ff0000")
    assert first.GetSegmentation().GetSegment(d).GetColor() == pytest.approx((1.0, 0.0, 0.0))


def test_bad_masks_are_refused_and_create_nothing(headless_slicer, ct, liver):
    scene_, _ = headless_slicer
    before = scene_.GetNumberOfNodes()
    absent = SegmentationResult(text="no", target="pancreas", mask=None, provenance=provenance(), absent=True)
    for mask, message in ((absent, "no mask"), (np.zeros_like(liver), "empty"), (liver[:, :, :-1], "shape")):
        with pytest.raises(InputError, match=message):
            scene.add_segment(mask, ct, "liver")
    assert scene_.GetNumberOfNodes() == before


def test_segment_of_a_transformed_volume_lands_where_the_volume_is(headless_slicer, ct, liver):
    scene_, _ = headless_slicer
    ct.SetAndObserveTransformNodeID(linear_transform_node(scene_).GetID())
    _, ijk_to_world = scene.read_volume_node(ct)
    expected = mask_world_points(liver, ijk_to_world)
    # a new node follows the volume's transform
    node, segment_id = scene.add_segment(liver, ct, "liver")
    assert node.GetTransformNodeID() == ct.GetTransformNodeID()
    np.testing.assert_array_equal(segment_mask(node, segment_id, ct), liver)
    assert same_point_sets(segment_world_points(node, segment_id), expected)
    # an existing untransformed node gets the mask transformed into its own coordinates
    plain = scene_.AddNewNodeByClass("vtkMRMLSegmentationNode", "untransformed")
    _, plain_id = scene.add_segment(liver, ct, "liver", segmentation_node=plain)
    assert plain.GetTransformNodeID() is None
    assert same_point_sets(segment_world_points(plain, plain_id), expected)


# ---------------------------------------------------------------------------------------------------------------------
# ROIs
# ---------------------------------------------------------------------------------------------------------------------


def test_roi_node_has_the_box_centre_size_and_orientation(headless_slicer, ct):
    roi = RasRoi(center=[-40.0, 120.0, 130.0], size=[30.0, 45.0, 24.0], axes=rotation(20.0, (0, 0, 1)))
    result = BoxResult(text="<bx_start>...", target="liver", box=(0.1, 0.2, 0.3, 0.5, 0.6, 0.7), roi=roi,
                       provenance=provenance("rec", "Where is liver?"))
    node = scene.add_roi(result, volume_node=ct)
    assert node.IsA("vtkMRMLMarkupsROINode") and node.GetName() == "liver"
    center, size, axes = roi_node_geometry(node)
    np.testing.assert_allclose(center, roi.center, atol=1e-9)
    np.testing.assert_allclose(size, roi.size, atol=1e-9)
    np.testing.assert_allclose(axes, roi.axes, atol=1e-9)
    for corner in roi.corners():  # Slicer's own inside test agrees at every corner
        inward = (roi.center - corner) * 1e-3
        assert node.IsPointInROIWorld(corner + inward) and not node.IsPointInROIWorld(corner - inward)
    assert node.GetAttribute("M3D.label") == AI_LABEL and node.GetAttribute("M3D.prompt") == "Where is liver?"
    assert node.GetNodeReferenceID(scene.SOURCE_VOLUME_REFERENCE_ROLE) == ct.GetID()


@pytest.mark.parametrize("left_handed", [False, True])
def test_roi_from_a_box_in_an_oblique_volume(headless_slicer, left_handed):
    volume, arr, ijk_to_ras = oblique_volume(headless_slicer[0], left_handed)
    _, read_matrix = scene.read_volume_node(volume)
    np.testing.assert_allclose(read_matrix, ijk_to_ras, atol=1e-9)
    _, mapping = to_model_input(arr, read_matrix, model_shape=(8, 32, 32), convention="m3d-seg-v1",
                                 window="minmax")
    roi = box_to_roi((0.2, 0.25, 0.3, 0.7, 0.75, 0.8), mapping)
    node = scene.add_roi(roi, "block", volume_node=volume)
    center, size, axes = roi_node_geometry(node)
    np.testing.assert_allclose(center, roi.center, atol=1e-9)
    np.testing.assert_allclose(size, roi.size, atol=1e-9)
    assert np.linalg.det(axes) == pytest.approx(1.0)  # a rotation, even for a left-handed voxel grid
    # the same box: each edge direction equal up to sign; corners equal as sets
    np.testing.assert_allclose(np.abs(np.sum(axes * roi.axes, axis=0)), 1.0, atol=1e-9)
    node_corners = RasRoi(center, size, axes).corners()
    assert same_point_sets(node_corners, roi.corners(), atol=1e-6)
    # oblique: the ROI follows the volume's voxel axes, not RAS
    directions = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    assert np.allclose(np.sort(np.abs(axes.T @ directions), axis=1)[:, -1], 1.0, atol=1e-9)
    assert not np.allclose(np.abs(axes), np.eye(3), atol=1e-3)


def test_roi_with_a_reflected_frame_becomes_the_same_box(headless_slicer):
    axes = rotation(40.0, (1, 0, 1)) @ np.diag([1.0, -1.0, 1.0])
    assert np.linalg.det(axes) < 0
    roi = RasRoi(center=[1.0, 2.0, 3.0], size=[4.0, 5.0, 6.0], axes=axes)
    node = scene.add_roi(roi, "reflected", scene=headless_slicer[0])
    center, size, node_axes = roi_node_geometry(node)
    assert np.linalg.det(node_axes) == pytest.approx(1.0)
    np.testing.assert_allclose(size, roi.size)
    assert same_point_sets(RasRoi(center, size, node_axes).corners(), roi.corners(), atol=1e-9)


def test_roi_from_node_reads_a_rotated_user_roi_under_a_transform(headless_slicer):
    scene_, _ = headless_slicer
    node = scene_.AddNewNodeByClass("vtkMRMLMarkupsROINode", "user box")
    local = np.eye(4)
    local[:3, :3] = rotation(35.0, (0.3, 1.0, 0.0))
    local[:3, 3] = [5.0, -10.0, 20.0]
    node.GetObjectToNodeMatrix().DeepCopy(slicer.util.vtkMatrixFromArray(local))
    node.SetSize(10.0, 20.0, 30.0)
    roi = scene.roi_from_node(node)
    np.testing.assert_allclose(roi.center, local[:3, 3], atol=1e-9)
    np.testing.assert_allclose(roi.size, [10.0, 20.0, 30.0])
    np.testing.assert_allclose(roi.axes, local[:3, :3], atol=1e-9)

    transform = linear_transform_node(scene_)
    node.SetAndObserveTransformNodeID(transform.GetID())
    world = matrix(transform.GetMatrixTransformToWorld)
    moved = scene.roi_from_node(node)
    np.testing.assert_allclose(moved.center, (world @ local[:, 3])[:3], atol=1e-9)
    np.testing.assert_allclose(moved.axes, world[:3, :3] @ local[:3, :3], atol=1e-9)
    np.testing.assert_allclose(moved.size, [10.0, 20.0, 30.0], atol=1e-9)


def test_roi_refusals(headless_slicer, ct):
    scene_, _ = headless_slicer
    with pytest.raises(InputError, match="not an ROI"):
        scene.roi_from_node(ct)
    unplaced = scene_.AddNewNodeByClass("vtkMRMLMarkupsROINode", "unplaced")
    with pytest.raises(GeometryError, match="not been placed"):
        scene.roi_from_node(unplaced)
    no_box = BoxResult(text="Sorry, no liver.", target="liver", box=None, roi=None, provenance=provenance("rec"),
                       absent=True)
    before = scene_.GetNumberOfNodes()
    with pytest.raises(InputError, match="no box"):
        scene.add_roi(no_box, volume_node=ct)
    assert scene_.GetNumberOfNodes() == before


# ---------------------------------------------------------------------------------------------------------------------
# text, names, subject hierarchy
# ---------------------------------------------------------------------------------------------------------------------


def test_text_nodes_carry_the_label_and_provenance_and_never_replace_one(headless_slicer, ct):
    scene_, _ = headless_slicer
    existing = scene_.AddNewNodeByClass("vtkMRMLTextNode", "M3D report")
    existing.SetText("my own notes")
    result = TextResult(text="The liver is enlarged.", provenance=provenance("report", "Please generate a report."))
    node = scene.add_text(result, volume_node=ct)
    assert node is not existing and node.GetName() == "M3D report (2)"
    assert existing.GetText() == "my own notes" and existing.GetAttribute("M3D.label") is None
    assert AI_LABEL in node.GetText() and "The liver is enlarged." in node.GetText()
    assert node.GetAttribute("M3D.task") == "report" and node.GetAttribute("M3D.label") == AI_LABEL
    assert node.GetAttribute("M3D.model_revision") == "local-abc"
    assert scene.add_text(result, "M3D report", volume_node=ct).GetName() == "M3D report (3)"


def test_new_nodes_are_placed_in_the_volume_study(headless_slicer, ct, liver):
    scene_, _ = headless_slicer
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene_)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "CT abdomen")
    sh.CreateItem(study, ct)
    segmentation, _ = scene.add_segment(liver, ct, "liver")
    roi = scene.add_roi(RasRoi([0, 0, 0], [1, 2, 3]), "box", volume_node=ct)
    text = scene.add_text("An answer.", "answer", volume_node=ct)
    for node in (segmentation, roi, text):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study, node.GetName()
    other = scene_.AddNewNodeByClass("vtkMRMLTextNode", "elsewhere")
    sh.CreateItem(patient, other)
    scene.place_in_study(other, ct)
    assert sh.GetItemParent(sh.GetItemByDataNode(other)) == study


# ---------------------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------------------


def test_results_survive_saving_to_mrb_and_reloading(headless_slicer, ct, liver, tmp_path):
    from conftest import make_headless_slicer

    scene_, _ = headless_slicer
    result = SegmentationResult(text="It is [SEG].", target="liver", mask=liver,
                                provenance=provenance(prompt="Segment the liver | please"))
    segmentation, segment_id = scene.add_segment(result, ct)
    roi = RasRoi(center=[-40.0, 120.0, 130.0], size=[30.0, 45.0, 24.0], axes=rotation(20.0, (1, 1, 0)))
    roi_node = scene.add_roi(roi, "liver box", volume_node=ct)
    text = TextResult(text="Findings: multi-line\nreport.", provenance=provenance("report", "Report please."))
    text_node = scene.add_text(text, volume_node=ct)
    names = (ct.GetName(), segmentation.GetName(), roi_node.GetName(), text_node.GetName())
    folder = tmp_path / "saved"
    folder.mkdir()
    path = folder / "results.mrb"
    assert scene_.WriteToMRB(str(path))

    scene2, _, keepalive = make_headless_slicer()
    try:
        assert scene2.ReadFromMRB(str(path))
        ct2, seg2, roi2, text2 = (scene2.GetFirstNodeByName(n) for n in names)
        np.testing.assert_array_equal(segment_mask(seg2, segment_id, ct2), liver)
        segment = seg2.GetSegmentation().GetSegment(segment_id)
        assert segment.GetName() == "liver" and not segment.GetNameAutoGenerated()
        assert tag(segment, "M3D.label") == AI_LABEL
        assert tag(segment, "M3D.prompt") == "Segment the liver / please"  # "|" would cut a tag in .seg.nrrd
        assert seg2.GetAttribute("M3D.prompt") == "Segment the liver | please"
        center, size, axes = roi_node_geometry(roi2)
        np.testing.assert_allclose(center, roi.center, atol=1e-6)
        np.testing.assert_allclose(size, roi.size, atol=1e-6)
        np.testing.assert_allclose(axes, roi.axes, atol=1e-6)
        assert roi2.GetAttribute("M3D.label") == AI_LABEL
        assert text2.GetText() == text_node.GetText() and AI_LABEL in text2.GetText()
        assert text2.GetAttribute("M3D.task") == "report"
        for node in (seg2, roi2, text2):
            assert node.GetNodeReferenceID(scene.SOURCE_VOLUME_REFERENCE_ROLE) == ct2.GetID()
    finally:
        slicer.mrmlScene = scene_  # the shims point at the scene created last
        del keepalive


def test_lib_imports_without_slicer_and_torch():
    code = (
        "import sys; sys.modules['slicer'] = None\n"
        "import M3DAssistantLib.scene, M3DAssistantLib.session\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
        "from M3DAssistantLib.errors import M3DError\n"
        "try:\n"
        "    M3DAssistantLib.scene.read_volume_node(object())\n"
        "except M3DError as e:\n"
        "    assert 'slicer-core' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    lib = REPO / "M3DAssistant"
    out = subprocess.run([sys.executable, "-c", code], cwd=lib, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
