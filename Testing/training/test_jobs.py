"""Training jobs (M3DTrainingLib.jobs): a detached trainer subprocess, progress.jsonl, SIGKILL mid-run and resume
with the same loss curve as an uninterrupted run, cancel of a whole ``accelerate launch`` process tree, reconnect
from the output folder. CPU, tiny checkpoint, the synthetic dataset of training_synthetic.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
psutil = pytest.importorskip("psutil")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from training_runs import job_env, read_events, synthetic_config, train_losses, wait_until  # noqa: E402

pytestmark = pytest.mark.skipif(os.name == "nt", reason="SIGKILL and process-group semantics are POSIX here")


def test_progress_log_reads_incrementally_and_skips_a_cut_line(tmp_path):
    from M3DAssistantLib.progress import ProgressEvent
    from M3DTrainingLib.progress_log import ProgressLog, TrainingProgressEvent

    path = tmp_path / "progress.jsonl"
    log = ProgressLog(path)
    log(ProgressEvent("load", 0.5, "half"))
    log(TrainingProgressEvent("train", 0.1, "step 1", step=1, loss=2.5, lr=1e-4))
    events, offset = ProgressLog.read(path)
    assert [e["stage"] for e in events] == ["load", "train"]
    assert events[1]["step"] == 1 and events[1]["loss"] == 2.5 and "time" in events[0]
    with open(path, "a") as f:
        f.write('{"stage": "train", "ste')  # a kill in the middle of a write
    assert ProgressLog.read(path, offset) == ([], offset)
    with open(path, "a") as f:
        f.write('p": 2}\n{"broken\n')
    events, _ = ProgressLog.read(path, offset)
    assert events == [{"stage": "train", "step": 2}]


def test_sigkill_mid_run_then_resume_reproduces_the_uninterrupted_loss_curve(tiny_phi3, tmp_path):
    from M3DTrainingLib.jobs import Job

    # dropout stays ON (LoRA 0.05, seg projector 0.1): the RNG state must be restored for the curves to agree
    common = dict(dataset_kwargs={"size": 8, "masks": "half", "delay_s": 0.25}, per_device_batch_size=2,
                  max_steps=8, save_steps=2, learning_rate=1e-3, lr_scheduler="cosine", warmup_ratio=0.25)
    reference = Job.start(synthetic_config(tiny_phi3, tmp_path / "reference", **common), env=job_env())
    job = Job.start(synthetic_config(tiny_phi3, tmp_path / "killed", **common), env=job_env())

    running = wait_until(lambda: (s := job.status()).step is not None and s.step >= 5 and s, 240, "step 5")
    assert running.state == "running" and running.total_steps == 8 and running.loss > 0
    os.kill(job.pid, signal.SIGKILL)  # no chance to clean up or write a last event
    wait_until(lambda: not job.is_alive(), 30, "the killed process to end")
    status = job.status()
    assert status.state == "interrupted" and "resume" in status.message
    assert status.last_checkpoint_step in (4, 6)

    again = Job.reconnect(tmp_path / "killed")  # as a new Slicer session would
    assert again.status().state == "interrupted"
    again.resume()
    final = again.wait(timeout=240)
    assert final.state == "completed", (tmp_path / "killed" / "train.log").read_text()[-3000:]
    assert reference.wait(timeout=240).state == "completed"

    events = read_events(tmp_path / "killed")
    start = [e for e in events if e["stage"] == "start"][-1]
    resumed_from = start["details"]["resumed_from"]
    # the newest complete checkpoint (its progress event may have been cut off by the kill)
    assert resumed_from in (4, 6) and resumed_from >= status.last_checkpoint_step
    expected = train_losses(tmp_path / "reference")
    resumed = train_losses(tmp_path / "killed")
    assert list(expected) == list(range(1, 9))
    assert list(resumed) == list(range(resumed_from + 1, 9))
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, resumed, expected)
    # the first launch agreed with the reference too, up to the kill
    first = [e for e in events[: events.index(start)] if e["stage"] == "train"]
    assert len(first) >= 5 and all(e["loss"] == pytest.approx(expected[e["step"]], rel=1e-6) for e in first)

    from safetensors.torch import load_file

    for name in ("trainable.safetensors", "adapter_model.safetensors"):
        a = load_file(str(tmp_path / "reference" / "adapter" / name))
        b = load_file(str(tmp_path / "killed" / "adapter" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
    log = (tmp_path / "killed" / "train.log").read_text()
    assert log.count("launch:") == 2  # both launches' output kept


def test_cancel_kills_the_whole_accelerate_process_tree_and_reconnect_sees_it(tiny_phi3, tmp_path):
    from M3DAssistantLib.errors import ConfigError
    from M3DTrainingLib.jobs import Job

    config = synthetic_config(tiny_phi3, tmp_path / "run", num_processes=2, max_steps=50, per_device_batch_size=1,
                              dataset_kwargs={"size": 8, "delay_s": 1.0})
    job = Job.start(config, env=job_env())
    assert job.command[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"]

    def ranks():
        try:
            children = psutil.Process(job.pid).children(recursive=True)
            found = [c for c in children if "M3DTrainingLib.train" in " ".join(c.cmdline())]
        except psutil.Error:
            return None
        return children if len(found) >= 2 else None

    children = wait_until(ranks, 120, "the two ranks")
    tree = [psutil.Process(job.pid), *children]
    assert job.status().state == "running"
    with pytest.raises(ConfigError, match="already running"):
        Job.start(config, env=job_env())

    status = job.cancel(timeout=10)
    assert status.state == "cancelled"
    for proc in tree:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, proc

    reconnected = Job.reconnect(config.output_dir)
    assert reconnected.status().state == "cancelled"
    assert reconnected.pid == job.pid and not reconnected.is_alive()
    assert json.loads((Path(config.output_dir) / "job.json").read_text())["cancel_requested"] is True
    assert read_events(Path(config.output_dir))[-1]["stage"] == "cancelled"
    assert "launch:" in job.log_path.read_text()
