"""geometry: absolute checks against independent references (nibabel orientation, torch interpolate / grid_sample,
MONAI's official chain, scipy), the box format, serialisation, and every bad input of issue 3."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from geometry_references import (
    canonical,
    dice,
    make_affine,
    monai_chain,
    same_grid_reorder,
    seg_percentiles,
    torch_resize,
    voxel_ras,
)

from M3DAssistantLib.errors import GeometryError, InputError
from M3DAssistantLib.geometry import (
    CONVENTIONS,
    DEFAULT_CONVENTION,
    WINDOW_PRESETS,
    RasRoi,
    VolumeToModelMapping,
    box_to_roi,
    convention_directions,
    format_box,
    logits_to_mask,
    mask_to_box,
    mask_to_model,
    model_mask_to_volume,
    parse_box,
    roi_to_box,
    to_model_input,
)
from M3DAssistantLib.tasks import convention_for

SMALL = (16, 64, 64)


def blob_volume(shape=(20, 27, 33), seed=0, dtype=np.int16):
    """Air-like background with a noisy 'body' box, so the foreground crop has work to do."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, dtype=np.float64)
    body = tuple(slice(max(1, s // 6), s - max(1, s // 5)) for s in shape)
    vol[body] = rng.normal(40, 200, size=vol[body].shape)
    return vol.astype(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Absolute geometry: model voxel centres in RAS
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
@pytest.mark.parametrize(
    "perm, flips, spacing, angles",
    [
        ((0, 1, 2), (False, False, False), (3.0, 3.0, 3.0), (0, 0, 0)),  # RAS-stored NIfTI
        ((0, 1, 2), (True, True, False), (0.7, 0.7, 2.5), (0, 0, 0)),  # LPS-stored DICOM
        ((2, 0, 1), (False, True, True), (1.1, 0.6, 4.0), (0.2, -0.3, 0.4)),  # permuted, flipped, oblique
        ((1, 2, 0), (True, False, True), (2.0, 0.9, 1.3), (-0.4, 0.1, 0.25)),
    ],
)
def test_model_voxel_centres_match_torch_interpolate(convention, perm, flips, spacing, angles):
    """Where model voxel (d, h, w) samples, according to torch's own F.interpolate applied to volumes whose values are
    their voxel centres' RAS coordinates (trilinear reproduces a linear function exactly), must equal
    ``mapping.model_to_ras @ (d, h, w, 1)`` -- to 1e-6 mm, with the foreground crop computed by MONAI."""
    import monai.transforms as mt

    m = make_affine(perm, flips, spacing, angles, origin=(-12.5, 30.25, 7.0))
    vol = blob_volume()
    _, mapping = to_model_input(vol, m, window="minmax", model_shape=SMALL, convention=convention)
    directions = convention_directions(m, CONVENTIONS[mapping.convention])  # a plane-native one: this volume's plane

    can = canonical(vol, m, directions)
    _, start, end = mt.CropForeground(return_coords=True)(can[None].astype(np.float32) + 1000)
    crop = tuple(slice(int(s), int(e)) for s, e in zip(start, end))
    assert mapping.crop_shape == tuple(e - s for s, e in zip(start, end))

    ras = voxel_ras(vol.shape, m)
    ref = np.stack([torch_resize(canonical(ras[..., c], m, directions)[crop], SMALL) for c in range(3)], axis=-1)
    dd, hh, ww = np.indices(SMALL, dtype=np.float64)
    ours = np.stack([dd, hh, ww], -1) @ mapping.model_to_ras[:3, :3].T + mapping.model_to_ras[:3, 3]
    # Upsampled axes clamp at the border (torch replicates the edge voxel); the affine is the unclamped line.
    interior = np.ones(SMALL, bool)
    for axis, (n, big_n) in enumerate(zip(mapping.crop_shape, SMALL)):
        o = np.arange(big_n)
        src = (o + 0.5) * n / big_n - 0.5
        ok = (src >= 0) & (src <= n - 1)
        shape = [1, 1, 1]
        shape[axis] = -1
        interior &= ok.reshape(shape)
    assert interior.mean() > 0.5
    np.testing.assert_allclose(ours[interior], ref[interior], atol=1e-6, rtol=0)


def test_mapping_inverses_and_serialisation():
    m = make_affine((2, 0, 1), (True, False, True), (0.8, 1.2, 3.0), (0.1, 0.2, -0.3), (5, 6, 7))
    _, mapping = to_model_input(blob_volume(), m, model_shape=SMALL, convention="m3d-seg")
    assert mapping.convention == "m3d-seg-v1" and mapping.version == 1
    np.testing.assert_allclose(mapping.model_to_ras @ mapping.ras_to_model, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(mapping.model_to_ijk @ mapping.ijk_to_model, np.eye(4), atol=1e-12)
    text = mapping.to_json()
    back = VolumeToModelMapping.from_json(text)
    assert back == mapping
    np.testing.assert_array_equal(back.model_to_ras, mapping.model_to_ras)
    d = json.loads(text)
    assert d["intensity"]["scheme"] == "percentile" and d["intensity"]["percentiles"] == [0.05, 99.95]
    # The model spacing is what the docs say: crop extent (mm) / model size, per model axis.
    spacing_by_array_axis = np.linalg.norm(m[:3, :3], axis=0)[::-1]  # K, J, I
    expected = [mapping.crop_shape[i] * spacing_by_array_axis[a] / SMALL[i] for i, a in enumerate(mapping.model_axes)]
    np.testing.assert_allclose(mapping.model_spacing, expected, rtol=1e-12)


def test_mapping_json_errors():
    _, mapping = to_model_input(blob_volume(), np.eye(4), model_shape=SMALL)
    d = mapping.to_dict()
    with pytest.raises(GeometryError, match="geometry version 99; this code reads version 1"):
        VolumeToModelMapping.from_dict({**d, "version": 99})
    tampered = {**d, "model_to_ras": (np.array(d["model_to_ras"]) + 1).tolist()}
    with pytest.raises(GeometryError, match="edited or corrupted"):
        VolumeToModelMapping.from_dict(tampered)
    with pytest.raises(GeometryError, match="not valid JSON"):
        VolumeToModelMapping.from_json("{nope")
    with pytest.raises(GeometryError, match="incomplete or malformed"):
        VolumeToModelMapping.from_dict({"version": 1})


# ---------------------------------------------------------------------------------------------------------------------
# Same numbers as the official MONAI chain
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, "minmax", "abdomen", "lung", "bone", "brain", (100.0, 700.0)])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint16, np.float64, np.int32])
def test_tensor_matches_monai_chain(window, dtype):
    shape = (23, 40, 37)
    vol = blob_volume(shape, seed=3)
    if dtype == np.uint16:
        vol = (vol.astype(np.int32) + 1024).astype(np.uint16)
    vol = vol.astype(dtype)
    m = make_affine((1, 0, 2), (True, False, True), (0.9, 1.4, 2.2), (0.1, 0.05, -0.2))
    tensor, mapping = to_model_input(vol, m, window=window, model_shape=SMALL)
    assert tensor.shape == (1, *SMALL) and tensor.dtype == np.float32
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    can = canonical(vol, m)
    if window is None:
        low, high = seg_percentiles(vol)
    elif window == "minmax":
        low, high = float(vol.min()), float(vol.max())
    else:
        c, w = WINDOW_PRESETS[window] if isinstance(window, str) else window
        low, high = c - w / 2, c + w / 2
    ref = monai_chain(can, low, high, SMALL)
    np.testing.assert_allclose(tensor[0], ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(mapping.intensity["low"], max(low, float(vol.min())), rtol=1e-9)


def test_upsampling_and_single_axis_shapes_match_torch():
    """Small volumes are upsampled (edge clamping) -- still the official numbers."""
    vol = np.random.default_rng(1).normal(size=(5, 9, 70)).astype(np.float32)
    tensor, mapping = to_model_input(vol, np.eye(4), window="minmax", model_shape=(16, 32, 32), crop_foreground=False)
    can = canonical(vol, np.eye(4))
    ref = torch_resize((can - vol.min()) / (vol.max() - vol.min()), (16, 32, 32))
    np.testing.assert_allclose(tensor[0], ref, atol=1e-5)
    assert mapping.crop_shape == (5, 9, 70)


@pytest.mark.parametrize("mode", ["nearest-exact", "nearest"])
def test_mask_to_model_matches_monai_nearest(mode):
    import monai.transforms as mt

    rng = np.random.default_rng(2)
    vol = blob_volume((25, 31, 45), seed=2)
    labels = rng.integers(0, 4, size=vol.shape).astype(np.uint8)
    m = make_affine((0, 2, 1), (False, True, True), (1.0, 2.0, 0.7))
    _, mapping = to_model_input(vol, m, model_shape=SMALL)
    ours = mask_to_model(labels, mapping, mode=mode)
    can = canonical(labels, m)[tuple(slice(s, s + n) for s, n in zip(
        [_canonical_start(mapping, i) for i in range(3)], mapping.crop_shape))]
    ref = np.asarray(mt.Resize(SMALL, mode=mode)(can[None].astype(np.float32)))[0]
    np.testing.assert_array_equal(ours, ref.astype(np.uint8))
    assert ours.dtype == np.uint8


def _canonical_start(mapping, model_axis):
    a = mapping.model_axes[model_axis]
    if mapping.model_flips[model_axis]:
        return mapping.volume_shape[a] - mapping.crop_stop[a]
    return mapping.crop_start[a]


# ---------------------------------------------------------------------------------------------------------------------
# Backward: logits -> mask on the original grid
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("perm, flips, angles", [((0, 1, 2), (True, True, False), (0, 0, 0)),
                                                 ((2, 0, 1), (False, True, True), (0.3, -0.2, 0.1))])
def test_logits_to_mask_matches_grid_sample(perm, flips, angles):
    """torch grid_sample (align_corners=False, border) of the logits at each original voxel centre, taken to model
    coordinates by our ijk_to_model, thresholded at 0 -- voxel for voxel inside the crop box, zero outside."""
    rng = np.random.default_rng(4)
    vol = blob_volume((22, 30, 41), seed=4)
    m = make_affine(perm, flips, (1.3, 0.8, 2.1), angles)
    _, mapping = to_model_input(vol, m, model_shape=SMALL)
    logits = torch.from_numpy(rng.normal(size=SMALL).astype(np.float32))
    logits = F.avg_pool3d(logits[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]  # smooth-ish
    mask = logits_to_mask(logits, mapping)
    assert mask.dtype == np.uint8 and mask.shape == vol.shape

    kk, jj, ii = np.indices(vol.shape, dtype=np.float64)
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    dhw = (mapping.ijk_to_model @ ijk)[:3]
    norm = (2 * dhw + 1) / np.array(SMALL)[:, None] - 1  # align_corners=False normalisation
    grid = torch.from_numpy(norm[::-1].T.reshape(1, *vol.shape, 3).astype(np.float32))  # grid is (x=w, y=h, z=d)
    sampled = F.grid_sample(logits[None, None].double(), grid.double(), mode="bilinear", padding_mode="border",
                            align_corners=False)[0, 0].numpy()
    inside = np.zeros(vol.shape, bool)
    inside[tuple(slice(s, e) for s, e in zip(mapping.crop_start, mapping.crop_stop))] = True
    ref = (sampled > 0) & inside
    near_zero = np.abs(sampled) < 1e-5
    assert np.array_equal(mask.astype(bool)[~near_zero], ref[~near_zero])
    assert not mask[~inside].any()


def test_logits_to_mask_matches_scipy_affine_transform():
    from scipy.ndimage import affine_transform

    vol = blob_volume((30, 40, 50), seed=5)
    m = make_affine((0, 1, 2), (True, True, False), (0.8, 0.8, 2.0))
    _, mapping = to_model_input(vol, m, model_shape=SMALL)
    d, h, w = np.indices(SMALL)
    logits = (12.0 - np.sqrt((d - 8.0) ** 2 + ((h - 30.0) / 3) ** 2 + ((w - 28.0) / 3) ** 2)).astype(np.float32)
    ours = logits_to_mask(logits, mapping)
    # scipy: output voxel (k, j, i) of the crop box reads model coordinate ijk_to_model @ (i, j, k).
    crop = tuple(slice(s, e) for s, e in zip(mapping.crop_start, mapping.crop_stop))
    shift = np.eye(4)
    shift[:3, 3] = np.array(mapping.crop_start)[::-1]
    kji_to_ijk = np.eye(4)[[2, 1, 0, 3]]
    mat = mapping.ijk_to_model @ shift @ kji_to_ijk  # crop-relative (k, j, i) -> (d, h, w)
    ref_crop = affine_transform(logits, mat[:3, :3], mat[:3, 3], output_shape=ours[crop].shape, order=1, mode="nearest")
    assert dice(ours[crop], ref_crop > 0) > 0.999
    assert ours.sum() == ours[crop].sum()


def test_logits_input_forms_and_threshold():
    vol = blob_volume()
    _, mapping = to_model_input(vol, np.eye(4), model_shape=SMALL)
    logits = np.full(SMALL, -3.0, np.float32)
    logits[4:10, 20:40, 20:40] = 3.0
    base = logits_to_mask(logits, mapping)
    assert base.any()
    np.testing.assert_array_equal(logits_to_mask(torch.from_numpy(logits)[None, None], mapping), base)
    np.testing.assert_array_equal(logits_to_mask(logits[None].astype(np.float64), mapping), base)
    assert not logits_to_mask(np.full(SMALL, -np.inf), mapping).any()  # official "no [SEG]" logits
    assert not logits_to_mask(np.full(SMALL, np.nan), mapping).any()
    # a 0.99 threshold keeps fewer voxels than 0.5
    assert logits_to_mask(logits, mapping, threshold=0.99).sum() < base.sum()
    np.testing.assert_array_equal(model_mask_to_volume(logits > 0, mapping), base)
    # the final, fused step runs slab by slab on big volumes: many small slabs give the same mask
    np.testing.assert_array_equal(logits_to_mask(logits, mapping, chunk_voxels=300), base)
    m = make_affine((2, 0, 1), (True, False, True), (0.9, 1.3, 2.0), (0.2, 0.1, -0.1))
    _, oblique = to_model_input(blob_volume((19, 26, 31)), m, model_shape=SMALL)
    np.testing.assert_array_equal(logits_to_mask(logits, oblique, chunk_voxels=100), logits_to_mask(logits, oblique))
    with pytest.raises(GeometryError, match=r"shape \(32, 256, 256\) but the mapping's model space is \(16, 64, 64\)"):
        logits_to_mask(np.zeros((32, 256, 256)), mapping)
    with pytest.raises(InputError, match="threshold is a probability"):
        logits_to_mask(logits, mapping, threshold=1.5)


# ---------------------------------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------------------------------


def test_mask_to_box_official_convention():
    mask = np.zeros((32, 256, 256), bool)
    mask[3:25, 77:159, 57:142] = True  # last voxel indices 24, 158, 141
    box = mask_to_box(mask)
    assert box == (round(3 / 32, 3), round(77 / 256, 3), round(57 / 256, 3), 0.75, round(158 / 256, 3),
                   round(141 / 256, 3))
    assert format_box(box) == "[0.094, 0.301, 0.223, 0.75, 0.617, 0.551]"
    assert mask_to_box(mask[None]) == box  # official (1, D, H, W)
    assert mask_to_box(np.zeros((4, 4, 4))) is None
    single = np.zeros((32, 256, 256), np.uint8)
    single[0, 0, 0] = 1
    assert format_box(mask_to_box(single)) == "[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]"


def test_format_and_parse_box():
    assert format_box([0.5, 0.25, 0.1, 0.75, 0.5, 0.9]) == "[0.5, 0.25, 0.1, 0.75, 0.5, 0.9]"
    assert format_box([0.12345, 0, -0.0, 1, 0.5004, 0.9996]) == "[0.123, 0.0, 0.0, 1.0, 0.5, 1.0]"
    text = "[0.094, 0.301, 0.223, 0.75, 0.617, 0.551]"
    assert parse_box(text) == (0.094, 0.301, 0.223, 0.75, 0.617, 0.551)
    assert parse_box(f"Coordinates are <bx_start>{text}<bx_end>.") == parse_box(text)
    assert parse_box("Sure, [0.094,0.301,0.223,0.75,0.617,0.551].") == parse_box(text)
    assert parse_box("0.1, 0.2, 0.3, 0.4, 0.5, 0.6") == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    assert format_box(parse_box(text)) == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("[0.1, 0.2, 0.3, 0.4, 0.5]", "expected 6 comma-separated numbers"),
        ("[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]", "expected 6 comma-separated numbers"),
        ("no box here", "expected 6 comma-separated numbers"),
        ("[0.1, 0.2, x, 0.4, 0.5, 0.6]", "'x' is not a number"),
        ("[0.1, 0.2, 0.3, 0.4, 1.5, 0.6]", r"must lie in \[0, 1\].*\[1\.5\]"),
        ("[-0.1, 0.2, 0.3, 0.4, 0.5, 0.6]", r"must lie in \[0, 1\]"),
        ("[0.5, 0.2, 0.3, 0.4, 0.5, 0.6]", "inverted along d"),
        ("[0.1, 0.2, nan, 0.4, 0.5, 0.6]", "NaN or Inf"),
    ],
)
def test_parse_box_errors(text, message):
    with pytest.raises(GeometryError, match=message):
        parse_box(text)


def test_box_to_roi_known_values():
    """Identity-oriented 64^3 volume of 1 mm voxels, no crop, model 16x64x64, m3d-seg convention (d -> S, h -> P,
    w -> L): box voxels d 4..7, h 16..31, w 8..15 -> ROI edges at index -/+ 0.5."""
    vol = blob_volume((64, 64, 64))
    m = make_affine(origin=(100.0, 200.0, 300.0))
    _, mapping = to_model_input(vol, m, model_shape=(16, 64, 64), convention="m3d-seg", crop_foreground=False)
    box = (4 / 16, 16 / 64, 8 / 64, 7 / 16, 31 / 64, 15 / 64)
    roi = box_to_roi(box, mapping)
    np.testing.assert_allclose(roi.axes, np.eye(3), atol=1e-12)
    # model d (4 mm voxels) -> K; k = 4 d + 1.5; w -> -R: i = 63 - w; h -> -A: j = 63 - h
    np.testing.assert_allclose(roi.size, [8.0, 16.0, 16.0])  # R from w, A from h, S from d
    centre_ijk = np.array([63 - 11.5, 63 - 23.5, 4 * 5.5 + 1.5])
    np.testing.assert_allclose(roi.center, centre_ijk + [100, 200, 300])
    assert roi_to_box(roi, mapping) == tuple(round(v, 3) for v in box)


def test_roi_to_box_snap_is_mask2box_of_the_voxels_inside():
    vol = blob_volume((30, 40, 50), seed=8)
    m = make_affine((2, 0, 1), (True, False, True), (0.9, 1.7, 2.4), (0.2, 0.1, -0.3))
    _, mapping = to_model_input(vol, m, model_shape=SMALL)
    rng = np.random.default_rng(8)
    dd, hh, ww = np.indices(SMALL, dtype=np.float64)
    centres = np.stack([dd, hh, ww], -1) @ mapping.model_to_ras[:3, :3].T + mapping.model_to_ras[:3, 3]
    for _ in range(20):
        box = tuple(np.sort(rng.uniform(0, 1, size=(2, 3)), axis=0).ravel())
        roi = box_to_roi(box, mapping)  # aligned with the model axes, so "inside" is exact
        expected = mask_to_box(roi.contains(centres, tol=1e-9))
        assert roi_to_box(roi, mapping, snap=True) == expected
        clipped = [min(v, (n - 1) / n) for v, n in zip(box, SMALL * 2)]  # a box ends at the last voxel, N - 1
        assert roi_to_box(roi, mapping) == tuple(round(v, 3) for v in clipped)


def test_roi_to_box_clips_and_refuses_outside():
    vol = blob_volume((20, 20, 20))
    _, mapping = to_model_input(vol, np.eye(4), model_shape=SMALL, crop_foreground=False)
    huge = RasRoi(center=(10, 10, 10), size=(500, 500, 500))
    assert roi_to_box(huge, mapping) == (0.0, 0.0, 0.0, 0.938, 0.984, 0.984)  # (N-1)/N
    with pytest.raises(GeometryError, match="lies outside the region the model sees"):
        roi_to_box(RasRoi(center=(500, 10, 10), size=(5, 5, 5)), mapping)


# ---------------------------------------------------------------------------------------------------------------------
# Crops: ROI and slice range
# ---------------------------------------------------------------------------------------------------------------------


def test_roi_and_slice_range_crop():
    vol = blob_volume((40, 50, 60), seed=7)
    m = make_affine((0, 1, 2), (True, True, False), (0.8, 0.8, 2.0), origin=(20, 30, -100))
    ras = voxel_ras(vol.shape, m)
    lo = ras[10, 12, 15]
    hi = ras[29, 39, 44]
    roi = RasRoi.from_bounds(np.minimum(lo, hi), np.maximum(lo, hi))
    _, mapping = to_model_input(vol, m, roi=roi, model_shape=SMALL, crop_foreground=False)
    assert mapping.crop_start == (10, 12, 15) and mapping.crop_stop == (30, 40, 45)
    _, mapping = to_model_input(vol, m, roi=roi, slice_range=(20, 35), model_shape=SMALL, crop_foreground=False)
    assert mapping.crop_start == (20, 12, 15) and mapping.crop_stop == (30, 40, 45)
    _, mapping = to_model_input(vol, m, slice_range=(5, 9), model_shape=SMALL, crop_foreground=False)
    assert mapping.crop_start == (5, 0, 0) and mapping.crop_stop == (9, 50, 60)
    # ROI voxels only: the tensor equals the tensor of the cropped array
    t1, _ = to_model_input(vol, m, roi=roi, window="abdomen", model_shape=SMALL)
    sub = vol[10:30, 12:40, 15:45]
    m_sub = m.copy()
    m_sub[:3, 3] = ras[10, 12, 15]
    t2, _ = to_model_input(sub, m_sub, window="abdomen", model_shape=SMALL)
    np.testing.assert_array_equal(t1, t2)


# ---------------------------------------------------------------------------------------------------------------------
# Storage-independence and conventions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("perm_kji, flip_kji", [((0, 1, 2), (True, False, False)), ((2, 0, 1), (False, True, True)),
                                                ((1, 2, 0), (True, True, True))])
