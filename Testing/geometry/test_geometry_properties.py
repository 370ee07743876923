"""Property tests (hypothesis): synthetic phantoms at known RAS positions in random orientations, spacings and sizes
go to model space and back and stay where they were."""

from __future__ import annotations

import numpy as np
from geometry_references import PERMUTATIONS, dice, make_affine, voxel_ras
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from M3DAssistantLib.geometry import (
    CONVENTIONS,
    RasRoi,
    box_to_model_bounds,
    box_to_roi,
    logits_to_mask,
    mask_to_box,
    model_bounds_to_box,
    roi_to_box,
    to_model_input,
)

MODEL_SHAPE = (16, 32, 32)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

angles = st.one_of(
    st.just((0.0, 0.0, 0.0)),  # most real volumes
    st.tuples(*[st.floats(-0.45, 0.45) for _ in range(3)]),  # oblique, up to ~26 degrees per axis
)


@st.composite
def volumes(draw):
    """A random grid (orientation, spacing, size) and a sphere or box phantom inside it, at a known RAS position."""
    perm = draw(st.sampled_from(PERMUTATIONS))
    flips = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    spacing = draw(st.tuples(*[st.floats(0.5, 4.0) for _ in range(3)]))
    shape = draw(st.tuples(*[st.integers(12, 40) for _ in range(3)]))  # K, J, I
    m = make_affine(perm, flips, spacing, draw(angles), origin=draw(st.tuples(*[st.floats(-200, 200)] * 3)))
    # Object centre somewhere in the middle half of the volume, radius 25-45 % of the smallest physical extent.
    ijk_extent = np.array(shape[::-1]) - 1
    frac = np.array(draw(st.tuples(*[st.floats(0.35, 0.65)] * 3)))
    centre = (m @ np.append(frac * ijk_extent, 1))[:3]
    extent_mm = ijk_extent * np.array(spacing)
    radius = draw(st.floats(0.25, 0.45)) * extent_mm.min() * 0.5
    kind = draw(st.sampled_from(["sphere", "box"]))
    background = draw(st.sampled_from([0, 100]))  # 100: a 'body' around the object, so no foreground crop
    convention = draw(st.sampled_from(sorted(CONVENTIONS)))
    return m, shape, centre, radius, kind, background, convention


def inside(points_ras, centre, radius, kind, axes):
    local = (points_ras - centre) @ axes  # box phantoms are aligned with the volume's own axes
    if kind == "sphere":
        return np.linalg.norm(local, axis=-1) <= radius
    return np.all(np.abs(local) <= radius, axis=-1)


def signed_distance(points_ras, centre, radius, kind, axes):
    local = (points_ras - centre) @ axes
    if kind == "sphere":
        return radius - np.linalg.norm(local, axis=-1)
    return radius - np.max(np.abs(local), axis=-1)


def model_points(mapping):
    dd, hh, ww = np.indices(mapping.model_shape, dtype=np.float64)
    return np.stack([dd, hh, ww], -1) @ mapping.model_to_ras[:3, :3].T + mapping.model_to_ras[:3, 3]


@settings(SETTINGS, max_examples=100)
@given(volumes())
def test_object_goes_to_model_space_and_back(case):
    """Forward then backward returns the object: Dice >= 0.9 at the original resolution for objects >= 8 model voxels
    across; the tensor shows it where model_to_ras says; analytic logits placed by model_to_ras land on the object;
    its official box, as an ROI, is within one model voxel of the object's extent."""
    m, shape, centre, radius, kind, background, convention = case
    axes = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    truth = inside(voxel_ras(shape, m), centre, radius, kind, axes)
    assume(truth.sum() > 50)
    vol = np.where(truth, 1000, background).astype(np.int16)
    tensor, mapping = to_model_input(vol, m, window="minmax", model_shape=MODEL_SHAPE, convention=convention)
    assume(np.all(2 * radius / mapping.model_spacing >= 8))  # >= 8 model voxels across on every axis

    # 1. forward: the tensor shows the object where the affine says -- compared with the nearest original voxel of
    #    each model voxel centre (the trilinear 0.5 level lies exactly half-way between voxel centres).
    ijk = np.rint(model_points_ijk(mapping)).astype(int)
    for c in range(3):
        np.clip(ijk[..., c], 0, shape[2 - c] - 1, out=ijk[..., c])
    nearest_truth = truth[ijk[..., 2], ijk[..., 1], ijk[..., 0]]
    assert dice(tensor[0] > 0.5, nearest_truth) >= 0.9
    # 2. round trip: what the model saw, mapped back, is the object on the original grid
    assert dice(logits_to_mask(tensor[0] - 0.5, mapping), truth) >= 0.9

    # 3. absolute backward: logits computed analytically at the RAS position model_to_ras gives each model voxel
    #    (no crop, so no edge clamping) land on the object's voxels
    _, whole = to_model_input(vol, m, window="minmax", model_shape=MODEL_SHAPE, convention=convention,
                              crop_foreground=False)
    if np.all(2 * radius / whole.model_spacing >= 8):
        sdf = signed_distance(model_points(whole), centre, radius, kind, axes)
        assert dice(logits_to_mask(sdf.astype(np.float32), whole), truth) >= 0.9

    # 4. box: official mask2box of what the model saw vs the extent of the object's voxels (cells) in model space
    box = mask_to_box(tensor[0] > 0.5)
    lo, hi = box_to_model_bounds(box, MODEL_SHAPE)
    kk, jj, ii = np.nonzero(truth)
    cells = np.array([[i, j, k, 1.0] for i in (ii.min() - 0.5, ii.max() + 0.5) for j in (jj.min() - 0.5, jj.max() + 0.5)
                      for k in (kk.min() - 0.5, kk.max() + 0.5)]).T
    cell_model = (mapping.ijk_to_model @ cells)[:3]
    true_lo = np.maximum(cell_model.min(axis=1), -0.5)
    true_hi = np.minimum(cell_model.max(axis=1), np.array(MODEL_SHAPE) - 0.5)
    assert np.all(np.abs(lo - true_lo) <= 1.0) and np.all(np.abs(hi - true_hi) <= 1.0)
    roi = box_to_roi(box, mapping)
    assert roi_to_box(roi, mapping) == box
    # the ROI holds the RAS centres of the model voxels that show the object
    assert np.all(roi.contains(model_points(mapping)[tensor[0] > 0.5], tol=1e-6))


