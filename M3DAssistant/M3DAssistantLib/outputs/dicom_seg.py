"""Masks as DICOM Segmentation objects (``.dcm``), for volumes that came from a DICOM series: what PACS, OHIF and
3D Slicer's DICOM module (QuantitativeReporting) load.

Written with highdicom: a binary SEG that references the source series and every source instance it has a frame
for, one segment named after the target with a coded property category and type (SNOMED CT through pydicom's code
dictionary where the structure is known -- :data:`STRUCTURE_CODES` -- "Tissue" otherwise, as Slicer's default),
the algorithm identification (M3D-LaMed, the model revision, family "Artificial Intelligence"), and "AI-generated,
not for clinical use" in the series and content description.

Frames follow the source images: slice k of a mask from :func:`~M3DAssistantLib.volume_io.read_volume` on a DICOM
folder belongs to file k of :func:`~M3DAssistantLib.volume_io.dicom_series_files` (the order ITK reads them in).

Needs highdicom and pydicom (the ``inference`` extra); imported when a file is written.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .. import AI_LABEL, __version__
from ..errors import InputError
from .atomic import PathLike, atomic_write_bytes

MANUFACTURER = "M3D for 3D Slicer"
ALGORITHM_NAME = "M3D-LaMed"

# Normalised structure name -> (category, type) as pydicom code-dictionary keywords (SNOMED CT, DICOM CID 7150 /
# 7151 and CID 7159 for abnormal structures). Left/right stay in the segment label.
_ANATOMY = "AnatomicalStructure"
_ABNORMAL = "MorphologicallyAbnormalStructure"
STRUCTURE_CODES: dict[str, tuple[str, str]] = {
    "liver": (_ANATOMY, "Liver"), "spleen": (_ANATOMY, "Spleen"), "kidney": (_ANATOMY, "Kidney"),
    "stomach": (_ANATOMY, "Stomach"), "aorta": (_ANATOMY, "Aorta"), "pancreas": (_ANATOMY, "Pancreas"),
    "gallbladder": (_ANATOMY, "Gallbladder"), "lung": (_ANATOMY, "Lung"), "heart": (_ANATOMY, "Heart"),
    "bladder": (_ANATOMY, "Bladder"), "esophagus": (_ANATOMY, "Esophagus"), "duodenum": (_ANATOMY, "Duodenum"),
    "colon": (_ANATOMY, "Colon"), "small_intestine": (_ANATOMY, "SmallIntestine"), "brain": (_ANATOMY, "Brain"),
    "prostate": (_ANATOMY, "Prostate"), "trachea": (_ANATOMY, "Trachea"), "bone": (_ANATOMY, "Bone"),
    "inferior_vena_cava": (_ANATOMY, "InferiorVenaCava"), "adrenal_gland": (_ANATOMY, "AdrenalGland"),
    "mass": (_ABNORMAL, "Mass"), "tumor": (_ABNORMAL, "Neoplasm"), "neoplasm": (_ABNORMAL, "Neoplasm"),
    "lesion": (_ABNORMAL, "Lesion"), "cyst": (_ABNORMAL, "Cyst"),
}
_SYNONYMS = {
    "kidneys": "kidney", "lungs": "lung", "urinary_bladder": "bladder", "gall_bladder": "gallbladder",
    "oesophagus": "esophagus", "small_bowel": "small_intestine", "bowel": "small_intestine",
    "ivc": "inferior_vena_cava",
    "adrenal": "adrenal_gland", "adrenal_glands": "adrenal_gland", "tumour": "tumor", "nodule": "mass",
    "lesions": "lesion", "cysts": "cyst",
}
FALLBACK_CODES = ("Tissue", "Tissue")
"""Category and type of a target without a known code (free-text descriptions): Slicer's default, "Tissue"."""


