"""The bundled test data is intact (checksums) and carries its licence."""

from __future__ import annotations

import hashlib


def test_checksums_and_licence(data_dir):
    lines = (data_dir / "SHA256SUMS").read_text().split("\n")
    entries = [line.split(maxsplit=1) for line in lines if line.strip()]
    assert len(entries) == 4 + 20  # three NIfTI files, the label names and the 20 DICOM slices
    for digest, name in entries:
        assert hashlib.sha256((data_dir / name.strip()).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in (data_dir / "LICENSE").read_text()


def test_sample_scene_checksums_and_licence_note(data_dir):
    sample = data_dir.parent / "sample"
    entries = [line.split(maxsplit=1) for line in (sample / "SHA256SUMS").read_text().splitlines() if line.strip()]
    assert sorted(name.strip() for _, name in entries) == ["liver_roi.mrk.json", "sample_scene.mrb"]
    for digest, name in entries:
        assert hashlib.sha256((sample / name.strip()).read_bytes()).hexdigest() == digest, name
    note = (sample / "README.md").read_text()
    assert "Apache-2.0" in note and "Utilities/make_sample_scene.py" in note
