"""Box ROIs as Slicer markups JSON files (``.mrk.json``), written as ``vtkMRMLMarkupsROIJsonStorageNode`` writes
them and read back from files Slicer or :func:`write_roi` wrote."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import InputError
from .atomic import PathLike
from .conventions import LPS_FROM_RAS, check_attributes
from .text import write_json

log = logging.getLogger(__name__)

MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
"""The schema id Slicer writes (and reads any ``markups-schema-v1.x.y``); kept at v1.0.3 so Slicer >= 5.0 reads it."""


def roi_markups_dict(
    center_ras: Sequence[float],
    size: Sequence[float],
    axes_ras: Any = None,
    name: str = "ROI",
    attributes: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The markups JSON document (a dict) for one box ROI; see :func:`write_roi_markups_json`."""
    try:
        center = np.array(center_ras, dtype=np.float64).reshape(3)
        extent = np.array(size, dtype=np.float64).reshape(3)
        axes = np.eye(3) if axes_ras is None else np.array(axes_ras, dtype=np.float64).reshape(3, 3)
    except (TypeError, ValueError):
        raise InputError(f"an ROI needs a centre (3 numbers), a size (3 numbers) and axes (3x3), got "
                         f"{center_ras!r}, {size!r}, {axes_ras!r}") from None
    if not (np.all(np.isfinite(center)) and np.all(np.isfinite(extent)) and np.all(np.isfinite(axes))):
        raise InputError("the ROI contains NaN or infinity; give finite numbers")
    if np.any(extent < 0):
        raise InputError(f"the ROI size {extent.tolist()} has a negative edge; sizes are full edge lengths in mm")
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-6):
        raise InputError("the ROI axes must be orthonormal columns (a rotation); orthonormalise them")
    if np.linalg.det(axes) < 0:
        # Left-handed axes (e.g. taken from an LPS-ordered volume): flipping one axis describes the same box, and
        # Slicer's ObjectToNode matrix must be a rotation.
        axes = axes * np.array([1.0, 1.0, -1.0])
    if not isinstance(name, str) or "\n" in name:
        raise InputError(f"ROI name {name!r} must be a single-line string")
    attrs = check_attributes(attributes) if attributes else {}

    # Slicer's ROI JSON (vtkMRMLMarkupsROIJsonStorageNode): "orientation" is the ObjectToNode rotation, row-major,
    # whose columns are the ROI axes; in LPS files the first two rows (6 values) and the x, y of points are negated.
    center_lps = LPS_FROM_RAS @ center
    orientation_lps = LPS_FROM_RAS @ axes
    identity_lps = LPS_FROM_RAS @ np.eye(3)
    markup: dict[str, Any] = {
        "type": "ROI",
        "name": name,
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 1,
        "roiType": "Box",
        "center": [_num(v) for v in center_lps],
        "orientation": [_num(v) for v in orientation_lps.reshape(-1)],
        "size": [_num(v) for v in extent],
        "insideOut": False,
        "controlPoints": [{
            "id": "1",
            "label": f"{name}-1",
            # Slicer's reader drops unknown markup properties and node attributes, but keeps a control point's
            # description: the provenance lives there too, so it survives loading (read_roi_provenance).
            "description": provenance_description(attrs) if attrs else "",
            "associatedNodeID": "",
            "position": [_num(v) for v in center_lps],  # a box ROI's single control point is its centre
            "orientation": [_num(v) for v in identity_lps.reshape(-1)],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }],
    }
    if attrs:
        markup["attributes"] = attrs  # ours; Slicer ignores unknown properties (schema: additionalProperties true)
    return {"@schema": MARKUPS_SCHEMA, "markups": [markup]}


PROVENANCE_PREFIX = "M3D provenance: "


def provenance_description(attributes: Mapping[str, str]) -> str:
    """The control point description that carries provenance through Slicer's markups reader: the AI label first
    (what a reader sees in the Markups module), then the attributes as JSON."""
    label = attributes.get("M3D.label", "")
    return f"{label + '. ' if label else ''}{PROVENANCE_PREFIX}{json.dumps(dict(attributes), ensure_ascii=False)}"


