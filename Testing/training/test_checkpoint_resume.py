"""Training checkpoints (M3DTrainingLib/checkpoints.py): fsynced with a manifest before they are listed; a resume takes
the newest one that verifies and loads, naming the ones it skips and why; nothing pickled in a checkpoint folder is
ever unpickled -- a hostile checkpoint (pickled code in accelerate's files, even with a forged manifest) runs nothing.
CPU, tiny checkpoint, synthetic dataset; the trainer runs as ``python -m M3DTrainingLib.train`` (as a user runs it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

from training_runs import read_events, subprocess_env, synthetic_config  # noqa: E402

from M3DTrainingLib import checkpoints as ck  # noqa: E402

RUN = dict(max_steps=8, save_steps=2, save_total_limit=10, per_device_batch_size=2, learning_rate=1e-3,
           lr_scheduler="cosine", warmup_ratio=0.25, dataset_kwargs={"size": 8, "masks": "half"}, resume=True)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _train(config_path: Path, log: Path) -> subprocess.CompletedProcess:
    with open(log, "ab") as out:
        return subprocess.run([sys.executable, "-m", "M3DTrainingLib.train", str(config_path), "--quiet"],
                              stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), timeout=600)


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {name: load_file(str(folder / "adapter" / name)) for name in ("trainable.safetensors",
                                                                         "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def finished_run(tiny_phi3, tmp_path_factory):
    """One uninterrupted 8-step run with checkpoints at steps 2, 4 and 6: its adapter is the reference, its folder
    the template the tests damage (copies)."""
    root = tmp_path_factory.mktemp("ckpt-run")
    config_path = synthetic_config(tiny_phi3, root / "run", **RUN).to_yaml(root / "config.yaml")
    result = _train(config_path, root / "train.log")
    assert result.returncode == 0, (root / "train.log").read_text()[-3000:]
    return root / "run", _adapter(root / "run")


def _reopen(finished_run, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run whose adapter is gone (so it resumes), and its config file."""
    from M3DTrainingLib.config import TrainConfig

    source, _ = finished_run
    folder = Path(shutil.copytree(source, tmp_path / "run"))
    shutil.rmtree(folder / "adapter")
    config = TrainConfig.from_yaml(folder / "train_config.yaml")
    config_path = TrainConfig.from_dict({**config.to_dict(), "output_dir": str(folder)}).to_yaml(
        tmp_path / "config.yaml")
    return folder, config_path


def _assert_same_adapter(a: dict, b: dict) -> None:
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-5, atol=1e-7, msg=f"{name}:{key}")


def _last_start(folder: Path) -> dict:
    return [e for e in read_events(folder) if e["stage"] == "start"][-1]


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_newest_intact_one(finished_run, tmp_path):
    """case: the newest training checkpoint truncated (power loss, disk error) -> resume verifies it against its
    manifest, skips it naming the file and the reason, resumes from the newest intact one; the result equals the
    uninterrupted run"""
    folder, config_path = _reopen(finished_run, tmp_path)
    model = folder / "checkpoints" / "step-0000006" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    result = _train(config_path, tmp_path / "train.log")
    assert result.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    start = _last_start(folder)
    assert start["details"]["resumed_from"] == 4
    [skipped] = start["details"]["skipped_checkpoints"]
    assert skipped["checkpoint"] == "step-0000006"
    assert "model.safetensors has" in skipped["reason"] and "truncated or changed" in skipped["reason"]
    assert "skipped step-0000006 (model.safetensors has" in start["message"]
    _assert_same_adapter(finished_run[1], _adapter(folder))  # steps 5..8 again, exactly
    assert ck.verify_checkpoint(folder / "checkpoints" / "step-0000006") is None  # rewritten, intact now


@pytest.mark.parametrize("damage", ["no manifest", "changed byte", "missing file", "extra file"])
def test_every_kind_of_damage_is_named(finished_run, tmp_path, damage):
    source, _ = finished_run
    folder = Path(shutil.copytree(source / "checkpoints" / "step-0000004", tmp_path / "step-0000004"))
    assert ck.verify_checkpoint(folder) is None
    if damage == "no manifest":
        (folder / "manifest.json").unlink()
        expected = "has no manifest.json"
    elif damage == "changed byte":
        data = bytearray((folder / "optimizer.bin").read_bytes())
        data[-1] ^= 1
        (folder / "optimizer.bin").write_bytes(bytes(data))
        expected = "optimizer.bin differs from what was written"
    elif damage == "missing file":
        (folder / "train_state.json").unlink()
        expected = "train_state.json is missing"
    else:
        (folder / "custom_checkpoint_0.pkl").write_bytes(b"x")
        expected = "holds files that were not written with it: custom_checkpoint_0.pkl"
    assert expected in ck.verify_checkpoint(folder)


