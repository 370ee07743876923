"""Training jobs: ``python -m M3DTrainingLib.train`` / ``accelerate launch … -m M3DTrainingLib.train`` as a detached
subprocess.

A job lives in its output folder (the run folder of :mod:`.config`), so a panel can close and reconnect later:

* ``job.json``         the state file: command, pid (+ its creation time, to survive pid reuse), launches, cancel flag;
* ``progress.jsonl``   one JSON object per line, written by the trainer (:mod:`.progress_log`): the fields of a
                       :class:`~M3DAssistantLib.progress.ProgressEvent` (stage, fraction, message) plus metrics
                       (step, epoch, loss, lr, samples_per_s, eta_s, gpu_memory_bytes, time);
* ``train.log``        stdout and stderr of every launch, appended (logs are kept);
* ``train_config.yaml``, ``checkpoints/``, ``adapter/`` from :mod:`.train`.

The trainer is launched by its module path; this module never imports :mod:`.train`. The process runs in its own
session / process group and does not inherit the launcher's console, so it keeps running when Slicer (or the shell)
closes. Cancel kills the whole process tree (accelerate's launcher and every rank) with psutil. Resume relaunches the
same command; the trainer continues from its newest checkpoint.

Only the standard library at import time; psutil is imported when a job's process is inspected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from M3DAssistantLib.errors import ConfigError, M3DError
from M3DAssistantLib.processes import describe_exit, kill_pid_tree, process_start_time, same_process_running
from M3DAssistantLib.progress import ProgressEvent

from .config import ADAPTER_DIR, CONFIG_FILE, LOG_FILE, PROGRESS_FILE, STATE_FILE, TrainConfig
from .progress_log import (
    CANCELLED_STAGE,
    DONE_STAGE,
    ERROR_STAGE,
    INTERRUPTED_STAGE,
    TERMINAL_STAGES,
    ProgressLog,
    record_interruption,
)
from .run_lock import TRAIN_ROLE, RunFolderBusyError, RunLock, describe_holder

LAUNCH_ROLE = "starting a training job"
LOCK_WAIT_S = 10.0  # for another launcher or a status check to let go; a running trainer is refused at once

TRAINER_MODULE = "M3DTrainingLib.train"
"""What a job runs with ``python -m`` (one process) or ``accelerate launch -m`` (several)."""


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """What a job is doing, from its state file, its process and its last progress events.

    ``state``: "running", "completed", "failed" (the trainer reported an error), "cancelled", or "interrupted"
    (the process ended without a final event: killed, machine rebooted, out of memory; resume continues it).
    """

    state: str
    message: str
    pid: Optional[int]
    step: Optional[int] = None
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    samples_per_s: Optional[float] = None
    eta_s: Optional[float] = None
    gpu_memory_bytes: Optional[int] = None
    last_checkpoint_step: Optional[int] = None

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Job:
    """A training run in ``output_dir``, started here or by an earlier session.

    Use :meth:`start` (a config), :meth:`reconnect` (an output folder), then :meth:`status`, :meth:`events`,
    :meth:`wait`, :meth:`cancel`, :meth:`resume`.
    """

    def __init__(self, output_dir: Union[str, Path], record: dict, process: Optional[subprocess.Popen] = None):
        self.output_dir = Path(output_dir)
        self.record = record
        self._process = process
        self._offset = 0

    # ------------------------------------------------------------------------------------------------- paths
    @property
    def state_path(self) -> Path:
        return self.output_dir / STATE_FILE

    @property
    def progress_path(self) -> Path:
        return self.output_dir / PROGRESS_FILE

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG_FILE

    @property
    def config_path(self) -> Path:
        return self.output_dir / CONFIG_FILE

    @property
    def pid(self) -> Optional[int]:
        return self.record.get("pid")

    @property
    def command(self) -> list[str]:
        return list(self.record["command"])

    # ------------------------------------------------------------------------------------------------ start
    @classmethod
    def start(
        cls,
        config: Union[TrainConfig, str, Path],
        *,
        python: Optional[str] = None,
        env: Optional[dict] = None,
    ) -> "Job":
        """Write ``config`` to ``OUTPUT_DIR/train_config.yaml`` and launch the trainer detached.

        One process: ``python -m M3DTrainingLib.train CONFIG`` (what ``m3d train`` runs). ``num_processes`` > 1 or
        an ``accelerate_config``: ``python -m accelerate.commands.launch … -m M3DTrainingLib.train CONFIG``
        (``accelerate launch``). ``python`` is the interpreter (default: this one); ``env`` adds variables.
        """
        if not isinstance(config, TrainConfig):
            config = TrainConfig.from_yaml(config)
        config = config.with_absolute_paths()  # the job runs in its output folder
        output_dir = Path(config.output_dir)
        if (output_dir / ADAPTER_DIR).exists():
            raise ConfigError(f"{output_dir} already holds a finished run; choose a new output_dir "
                              "(nothing is overwritten).")
        # Checking and launching under the folder's lock: two starts at once cannot both pass the check.
        with RunLock(output_dir).acquire(LAUNCH_ROLE, wait_s=LOCK_WAIT_S) as lock:
            if (output_dir / STATE_FILE).is_file():
                existing = cls.reconnect(output_dir)
                if existing.is_alive():
                    raise ConfigError(f"{output_dir}: a training job is already running there (pid {existing.pid}); "
                                      "cancel it or choose another output_dir.")
            _record_stale(lock)
            config_path = config.to_yaml(output_dir / CONFIG_FILE)
            command = build_command(config, config_path, python or sys.executable)
            record = {"version": 1, "output_dir": str(output_dir), "command": command, "env": dict(env or {}),
                      "launches": [], "cancel_requested": False}
            job = cls(output_dir, record)
            job._launch()
        return job

    @classmethod
    def reconnect(cls, output_dir: Union[str, Path]) -> "Job":
        """The job whose state file is in ``output_dir`` (it may be running, finished or dead)."""
        output_dir = Path(output_dir)
        path = output_dir / STATE_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise M3DError(f"{output_dir}: no training job here ({STATE_FILE} is missing).") from None
        except (OSError, ValueError) as e:
            raise M3DError(f"{path}: unreadable job state ({e}).") from e
        return cls(output_dir, record)

    def resume(self) -> "Job":
        """Relaunch the same command; the trainer resumes from the newest checkpoint. Refused while running."""
        if (self.output_dir / ADAPTER_DIR).exists():
            raise M3DError(f"{self.output_dir}: the run has finished (adapter written); nothing to resume.")
        with RunLock(self.output_dir).acquire(LAUNCH_ROLE, wait_s=LOCK_WAIT_S) as lock:
            if self.is_alive():
                raise M3DError(f"{self.output_dir}: the job is still running (pid {self.pid}); nothing to resume.")
            _record_stale(lock)
            self.record["cancel_requested"] = False
            self._launch()
        return self

    def _launch(self) -> None:
        env = dict(os.environ)
        env.update(self.record.get("env") or {})
        env["PYTHONUNBUFFERED"] = "1"
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS
                                       | subprocess.CREATE_NO_WINDOW)
        else:
            kwargs["start_new_session"] = True  # not in the launcher's process group: survives the terminal/Slicer
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n===== {stamp} launch: {' '.join(self.command)}\n".encode())
            log.flush()
            process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=str(self.output_dir), env=env, close_fds=True, **kwargs)
        self._process = process
        self.record["pid"] = process.pid
        self.record["create_time"] = process_start_time(process.pid)
        self.record["launches"].append({"pid": process.pid, "time": time.time()})
        self._write_record()

    def _write_record(self) -> None:
        # a temporary file of our own (two writers never share one), renamed over the state file
        fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", suffix=".tmp", dir=self.output_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.record, indent=2))
            os.replace(tmp, self.state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ----------------------------------------------------------------------------------------------- status
    def is_alive(self) -> bool:
        """Whether the launched process (the same one, not a reused pid) still runs."""
        if self._process is not None:
            return self._process.poll() is None
        pid = self.pid
        if pid is None:
            return False
        # a record without a start time never matches: its pid may belong to another process by now
        return same_process_running(pid, self.record.get("create_time") or 0)

    def events(self, new_only: bool = True) -> list[dict]:
        """Progress events (dicts); with ``new_only`` those since the previous call."""
        if not new_only:
            return ProgressLog.read(self.progress_path)[0]
        events, self._offset = ProgressLog.read(self.progress_path, self._offset)
        return events

    def status(self) -> JobStatus:
        events = ProgressLog.read(self.progress_path)[0]
        last_train = next((e for e in reversed(events) if e.get("stage") == "train"), {})
        last_checkpoint = next((e for e in reversed(events) if e.get("stage") == "checkpoint"), None)
        last = events[-1] if events else {}
        metrics = {k: last_train.get(k) for k in ("step", "total_steps", "epoch", "loss", "lr", "samples_per_s",
                                                   "eta_s", "gpu_memory_bytes")}
        metrics["last_checkpoint_step"] = last_checkpoint.get("step") if last_checkpoint else None
        alive = self.is_alive()
        if not alive and last.get("stage") not in TERMINAL_STAGES and self._record_end():
            return self.status()  # the end is in progress.jsonl now
        if alive:
            state, message = "running", last.get("message", "starting")
        elif self.record.get("cancel_requested"):
            state, message = "cancelled", "cancelled by the user; resume continues from the newest checkpoint"
        elif last.get("stage") == DONE_STAGE:
            state, message = "completed", last.get("message", "")
        elif last.get("stage") == ERROR_STAGE:
            state, message = "failed", f"{last.get('message', '')} (see {self.log_path})"
        elif last.get("stage") == INTERRUPTED_STAGE:
            state, message = "interrupted", f"{last.get('message', '')} (see {self.log_path})"
        else:
            returncode = self._process.returncode if self._process is not None else None
            why = f"exit status {returncode}" if returncode is not None else "no final progress event"
            state, message = "interrupted", (f"the training process ended without finishing ({why}: killed, out of "
                                             f"memory or a crash; see {self.log_path}); resume continues it")
        return JobStatus(state=state, message=message, pid=self.pid, **metrics)

    def _record_end(self) -> bool:
        """The process ended without a final event (killed, out of memory, machine stopped): say so in
        progress.jsonl, once, unless another process uses the folder now. Returns whether it wrote."""
        if self.record.get("cancel_requested") or not self.progress_path.is_file():
            return False
        returncode = self._process.returncode if self._process is not None else None
        why = describe_exit(returncode) if returncode is not None else "no final progress event"
        try:
            lock = RunLock(self.output_dir).acquire("record the end of a run")
        except (RunFolderBusyError, OSError):
            return False  # a new run holds the folder: it records the old one's end itself
        try:
            return record_interruption(self.progress_path, (
                f"the training process {self.pid} ended without finishing ({why}: killed, out of memory or a crash); "
                f"resume continues it from the newest checkpoint"))
        finally:
            lock.release()

    def wait(self, timeout: Optional[float] = None, poll_s: float = 0.5,
             on_event: Optional[Callable[[ProgressEvent], None]] = None) -> JobStatus:
        """Block until the job ends (or ``timeout``); ``on_event`` receives new progress events as they come."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.events():
                if on_event is not None:
                    on_event(ProgressEvent(event.get("stage", ""), event.get("fraction"), event.get("message", "")))
            if not self.is_alive():
                for event in self.events():
                    if on_event is not None:
                        on_event(ProgressEvent(event.get("stage", ""), event.get("fraction"),
                                               event.get("message", "")))
                return self.status()
            if deadline is not None and time.monotonic() > deadline:
                return self.status()
            time.sleep(poll_s)

    # ----------------------------------------------------------------------------------------------- cancel
    def cancel(self, timeout: float = 10.0) -> JobStatus:
        """Stop the job: terminate its whole process tree, then kill what is left after ``timeout`` seconds.

        Checkpoints and logs stay; :meth:`resume` continues from the newest checkpoint.
        """
        self.record["cancel_requested"] = True
        self._write_record()
        if self.is_alive():
            kill_pid_tree(self.pid, timeout)
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        ProgressLog(self.progress_path)(ProgressEvent(CANCELLED_STAGE, None, "cancelled by the user"))
        return self.status()


