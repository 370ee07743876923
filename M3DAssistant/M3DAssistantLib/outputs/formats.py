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
from .atomic import PathLike
from .markups import write_roi
from .seg_nrrd import write_segmentation_nrrd
from .text import write_json, write_text

MASK, BOX, TEXT, RECORD = "mask", "box", "text", "record"
"""The parts of a result a file can hold."""

ResultWriter = Callable[[Path, Any, Optional[np.ndarray], bool], Path]
"""``writer(path, result, ijk_to_ras, overwrite) -> path written``."""


@dataclasses.dataclass(frozen=True)
class ResultFormat:
    """One file format a task result can be written as."""

    extension: str  # lower case, with the dot; compound extensions (".seg.nrrd") win over their tail (".nrrd")
    description: str  # for messages: "Slicer segmentation"
    holds: str  # MASK, BOX, TEXT or RECORD
    write: ResultWriter


def _write_mask(path: Path, result: SegmentationResult, ijk_to_ras: Optional[np.ndarray], overwrite: bool) -> Path:
    if ijk_to_ras is None:
        raise InputError(f"writing the mask to {path} needs the volume's IJK-to-RAS matrix; pass ijk_to_ras")
    return write_segmentation_nrrd(path, {result.target: result.mask}, ijk_to_ras,
                                   attributes=result.provenance.as_node_attributes(), overwrite=overwrite)


def _write_box(path: Path, result: BoxResult, ijk_to_ras: Optional[np.ndarray], overwrite: bool) -> Path:
    return write_roi(path, result.roi, result.target, attributes=result.provenance.as_node_attributes(),
                     overwrite=overwrite)


def _write_record(path: Path, result: Any, ijk_to_ras: Optional[np.ndarray], overwrite: bool) -> Path:
    return write_json(path, result.to_dict(), overwrite=overwrite)


def _write_answer_text(path: Path, result: Any, ijk_to_ras: Optional[np.ndarray], overwrite: bool) -> Path:
    return write_text(path, f"{result.text}\n\n[{AI_LABEL}]\n", overwrite=overwrite)


FORMATS: dict[str, ResultFormat] = {f.extension: f for f in (
    ResultFormat(".seg.nrrd", "Slicer segmentation", MASK, _write_mask),
    ResultFormat(".nrrd", "Slicer segmentation", MASK, _write_mask),
    ResultFormat(".mrk.json", "Slicer markups ROI", BOX, _write_box),
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


def _accepted(parts: Optional[set[str]] = None) -> str:
    return ", ".join(f"{ext} ({f.description})" for ext, f in FORMATS.items() if parts is None or f.holds in parts)


def format_for(path: PathLike, result: Any = None) -> ResultFormat:
    """The format of ``path`` by its extension (case-insensitive); with ``result``, also that it can hold it.

    :raises InputError: naming the accepted extensions (for ``result``'s kind when given).
    """
    name = Path(path).name.lower()
    matches = [f for ext, f in FORMATS.items() if name.endswith(ext) and len(name) > len(ext)]
    parts = None if result is None else result_parts(result)
    if not matches:
        raise InputError(f"cannot write {path}: unknown file extension; use {_accepted(parts)}")
    chosen = max(matches, key=lambda f: len(f.extension))
    if parts is not None and chosen.holds not in parts:
        kind = getattr(getattr(result, "provenance", None), "task", None) or type(result).__name__
        raise InputError(f"cannot write {path}: a {chosen.extension} file holds a {chosen.holds}, which a {kind} "
                         f"result does not have; use {_accepted(parts)}")
    return chosen


def write_result(path: PathLike, result: Any, ijk_to_ras: Optional[np.ndarray] = None, *,
                 overwrite: bool = False) -> Optional[Path]:
    """Write ``result`` to ``path`` in the format its extension names (see :data:`FORMATS`).

    :param ijk_to_ras: the volume's 4x4 IJK->RAS matrix (needed for masks).
    :param overwrite: replace an existing file (else :class:`InputError`, the file unchanged).
    :return: the path written, or None when the result has no mask / box to write (the target is absent or the
        answer could not be parsed: ``result.absent`` / ``result.parse_error`` say which).
    :raises InputError: unknown extension, or a format that cannot hold this result.
    """
    fmt = format_for(path, result)
    if fmt.holds == MASK and result.mask is None or fmt.holds == BOX and result.roi is None:
        return None
    return fmt.write(Path(path), result, ijk_to_ras, overwrite)


__all__ = ["BOX", "FORMATS", "MASK", "RECORD", "TEXT", "ResultFormat", "format_for", "result_parts", "write_result"]
