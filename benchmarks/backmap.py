"""Model logits -> mask on the original grid: ours (``geometry.logits_to_mask``) vs scipy, side by side in one run.

Logits: (32, 256, 256) float32, a smooth liver-sized object (signed distance, as a segmentation head gives). Grid: a
512 x 512 x 300 CT (0.7 x 0.7 x 1 mm, LPS-stored like DICOM), mapped without a foreground crop, so all 78.6 M voxels
are resampled (the worst case; a foreground crop only makes both faster).

* scipy: ``scipy.ndimage.affine_transform(logits, M, offset, order=1, mode="nearest")`` with the mapping's voxel ->
  model affine, then ``> 0`` -- the textbook way;
* ours: ``logits_to_mask(logits, mapping)`` (separable trilinear at the voxel centres, fused with the threshold).

Prints both times (best of ``--repeats``), the ratio and the Dice of the two masks (goal: ratio >= 5 with
Dice >= 0.999). Last line: ``ratio: N.NN`` = scipy / ours.

Usage: python benchmarks/backmap.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def scipy_backmap(logits: np.ndarray, mapping) -> np.ndarray:
    from scipy.ndimage import affine_transform

    # output voxel (k, j, i) of the crop box -> model (d, h, w)
    shift = np.eye(4)
    shift[:3, 3] = np.array(mapping.crop_start)[::-1]
    kji_to_ijk = np.eye(4)[[2, 1, 0, 3]]
    mat = mapping.ijk_to_model @ shift @ kji_to_ijk
    crop = tuple(slice(s, e) for s, e in zip(mapping.crop_start, mapping.crop_stop))
    out = np.zeros(mapping.volume_shape, np.uint8)
    shape = tuple(e - s for s, e in zip(mapping.crop_start, mapping.crop_stop))
    out[crop] = affine_transform(logits, mat[:3, :3], mat[:3, 3], output_shape=shape, order=1, mode="nearest") > 0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import scipy

    from M3DAssistantLib.geometry import logits_to_mask, to_model_input

    print(f"numpy {np.__version__}, scipy {scipy.__version__}")
    shape = (300, 512, 512)
    m = np.diag([-0.7, -0.7, 1.0, 1.0])
    m[:3, 3] = (179.0, 179.0, -150.0)
    # A mapping for that grid (the voxel values do not matter for the backward step; a tiny strided stand-in volume
    # would have a different grid, so build it on a zero-cost broadcast view of the full size).
    volume = np.broadcast_to(np.arange(512, dtype=np.int16)[None, None, :], shape)
    _, mapping = to_model_input(volume, m, window="minmax", crop_foreground=False)
    d, h, w = np.ogrid[:32, :256, :256]
    logits = (1.0 - np.sqrt(((d - 18) / 7.0) ** 2 + ((h - 110) / 60.0) ** 2 + ((w - 80) / 55.0) ** 2)) * 20.0
    logits = logits.astype(np.float32)

    t_scipy, ref = best_time(lambda: scipy_backmap(logits, mapping), args.repeats)
    t_ours, ours = best_time(lambda: logits_to_mask(logits, mapping), args.repeats)
    inter = np.count_nonzero(ours & ref)
    dice = 2 * inter / (np.count_nonzero(ours) + np.count_nonzero(ref))
    differ = np.count_nonzero(ours != ref)
    print(f"grid {shape} ({np.prod(shape) / 1e6:.1f} M voxels), mask {np.count_nonzero(ours) / 1e6:.2f} M voxels")
    print(f"scipy affine_transform(order=1): {t_scipy:6.3f} s   ours: {t_ours:6.3f} s   scipy/ours: "
          f"{t_scipy / t_ours:5.2f}   Dice: {dice:.6f} ({differ} voxels differ)")
    print(f"ratio: {t_scipy / t_ours:.2f}")


if __name__ == "__main__":
    main()