def _record_stale(lock: RunLock) -> None:
    """A trainer that died holding the lock (SIGKILL, out of memory) left its record: note its end."""
    if lock.stale is not None and lock.stale.get("role") == TRAIN_ROLE:
        record_interruption(lock.output_dir / PROGRESS_FILE, (
            f"the run of {describe_holder(lock.stale)} ended without a final event (killed, out of memory or the "
            f"machine stopped); resume continues it from the newest checkpoint"))


def build_command(config, config_path: Path, python: str) -> list[str]:
    """The trainer's command line: one process directly, several through ``accelerate launch``."""
    train = ["-m", TRAINER_MODULE, str(config_path)]
    if config.num_processes <= 1 and not config.accelerate_config:
        return [python, *train]
    launch = [python, "-m", "accelerate.commands.launch"]
    if config.accelerate_config:
        launch += ["--config_file", str(config.accelerate_config)]
        if config.num_processes > 1:
            launch += ["--num_processes", str(config.num_processes)]
    else:
        # torchrun-style launch of N local processes: one per GPU, or gloo CPU processes without a GPU
        launch += ["--multi_gpu", "--num_processes", str(config.num_processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"]
        launch += ["--main_process_port", str(_free_port())]
    return [*launch, *train]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running_jobs(folders: Sequence[Union[str, Path]]) -> list[Job]:
    """Jobs in ``folders`` whose process still runs (for a panel reopening after Slicer restarted)."""
    jobs = []
    for folder in folders:
        try:
            job = Job.reconnect(folder)
        except M3DError:
            continue
        if job.is_alive():
            jobs.append(job)
    return jobs
