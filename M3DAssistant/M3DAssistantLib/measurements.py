"""A mask's box and the measurements a radiologist reads off it, on the volume's own voxels.

Computed the way 3D Slicer's Segment Statistics computes them (``Modules/Scripted/SegmentStatistics`` of
Slicer/Slicer, ``LabelmapSegmentStatisticsPlugin.py`` and ``ScalarVolumeSegmentStatisticsPlugin.py``), so that the
numbers in a JSON file and in the Slicer panel agree:

* **volume**: voxel count x the voxel's volume (mL = cm3);
* **largest diameter**: the largest distance between the centres of two voxels of the mask (ITK's and Slicer's
  "Feret diameter"), found on the convex hull of the boundary voxels' centres;
* **axial long and short axis** (RECIST-style): on each slice across the superior-inferior axis (the array axis
  nearest to S), the largest distance between two voxel centres of the mask on that slice; the long axis is the
  largest over slices, the short axis the mask's width on that slice perpendicular to it;
* **values inside**: mean, standard deviation (n - 1, as ``vtkImageAccumulate``), minimum and maximum of the volume's
  voxel values in the mask -- Hounsfield units for CT.

The box (:func:`mask_roi`) covers the mask's voxels whole (edges half a voxel beyond the outermost centres), oriented
along the volume's voxel axes, as :func:`~.geometry.box_to_roi` orients a model box.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .geometry import (
    Box,
    RasRoi,
    VolumeToModelMapping,
    box_to_model_bounds,
    nearest_ras_axes,
    roi_to_box,
    validate_ijk_to_ras,
)
from .results import MaskMeasurements, SegmentationResult

Point = tuple[float, float, float]


def mask_bounds(mask_kji: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """First and last voxel index (inclusive) of the mask along each array axis (K, J, I); None when empty."""
    m = np.asarray(mask_kji) != 0
    lo, hi = [], []
    for axis in range(3):
        idx = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != axis)))
        if idx.size == 0:
            return None
        lo.append(idx[0])
        hi.append(idx[-1])
    return np.array(lo), np.array(hi)


def mask_roi(mask_kji: np.ndarray, ijk_to_ras: np.ndarray) -> Optional[RasRoi]:
    """The RAS box covering the mask's voxels (edges half a voxel beyond the outermost voxel centres), its axes
    the volume's voxel axes reordered and signed to be nearest to +R, +A, +S; None for an empty mask."""
    bounds = mask_bounds(mask_kji)
    if bounds is None:
        return None
    m = validate_ijk_to_ras(ijk_to_ras)
    lo_ijk = bounds[0][::-1] - 0.5
    hi_ijk = bounds[1][::-1] + 0.5
    center = (m @ np.append((lo_ijk + hi_ijk) / 2.0, 1.0))[:3]
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    unit = m[:3, :3] / spacing
    extent = (hi_ijk - lo_ijk) * spacing
    voxel_for_ras = nearest_ras_axes(m)
    axes, size = np.zeros((3, 3)), np.zeros(3)
    for r in range(3):
        c = voxel_for_ras[r]
        axes[:, r] = unit[:, c] * (1.0 if unit[r, c] >= 0 else -1.0)
        size[r] = extent[c]
    return RasRoi(center=center, size=size, axes=axes)


def box_iou(a: Box, b: Box, model_shape: Sequence[int]) -> float:
    """IoU of two official boxes as the model voxels they cover (each spans whole voxels, see
    :func:`~.geometry.box_to_model_bounds`)."""
    alo, ahi = box_to_model_bounds(a, model_shape)
    blo, bhi = box_to_model_bounds(b, model_shape)
    inter = float(np.prod(np.maximum(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0.0)))
    union = float(np.prod(ahi - alo) + np.prod(bhi - blo)) - inter
    return inter / union if union > 0 else 0.0


