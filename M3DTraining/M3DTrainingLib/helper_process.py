"""The short helper processes the panel starts (GPU query, memory estimate, evaluation, merge): started, then polled
from a Qt timer, never blocking Slicer. :class:`BackgroundCommand` runs one with its output in a temporary file,
a time limit and cancel (the whole process tree: PythonSlicer is a launcher). Only the standard library.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import time
from typing import Any, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """How a helper process ended: its exit status and its merged stdout/stderr."""

    returncode: Optional[int]
    output: str
    timed_out: bool = False
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.cancelled

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


def hidden_window_kwargs() -> dict[str, Any]:
    """No console window pops up for a helper process on Windows."""
    return {"creationflags": subprocess.CREATE_NO_WINDOW} if os.name == "nt" else {}


class BackgroundCommand:
    """A short-lived helper process whose output goes to a temporary file; :meth:`poll` never blocks.

    :param command: the command line
    :param env: its environment (default: this process's)
    :param timeout_s: killed after this many seconds (None: no limit)
    """

    def __init__(self, command: Sequence[str], *, env: Optional[dict] = None, cwd: Optional[PathLike] = None,
                 timeout_s: Optional[float] = None):
        self.command = [str(c) for c in command]
        self._output = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._output,
                                             stderr=subprocess.STDOUT, env=env, cwd=cwd, **hidden_window_kwargs())
        except OSError:
            self._output.close()
            raise
        self._deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        self._result: Optional[CommandResult] = None

    def poll(self) -> Optional[CommandResult]:
        """The result once the process has ended (or was killed for running too long), else None."""
        if self._result is not None:
            return self._result
        if self._process.poll() is None:
            if self._deadline is None or time.monotonic() < self._deadline:
                return None
            self._stop()
            return self._finish(timed_out=True)
        return self._finish()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> CommandResult:
        """Block until :meth:`poll` has a result; after ``timeout`` seconds the process is cancelled."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.poll()
            if result is not None:
                return result
            if end is not None and time.monotonic() > end:
                return self.cancel()
            time.sleep(interval)

    def cancel(self) -> CommandResult:
        if self._result is None:
            self._stop()
            self._finish(cancelled=True)
        return self._result

    def _stop(self) -> None:
        try:  # PythonSlicer is a launcher: the real Python is its child, so the whole tree is stopped
            from M3DAssistantLib.processes import kill_pid_tree

            kill_pid_tree(self._process.pid, timeout=5.0)
        except ImportError:  # psutil missing
            self._process.kill()
        try:
            self._process.wait(5.0)
        except subprocess.TimeoutExpired:
            pass

    def _finish(self, timed_out: bool = False, cancelled: bool = False) -> CommandResult:
        self._output.seek(0)
        text = self._output.read().decode("utf-8", errors="replace")
        self._output.close()
        self._result = CommandResult(self._process.returncode, text, timed_out, cancelled)
        return self._result
