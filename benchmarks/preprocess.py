"""Volume -> model tensor: ours (``geometry.to_model_input``) vs the official MONAI chain, side by side in one run.

Input: a 512 x 512 x 300 int16 CT-like phantom (LPS-stored like a DICOM series, 0.7 x 0.7 x 1 mm, noisy body with a
liver, lungs and a spine). Both paths produce the (1, 32, 256, 256) float32 tensor of the same window:

* official: the canonical view of the array (the official scripts' axis swap) -> clip to the window -> float32 ->
  MONAI ``ScaleIntensity`` (min-max) -> ``CropForeground`` -> ``Resize(32, 256, 256, trilinear)``
  (``Data/process/m3d_seg_data_prepare.py`` plus the author's windowing advice, M3D issue #18);
* ours: ``to_model_input(array, ijk_to_ras, window=...)`` (reorientation, crop, window, resize, min-max, and the
  mapping record).

Prints each time (best of ``--repeats``), the ratio and the max abs difference of the tensors, for the abdomen window
(the headline, last line ``ratio: N.NN`` = official / ours) and, for information, the default M3D-Seg percentile
scheme (official: numpy percentiles of the foreground, then the same chain).

Usage: python benchmarks/preprocess.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def ct_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(array_kji int16, ijk_to_ras): 300 slices of 512 x 512, I -> patient left, J -> posterior, K -> superior."""
    shape = (300, 512, 512)
    m = np.diag([-0.7, -0.7, 1.0, 1.0])
    m[:3, 3] = (179.0, 179.0, -150.0)
    vol = np.full(shape, -1000, np.int16)
    jj, ii = np.ogrid[:512, :512]
    body = ((jj - 256) / 170.0) ** 2 + ((ii - 256) / 220.0) ** 2 <= 1
    spine = (jj - 380) ** 2 + (ii - 256) ** 2 <= 25**2
    table = np.broadcast_to((jj >= 440) & (jj < 450), (512, 512))
    rng = np.random.default_rng(seed)
    for k in range(shape[0]):
        sl = vol[k]
        sl[table] = -200
        if 20 <= k < 280:
            sl[body] = 40
            if k >= 200:
                for ci in (170, 342):
                    sl[(((jj - 230) / 90.0) ** 2 + ((ii - ci) / 60.0) ** 2 <= 1) & body] = -800
            if 130 <= k < 200:
                r = np.sqrt(max(1e-6, 1 - ((k - 165) / 35.0) ** 2))
                sl[((jj - 230) / (70.0 * r)) ** 2 + ((ii - 170) / (60.0 * r)) ** 2 <= 1] = 60
            sl[spine] = 700
        sl += rng.normal(0, 15, size=sl.shape).astype(np.int16)
    return vol, m


def official_chain(array_kji: np.ndarray, low: float, high: float) -> np.ndarray:
    """What the official scripts do, on the same voxels in the model's orientation."""
    import monai.transforms as mt

    # m3d-cap-v1 orientation of this LPS-stored volume: D = K reversed (superior first), H = J, W = I (both already
    # anterior->posterior and right->left): views, as the official swapaxes.
    x = array_kji[::-1]
    x = np.clip(x.astype(np.float32), low, high)[None]
    x = mt.ScaleIntensity(minv=0.0, maxv=1.0)(x)
    x = mt.CropForeground()(x)
    x = mt.Resize(spatial_size=(32, 256, 256), mode="trilinear")(x)
    return np.asarray(x)


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def compare(name: str, ours_fn, official_fn, repeats: int) -> float:
    t_official, ref = best_time(official_fn, repeats)
    t_ours, (tensor, _) = best_time(ours_fn, repeats)
    diff = float(np.max(np.abs(tensor - ref)))
    ratio = t_official / t_ours
    print(f"{name:10} official MONAI chain: {t_official:6.3f} s   ours: {t_ours:6.3f} s   "
          f"official/ours: {ratio:5.2f}   max |diff|: {diff:.2e}", flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from M3DAssistantLib.geometry import WINDOW_PRESETS, to_model_input
    from M3DAssistantLib.preprocessing import percentile_bounds

    print(f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("building a 512 x 512 x 300 int16 CT phantom ...", flush=True)
    vol, m = ct_phantom()

    c, w = WINDOW_PRESETS["abdomen"]
    low, high = c - w / 2, c + w / 2
    ratio = compare("abdomen", lambda: to_model_input(vol, m, window="abdomen"),
                    lambda: official_chain(vol, low, high), args.repeats)

    def official_percentile():
        lo, hi = np.percentile(vol[vol > vol.mean()], (0.05, 99.95))
        return official_chain(vol, lo, hi)

    assert percentile_bounds(vol) == tuple(float(v) for v in np.percentile(vol[vol > vol.mean()], (0.05, 99.95)))
    compare("percentile", lambda: to_model_input(vol, m, window=None), official_percentile, args.repeats)
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
