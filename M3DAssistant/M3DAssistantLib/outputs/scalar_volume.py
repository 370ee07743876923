"""A float map on a volume's grid (an evidence map) as a scalar volume file Slicer opens: ``.nrrd`` (LPS header,
gzip, as Slicer writes volumes; standard library and numpy) or ``.nii`` / ``.nii.gz`` (through nibabel, which the
command line's environment has). Written atomically, never over a file unless asked.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from ..errors import InputError
from ..geometry import validate_ijk_to_ras
from .atomic import PathLike, atomic_write_bytes
from .conventions import LPS_FROM_RAS, check_attributes
from .seg_nrrd import escape_value, gzip_chunks, nrrd_vector

SCALAR_VOLUME_EXTENSIONS = (".nrrd", ".nii.gz", ".nii")


def check_scalar_volume_path(path: PathLike) -> Path:
    """``path`` when its extension is one :func:`write_scalar_volume` writes; InputError naming them otherwise (so a
    command fails before the model runs)."""
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd") or not name.endswith(SCALAR_VOLUME_EXTENSIONS):
        raise InputError(f"cannot write a map to {path}: use a volume file ending in "
                         f"{', '.join(SCALAR_VOLUME_EXTENSIONS)} (not .seg.nrrd: a map is not a segmentation)")
    return Path(path)


def scalar_nrrd_header(shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray, attributes: Mapping[str, str]
                       ) -> bytes:
    """The NRRD header of a float32 volume (LPS, gzip), with ``attributes`` as key/value fields."""
    ijk_to_lps = ijk_to_ras.copy()
    ijk_to_lps[:3, :] = LPS_FROM_RAS @ ijk_to_ras[:3, :]
    k, j, i = shape_kji
    lines = ["NRRD0004", "# Complete NRRD file format specification at:",
             "# http://teem.sourceforge.net/nrrd/format.html", "type: float", "dimension: 3",
             "space: left-posterior-superior", f"sizes: {i} {j} {k}",
             "space directions: " + " ".join(nrrd_vector(ijk_to_lps[:3, c]) for c in range(3)),
             "kinds: domain domain domain", "endian: little", "encoding: gzip",
             f"space origin: {nrrd_vector(ijk_to_lps[:3, 3])}"]
    lines += [f"{key}:={escape_value(key, value)}" for key, value in sorted(attributes.items())]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def write_scalar_volume(path: PathLike, values_kji: Any, ijk_to_ras: Any,
                        attributes: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> Path:
    """Write float values (K, J, I) on the grid of the volume with this IJK->RAS as a scalar volume; the format by
    extension (:data:`SCALAR_VOLUME_EXTENSIONS`). ``attributes`` (e.g. provenance) become NRRD key/value fields, or
    the NIfTI description (truncated to its 80 bytes)."""
    path = check_scalar_volume_path(path)
    values = np.asarray(values_kji, dtype="<f4")
    if values.ndim != 3:
        raise InputError(f"a scalar volume is 3D (K, J, I), got shape {values.shape}")
    m = validate_ijk_to_ras(ijk_to_ras)
    attrs = check_attributes(attributes)
    if path.name.lower().endswith(".nrrd"):
        header = scalar_nrrd_header(tuple(int(s) for s in values.shape), m, attrs)  # type: ignore[arg-type]

        def slabs() -> Iterator[bytes]:
            step = max(1, (16 << 20) // max(1, values[0].nbytes))
            for k0 in range(0, values.shape[0], step):
                yield np.ascontiguousarray(values[k0:k0 + step]).tobytes()

        def body() -> Iterator[bytes]:
            yield header
            yield from gzip_chunks(slabs(), 1)

        return atomic_write_bytes(path, body(), overwrite=overwrite)
    import nibabel

    image = nibabel.Nifti1Image(np.ascontiguousarray(values.transpose(2, 1, 0)), m)  # nibabel: (I, J, K), RAS
    image.header.set_xyzt_units("mm")
    description = "; ".join(f"{k}={v}" for k, v in sorted(attrs.items()) if k.endswith(("label", "task", "model")))
    image.header["descrip"] = description.encode("utf-8")[:79]
    buffer = io.BytesIO()
    image.to_file_map(nibabel.Nifti1Image.make_file_map({"image": buffer, "header": buffer}))
    data = buffer.getvalue()
    if path.name.lower().endswith(".gz"):
        import gzip

        data = gzip.compress(data, compresslevel=1)
    return atomic_write_bytes(path, data, overwrite=overwrite)


__all__ = ["SCALAR_VOLUME_EXTENSIONS", "check_scalar_volume_path", "scalar_nrrd_header", "write_scalar_volume"]
