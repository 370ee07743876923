"""geometry on real CT (TotalSegmentator test data, NIfTI and DICOM) and on a full-size 512x512x300 CT phantom:
anatomy ends up on the documented side of the tensor, labels survive the round trip, and the numbers equal the
official MONAI chain."""

from __future__ import annotations

import numpy as np
import pytest
from geometry_references import canonical, dice, monai_chain, same_grid_reorder, seg_percentiles, voxel_ras

from M3DAssistantLib.geometry import (
    RasRoi,
    box_to_roi,
    mask_to_box,
    mask_to_model,
    model_mask_to_volume,
    roi_to_box,
    to_model_input,
)
from M3DAssistantLib.volume_io import read_volume

LUNGS = (10, 11, 13, 14)
KIDNEYS = (2, 3)
LIVER, SPLEEN, AORTA, SPINAL_CORD, T11, T12 = 5, 1, 52, 79, 33, 32


@pytest.fixture(scope="module")
def labels(data_dir, ct):
    array, m = read_volume(data_dir / "example_seg.nii.gz")
    np.testing.assert_allclose(m, ct[1], atol=1e-5)  # same grid as the CT
    return array


def centroid_model(mask_dhw: np.ndarray) -> np.ndarray:
    return np.argwhere(mask_dhw).mean(axis=0)


