"""Which file a task result becomes: the table from file extension to writer, and :func:`write_result`.

The extension picks the format and the format says what part of a result it holds: the mask (a segmentation), the
box (an ROI), the answer text, or the whole result record (what ``--json`` prints). An extension that is not in
:data:`FORMATS`, or whose format cannot hold this result, is refused before anything is written, naming the
extensions that would work. A new format is one module with its writer plus one :class:`ResultFormat` entry here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .. import AI_LABEL
from ..errors import InputError
from ..results import BoxResult, SegmentationResult
from .atomic import PathLike, check_output_path
from .markups import write_roi
from .seg_nrrd import write_segmentation_nrrd
from .text import write_json, write_text

MASK, BOX, TEXT, RECORD = "mask", "box", "text", "record"
"""The parts of a result a file can hold."""


@dataclasses.dataclass(frozen=True)
class VolumeSource:
    """What a writer may need to know about the volume a result was computed on: its IJK->RAS matrix (masks on its
    grid) and, for DICOM outputs, the file or DICOM folder it was read from."""

    ijk_to_ras: Optional[np.ndarray] = None
    path: Optional[Path] = None

    def dicom_files(self) -> list[Path]:
        """The source series' files in K order; InputError when the volume did not come from DICOM."""
        from ..volume_io import dicom_series_files

        files = dicom_series_files(self.path) if self.path is not None else None
        if not files:
            raise InputError(f"a DICOM output needs a DICOM input (a series folder); {self.path or 'this volume'} "
                             f"is not DICOM -- write the mask as .nii.gz or .seg.nrrd instead")
        return files


ResultWriter = Callable[[Path, Any, VolumeSource, bool], Path]
"""``writer(path, result, source, overwrite) -> path written``."""


@dataclasses.dataclass(frozen=True)
class ResultFormat:
    """One file format a task result can be written as."""

    extension: str  # lower case, with the dot; compound extensions (".seg.nrrd") win over their tail (".nrrd")
    description: str  # for messages: "Slicer segmentation"
    holds: str  # MASK, BOX, TEXT or RECORD
    write: ResultWriter
    needs_dicom: bool = False  # only for volumes read from a DICOM series (it references the source instances)


def _matrix(path: Path, source: VolumeSource) -> np.ndarray:
    if source.ijk_to_ras is None:
        raise InputError(f"writing the mask to {path} needs the volume's IJK-to-RAS matrix; pass ijk_to_ras")
    return source.ijk_to_ras


def _write_mask(path: Path, result: SegmentationResult, source: VolumeSource, overwrite: bool) -> Path:
    return write_segmentation_nrrd(path, {result.target: result.mask}, _matrix(path, source),
                                   attributes=result.provenance.as_node_attributes(), overwrite=overwrite)


def _write_nifti(path: Path, result: SegmentationResult, source: VolumeSource, overwrite: bool) -> Path:
    from .nifti import write_label_map_nifti

    return write_label_map_nifti(path, result.mask, _matrix(path, source), label=result.target,
                                 attributes=result.provenance.as_node_attributes(), overwrite=overwrite)


def _write_dicom_seg(path: Path, result: SegmentationResult, source: VolumeSource, overwrite: bool) -> Path:
    from .dicom_seg import write_dicom_seg

    return write_dicom_seg(path, result.mask, source.dicom_files(), label=result.target,
                           model=result.provenance.model, model_revision=result.provenance.model_revision,
                           overwrite=overwrite)


def _write_box_sr(path: Path, result: BoxResult, source: VolumeSource, overwrite: bool) -> Path:
    from .dicom_sr import write_box_dicom_sr

    return write_box_dicom_sr(path, result.roi, source.dicom_files(), label=result.target,
                              model=result.provenance.model, model_revision=result.provenance.model_revision,
                              overwrite=overwrite)


def _write_box(path: Path, result: BoxResult, source: VolumeSource, overwrite: bool) -> Path:
    return write_roi(path, result.roi, result.target, attributes=result.provenance.as_node_attributes(),
                     overwrite=overwrite)


def _write_record(path: Path, result: Any, source: VolumeSource, overwrite: bool) -> Path:
    return write_json(path, result.to_dict(), overwrite=overwrite)


def _write_answer_text(path: Path, result: Any, source: VolumeSource, overwrite: bool) -> Path:
    return write_text(path, f"{result.text}\n\n[{AI_LABEL}]\n", overwrite=overwrite)


