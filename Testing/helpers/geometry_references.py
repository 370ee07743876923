"""Independent references for the geometry tests (no test functions here).

Everything in this file avoids M3DAssistantLib.geometry: orientation comes from nibabel, resampling from torch /
MONAI / scipy, so that the tests compare our code with someone else's."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

PERMUTATIONS = list(itertools.permutations(range(3)))


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation about R, then A, then S (radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(perm=(0, 1, 2), flips=(False, False, False), spacing=(1.0, 1.0, 1.0), angles=(0.0, 0.0, 0.0),
                origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """IJK->RAS whose voxel axis c runs along RAS axis perm[c] (negated if flips[c]), then rotated by ``angles``."""
    m = np.eye(4)
    rot = rotation(*angles)
    for c in range(3):
        e = np.zeros(3)
        e[perm[c]] = -1.0 if flips[c] else 1.0
        m[:3, c] = rot @ e * spacing[c]
    m[:3, 3] = origin
    return m


def voxel_ras(shape_kji, ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS of every voxel centre, shape (K, J, I, 3)."""
    kk, jj, ii = np.indices(shape_kji, dtype=np.float64)
    ijk = np.stack([ii, jj, kk], axis=-1)
    return ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


def canonical(array_kji: np.ndarray, ijk_to_ras: np.ndarray, directions=("I", "P", "L")) -> np.ndarray:
    """The array re-ordered so that axis m increases toward ``directions[m]``, by nibabel's orientation code."""
    transform = ornt_transform(io_orientation(ijk_to_ras), axcodes2ornt(tuple(directions)))
    return np.ascontiguousarray(apply_orientation(np.asarray(array_kji).transpose(2, 1, 0), transform))


def torch_resize(array: np.ndarray, shape, mode: str = "trilinear") -> np.ndarray:
    """F.interpolate as MONAI Resize calls it (align_corners=False for linear modes), in float64."""
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))[None, None]
    kwargs = {"align_corners": False} if mode != "nearest" else {}
    return F.interpolate(x, size=tuple(shape), mode=mode, **kwargs)[0, 0].numpy()


def monai_chain(canonical_array: np.ndarray, low: float, high: float, shape) -> np.ndarray:
    """Official chain (m3d_seg_data_prepare.py) after an optional clip: min-max, CropForeground, Resize(trilinear)."""
    import monai.transforms as mt

    x = np.clip(canonical_array.astype(np.float32), low, high)[None]
    x = mt.ScaleIntensity(minv=0.0, maxv=1.0)(x)
    x = mt.CropForeground()(x)
    x = mt.Resize(spatial_size=tuple(shape), mode="trilinear")(x)
    return np.asarray(x)[0]


def seg_percentiles(values: np.ndarray) -> tuple[float, float]:
    """The M3D-Seg / SegVol recipe written out again: percentiles of the voxels above the mean."""
    values = np.asarray(values, dtype=np.float64)
    foreground = values[values > values.mean()]
    return float(np.percentile(foreground, 0.05)), float(np.percentile(foreground, 99.95))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def same_grid_reorder(array_kji: np.ndarray, ijk_to_ras: np.ndarray, perm_kji, flip_kji):
    """The same voxels stored differently: array axes permuted/flipped, matrix adjusted so every voxel keeps its RAS."""
    new = np.transpose(array_kji, perm_kji)
    for a, f in enumerate(flip_kji):
        if f:
            new = np.flip(new, axis=a)
    new = np.ascontiguousarray(new)
    # new array axis a = old array axis perm_kji[a]; new index x -> old index x or n-1-x.
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1
    for a in range(3):
        old_a = perm_kji[a]
        row, col = 2 - old_a, 2 - a
        if flip_kji[a]:
            new_to_old[row, col] = -1
            new_to_old[row, 3] = array_kji.shape[old_a] - 1
        else:
            new_to_old[row, col] = 1
    return new, ijk_to_ras @ new_to_old