def test_same_voxels_stored_differently_give_identical_tensor(perm_kji, flip_kji):
    vol = blob_volume((21, 34, 29), seed=9)
    m = make_affine((0, 1, 2), (True, True, False), (0.7, 0.9, 2.5), (0.05, -0.1, 0.15))
    t1, map1 = to_model_input(vol, m, model_shape=SMALL)
    vol2, m2 = same_grid_reorder(vol, m, perm_kji, flip_kji)
    t2, map2 = to_model_input(vol2, m2, model_shape=SMALL)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_allclose(map1.model_to_ras, map2.model_to_ras, atol=1e-9)


def test_conventions_and_task_defaults():
    assert DEFAULT_CONVENTION == "m3d-cap-v1"
    assert CONVENTIONS["m3d-cap-v1"].directions == ("I", "P", "L")
    assert CONVENTIONS["m3d-seg-v1"].directions == ("S", "P", "L")
    assert CONVENTIONS["m3d-refseg-v1"].directions == ("S", "R", "A")
    assert CONVENTIONS["m3d-cap-v2"].plane_directions == {
        "axial": ("I", "P", "L"), "coronal": ("A", "I", "L"), "sagittal": ("L", "I", "P")}
    # the task registry's defaults, by training name
    assert {t: convention_for(t) for t in ("report", "vqa_open", "vqa_closed", "rec", "reg", "seg", "refseg")} == {
        "report": "m3d-cap-v2", "vqa_open": "m3d-cap-v2", "vqa_closed": "m3d-cap-v2", "rec": "m3d-seg-v1",
        "reg": "m3d-seg-v1", "seg": "m3d-seg-v1", "refseg": "m3d-refseg-v1"}
    assert convention_for("something new") == DEFAULT_CONVENTION
    vol = blob_volume()
    t_cap, map_cap = to_model_input(vol, np.eye(4), model_shape=SMALL)
    t_seg, map_seg = to_model_input(vol, np.eye(4), model_shape=SMALL, convention="m3d-seg-v1")
    np.testing.assert_allclose(t_cap[0, ::-1], t_seg[0], atol=1e-6)  # they differ by the D direction only
    with pytest.raises(GeometryError, match="unknown orientation convention 'lps'; use one of m3d-cap-v1, m3d-cap-v2, "
                                            "m3d-seg-v1, m3d-refseg-v1"):
        to_model_input(vol, np.eye(4), convention="lps")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_arrays():
    with pytest.raises(InputError, match="single 2D image .* needs a 3D volume"):
        to_model_input(np.zeros((64, 64)), np.eye(4))
    with pytest.raises(InputError, match="4D .* select one component or time point"):
        to_model_input(np.zeros((8, 8, 8, 3)), np.eye(4))
    with pytest.raises(InputError, match="a single slice is not a 3D volume"):
        to_model_input(np.zeros((1, 64, 64)), np.eye(4))
    with pytest.raises(InputError, match="not a real scalar"):
        to_model_input(np.zeros((8, 8, 8), np.complex64), np.eye(4))


