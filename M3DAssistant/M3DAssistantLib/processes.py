"""Process trees: stop a process and every process it started, and say how a process ended.

Shared by the inference worker (:mod:`.worker`) and training jobs (``M3DTrainingLib``): ``PythonSlicer`` and
``accelerate launch`` are launchers that start the real Python as a child, so stopping only the process we started
would leave the model (and its GPU memory) running. psutil does the work; without it only the direct child of a
``Popen`` can be stopped. Standard library (and psutil when installed): Slicer's process imports this.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists (psutil; without it ``kill(pid, 0)`` on POSIX, and "yes" on Windows,
    where ``os.kill(pid, 0)`` would terminate the process)."""
    try:
        import psutil
    except ImportError:
        if os.name == "nt":
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, under another user
            return True
        return True
    return psutil.pid_exists(pid)


def process_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (psutil's ``create_time``), to tell it from a later process given the same pid;
    None without psutil or when it is gone."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # psutil missing, or the process is gone
        return None


def same_process_running(pid: int, start_time: Optional[float]) -> bool:
    """Whether ``pid`` still runs and is the process that started at ``start_time`` (within a second; None: any
    process with that pid), not a zombie. Without psutil only the pid can be checked (:func:`pid_exists`)."""
    try:
        import psutil
    except ImportError:
        return pid_exists(pid)
    try:
        process = psutil.Process(pid)
        if start_time is not None and abs(process.create_time() - float(start_time)) > 1.0:
            return False  # the pid was reused
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe_exit(code: Optional[int]) -> str:
    """A returncode in words: ``exit code 2``, ``killed by SIGKILL (often: out of memory)``."""
    if code is None:
        return "still running"
    if code < 0:  # POSIX: terminated by a signal
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often: the system ran out of memory)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    if code in (128 + 9, 128 + 15) and os.name != "nt":  # a shell launcher reports its child's signal this way
        return f"exit code {code} (killed{' by SIGKILL, often: out of memory' if code == 137 else ''})"
    return f"exit code {code}"


def kill_pid_tree(pid: int, timeout: float = 10.0, extra: Sequence[Any] = ()) -> None:
    """Terminate process ``pid`` and all its descendants, then kill what is left after ``timeout`` s (psutil).

    ``extra``: more psutil.Process objects to stop (e.g. a server whose launcher already exited)."""
    import psutil

    processes = []
    try:
        root = psutil.Process(pid)
        processes = root.children(recursive=True) + [root]  # children first: they are lost once root is gone
    except psutil.NoSuchProcess:
        pass
    known = {p.pid for p in processes}
    processes += [p for p in extra if p is not None and p.pid not in known]
    for process in processes:
        try:
            process.terminate()  # uvicorn shuts down cleanly on SIGTERM; Windows: TerminateProcess
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            logger.warning("not allowed to stop process %s", process.pid)
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5.0)


def kill_process_tree(popen: subprocess.Popen, timeout: float = 10.0, extra: Sequence[Any] = ()) -> None:
    """Terminate ``popen`` and all its descendants (see :func:`kill_pid_tree`) and reap it."""
    try:
        kill_pid_tree(popen.pid, timeout, extra)
    except ImportError:  # without psutil only the direct child can be stopped
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
    try:
        popen.wait(5.0)
    except subprocess.TimeoutExpired:
        logger.warning("process %s did not exit", popen.pid)


__all__ = ["describe_exit", "kill_pid_tree", "kill_process_tree", "pid_exists", "process_start_time",
           "same_process_running"]
