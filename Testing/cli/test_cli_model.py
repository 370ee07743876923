"""``m3d inspect``, ``m3d demo`` and ``m3d make-test-checkpoint`` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import re
import shutil

from m3d_cli import m3d


def test_inspect_reports_a_loadable_checkpoint(tiny_llama):
    result = m3d("inspect", tiny_llama)
    assert result.returncode == 0, result.stderr
    assert "M3D-LaMed (Llama)" in result.stdout and re.search(r"will load\s+yes", result.stdout)
    report = json.loads(m3d("inspect", tiny_llama, "--json").stdout)
    assert report["will_load"] and report["seg_token_id"] == report["tokens"]["[SEG]"]
    assert report["vision"]["image_tokens"] == 8 and report["stored_dtypes"] == ["F32"]


def test_inspect_partial_download_says_what_is_missing(tiny_llama, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    for name in ("config.json", "model.safetensors.index.json", "added_tokens.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, folder / name)
    result = m3d("inspect", folder)
    assert result.returncode == 1
    assert re.search(r"will load\s+NO", result.stdout)
    assert "missing weight file(s): model-00001-of-" in result.stdout


def test_inspect_detects_mismatched_weights(tiny_phi3, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_phi3, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    report = json.loads(m3d("inspect", folder, "--json").stdout)
    assert not report["will_load"]
    assert any("shapes that disagree with config.json" in p for p in report["problems"])


def test_demo_on_tiny_checkpoint_answers_about_the_sample_ct(tiny_phi3, tmp_path):
    result = m3d("demo", "--model", tiny_phi3, "--max-new-tokens", "4", "--quiet", "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lamed_phi3" in result.stdout and "example_ct_sm.nii.gz (30, 101, 122)" in result.stdout
    assert "report" in result.stdout and "AI-generated, not for clinical use" in result.stdout


def test_demo_offline_without_cache_explains_and_has_no_traceback(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "M3D_MODEL": ""}
    result = m3d("demo", "--quiet", env=env)
    assert result.returncode == 2
    assert "GoodBaiBai88/M3D-LaMed-Phi-3-4B is not in the Hugging Face cache" in result.stderr
    assert "--model PATH" in result.stderr and "Traceback" not in result.stderr


def test_model_env_variable_selects_local_folder(tiny_phi3, tmp_path):
    result = m3d("demo", "--max-new-tokens", "2", "--quiet", "--output-dir", tmp_path,
                 env={"M3D_MODEL": str(tiny_phi3)})
    assert result.returncode == 0, result.stderr
    assert str(tiny_phi3) in result.stdout


def test_make_test_checkpoint_never_overwrites(tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = m3d("make-test-checkpoint", folder)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (folder / "notes.txt").read_text() == "mine"
