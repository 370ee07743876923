"""Intensity schemes: how voxel values become the [0, 1] range M3D-LaMed was trained on.

Every scheme ends the same way as the official data scripts (``Data/process/*.py``): values are clipped to a range
``[low, high]`` and min-max scaled, so ``low -> 0`` and ``high -> 1``. The schemes only differ in how ``low`` and
``high`` are chosen:

``window``      a CT window (centre, width) -- a preset from :data:`WINDOW_PRESETS` or the volume's own display
                window. The author's advice for new CT (M3D issue #18): window to the target tissue, then min-max.
``percentile``  the M3D-Seg recipe (``m3d_seg_data_preprocess.py``): foreground = voxels above the mean, clip to its
                0.05 and 99.95 percentiles. Works for CT and MR alike, so it is the default.
``volume-percentile``  the M3D-RefSeg recipe (``m3d_refseg_data_prepare.py``: MONAI
                ``ScaleIntensityRangePercentiles`` 0.5 / 99.5 with clipping): percentiles of *all* voxels.
``minmax``      no clipping at all, the plain min-max of ``m3d_seg_data_prepare.py``.

Which scheme a task gets by default (:func:`default_window`) follows the data it was trained on: report and VQA
(M3D-Cap / M3D-VQA, JPEGs in the window the uploader chose) the volume's *display* window -- Slicer's window/level,
else the DICOM WindowCenter/WindowWidth, else the abdomen preset for CT; boxes and semantic segmentation (M3D-Seg)
the foreground percentiles; referring segmentation (M3D-RefSeg) the whole-volume percentiles. Evidence:
``docs/conventions.md``.

As in the official scripts the final min-max uses the *data's* minimum and maximum after clipping, so ``low`` and
``high`` are the clipped data's extremes (a window wider than the data range shrinks to the data). Both are recorded
in :class:`IntensityMapping`, which is serialised with the geometry mapping so that training export and inference
normalise identically.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import numpy as np

from .errors import InputError

INTENSITY_VERSION = 1

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    # (centre, width) in HU, the values of 3D Slicer's own CT presets (Volumes module, VolumeDisplayPresets.json),
    # so a user who picked "CT-Abdomen" in Slicer gets the same picture in the model.
    "abdomen": (40.0, 350.0),
    "lung": (-500.0, 1400.0),
    "bone": (400.0, 1000.0),
    "brain": (50.0, 100.0),
}

SEG_PERCENTILES = (0.05, 99.95)
"""Foreground percentiles of the M3D-Seg preprocessing (SegVol recipe)."""

REFSEG_PERCENTILES = (0.5, 99.5)
"""Whole-volume percentiles of the M3D-RefSeg preprocessing."""

CT_AIR_THRESHOLD = -500.0
"""A volume whose minimum is at or below this is taken for CT in Hounsfield units (air is about -1000 HU; MR and
other modalities have no such values) when no DICOM Modality says otherwise."""


@dataclasses.dataclass(frozen=True)
class IntensitySpec:
    """What was asked for, before the data are looked at."""

    scheme: str  # "window" | "percentile" | "minmax"
    name: str  # preset name, "custom" for a (centre, width) pair, or the scheme name
    center: Optional[float] = None
    width: Optional[float] = None


WindowArg = Union[None, str, tuple[float, float], IntensitySpec]


@dataclasses.dataclass(frozen=True)
class DisplayWindow:
    """The window a reader sees the volume in: ``center``/``width`` in the volume's values (HU for CT), and where it
    comes from ("Slicer" for the display node's window/level, "DICOM" for WindowCenter/WindowWidth)."""

    center: float
    width: float
    source: str = "display"

    def __post_init__(self) -> None:
        center, width = float(self.center), float(self.width)
        if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
            raise InputError(f"the display window (center {self.center}, width {self.width}) from {self.source} is "
                             "invalid: it needs a finite center and a positive width")
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "width", width)

    @property
    def spec(self) -> IntensitySpec:
        return IntensitySpec("window", f"display ({self.source})", self.center, self.width)


