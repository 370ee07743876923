"""Read a volume file (NIfTI, NRRD, MetaImage, ...) or a DICOM series folder into what Slicer would hold.

:func:`read_volume` returns ``(array_kji, ijk_to_ras)``: the voxels in (K, J, I) order, as
``slicer.util.arrayFromVolume`` gives them, and the 4x4 IJK->RAS matrix. ITK (and so SimpleITK) works in LPS; the
matrix here is RAS like Slicer's. Positions agree with Slicer voxel for voxel. The array can still differ from
Slicer's by an axis flip for some NIfTI headers (qform_code 0 with qfac -1): Slicer then flips K and its matrix,
keeping every voxel's RAS position. Always go through the matrix, never through raw indices.

:func:`read_volume_metadata` reads what the headers say about how the volume is meant to be seen: the DICOM
Modality and WindowCenter/WindowWidth (the display window report and VQA default to, see
:func:`M3DAssistantLib.preprocessing.default_window`).

Used by the CLI and the worker when they get a path instead of a Slicer node. Needs SimpleITK (imported lazily).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import InputError, LabelMapError
from .preprocessing import DisplayWindow

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Flip of the first two axes; its own inverse, so it also maps RAS to LPS."""

SLICE_SPACING_TOLERANCE = 0.01
"""Largest relative deviation from the mean slice spacing of a DICOM series before it counts as uneven."""


def lps_to_ras_matrix(ijk_to_lps: np.ndarray) -> np.ndarray:
    """IJK->LPS (ITK) -> IJK->RAS (Slicer)."""
    return LPS_TO_RAS @ ijk_to_lps


def ras_to_lps_matrix(ijk_to_ras: np.ndarray) -> np.ndarray:
    """IJK->RAS (Slicer) -> IJK->LPS (ITK): the inverse of :func:`lps_to_ras_matrix`."""
    return LPS_TO_RAS @ ijk_to_ras


def available_memory_bytes() -> Optional[int]:
    """Physical memory currently available, or None where the platform does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(n_bytes: int, path: Path) -> None:
    available = available_memory_bytes()
    if available is not None and n_bytes > available:
        raise InputError(
            f"{path} needs {n_bytes / 2**30:.2f} GiB of memory but only {available / 2**30:.2f} GiB is available; "
            f"close other programs, crop or downsample the volume first (e.g. Slicer's Crop Volume module)"
        )


def read_volume(path: Union[str, os.PathLike], *, series_uid: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Volume file or DICOM folder -> ``(array_kji, ijk_to_ras)``.

    ``series_uid`` picks one series when a DICOM folder holds several. Raises :class:`InputError` for a missing or
    unreadable path, 2D images, single slices, 4D / vector / complex volumes, unevenly spaced or tilted DICOM series,
    and volumes larger than the available memory.
    """
    try:
        import SimpleITK  # noqa: F401  (fail here, with the fix, rather than deep inside a reader)
    except ImportError:
        raise InputError(
            "reading volume files needs SimpleITK: pip install SimpleITK (or pip install -e '.[inference]' in the "
            "clone)"
        ) from None
    _quiet_itk()
    p = Path(path)
    if not p.exists():
        raise InputError(f"no volume at {p}: the file or folder does not exist; check the path")
    image = _read_dicom_folder(p, series_uid) if p.is_dir() else _read_file(p)
    return _image_to_slicer(image)


LABEL_MAP_MAX_LABELS = 256
"""More distinct values than this and an integer volume is an image, not a label map."""
LABEL_MAP_MIN_EQUAL_NEIGHBOURS = 0.6
"""A label map is piecewise constant: inside its labelled region, at least this fraction of neighbouring voxels
(along I) hold the same value (TotalSegmentator's 3 mm sample: 0.83). Images, even 8-bit ones, are far below (noise
and gradients)."""