FORMATS: dict[str, ResultFormat] = {f.extension: f for f in (
    ResultFormat(".seg.nrrd", "Slicer segmentation", MASK, _write_mask),
    ResultFormat(".nrrd", "Slicer segmentation", MASK, _write_mask),
    ResultFormat(".nii.gz", "NIfTI label map", MASK, _write_nifti),
    ResultFormat(".nii", "NIfTI label map", MASK, _write_nifti),
    ResultFormat(".dcm", "DICOM SEG, for DICOM input", MASK, _write_dicom_seg, needs_dicom=True),
    ResultFormat(".mrk.json", "Slicer markups ROI", BOX, _write_box),
    ResultFormat(".sr.dcm", "DICOM SR measurement report, for DICOM input", BOX, _write_box_sr, needs_dicom=True),
    ResultFormat(".json", "result record with provenance", RECORD, _write_record),
    ResultFormat(".txt", "answer text", TEXT, _write_answer_text),
)}
"""Extension -> format. Add a format here (its writer in its own module)."""


def result_parts(result: Any) -> set[str]:
    """What of ``result`` a file can hold: its mask or box (by result type), its answer text, its record."""
    parts = {RECORD}
    if isinstance(getattr(result, "text", None), str):
        parts.add(TEXT)
    if isinstance(result, SegmentationResult):
        parts.add(MASK)
    if isinstance(result, BoxResult):
        parts.add(BOX)
    return parts


def parts_of_kind(kind: Any) -> set[str]:
    """What a file can hold of a result of this :class:`~M3DAssistantLib.tasks.ResultKind` (before it exists)."""
    value = getattr(kind, "value", kind)
    return {RECORD, TEXT} | ({MASK} if value == "segmentation" else {BOX} if value == "box" else set())


def _accepted(parts: Optional[set[str]] = None) -> str:
    return ", ".join(f"{ext} ({f.description})" for ext, f in FORMATS.items() if parts is None or f.holds in parts)


def format_for(path: PathLike, result: Any = None, *, kind: Any = None) -> ResultFormat:
    """The format of ``path`` by its extension (case-insensitive); with ``result`` (or the result ``kind`` of a task
    that has not run yet), also that it can hold it.

    :raises InputError: naming the accepted extensions (for ``result``'s kind when given).
    """
    name = Path(path).name.lower()
    matches = [f for ext, f in FORMATS.items() if name.endswith(ext) and len(name) > len(ext)]
    parts = result_parts(result) if result is not None else parts_of_kind(kind) if kind is not None else None
    if not matches:
        raise InputError(f"cannot write {path}: unknown file extension; use {_accepted(parts)}")
    chosen = max(matches, key=lambda f: len(f.extension))
    if parts is not None and chosen.holds not in parts:
        what = getattr(getattr(result, "provenance", None), "task", None) or (
            getattr(kind, "value", kind) if kind is not None else type(result).__name__)
        raise InputError(f"cannot write {path}: a {chosen.extension} file holds a {chosen.holds}, which a {what} "
                         f"result does not have; use {_accepted(parts)}")
    return chosen


def check_output(path: PathLike, kind: Any, *, overwrite: bool = False, source_path: Optional[PathLike] = None,
                 overwrite_hint: str = "pass overwrite=True") -> ResultFormat:
    """Everything about writing a ``kind`` result to ``path`` that can be known before the model runs: a known
    extension that can hold it, a DICOM source with its UIDs for DICOM outputs, and a writable target
    (:func:`~.atomic.check_output_path`: folder exists and is writable, no dangling link, no existing file unless
    ``overwrite``). Cheap; the CLI calls it before loading the model."""
    fmt = format_for(path, kind=kind)
    if fmt.needs_dicom:
        from .dicom_seg import read_dicom_sources

        read_dicom_sources(VolumeSource(path=Path(source_path) if source_path else None).dicom_files())
    check_output_path(path, overwrite=overwrite, overwrite_hint=overwrite_hint)
    return fmt


def write_result(path: PathLike, result: Any, ijk_to_ras: Optional[np.ndarray] = None, *,
                 overwrite: bool = False, source_path: Optional[PathLike] = None) -> Optional[Path]:
    """Write ``result`` to ``path`` in the format its extension names (see :data:`FORMATS`).

    :param ijk_to_ras: the volume's 4x4 IJK->RAS matrix (needed for masks).
    :param source_path: the volume file or DICOM folder the result was computed on (needed for DICOM outputs).
    :param overwrite: replace an existing file (else :class:`InputError`, the file unchanged).
    :return: the path written, or None when the result has no mask / box to write (the target is absent or the
        answer could not be parsed: ``result.absent`` / ``result.parse_error`` say which).
    :raises InputError: unknown extension, or a format that cannot hold this result.
    """
    fmt = format_for(path, result)
    if fmt.holds == MASK and result.mask is None or fmt.holds == BOX and result.roi is None:
        return None
    source = VolumeSource(None if ijk_to_ras is None else np.asarray(ijk_to_ras, dtype=np.float64),
                          Path(source_path) if source_path is not None else None)
    return fmt.write(Path(path), result, source, overwrite)


__all__ = ["BOX", "FORMATS", "MASK", "RECORD", "TEXT", "ResultFormat", "VolumeSource", "check_output", "format_for",
           "parts_of_kind", "result_parts", "write_result"]