@dataclasses.dataclass(frozen=True)
class IntensityMapping:
    """What was applied: clip to ``[low, high]``, then ``(v - low) / (high - low)``."""

    scheme: str
    name: str
    low: float
    high: float
    center: Optional[float] = None
    width: Optional[float] = None
    percentiles: Optional[tuple[float, float]] = None
    version: int = INTENSITY_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["percentiles"] is not None:
            d["percentiles"] = list(d["percentiles"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IntensityMapping":
        d = dict(d)
        if d.get("percentiles") is not None:
            d["percentiles"] = tuple(d["percentiles"])
        if int(d.get("version", INTENSITY_VERSION)) != INTENSITY_VERSION:
            raise InputError(
                f"intensity scheme version {d.get('version')} is not supported (this code reads version "
                f"{INTENSITY_VERSION}); re-export the data with this version of M3D for 3D Slicer"
            )
        return cls(**d)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Values -> [0, 1] float32 (clip, then min-max with the recorded extremes)."""
        v = np.clip(np.asarray(values, dtype=np.float64), self.low, self.high)
        return ((v - self.low) / (self.high - self.low)).astype(np.float32)

    def invert(self, normalised: np.ndarray) -> np.ndarray:
        """[0, 1] -> original values (exact inside ``[low, high]``; clipped values cannot come back)."""
        return np.asarray(normalised, dtype=np.float64) * (self.high - self.low) + self.low


def resolve_window(window: WindowArg) -> IntensitySpec:
    """Turn the user's ``window`` argument into a spec; reject anything ambiguous with a message that lists options."""
    options = ", ".join([*WINDOW_PRESETS, "percentile", "volume-percentile", "minmax"])
    if window is None:
        return IntensitySpec("percentile", "percentile")
    if isinstance(window, IntensitySpec):
        return window
    if isinstance(window, DisplayWindow):
        return window.spec
    if isinstance(window, str):
        key = window.strip().lower()
        if key in WINDOW_PRESETS:
            c, w = WINDOW_PRESETS[key]
            return IntensitySpec("window", key, c, w)
        if key in ("percentile", "minmax", "volume-percentile"):
            return IntensitySpec(key, key)
        if key == "refseg":
            return IntensitySpec("volume-percentile", "volume-percentile")
        raise InputError(f"unknown intensity window {window!r}; use one of {options}, or a (center, width) pair in HU")
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(
            f"window must be a preset name ({options}) or a (center, width) pair of numbers, got {window!r}"
        ) from None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise InputError(
            f"window (center={center}, width={width}) is invalid: the width must be a positive finite number, "
            f"e.g. (40, 350) for soft tissue"
        )
    return IntensitySpec("window", "custom", center, width)


def volume_percentile_bounds(
    values: np.ndarray, percentiles: tuple[float, float] = REFSEG_PERCENTILES, *, direct_below: int = 1 << 20
) -> tuple[float, float]:
    """M3D-RefSeg clip range: percentiles of all voxels, exactly ``np.percentile(values, percentiles)`` (what MONAI's
    ``ScaleIntensityRangePercentiles`` computes), without sorting or copying a large volume (see
    :func:`percentile_bounds`)."""
    values = np.asarray(values)
    result = None
    if values.size >= direct_below and values.ndim == 3:
        result = _tail_percentiles(values, None, percentiles)
    if result is None:
        lo, hi = np.percentile(values, percentiles)
        result = float(lo), float(hi)
    return result


def percentile_bounds(
    values: np.ndarray, percentiles: tuple[float, float] = SEG_PERCENTILES, *, direct_below: int = 1 << 20
) -> tuple[float, float]:
    """M3D-Seg clip range: percentiles of the voxels above the mean (the 'foreground' of a CT or MR).

    Exactly ``np.percentile(values[values > values.mean()], percentiles)`` (linear method), but for large volumes
    without sorting or even copying the foreground: a strided sample predicts a value past each wanted rank, one pass
    over the volume (slab by slab, so the temporaries stay in cache) counts the foreground and collects the two thin
    tails, and the exact order statistics come out of the tails. If the sample misled (very odd histograms), the
    plain computation runs instead. Volumes smaller than ``direct_below`` voxels use np.percentile directly.
    """
    values = np.asarray(values)
    # Accumulating in float64 keeps the mean (and so the foreground) independent of memory order for integer data.
    mean = float(np.mean(values, dtype=np.float64))
    threshold = _same_dtype_threshold(values.dtype, mean)
    result = None
    if values.size >= direct_below and values.ndim == 3:
        result = _tail_percentiles(values, threshold, percentiles)
    if result is None:
        foreground = values[values > threshold]
        if foreground.size == 0:
            raise InputError(
                "the volume is constant, there is no foreground to normalise; check the ROI or slice range"
            )
        lo, hi = np.percentile(foreground, percentiles)
        result = float(lo), float(hi)
    return result


def _tail_percentiles(values: np.ndarray, threshold, percentiles: tuple[float, float]) -> Optional[tuple[float, float]]:
    """The fast path of :func:`percentile_bounds` (``threshold=None``: over all voxels, for
    :func:`volume_percentile_bounds`); None when the sampled guess does not bracket the ranks."""
    q = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    step = max(1, round((values.size / 250_000) ** (1 / 3)))
    sample = values[::step, ::step, ::step]
    sample = np.sort(sample if threshold is None else sample[sample > threshold], axis=None)
    if sample.size < 1000:
        return None
    # Sample positions a generous margin (about 8 standard deviations of the estimate) beyond the wanted ranks.
    margin = 8 * np.sqrt(max(q[0], 1 - q[1], 1e-6) * sample.size) + 8
    t_lo = sample[min(sample.size - 1, int(q[0] * sample.size + margin))]
    t_hi = sample[max(0, int(q[1] * sample.size - margin))]
    if threshold is not None and not (t_lo > threshold and t_hi > threshold):
        return None
    n, low_parts, high_parts = 0, [], []
    rows = max(1, (1 << 21) // max(1, values[0].size))
    above = np.empty((rows, *values.shape[1:]), bool)
    select = np.empty_like(above)
    for s in range(0, values.shape[0], rows):
        x = values[s:s + rows]
        a, b = above[: x.shape[0]], select[: x.shape[0]]
        if threshold is None:
            a.fill(True)
        else:
            np.greater(x, threshold, out=a)
        n += int(np.count_nonzero(a))
        np.less_equal(x, t_lo, out=b)
        b &= a
        low_parts.append(x[b])
        np.greater_equal(x, t_hi, out=b)  # t_hi > threshold, so these are foreground
        if threshold is None:
            b &= a
        high_parts.append(x[b])
    low_tail, high_tail = np.concatenate(low_parts), np.concatenate(high_parts)
    virtual = (n - 1) * q
    first = np.minimum(np.floor(virtual).astype(np.int64), n - 1)
    second = np.minimum(first + 1, n - 1)
    offset = n - high_tail.size  # rank of the high tail's smallest element within the foreground
    if low_tail.size <= second[0] or first[1] < offset:
        return None
    pairs = [
        np.partition(low_tail, [first[0], second[0]])[[first[0], second[0]]],
        np.partition(high_tail, [first[1] - offset, second[1] - offset])[[first[1] - offset, second[1] - offset]],
    ]
    out = []
    for (a, b), g in zip(pairs, virtual - first):
        diff = b - a  # in the data's dtype, as numpy's own interpolation does
        out.append(float(a + diff * g) if g < 0.5 else float(b - diff * (1 - g)))
    return out[0], out[1]


def _same_dtype_threshold(dtype: np.dtype, value: float):
    """A scalar ``t`` of ``dtype`` with ``x > value  <=>  x > t`` for every ``x`` of that dtype.

    Comparing an int16 volume with a Python float makes numpy convert every voxel to float64, several times slower
    than comparing with an int16.
    """
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return dtype.type(min(max(math.floor(value), info.min), info.max))
    if dtype.kind == "f" and dtype.itemsize < 8:
        t = dtype.type(value)
        if float(t) > value:  # rounded up: step back to the largest representable value below
            t = np.nextafter(t, dtype.type(-np.inf))
        return t
    return value


def intensity_mapping(
    spec: IntensitySpec, data_min: float, data_max: float, values: Optional[np.ndarray] = None
) -> IntensityMapping:
    """Choose ``low``/``high`` for ``spec`` from the data's extremes (and, for percentiles, the data themselves).

    ``low``/``high`` are the extremes of the *clipped* data, which is what the official min-max after clipping uses.
    """
    if spec.scheme == "window":
        wlo, whi = spec.center - spec.width / 2.0, spec.center + spec.width / 2.0
        low, high = max(data_min, wlo), min(data_max, whi)
        if not high > low:
            raise InputError(
                f"the window {spec.name} [{wlo:g}, {whi:g}] does not overlap the volume's values "
                f"[{data_min:g}, {data_max:g}], so the model would see a constant image; pick another window "
                f"(presets: {', '.join(WINDOW_PRESETS)}) or window=None for automatic percentiles"
            )
        return IntensityMapping("window", spec.name, low, high, center=spec.center, width=spec.width)
    if spec.scheme == "minmax":
        if not data_max > data_min:
            raise _constant_error(data_min)
        return IntensityMapping("minmax", "minmax", data_min, data_max)
    if spec.scheme == "percentile":
        if not data_max > data_min:
            raise _constant_error(data_min)
        if values is None:
            raise ValueError("percentile scheme needs the voxel values")
        low, high = percentile_bounds(values)
        if not high > low:
            raise InputError(
                f"the foreground of the volume is (almost) constant ({low:g}); percentile normalisation is "
                f"undefined -- if this is a label map or mask, select the image volume instead; otherwise pass an "
                f"explicit window, e.g. window=(center, width), or window='minmax'"
            )
        return IntensityMapping("percentile", "percentile", low, high, percentiles=SEG_PERCENTILES)
    if spec.scheme == "volume-percentile":
        if not data_max > data_min:
            raise _constant_error(data_min)
        if values is None:
            raise ValueError("volume-percentile scheme needs the voxel values")
        low, high = volume_percentile_bounds(values)
        if not high > low:
            raise InputError(
                f"99 % of the volume has one value ({low:g}), so the M3D-RefSeg percentile window is empty; crop to "
                f"the body with an ROI or pass an explicit window, e.g. window=(center, width), or window='minmax'"
            )
        return IntensityMapping("volume-percentile", spec.name, low, high, percentiles=REFSEG_PERCENTILES)
    raise ValueError(f"unknown scheme {spec.scheme}")


# ----------------------------------------------------------------------------------------------------------------------
# Per-task defaults
# ----------------------------------------------------------------------------------------------------------------------

DISPLAY_WINDOW = "display"
"""Window kind of report / VQA (M3D-Cap, M3D-VQA: Radiopaedia JPEGs in the uploader's display window)."""
SEG_PERCENTILES_WINDOW = "percentile"
"""Window kind of boxes and semantic segmentation (M3D-Seg: foreground 0.05 / 99.95 percentiles)."""
VOLUME_PERCENTILES_WINDOW = "volume-percentile"
"""Window kind of referring-expression segmentation (M3D-RefSeg: whole-volume 0.5 / 99.5 percentiles)."""
WINDOW_KINDS = (DISPLAY_WINDOW, SEG_PERCENTILES_WINDOW, VOLUME_PERCENTILES_WINDOW)
"""What a task's training data looked like (each task's kind is in the task registry, ``Task.window``; evidence:
docs/conventions.md)."""


def is_ct(modality: Optional[str], value_min: Optional[float]) -> bool:
    """CT by the DICOM Modality when known, else by values (air at or below :data:`CT_AIR_THRESHOLD`)."""
    if modality:
        return modality.strip().upper() == "CT"
    return value_min is not None and value_min <= CT_AIR_THRESHOLD


def default_window(
    kind: str,
    *,
    display_window: Optional[DisplayWindow] = None,
    modality: Optional[str] = None,
    value_range: Optional[tuple[float, float]] = None,
) -> IntensitySpec:
    """The intensity scheme a task of window ``kind`` (:data:`WINDOW_KINDS`; the task registry's ``Task.window``)
    gets when the user chose none: the one of its training data.

    :data:`DISPLAY_WINDOW` (report / VQA): ``display_window`` (Slicer's window/level of the volume, or the DICOM
    WindowCenter/WindowWidth that :func:`M3DAssistantLib.volume_io.read_volume_metadata` reads), else for CT
    (``modality``, or the values in ``value_range``) the abdomen preset (soft tissue), else -- MR and the like,
    which have no standard window -- the M3D-Seg percentiles. A display window that misses ``value_range`` entirely
    is skipped the same way.
    :data:`SEG_PERCENTILES_WINDOW` (boxes and segmentation): the M3D-Seg percentiles;
    :data:`VOLUME_PERCENTILES_WINDOW` (referring segmentation): the M3D-RefSeg percentiles.
    The returned spec's ``name`` says which it is (``display (DICOM)``, ``abdomen``, ``percentile``...), and is
    recorded in every result's provenance.
    """
    if kind not in WINDOW_KINDS:
        raise ValueError(f"unknown window kind {kind!r}; one of {', '.join(WINDOW_KINDS)}")
    if kind == VOLUME_PERCENTILES_WINDOW:
        return IntensitySpec("volume-percentile", "volume-percentile")
    if kind == DISPLAY_WINDOW:
        if display_window is not None and _overlaps(display_window.spec, value_range):
            return display_window.spec
        if is_ct(modality, None if value_range is None else value_range[0]):
            spec = resolve_window("abdomen")
            if _overlaps(spec, value_range):
                return spec
    return IntensitySpec("percentile", "percentile")


def _overlaps(spec: IntensitySpec, value_range: Optional[tuple[float, float]]) -> bool:
    if value_range is None:
        return True
    lo, hi = spec.center - spec.width / 2.0, spec.center + spec.width / 2.0
    return min(hi, value_range[1]) > max(lo, value_range[0])


def _constant_error(value: float) -> InputError:
    return InputError(
        f"the volume (or the selected ROI / slice range) is constant: every voxel is {value:g}; there is nothing "
        f"for the model to see -- check that the right volume, ROI and slice range are selected"
    )