def centroid_ras(mask_kji: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    kji = np.argwhere(mask_kji).mean(axis=0)
    return (ijk_to_ras @ np.array([kji[2], kji[1], kji[0], 1.0]))[:3]


def values_on_grid(array_kji, ijk_to_ras, ref_shape, ref_ijk_to_ras):
    """``array_kji`` re-indexed onto a reference grid that has the same voxel centres (any axis order / flips)."""
    ref_to_own = np.linalg.inv(ijk_to_ras) @ ref_ijk_to_ras
    kk, jj, ii = np.indices(ref_shape)
    own = ref_to_own @ np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    i, j, k = np.rint(own[:3]).astype(int)
    assert np.abs(own[:3] - np.rint(own[:3])).max() < 1e-3
    return array_kji[k, j, i].reshape(ref_shape)


# ---------------------------------------------------------------------------------------------------------------------
# NIfTI CT (122 x 101 x 30, 3 mm, RAS-stored)
# ---------------------------------------------------------------------------------------------------------------------


def test_anatomy_sits_on_the_documented_sides(ct, labels):
    """m3d-cap-v1: patient right at low W (radiological display), anterior at low H, superior at low D;
    m3d-seg-v1 only reverses D."""
    array, m = ct
    tensor, mapping = to_model_input(array, m, window="abdomen")
    assert tensor.shape == (1, 32, 256, 256)
    model_labels = mask_to_model(labels, mapping)
    liver = centroid_model(model_labels == LIVER)
    spleen = centroid_model(model_labels == SPLEEN)
    assert liver[2] < 128 < spleen[2]  # liver on the image's left = patient's right
    assert centroid_model(np.isin(model_labels, (AORTA,)))[1] < centroid_model(model_labels == SPINAL_CORD)[1]
    lungs_d = centroid_model(np.isin(model_labels, LUNGS))[0]
    kidneys_d = centroid_model(np.isin(model_labels, KIDNEYS))[0]
    assert lungs_d < kidneys_d  # superior first
    _, seg_mapping = to_model_input(array, m, window="abdomen", convention="m3d-seg")
    seg_labels = mask_to_model(labels, seg_mapping)
    assert centroid_model(np.isin(seg_labels, LUNGS))[0] > centroid_model(np.isin(seg_labels, KIDNEYS))[0]
    np.testing.assert_array_equal(seg_labels, model_labels[::-1])
    # Liver enhances to ~90 HU: in the abdomen window (-135..215 HU) that is ~0.64.
    assert 0.5 < np.median(tensor[0][model_labels == LIVER]) < 0.8


@pytest.mark.parametrize("window", [None, "abdomen", "lung"])
def test_real_ct_matches_monai_chain(ct, window):
    array, m = ct
    tensor, mapping = to_model_input(array, m, window=window)
    if window is None:
        low, high = seg_percentiles(array)
    else:
        low, high = {"abdomen": (-135.0, 215.0), "lung": (-1200.0, 200.0)}[window]
    ref = monai_chain(canonical(array, m), low, high, (32, 256, 256))
    np.testing.assert_allclose(tensor[0], ref, atol=1e-4, rtol=0)


def test_liver_round_trip_keeps_its_centroid(ct, labels):
    """Liver label -> model space (nearest, as the official masks) -> back on the CT grid: centroid within one
    original voxel, and the masks agree."""
    array, m = ct
    for convention in ("m3d-cap", "m3d-seg"):
        _, mapping = to_model_input(array, m, window="abdomen", convention=convention)
        liver = labels == LIVER
        back = model_mask_to_volume(mask_to_model(liver.astype(np.uint8), mapping), mapping)
        shift = np.linalg.norm(centroid_ras(back, m) - centroid_ras(liver, m))
        assert shift < 3.0  # one voxel = 3 mm
        assert dice(back, liver) > 0.95


def test_same_ct_stored_flipped_or_permuted_gives_identical_tensor(ct):
    array, m = ct
    reference, ref_mapping = to_model_input(array, m, window="abdomen")
    storages = [((0, 1, 2), (True, False, False)), ((2, 1, 0), (False, True, True)), ((1, 0, 2), (True, True, True))]
    for perm, flip in storages:
        array2, m2 = same_grid_reorder(array, m, perm, flip)
        tensor, mapping = to_model_input(array2, m2, window="abdomen")
        np.testing.assert_array_equal(tensor, reference)
        np.testing.assert_allclose(mapping.model_to_ras, ref_mapping.model_to_ras, atol=1e-9)


def test_liver_box_as_roi_covers_the_liver(ct, labels):
    array, m = ct
    _, mapping = to_model_input(array, m, window="abdomen", convention="m3d-seg")
    liver = labels == LIVER
    box = mask_to_box(mask_to_model(liver.astype(np.uint8), mapping))
    roi = box_to_roi(box, mapping)
    pts = voxel_ras(array.shape, m)[liver]
    assert roi.contains(pts, tol=1e-6).mean() > 0.99
    # and it is tight: one original voxel (3 mm) of slack at most on each side
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    assert np.all(roi.center - roi.size / 2 > lo - 3.0 - 1e-6) and np.all(roi.center + roi.size / 2 < hi + 3.0 + 1e-6)
    assert roi_to_box(roi, mapping) == box
    # the liver's voxel cells as an ROI, snapped to model voxels, give the same box as the mask did
    assert roi_to_box(RasRoi.from_bounds(lo - 1.5, hi + 1.5), mapping, snap=True) == box


@pytest.mark.slicer
def test_slicer_array_gives_the_same_tensor(data_dir, headless_slicer):
    """The labelmap that Slicer loads with K flipped (example_seg_dicom.nii.gz) -- arrayFromVolume + its IJK->RAS --
    gives exactly the tensor of the SimpleITK reading: geometry depends on positions, not on storage."""
    import slicer
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    _, logics = headless_slicer
    path = data_dir / "example_seg_dicom.nii.gz"
    node = logics["volumes"].AddArchetypeVolume(str(path), "seg", 1)
    mat = vtkMatrix4x4()
    node.GetIJKToRASMatrix(mat)
    slicer_array, slicer_m = slicer.util.arrayFromVolume(node), slicer.util.arrayFromVTKMatrix(mat)
    array, m = read_volume(path)
    assert np.sign(slicer_m[2, 2]) != np.sign(m[2, 2])
    t1, map1 = to_model_input(slicer_array, slicer_m, window="minmax", model_shape=(16, 64, 64))
    t2, map2 = to_model_input(array, m, window="minmax", model_shape=(16, 64, 64))
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_allclose(map1.model_to_ras, map2.model_to_ras, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# DICOM series (512 x 512 x 20, LPS-stored, 0.98 x 0.98 x 2 mm)
# ---------------------------------------------------------------------------------------------------------------------


def test_dicom_series_orientation_and_intensity(data_dir):
    array, m = read_volume(data_dir / "example_ct_dicom")
    seg, seg_m = read_volume(data_dir / "example_seg_dicom.nii.gz")  # stored LAS: J runs the other way
    seg = values_on_grid(seg, seg_m, array.shape, m)
    tensor, mapping = to_model_input(array, m, window="abdomen")
    assert tensor.shape == (1, 32, 256, 256) and tensor.dtype == np.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    assert mapping.model_axes == (0, 1, 2) and mapping.model_flips == (True, False, False)  # only K reversed
    model_seg = mask_to_model(seg, mapping)
    assert centroid_model(model_seg == LIVER)[2] < 128 < centroid_model(model_seg == SPLEEN)[2]
    assert centroid_model(model_seg == AORTA)[1] < centroid_model(model_seg == SPINAL_CORD)[1]
    assert centroid_model(model_seg == T11)[0] < centroid_model(model_seg == T12)[0]  # superior first
    assert 0.5 < np.median(tensor[0][model_seg == LIVER]) < 0.8
    liver = seg == LIVER
    back = model_mask_to_volume(mask_to_model(liver.astype(np.uint8), mapping), mapping)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    assert np.linalg.norm(centroid_ras(back, m) - centroid_ras(liver, m)) < spacing.min()
    assert dice(back, liver) > 0.95


# ---------------------------------------------------------------------------------------------------------------------
# A real-size CT: 512 x 512 x 300 phantom
# ---------------------------------------------------------------------------------------------------------------------


def ct_phantom():
    """LPS-stored like a DICOM series (I -> left, J -> posterior, K -> superior), 0.7 x 0.7 x 1 mm, int16 HU:
    air, an elliptic body (40 HU), a liver ellipsoid on the patient's right (60 HU), lungs at the top (-800 HU), a
    spine behind (700 HU)."""
    shape = (300, 512, 512)
    m = np.diag([-0.7, -0.7, 1.0, 1.0])
    m[:3, 3] = (179.0, 179.0, -150.0)
    vol = np.full(shape, -1000, np.int16)
    jj, ii = np.ogrid[:512, :512]
    body = ((jj - 256) / 170.0) ** 2 + ((ii - 256) / 220.0) ** 2 <= 1
    spine = (jj - 380) ** 2 + (ii - 256) ** 2 <= 25**2
    vol[20:280][:, body] = 40
    for k in range(200, 280):
        for ci in (170, 342):
            lung = ((jj - 230) / 90.0) ** 2 + ((ii - ci) / 60.0) ** 2 <= 1
            vol[k][lung & body] = -800
    lungs = vol == -800
    liver = np.zeros(shape, bool)
    for k in range(130, 200):
        r = np.sqrt(max(0.0, 1 - ((k - 165) / 35.0) ** 2))
        if r > 0:
            liver[k] = ((jj - 230) / (70.0 * r)) ** 2 + ((ii - 170) / (60.0 * r)) ** 2 <= 1
    vol[liver] = 60
    vol[20:280][:, spine] = 700
    return vol, m, liver, lungs


def test_512x512x300_ct_phantom():
    vol, m, liver, lungs = ct_phantom()
    tensor, mapping = to_model_input(vol, m, window="abdomen")
    assert tensor.shape == (1, 32, 256, 256) and tensor.dtype == np.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    # foreground crop = the body (above -135 HU), as CropForeground on the windowed image
    assert mapping.crop_start == (20, 86, 36) and mapping.crop_stop == (280, 427, 477)
    model_liver = np.abs(tensor[0] - (60 + 135) / 350) < 0.01
    model_lungs = mask_to_model(lungs, mapping)
    model_spine = tensor[0] == 1.0
    assert centroid_model(model_liver)[2] < 128  # patient right on the image's left
    assert centroid_model(model_lungs)[0] < 8 < centroid_model(model_liver)[0]  # lungs superior, at low D
    assert centroid_model(model_spine)[1] > 128  # spine posterior, at high H
    back = model_mask_to_volume(model_liver, mapping)
    assert dice(back, liver) > 0.9
    assert np.linalg.norm(centroid_ras(back, m) - centroid_ras(liver, m)) < 0.7
