"""Boxes as DICOM Structured Reports (``.sr.dcm``), for volumes that came from a DICOM series: a Comprehensive 3D SR
with the TID 1500 measurement report, one volumetric ROI group (TID 1411) whose region is the box as a volume
surface -- its six faces as closed 3D polygons in the series' frame of reference (patient LPS, mm) -- the finding
type coded as for DICOM SEG (:func:`~.dicom_seg.structure_codes`), the algorithm (M3D-LaMed, the model revision),
the observer device, and "AI-generated, not for clinical use" in the series description.

Written with highdicom (which builds the templates and checks them); the evidence is the source series. Needs
highdicom and pydicom (the ``inference`` extra); imported when a file is written.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .. import AI_LABEL
from ..errors import InputError
from .atomic import PathLike, atomic_write_bytes
from .conventions import LPS_FROM_RAS
from .dicom_seg import ALGORITHM_NAME, MANUFACTURER, read_dicom_sources, structure_codes


def box_faces_lps(center_ras: Any, size: Any, axes_ras: Any = None) -> list[np.ndarray]:
    """The six faces of a box ROI as closed polygons (5 x 3: the first corner repeated last) in LPS millimetres."""
    center = np.asarray(center_ras, dtype=np.float64).reshape(3)
    half = np.asarray(size, dtype=np.float64).reshape(3) / 2
    axes = np.eye(3) if axes_ras is None else np.asarray(axes_ras, dtype=np.float64).reshape(3, 3)
    faces = []
    for axis in range(3):
        u, v = (a for a in range(3) if a != axis)
        for side in (-1.0, 1.0):
            corners = []
            for su, sv in ((-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)):
                signs = np.zeros(3)
                signs[axis], signs[u], signs[v] = side, su, sv
                corners.append(LPS_FROM_RAS @ (center + axes @ (signs * half)))
            faces.append(np.array(corners))
    return faces


def write_box_dicom_sr(
    path: PathLike,
    roi: Any,
    source_files: Sequence[PathLike],
    *,
    label: str,
    model: str = "",
    model_revision: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``roi`` (an RAS box: ``center``, ``size``, ``axes``) as a TID 1500 measurement report referencing the
    DICOM series ``source_files`` (the series the box was found on)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = read_dicom_sources(source_files)
    if float(np.min(roi.size)) <= 0:
        raise InputError("the box has a zero or negative size; a DICOM SR region needs a box with volume")
    _category, finding = structure_codes(label)
    surface = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=box_faces_lps(roi.center, roi.size, roi.axes),
        frame_of_reference_uid=sources[0].FrameOfReferenceUID,
        source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID))
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{label} (box)"[:64]),
        referenced_volume_surface=surface, finding_type=finding,
        algorithm_id=hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME,
                                                   version=(model_revision or "unknown revision")[:64]))
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=ALGORITHM_NAME,
                                                       manufacturer_name=MANUFACTURER,
                                                       model_name=(model or ALGORITHM_NAME)[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources, content=report, series_instance_uid=hd.UID(), series_number=901, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True)
    sr.SeriesDescription = f"{ALGORITHM_NAME} {label} box ({AI_LABEL})"[:64]
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


__all__ = ["box_faces_lps", "write_box_dicom_sr"]