def label_map_description(array_kji: np.ndarray) -> Optional[str]:
    """Why this integer volume looks like a label map or mask ("4 distinct values 0..3, ..."), or None for an image.

    A label map here: integer voxels in 0..255 with at most :data:`LABEL_MAP_MAX_LABELS` distinct values, piecewise
    constant (:data:`LABEL_MAP_MIN_EQUAL_NEIGHBOURS`). A CT in HU has negative values and thousands of levels; an 8-bit
    MR or a JPEG-derived stack is not piecewise constant. Reads a strided sample, so it is cheap on large volumes.
    """
    a = np.asarray(array_kji)
    if a.dtype.kind == "b":
        return "a binary mask (boolean voxels)"
    if a.dtype.kind not in "iu" or a.ndim != 3 or a.size == 0:
        return None
    step = max(1, round((a.size / 4e6) ** (1 / 3)))  # about 4 million voxels at most
    sample = a[::step, ::step, :]  # keep I whole: neighbours along I are compared
    low, high = int(sample.min()), int(sample.max())
    if low < 0 or high > 255 or high == low:
        return None
    values = np.flatnonzero(np.bincount(sample.ravel().astype(np.int64), minlength=high + 1))
    if len(values) > LABEL_MAP_MAX_LABELS:
        return None
    inside = (sample[..., 1:] != low) | (sample[..., :-1] != low)  # pairs touching the labelled region
    pairs = int(inside.sum())
    if pairs == 0:
        return None
    equal = float(((sample[..., 1:] == sample[..., :-1]) & inside).sum()) / pairs
    if equal < LABEL_MAP_MIN_EQUAL_NEIGHBOURS:
        return None
    shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    return f"{len(values)} distinct integer values ({shown}) in large constant regions"


def _image_siblings(path: Path) -> list[Path]:
    """Volume files or DICOM folders near ``path`` that may be the image it labels (same folder and the folder above,
    names without seg/label/mask first)."""
    suffixes = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
    found = []
    for folder in (path.parent, path.parent.parent):
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            name = entry.name.lower()
            if entry == path or any(w in name for w in ("seg", "label", "mask")):
                continue
            if (entry.is_file() and name.endswith(suffixes)) or (entry.is_dir() and name.endswith("dicom")):
                found.append(entry)
    return found[:3]


def check_not_label_map(array_kji: np.ndarray, path: Union[str, os.PathLike]) -> None:
    """InputError when the volume read from ``path`` is a label map (e.g. TotalSegmentator's
    ``segmentation.nii.gz``), naming the image next to it when there is one."""
    why = label_map_description(array_kji)
    if why is None:
        return
    p = Path(path)
    siblings = _image_siblings(p)
    hint = f"; the image next to it may be {' or '.join(str(s) for s in siblings)}" if siblings else ""
    raise LabelMapError(f"{p} is a label map or mask ({why}), not an image; M3D needs the CT or MR itself -- give the "
                     f"image volume{hint}")


@dataclasses.dataclass(frozen=True)
class VolumeMetadata:
    """What a volume's headers say about viewing it. Everything is None where the format does not say (NIfTI, NRRD,
    MetaImage carry neither a modality nor a display window)."""

    modality: Optional[str] = None  # DICOM (0008,0060), e.g. "CT", "MR"
    display_window: Optional[DisplayWindow] = None  # DICOM WindowCenter/WindowWidth, the first pair if several


def read_volume_metadata(path: Union[str, os.PathLike], *, series_uid: Optional[str] = None) -> VolumeMetadata:
    """Modality and display window from the headers of a DICOM series folder or file (headers only, no voxels).

    A multi-valued WindowCenter/WindowWidth (several windows offered by the scanner) gives its first pair, the one
    viewers show first. The values are in the rescaled units :func:`read_volume` returns (HU for CT), as DICOM
    defines them. Volume files other than DICOM give an empty record; an unreadable or absent path is an InputError
    as in :func:`read_volume`.
    """
    sitk = _quiet_itk()
    p = Path(path)
    if not p.exists():
        raise InputError(f"no volume at {p}: the file or folder does not exist; check the path")
    if p.is_dir():
        first = _series_files(p, series_uid)[0]
    elif p.suffix.lower() in (".dcm", ".ima", "") or _is_dicom_file(p):
        first = str(p)
    else:
        return VolumeMetadata()
    reader = sitk.ImageFileReader()
    reader.SetFileName(first)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return VolumeMetadata()

    def tag(key: str) -> Optional[str]:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else None

    modality = tag("0008|0060") or None
    window = None
    center, width = _first_value(tag("0028|1050")), _first_value(tag("0028|1051"))
    if center is not None and width is not None and width > 0:
        window = DisplayWindow(center, width, "DICOM")
    elif center is not None or width is not None:
        log.warning("%s: DICOM window center %s / width %s is incomplete or invalid; not used", first, center, width)
    return VolumeMetadata(modality=modality, display_window=window)