def test_nan_inf_and_constant_volumes():
    vol = blob_volume().astype(np.float32)
    vol[3, 4, 5] = np.nan
    vol[4, 4, 5] = np.inf
    with pytest.raises(InputError, match="2 NaN/Inf voxels .* replace them"):
        to_model_input(vol, np.eye(4))
    with pytest.raises(InputError, match="constant: every voxel is 7"):
        to_model_input(np.full((8, 8, 8), 7, np.int16), np.eye(4))
    with pytest.raises(InputError, match="constant: every voxel is 7"):
        to_model_input(np.full((8, 8, 8), 7, np.int16), np.eye(4), window="minmax")
    message = r"window brain \[0, 100\] does not overlap the volume's values \[-3000, -2000\]"
    with pytest.raises(InputError, match=message):
        to_model_input(np.linspace(-3000, -2000, 512).reshape(8, 8, 8), np.eye(4), window="brain")


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.int8, np.int32, np.uint32, np.int64, bool])
def test_integer_extremes_do_not_overflow(dtype):
    info = np.iinfo(dtype) if dtype is not bool else None
    lo, hi = (0, 1) if dtype is bool else (info.min, info.max)
    vol = np.full((8, 10, 12), lo, dtype=dtype)
    vol[2:6, 3:7, 4:9] = hi
    tensor, mapping = to_model_input(vol, np.eye(4), window="minmax", model_shape=(8, 16, 16), crop_foreground=False)
    assert tensor.min() == 0.0 and tensor.max() == 1.0
    assert mapping.intensity["low"] == float(lo) and mapping.intensity["high"] == float(hi)
    assert np.all(np.isfinite(tensor))


