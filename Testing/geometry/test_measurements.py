"""A mask's box and measurements: exact values on shapes with known answers, the farthest pair against brute force,
the values inside against VTK computed as Slicer's Segment Statistics computes them, and the real CT's liver."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from M3DAssistantLib.errors import InputError
from M3DAssistantLib.measurements import _farthest_pair, box_iou, mask_bounds, mask_roi, measure_mask
from M3DAssistantLib.selfcheck import roi_voxel_bounds


def matrix(spacing, perm=(0, 1, 2), flips=(False, False, False), origin=(3.0, -7.0, 11.0)):
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for c, (r, f) in enumerate(zip(perm, flips)):
        m[r, c] = spacing[c] * (-1.0 if f else 1.0)
    m[:3, 3] = origin
    return m


def test_a_cuboid_has_exact_measurements():
    """A box of voxels: volume = count x voxel volume; the largest diameter the diagonal between corner voxel
    centres; on each axial slice the long axis is the rectangle's diagonal and the short axis its width across
    that diagonal, 2ab / sqrt(a^2 + b^2)."""
    spacing = (0.7, 0.9, 2.5)  # I, J, K (K is superior-inferior)
    m = matrix(spacing)
    mask = np.zeros((20, 30, 40), np.uint8)
    mask[5:11, 4:24, 10:30] = 1  # 6 slices, 20 rows (J), 20 columns (I)
    array = np.arange(mask.size, dtype=np.int16).reshape(mask.shape)
    result = measure_mask(mask, array, m, units="HU")
    a, b, c = 19 * 0.7, 19 * 0.9, 5 * 2.5  # between the centres of the outermost voxels
    assert result.voxel_count == 6 * 20 * 20
    assert result.volume_ml == pytest.approx(6 * 20 * 20 * 0.7 * 0.9 * 2.5 / 1000)
    assert result.max_diameter_mm == pytest.approx(np.sqrt(a * a + b * b + c * c), abs=1e-3)
    assert result.axial_axis == 0 and 5 <= result.axial_slice <= 10
    assert result.axial_long_axis_mm == pytest.approx(np.hypot(a, b), abs=1e-3)
    assert result.axial_short_axis_mm == pytest.approx(2 * a * b / np.hypot(a, b), abs=1e-3)
    ends = np.array(result.max_diameter_ras)
    assert np.linalg.norm(ends[0] - ends[1]) == pytest.approx(result.max_diameter_mm, abs=2e-3)
    inside = array[mask == 1].astype(float)
    assert result.mean == pytest.approx(inside.mean()) and result.std == pytest.approx(inside.std(ddof=1), rel=1e-6)
    assert (result.minimum, result.maximum, result.units) == (inside.min(), inside.max(), "HU")


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (True, False, True)), ((2, 0, 1), (False, True, False))])
def test_a_sphere_on_any_grid(perm, flips):
    """A sphere of radius 12 mm on anisotropic, permuted, flipped grids: its volume within the voxelisation error, its
    diameters just under 24 mm (voxel centres), and the axial slices are the ones across superior-inferior."""
    spacing = (1.1, 0.8, 1.6)
    m = matrix(spacing, perm, flips)
    shape = (40, 45, 50)
    k, j, i = np.indices(shape)
    ras = np.tensordot(m[:3, :3], np.stack([i, j, k]).astype(float), axes=1) + m[:3, 3, None, None, None]
    centre = (m @ [25.0, 22.0, 20.0, 1.0])[:3]
    mask = (np.linalg.norm(ras - centre[:, None, None, None], axis=0) <= 12.0).astype(np.uint8)
    result = measure_mask(mask, np.zeros(shape, np.float32), m)
    assert result.volume_ml == pytest.approx(4 / 3 * np.pi * 12**3 / 1000, rel=0.05)
    for value in (result.max_diameter_mm, result.axial_long_axis_mm, result.axial_short_axis_mm):
        assert 24.0 - 2 * max(spacing) <= value <= 24.0
    superior = int(np.argmax(np.abs(m[2, :3])))  # the IJK column along S
    assert result.axial_axis == 2 - superior
    assert result.units is None and result.std == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50), st.floats(-50, 50)), min_size=2, max_size=300))
def test_the_farthest_pair_is_the_brute_force_one(points):
    p = np.array(points)
    d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    length, i, j = _farthest_pair(p)
    assert length == pytest.approx(d.max(), abs=1e-9) and d[i, j] == pytest.approx(length, abs=1e-9)


def test_flat_and_tiny_masks():
    """A one-voxel mask measures zero; a flat (one-slice) mask still has a hull."""
    m = matrix((1.0, 1.0, 3.0))
    mask = np.zeros((5, 80, 80), np.uint8)
    mask[2, 40, 40] = 1
    one = measure_mask(mask, np.ones(mask.shape), m)
    assert (one.voxel_count, one.max_diameter_mm, one.axial_long_axis_mm, one.axial_short_axis_mm) == (1, 0, 0, 0)
    mask[2, 10:70, 20:30] = 1
    flat = measure_mask(mask, np.ones(mask.shape), m)
    assert flat.max_diameter_mm == pytest.approx(np.hypot(59, 9), abs=1e-3) == flat.axial_long_axis_mm
    assert measure_mask(np.zeros_like(mask), np.ones(mask.shape), m) is None
    with pytest.raises(InputError, match="grid"):
        measure_mask(mask, np.ones((5, 80, 81)), m)


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (False, False, False)), ((1, 2, 0), (True, True, False))])
def test_the_mask_box_covers_exactly_its_voxels(perm, flips):
    m = matrix((0.6, 1.3, 2.2), perm, flips)
    mask = np.zeros((12, 20, 25), np.uint8)
    mask[3:7, 5:6, 10:21] = 1
    roi = mask_roi(mask, m)
    lo, hi = roi_voxel_bounds(roi, m, mask.shape)
    np.testing.assert_array_equal(lo, [3, 5, 10])
    np.testing.assert_array_equal(hi, [6, 5, 20])
    assert np.allclose(np.abs(np.linalg.det(roi.axes)), 1.0)
    assert np.prod(roi.size) == pytest.approx(mask.sum() * abs(np.linalg.det(m[:3, :3])))  # whole voxels
    assert np.allclose(np.abs(np.diag(roi.axes)), 1.0)  # nearest to +R, +A, +S
    assert mask_roi(np.zeros_like(mask), m) is None and mask_bounds(np.zeros_like(mask)) is None


def test_box_iou():
    shape = (32, 256, 256)
    a = (0.0, 0.0, 0.0, 0.5, 0.5, 0.5)
    assert box_iou(a, a, shape) == pytest.approx(1.0)
    assert box_iou(a, (0.6, 0.6, 0.6, 0.9, 0.9, 0.9), shape) == 0.0
    half = (0.0, 0.0, 0.0, 0.5, 0.5, 0.25)
    assert 0.45 < box_iou(a, half, shape) < 0.55


def test_values_inside_match_vtk_as_segment_statistics_computes_them():
    """Slicer's Segment Statistics (ScalarVolumeSegmentStatisticsPlugin) runs vtkImageAccumulate on the volume
    with the segment as a stencil; the same VTK pipeline here gives our voxel count, mean, standard deviation
    (VTK's is the n - 1 one), minimum and maximum."""
    vtk = pytest.importorskip("vtk")
    from vtk.util import numpy_support

    rng = np.random.default_rng(0)
    array = rng.normal(40.0, 30.0, (15, 20, 25)).astype(np.int16)
    mask = (rng.random(array.shape) > 0.7).astype(np.uint8)

    def image(values, vtk_type):
        data = vtk.vtkImageData()
        data.SetDimensions(values.shape[2], values.shape[1], values.shape[0])
        data.AllocateScalars(vtk_type, 1)
        numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())[:] = values.ravel()
        return data

    stencil = vtk.vtkImageToImageStencil()
    stencil.SetInputData(image(mask, vtk.VTK_UNSIGNED_CHAR))
    stencil.ThresholdByUpper(1)
    stencil.Update()
    accumulate = vtk.vtkImageAccumulate()
    accumulate.SetInputData(image(array, vtk.VTK_SHORT))
    accumulate.SetStencilData(stencil.GetOutput())
    accumulate.Update()
    ours = measure_mask(mask, array, np.diag([0.5, 0.5, 1.0, 1.0]), units="HU")
    assert ours.voxel_count == accumulate.GetVoxelCount()
    assert ours.mean == pytest.approx(accumulate.GetMean()[0], abs=1e-4)
    assert ours.std == pytest.approx(accumulate.GetStandardDeviation()[0], abs=1e-4)
    assert (ours.minimum, ours.maximum) == (accumulate.GetMin()[0], accumulate.GetMax()[0])
    assert ours.volume_ml == pytest.approx(accumulate.GetVoxelCount() * 0.25 / 1000)


def test_the_real_livers_measurements(ct, data_dir):
    """The bundled CT's liver label: a volume of liver size, soft-tissue HU inside, diameters of a liver (this small
    CT holds a part of it)."""
    from M3DAssistantLib.volume_io import read_volume

    array, ijk_to_ras = ct
    labels, _ = read_volume(data_dir / "example_seg.nii.gz")
    liver = (labels == 5).astype(np.uint8)
    result = measure_mask(liver, array, ijk_to_ras, units="HU")
    voxel_ml = abs(np.linalg.det(ijk_to_ras[:3, :3])) / 1000
    assert result.volume_ml == pytest.approx(liver.sum() * voxel_ml, rel=1e-6)
    assert 0 < result.mean < 200 and 5 < result.std < 200
    assert 50 < result.axial_long_axis_mm <= result.max_diameter_mm < 400
    roi = mask_roi(liver, ijk_to_ras)
    lo, hi = roi_voxel_bounds(roi, ijk_to_ras, liver.shape)
    np.testing.assert_array_equal(lo, mask_bounds(liver)[0])
    np.testing.assert_array_equal(hi, mask_bounds(liver)[1])
