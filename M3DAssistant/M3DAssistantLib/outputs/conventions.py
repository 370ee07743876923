"""What both Slicer file writers share: Slicer stores coordinates in files as LPS, and provenance attributes must not
clash with Slicer's own segment fields."""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from ..errors import InputError

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
"""RAS <-> LPS flip of the first two axes (its own inverse)."""
_RESERVED_HEADER_PREFIXES = ("segment", "terminologyentry")  # Slicer's own fields and tag
LINE_BREAKS = re.compile(r"\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
"""Every line boundary :meth:`str.splitlines` knows; file headers are line-based, so none may reach one raw."""


def check_attributes(attributes: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """Provenance attributes as strings; a name Slicer could misread (separators, its own field names) is refused."""
    out = {}
    for key, value in (attributes or {}).items():
        if not isinstance(key, str) or not key or any(c in key for c in ":|=\x00") or LINE_BREAKS.search(key):
            raise InputError(f"attribute name {key!r} must be a non-empty string without ':', '|', '=' or line "
                             f"breaks (e.g. 'M3D.model')")
        if key.lower().startswith(_RESERVED_HEADER_PREFIXES):
            raise InputError(f"attribute name {key!r} clashes with Slicer's own Segment*/TerminologyEntry fields; "
                             f"prefix it, e.g. 'M3D.{key}'")
        out[key] = "" if value is None else value if isinstance(value, str) else str(value)
    return out


__all__ = ["LINE_BREAKS", "LPS_FROM_RAS", "check_attributes"]
