"""Masks as NIfTI label maps (``.nii`` / ``.nii.gz``) on the source volume's own grid and affine: what nnU-Net,
MONAI and TotalSegmentator users load.

The voxels are the mask's (uint8, 1 inside, 0 outside), stored in NIfTI's (i, j, k) order; the affine is the
volume's IJK->RAS matrix, written as both sform and qform (code 1, scanner), so nibabel, SimpleITK/ITK and Slicer
place every voxel where the CT's voxel is. The provenance goes into the header's ``descrip`` (short) and, as JSON, into
a NIfTI-1 comment extension (code 6), which readers that do not know it skip.

Needs nibabel (the ``inference`` extra); imported when a file is written.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .. import AI_LABEL
from ..errors import InputError
from ..geometry import validate_ijk_to_ras
from .atomic import PathLike, atomic_write_bytes

NIFTI_INTENT_LABEL = 1002
"""NIfTI-1 intent code of a label map (nifti1.h NIFTI_INTENT_LABEL)."""
NIFTI_EXTENSION_COMMENT = 6
"""NIfTI-1 extension code "comment" (nifti1.h NIFTI_ECODE_COMMENT)."""


def write_label_map_nifti(
    path: PathLike,
    mask_kji: Any,
    ijk_to_ras: Any,
    *,
    label: str = "",
    attributes: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write a mask as a NIfTI label map on the grid of the volume it came from.

    :param mask_kji: 3D array in (K, J, I) order (as :func:`~M3DAssistantLib.volume_io.read_volume` and
        ``slicer.util.arrayFromVolume`` give), non-zero inside.
    :param ijk_to_ras: the volume's 4x4 IJK->RAS matrix (any orientation).
    :param label: what the mask is (``liver``); goes into ``descrip`` with the AI label.
    :param attributes: provenance (strings), stored as JSON in a comment extension.
    ``.nii.gz`` is gzip-compressed, ``.nii`` is not.
    """
    import nibabel as nib

    mask = np.asarray(mask_kji)
    if mask.ndim != 3 or min(mask.shape) == 0:
        raise InputError(f"a NIfTI label map needs a 3D mask (K, J, I), got shape {mask.shape}")
    if mask.dtype.kind not in "biu":
        raise InputError(f"the mask has dtype {mask.dtype}; threshold it to 0/1 first")
    affine = validate_ijk_to_ras(ijk_to_ras)
    data = np.ascontiguousarray((mask != 0).astype(np.uint8).transpose(2, 1, 0))  # (K, J, I) -> NIfTI (i, j, k)
    image = nib.Nifti1Image(data, affine)
    header = image.header
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_intent(NIFTI_INTENT_LABEL, name="label")
    header.set_xyzt_units("mm")
    header["descrip"] = _descrip(label)
    if attributes:
        payload = json.dumps({"label": AI_LABEL, **{str(k): str(v) for k, v in attributes.items()}},
                             ensure_ascii=False, sort_keys=True)
        header.extensions.append(nib.nifti1.Nifti1Extension(NIFTI_EXTENSION_COMMENT, payload.encode("utf-8")))
    raw = image.to_bytes()
    if str(path).lower().endswith(".gz"):
        comp = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip container, what .nii.gz readers expect
        raw = comp.compress(raw) + comp.flush()
    return atomic_write_bytes(path, raw, overwrite=overwrite)


def _descrip(label: str) -> bytes:
    """``descrip`` holds 80 bytes: the target (cut) and "AI-generated"."""
    text = f"M3D-LaMed {label}".strip()[:55] + " | AI-generated"
    return text.encode("utf-8")[:79]


__all__ = ["NIFTI_EXTENSION_COMMENT", "NIFTI_INTENT_LABEL", "write_label_map_nifti"]
