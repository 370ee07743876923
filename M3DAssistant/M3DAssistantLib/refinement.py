"""Zoom-in refinement of a [SEG] mask: SegVol's zoom-out-zoom-in, prompted by M3D-LaMed's own [SEG] embedding.

M3D-LaMed predicts a mask at the model's resolution (32 x 256 x 256) for the whole (foreground-cropped) volume, so
thin and small structures come back coarse. SegVol (Du et al., arXiv 2311.13385, "zoom-out-zoom-in") refines its own
whole-volume prediction by looking again at the region around it. We do the same with M3D's prompt:

1. the first (coarse) mask, on the volume's grid, gives a region: its bounding box plus a margin
   (:func:`zoom_region`), within the region the model saw;
2. that region of the ORIGINAL volume is resampled to the model grid by the same geometry code as the first pass
   (:func:`~.geometry.region_to_model_input`), normalised exactly as the whole volume was (the first pass's
   intensity mapping), so the model sees the same values, only larger;
3. SegVol's image encoder and mask decoder run on it with the same [SEG] prompt embedding (the caller's ``segment``
   function: no new text is generated);
4. the new logits come back through the region's own mapping (:func:`~.geometry.logits_to_mask`): the mask is
   pasted onto the volume's grid at the region's resolution; outside the region it is empty, as the first mask
   was (the region holds all of it).

The geometry is tested with oracle decoders (``Testing/engine/test_refinement.py``): whatever the orientation, the
refined phantom mask lands where the phantom is, at the region's finer resolution.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError
from .geometry import VolumeToModelMapping, region_to_model_input
from .measurements import mask_bounds
from .results import Refinement

DEFAULT_MARGIN = 0.25
"""Margin around the first mask's box, as a fraction of its extent on each side (SegVol enlarges its zoom-in box
too, so that the structure's edges and context are in view)."""

MIN_MARGIN_VOXELS = 4
"""At least this many voxels of margin on each side (a one-voxel-thin first mask still gets context)."""

SegmentFunction = Callable[[np.ndarray, VolumeToModelMapping], Any]
"""``segment(tensor (1, D, H, W) in [0, 1], its mapping) -> logits (D, H, W)`` on the model grid."""


def zoom_region(mask_kji: np.ndarray, within: tuple[Sequence[int], Sequence[int]], *,
                margin: float = DEFAULT_MARGIN, min_margin: int = MIN_MARGIN_VOXELS
                ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The half-open (K, J, I) region ``[start, stop)`` around a mask: its bounding box grown by ``margin`` x its
    extent (at least ``min_margin`` voxels) on each side, clipped to ``within`` (the region the model saw)."""
    if not 0.0 <= margin <= 4.0:
        raise InputError(f"the zoom-in margin is a fraction of the mask's extent from 0 to 4, got {margin}")
    bounds = mask_bounds(mask_kji)
    if bounds is None:
        raise InputError("there is no mask to refine (it is empty)")
    lo, hi = bounds
    extent = hi - lo + 1
    grow = np.maximum(np.ceil(margin * extent).astype(int), int(min_margin))
    w_start, w_stop = (np.asarray(v, dtype=int) for v in within)
    start = np.maximum(lo - grow, w_start)
    stop = np.minimum(hi + 1 + grow, w_stop)
    if np.any(stop <= start):
        raise InputError("the mask lies outside the region the model saw; nothing to refine")
    return tuple(int(v) for v in start), tuple(int(v) for v in stop)  # type: ignore[return-value]


def refine_logits(
    array_kji: np.ndarray,
    ijk_to_ras: np.ndarray,
    coarse_mask: np.ndarray,
    coarse_mapping: VolumeToModelMapping,
    segment: SegmentFunction,
    *,
    margin: float = DEFAULT_MARGIN,
) -> tuple[Any, VolumeToModelMapping, Refinement]:
    """Look again at the region around ``coarse_mask`` (see the module docstring).

    Returns the region's logits (D, H, W; map them to the volume with :func:`~.geometry.logits_to_mask` and the
    returned mapping), the region's :class:`~.geometry.VolumeToModelMapping` and the :class:`~.results.Refinement`
    record for the result's provenance."""
    start, stop = zoom_region(coarse_mask, (coarse_mapping.crop_start, coarse_mapping.crop_stop), margin=margin)
    tensor, mapping = region_to_model_input(
        array_kji, ijk_to_ras, start, stop, intensity=coarse_mapping.intensity_mapping,
        model_shape=coarse_mapping.model_shape, convention=coarse_mapping.convention)
    logits = segment(tensor, mapping)
    zoom = tuple(round(float(c) / float(r), 4) for c, r in zip(coarse_mapping.crop_shape, mapping.crop_shape))
    record = Refinement(start=start, stop=stop, margin=margin, zoom=zoom,  # type: ignore[arg-type]
                        coarse_voxel_count=int(np.count_nonzero(coarse_mask)), mapping=mapping)
    return logits, mapping, record


def describe(record: Refinement) -> str:
    """One line for the provenance notes."""
    region = ", ".join(f"{axis} {a}:{b}" for axis, a, b in zip("KJI", record.start, record.stop))
    finer = " x ".join(f"{z:g}" for z in record.zoom)
    return (f"refined by zoom-in: voxels {region} (margin {record.margin:g}) seen again at {finer} the first pass's "
            f"resolution (d x h x w); first mask {record.coarse_voxel_count} voxels")


def resolution_gain(record: Refinement) -> float:
    """How many times more model voxels per volume voxel the second look had (product of the zooms)."""
    return float(math.prod(record.zoom))


__all__ = ["DEFAULT_MARGIN", "MIN_MARGIN_VOXELS", "zoom_region", "refine_logits", "describe", "resolution_gain"]
