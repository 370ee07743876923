"""Volume <-> model space for M3D-LaMed: one exact affine, in both directions.

M3D-LaMed sees a float32 tensor ``(1, D, H, W) = (1, 32, 256, 256)`` in [0, 1]. A Slicer volume is an array in
``(K, J, I)`` order (``slicer.util.arrayFromVolume``) plus a 4x4 IJK->RAS matrix. This module maps one to the other
and back, with every step exact and recorded:

1. **Reorient** (no resampling): each model axis takes the voxel axis nearest to an anatomical axis, flipped if needed,
   so that the tensor is in the chosen *convention* (:data:`CONVENTIONS`). An oblique volume keeps its obliquity; the
   model-to-RAS affine carries it.
2. **Crop** to an optional RAS ROI and/or K slice range, then to the foreground as the official pipeline does (MONAI
   ``CropForeground``: bounding box of the voxels above the minimum after clipping, margin 0).
3. **Clip and min-max** (:mod:`.preprocessing`) and **resize** to the model shape with trilinear interpolation in
   PyTorch's ``align_corners=False`` convention (MONAI ``Resize`` of the official scripts). Model voxel ``o`` along an
   axis of ``n`` cropped voxels samples the continuous voxel coordinate ``(o + 0.5) * n / N - 0.5``.

The mapping is ONE 4x4 affine ``model_to_ras`` (model voxel centre ``(d, h, w, 1)`` -> RAS mm) plus the convention
and intensity scheme, all versioned and JSON-serialisable (:class:`VolumeToModelMapping`). Results come back through
the same record: segmentation logits are resampled once, at the original voxel centres (:func:`logits_to_mask`);
boxes become RAS ROIs (:func:`box_to_roi`) and ROIs become boxes (:func:`roi_to_box`).

Box convention (official ``mask2box``): ``[d1, h1, w1, d2, h2, w2]`` = (min voxel index, max voxel index) / (D, H, W)
rounded to 3 decimals; the max is the index of the last voxel, not one past it. As an ROI, a box covers whole model
voxels: its edges lie at ``index - 0.5`` and ``index + 0.5`` model voxels.

Only numpy is needed at run time; the resampling is separable and gathers only the voxels it interpolates, which is
why it is many times faster than the MONAI chain while giving the same numbers.

Why this file is long: every volume <-> model mapping shares one VolumeToModelMapping and sits next to its inverse.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import GeometryError, InputError
from .preprocessing import (
    WINDOW_PRESETS,
    IntensityMapping,
    IntensitySpec,
    WindowArg,
    intensity_mapping,
    resolve_window,
)

__all__ = [
    "CONVENTIONS",
    "DEFAULT_CONVENTION",
    "DEFAULT_MODEL_SHAPE",
    "GEOMETRY_VERSION",
    "MIN_ROI_SIZE_MM",
    "WINDOW_PRESETS",
    "Box",
    "Convention",
    "RasRoi",
    "VolumeToModelMapping",
    "box_to_model_bounds",
    "box_to_roi",
    "PLANES",
    "TaskPreprocessing",
    "canonical_axes",
    "convention_directions",
    "format_box",
    "ijk_to_ras_inverse",
    "logits_to_mask",
    "map_model_values",
    "mask_to_box",
    "mask_to_model",
    "model_plane_for",
    "model_bounds_to_box",
    "model_mask_to_volume",
    "model_values_to_volume",
    "new_volume_array",
    "parse_box",
    "region_to_model_input",
    "resolve_convention",
    "roi_to_box",
    "slice_axis",
    "slice_plane",
    "task_preprocessing",
    "to_model_input",
    "validate_box",
    "validate_ijk_to_ras",
]

GEOMETRY_VERSION = 1
DEFAULT_MODEL_SHAPE: tuple[int, int, int] = (32, 256, 256)
ORTHOGONALITY_TOLERANCE = 1e-4
"""Largest |cos| between two voxel axes that still counts as orthogonal (float32 headers reach ~1e-7)."""

Box = tuple[float, float, float, float, float, float]

# Anatomical direction letter -> (RAS axis, sign): the direction in which an index increases.
_DIRECTIONS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


# ----------------------------------------------------------------------------------------------------------------------
# Conventions
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Convention:
    """Where the model's axes point: ``directions[m]`` is the anatomical direction in which model axis m increases.

    A *plane-native* convention (``plane_directions`` set) keeps the volume's own slice plane: D reads the slice axis
    (:func:`slice_axis`) and ``plane_directions[plane]`` gives the directions for that plane (:func:`slice_plane`);
    ``directions`` is then its axial entry. Evidence for every convention: ``docs/conventions.md``.
    """

    name: str
    directions: tuple[str, str, str]
    description: str
    plane_directions: Optional[dict[str, tuple[str, str, str]]] = None

    @property
    def plane_native(self) -> bool:
        return self.plane_directions is not None


PLANES = ("axial", "coronal", "sagittal")
_PLANE_NORMAL_RAS_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS axis along the slice normal

CONVENTIONS: dict[str, Convention] = {
    "m3d-cap-v1": Convention(
        "m3d-cap-v1",
        ("I", "P", "L"),
        "Axial radiological display whatever the volume's own plane (the first M3D-Cap reading: Radiopaedia slice "
        "stacks sorted by file name, published top to bottom). D = superior to inferior; each slice as on a "
        "radiology screen: row 0 anterior, column 0 the patient's right. Kept for results made with it and as the "
        "'axial' option.",
    ),
    "m3d-cap-v2": Convention(
        "m3d-cap-v2",
        ("I", "P", "L"),
        "Plane-native radiological display (M3D-Cap / M3D-VQA: Radiopaedia stacks in the series' own plane). D reads "
        "the volume's slice axis; each slice as a radiology screen shows that plane -- axial: rows anterior to "
        "posterior, columns patient right to left, slices superior to inferior; coronal: rows superior to inferior, "
        "columns patient right to left, slices posterior to anterior; sagittal: rows superior to inferior, columns "
        "anterior to posterior, slices patient right to left (every plane the same handedness as the axial stack, "
        "so the stack is a rotation, never a mirror image, of the axial one). Equals m3d-cap-v1 on axial volumes.",
        plane_directions={"axial": ("I", "P", "L"), "coronal": ("A", "I", "L"), "sagittal": ("L", "I", "P")},
    ),
    "m3d-seg-v1": Convention(
        "m3d-seg-v1",
        ("S", "P", "L"),
        "M3D-Seg file order (m3d_seg_data_prepare.py swaps the NIfTI axes to (Z, Y, X); the source NIfTIs are mostly "
        "LPS-stored): in-plane as radiological display, but D from inferior to superior. REC/REG boxes and "
        "segmentation masks were trained on this data.",
    ),
    "m3d-refseg-v1": Convention(
        "m3d-refseg-v1",
        ("S", "R", "A"),
        "M3D-RefSeg file order (m3d_refseg_data_prepare.py transposes the nibabel array (2, 0, 1) to (Z, X, Y); the "
        "TotalSegmentator CTs it starts from are RAS-stored): D inferior to superior, rows patient left to right, "
        "columns posterior to anterior -- in-plane axes swapped relative to M3D-Seg. Referring-expression "
        "segmentation was trained on this data.",
    ),
}
_CONVENTION_ALIASES = {
    "m3d-cap": "m3d-cap-v1",
    "m3d-seg": "m3d-seg-v1",
    "m3d-refseg": "m3d-refseg-v1",
    "axial": "m3d-cap-v1",
    "plane-native": "m3d-cap-v2",
}
DEFAULT_CONVENTION = "m3d-cap-v1"
"""What :func:`to_model_input` uses without ``convention=`` (unchanged since version 1); the engine uses the task's
own (:attr:`M3DAssistantLib.tasks.Task.convention`)."""


def resolve_convention(convention: Optional[str]) -> Convention:
    """Name (or alias, or None for the default) -> :class:`Convention`."""
    name = DEFAULT_CONVENTION if convention is None else str(convention).strip().lower()
    name = _CONVENTION_ALIASES.get(name, name)
    if name not in CONVENTIONS:
        raise GeometryError(
            f"unknown orientation convention {convention!r}; use one of {', '.join(CONVENTIONS)} "
            f"(or the aliases {', '.join(_CONVENTION_ALIASES)})"
        )
    return CONVENTIONS[name]


THICK_SLICE_RATIO = 1.5
"""How much coarser than every other voxel axis an I or J axis must be to count as the slice axis instead of K."""


def slice_axis(ijk_to_ras: Any) -> int:
    """The voxel axis the slices are stacked along (0 = I, 1 = J, 2 = K): K, as DICOM series, NRRD and NIfTI files
    store slices, unless another axis is clearly the thick one (spacing at least :data:`THICK_SLICE_RATIO` times
    both others' -- e.g. a coronal acquisition reoriented to RAS storage), which is then the acquisition's slice
    axis."""
    m = validate_ijk_to_ras(ijk_to_ras)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    for axis in (0, 1):
        others = [spacing[a] for a in range(3) if a != axis]
        if spacing[axis] >= THICK_SLICE_RATIO * max(others):
            return axis
    return 2


def slice_plane(ijk_to_ras: Any) -> str:
    """The volume's own slice plane: 'axial', 'coronal' or 'sagittal', from the direction of :func:`slice_axis`
    (the anatomical axis nearest to it; an oblique volume gets its nearest plane)."""
    m = validate_ijk_to_ras(ijk_to_ras)
    normal = np.abs(m[:3, slice_axis(m)])
    return {0: "sagittal", 1: "coronal", 2: "axial"}[int(np.argmax(normal))]


def model_plane_for(ijk_to_ras: Any, convention: Optional[str] = None) -> str:
    """The plane of the slices the model is shown for this volume under ``convention``: the right answer to "which
    plane is this image in?" for what the model sees (m3d-cap-v1 and the M3D-Seg/RefSeg conventions always show
    axial slices; m3d-cap-v2 shows the volume's own plane)."""
    directions = convention_directions(validate_ijk_to_ras(ijk_to_ras), resolve_convention(convention))
    return {0: "sagittal", 1: "coronal", 2: "axial"}[_DIRECTIONS[directions[0]][0]]


@dataclasses.dataclass(frozen=True)
class TaskPreprocessing:
    """How a task will see a volume, before anything runs: for a panel to show, and for the provenance to match."""

    task: str
    convention: str
    volume_plane: str  # the volume's own slice plane (slice_plane)
    model_plane: str  # the plane of the slices the model is shown
    window: IntensitySpec

    def describe(self) -> str:
        """One line, e.g. ``m3d-cap-v2: coronal slices (the volume's own plane); window display (Slicer) 40/400``."""
        own = " (the volume's own plane)" if self.model_plane == self.volume_plane else \
            f" (the volume is {self.volume_plane})"
        w = self.window
        if w.scheme != "window":
            window = w.name
        elif w.name == "custom":
            window = f"{w.center:g}/{w.width:g}"
        else:
            window = f"{w.name} {w.center:g}/{w.width:g}"
        return f"{self.convention}: {self.model_plane} slices{own}; window {window}"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "convention": self.convention, "volume_plane": self.volume_plane,
                "model_plane": self.model_plane, "window": dataclasses.asdict(self.window)}


