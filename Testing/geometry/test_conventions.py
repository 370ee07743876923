"""Per-task image conventions: plane-native M3D-Cap display (m3d-cap-v2), M3D-RefSeg's own axes (m3d-refseg-v1),
M3D-Seg's (m3d-seg-v1) checked against the official preprocessing chains, and the per-task intensity defaults.

Oracles that are not our code: MONAI transforms as the official ``Data/process/*.py`` scripts call them on nibabel
arrays, nibabel's orientation codes, and TotalSegmentator's labels on the real CT.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from geometry_references import PERMUTATIONS, make_affine, same_grid_reorder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from M3DAssistantLib import tasks
from M3DAssistantLib.errors import InputError
from M3DAssistantLib.geometry import (
    CONVENTIONS,
    RasRoi,
    box_to_roi,
    mask_to_model,
    roi_to_box,
    slice_axis,
    slice_plane,
    to_model_input,
)
from M3DAssistantLib.preprocessing import (
    SEG_PERCENTILES_WINDOW,
    VOLUME_PERCENTILES_WINDOW,
    DisplayWindow,
    IntensitySpec,
    default_window,
    volume_percentile_bounds,
)

SMALL = (8, 32, 32)
LETTER = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def blob(shape=(14, 18, 16), seed=0):
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000.0)
    vol[2:-2, 3:-3, 2:-2] = rng.normal(40, 200, size=(shape[0] - 4, shape[1] - 6, shape[2] - 4))
    return vol.astype(np.int16)


def direction_letters(model_to_ras):
    """The anatomical letter each model axis increases toward (nearest RAS axis, sign)."""
    out = []
    for m in range(3):
        col = model_to_ras[:3, m]
        r = int(np.argmax(np.abs(col)))
        out.append({(0, 1): "R", (0, -1): "L", (1, 1): "A", (1, -1): "P", (2, 1): "S", (2, -1): "I"}[
            (r, int(np.sign(col[r])))])
    return tuple(out)


# ------------------------------------------------------------------------------------------- plane-native (v2)
@st.composite
def grids(draw):
    perm = draw(st.sampled_from(PERMUTATIONS))
    flips = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    spacing = draw(st.tuples(*[st.floats(0.5, 4.0) for _ in range(3)]))
    angles = draw(st.one_of(st.just((0.0, 0.0, 0.0)), st.tuples(*[st.floats(-0.35, 0.35) for _ in range(3)])))
    origin = draw(st.tuples(*[st.floats(-150, 150)] * 3))
    return make_affine(perm, flips, spacing, angles, origin)


@SETTINGS
@given(grids())
def test_plane_native_reads_the_slice_axis_in_its_planes_display(m):
    """D reads the slice axis; each model axis points the way the plane's radiological display says; the stack has
    the handedness of the axial one (a rotation of it, never a mirror image)."""
    _, mapping = to_model_input(blob(), m, window="minmax", model_shape=SMALL, convention="m3d-cap-v2")
    assert mapping.model_axes[0] == 2 - slice_axis(m)  # array axis of the slice axis
    plane = slice_plane(m)
    assert mapping.model_plane == plane
    assert direction_letters(mapping.model_to_ras) == CONVENTIONS["m3d-cap-v2"].plane_directions[plane]
    assert np.linalg.det(mapping.model_to_ras[:3, :3]) > 0  # same handedness as (I, P, L) in every plane
    if plane == "axial":
        _, v1 = to_model_input(blob(), m, window="minmax", model_shape=SMALL, convention="m3d-cap-v1")
        np.testing.assert_allclose(mapping.model_to_ras, v1.model_to_ras, atol=1e-9)


@SETTINGS
@given(grids(), st.tuples(*[st.floats(0.2, 0.8)] * 3), st.tuples(*[st.floats(0.1, 0.4)] * 3),
       st.sampled_from(sorted(CONVENTIONS)))
def test_model_ras_round_trip_under_every_convention(m, frac, size_frac, convention):
    """RAS -> model -> RAS is the identity, and an ROI -> box -> ROI -> box comes back to the same box."""
    vol = blob()
    _, mapping = to_model_input(vol, m, window="minmax", model_shape=SMALL, convention=convention,
                                crop_foreground=False)
    extent = np.array(vol.shape[::-1]) - 1
    centre = (m @ np.append(np.array(frac) * extent, 1.0))[:3]
    points = centre + np.random.default_rng(1).normal(0, 20, (10, 3))
    there = mapping.ras_to_model @ np.c_[points, np.ones(10)].T
    back = (mapping.model_to_ras @ there)[:3].T
    np.testing.assert_allclose(back, points, atol=1e-6)
    size = np.array(size_frac) * extent * np.linalg.norm(m[:3, :3], axis=0)
    box = roi_to_box(RasRoi(centre, size, axes=m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)), mapping)
    assert roi_to_box(box_to_roi(box, mapping), mapping) == box


@pytest.mark.parametrize("perm_kji, flip_kji", [((0, 2, 1), (False, True, False)), ((0, 1, 2), (True, True, True)),
                                                ((0, 2, 1), (True, False, True))])
def test_plane_native_tensor_does_not_depend_on_in_plane_storage(perm_kji, flip_kji):
    """Storing the same slices with rows and columns swapped or mirrored, or the stack reversed, changes nothing."""
    vol = blob((12, 20, 17), seed=3)
    m = make_affine((0, 2, 1), (True, False, False), (0.8, 0.8, 3.0))  # K along A: a coronal series
    assert slice_plane(m) == "coronal"
    t1, map1 = to_model_input(vol, m, model_shape=SMALL, convention="m3d-cap-v2")
    vol2, m2 = same_grid_reorder(vol, m, perm_kji, flip_kji)
    t2, map2 = to_model_input(vol2, m2, model_shape=SMALL, convention="m3d-cap-v2")
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_allclose(map1.model_to_ras, map2.model_to_ras, atol=1e-9)


def test_slice_axis_is_k_unless_another_axis_is_clearly_thicker():
    assert slice_axis(make_affine(spacing=(1.0, 1.0, 1.0))) == 2  # isotropic: as stored
    assert slice_axis(make_affine(spacing=(0.78, 0.78, 0.625))) == 2  # thin slices still are slices
    assert slice_axis(make_affine(spacing=(0.7, 3.0, 0.7))) == 1  # coronal acquisition stored as RAS
    assert slice_axis(make_affine(spacing=(4.0, 0.9, 1.0))) == 0
    assert slice_axis(make_affine(spacing=(1.2, 1.0, 1.0))) == 2  # not clearly thicker
    assert slice_plane(make_affine(perm=(0, 2, 1), spacing=(0.7, 0.7, 3.0))) == "coronal"
    assert slice_plane(make_affine(perm=(1, 2, 0), spacing=(0.7, 0.7, 3.0))) == "sagittal"
    assert slice_plane(make_affine(spacing=(0.7, 3.0, 0.7))) == "coronal"  # J along A is the thick one


# ------------------------------------------------------------------------------------------ on the real CT
@pytest.fixture(scope="module")
def labels(data_dir):
    from M3DAssistantLib.volume_io import read_volume

    array, _ = read_volume(data_dir / "example_seg.nii.gz")
    assert array.shape == (30, 101, 122)
    return array


LIVER, SPLEEN, AORTA, SPINAL_CORD = 5, 1, 52, 79
LUNGS = (10, 11, 12, 13, 14)


def centroid(mask):
    return np.array(np.nonzero(mask)).mean(axis=1)


def reformat(array, m, plane):
    """The same voxels stored as a series of another plane: K along A (coronal) or R (sagittal), no resampling."""
    perm = {"coronal": (1, 0, 2), "sagittal": (2, 0, 1)}[plane]  # new (K, J, I) from old array axes
    return same_grid_reorder(array, m, perm, (False, False, False))


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_real_ct_in_each_plane_is_shown_as_that_planes_display(ct, labels, plane):
    """The bundled CT re-stored as a coronal and a sagittal series: m3d-cap-v2 shows each as a radiology screen
    shows that plane; the anatomy (TotalSegmentator labels) lands where the display puts it."""
    array, m = ct
    seg = labels
    if plane != "axial":
        array, m2 = reformat(array, m, plane)
        seg, _ = reformat(labels, m, plane)
        m = m2
    assert slice_plane(m) == plane
    _, mapping = to_model_input(array, m, window="abdomen", convention="m3d-cap-v2")
    assert mapping.model_plane == plane
    model = mask_to_model(seg, mapping)
    liver, spleen = centroid(model == LIVER), centroid(model == SPLEEN)
    aorta, cord = centroid(model == AORTA), centroid(model == SPINAL_CORD)
    lungs = centroid(np.isin(model, LUNGS))
    if plane == "axial":  # D superior->inferior, H anterior->posterior, W patient right->left
        assert lungs[0] < liver[0] and aorta[1] < cord[1] and liver[2] < spleen[2]
    elif plane == "coronal":  # D posterior->anterior, H superior->inferior, W patient right->left
        assert cord[0] < aorta[0] and lungs[1] < liver[1] and liver[2] < spleen[2]
    else:  # sagittal: D patient right->left, H superior->inferior, W anterior->posterior
        assert liver[0] < spleen[0] and lungs[1] < liver[1] and aorta[2] < cord[2]
    # m3d-cap-v1 ignores the series' plane: always axial
    _, v1 = to_model_input(array, m, window="abdomen", convention="m3d-cap-v1")
    assert v1.model_plane == "axial"


def _official_refseg_chain(ct_path):
    """Data/process/m3d_refseg_data_prepare.py on a nibabel array (lines 11-17 and 26), with MONAI."""
    import monai.transforms as mtf
    import nibabel as nib

    image = nib.load(str(ct_path)).get_fdata().transpose(2, 0, 1)[np.newaxis, ...]
    chain = mtf.Compose([
        mtf.ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        mtf.CropForeground(),
        mtf.Resize(spatial_size=[32, 256, 256], mode="trilinear"),
    ])
    return np.asarray(chain(image))[0]


def test_refseg_convention_and_window_equal_the_official_refseg_chain(ct, ct_path):
    """On a TotalSegmentator (RAS-stored) CT, as M3D-RefSeg's sources, m3d-refseg-v1 with the whole-volume
    0.5/99.5 percentiles is the official M3D-RefSeg preprocessing."""
    array, m = ct
    tensor, mapping = to_model_input(array, m, convention="m3d-refseg-v1",
                                     window=default_window(VOLUME_PERCENTILES_WINDOW))
    assert mapping.intensity["scheme"] == "volume-percentile" and mapping.intensity["percentiles"] == [0.5, 99.5]
    np.testing.assert_allclose(tensor[0], _official_refseg_chain(ct_path), atol=1e-4, rtol=0)
    # the M3D-Seg orientation is not it: in-plane axes swapped
    seg_tensor, _ = to_model_input(array, m, convention="m3d-seg-v1", window=default_window(VOLUME_PERCENTILES_WINDOW))
    assert np.abs(seg_tensor[0] - tensor[0]).mean() > 0.05


def test_seg_convention_equals_the_official_seg_chain_on_lps_stored_files(ct, tmp_path):
    """m3d_seg_data_prepare.py (swapaxes(-1, -3), min-max, CropForeground, Resize) on an LPS-stored NIfTI -- as
    the M3D-Seg sources mostly are -- after m3d_seg_data_preprocess.py's foreground-percentile clip is
    m3d-seg-v1 with its default window."""
    import monai.transforms as mtf
    import nibabel as nib

    from M3DAssistantLib.volume_io import read_volume

    array, m = ct
    lps = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)[::-1, ::-1]).astype(np.int16),
                          m @ _flip_ij(array.shape))
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    path = tmp_path / "lps.nii.gz"
    nib.save(lps, str(path))
    data = nib.load(str(path)).get_fdata()
    foreground = data[data > data.mean()]
    low, high = np.percentile(foreground, (0.05, 99.95))
    image = np.swapaxes(np.clip(data, low, high)[np.newaxis], -1, -3)
    image = (image - image.min()) / (image.max() - image.min())
    chain = mtf.Compose([mtf.CropForeground(), mtf.Resize(spatial_size=[32, 256, 256], mode="bilinear")])
    official = np.asarray(chain(image))[0]
    ours, _ = to_model_input(*read_volume(path), convention="m3d-seg-v1", window=default_window(SEG_PERCENTILES_WINDOW))
    np.testing.assert_allclose(ours[0], official, atol=1e-4, rtol=0)


def _flip_ij(shape_kji):
    """Index map that reverses i and j (so the same voxels sit at the same RAS positions when stored LPS)."""
    f = np.eye(4)
    f[0, 0], f[0, 3] = -1.0, shape_kji[2] - 1
    f[1, 1], f[1, 3] = -1.0, shape_kji[1] - 1
    return f


# ------------------------------------------------------------------------------------------ intensity defaults
def test_volume_percentiles_are_numpys_on_large_volumes():
    rng = np.random.default_rng(2)
    vol = rng.normal(0, 300, (90, 128, 128)).astype(np.int16)
    vol[:, :20] = -1024  # lots of air, as outside a body
    assert volume_percentile_bounds(vol, direct_below=1) == tuple(float(v) for v in np.percentile(vol, (0.5, 99.5)))


def test_default_window_per_task():
    ct_range, mr_range = (-1024.0, 2000.0), (0.0, 900.0)
    dicom = DisplayWindow(40, 300, "DICOM")

    def default(task_name, **kwargs):  # each task's window kind comes from the task registry
        return default_window(tasks.get(task_name).window, **kwargs)

    assert default("report", value_range=ct_range) == IntensitySpec("window", "abdomen", 40.0, 350.0)
    assert default("vqa_open", display_window=dicom, value_range=ct_range) == \
        IntensitySpec("window", "display (DICOM)", 40.0, 300.0)
    assert default("vqa_closed", value_range=mr_range).scheme == "percentile"  # MR: no standard window
    assert default("report", modality="CT", value_range=(500.0, 3000.0)).scheme == "percentile"  # misses it
    assert default("report", modality="MR", value_range=ct_range).scheme == "percentile"
    for task in ("seg", "rec", "reg"):
        assert default(task, display_window=dicom, value_range=ct_range).scheme == "percentile"
    assert default("refseg", display_window=dicom).scheme == "volume-percentile"
    # a Slicer display window wins over the abdomen preset, and one that misses the data is skipped
    assert default("report", display_window=DisplayWindow(-600, 1500, "Slicer"), value_range=ct_range).name \
        == "display (Slicer)"
    assert default("report", display_window=DisplayWindow(5000, 10, "Slicer"), value_range=ct_range).name \
        == "abdomen"
    with pytest.raises(ValueError, match="unknown window kind 'report'"):
        default_window("report")
    with pytest.raises(InputError, match="display window .* from Slicer is invalid"):
        DisplayWindow(40, 0, "Slicer")


def test_reg_snaps_a_drawn_roi_to_the_training_grid(engine):
    from forcing import forced_answer

    mapping = engine._view("reg").mapping
    drawn = box_to_roi((0.1, 0.2, 0.3, 0.5, 0.6, 0.7), mapping)  # between grid lines
    with forced_answer(engine, " The target is liver."):
        result = engine.describe_region(drawn)
    snapped = roi_to_box(drawn, mapping, snap=True)
    assert "<bx_start>[0.125, 0.203, 0.297, 0.5, 0.594, 0.703]<bx_end>" in result.provenance.prompt
    assert snapped == (0.125, 0.203, 0.297, 0.5, 0.594, 0.703)
    d, h, w = (32, 256, 256)
    for value, n in zip(snapped, (d, h, w, d, h, w)):
        assert abs(value * n - round(value * n)) < 0.5 * n / 1000 + 1e-9  # k/N, rounded to 3 decimals


# ------------------------------------------------------------------------------------------ DICOM display window
def test_dicom_window_and_modality_are_read_from_the_series(data_dir):
    from M3DAssistantLib.volume_io import read_volume_metadata

    meta = read_volume_metadata(data_dir / "example_ct_dicom")
    assert meta.modality == "CT"
    assert meta.display_window == DisplayWindow(40.0, 300.0, "DICOM")  # "40\300" / "300\1500": the first pair
    assert read_volume_metadata(data_dir / "example_ct_sm.nii.gz").display_window is None
    with pytest.raises(InputError, match="does not exist"):
        read_volume_metadata(data_dir / "missing")


def test_dicom_window_parsing_takes_the_first_value():
    from M3DAssistantLib.volume_io import _first_value

    assert _first_value("40\\400 ") == 40.0 and _first_value(" -600") == -600.0
    assert _first_value("") is None and _first_value(None) is None and _first_value("abc") is None


# ------------------------------------------------------------------------------------------ engine: per-task views
@pytest.fixture
def default_engine(tiny_phi3_model, ct):
    from M3DAssistantLib.engine import InferenceEngine

    eng = InferenceEngine(tiny_phi3_model)
    eng.set_volume(*ct, display_window=DisplayWindow(40, 300, "DICOM"), modality="CT")
    yield eng
    eng.model.__dict__.pop("generate", None)


def test_each_task_gets_its_training_datas_window_and_orientation(default_engine):
    from M3DAssistantLib.results import SamplingOptions

    short = SamplingOptions(max_new_tokens=3)
    engine = default_engine
    report = engine.report(sampling=short)
    answer = engine.ask("Is the liver enlarged?", sampling=short)
    assert engine.counters["vision_tower"] == 1  # report and VQA share one view: same convention and window
    assert report.provenance.convention == answer.provenance.convention == "m3d-cap-v2@v1"
    intensity = json.loads(report.provenance.intensity)  # JSON, not a Python repr
    assert intensity["name"] == "display (DICOM)" and intensity["center"] == 40.0
    box = engine.locate("liver", sampling=short)
    assert box.provenance.convention == "m3d-seg-v1@v1"
    assert json.loads(box.provenance.intensity)["scheme"] == "percentile"
    seg = engine.segment_expression("the cyst in the right kidney", sampling=short)
    assert seg.provenance.convention == "m3d-refseg-v1@v1"
    assert json.loads(seg.provenance.intensity)["scheme"] == "volume-percentile"
    assert engine.counters["vision_tower"] == 3


def test_a_chosen_window_overrides_every_tasks_default(tiny_phi3_model, ct):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.results import SamplingOptions

    engine = InferenceEngine(tiny_phi3_model)
    engine.set_volume(*ct, window="lung", display_window=(40, 300))
    short = SamplingOptions(max_new_tokens=2)
    for result in (engine.report(sampling=short), engine.locate("liver", sampling=short)):
        assert json.loads(result.provenance.intensity)["name"] == "lung"


@pytest.mark.parametrize("task", ["report", "locate", "segment_expression"])
def test_per_task_views_cached_and_uncached_give_identical_answers(tiny_phi3_model, ct, task):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.results import SamplingOptions

    texts = []
    for caching in (True, False):
        engine = InferenceEngine(tiny_phi3_model, caching=caching)
        engine.set_volume(*ct, display_window=(40, 300), modality="CT")
        short = SamplingOptions(max_new_tokens=6)
        engine.report(sampling=short)  # a different view first: the cache must not hand it to the next task
        args = () if task == "report" else ("liver",)
        texts.append(getattr(engine, task)(*args, sampling=short).text)
    assert texts[0] == texts[1]


def test_view_cache_is_keyed_by_window_as_well_as_convention(tiny_phi3_model, ct):
    """With one convention forced for all tasks, report (display window) and locate (percentiles) still get their
    own views, and cached answers equal uncached ones."""
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.results import SamplingOptions

    short = SamplingOptions(max_new_tokens=6)
    runs = []
    for caching in (True, False):
        engine = InferenceEngine(tiny_phi3_model, caching=caching, convention="m3d-seg-v1")
        engine.set_volume(*ct, display_window=(40, 300))
        report, box = engine.report(sampling=short), engine.locate("liver", sampling=short)
        runs.append((report.text, box.text, report.provenance.intensity, box.provenance.intensity))
        if caching:
            assert engine.counters["vision_tower"] == 2
    assert runs[0] == runs[1]
    assert "display" in runs[0][2] and "percentile" in runs[0][3]
