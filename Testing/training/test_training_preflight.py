"""Training fails early, with the fix: checks made from JSON files before any model loads."""

from __future__ import annotations

from m3d_cli import m3d
from repo_paths import REPO

SAMPLE_MRB = "Testing/Data/sample/sample_scene.mrb"


def test_dataset_of_another_model_shape_is_refused_before_training(headless_slicer, tiny_phi3, tmp_path):
    """case: a dataset exported at one model shape (32x256x256) trained on a model of another (the tiny 16x64x64)
    -> refused before the model loads, naming both shapes and m3d export --model-shape; no run folder is made"""

    repo = REPO
    dataset = tmp_path / "dataset"
    assert m3d("export", repo / SAMPLE_MRB, "-o", dataset).returncode == 0
    config = tmp_path / "train.yaml"
    config.write_text(f"base_model: {tiny_phi3}\ndataset: {dataset}\noutput_dir: {tmp_path / 'run'}\nmax_steps: 1\n")
    result = m3d("train", config, "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "exported at model shape (32, 256, 256)" in result.stderr and "(16, 64, 64)" in result.stderr
    assert "--model-shape 16 64 64" in result.stderr and "to_model_input" not in result.stderr
    assert not (tmp_path / "run").exists()  # stopped before the run folder, so before the model