def task_preprocessing(task: str, ijk_to_ras: Any, convention: str, window: IntensitySpec) -> TaskPreprocessing:
    """How ``task`` sees this volume under ``convention`` and ``window`` (both already chosen: the task registry's
    :meth:`~M3DAssistantLib.tasks.Task.preprocessing` picks the task's defaults). Cheap: no voxel is read."""
    m = validate_ijk_to_ras(ijk_to_ras)
    conv = resolve_convention(convention)
    return TaskPreprocessing(task, conv.name, slice_plane(m), model_plane_for(m, conv.name), window)


# ----------------------------------------------------------------------------------------------------------------------
# IJK -> RAS matrices
# ----------------------------------------------------------------------------------------------------------------------


def validate_ijk_to_ras(ijk_to_ras: Any) -> np.ndarray:
    """A finite 4x4 affine with non-zero, mutually orthogonal voxel axes, as float64.

    Sheared grids (e.g. a tilted-gantry CT not yet resampled) are refused: the box and ROI maths assume a rectangular
    voxel grid, and a silently wrong ROI is worse than an error.
    """
    try:
        m = np.array(ijk_to_ras, dtype=np.float64)
    except (TypeError, ValueError):
        raise GeometryError(f"the IJK->RAS matrix must be a 4x4 array of numbers, got {ijk_to_ras!r}") from None
    if m.shape != (4, 4):
        raise GeometryError(f"the IJK->RAS matrix must be 4x4, got shape {m.shape}; pass the volume's full matrix")
    if not np.all(np.isfinite(m)):
        raise GeometryError("the IJK->RAS matrix contains NaN or Inf; the volume's header is broken -- fix its origin, "
                            "spacing and directions")
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-9):
        raise GeometryError(f"the IJK->RAS matrix's last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 1e-9 * max(1.0, float(spacing.max()))):
        raise GeometryError(
            f"the IJK->RAS matrix is singular (voxel spacing {spacing.tolist()}); the volume's spacing or directions "
            f"are missing -- set them in the file header or in Slicer's Volumes module"
        )
    unit = m[:3, :3] / spacing
    cos = unit.T @ unit - np.eye(3)
    worst = float(np.max(np.abs(cos)))
    if worst > ORTHOGONALITY_TOLERANCE:
        angle = math.degrees(math.asin(min(1.0, worst)))
        raise GeometryError(
            f"the volume's voxel axes are not orthogonal (sheared by {angle:.3g} degrees, e.g. a tilted-gantry CT); "
            f"resample it to a rectangular grid first (Slicer: Resample Scalar Volume, or harden the gantry-tilt "
            f"transform)"
        )
    return m


def ijk_to_ras_inverse(ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS -> IJK for a validated IJK -> RAS matrix (the inverse, next to its forward)."""
    return np.linalg.inv(ijk_to_ras)


def nearest_ras_axes(ijk_to_ras: np.ndarray, fixed: Optional[tuple[int, int]] = None) -> tuple[int, int, int]:
    """For each RAS axis (R, A, S), the voxel axis (0 = I, 1 = J, 2 = K) closest to it.

    Maximises the summed |cos| over the 6 possible assignments, so that every voxel axis is used once even for
    strongly oblique volumes; ties resolve to the first assignment (deterministic). ``fixed = (ras_axis,
    voxel_axis)`` forces one pair (the slice axis of a plane-native convention) and assigns the other two.
    """
    unit = np.abs(ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0))
    best, best_score = None, -1.0
    for perm in itertools.permutations(range(3)):
        if fixed is not None and perm[fixed[0]] != fixed[1]:
            continue
        score = sum(unit[r, perm[r]] for r in range(3))
        if score > best_score + 1e-12:
            best, best_score = perm, score
    return tuple(best)  # type: ignore[return-value]


def convention_directions(ijk_to_ras: np.ndarray, convention: Convention) -> tuple[str, str, str]:
    """The directions of model axes (d, h, w) for this volume: fixed, or the slice plane's for a plane-native
    convention."""
    if not convention.plane_native:
        return convention.directions
    return convention.plane_directions[slice_plane(ijk_to_ras)]  # type: ignore[index]


def canonical_axes(
    ijk_to_ras: np.ndarray, convention: Convention
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For model axes (d, h, w): the array axis (0 = K, 1 = J, 2 = I) each one reads, and whether it runs backwards.

    A plane-native convention reads the slice axis with D, even when the volume is oblique by more than 45 degrees
    to its nearest plane; the other model axes take the remaining voxel axes nearest to their directions."""
    directions = convention_directions(ijk_to_ras, convention)
    fixed = None
    if convention.plane_native:
        fixed = (_DIRECTIONS[directions[0]][0], slice_axis(ijk_to_ras))
    ras_to_voxel = nearest_ras_axes(ijk_to_ras, fixed)
    axes, flips = [], []
    for letter in directions:
        ras_axis, sign = _DIRECTIONS[letter]
        ijk_axis = ras_to_voxel[ras_axis]
        axes.append(2 - ijk_axis)  # array order is K, J, I
        flips.append(bool(np.sign(ijk_to_ras[ras_axis, ijk_axis]) != sign))
    return tuple(axes), tuple(flips)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------------
# Model voxel <-> IJK along one axis (torch align_corners=False)
# ----------------------------------------------------------------------------------------------------------------------


def _model_to_ijk_matrix(
    model_axes: Sequence[int], model_flips: Sequence[bool], crop_start: Sequence[int], crop_stop: Sequence[int],
    model_shape: Sequence[int],
) -> np.ndarray:
    """Model voxel (d, h, w, 1) -> voxel (i, j, k, 1) of the original grid.

    Along model axis m of size N reading n cropped voxels from ``start``: ``x = start + (o + 0.5) * n / N - 0.5``, or
    mirrored from ``stop - 1`` when the axis is flipped.
    """
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for mi, (a, flip) in enumerate(zip(model_axes, model_flips)):
        n, big_n = crop_stop[a] - crop_start[a], model_shape[mi]
        scale = n / big_n
        row = 2 - a  # array axis a -> IJK component
        if flip:
            m[row, mi] = -scale
            m[row, 3] = crop_stop[a] - 0.5 - 0.5 * scale
        else:
            m[row, mi] = scale
            m[row, 3] = crop_start[a] - 0.5 + 0.5 * scale
    return m


def _ijk_to_model_matrix(
    model_axes: Sequence[int], model_flips: Sequence[bool], crop_start: Sequence[int], crop_stop: Sequence[int],
    model_shape: Sequence[int],
) -> np.ndarray:
    """Voxel (i, j, k, 1) -> model voxel (d, h, w, 1): the exact inverse of :func:`_model_to_ijk_matrix`."""
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for mi, (a, flip) in enumerate(zip(model_axes, model_flips)):
        n, big_n = crop_stop[a] - crop_start[a], model_shape[mi]
        inv = big_n / n
        col = 2 - a
        if flip:  # o = (stop - 0.5 - x) * N / n - 0.5
            m[mi, col] = -inv
            m[mi, 3] = (crop_stop[a] - 0.5) * inv - 0.5
        else:  # o = (x - start + 0.5) * N / n - 0.5
            m[mi, col] = inv
            m[mi, 3] = (0.5 - crop_start[a]) * inv - 0.5
    return m


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weight of 1-D linear resampling, ``align_corners=False`` exactly as PyTorch/MONAI do it.

    Output ``o`` reads ``src = (o + 0.5) * n_in / n_out - 0.5`` clamped at 0 below; value = ``(1 - lam) x[i0] +
    lam x[i1]`` with ``i1 = min(i0 + 1, n_in - 1)``.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    lam[i0 == i1] = 0.0
    return i0, i1, lam


def _nearest_taps(n_in: int, n_out: int, exact: bool = True) -> np.ndarray:
    """Source index of nearest-neighbour resizing, as PyTorch computes it (in float32, so label maps match bit for bit).

    ``exact``: ``floor((o + 0.5) * n_in / n_out)``, the source voxel nearest to the model voxel's centre (PyTorch
    ``nearest-exact``), consistent with the trilinear geometry. Otherwise PyTorch's legacy ``nearest``,
    ``floor(o * n_in / n_out)``, which the official ``Resized(mode="nearest")`` used for M3D-Seg masks: it is shifted
    by up to half a source voxel toward index 0 when downsampling.
    """
    if n_in == n_out:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    o = np.arange(n_out, dtype=np.float32)
    if exact:
        o += np.float32(0.5)
    idx = np.floor(o * scale).astype(np.intp)
    return np.minimum(idx, n_in - 1)


def _take(x: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """``np.take(x, idx, axis)`` without first copying a non-contiguous ``x`` whole, which np.take does (a cropped
    view of a 2 GB volume would be copied entirely). Same result, no slower."""
    if axis == 0:
        return x[idx]
    if x.flags.c_contiguous:
        return np.take(x, idx, axis=axis)
    out = np.empty((*x.shape[:axis], len(idx), *x.shape[axis + 1:]), x.dtype)
    for k in range(x.shape[0]):  # one slab at a time: only that slab is made contiguous
        np.take(x[k], idx, axis=axis - 1, out=out[k])
    return out


def _lerp_along(x: np.ndarray, axis: int, i0: np.ndarray, i1: np.ndarray, lam: np.ndarray, prepare=None) -> np.ndarray:
    """Linear interpolation along one axis, reading only the slices it needs (``prepare`` runs on what is read)."""
    a = _take(x, i0, axis)
    if prepare is not None:
        a = prepare(a)
    if not np.any(lam):
        return a
    b = _take(x, i1, axis)
    if prepare is not None:
        b = prepare(b)
    shape = [1] * x.ndim
    shape[axis] = -1
    w = lam.astype(a.dtype).reshape(shape)
    b -= a
    b *= w
    a += b
    return a


# ----------------------------------------------------------------------------------------------------------------------
# The mapping record
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class VolumeToModelMapping:
    """Everything needed to go from the model's tensor back to the volume, and to redo the forward step exactly.

    ``model_axes[m]`` is the array axis (0 = K, 1 = J, 2 = I) that model axis m (d, h, w) reads, ``model_flips[m]``
    whether it reads it backwards; ``crop_start``/``crop_stop`` are the half-open crop box in array (K, J, I) order.
    The derived ``model_to_ras`` is the single affine from model voxel centre ``(d, h, w, 1)`` to RAS mm.
    """

    ijk_to_ras: np.ndarray
    volume_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    model_axes: tuple[int, int, int]
    model_flips: tuple[bool, bool, bool]
    model_shape: tuple[int, int, int]
    convention: str
    intensity: dict[str, Any]
    version: int = GEOMETRY_VERSION

    # -- affines, each next to its inverse ----------------------------------------------------------------------------
    @functools.cached_property
    def model_to_ijk(self) -> np.ndarray:
        """Model voxel (d, h, w, 1) -> original voxel (i, j, k, 1)."""
        return _model_to_ijk_matrix(*self._axis_record())

    @functools.cached_property
    def ijk_to_model(self) -> np.ndarray:
        """Original voxel (i, j, k, 1) -> model voxel (d, h, w, 1)."""
        return _ijk_to_model_matrix(*self._axis_record())

    def _axis_record(self) -> tuple:
        return self.model_axes, self.model_flips, self.crop_start, self.crop_stop, self.model_shape

    @functools.cached_property
    def model_to_ras(self) -> np.ndarray:
        """Model voxel centre (d, h, w, 1) -> RAS (mm)."""
        return self.ijk_to_ras @ self.model_to_ijk

    @functools.cached_property
    def ras_to_model(self) -> np.ndarray:
        """RAS (mm) -> model voxel (d, h, w, 1)."""
        return self.ijk_to_model @ ijk_to_ras_inverse(self.ijk_to_ras)

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        """Cropped voxels read by each model axis (d, h, w)."""
        return tuple(self.crop_stop[a] - self.crop_start[a] for a in self.model_axes)  # type: ignore[return-value]

    @property
    def model_spacing(self) -> np.ndarray:
        """Millimetres per model voxel along d, h, w."""
        return np.linalg.norm(self.model_to_ras[:3, :3], axis=0)

    @property
    def intensity_mapping(self) -> IntensityMapping:
        return IntensityMapping.from_dict(self.intensity)

    @property
    def model_plane(self) -> str:
        """The plane of the slices the model sees (its D axis as slice normal): 'axial', 'coronal' or 'sagittal'."""
        d_axis = np.abs(self.model_to_ras[:3, 0])
        return {0: "sagittal", 1: "coronal", 2: "axial"}[int(np.argmax(d_axis))]

    # -- serialisation ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "convention": self.convention,
            "model_shape": list(self.model_shape),
            "volume_shape": list(self.volume_shape),
            "ijk_to_ras": self.ijk_to_ras.tolist(),
            "crop_start": list(self.crop_start),
            "crop_stop": list(self.crop_stop),
            "model_axes": list(self.model_axes),
            "model_flips": list(self.model_flips),
            "intensity": dict(self.intensity),
            "model_to_ras": self.model_to_ras.tolist(),  # redundant, for readers without this code
            "model_plane": self.model_plane,  # redundant: the plane of the slices the model sees
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VolumeToModelMapping":
        version = int(d.get("version", -1))
        if version != GEOMETRY_VERSION:
            raise GeometryError(
                f"this mapping was written by geometry version {version}; this code reads version {GEOMETRY_VERSION} "
                f"-- re-run the preprocessing (or export) with this version"
            )
        try:
            mapping = cls(
                ijk_to_ras=validate_ijk_to_ras(d["ijk_to_ras"]),
                volume_shape=_int3(d["volume_shape"]),
                crop_start=_int3(d["crop_start"]),
                crop_stop=_int3(d["crop_stop"]),
                model_axes=_int3(d["model_axes"]),
                model_flips=tuple(bool(f) for f in d["model_flips"]),  # type: ignore[arg-type]
                model_shape=_int3(d["model_shape"]),
                convention=resolve_convention(d["convention"]).name,
                intensity=dict(d["intensity"]),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GeometryError(f"the mapping record is incomplete or malformed ({exc!r}); re-create it") from None
        if sorted(mapping.model_axes) != [0, 1, 2] or any(
            not 0 <= s < e <= n for s, e, n in zip(mapping.crop_start, mapping.crop_stop, mapping.volume_shape)
        ):
            raise GeometryError("the mapping record is inconsistent (axes or crop box); re-create it")
        if "model_to_ras" in d and not np.allclose(d["model_to_ras"], mapping.model_to_ras, rtol=1e-9, atol=1e-6):
            raise GeometryError("the mapping record's model_to_ras disagrees with its crop and axes; it was edited or "
                                "corrupted -- re-create it")
        return mapping

    @classmethod
    def from_json(cls, text: str) -> "VolumeToModelMapping":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GeometryError(f"the mapping is not valid JSON ({exc}); re-create it") from None
        return cls.from_dict(d)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VolumeToModelMapping):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


def _int3(v: Any) -> tuple[int, int, int]:
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 values, got {v!r}")
    return t  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------------
# ROI
# ----------------------------------------------------------------------------------------------------------------------


MIN_ROI_SIZE_MM = 1e-3
"""The smallest ROI edge taken (a micrometre, far below any voxel): anything shorter is a zero-size ROI."""


@dataclasses.dataclass(frozen=True, eq=False)
class RasRoi:
    """A box in RAS: ``center`` (mm), full edge lengths ``size`` (mm), ``axes`` 3x3 whose columns are the box's edge
    directions in RAS (identity for an axis-aligned box). ``size[c]`` is measured along ``axes[:, c]``."""

    center: np.ndarray
    size: np.ndarray
    axes: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        try:
            center = np.array(self.center, dtype=np.float64).reshape(3)
            size = np.array(self.size, dtype=np.float64).reshape(3)
            axes = np.array(self.axes, dtype=np.float64).reshape(3, 3)
        except (TypeError, ValueError):
            raise GeometryError(
                f"an ROI needs center (3 numbers), size (3 numbers) and axes (3x3), got {self.center!r}, "
                f"{self.size!r}, {self.axes!r}"
            ) from None
        if not (np.all(np.isfinite(center)) and np.all(np.isfinite(size)) and np.all(np.isfinite(axes))):
            raise GeometryError("the ROI contains NaN or Inf; redraw it")
        if not np.all(size >= MIN_ROI_SIZE_MM):  # also 1e-300 mm: zero in all but name
            raise GeometryError(
                f"the ROI has zero or negative size {size.tolist()} mm (each edge must be at least "
                f"{MIN_ROI_SIZE_MM:g} mm); draw a box with extent in all three directions"
            )
        if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-6):
            raise GeometryError("the ROI's axes must be orthonormal (a rotation); reset the ROI's orientation")
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "axes", axes)

    @property
    def object_to_ras(self) -> np.ndarray:
        """4x4: ROI-local coordinates (mm, origin at the centre, along ``axes``) -> RAS."""
        m = np.eye(4)
        m[:3, :3] = self.axes
        m[:3, 3] = self.center
        return m

    def corners(self) -> np.ndarray:
        """The 8 corners in RAS, shape (8, 3)."""
        signs = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))
        return self.center + (signs * self.size) @ self.axes.T

    def contains(self, points_ras: np.ndarray, tol: float = 1e-6) -> np.ndarray:
        """Which of the (N, 3) RAS points lie inside (edges included)."""
        local = (np.asarray(points_ras, dtype=np.float64) - self.center) @ self.axes
        return np.all(np.abs(local) <= self.size / 2 + tol, axis=-1)

    @classmethod
    def from_bounds(cls, lower_ras: Sequence[float], upper_ras: Sequence[float]) -> "RasRoi":
        """Axis-aligned ROI from two opposite RAS corners."""
        lo, hi = np.asarray(lower_ras, float), np.asarray(upper_ras, float)
        return cls(center=(lo + hi) / 2, size=np.abs(hi - lo))

    def to_dict(self) -> dict[str, Any]:
        return {"center": self.center.tolist(), "size": self.size.tolist(), "axes": self.axes.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RasRoi":
        return cls(center=d["center"], size=d["size"], axes=d.get("axes", np.eye(3)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RasRoi):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


def _roi_region(roi: RasRoi, ijk_to_ras: np.ndarray, shape_kji: Sequence[int]) -> tuple[list[int], list[int]]:
    """Half-open (K, J, I) box of the voxels whose centres lie in the ROI's bounding box in voxel space."""
    ijk = (ijk_to_ras_inverse(ijk_to_ras) @ np.c_[roi.corners(), np.ones(8)].T)[:3].T
    lo, hi = ijk.min(axis=0), ijk.max(axis=0)
    start, stop = [0, 0, 0], [0, 0, 0]
    for c in range(3):  # c: i, j, k
        a = 2 - c
        start[a] = max(0, int(math.ceil(lo[c] - 1e-6)))
        stop[a] = min(int(shape_kji[a]), int(math.floor(hi[c] + 1e-6)) + 1)
    if any(e <= s for s, e in zip(start, stop)):
        extent = ijk_to_ras @ np.array([[0, 0, 0, 1], [shape_kji[2] - 1, shape_kji[1] - 1, shape_kji[0] - 1, 1]]).T
        raise GeometryError(
            f"the ROI (centre {np.round(roi.center, 1).tolist()} mm, size {np.round(roi.size, 1).tolist()} mm) "
            f"contains no voxel of the volume, whose voxel centres span RAS {np.round(extent[:3, 0], 1).tolist()} to "
            f"{np.round(extent[:3, 1], 1).tolist()}; move the ROI onto the volume"
        )
    return start, stop


# ----------------------------------------------------------------------------------------------------------------------
# Forward: volume -> model input
# ----------------------------------------------------------------------------------------------------------------------


def validate_volume(array_kji: Any) -> np.ndarray:
    """The voxels as a 3D real-valued array (K, J, I), or InputError naming what is wrong and how to fix it.

    Booleans come back as a uint8 view; nothing is copied. The one check every entry point (geometry, engine, client)
    makes before touching the data."""
    if isinstance(array_kji, (str, bytes)) or array_kji is None:
        raise InputError(f"the volume must be a 3D array (K, J, I), got {type(array_kji).__name__}")
    if not isinstance(array_kji, np.ndarray):
        array_kji = np.asarray(array_kji)
    if array_kji.dtype == bool:
        array_kji = array_kji.view(np.uint8)
    if array_kji.dtype.kind not in "iuf":
        raise InputError(
            f"the volume's voxel type {array_kji.dtype} is not a real scalar; convert it to a numeric scalar volume "
            f"(e.g. the magnitude of complex data)"
        )
    if array_kji.ndim == 2:
        raise InputError(
            f"got a single 2D image of shape {array_kji.shape}; M3D-LaMed needs a 3D volume (K, J, I) with several "
            f"slices"
        )
    if array_kji.ndim != 3:
        raise InputError(
            f"expected a 3D scalar volume in (K, J, I) order, got shape {array_kji.shape}; for a 4D (time series) or "
            f"vector/RGB volume select one component or time point first (e.g. array[..., 0] or array[t])"
        )
    if min(array_kji.shape) == 0:
        raise InputError(f"the volume has shape {array_kji.shape} (K, J, I): it has no voxels; load the image data")
    if min(array_kji.shape) < 2:
        raise InputError(
            f"the volume has shape {array_kji.shape} (K, J, I): a single slice is not a 3D volume; load the whole "
            f"series"
        )
    return array_kji


def _model_shape(model_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = _int3(model_shape)
    except (TypeError, ValueError):
        raise GeometryError(f"model_shape must be three positive integers (D, H, W), got {model_shape!r}") from None
    if min(shape) < 1:
        raise GeometryError(f"model_shape must be three positive integers (D, H, W), got {model_shape!r}")
    return shape


def _work_dtype(dtype: np.dtype, low: float, high: float) -> type:
    """float32 unless float32 would lose the data (float64 input, or integers beyond 2**24)."""
    if dtype.kind == "f" and dtype.itemsize > 4:
        return np.float64
    if dtype.kind in "iu" and max(abs(low), abs(high)) >= 2**24:
        return np.float64
    return np.float32


def _region_extremes(view: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Min, max and the two max-projections used for the foreground box, in three fast passes over the data."""
    proj_k = view.max(axis=(1, 2))  # per slice K
    proj_ji = view.max(axis=0)  # J x I
    vmax = float(proj_k.max())
    vmin = float(view.min(axis=0).min())
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        bad = int(view.size - np.count_nonzero(np.isfinite(view)))
        raise InputError(
            f"the volume has {bad} NaN/Inf voxels out of {view.size}; replace them before running the model, "
            f"e.g. numpy.nan_to_num(array, nan=lowest_valid_value, posinf=..., neginf=...)"
        )
    return vmin, vmax, proj_k, proj_ji


def _foreground_box(proj_k: np.ndarray, proj_ji: np.ndarray, threshold: float) -> tuple[list[int], list[int]]:
    """Bounding box (K, J, I) of voxels above ``threshold`` -- MONAI CropForeground(select_fn=x > 0, margin=0) on the
    min-max normalised image, whose zero is exactly ``threshold``."""
    ks = np.flatnonzero(proj_k > threshold)
    js = np.flatnonzero((proj_ji > threshold).any(axis=1))
    is_ = np.flatnonzero((proj_ji > threshold).any(axis=0))
    return [int(ks[0]), int(js[0]), int(is_[0])], [int(ks[-1]) + 1, int(js[-1]) + 1, int(is_[-1]) + 1]


def to_model_input(
    array_kji: np.ndarray,
    ijk_to_ras: np.ndarray,
    *,
    window: WindowArg = None,
    roi: Optional[RasRoi] = None,
    slice_range: Optional[tuple[int, int]] = None,
    model_shape: Sequence[int] = DEFAULT_MODEL_SHAPE,
    convention: Optional[str] = None,
    crop_foreground: bool = True,
) -> tuple[np.ndarray, VolumeToModelMapping]:
    """Volume -> model tensor ``(1, D, H, W)`` float32 in [0, 1], and the exact mapping back.

    ``array_kji``: the voxels as ``slicer.util.arrayFromVolume`` gives them; ``ijk_to_ras``: the volume's 4x4 matrix.
    ``window``: None (M3D-Seg percentiles), a preset of :data:`WINDOW_PRESETS`, ``"minmax"``, ``"volume-percentile"``
    (M3D-RefSeg), ``(center, width)``, or an :class:`~M3DAssistantLib.preprocessing.IntensitySpec` /
    ``DisplayWindow`` (what :func:`~M3DAssistantLib.preprocessing.default_window` gives for a task's window kind).
    ``convention``: a name of :data:`CONVENTIONS` (default :data:`DEFAULT_CONVENTION`; the task's own is
    :attr:`M3DAssistantLib.tasks.Task.convention`).
    ``roi``: crop to the voxels whose centres lie in this RAS box (its bounding box in voxel space when oblique).
    ``slice_range``: half-open ``(start, stop)`` range of K indices (array axis 0), Python-slice style.
    ``crop_foreground``: the official pipeline always does it; turn off to keep the whole region.
    The input array is never modified or copied whole: only the voxels interpolated are read.
    """
    array_kji = validate_volume(array_kji)
    ijk_to_ras = validate_ijk_to_ras(ijk_to_ras)
    shape = _model_shape(model_shape)
    conv = resolve_convention(convention)
    spec = resolve_window(window)
    vol_shape = tuple(int(s) for s in array_kji.shape)

    start, stop = [0, 0, 0], list(vol_shape)
    if slice_range is not None:
        try:
            k0, k1 = (int(v) for v in slice_range)
        except (TypeError, ValueError):
            raise InputError(f"slice_range must be (start, stop) K indices, got {slice_range!r}") from None
        if not 0 <= k0 < k1 <= vol_shape[0]:
            raise InputError(
                f"slice_range {slice_range!r} is outside the volume's K range [0, {vol_shape[0]}) or empty; "
                f"give (start, stop) with 0 <= start < stop <= {vol_shape[0]}"
            )
        start[0], stop[0] = k0, k1
    if roi is not None:
        if not isinstance(roi, RasRoi):
            raise GeometryError(f"roi must be a RasRoi, got {type(roi).__name__}")
        rs, re_ = _roi_region(roi, ijk_to_ras, vol_shape)
        start = [max(a, b) for a, b in zip(start, rs)]
        stop = [min(a, b) for a, b in zip(stop, re_)]
        if any(e <= s for s, e in zip(start, stop)):
            raise GeometryError(
                f"the ROI and the slice range {slice_range!r} do not overlap; widen one of them"
            )

    view = array_kji[tuple(slice(s, e) for s, e in zip(start, stop))]
    vmin, vmax, proj_k, proj_ji = _region_extremes(view)
    intensity = intensity_mapping(spec, vmin, vmax, view if "percentile" in spec.scheme else None)
    if crop_foreground:
        fs, fe = _foreground_box(proj_k, proj_ji, intensity.low)
        view = view[tuple(slice(s, e) for s, e in zip(fs, fe))]
        start, stop = [s + f for s, f in zip(start, fs)], [s + f for s, f in zip(start, fe)]

    return _resample_region(array_kji, view, start, stop, ijk_to_ras, conv, shape, intensity,
                            _work_dtype(view.dtype, vmin, vmax))


def region_to_model_input(
    array_kji: np.ndarray,
    ijk_to_ras: np.ndarray,
    start: Sequence[int],
    stop: Sequence[int],
    *,
    intensity: IntensityMapping,
    model_shape: Sequence[int] = DEFAULT_MODEL_SHAPE,
    convention: Optional[str] = None,
) -> tuple[np.ndarray, VolumeToModelMapping]:
    """The voxels of the half-open (K, J, I) box ``[start, stop)`` -> model tensor ``(1, D, H, W)`` in [0, 1], and
    the exact mapping back, with a GIVEN intensity mapping (no new window, no foreground crop).

    The zoom-in step of mask refinement (:mod:`.refinement`): a region around a first mask is shown to the model at
    the model's full resolution, normalised exactly as the whole volume was (``intensity`` = the first pass's
    :attr:`VolumeToModelMapping.intensity_mapping`), through the same resampling and the same mapping record as
    :func:`to_model_input`, so masks come back through :func:`logits_to_mask` unchanged.
    """
    array_kji = validate_volume(array_kji)
    ijk_to_ras = validate_ijk_to_ras(ijk_to_ras)
    shape = _model_shape(model_shape)
    conv = resolve_convention(convention)
    vol_shape = tuple(int(s) for s in array_kji.shape)
    try:
        start, stop = [int(v) for v in start], [int(v) for v in stop]
    except (TypeError, ValueError):
        raise GeometryError(f"a region is (start, stop) voxel indices in (K, J, I) order, got {start!r}, {stop!r}"
                            ) from None
    if len(start) != 3 or len(stop) != 3 or any(not 0 <= a < b <= n for a, b, n in zip(start, stop, vol_shape)):
        raise GeometryError(f"the region [{start}, {stop}) is empty or outside the volume {vol_shape} (K, J, I); "
                            f"give 0 <= start < stop <= shape along each axis")
    if not isinstance(intensity, IntensityMapping):
        raise GeometryError(f"intensity must be an IntensityMapping (a mapping's intensity_mapping), got "
                            f"{type(intensity).__name__}")
    view = array_kji[tuple(slice(s, e) for s, e in zip(start, stop))]
    work = _work_dtype(view.dtype, intensity.low, intensity.high)
    return _resample_region(array_kji, view, start, stop, ijk_to_ras, conv, shape, intensity, work)


def _resample_region(array_kji: np.ndarray, view: np.ndarray, start: Sequence[int], stop: Sequence[int],
                     ijk_to_ras: np.ndarray, conv: Convention, shape: tuple[int, int, int],
                     intensity: IntensityMapping, work: type) -> tuple[np.ndarray, VolumeToModelMapping]:
    """Reorient, clip and resize ``view`` (the voxels ``[start, stop)`` of ``array_kji``) to the model shape."""
    low, high = intensity.low, intensity.high
    model_axes, model_flips = canonical_axes(ijk_to_ras, conv)
    clip_lo, clip_hi = work(low), work(high)

    def prepare(slab: np.ndarray) -> np.ndarray:
        slab = slab.astype(work, copy=True)
        np.clip(slab, clip_lo, clip_hi, out=slab)
        return slab

    x = view
    # Most-shrinking axis first (least data touched); ties by model axis so the arithmetic, and hence the tensor, does
    # not depend on how the volume happens to be stored.
    order = sorted(range(3), key=lambda m: (shape[m] / view.shape[model_axes[m]], m))
    for step, m in enumerate(order):
        a = model_axes[m]
        n = view.shape[a]
        i0, i1, lam = _linear_taps(n, shape[m])
        if model_flips[m]:
            i0, i1 = n - 1 - i0, n - 1 - i1
        x = _lerp_along(x, a, i0, i1, lam, prepare if step == 0 else None)
    x = x.transpose(model_axes)
    out = np.empty((1, *shape), dtype=np.float32)
    scaled = (x - work(low)) * (work(1.0) / (work(high) - work(low)))
    np.clip(scaled, 0.0, 1.0, out=out[0], casting="unsafe")

    mapping = VolumeToModelMapping(
        ijk_to_ras=ijk_to_ras,
        volume_shape=tuple(int(s) for s in array_kji.shape),  # type: ignore[arg-type]
        crop_start=tuple(int(v) for v in start),  # type: ignore[arg-type]
        crop_stop=tuple(int(v) for v in stop),  # type: ignore[arg-type]
        model_axes=model_axes,
        model_flips=model_flips,
        model_shape=shape,
        convention=conv.name,
        intensity=intensity.to_dict(),
    )
    return out, mapping


def mask_to_model(mask_kji: np.ndarray, mapping: VolumeToModelMapping, *, mode: str = "nearest-exact") -> np.ndarray:
    """A label map on the volume's grid -> model space (D, H, W) by nearest neighbour; label values are kept.

    For training export: the target mask goes through the same crop and reorientation as the image. ``mode``:
    ``"nearest-exact"`` (default) takes, for each model voxel, the original voxel nearest to its centre, so masks and
    image stay aligned; ``"nearest"`` reproduces the official M3D-Seg masks bit for bit (MONAI/PyTorch legacy
    nearest, shifted by up to half an original voxel).
    """
    if mode not in ("nearest-exact", "nearest"):
        raise GeometryError(f"mode must be 'nearest-exact' or 'nearest', got {mode!r}")
    mask = np.asarray(mask_kji)
    if mask.shape != tuple(mapping.volume_shape):
        raise GeometryError(
            f"the mask has shape {mask.shape} but the mapped volume has {tuple(mapping.volume_shape)} (K, J, I); "
            f"give the mask on the same voxel grid as the image"
        )
    x = mask[tuple(slice(s, e) for s, e in zip(mapping.crop_start, mapping.crop_stop))]
    shape = mapping.model_shape
    order = sorted(range(3), key=lambda m: (shape[m] / x.shape[mapping.model_axes[m]], m))
    for m in order:
        a = mapping.model_axes[m]
        n = x.shape[a]
        idx = _nearest_taps(n, shape[m], exact=mode == "nearest-exact")
        if mapping.model_flips[m]:
            idx = n - 1 - idx
        x = _take(x, idx, a)
    return np.ascontiguousarray(x.transpose(mapping.model_axes))


# ----------------------------------------------------------------------------------------------------------------------
# Backward: model output -> volume
# ----------------------------------------------------------------------------------------------------------------------


def _as_model_array(values: Any, mapping: VolumeToModelMapping, what: str) -> np.ndarray:
    """numpy or torch (any device/dtype) -> float32 numpy (D, H, W); leading singleton axes are dropped."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch
        values = values.detach().float().cpu().numpy()
    x = np.asarray(values)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.shape != tuple(mapping.model_shape):
        raise GeometryError(
            f"the {what} have shape {tuple(np.asarray(values).shape)} but the mapping's model space is "
            f"{tuple(mapping.model_shape)} (D, H, W); pass the output for this volume's model input"
        )
    return x.astype(np.float32, copy=False)


def map_model_values(
    values_dhw: Any,
    mapping: VolumeToModelMapping,
    consume: Callable[[tuple[slice, slice, slice], np.ndarray], None],
    *,
    chunk_voxels: int = 1 << 22,
) -> None:
    """Model-space values (D, H, W) resampled once, trilinearly, at the ORIGINAL voxel centres inside the mapping's
    crop box (the inverse ``align_corners=False`` resize), handed over in chunks: ``consume(index, values)`` gets the
    (K, J, I) slices of the volume a chunk covers and the float32 values there, chunk after chunk, so that a mask, a
    statistic or a float map is made without holding more than ``chunk_voxels`` resampled values at once.

    The one backward resampling: masks (:func:`logits_to_mask`), mask confidence and evidence maps all go through
    it, so they line up with each other and with the volume voxel for voxel. NaN counts as -1e6 (background).
    """
    x = _as_model_array(values_dhw, mapping, "values")
    x = np.nan_to_num(x, nan=-1e6, posinf=1e6, neginf=-1e6)
    np.clip(x, -1e6, 1e6, out=x)
    region_shape = tuple(e - s for s, e in zip(mapping.crop_start, mapping.crop_stop))
    offset = mapping.crop_start
    # Put the values in array (K, J, I) order: array axis a holds model axis inv[a].
    inv = tuple(int(v) for v in np.argsort(mapping.model_axes))
    x = x.transpose(inv)
    taps = []
    for a in range(3):
        m = inv[a]
        i0, i1, lam = _linear_taps(mapping.model_shape[m], region_shape[a])
        if mapping.model_flips[m]:
            i0, i1, lam = i0[::-1], i1[::-1], lam[::-1]
        taps.append((a, i0, i1, lam, region_shape[a] / mapping.model_shape[m]))
    taps.sort(key=lambda t: (t[4], t[0]))  # least growth first; the biggest, last one is done chunk by chunk
    for a, i0, i1, lam, _ in taps[:2]:
        x = _lerp_along(x, a, i0, i1, lam)
    a, i0, i1, lam, _ = taps[2]
    others = [b for b in range(3) if b != a]
    cax = max(others, key=lambda b: x.shape[b])
    per_row = max(1, int(np.prod(region_shape)) // max(1, region_shape[cax]))
    step = max(1, chunk_voxels // per_row)
    for s in range(0, x.shape[cax], step):
        sl = [slice(None)] * 3
        sl[cax] = slice(s, s + step)
        part = _lerp_along(x[tuple(sl)], a, i0, i1, lam)
        index = [slice(offset[b], offset[b] + region_shape[b]) for b in range(3)]
        index[cax] = slice(offset[cax] + s, offset[cax] + min(s + step, region_shape[cax]))
        consume(tuple(index), part)  # type: ignore[arg-type]


def new_volume_array(mapping: VolumeToModelMapping, dtype: Any, what: str) -> np.ndarray:
    """Zeros on the mapping's volume grid (K, J, I), or an InputError naming ``what`` when memory runs out."""
    try:
        return np.zeros(mapping.volume_shape, dtype=dtype)
    except MemoryError:
        raise InputError(
            f"not enough memory for {what} of {np.prod(mapping.volume_shape) * np.dtype(dtype).itemsize / 2**30:.2f} "
            f"GiB ({mapping.volume_shape} voxels); close other data or use a smaller volume"
        ) from None


def logits_to_mask(
    logits_dhw: Any, mapping: VolumeToModelMapping, *, threshold: float = 0.5, chunk_voxels: int = 1 << 22
) -> np.ndarray:
    """Segmentation logits in model space -> uint8 mask (K, J, I) on the ORIGINAL voxel grid.

    The logits are resampled once, trilinearly, at the original voxel centres inside the crop box
    (:func:`map_model_values`), then ``sigmoid(logit) > threshold``; voxels outside the crop box are 0. So a
    Slicer segment made from the mask lines up with the CT voxel for voxel. NaN logits count as background.
    """
    if not 0.0 < threshold < 1.0:
        raise InputError(f"threshold is a probability in (0, 1), got {threshold}")
    t = math.log(threshold / (1.0 - threshold))
    out = new_volume_array(mapping, np.uint8, "a mask")

    def threshold_into(index: tuple[slice, slice, slice], part: np.ndarray) -> None:
        np.greater(part, t, out=out[index], casting="unsafe")

    map_model_values(logits_dhw, mapping, threshold_into, chunk_voxels=chunk_voxels)
    return out


def model_values_to_volume(values_dhw: Any, mapping: VolumeToModelMapping, *, fill: float = 0.0) -> np.ndarray:
    """Model-space values (D, H, W) -> float32 (K, J, I) on the ORIGINAL voxel grid, by the same resampling as masks
    (:func:`map_model_values`); ``fill`` outside the crop box. For maps that are not masks (evidence maps)."""
    out = new_volume_array(mapping, np.float32, "a float map")
    if fill:
        out.fill(fill)

    def copy_into(index: tuple[slice, slice, slice], part: np.ndarray) -> None:
        out[index] = part

    map_model_values(values_dhw, mapping, copy_into)
    return out


def model_mask_to_volume(mask_dhw: Any, mapping: VolumeToModelMapping) -> np.ndarray:
    """A binary mask in model space -> uint8 mask (K, J, I): trilinear at the original voxel centres, > 0.5.

    Smoother than nearest neighbour for the 8x-coarser model grid; use :func:`logits_to_mask` when logits exist.
    """
    m = _as_model_array(mask_dhw, mapping, "mask values")
    return logits_to_mask((m > 0).astype(np.float32) - 0.5, mapping)


# ----------------------------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------------------------


def mask_to_box(mask_dhw: Any) -> Optional[Box]:
    """Binary mask in model space -> official box ``(d1, h1, w1, d2, h2, w2)``: min and max voxel index divided by
    (D, H, W), each rounded to 3 decimals (M3D ``mask2box``). None for an empty mask (the official data then answer
    "there is no ..."). A leading channel axis ``(1, D, H, W)`` is accepted."""
    if hasattr(mask_dhw, "detach"):
        mask_dhw = mask_dhw.detach().cpu().numpy()
    m = np.asarray(mask_dhw)
    while m.ndim > 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 3:
        raise GeometryError(f"mask_to_box needs a 3D mask (D, H, W), got shape {np.asarray(mask_dhw).shape}")
    m = m != 0
    ds = np.flatnonzero(m.any(axis=(1, 2)))
    if ds.size == 0:
        return None
    hs = np.flatnonzero(m.any(axis=(0, 2)))
    ws = np.flatnonzero(m.any(axis=(0, 1)))
    big_d, big_h, big_w = m.shape
    values = (ds[0] / big_d, hs[0] / big_h, ws[0] / big_w, ds[-1] / big_d, hs[-1] / big_h, ws[-1] / big_w)
    return tuple(round(float(v), 3) for v in values)  # type: ignore[return-value]


def validate_box(box: Any) -> Box:
    """Six finite numbers in [0, 1], min corner <= max corner, as a tuple of floats (else GeometryError)."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise GeometryError(
            f"a box is 6 numbers [d1, h1, w1, d2, h2, w2] in [0, 1], got {box!r}"
        ) from None
    if len(values) != 6:
        raise GeometryError(f"a box has 6 numbers [d1, h1, w1, d2, h2, w2], got {len(values)}: {box!r}")
    if not all(math.isfinite(v) for v in values):
        raise GeometryError(f"the box {list(values)} contains NaN or Inf")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise GeometryError(
            f"box values must lie in [0, 1] (normalised model coordinates), got {bad} in {list(values)}"
        )
    inverted = [name for name, lo, hi in zip("dhw", values[:3], values[3:]) if lo > hi]
    if inverted:
        raise GeometryError(
            f"the box {list(values)} is inverted along {', '.join(inverted)}: the first three numbers are the "
            f"minimum corner and the last three the maximum corner"
        )
    return values  # type: ignore[return-value]


def format_box(box: Sequence[float]) -> str:
    """Official text form: Python's list repr of the rounded floats: ``[0.094, 0.301, 0.223, 0.75, 0.617, 0.551]``."""
    values = validate_box(box)
    return str([round(v, 3) + 0.0 for v in values])  # + 0.0 turns -0.0 into 0.0


_BOX_MARKERS = re.compile(r"<bx_start>|<bx_end>")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")


def parse_box(text: str) -> Box:
    """Box text -> 6 floats. Accepts ``[d1, h1, w1, d2, h2, w2]`` with or without the ``<bx_start>``/``<bx_end>``
    markers and surrounding words (the first bracketed group is used), or six bare comma-separated numbers."""
    if not isinstance(text, str):
        raise GeometryError(f"box text must be a string, got {type(text).__name__}")
    cleaned = _BOX_MARKERS.sub(" ", text)
    found = _BRACKETED.search(cleaned)
    body = found.group(1) if found else cleaned
    parts = [p.strip() for p in body.split(",")]
    example = "e.g. [0.094, 0.301, 0.223, 0.75, 0.617, 0.551]"
    if len(parts) != 6 or not all(parts):
        raise GeometryError(
            f"could not read a box from {text!r}: expected 6 comma-separated numbers in brackets, {example}"
        )
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise GeometryError(f"could not read a box from {text!r}: {p!r} is not a number ({example})") from None
        values.append(v)
    return validate_box(values)


def box_to_model_bounds(box: Sequence[float], model_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Box -> its edges in continuous model voxel coordinates: ``b_min * N - 0.5`` and ``b_max * N + 0.5``.

    The box names the first and last voxel it contains, so as a region it spans whole voxels.
    """
    b = np.asarray(validate_box(box))
    n = np.asarray(model_shape, dtype=np.float64)
    return b[:3] * n - 0.5, b[3:] * n + 0.5


def model_bounds_to_box(lower: Sequence[float], upper: Sequence[float], model_shape: Sequence[int]) -> Box:
    """Edges in model voxel coordinates -> box: the inverse of :func:`box_to_model_bounds`, clamped to the model grid
    and rounded to 3 decimals. A region thinner than one voxel collapses to its centre voxel."""
    n = np.asarray(model_shape, dtype=np.float64)
    lo, hi = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    first, last = lo + 0.5, hi - 0.5
    thin = first > last
    mid = (lo + hi) / 2
    first = np.where(thin, mid, first)
    last = np.where(thin, mid, last)
    first = np.clip(first, 0.0, n - 1) / n
    last = np.clip(last, 0.0, n - 1) / n
    return tuple(round(float(v), 3) + 0.0 for v in (*first, *last))  # type: ignore[return-value]


def box_to_roi(box: Sequence[float], mapping: VolumeToModelMapping) -> RasRoi:
    """Box (official normalised model coordinates) -> RAS ROI covering its model voxels.

    The ROI's axes are the model axes in RAS, reordered and signed to be nearest to +R, +A, +S, so an axis-aligned
    volume gives an identity orientation and ``size`` in (R, A, S) order; an oblique volume gives an oblique ROI.
    """
    lo, hi = box_to_model_bounds(box, mapping.model_shape)
    m = mapping.model_to_ras
    center = (m @ np.append((lo + hi) / 2, 1.0))[:3]
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    unit = m[:3, :3] / spacing
    extent = (hi - lo) * spacing
    model_for_ras = nearest_ras_axes(m)
    axes = np.zeros((3, 3))
    size = np.zeros(3)
    for r in range(3):
        mi = model_for_ras[r]
        axes[:, r] = unit[:, mi] * (1.0 if unit[r, mi] >= 0 else -1.0)
        size[r] = extent[mi]
    return RasRoi(center=center, size=size, axes=axes)


def roi_to_box(roi: RasRoi, mapping: VolumeToModelMapping, *, snap: bool = False) -> Box:
    """RAS ROI -> official box values, from the ROI's bounding box in model space.

    Default: the exact inverse of :func:`box_to_roi` (box -> ROI -> box gives the same text for any box). ``snap``:
    the official ``mask2box`` of the model voxels whose centres lie inside that bounding box (whole voxel indices,
    like every box in the training data). Parts outside the model's field of view are clipped; an ROI entirely
    outside it is an error.
    """
    if not isinstance(roi, RasRoi):
        raise GeometryError(f"roi must be a RasRoi, got {type(roi).__name__}")
    pts = (mapping.ras_to_model @ np.c_[roi.corners(), np.ones(8)].T)[:3].T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    n = np.asarray(mapping.model_shape, dtype=np.float64)
    if np.any(hi <= -0.5) or np.any(lo >= n - 0.5):
        raise GeometryError(
            f"the ROI (centre {np.round(roi.center, 1).tolist()} mm) lies outside the region the model sees (the "
            f"cropped volume); move the ROI inside the volume or preprocess without that crop"
        )
    if snap:
        first, last = np.ceil(lo - 1e-9), np.floor(hi + 1e-9)
        mid = np.round((lo + hi) / 2)
        thin = first > last
        first, last = np.where(thin, mid, first), np.where(thin, mid, last)
        first, last = np.clip(first, 0, n - 1) / n, np.clip(last, 0, n - 1) / n
        return tuple(round(float(v), 3) + 0.0 for v in (*first, *last))  # type: ignore[return-value]
    return model_bounds_to_box(lo, hi, mapping.model_shape)