def model_points_ijk(mapping):
    dd, hh, ww = np.indices(mapping.model_shape, dtype=np.float64)
    return np.stack([dd, hh, ww], -1) @ mapping.model_to_ijk[:3, :3].T + mapping.model_to_ijk[:3, 3]


boxes = st.tuples(*[st.integers(0, 1000) for _ in range(6)]).map(
    lambda v: tuple(x / 1000 for x in (*np.minimum(v[:3], v[3:]), *np.maximum(v[:3], v[3:])))
)


@SETTINGS
@given(
    st.sampled_from(PERMUTATIONS),
    st.tuples(st.booleans(), st.booleans(), st.booleans()),
    st.tuples(*[st.floats(0.3, 5.0) for _ in range(3)]),
    angles,
    st.tuples(*[st.integers(2, 60) for _ in range(3)]),
    boxes,
    st.sampled_from([(32, 256, 256), (16, 64, 64), (7, 13, 29)]),
)
def test_box_roi_round_trip_is_exact(perm, flips, spacing, rot, shape, box, model_shape):
    """ROI <-> box text is exact to the official 3-decimal rounding, for any orientation and model size."""
    m = make_affine(perm, flips, spacing, rot, origin=(10, -20, 30))
    vol = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    _, mapping = to_model_input(vol, m, window="minmax", model_shape=model_shape, crop_foreground=False)
    roi = box_to_roi(box, mapping)
    expected = tuple(min(v, (n - 1) / n) for v, n in zip(box, model_shape * 2))
    assert roi_to_box(roi, mapping) == tuple(round(v, 3) for v in expected)
    # The ROI's axes are a rotation close to RAS (identity when the volume is not oblique).
    assert np.isclose(np.linalg.det(roi.axes), 1.0) or np.isclose(np.linalg.det(roi.axes), -1.0)
    if rot == (0.0, 0.0, 0.0):
        np.testing.assert_allclose(roi.axes, np.eye(3), atol=1e-12)


@SETTINGS
@given(st.tuples(*[st.floats(-5, 40) for _ in range(3)]), st.tuples(*[st.floats(0.01, 30) for _ in range(3)]),
       st.sampled_from([(32, 256, 256), (16, 64, 64)]))
def test_model_bounds_box_inverse(lower, size, model_shape):
    """model_bounds_to_box(box_to_model_bounds(b)) == b, and any region maps to a valid box."""
    lo = np.array(lower) * np.array(model_shape) / 32
    hi = lo + np.array(size)
    box = model_bounds_to_box(lo, hi, model_shape)
    assert all(0 <= v <= 1 for v in box) and all(a <= b for a, b in zip(box[:3], box[3:]))
    back = box_to_model_bounds(box, model_shape)
    assert model_bounds_to_box(*back, model_shape) == box


@SETTINGS
@given(st.sampled_from(PERMUTATIONS), st.tuples(st.booleans(), st.booleans(), st.booleans()),
       st.tuples(*[st.floats(0.3, 5.0) for _ in range(3)]), angles,
       st.tuples(*[st.integers(2, 50) for _ in range(3)]), st.booleans())
def test_affines_are_inverse_pairs(perm, flips, spacing, rot, shape, crop):
    m = make_affine(perm, flips, spacing, rot, origin=(1, 2, 3))
    rng = np.random.default_rng(0)
    vol = rng.normal(size=shape).astype(np.float32)
    _, mapping = to_model_input(vol, m, window="minmax", model_shape=(8, 16, 16), crop_foreground=crop)
    np.testing.assert_allclose(mapping.model_to_ras @ mapping.ras_to_model, np.eye(4), atol=1e-9)
    np.testing.assert_allclose(mapping.ijk_to_model @ mapping.model_to_ijk, np.eye(4), atol=1e-9)
    # the crop box's corner voxels sit at model coordinates (N/n - 1)/2 from the edges, as align_corners=False says
    corner = np.array([mapping.crop_start[2], mapping.crop_start[1], mapping.crop_start[0], 1.0])
    model = mapping.ijk_to_model @ corner
    n = np.array(mapping.crop_shape, dtype=float)
    big_n = np.array(mapping.model_shape, dtype=float)
    edge = 0.5 * big_n / n - 0.5
    expected = np.where(np.array(mapping.model_flips), big_n - 1 - edge, edge)
    np.testing.assert_allclose(model[:3], expected, atol=1e-9)
    roi = RasRoi(center=mapping.model_to_ras[:3, 3], size=(1, 1, 1))
    assert roi.contains(mapping.model_to_ras[:3, 3][None])[0]