def structure_codes(name: str) -> tuple[Any, Any]:
    """(category, type) pydicom ``Code``s for a target name: ``"liver"``, ``"Left kidney"``, ``"kidney_right"`` and
    ``"gall bladder"`` are known; anything else is Tissue / Tissue."""
    from pydicom.sr.codedict import codes

    key = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    key = re.sub(r"_(left|right)$", "", re.sub(r"^(left|right)_", "", key))  # "left kidney", "kidney_left"
    key = _SYNONYMS.get(key, key)
    category, kind = STRUCTURE_CODES.get(key, FALLBACK_CODES)
    return getattr(codes.SCT, category), getattr(codes.SCT, kind)


_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")


def read_dicom_sources(files: Sequence[PathLike]) -> list:
    """The source series' headers (no pixel data), checked for what a SEG must reference: every file readable and
    carrying its study, series, instance, class and frame-of-reference UIDs. Cheap: callers run it before a model.

    :raises InputError: naming the file and the missing UIDs (series anonymised without UIDs cannot be referenced).
    """
    import pydicom

    datasets = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001  (pydicom raises many types for bad files)
            raise InputError(f"cannot read the source DICOM file {f} ({exc}); a DICOM SEG needs the source series "
                             f"as it was read") from None
        missing = [name for name in _REQUIRED_UIDS if not str(getattr(ds, name, "") or "").strip()]
        if missing:
            raise InputError(f"the source DICOM file {f} has no {', '.join(missing)} (anonymised without UIDs?); a "
                             f"DICOM SEG must reference them -- export the series from the PACS with UIDs, or write "
                             f"the mask as .nii.gz or .seg.nrrd instead")
        datasets.append(ds)
    return datasets


def write_dicom_seg(
    path: PathLike,
    mask_kji: Any,
    source_files: Sequence[PathLike],
    *,
    label: str,
    model: str = "",
    model_revision: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write a binary DICOM SEG of ``mask_kji`` that references ``source_files``.

    :param mask_kji: (K, J, I) mask, slice k on source file k (see the module docstring).
    :param source_files: the series' files in K order (:func:`~M3DAssistantLib.volume_io.dicom_series_files`).
    :param label: the segment label (the target, ``liver``); it also picks the coded property type.
    :param model, model_revision: the model that made the mask (algorithm name M3D-LaMed, version = revision).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    files = [Path(f) for f in source_files]
    sources = read_dicom_sources(files)
    mask = np.asarray(mask_kji)
    if len(sources) > 1:
        rows, cols = int(sources[0].Rows), int(sources[0].Columns)
        expected = (len(sources), rows, cols)
    else:
        frames = int(getattr(sources[0], "NumberOfFrames", 1))
        expected = (frames, int(sources[0].Rows), int(sources[0].Columns))
    if mask.shape != expected:
        raise InputError(f"the mask has shape {mask.shape} (K, J, I) but the DICOM series has {expected} (slices, "
                         f"rows, columns); a DICOM SEG must be written from the series the mask was computed on")
    if not mask.any():
        raise InputError("the mask is empty; a DICOM SEG needs at least one segmented voxel")
    category, kind = structure_codes(label)
    version = (model_revision or "unknown revision")[:64]
    algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM_NAME, version=version,
                                                   family=codes.cid7162.ArtificialIntelligence,
                                                   source=(model or ALGORITHM_NAME)[:64])
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label[:64] or "segment", segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=(mask != 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=f"m3d-slicer {__version__}",
        device_serial_number="0",
        content_description=f"AI-generated by {ALGORITHM_NAME}: {label}"[:64],
        content_label="M3D_SEG",
        content_creator_name="M3D^LaMed",
    )
    seg.SeriesDescription = f"{ALGORITHM_NAME} {label} ({AI_LABEL})"[:64]
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


__all__ = ["ALGORITHM_NAME", "FALLBACK_CODES", "MANUFACTURER", "STRUCTURE_CODES", "read_dicom_sources",
           "structure_codes", "write_dicom_seg"]
