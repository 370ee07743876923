"""One training run per output folder (M3DTrainingLib/run_lock.py): the trainer holds an OS lock on
``OUTPUT_DIR/run.lock``; a second run -- foreground or a job, started at the same moment or later -- is refused at
once, naming the first one's process; the lock goes with the process on any exit, and a run that died without a word
(SIGKILL) or was stopped (SIGTERM) is recorded in ``progress.jsonl``. CPU, tiny checkpoint, synthetic dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytest.importorskip("peft")
psutil = pytest.importorskip("psutil")

from training_runs import job_env, read_events, subprocess_env, synthetic_config, wait_until  # noqa: E402

from M3DAssistantLib.errors import ConfigError  # noqa: E402
from M3DTrainingLib.run_lock import RunFolderBusyError, RunLock, holder_of  # noqa: E402

pytestmark = pytest.mark.skipif(os.name == "nt", reason="SIGKILL / SIGTERM semantics are POSIX here")

SLOW_RUN = dict(max_steps=6, save_steps=2, per_device_batch_size=2, dataset_kwargs={"size": 8, "delay_s": 0.3})


def _trainer(config_path: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "M3DTrainingLib.train", str(config_path), "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)


def _stages(folder: Path) -> list[str]:
    path = folder / "progress.jsonl"
    return [e["stage"] for e in read_events(folder)] if path.is_file() else []


def _complete_checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name.startswith("step-")
                  and (p / "model.safetensors").is_file())


def test_a_second_run_in_the_same_folder_is_refused_naming_the_first(tiny_phi3, tmp_path):
    """case: two training runs in one output folder (python -m M3DTrainingLib.train twice, or Job.start while it
    trains) -> the second is refused at once, naming the first's pid; the first finishes untouched (one progress
    stream, every checkpoint complete)"""
    from M3DTrainingLib.jobs import Job

    folder = tmp_path / "run"
    config = synthetic_config(tiny_phi3, folder, **SLOW_RUN)
    config_path = config.to_yaml(tmp_path / "config.yaml")
    first = _trainer(config_path, tmp_path / "first.log")
    try:
        wait_until(lambda: "train" in _stages(folder), 240, "the first run to train")
        second = subprocess.run([sys.executable, "-m", "M3DTrainingLib.train", str(config_path)], capture_output=True,
                                text=True, env=subprocess_env(), timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another training run is already running there: process {first.pid} (training" in second.stderr, (
            second.stderr)
        assert "Traceback" not in second.stderr
        with pytest.raises(ConfigError, match=f"already running there: process {first.pid}"):
            Job.start(config, env=job_env())  # the panel or m3d train --detach
        assert holder_of(folder)["pid"] == first.pid
        assert first.wait(240) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    stages = _stages(folder)
    assert stages.count("start") == 1 and "error" not in stages and stages[-1] == "done", stages
    steps = [e["step"] for e in read_events(folder) if e["stage"] == "train"]
    assert steps == list(range(1, 7))  # one run's steps, once each
    assert _complete_checkpoints(folder) == ["step-0000002", "step-0000004"]
    assert holder_of(folder) is None and (folder / "run.lock").read_bytes() == b""  # released, record emptied


def test_two_job_starts_at_once_launch_one_trainer(tiny_phi3, tmp_path):
    """Two Job.start calls racing on one folder: one job runs, the other is refused; job.json names the process
    that trains (so Cancel stops the right one); no stray temporary files."""
    from M3DTrainingLib.jobs import Job

    config = synthetic_config(tiny_phi3, tmp_path / "run", max_steps=2, save_steps=100, per_device_batch_size=2,
                              dataset_kwargs={"size": 4})
    barrier, results = threading.Barrier(2), []

    def start():
        barrier.wait()
        try:
            results.append(Job.start(config, env=job_env()))
        except Exception as e:  # collected: exactly one must be the refusal
            results.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    jobs = [r for r in results if isinstance(r, Job)]
    errors = [r for r in results if not isinstance(r, Job)]
    assert len(jobs) == 1 and len(errors) == 1, results
    assert isinstance(errors[0], ConfigError), repr(errors[0])
    assert "already running there" in str(errors[0]), errors[0]
    status = jobs[0].wait(timeout=240)
    assert status.state == "completed", (tmp_path / "run" / "train.log").read_text()[-3000:]
    assert json.loads((tmp_path / "run" / "job.json").read_text())["pid"] == jobs[0].pid
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []
    assert _stages(tmp_path / "run").count("start") == 1


def test_a_killed_run_is_recorded_and_its_lock_is_gone(tiny_phi3, tmp_path):
    """case: a training run killed with SIGKILL (no chance to write) -> its lock is released with it; the next run in
    the folder records in progress.jsonl that the killed process ended without finishing, then resumes"""
    folder = tmp_path / "run"
    config = synthetic_config(tiny_phi3, folder, resume=True, **SLOW_RUN)
    config_path = config.to_yaml(tmp_path / "config.yaml")
    first = _trainer(config_path, tmp_path / "train.log")
    wait_until(lambda: any(e.get("step", 0) >= 3 for e in read_events(folder) if e["stage"] == "train")
               if (folder / "progress.jsonl").is_file() else False, 240, "step 3")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    assert holder_of(folder) is None  # the OS released it with the process
    assert json.loads((folder / "run.lock").read_text())["pid"] == first.pid  # its record stays: a stale lock
    second = _trainer(config_path, tmp_path / "train.log")
    assert second.wait(240) == 0, (tmp_path / "train.log").read_text()[-3000:]
    events = read_events(folder)
    stages = [e["stage"] for e in events]
    assert stages.count("interrupted") == 1 and stages.count("start") == 2 and stages[-1] == "done", stages
    note = events[stages.index("interrupted")]
    assert stages.index("interrupted") < len(stages) - 1 - stages[::-1].index("start")  # before the second start
    assert f"process {first.pid}" in note["message"] and "ended without a final event" in note["message"]


def test_a_terminated_run_records_why_and_releases_the_folder(tiny_phi3, tmp_path):
    """case: a training run stopped with SIGTERM (shutdown, scheduler, cancel) -> 'stopped by SIGTERM' as the last
    line of progress.jsonl, the lock released, resume continues"""
    folder = tmp_path / "run"
    config_path = synthetic_config(tiny_phi3, folder, resume=True, **SLOW_RUN).to_yaml(tmp_path / "config.yaml")
    run = _trainer(config_path, tmp_path / "train.log")
    wait_until(lambda: "train" in _stages(folder), 240, "training")
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 1
    last = read_events(folder)[-1]
    assert last["stage"] == "error" and last["message"].startswith("stopped by SIGTERM"), last
    assert holder_of(folder) is None and (folder / "run.lock").read_bytes() == b""


def test_the_lock_itself(tmp_path):
    """Exclusive across processes, refused with the holder's pid, released by a crash of the holder, waited for
    while a launcher holds it for a moment."""
    script = textwrap.dedent("""
        import sys, time
        from M3DTrainingLib.run_lock import RunLock
        lock = RunLock(sys.argv[1]).acquire(sys.argv[2])
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
    """)
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), "train", "60"], stdout=subprocess.PIPE,
                              text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusyError, match=f"process {holder.pid} \\(training, started .*\\)") as busy:
            RunLock(tmp_path).acquire(wait_s=5)  # a trainer holds it: refused at once, not after 5 s
        assert busy.value.holder["pid"] == holder.pid
        holder.kill()
        holder.wait(10)
        lock = RunLock(tmp_path).acquire()
        assert lock.stale["pid"] == holder.pid  # what the dead holder left: the next holder records its end
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
    launcher = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), "starting a training job", "1.0"],
                                stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert launcher.stdout.readline().strip() == "held"
    start = time.monotonic()
    with RunLock(tmp_path).acquire(wait_s=30) as lock:  # waits for the launcher instead of refusing
        assert lock.held and time.monotonic() - start < 30
    launcher.wait(10)