def _boundary(m: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face neighbour outside it (the extremes of any distance lie among them)."""
    inner = m.copy()
    for axis in range(3):
        for shift in (1, -1):
            neighbour = np.zeros_like(m)
            src = [slice(None)] * 3
            dst = [slice(None)] * 3
            src[axis] = slice(max(shift, 0), m.shape[axis] + min(shift, 0))
            dst[axis] = slice(max(-shift, 0), m.shape[axis] + min(-shift, 0))
            neighbour[tuple(dst)] = m[tuple(src)]
            inner &= neighbour
    return m & ~inner


def _farthest_pair(points: np.ndarray) -> tuple[float, int, int]:
    """Largest distance between two of ``points`` (N, d) and their indices; on the convex hull's vertices when
    there are many points (the farthest pair of a set is a pair of its hull's vertices)."""
    n = len(points)
    candidates = np.arange(n)
    if n > 64:
        from scipy.spatial import ConvexHull, QhullError

        try:
            candidates = ConvexHull(points, qhull_options="QJ").vertices  # joggled: flat masks have a hull too
        except (QhullError, ValueError):  # degenerate beyond what joggling fixes: fall back to all points
            candidates = np.arange(n)
    p = points[candidates]
    best, bi, bj = 0.0, 0, 0
    block = max(1, 4_000_000 // max(1, len(p)))
    for start in range(0, len(p), block):
        d2 = np.sum((p[start:start + block, None, :] - p[None, :, :]) ** 2, axis=-1)
        k = int(np.argmax(d2))
        i, j = divmod(k, len(p))
        if d2[i, j] > best:
            best, bi, bj = float(d2[i, j]), start + i, j
    return float(np.sqrt(best)), int(candidates[bi]), int(candidates[bj])


def _ras(m: np.ndarray, kji: np.ndarray) -> np.ndarray:
    """(N, 3) K, J, I indices -> (N, 3) RAS voxel centres."""
    ijk = np.c_[kji[:, ::-1].astype(np.float64), np.ones(len(kji))]
    return (m @ ijk.T)[:3].T


def _point(v: np.ndarray) -> Point:
    return tuple(round(float(x), 3) for x in v)  # type: ignore[return-value]


def measure_mask(mask_kji: np.ndarray, array_kji: np.ndarray, ijk_to_ras: np.ndarray, *,
                 units: Optional[str] = None) -> Optional[MaskMeasurements]:
    """The :class:`~.results.MaskMeasurements` of a mask on the volume ``array_kji`` (same grid); None for an
    empty mask. ``units``: what the volume's values are ("HU" for CT)."""
    mask = np.asarray(mask_kji)
    array = np.asarray(array_kji)
    if mask.shape != array.shape:
        raise InputError(f"the mask has shape {mask.shape} but the volume has {array.shape} (K, J, I); measure a "
                         "mask on the grid of the volume it was computed from")
    bounds = mask_bounds(mask)
    if bounds is None:
        return None
    m = validate_ijk_to_ras(ijk_to_ras)
    lo, hi = bounds
    box = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    local = np.asarray(mask[box]) != 0
    values = np.asarray(array[box])[local].astype(np.float64)
    count = int(values.size)
    voxel_ml = abs(float(np.linalg.det(m[:3, :3]))) / 1000.0

    edge = np.argwhere(_boundary(local)) + lo  # (N, 3) K, J, I of the boundary voxels
    edge_ras = _ras(m, edge)
    diameter, a, b = _farthest_pair(edge_ras)

    # RECIST-style: slices across the array axis nearest to superior-inferior
    spacing = np.linalg.norm(m[:3, :3], axis=0)  # along I, J, K
    axial_ijk = int(np.argmax(np.abs(m[2, :3]) / spacing))
    axial_axis = 2 - axial_ijk
    in_plane = [axis for axis in range(3) if axis != axial_axis]
    plane_mm = np.array([spacing[2 - axis] for axis in in_plane])
    long_axis, long_slice, long_ends = -1.0, 0, (edge[0], edge[0])
    for index in np.unique(edge[:, axial_axis]):
        on_slice = edge[edge[:, axial_axis] == index]
        length, i, j = _farthest_pair(on_slice[:, in_plane] * plane_mm)
        if length > long_axis:
            long_axis, long_slice, long_ends = length, int(index), (on_slice[i], on_slice[j])
    ends_ras = _ras(m, np.array(long_ends))
    short_axis = 0.0
    if long_axis > 0:  # the slice's width across the long axis, between voxel centres
        coords = edge[edge[:, axial_axis] == long_slice][:, in_plane] * plane_mm
        direction = (long_ends[1] - long_ends[0])[in_plane] * plane_mm
        across = np.array([-direction[1], direction[0]]) / np.linalg.norm(direction)
        projection = coords @ across
        short_axis = float(projection.max() - projection.min())

    return MaskMeasurements(
        voxel_count=count,
        volume_ml=round(count * voxel_ml, 4),
        max_diameter_mm=round(diameter, 3),
        max_diameter_ras=(_point(edge_ras[a]), _point(edge_ras[b])),
        axial_long_axis_mm=round(long_axis, 3),
        axial_short_axis_mm=round(short_axis, 3),
        axial_slice=long_slice,
        axial_axis=axial_axis,
        axial_long_axis_ras=(_point(ends_ras[0]), _point(ends_ras[1])),
        mean=round(float(values.mean()), 4),
        std=round(float(values.std(ddof=1)) if count > 1 else 0.0, 4),
        minimum=float(values.min()),
        maximum=float(values.max()),
        units=units,
    )


def describe_mask(result: SegmentationResult, array_kji: np.ndarray, ijk_to_ras: np.ndarray,
                  mapping: VolumeToModelMapping, *, units: Optional[str] = None) -> None:
    """Give a segmentation result with a mask its ``roi`` (:func:`mask_roi`), ``box`` (the official box of the model
    voxels inside that ROI, on the model input ``mapping`` describes: comparable with a REC answer) and
    ``measurements`` (:func:`measure_mask`); nothing for an empty mask."""
    if result.mask is None or not result.voxel_count:
        return
    result.roi = mask_roi(result.mask, ijk_to_ras)
    try:
        result.box = roi_to_box(result.roi, mapping, snap=True)
    except InputError:  # a region the model did not see (cannot happen for a mask it made)
        result.box = None
    result.measurements = measure_mask(result.mask, array_kji, ijk_to_ras, units=units)


__all__ = ["mask_bounds", "mask_roi", "box_iou", "measure_mask", "describe_mask"]