def _first_value(text: Optional[str]) -> Optional[float]:
    """The first of a DICOM multi-value ("40\\300"), as a float; None if absent or not a number."""
    if not text:
        return None
    try:
        value = float(text.split("\\")[0])
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _image_to_slicer(image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image (3D scalar) -> (KJI array, IJK->RAS)."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)  # numpy order (z, y, x) = (K, J, I)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return array, lps_to_ras_matrix(ijk_to_lps)


def _read_file(p: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(
            f"cannot read {p} as a volume: not a readable NIfTI/NRRD/MetaImage/DICOM file or corrupt "
            f"(ITK: {_first_line(exc)}); check the file, or give the folder for a DICOM series"
        ) from None
    size = list(reader.GetSize())
    dim = reader.GetDimension()
    comps = reader.GetNumberOfComponents()
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if "complex" in pixel:
        raise InputError(f"{p} holds complex voxels ({pixel}); save the magnitude image as a scalar volume first")
    if comps > 1:
        raise InputError(
            f"{p} is a vector/multi-component volume ({comps} components per voxel, e.g. RGB or a displacement "
            f"field); M3D needs a scalar volume -- extract one component first"
        )
    if dim == 4 and size[3] == 1:
        pass  # a 3D volume stored with a singleton time axis: read it as 3D below
    elif dim == 4:
        raise InputError(
            f"{p} is a 4D volume ({size[3]} time points / volumes of {size[:3]}); M3D needs one 3D volume -- "
            f"extract one time point first"
        )
    elif dim < 3:
        raise InputError(f"{p} is a 2D image ({size}); M3D needs a 3D volume with several slices")
    elif dim > 4:
        raise InputError(f"{p} has {dim} dimensions; M3D needs a 3D scalar volume")
    if size[2] < 2:
        raise InputError(f"{p} has a single slice ({size[:3]}); M3D needs a 3D volume -- load the whole series")
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1, 1], reader.GetPixelID())).dtype.itemsize
    _check_memory(int(np.prod(size[:3])) * itemsize * 2, p)  # ITK's buffer plus the numpy copy
    try:
        image = reader.Execute()
    except MemoryError:
        raise InputError(f"not enough memory to read {p} ({size[:3]} voxels); crop or downsample it first") from None
    except RuntimeError as exc:
        raise InputError(
            f"cannot read the voxels of {p} (ITK: {_first_line(exc)}); the file is probably truncated"
        ) from None
    if dim == 4:
        image = image[:, :, :, 0]
    return image


