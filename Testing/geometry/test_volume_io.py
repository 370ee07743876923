"""read_volume: NIfTI, NRRD and DICOM series read like Slicer reads them (same RAS position for every voxel), and a
clear InputError for everything it cannot use."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from M3DAssistantLib import volume_io
from M3DAssistantLib.errors import InputError
from M3DAssistantLib.volume_io import read_volume

sitk = pytest.importorskip("SimpleITK")


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def slicer_load(logics, path: Path, labelmap: bool = False, files: list[str] | None = None):
    """Load with the real Slicer volumes logic; return (arrayFromVolume copy, IJK->RAS)."""
    import slicer
    from vtkmodules.vtkCommonCore import vtkStringArray
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    if files:
        names = vtkStringArray()
        for f in files:
            names.InsertNextValue(f)
        node = logics["volumes"].AddArchetypeVolume(files[0], "vol", 0, names)
    else:
        node = logics["volumes"].AddArchetypeVolume(str(path), "vol", 1 if labelmap else 0)
    assert node is not None, f"Slicer could not load {path}"
    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVolume(node).copy(), slicer.util.arrayFromVTKMatrix(m)


def reindex_onto(array_kji: np.ndarray, ijk_to_ras: np.ndarray, ref_shape, ref_ijk_to_ras: np.ndarray) -> np.ndarray:
    """Values of ``array_kji`` at the voxel centres of the reference grid (which must coincide with its own).

    Asserts that every reference voxel centre is a voxel centre of the array -- i.e. the two grids are the same set
    of RAS points -- and returns the array re-ordered to the reference's (K, J, I) indices.
    """
    ref_to_own = np.linalg.inv(ijk_to_ras) @ ref_ijk_to_ras
    kk, jj, ii = np.indices(ref_shape, dtype=np.int32)
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    own = ref_to_own @ ijk
    rounded = np.rint(own[:3]).astype(np.intp)
    assert np.max(np.abs(own[:3] - rounded)) < 1e-3, "voxel centres do not coincide"
    i, j, k = rounded
    assert i.min() >= 0 and j.min() >= 0 and k.min() >= 0
    assert i.max() < array_kji.shape[2] and j.max() < array_kji.shape[1] and k.max() < array_kji.shape[0]
    return array_kji[k, j, i].reshape(ref_shape)


def assert_same_as_slicer(ours, ours_m, ref, ref_m):
    assert ours.size == ref.size
    assert ours.dtype == ref.dtype
    np.testing.assert_array_equal(reindex_onto(ours, ours_m, ref.shape, ref_m), ref)


def dicom_files(data_dir: Path) -> list[str]:
    folder = data_dir / "example_ct_dicom"
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ""))


# ---------------------------------------------------------------------------------------------------------------------
# agreement with Slicer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slicer
def test_nifti_matches_slicer(ct_path, headless_slicer):
    _, logics = headless_slicer
    array, m = read_volume(ct_path)
    assert array.shape == (30, 101, 122) and array.dtype == np.int16
    np.testing.assert_allclose(m[:3, 3], [-177.956, 11.319, 94.302], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(m[:3, :3], axis=0), [3, 3, 3])
    ref, ref_m = slicer_load(logics, ct_path)
    np.testing.assert_allclose(m, ref_m, atol=1e-4)  # plain RAS file: even the indices agree
    np.testing.assert_array_equal(array, ref)


@pytest.mark.slicer
def test_labelmap_with_k_flip_has_the_same_positions_as_slicer(data_dir, headless_slicer):
    """example_seg_dicom.nii.gz (sform only, qfac -1): Slicer flips K, we follow ITK; each voxel keeps its RAS."""
    _, logics = headless_slicer
    path = data_dir / "example_seg_dicom.nii.gz"
    array, m = read_volume(path)
    ref, ref_m = slicer_load(logics, path, labelmap=True)
    assert np.sign(m[2, 2]) != np.sign(ref_m[2, 2])  # the documented flip is really there
    assert_same_as_slicer(array, m, ref, ref_m)
    assert set(np.unique(array)) >= {0, 5}  # background and liver


@pytest.mark.slicer
def test_dicom_series_matches_slicer(data_dir, headless_slicer):
    _, logics = headless_slicer
    array, m = read_volume(data_dir / "example_ct_dicom")
    assert array.shape == (20, 512, 512) and array.dtype == np.int16
    np.testing.assert_allclose(np.linalg.norm(m[:3, :3], axis=0), [0.9765625, 0.9765625, 2.0])
    # LPS origin (-249.51, -437.51, -804.5) from the README -> RAS (249.51, 437.51, -804.5)
    np.testing.assert_allclose(m[:3, 3], [249.51171875, 437.51171875, -804.5])
    assert -1100 <= array.min() and array.max() <= 3100
    ref, ref_m = slicer_load(logics, data_dir, files=dicom_files(data_dir))
    assert_same_as_slicer(array, m, ref, ref_m)


@pytest.mark.slicer
def test_nrrd_matches_slicer(ct_path, headless_slicer, tmp_path):
    _, logics = headless_slicer
    nrrd = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ct_path)), str(nrrd))
    array, m = read_volume(nrrd)
    ref, ref_m = slicer_load(logics, nrrd)
    assert_same_as_slicer(array, m, ref, ref_m)
    a0, m0 = read_volume(ct_path)
    np.testing.assert_array_equal(array, a0)
    np.testing.assert_allclose(m, m0, atol=1e-6)


def test_oblique_lps_nrrd_round_trips_the_ras_matrix(tmp_path):
    """An oblique LPS-stored file: the RAS matrix we return must be the LPS header with x, y negated."""
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, size=(7, 9, 11), dtype=np.int16)
    image = sitk.GetImageFromArray(data)
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    array, m = read_volume(path)
    np.testing.assert_array_equal(array, data)
    expected = np.eye(4)
    expected[:3, :3] = direction * [0.8, 0.9, 2.5]
    expected[:3, 3] = (10.0, -20.0, 30.0)
    np.testing.assert_allclose(m, np.diag([-1, -1, 1, 1]) @ expected, atol=1e-9)
    np.testing.assert_allclose(volume_io.ras_to_lps_matrix(m), expected, atol=1e-9)


def test_singleton_time_axis_is_read_as_3d(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(data[..., None], np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    array, m = read_volume(path)
    assert array.shape == (6, 5, 4)  # K, J, I
    np.testing.assert_array_equal(array, data.transpose(2, 1, 0))
    np.testing.assert_allclose(np.linalg.norm(m[:3, :3], axis=0), [2, 2, 3])


# ---------------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist; check the path"):
        read_volume(tmp_path / "nope.nii.gz")


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"this is not a volume" * 10)
    with pytest.raises(InputError, match="cannot read .* as a volume"):
        read_volume(path)


def test_2d_image(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(path))
    with pytest.raises(InputError, match="2D image .* needs a 3D volume"):
        read_volume(path)


def test_single_slice_volume(tmp_path):
    path = tmp_path / "one.nrrd"
    sitk.WriteImage(sitk.Image(16, 16, 1, sitk.sitkInt16), str(path))
    with pytest.raises(InputError, match="single slice"):
        read_volume(path)


def test_4d_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4)), str(path))
    with pytest.raises(InputError, match="4D volume .* extract one time point"):
        read_volume(path)


def test_vector_volume(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(path))
    with pytest.raises(InputError, match="vector/multi-component .* extract one component"):
        read_volume(path)


def test_complex_volume(tmp_path):
    path = tmp_path / "complex.mha"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkComplexFloat32), str(path))
    # MetaImage stores complex as 2 components; either way it must be refused with a fix.
    with pytest.raises(InputError, match="complex voxels|vector/multi-component"):
        read_volume(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM series found"):
        read_volume(tmp_path)


def test_too_large_for_memory(ct_path, monkeypatch):
    monkeypatch.setattr(volume_io, "available_memory_bytes", lambda: 1000)
    with pytest.raises(InputError, match=r"needs 0\.00\d* GiB of memory but only 0\.00 GiB is available"):
        read_volume(ct_path)


# --- DICOM series that would give wrong geometry if read blindly ------------------------------------------------------


@pytest.fixture
def dicom_copy(data_dir, tmp_path):
    """The test series, file by file in GDCM's (position) order, copied so that tests may edit headers."""
    pydicom = pytest.importorskip("pydicom")
    out = tmp_path / "series"
    out.mkdir()
    copies = []
    for n, f in enumerate(dicom_files(data_dir)):
        target = out / f"slice{n:03d}.dcm"
        shutil.copy(f, target)
        copies.append(target)
    return pydicom, out, copies