def test_no_intact_checkpoint_is_an_error_not_a_silent_restart(finished_run, tmp_path):
    folder, config_path = _reopen(finished_run, tmp_path)
    for step in (2, 4, 6):
        (folder / "checkpoints" / f"step-{step:07d}" / "train_state.json").write_text("{}")
    result = _train(config_path, tmp_path / "train.log")
    log = (tmp_path / "train.log").read_text()
    assert result.returncode == 2 and "none of its checkpoints can be resumed: step-0000006: train_state.json" in log
    assert read_events(folder)[-1]["stage"] == "error"


def _forge(folder: Path, marker: Path) -> None:
    """Pickled code in every file accelerate unpickles, and a manifest rewritten to match (what an attacker who hands
    over a run folder can do)."""
    payload = {"state": _RunsCode(str(marker))}
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):
        torch.save(payload, folder / name)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": ck._sha256(p)}
                         for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_hostile_checkpoint_runs_no_code(finished_run, tmp_path):
    """case: a run folder whose newest checkpoint holds pickled code (accelerate's custom_checkpoint_N.pkl,
    optimizer.bin, random_states_N.pkl), even with a forged manifest -> nothing is unpickled (weights-only loading
    forced), the checkpoint is skipped with the reason, the run resumes from the previous one; the code never runs"""
    folder, config_path = _reopen(finished_run, tmp_path)
    marker = tmp_path / "code-ran"
    _forge(folder / "checkpoints" / "step-0000006", marker)
    assert ck.verify_checkpoint(folder / "checkpoints" / "step-0000006") is None  # the forgery passes the manifest
    result = _train(config_path, tmp_path / "train.log")
    assert result.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    assert not marker.exists()
    start = _last_start(folder)
    assert start["details"]["resumed_from"] == 4
    assert "pickled Python objects that could run code" in start["details"]["skipped_checkpoints"][0]["reason"]
    _assert_same_adapter(finished_run[1], _adapter(folder))


class _FakeAccelerator:
    """accelerate.Accelerator's checkpoint surface, single process, writing real small files."""

    is_main_process = True
    distributed_type = "NO"
    process_index = 0

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir, safe_serialization=True, **kwargs):
        from safetensors.torch import save_file

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.ones(4)}, str(out / "model.safetensors"))
        torch.save({"state": {}, "param_groups": []}, out / "optimizer.bin")


def test_files_and_folders_are_fsynced_before_the_checkpoint_is_listed(tmp_path, monkeypatch):
    """case: power loss right after a checkpoint was saved -> every file and folder was fsynced and the manifest
    written before the rename, so a listed checkpoint is complete on disk"""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(Path, "rename", lambda self, target: (events.append(("rename", str(self))),
                                                             real_rename(self, target))[1])
    final = ck.save_checkpoint(_FakeAccelerator(), tmp_path / "run", 2, keep=3,
                               state={"train_state": {"global_step": 2, "epoch": 0, "batches_in_epoch": 2},
                                      "scheduler": {}})
    rename = events.index(("rename", str(final.parent / ".tmp-step-0000002")))
    synced = {Path(path).name for kind, path in events[:rename] if kind == "fsync"}
    assert {p.name for p in final.iterdir()} | {".tmp-step-0000002"} <= synced, synced
    assert ("fsync", str(final.parent)) in events[rename:]  # the rename itself made durable
    assert ck.verify_checkpoint(final) is None


def test_loading_forces_weights_only_even_when_asked_otherwise(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"x": _RunsCode(str(marker))}, tmp_path / "payload.pkl")
    with ck.weights_only_loading():
        with pytest.raises(Exception, match="(?i)weights.only"):
            torch.load(tmp_path / "payload.pkl", weights_only=False)  # what accelerate's load_custom_state asks
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