def test_float64_beyond_float32_range():
    reference, _ = to_model_input(blob_volume().astype(np.float64), np.eye(4), window="minmax", model_shape=SMALL)
    huge, _ = to_model_input(blob_volume().astype(np.float64) * 1e300, np.eye(4), window="minmax", model_shape=SMALL)
    np.testing.assert_allclose(huge, reference, atol=1e-6)
    # a tiny range on a huge offset keeps its detail too
    offset, _ = to_model_input(1e12 + blob_volume().astype(np.float64) * 1e-3, np.eye(4), window="minmax",
                               model_shape=SMALL)
    np.testing.assert_allclose(offset, reference, atol=1e-3)


@pytest.mark.parametrize(
    "matrix, message",
    [
        (np.zeros((3, 3)), "must be 4x4"),
        (np.diag([1.0, 1.0, 0.0, 1.0]), "singular .* spacing"),
        (np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "not orthogonal .* resample"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN or Inf"),
        (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]), r"last row must be \[0, 0, 0, 1\]"),
        ("not a matrix", "4x4 array of numbers"),
    ],
)
def test_bad_ijk_to_ras(matrix, message):
    with pytest.raises(GeometryError, match=message):
        to_model_input(blob_volume(), matrix)


def test_bad_roi_slice_range_window_and_shape():
    vol = blob_volume((20, 20, 20))
    with pytest.raises(GeometryError, match="contains no voxel of the volume, whose voxel centres span RAS"):
        to_model_input(vol, np.eye(4), roi=RasRoi(center=(100, 100, 100), size=(5, 5, 5)))
    with pytest.raises(GeometryError, match="zero or negative size"):
        RasRoi(center=(0, 0, 0), size=(5, 0, 5))
    with pytest.raises(GeometryError, match="orthonormal"):
        RasRoi(center=(0, 0, 0), size=(5, 5, 5), axes=np.ones((3, 3)))
    with pytest.raises(InputError, match=r"slice_range \(15, 25\) is outside the volume's K range \[0, 20\)"):
        to_model_input(vol, np.eye(4), slice_range=(15, 25))
    with pytest.raises(InputError, match="slice_range .* or empty"):
        to_model_input(vol, np.eye(4), slice_range=(5, 5))
    with pytest.raises(InputError, match="unknown intensity window 'liver'; use one of abdomen, lung, bone, brain"):
        to_model_input(vol, np.eye(4), window="liver")
    with pytest.raises(InputError, match="width must be a positive finite number"):
        to_model_input(vol, np.eye(4), window=(40, 0))
    with pytest.raises(InputError, match=r"\(center, width\) pair of numbers"):
        to_model_input(vol, np.eye(4), window=(40, 350, 3))
    with pytest.raises(GeometryError, match="model_shape must be three positive integers"):
        to_model_input(vol, np.eye(4), model_shape=(32, 256))
    with pytest.raises(GeometryError, match="roi must be a RasRoi"):
        to_model_input(vol, np.eye(4), roi=(0, 0, 0, 1, 1, 1))


