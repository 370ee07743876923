"""Results as files Slicer opens natively, written atomically and never over a file by accident.

One module per job:

- :mod:`.atomic`: the one way a file is written (temporary file, fsync, then its name; never over an existing file
  unless asked; nothing left behind on failure) and :func:`unique_path` for a fresh name.
- :mod:`.seg_nrrd`: masks -> ``.seg.nrrd`` as Slicer writes it; :mod:`.nifti`: masks -> NIfTI label maps on the
  CT's grid; :mod:`.dicom_seg`: masks -> DICOM SEG for DICOM input (highdicom); :mod:`.dicom_sr`: boxes -> DICOM SR
  (TID 1500, a 3D region) for DICOM input; :mod:`.markups`: ROIs <-> ``.mrk.json``; :mod:`.scalar_volume`: float
  maps on a volume's grid (evidence maps) -> ``.nrrd`` / ``.nii.gz``; :mod:`.text`: answer text and JSON records;
  :mod:`.colors`: segment colours.
- :mod:`.formats`: the table from file extension to writer and :func:`write_result`, the one "write this task result
  to this path" used by the command line.

A new format is one module with its writer (built on :func:`atomic_write_bytes`) plus one entry in :data:`FORMATS`.

Standard library and numpy only at import (nibabel, highdicom and pydicom are imported by their writers when a file
is written): Slicer's own process imports this.
"""

from ..errors import OutputWriteError
from .atomic import atomic_write_bytes, check_output_path, ordinary_permissions, unique_path
from .colors import ANATOMY_COLORS, FALLBACK_PALETTE, anatomy_color, default_colors, parse_color
from .formats import FORMATS, ResultFormat, VolumeSource, check_output, format_for, write_result
from .markups import MARKUPS_SCHEMA, read_roi, roi_markups_dict, write_roi, write_roi_markups_json
from .scalar_volume import check_scalar_volume_path, write_scalar_volume
from .seg_nrrd import write_segmentation_nrrd
from .text import write_json, write_text

__all__ = [
    "ANATOMY_COLORS", "FALLBACK_PALETTE", "FORMATS", "MARKUPS_SCHEMA", "OutputWriteError", "ResultFormat",
    "VolumeSource", "anatomy_color", "atomic_write_bytes", "check_output", "check_output_path", "default_colors",
    "format_for", "ordinary_permissions", "parse_color",
    "read_roi", "roi_markups_dict", "unique_path", "write_json", "write_result", "write_roi", "write_roi_markups_json",
    "write_segmentation_nrrd", "write_text", "check_scalar_volume_path", "write_scalar_volume",
]
