"""Release metadata: the ExtensionsIndex entry M3D.json against the index's JSON schema and our CMakeLists.txt,
the changelog and the licence statement."""

from __future__ import annotations

import json
import re

import pytest
from repo_paths import DATA, REPO

SCHEMA = DATA / "schemas" / "slicer-extension-catalog-entry-schema-v1.0.2.json"


def _entry() -> dict:
    return json.loads((REPO / "M3D.json").read_text(encoding="utf-8"))


def _cmake(name: str) -> str:
    match = re.search(rf'set\({name}\s+"([^"]*)"\)', (REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert match, f"{name} not set in CMakeLists.txt"
    return match.group(1)


def test_entry_validates_against_the_index_schema():
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    entry = _entry()
    errors = [str(e) for e in jsonschema_rs.validator_for(schema).iter_errors(entry)]
    assert not errors, errors
    assert entry["$schema"] == schema["$id"]  # the entry names the schema version we validate against
    bad = dict(entry, tier=7, extra="x")
    assert len(list(jsonschema_rs.validator_for(schema).iter_errors(bad))) == 2  # the validator really checks


def test_build_dependencies_equal_extension_depends():
    depends = _cmake("EXTENSION_DEPENDS")
    expected = [] if depends.strip() == "NA" else depends.split()
    assert _entry()["build_dependencies"] == expected


def test_category_and_repository_match_cmake():
    entry = _entry()
    assert entry["category"] == _cmake("EXTENSION_CATEGORY")
    assert entry["scm_url"].removesuffix(".git") == _cmake("EXTENSION_HOMEPAGE")
    assert entry["tier"] == 1  # first release: experimental until it has users and a maintainer record


def test_changelog_and_licence_statement():
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(r"^## \[?0\.1\.0", changelog, re.M) and "not for clinical use" in changelog
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    licences = readme.split("## Licences and citation", 1)[1]
    assert "Our code: MIT" in licences and "official M3D code is MIT" in licences
    assert "own terms" in licences  # the weights
    assert "not for clinical use" in readme.lower()
    assert "CHANGELOG.md" in readme
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT")
