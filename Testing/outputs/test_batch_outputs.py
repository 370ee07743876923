"""``m3d batch`` as a cohort user meets it: every volume and every task gets its own files (no collisions, stable
names), resumed runs add only what is missing, label maps are refused, and one cohort table (CSV + JSON lines)
holds one row per volume and task."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from forcing import force_answer

from M3DAssistantLib import AI_LABEL, cli
from M3DAssistantLib.batch import COHORT_COLUMNS, BatchTask, check_specs
from M3DAssistantLib.engine import InferenceEngine
from M3DAssistantLib.errors import InputError


@pytest.fixture
def batch_cli(monkeypatch, tiny_phi3_model):
    """cli.main in this process with the tiny model; ``answer`` forces how every answer starts (None: unforced)."""
    state = {"answer": None, "loads": 0}

    def make_engine(args, bar):
        state["loads"] += 1
        engine = InferenceEngine(tiny_phi3_model)
        if state["answer"] is not None:
            state["restore"] = force_answer(engine, state["answer"])
        return engine

    monkeypatch.setattr(cli, "_engine", make_engine)

    def run(*argv, answer=None, tokens=6):
        state["answer"] = answer
        try:
            return cli.main([str(a) for a in argv] + ["--max-new-tokens", str(tokens), "--quiet"])
        finally:
            state.pop("restore", lambda: None)()  # the model is shared by the session's tests

    run.state = state
    return run


def test_a_nii_gz_and_a_nrrd_and_liver_cases_never_share_a_file(batch_cli, data_dir, tmp_path, capsys):
    """case: batch over a.nii.gz and a.nrrd with segment:liver and segment:Liver (same stem, task keys equal after
    lower-casing) -> every volume and task gets its own stable file; nothing skipped or overwritten; the summary
    counts what ran"""
    import SimpleITK as sitk

    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(data_dir / "example_ct_sm.nii.gz", cases / "a.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(data_dir / "example_ct_sm.nii.gz")), str(cases / "a.nrrd"))
    out = tmp_path / "out"
    code = batch_cli("batch", cases, "--task", "segment:liver", "--task", "segment:Liver", "--task",
                     "ask:Is the liver enlarged?", "--task", "ask:Is the liver enlarged? Answer yes or no.",
                     "-o", out, answer=" It is [SEG].")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "skipped" not in captured.err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a.nii.gz", "a.nrrd"]
    for case in ("a.nii.gz", "a.nrrd"):
        record = json.loads((out / case / "results.json").read_text())
        assert sorted(record["tasks"].values()) == ["ask:Is the liver enlarged?",
                                                    "ask:Is the liver enlarged? Answer yes or no.",
                                                    "segment:Liver", "segment:liver"]
        files = sorted(p.name for p in (out / case).iterdir())
        assert len([f for f in files if f.endswith(".seg.nrrd")]) == 2
        assert len([f for f in files if f.endswith(".txt")]) == 2
    assert "2 volume(s): 2 run, 0 done before (skipped), 0 refused, 0 failed; 8 task(s) ran: 4 mask(s), " \
           "0 without a mask" in captured.out
    # the names are stable: the same task text gives the same file on another run / machine
    assert BatchTask.parse("segment:Liver").slug == BatchTask.parse("segment:Liver").slug != "segment_liver"


def test_a_task_given_twice_or_a_name_clash_is_refused_before_the_model_loads(batch_cli, data_dir, tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(data_dir / "example_ct_sm.nii.gz", cases / "a.nii.gz")
    assert batch_cli("batch", cases, "--task", "report", "--task", "report", "-o", tmp_path / "out") == 2
    assert "'report' is given twice" in capsys.readouterr().err and batch_cli.state["loads"] == 0
    # the one way two texts could meet: a plain name typed to equal another task's hashed name -- refused, not merged
    hashed = BatchTask.parse("segment:Liver X")
    typed = BatchTask.parse(f"segment:{hashed.slug.removeprefix('segment_')}")
    assert typed.slug == hashed.slug and typed.text != hashed.text
    with pytest.raises(InputError, match="would share the file name"):
        check_specs([hashed, typed])


def test_resumed_batch_runs_only_missing_tasks_and_the_cohort_table_has_no_duplicate_rows(batch_cli, data_dir,
                                                                                          tmp_path, capsys):
    """case: batch re-run with the same and then one more task -> finished volume/task pairs are skipped, the new
    task runs on every volume, and cohort.csv / cohort.jsonl hold exactly one row per volume and task"""
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(data_dir / "example_ct_sm.nii.gz", cases / "ct.nii.gz")
    shutil.copytree(data_dir / "example_ct_dicom", cases / "ct_dicom")
    out = tmp_path / "out"
    assert batch_cli("batch", cases, "--task", "report", "--task", "segment:liver", "-o", out) == 0  # unforced
    first = capsys.readouterr()
    assert batch_cli("batch", cases, "--task", "report", "--task", "segment:liver", "-o", out) == 0
    second = capsys.readouterr()
    assert second.err.count("done before, skipped") == 2 and "0 task(s) ran" in second.out
    assert batch_cli("batch", cases, "--task", "report", "--task", "segment:liver", "--task", "locate:liver",
                     "-o", out, answer=" <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end>", tokens=60) == 0
    third = capsys.readouterr()
    assert "2 run" in third.out and "2 task(s) ran: 2 box(es), 0 without a box" in third.out

    with open(out / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COHORT_COLUMNS
    assert sorted((r["case"], r["task"]) for r in rows) == [
        (case, task) for case in ("ct.nii.gz", "ct_dicom") for task in ("locate:liver", "report", "segment:liver")]
    lines = [json.loads(line) for line in (out / "cohort.jsonl").read_text().splitlines()]
    assert [(r["case"], r["task"]) for r in lines] == [(r["case"], r["task"]) for r in rows]
    for row in lines:
        assert row["label"] == AI_LABEL and row["model"] and row["convention"] and row["window"] and row["time"]
        if row["task"] == "locate:liver":
            assert row["status"] == "answered" and json.loads(row["box"]) == [0.1, 0.2, 0.3, 0.5, 0.6, 0.7]
            assert (out / row["box_file"]).is_file()
        if row["task"] == "segment:liver":  # unforced: random text, usually without [SEG]
            assert row["status"] in ("no mask", "absent", "answered")
            assert bool(row["mask_file"]) == (row["status"] == "answered")
            assert (row["volume_ml"] not in ("", None)) == (row["status"] == "answered")
    # the first run's summary counted the masks that did not come back instead of calling them done
    assert "without a mask" in first.out


def test_batch_over_a_totalsegmentator_case_folder_refuses_the_label_map_and_names_the_ct(batch_cli, data_dir,
                                                                                        tmp_path, capsys):
    """case: m3d batch over a TotalSegmentator case folder (ct.nii.gz + segmentation.nii.gz + segmentations/) ->
    the label map is refused naming the CT next to it, the segmentations/ folder is passed over, the CT runs"""
    case = tmp_path / "case"
    (case / "segmentations").mkdir(parents=True)
    shutil.copy(data_dir / "example_ct_sm.nii.gz", case / "ct.nii.gz")
    shutil.copy(data_dir / "example_seg.nii.gz", case / "segmentation.nii.gz")
    shutil.copy(data_dir / "example_seg.nii.gz", case / "segmentations" / "liver.nii.gz")
    out = tmp_path / "out"
    assert batch_cli("batch", case, "--task", "report", "-o", out) == 0
    captured = capsys.readouterr()
    assert "segmentation.nii.gz: refused:" in captured.err and "is a label map" in captured.err
    assert str(case / "ct.nii.gz") in captured.err  # names the CT next to it
    assert "segmentations/: not a DICOM series folder, passed over" in captured.err
    assert "1 run, 0 done before (skipped), 1 refused, 0 failed" in captured.out
    assert (out / "ct.nii.gz" / "report.txt").is_file() and not (out / "segmentation.nii.gz").exists()