def test_input_array_is_not_modified():
    vol = blob_volume()
    before = vol.copy()
    to_model_input(vol, np.eye(4), window="abdomen", model_shape=SMALL)
    np.testing.assert_array_equal(vol, before)


def test_window_presets_are_slicers():
    assert WINDOW_PRESETS == {"abdomen": (40.0, 350.0), "lung": (-500.0, 1400.0), "bone": (400.0, 1000.0),
                              "brain": (50.0, 100.0)}
    _, mapping = to_model_input(blob_volume(), np.eye(4), window="ABDOMEN", model_shape=SMALL)
    assert mapping.intensity["name"] == "abdomen" and mapping.intensity["low"] == -135.0
    assert math.isclose(mapping.intensity["high"], 215.0)


# ---------------------------------------------------------------------------------------------------------------------
# Intensity schemes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32, np.float64])
def test_percentile_fast_path_is_exactly_numpy(dtype, monkeypatch):
    """The tail-only percentile computation equals np.percentile of the foreground, bit for bit, and is really used."""
    from M3DAssistantLib import preprocessing

    rng = np.random.default_rng(11)
    vol = rng.normal(0, 300, size=(60, 90, 110))
    vol[:, :20] = -1000  # air: the mean sits well below the body
    if np.dtype(dtype).kind == "u":
        vol += 1024
    vol = vol.astype(dtype)
    calls = []
    original = preprocessing._tail_percentiles
    monkeypatch.setattr(preprocessing, "_tail_percentiles", lambda *a: calls.append(original(*a)) or calls[-1])
    for view in (vol, vol[5:-3, 4::2, 9:]):  # contiguous and strided (an ROI crop)
        ref = np.percentile(view[view > view.mean(dtype=np.float64)], (0.05, 99.95))
        assert preprocessing.percentile_bounds(view, direct_below=1000) == (float(ref[0]), float(ref[1]))
    assert len(calls) == 2 and all(c is not None for c in calls)