def _read_dicom_folder(folder: Path, series_uid: Optional[str]):
    import SimpleITK as sitk

    files = _series_files(folder, series_uid)
    if len(files) == 1:
        return _read_file(Path(files[0]))  # a multi-frame (enhanced) DICOM, or a single slice (rejected there)
    head = sitk.ImageFileReader()
    head.SetFileName(files[0])
    try:
        head.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM file {files[0]} (ITK: {_first_line(exc)})") from None
    if head.GetNumberOfComponents() > 1:
        raise InputError(f"the DICOM series in {folder} is colour/multi-component; M3D needs a greyscale CT or MR")
    cols, rows = head.GetSize()[:2]
    _check_memory(cols * rows * len(files) * 4 * 2, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except MemoryError:
        raise InputError(f"not enough memory to read the DICOM series in {folder}") from None
    except RuntimeError as exc:
        raise InputError(
            f"cannot read the DICOM series in {folder} (ITK: {_first_line(exc)}); the pixel data may use a "
            f"compression this SimpleITK build cannot decode -- convert the series to NIfTI or NRRD first"
        ) from None
    _check_slice_positions(reader, len(files), folder)
    return image


def dicom_series_files(path: Union[str, os.PathLike], *, series_uid: Optional[str] = None) -> Optional[list[Path]]:
    """The files of the DICOM series :func:`read_volume` reads from ``path``, in the order of its K axis (slice k of
    the array is file k); None when ``path`` is not DICOM (a NIfTI, NRRD or MetaImage file). Headers only."""
    _quiet_itk()
    p = Path(path)
    if p.is_dir():
        return [Path(f) for f in _series_files(p, series_uid)]
    if p.is_file() and (p.suffix.lower() in (".dcm", ".ima") or _is_dicom_file(p)):
        return [p]
    return None


def _series_files(folder: Path, series_uid: Optional[str]) -> list[str]:
    """The files of the one series in ``folder`` (or of ``series_uid``), sorted along the slice normal."""
    import SimpleITK as sitk

    try:
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise InputError(f"cannot scan {folder} for DICOM files (ITK: {_first_line(exc)})") from None
    if not ids:
        raise InputError(
            f"no DICOM series found in {folder}; give the folder that holds the slice files, or a volume file "
            f"(NIfTI, NRRD)"
        )
    if series_uid is not None:
        if series_uid not in ids:
            raise InputError(f"series {series_uid!r} is not in {folder}; it holds: {', '.join(map(repr, ids))}")
        uid = series_uid
    elif len(ids) > 1:
        counts = [f"{u!r} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), u))} files)" for u in ids]
        raise InputError(
            f"{folder} holds {len(ids)} DICOM series: {', '.join(counts)}; pass series_uid=... to pick one"
        )
    else:
        uid = ids[0]
    # GDCM sorts the files along the slice normal by ImagePositionPatient; this works even when, as in some
    # anonymised data, the series UIDs are empty.
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))


def _check_slice_positions(reader, n: int, folder: Path) -> None:
    """Refuse series whose slices are not an even stack along the slice normal (missing slices, gantry tilt, mixed
    series): the single-spacing volume ITK builds from them would put voxels at the wrong positions."""
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
        iop = np.array([float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")])
    except (RuntimeError, ValueError):
        log.warning("DICOM series in %s lacks ImagePositionPatient/ImageOrientationPatient; spacing unchecked", folder)
        return
    normal = np.cross(iop[:3], iop[3:])
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    if np.any(np.abs(along) < 1e-6):
        raise InputError(
            f"the DICOM series in {folder} has several slices at the same position (mixed series, phases or "
            f"duplicates); separate the series, e.g. by acquisition, before loading"
        )
    lateral = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    if np.any(lateral > 1e-3 * np.maximum(1.0, np.abs(along))):
        raise InputError(
            f"the DICOM series in {folder} is acquired with a tilted gantry (slices are offset sideways by up to "
            f"{lateral.max():.3g} mm per slice); load it in Slicer and harden the gantry-tilt correction, then save "
            f"it as NRRD"
        )
    mean = along.mean()
    if np.any(np.abs(along - mean) > SLICE_SPACING_TOLERANCE * abs(mean)):
        raise InputError(
            f"the DICOM series in {folder} has uneven slice spacing (from {np.abs(along).min():.3g} to "
            f"{np.abs(along).max():.3g} mm; missing slices?); load it in Slicer (which resamples such series) or "
            f"check that all files are present"
        )


def _quiet_itk():
    """SimpleITK with ITK's own warnings off: they go straight to stderr as raw "WARNING: In .../itk...cxx" lines,
    and every case they describe (missing slices, no series) is reported by our own messages. Returns the module."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("sitk::ERROR", "Exception thrown", "/"))]
    return (useful or lines or [type(exc).__name__])[-1][:300]
