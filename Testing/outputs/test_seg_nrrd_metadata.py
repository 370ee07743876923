"""Line breaks and NULs in the metadata of a ``.seg.nrrd`` (outputs/seg_nrrd.py): every line break of a value is
written as NRRD's escaped newline so that Slicer and ITK read the file back; names with a line break and values with
a NUL are refused at the writer, before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
from slicer_files import assert_slicer_reads, segments_by_name, tag

from M3DAssistantLib.errors import InputError
from M3DAssistantLib.outputs import write_segmentation_nrrd

BREAKS = {"CR": "\r", "CRLF": "\r\n", "LF": "\n", "VT": "\v", "FF": "\f", "NEL": "\x85", "LS": "\u2028",
          "PS": "\u2029", "FS": "\x1c"}


def _mask() -> np.ndarray:
    a = np.zeros((5, 6, 7), np.uint8)
    a[1:3, 2:4, 3:5] = 1
    return a


@pytest.mark.slicer
@pytest.mark.parametrize("name", sorted(BREAKS))
def test_every_line_break_in_an_attribute_is_escaped(headless_slicer, tmp_path, name):
    """case: a line break (\\r, \\r\\n, \\u2028, ...) in a segment attribute of a .seg.nrrd -> written as NRRD's
    escaped newline at the writer; Slicer and ITK read the file, the value comes back with a newline"""
    _, logics = headless_slicer
    sitk = pytest.importorskip("SimpleITK")
    value = f"first line{BREAKS[name]}second \\ line"
    m = np.diag([0.8, 0.9, 2.5, 1.0])
    out = write_segmentation_nrrd(tmp_path / "x.seg.nrrd", {"liver": _mask()}, m,
                                  attributes={"M3D.prompt": value, "M3D.after": "still read"})
    header = out.read_bytes().split(b"\n\n", 1)[0]
    assert b"\r" not in header and "\u2028".encode() not in header  # no raw line break in any header line
    seg = assert_slicer_reads(logics, out, {"liver": _mask()}, m)
    image = sitk.ReadImage(str(out))
    assert image.GetMetaData("M3D.prompt") == "first line\nsecond \\ line"
    assert image.GetMetaData("M3D.after") == "still read"  # the fields after it survive too
    assert tag(segments_by_name(seg)["liver"][1], "M3D.prompt") == "first line second \\ line"


@pytest.mark.parametrize("masks,attributes,message", [
    ({"liver\rleft": _mask()}, {}, "contains a line break"),
    ({"liver\u2028left": _mask()}, {}, "contains a line break"),
    ({"liver": _mask()}, {"M3D.prompt\r": "x"}, "without ':', '|', '=' or line breaks"),
    ({"liver": _mask()}, {"M3D.\u2029prompt": "x"}, "without ':', '|', '=' or line breaks"),
    ({"liver": _mask()}, {"M3D.prompt": "cut\x00here"}, "NUL character"),
])
def test_names_with_line_breaks_and_nul_values_are_refused(tmp_path, masks, attributes, message):
    """case: a line break in a segment or attribute name, or a NUL in a value (.seg.nrrd) -> InputError at the writer;
    no file written"""
    with pytest.raises(InputError, match=message):
        write_segmentation_nrrd(tmp_path / "x.seg.nrrd", masks, np.eye(4), attributes=attributes)
    assert list(tmp_path.iterdir()) == []