def parse_provenance_description(description: str) -> dict[str, str]:
    """The attributes :func:`provenance_description` wrote ({} for any other text), e.g. from
    ``roiNode.GetNthControlPointDescription(0)`` after Slicer loaded the file."""
    _, found, payload = (description or "").partition(PROVENANCE_PREFIX)
    if not found:
        return {}
    try:
        data = json.loads(payload)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _num(v: float) -> float:
    v = float(v)
    return 0.0 if v == 0 else v  # no -0.0 in the file


def write_roi_markups_json(
    path: PathLike,
    center_ras: Sequence[float],
    size: Sequence[float],
    axes_ras: Any = None,
    name: str = "ROI",
    attributes: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write a Slicer markups JSON (``.mrk.json``) holding one box ROI.

    :param center_ras: centre in RAS (mm).
    :param size: full edge lengths (mm) along the three ROI axes.
    :param axes_ras: 3x3 whose columns are the ROI axes in RAS (orthonormal; identity when None). A left-handed set
        is written with its third axis reversed -- the same box.
    :param name: the node name Slicer gives the ROI when it loads the file.
    :param attributes: string provenance, stored under ``"attributes"`` in the markup (Slicer ignores the key) and
        in the control point's description, which Slicer keeps on load (:func:`parse_provenance_description`).
    The file uses LPS coordinates, as Slicer writes markups.
    """
    doc = roi_markups_dict(center_ras, size, axes_ras, name, attributes)
    if not str(path).lower().endswith(".json"):
        log.warning("%s: Slicer recognises markups by the .mrk.json extension", path)
    return write_json(path, doc, overwrite=overwrite, indent=4)


def write_roi(path: PathLike, roi: Any, name: str = "ROI", attributes: Optional[Mapping[str, Any]] = None,
              overwrite: bool = False) -> Path:
    """Write a :class:`M3DAssistantLib.geometry.RasRoi` (``center``, ``size``, ``axes``) as a Slicer ROI file."""
    return write_roi_markups_json(path, roi.center, roi.size, roi.axes, name, attributes, overwrite)


def read_roi(path: PathLike, name: Optional[str] = None) -> Any:
    """Read a box ROI from a Slicer markups JSON file (as Slicer or :func:`write_roi` writes it) -> ``RasRoi``.

    The first ROI markup is used, or the one called ``name``. LPS and RAS files are both read.
    """
    from ..geometry import RasRoi

    p = Path(path)
    if not p.is_file():
        raise InputError(f"no ROI file at {p}; save an ROI drawn in Slicer as .mrk.json, or write one with "
                         f"m3d locate CT TARGET -o {p.name}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        markups = [m for m in doc.get("markups", []) if m.get("type") == "ROI"]
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"{p}: not a readable Slicer markups JSON file ({e}); save the ROI from Slicer as "
                         ".mrk.json") from e
    if name is not None:
        markups = [m for m in markups if m.get("name") == name]
    if not markups:
        raise InputError(f"{p}: no ROI markup{f' named {name!r}' if name else ''} in this file; draw an ROI in "
                         "Slicer (Markups > ROI) and save it")
    markup = markups[0]
    try:
        center = np.array(markup["center"], dtype=np.float64).reshape(3)
        size = np.array(markup["size"], dtype=np.float64).reshape(3)
        axes = np.array(markup.get("orientation", np.eye(3).ravel()), dtype=np.float64).reshape(3, 3)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{p}: the ROI has no valid center/size/orientation ({e})") from e
    if markup.get("coordinateSystem", "LPS") == "LPS":
        center, axes = LPS_FROM_RAS @ center, LPS_FROM_RAS @ axes
    return RasRoi(center=center, size=size, axes=axes)


__all__ = ["MARKUPS_SCHEMA", "PROVENANCE_PREFIX", "parse_provenance_description", "provenance_description", "read_roi",
           "roi_markups_dict", "write_roi", "write_roi_markups_json"]