def test_percentile_falls_back_when_the_sample_misleads():
    from M3DAssistantLib.preprocessing import percentile_bounds

    vol = np.zeros((40, 50, 60), np.int16)
    vol[0, 0, :7] = [5, 6, 7, 8, 9, 10, 11]  # a foreground of 7 voxels the strided sample cannot see
    ref = np.percentile(vol[vol > vol.mean()], (0.05, 99.95))
    assert percentile_bounds(vol, direct_below=1000) == (float(ref[0]), float(ref[1]))


def test_intensity_record_reproduces_the_tensor():
    """mapping.intensity is enough to redo the normalisation: apply() on the voxels equals the tensor's values where
    no interpolation happens (model voxel centre on a voxel centre)."""
    from M3DAssistantLib.preprocessing import IntensityMapping

    vol = blob_volume((16, 64, 64), seed=12)
    tensor, mapping = to_model_input(vol, np.eye(4), window="lung", model_shape=(16, 64, 64), crop_foreground=False,
                                     convention="m3d-seg")
    rec = IntensityMapping.from_dict(json.loads(mapping.to_json())["intensity"])
    # identity grid, m3d-seg: d = K, h = J reversed (A->P on an RAS grid), w = I reversed (R->L)
    np.testing.assert_allclose(tensor[0], rec.apply(vol)[:, ::-1, ::-1], atol=1e-6)
    np.testing.assert_allclose(rec.invert(tensor[0])[:, ::-1, ::-1], np.clip(vol, rec.low, rec.high), atol=1e-3)
    with pytest.raises(InputError, match="intensity scheme version 7"):
        IntensityMapping.from_dict({**rec.to_dict(), "version": 7})


def test_roi_serialisation_and_mask_mode_errors():
    roi = RasRoi(center=(1, 2, 3), size=(4, 5, 6))
    assert RasRoi.from_dict(json.loads(json.dumps(roi.to_dict()))) == roi
    np.testing.assert_allclose(roi.object_to_ras[:3, 3], [1, 2, 3])
    assert roi.corners().shape == (8, 3)
    _, mapping = to_model_input(blob_volume(), np.eye(4), model_shape=SMALL)
    with pytest.raises(GeometryError, match="mode must be 'nearest-exact' or 'nearest'"):
        mask_to_model(np.zeros(mapping.volume_shape), mapping, mode="linear")
    with pytest.raises(GeometryError, match="give the mask on the same voxel grid"):
        mask_to_model(np.zeros((3, 3, 3)), mapping)
