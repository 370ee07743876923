"""The training config (M3DTrainingLib.config) and the layering around it, without torch.

* its documented ``Example:`` runs (doctest);
* it imports nothing of the trainer, the job launcher or torch, and the run-folder names are defined there only;
* ``python -m M3DTrainingLib.train`` trains in its own process only: several processes are started by ``m3d train``
  (the launcher), which it says instead of silently training with one.
"""

from __future__ import annotations

import ast
import doctest
import os
import subprocess
import sys

import pytest
from repo_paths import REPO

LIB = REPO / "M3DTraining" / "M3DTrainingLib"


def test_the_config_example_runs():
    from M3DTrainingLib import config

    result = doctest.testmod(config, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0


def test_the_config_imports_no_trainer_launcher_or_torch():
    code = ("import sys, M3DTrainingLib.config\n"
            "print(sorted(m for m in sys.modules if m.startswith('M3DTrainingLib') or m in ('torch', 'yaml')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['M3DTrainingLib', 'M3DTrainingLib.config']"


def test_run_folder_file_names_are_defined_once():
    """The file names of a run folder appear as a literal in config.py and nowhere else in the package."""
    from M3DTrainingLib import config

    names = {getattr(config, n): n for n in ("CONFIG_FILE", "STATE_FILE", "PROGRESS_FILE", "LOG_FILE",
                                             "TRAINABLE_FILE", "ADAPTER_CONFIG_FILE", "CHECKPOINTS_DIR")}
    found = []
    for path in sorted(LIB.glob("*.py")):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.name}:{node.lineno} {node.value!r} (use config.{names[node.value]})")
    assert not found, found


def test_config_paths_and_checkpoint_names():
    from M3DTrainingLib.config import checkpoint_dir_name, checkpoint_step

    assert checkpoint_dir_name(200) == "step-0000200" and checkpoint_step("step-0000200") == 200
    assert checkpoint_step(".tmp-step-0000200") is None and checkpoint_step("step-") is None
    assert sorted(["step-0001000", "step-0000200"]) == [checkpoint_dir_name(200), checkpoint_dir_name(1000)]


def test_the_trainer_module_does_not_launch_processes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("yaml")
    from M3DTrainingLib.train import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = tmp_path / "train.yaml"
    config.write_text("dataset: ds\noutput_dir: run\nnum_processes: 2\n")
    assert main([str(config)]) == 2
    error = capsys.readouterr().err
    assert "num_processes is 2" in error and f"m3d train {config}" in error and "accelerate launch" in error
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_m3d_train_keeps_its_launch_options():
    from M3DAssistantLib.cli import build_parser

    args = build_parser().parse_args(["train", "c.yaml", "--detach", "--num-processes", "2", "--set", "max_steps=3"])
    assert (args.detach, args.num_processes, args.set, args.estimate_only) == (True, 2, ["max_steps=3"], False)
    args = build_parser().parse_args(["merge", "run", "out", "--dtype", "bfloat16"])
    assert (args.adapter, args.output, args.dtype) == ("run", "out", "bfloat16")


def test_python_m_train_still_runs_as_a_script(tmp_path):
    """What jobs launch: ``python -m M3DTrainingLib.train CONFIG``; here with a config error, so nothing trains."""
    config = tmp_path / "train.yaml"
    config.write_text("dataset: ds\noutput_dir: run\nstage: nonsense\n")
    done = subprocess.run([sys.executable, "-m", "M3DTrainingLib.train", str(config)], capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "LOCAL_RANK"})
    assert done.returncode == 2 and "stage 'nonsense' is not one of" in done.stderr, done.stderr