def test_dicom_missing_slice_is_refused(dicom_copy):
    _, folder, files = dicom_copy
    files[10].unlink()
    with pytest.raises(InputError, match="uneven slice spacing .* missing slices"):
        read_volume(folder)


def test_dicom_gantry_tilt_is_refused(dicom_copy):
    pydicom, folder, files = dicom_copy
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * n, z]  # 0.5 mm sideways per 2 mm slice: ~14 degrees tilt
        ds.save_as(f)
    with pytest.raises(InputError, match="tilted gantry"):
        read_volume(folder)


def test_dicom_several_series_need_a_choice(dicom_copy):
    pydicom, folder, files = dicom_copy
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.3.1" if n % 2 == 0 else "1.2.3.2"
        ds.save_as(f)
    with pytest.raises(InputError, match=r"holds 2 DICOM series: .*'1\.2\.3\.1' \(10 files\).* pass series_uid"):
        read_volume(folder)
    array, m = read_volume(folder, series_uid="1.2.3.1")
    assert array.shape == (10, 512, 512)
    np.testing.assert_allclose(np.linalg.norm(m[:3, :3], axis=0), [0.9765625, 0.9765625, 4.0])
    with pytest.raises(InputError, match="is not in"):
        read_volume(folder, series_uid="9.9")
