"""An instant CLI: ``--help`` of every command, ``m3d inspect`` and every mistake the CLI catches before a model
loads import no torch (nor transformers) -- asserted on the import graph of a fresh process, never on the time
(``benchmarks/startup.py`` measures that)."""

from __future__ import annotations

import json
import subprocess
import sys

# Runs in a fresh interpreter: each argv through cli.main, then the heavy modules that got imported.
PROBE = """
import json, sys
from M3DAssistantLib import cli
heavy = ("torch", "transformers", "accelerate", "peft", "monai", "fastapi", "uvicorn")
report = []
for argv in json.loads(sys.argv[1]):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    report.append({"argv": argv, "code": code, "heavy": sorted(m for m in heavy if m in sys.modules)})
print("PROBE " + json.dumps(report))
"""


def probe(*argvs: list[str]) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps([[str(a) for a in argv] for argv in argvs])],
                          capture_output=True, text=True, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(line[len("PROBE "):])


def test_help_of_every_command_imports_no_torch():
    from M3DAssistantLib import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a.choices, dict)).choices
    report = probe(["--help"], *[[name, "--help"] for name in commands])
    assert len(report) == len(commands) + 1 >= 19
    for entry in report:
        assert entry["code"] == 0 and entry["heavy"] == [], entry


def test_inspect_reads_json_only_and_imports_no_torch(tiny_phi3, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_phi3, bad)
    config = json.loads((bad / "config.json").read_text())
    config["mm_hidden_size"] = 64  # a config.json that does not belong to the weights
    (bad / "config.json").write_text(json.dumps(config))
    good, wrong = probe(["inspect", tiny_phi3], ["inspect", bad, "--json"])
    assert good["code"] == 0 and good["heavy"] == []
    assert wrong["code"] == 1 and wrong["heavy"] == []  # caught from the shapes config.json implies, without torch


def test_mistakes_are_reported_before_any_heavy_import(ct_path, data_dir, tmp_path):
    """case: bad window, empty prompt, missing --roi file, unknown -o extension, existing -o file, missing -o folder,
    missing volume, a label map as the volume, --max-new-tokens 100000 -> each reported (exit 2) before torch is
    imported, so before any model loads"""
    existing = tmp_path / "answer.txt"
    existing.write_text("mine")
    report = probe(
        ["report", ct_path, "--window", "40"],
        ["ask", ct_path, "   "],
        ["describe", ct_path, "--roi", tmp_path / "no-such-roi.mrk.json"],
        ["segment", ct_path, "liver", "-o", tmp_path / "liver.vtk"],
        ["ask", ct_path, "Is there ascites?", "-o", existing],
        ["segment", ct_path, "liver", "-o", tmp_path / "missing" / "liver.nii.gz"],
        ["report", tmp_path / "missing.nii.gz"],
        ["report", data_dir / "example_seg.nii.gz"],
        ["report", ct_path, "--max-new-tokens", "100000"],
        ["batch", data_dir, "--task", "segment:", "-o", tmp_path / "out"],
    )
    for entry in report:
        assert entry["code"] == 2 and entry["heavy"] == [], entry
    assert existing.read_text() == "mine" and not (tmp_path / "out").exists()
