"""One training run per output folder: an exclusive lock on ``OUTPUT_DIR/run.lock``, held by the process that trains.

Two runs in one folder corrupt each other (interleaved ``progress.jsonl``, one run deleting the other's checkpoints,
``job.json`` naming the wrong process), so the trainer takes this lock before it touches the folder and keeps it
until it exits; :class:`~.jobs.Job` takes it for the moment it checks the folder and launches a trainer. The lock is
the operating system's (``flock`` on POSIX, ``LockFileEx`` through ``msvcrt`` on Windows): it is released on ANY exit,
``kill -9`` and out-of-memory kills included, so a lock is never left held by a dead process.

The file also says who holds it (JSON: pid, role, start time, host, command line), for the refusal message, and is
emptied on a clean release. Content left behind means its writer died holding the lock: the next holder finds it
(:attr:`RunLock.stale`) and records the death in ``progress.jsonl`` (:func:`~.progress_log.record_interruption`).

Standard library only (psutil when installed, for process start times).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Optional, Union

from M3DAssistantLib.errors import ConfigError
from M3DAssistantLib.processes import process_start_time, same_process_running

from .config import LOCK_FILE

TRAIN_ROLE = "train"  # the trainer; other roles hold the lock for a moment (starting a job, recording an end)
_LOCK_OFFSET = 1 << 30  # Windows locks a byte range: far beyond the JSON, which stays readable


class RunFolderBusyError(ConfigError):
    """Another process holds the run folder's lock (a training run, or a job being started)."""

    def __init__(self, message: str, holder: Optional[dict]):
        super().__init__(message)
        self.holder = holder


def _try_lock(file: IO[bytes]) -> bool:
    if os.name == "nt":
        import msvcrt

        file.seek(_LOCK_OFFSET)
        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held elsewhere
        return False
    return True


def _unlock(file: IO[bytes]) -> None:
    if os.name == "nt":
        import msvcrt

        file.seek(_LOCK_OFFSET)
        msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def _read_holder(file: IO[bytes]) -> Optional[dict]:
    try:
        file.seek(0)
        raw = file.read(64 * 1024).split(b"\0", 1)[0].strip()
        holder = json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def process_alive(holder: dict) -> bool:
    """Whether the process a holder record names still runs (the same process: its start time matches)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    return same_process_running(pid, holder.get("create_time"))


def describe_holder(holder: Optional[dict]) -> str:
    """``process 1234 (training, started 2026-05-01 10:20:03 on host)``."""
    if not holder:
        return "another process"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    what = {TRAIN_ROLE: "training"}.get(str(holder.get("role")), str(holder.get("role") or "?"))
    return f"process {holder.get('pid')} ({what}, started {when} on {holder.get('host', '?')})"


class RunLock:
    """The exclusive lock of one run folder. Use :meth:`acquire` (it raises :class:`RunFolderBusyError` naming the
    holder) and :meth:`release`, or ``with RunLock(folder).acquire(role):``."""

    def __init__(self, output_dir: Union[str, Path]):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._file: Optional[IO[bytes]] = None
        self.stale: Optional[dict] = None  # what a process that died holding the lock left in the file

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self, role: str = TRAIN_ROLE, wait_s: float = 0.0) -> "RunLock":
        """Take the lock for ``role``. While another process holds it only for a moment (starting a job, recording
        an end), wait up to ``wait_s`` seconds; a training run holding it is refused at once."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+b")  # created if missing, never truncated before we hold it
        deadline = time.monotonic() + wait_s
        try:
            while not _try_lock(file):
                holder = _read_holder(file)
                if (holder or {}).get("role") == TRAIN_ROLE or time.monotonic() >= deadline:
                    raise RunFolderBusyError(self._busy_message(holder), holder)
                time.sleep(0.05)
        except BaseException:
            file.close()
            raise
        previous = _read_holder(file)
        self.stale = previous if previous and previous.get("pid") != os.getpid() else None
        record = {"pid": os.getpid(), "create_time": process_start_time(os.getpid()), "role": role,
                  "started": time.time(), "host": socket.gethostname(), "command": sys.argv[:8]}
        file.seek(0)
        file.truncate()
        file.write(json.dumps(record).encode("utf-8"))
        file.flush()
        self._file = file
        return self

    def _busy_message(self, holder: Optional[dict]) -> str:
        who = describe_holder(holder)
        if holder and not process_alive(holder):
            who += "; that process has ended but a process it started still holds the folder, wait a few seconds"
        return (f"{self.output_dir}: another training run is already running there: {who}. One run per output "
                f"folder: wait for it to finish, cancel it (the panel's Cancel, or stop process "
                f"{(holder or {}).get('pid', '?')}), or choose another output_dir.")

    def release(self) -> None:
        """Empty the holder record (a clean end) and unlock. Safe to call twice."""
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.seek(0)
            file.truncate()
            file.flush()
            _unlock(file)
        finally:
            file.close()

    def __enter__(self) -> "RunLock":
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder_of(output_dir: Union[str, Path]) -> Optional[dict]:
    """Who holds the run folder's lock now (its record), or None when nobody does. Takes the lock for a moment to
    find out, so call it where a None may start something (under your own lock, or for display only)."""
    path = Path(output_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, "rb") as file:
        if _try_lock(file):
            _unlock(file)
            return None
        return _read_holder(file) or {"pid": None, "role": "?"}


__all__ = ["RunFolderBusyError", "RunLock", "TRAIN_ROLE", "describe_holder", "holder_of", "process_alive"]
