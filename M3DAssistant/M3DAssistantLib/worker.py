"""The local inference worker: ``m3d serve`` in a child process, started, watched, restarted and stopped from Slicer.

Slicer's own process never imports torch (see docs/architecture.md, "The process boundary"). The model runs in a
worker process started with Slicer's Python (``PythonSlicer``) or any other Python the user points to::

    python -u -m M3DAssistantLib.serving --host 127.0.0.1 --port 0 --parent-pid <Slicer's pid> --model ...

:class:`WorkerProcess` owns that process:

* **start** spawns it without blocking: a reader thread per pipe collects its output, and the one
  ``M3D_SERVER_READY {...}`` line on stdout says it listens (url, port, pid). ``start(wait=False)`` returns at once and
  the GUI polls :meth:`WorkerProcess.poll` from a QTimer; ``start(wait=True)`` blocks (scripts, background threads).
  A worker that exits before it is ready raises :class:`WorkerStartError` with the server's own error message (e.g.
  "no such folder"), not a timeout; the startup timeout only fires when the worker prints nothing at all for that
  long (a multi-GB download keeps printing progress, so it is not cut short).
* **token**: a random token is generated here and handed over in the environment (``$M3D_SERVER_TOKEN``), so it is
  neither on the command line (visible to other users) nor printed.
* **platforms**: ``subprocess.Popen`` with an argument list (paths with spaces are fine), a new session (POSIX) or a
  new process group without a console window (Windows) so Ctrl+C in Slicer's terminal does not reach the worker,
  and no POSIX-only calls.
* **stop** kills the whole process tree with psutil: ``PythonSlicer`` is a launcher that starts the real Python as a
  child, so killing only the process we started would leave the model (and its GPU memory) running. Workers are also
  stopped at interpreter exit (``atexit``), and the server itself exits when Slicer's process disappears
  (``--parent-pid``), so a crashed Slicer leaves nothing behind.
* **crash and restart**: :meth:`WorkerProcess.ensure_running` restarts a worker that died (reporting it through
  ``on_message`` and the log) and returns a fresh :class:`~M3DAssistantLib.serving.client.M3DClient`.
* **hung worker**: a heartbeat thread checks a ready worker every ``heartbeat_interval`` s -- is its process stopped
  by the OS (SIGSTOP, a debugger), does it answer ``GET /v1/health``. A stopped one, or one silent for
  ``hang_timeout`` s, is :attr:`WorkerState.HUNG`: the request waiting on it ends at once with
  :class:`WorkerHungError` saying why, and the next request kills and restarts it (a stopped process ignores SIGTERM).

:class:`~M3DAssistantLib.backends.LocalWorkerBackend` puts a worker behind the engine's task methods.

Standard library and psutil only (psutil is optional: without it only the direct child is killed, see
:mod:`.processes`). Runs inside Slicer's process; nothing here touches Qt or MRML.

Why this file is long: one process's whole life -- start, output readers, readiness, heartbeat, crash and hang
detection, restart, stop -- is one state machine under one lock; split, its transitions would be spread over modules.
"""

from __future__ import annotations

import atexit
import collections
import enum
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .errors import CancelledError, M3DError
from .processes import describe_exit, kill_process_tree
from .progress import ProgressCallback, ProgressEvent
from .serving.client import M3DClient
from .serving.protocol import TOKEN_ENV, parse_ready_line

logger = logging.getLogger(__name__)

MessageCallback = Callable[[str], None]

LIB_PARENT = Path(__file__).resolve().parent.parent
"""The folder that holds ``M3DAssistantLib``; put on the worker's PYTHONPATH so ``-m M3DAssistantLib.serving`` works
with any Python (Slicer adds it to its own ``sys.path`` only)."""

SERVER_ERROR_PREFIX = "m3d serve: error:"
_PERCENT_RE = re.compile(r"(\d{1,3})%\|")  # tqdm's bar: " 45%|####      | 3.2G/7.1G"


class WorkerError(M3DError):
    """The local M3D worker process could not be started or stopped working."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail  # the worker's last output lines, for a "details" box


class WorkerStartError(WorkerError):
    """The worker exited (or stalled) before it reported ready."""


class WorkerCrashedError(WorkerError):
    """The worker stopped after it was ready (crash, out of memory, killed)."""


class WorkerHungError(WorkerError):
    """The worker process runs but stopped responding (stopped, deadlocked): the request was abandoned."""


class WorkerState(enum.Enum):
    STOPPED = "stopped"  # never started, or stopped on purpose
    STARTING = "starting"  # process running, READY line not seen yet
    READY = "ready"  # listening; requests can be sent
    FAILED = "failed"  # exited before it was ready (see last_error)
    CRASHED = "crashed"  # exited after it was ready (see last_error)
    HUNG = "not responding"  # runs but missed its heartbeat (see last_error); restarted on the next request


class _Run:
    """One process started by a WorkerProcess, with its output readers (a new one per (re)start)."""

    def __init__(self, popen: subprocess.Popen, token: str, generation: int):
        self.popen = popen
        self.token = token
        self.generation = generation
        self.ready = threading.Event()
        self.info: Optional[dict[str, Any]] = None  # the READY line
        self.server_process: Any = None  # psutil.Process of the server when it is not the process we started
        self.stderr_tail: "collections.deque[str]" = collections.deque(maxlen=200)
        self.last_message = ""
        self.last_activity = time.monotonic()
        self.client: Optional[M3DClient] = None
        self.readers: list[threading.Thread] = []
        self.end_noted = False
        self.hung = False  # set by the heartbeat: the process runs but does not answer
        self.finished = threading.Event()  # the run was stopped or replaced: its heartbeat ends

    # -------------------------------------------------------------------------------------- readers (threads)
    def read_stdout(self) -> None:
        """Wait for the READY line; keep draining afterwards so the pipe never fills."""
        stream = self.popen.stdout
        assert stream is not None
        for raw in iter(stream.readline, b""):
            self.last_activity = time.monotonic()
            line = raw.decode("utf-8", "replace").strip()
            if self.ready.is_set() or not line:
                continue
            try:
                info = parse_ready_line(line)
            except ValueError:  # a READY prefix with broken JSON: keep it for the error message
                info = None
            if info is None:
                self.stderr_tail.append(line)
                continue
            self.info = info
            self.server_process = _server_process(info.get("pid"), self.popen.pid)
            self.ready.set()

    def read_stderr(self) -> None:
        """Keep the last lines (error messages) and the last progress text (tqdm redraws with ``\\r``)."""
        stream = self.popen.stderr
        assert stream is not None
        pending = ""
        while True:
            chunk = stream.read1(8192) if hasattr(stream, "read1") else stream.read(1)
            if not chunk:
                break
            self.last_activity = time.monotonic()
            pending += chunk.decode("utf-8", "replace")
            while True:
                match = re.search(r"[\r\n]", pending)
                if match is None:
                    break
                segment, separator, pending = pending[:match.start()], match.group(), pending[match.end():]
                segment = segment.rstrip()
                if segment:
                    self.last_message = segment
                    if separator == "\n":
                        self.stderr_tail.append(segment)
        if pending.strip():
            self.stderr_tail.append(pending.strip())
            self.last_message = pending.strip()

    def join_readers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.readers:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------------------------------------ state
    def alive(self) -> bool:
        if self.popen.poll() is not None:
            return False
        if self.server_process is not None:  # a launcher (PythonSlicer) may outlive the real server
            import psutil

            try:
                return self.server_process.is_running() and self.server_process.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False
            except psutil.AccessDenied:
                return True
        return True

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.stderr_tail)[-lines:])

    def failure_detail(self) -> str:
        """The most useful line of the worker's output: the server's own error message, else the end of a traceback
        ("" when it printed nothing but its start-up banner)."""
        tail = [line for line in self.stderr_tail if not _is_banner(line)]
        errors = [line for line in tail if line.startswith(SERVER_ERROR_PREFIX)]
        if errors:
            return errors[-1][len(SERVER_ERROR_PREFIX):].strip()
        return tail[-1] if tail else ""  # after a traceback: "SomeError: message"


def _process_stopped(process: Any) -> bool:
    """Whether the OS holds ``process`` (a psutil.Process) stopped: SIGSTOP, a debugger, job control."""
    try:
        import psutil

        return process is not None and process.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except Exception:  # psutil missing, or the process is gone (the exit is noticed elsewhere)
        return False


def _is_banner(line: str) -> bool:
    """The server's "m3d serve: MODEL on URL (protocol N); Ctrl+C to stop" line: says nothing about a failure."""
    return line.startswith("m3d serve: ") and line.endswith("Ctrl+C to stop")


def _server_process(pid: Any, launcher_pid: int) -> Any:
    """psutil.Process for the server when a launcher (PythonSlicer) started it as a child; None otherwise."""
    if not isinstance(pid, int) or pid == launcher_pid:
        return None
    try:
        import psutil

        return psutil.Process(pid)
    except Exception:  # psutil missing, or the process is already gone
        return None


_LIVE_WORKERS: "weakref.WeakSet[WorkerProcess]" = weakref.WeakSet()


def _stop_all_workers() -> None:
    """atexit: stop every worker this process started (Slicer exiting)."""
    for worker in list(_LIVE_WORKERS):
        try:
            worker.stop(timeout=3.0)
        except Exception:  # at exit, best effort: the server also watches our pid
            logger.debug("could not stop %r at exit", worker, exc_info=True)


atexit.register(_stop_all_workers)


class WorkerProcess:
    """One local ``m3d serve`` worker: start, watch, restart, stop. Thread-safe.

    Args:
        python_executable: the Python that runs the worker (default ``sys.executable``; in Slicer the module passes
            ``PythonSlicer``). Needs the inference packages (torch, transformers, fastapi, uvicorn, ...).
        model: HF hub id or local checkpoint folder (``--model``); None: the server's default.
        device, dtype, revision, clip_model: the server's ``--device``, ``--dtype``, ``--revision``, ``--clip-model``.
        extra_args: more ``m3d serve`` arguments (e.g. ``["--max-queue", "2"]``).
        env: environment changes for the worker (value None removes a variable), e.g. ``{"HF_HOME": "D:/hf"}``.
        startup_timeout: seconds the worker may stay silent before it reports ready (download and loading progress
            count as output); then it is stopped and :class:`WorkerStartError` raised.
        stop_timeout: seconds a stopping worker gets to exit cleanly before it is killed.
        client_timeout: the :class:`M3DClient` read timeout.
        heartbeat_interval: seconds between the liveness checks of a ready worker (``GET /v1/health``, and whether
            the OS holds its process stopped).
        hang_timeout: seconds of unanswered checks after which the worker counts as hung (:attr:`WorkerState.HUNG`):
            the request waiting on it ends with :class:`WorkerHungError` and the next request restarts it. A stopped
            process counts as hung at the first check.
        parent_pid: the server exits when this process does (default: this process).
        on_message: receives notices for the user (a crash and restart), from whichever thread noticed.

    Example::

        worker = WorkerProcess(model="/data/M3D-LaMed-Phi-3-4B", device="cpu")
        worker.start(wait=True)            # or start(wait=False) and poll() from a timer
        client = worker.client()           # M3DClient with the worker's URL and token
        ...
        worker.stop()                      # the whole process tree
    """

    def __init__(
        self,
        python_executable: Union[str, Path, None] = None,
        model: Union[str, Path, None] = None,
        *,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        revision: Optional[str] = None,
        clip_model: Union[str, Path, None] = None,
        extra_args: Sequence[str] = (),
        env: Optional[Mapping[str, Optional[str]]] = None,
        startup_timeout: float = 600.0,
        stop_timeout: float = 10.0,
        client_timeout: float = 600.0,
        heartbeat_interval: float = 2.0,
        hang_timeout: float = 30.0,
        parent_pid: Optional[int] = None,
        on_message: Optional[MessageCallback] = None,
    ):
        self.python_executable = str(python_executable or sys.executable)
        self.model = None if model is None else str(model)
        self.device, self.dtype, self.revision = device, dtype, revision
        self.clip_model = None if clip_model is None else str(clip_model)
        self.extra_args = [str(a) for a in extra_args]
        self.env = dict(env or {})
        self.startup_timeout = float(startup_timeout)
        self.stop_timeout = float(stop_timeout)
        self.client_timeout = float(client_timeout)
        self.heartbeat_interval, self.hang_timeout = float(heartbeat_interval), float(hang_timeout)
        self.parent_pid = os.getpid() if parent_pid is None else int(parent_pid)
        self.on_message = on_message
        self.restarts = 0  # restarts after a crash (not the first start, not a start after stop())
        self.last_error: Optional[str] = None  # why the last run failed or crashed
        self.last_log_tail = ""
        self._generation = 0
        self._run: Optional[_Run] = None
        self._lock = threading.RLock()
        _LIVE_WORKERS.add(self)

    def __repr__(self) -> str:
        return f"WorkerProcess(model={self.model!r}, state={self.poll().value})"

    # ------------------------------------------------------------------------------------------- the command
    def command(self) -> list[str]:
        """The worker's command line (no token: that goes through the environment)."""
        args = [self.python_executable, "-u", "-m", "M3DAssistantLib.serving", "--host", "127.0.0.1", "--port", "0",
                "--parent-pid", str(self.parent_pid)]
        for flag, value in (("--model", self.model), ("--device", self.device), ("--dtype", self.dtype),
                            ("--revision", self.revision), ("--clip-model", self.clip_model)):
            if value:
                args += [flag, str(value)]
        return args + self.extra_args

    def environment(self, token: str) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        paths = [str(LIB_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        env[TOKEN_ENV] = token
        return env

    # ------------------------------------------------------------------------------------------------- state
    @property
    def generation(self) -> int:
        """Increases with every (re)start: a backend compares it to know the worker lost its volumes."""
        return self._generation

    def poll(self) -> WorkerState:
        """The worker's state now (cheap; call it from a GUI timer). Notices a worker that exited."""
        with self._lock:
            run = self._run
            if run is None:
                return WorkerState.FAILED if self.last_error else WorkerState.STOPPED
            if run.alive():
                if run.hung:
                    return WorkerState.HUNG
                return WorkerState.READY if run.ready.is_set() else WorkerState.STARTING
            if not run.end_noted:
                run.end_noted = True
                try:  # a launcher exits right after its child: wait for it, its exit code says how the child ended
                    run.popen.wait(2.0)
                except subprocess.TimeoutExpired:  # the server died but the launcher lives on: clean up
                    kill_process_tree(run.popen, 2.0)
                run.join_readers(2.0)  # the last lines of output say why
                code = run.popen.poll()
                detail = run.failure_detail()
                if run.ready.is_set():
                    self.last_error = describe_exit(code) + (f"; last output: {detail}" if detail else "")
                else:
                    self.last_error = f"{detail or 'it printed nothing'} ({describe_exit(code)})"
                self.last_log_tail = run.log_tail()
            return WorkerState.CRASHED if run.ready.is_set() else WorkerState.FAILED

    state = property(poll)

    @property
    def ready(self) -> bool:
        return self.poll() is WorkerState.READY

    @property
    def pid(self) -> Optional[int]:
        """The server's process id (from its READY line; not the launcher's) while it runs, else None."""
        run = self._run
        if run is None or not run.ready.is_set() or run.info is None:
            return None
        return int(run.info.get("pid", run.popen.pid))

    @property
    def launcher_pid(self) -> Optional[int]:
        """The id of the process we started (PythonSlicer's launcher, or the server itself)."""
        run = self._run
        return None if run is None else run.popen.pid

    @property
    def url(self) -> Optional[str]:
        run = self._run
        return None if run is None or run.info is None else run.info.get("url")

    def log_tail(self, lines: int = 40) -> str:
        """The worker's last output lines (stderr), for error details."""
        run = self._run
        return run.log_tail(lines) if run is not None else self.last_log_tail

    def startup_progress(self) -> ProgressEvent:
        """What a starting worker is doing, from its output: ``download`` with a fraction when a download bar is
        showing, else ``load``."""
        run = self._run
        message = run.last_message if run is not None else ""
        match = _PERCENT_RE.search(message)
        if match:
            return ProgressEvent("download", min(int(match.group(1)), 100) / 100.0, message)
        return ProgressEvent("load", None, message or "starting the M3D worker")

    def status_text(self) -> str:
        """One line for a status label."""
        state = self.poll()
        if state is WorkerState.READY:
            return f"ready on {self.url} (process {self.pid})"
        if state is WorkerState.STARTING:
            run = self._run
            detail = run.last_message if run is not None and run.last_message else "loading the model"
            return f"starting (process {self.launcher_pid}): {detail}"
        if state is WorkerState.FAILED:
            return f"could not start: {self.last_error}"
        if state is WorkerState.CRASHED:
            return f"stopped unexpectedly: {self.last_error}"
        if state is WorkerState.HUNG:
            return f"not responding: {self.last_error}; it is restarted on the next request (or press Stop)"
        return "not running"

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self, wait: bool = False, timeout: Optional[float] = None) -> WorkerState:
        """Start the worker unless it is starting or running. ``wait=False`` returns at once (poll() to follow);
        ``wait=True`` returns when it is ready and raises :class:`WorkerStartError` if it is not."""
        with self._lock:
            run = self._run
            if run is None or not run.alive():
                if run is not None:
                    run.finished.set()
                    self._dispose(run)
                self._run = self._spawn()
        if wait:
            self.wait_ready(timeout)
        return self.poll()

    def _spawn(self) -> _Run:
        token = secrets.token_urlsafe(32)
        kwargs: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                                  "env": self.environment(token), "close_fds": True}
        if os.name == "nt":
            # Own process group (Ctrl+C in Slicer's console does not reach it) and no console window.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # own session: terminal signals meant for Slicer do not reach it
        command = self.command()
        self.last_error, self.last_log_tail = None, ""
        try:
            popen = subprocess.Popen(command, **kwargs)
        except OSError as e:
            self.last_error = (f"cannot run {self.python_executable!r} ({e.strerror or e}); choose an existing Python "
                               f"executable for the worker")
            raise WorkerStartError(f"The M3D worker could not start: {self.last_error}") from None
        self._generation += 1
        run = _Run(popen, token, self._generation)
        for name, target in (("stdout", run.read_stdout), ("stderr", run.read_stderr)):
            thread = threading.Thread(target=target, name=f"m3d-worker-{name}-{popen.pid}", daemon=True)
            thread.start()
            run.readers.append(thread)
        threading.Thread(target=self._heartbeat, args=(run,), name=f"m3d-worker-heartbeat-{popen.pid}",
                         daemon=True).start()
        logger.info("started the M3D worker (process %s): %s", popen.pid, " ".join(command))
        return run

    def wait_ready(self, timeout: Optional[float] = None, *, cancel_event: Optional[threading.Event] = None,
                   on_progress: Optional[ProgressCallback] = None) -> None:
        """Block until the worker is ready.

        Raises :class:`WorkerStartError` when it exits first (with its error message) or stays silent for
        ``timeout`` (default ``startup_timeout``) seconds; :class:`~M3DAssistantLib.errors.CancelledError` when
        ``cancel_event`` is set (the worker keeps starting). ``on_progress`` gets :meth:`startup_progress` events."""
        with self._lock:
            run = self._run
        if run is None:
            raise WorkerError("the M3D worker is not started; call start() first")
        stall = self.startup_timeout if timeout is None else float(timeout)
        last_message = None
        while not run.ready.wait(0.1):
            if self._run is not run:
                raise CancelledError("the M3D worker was stopped while it was starting")
            state = self.poll()
            if state is WorkerState.FAILED:
                raise WorkerStartError(f"The M3D worker could not start: {self.last_error}", self.last_log_tail)
            if cancel_event is not None and cancel_event.is_set():
                raise CancelledError("cancelled while the M3D worker was starting (it keeps starting in the "
                                     "background and is used by the next request)")
            if on_progress is not None and run.last_message != last_message:
                last_message = run.last_message
                on_progress(self.startup_progress())
            if time.monotonic() - run.last_activity > stall:
                detail = run.failure_detail() or "none"
                run.end_noted = True  # poll() must not replace the reason below by the exit code of our kill
                self._stop_run(run)
                self.last_error = f"no sign of progress for {stall:.0f} s (last output: {detail}); it was stopped"
                self.last_log_tail = run.log_tail()
                raise WorkerStartError(f"The M3D worker did not become ready: {self.last_error}", self.last_log_tail)
        state = self.poll()
        if state is not WorkerState.READY:  # ready, then died at once
            raise WorkerStartError(f"The M3D worker stopped right after starting: {self.last_error}",
                                   self.last_log_tail)

    def client(self) -> M3DClient:
        """The HTTP client of the running worker (one per run, reused)."""
        with self._lock:
            run = self._run
            if run is None or self.poll() is not WorkerState.READY or run.info is None:
                raise WorkerError(f"the M3D worker is not ready ({self.status_text()})")
            if run.client is None:
                run.client = M3DClient(run.info["url"], run.token, timeout=self.client_timeout)
            return run.client

    def current_client(self) -> Optional[M3DClient]:
        """The client of the current run whatever its state (to abort its waits), or None."""
        run = self._run
        return None if run is None else run.client

    # ---------------------------------------------------------------------------------------------- liveness
    def _heartbeat(self, run: _Run) -> None:
        """While ``run`` lives: every ``heartbeat_interval`` s, is its process stopped by the OS, does it answer
        ``/v1/health``? Hung when stopped, or after ``hang_timeout`` s of unanswered checks (their count, not the
        clock: a machine waking from sleep is not a hang)."""
        ping_timeout = max(1.0, min(5.0, self.hang_timeout / 3))
        pinger: Optional[M3DClient] = None
        failures = 0
        while not run.finished.wait(self.heartbeat_interval):
            if not run.ready.is_set() or run.info is None:
                continue
            if not run.alive():
                return
            process = run.server_process
            if process is None:
                try:
                    import psutil

                    process = psutil.Process(run.popen.pid)
                except Exception:  # psutil missing or the process gone
                    process = None
            if _process_stopped(process):
                why = (f"its process {process.pid} is stopped (SIGSTOP, a debugger, or job control); nothing it "
                       f"was doing continues")
            else:
                pinger = pinger or M3DClient(run.info["url"], run.token, connect_timeout=ping_timeout)
                try:
                    pinger.health()
                    failures = 0
                    continue
                except M3DError:
                    failures += 1
                silent = failures * (self.heartbeat_interval + ping_timeout)
                if silent < self.hang_timeout:
                    continue
                why = (f"it has not answered a health check for about {silent:.0f} s (deadlocked, or stuck in native "
                       f"code)")
            self._mark_hung(run, why)
            return

    def _mark_hung(self, run: _Run, why: str) -> None:
        with self._lock:
            if self._run is not run or run.hung:
                return
            run.hung = True
            self.last_error = why
            self.last_log_tail = run.log_tail()
        if run.client is not None:  # the request waiting on it ends now, saying why
            run.client.abort(WorkerHungError(
                f"The M3D worker stopped responding: {why}. Nothing was added to the scene; the worker is restarted "
                f"on the next request.", self.last_log_tail))
        self._notify(f"The M3D worker is not responding ({why}); it is restarted on the next request.")

    def ensure_running(self, *, cancel_event: Optional[threading.Event] = None,
                       on_progress: Optional[ProgressCallback] = None) -> M3DClient:
        """A client of a running worker: starts it if needed, and restarts it (reporting why) if it crashed or hung."""
        state = self.poll()
        if state is WorkerState.READY:
            return self.client()
        if state is WorkerState.HUNG:
            with self._lock:
                run = self._run
                if run is not None and self.poll() is WorkerState.HUNG:
                    self.restarts += 1
                    self._notify(f"The M3D worker was not responding ({self.last_error}); restarting it.")
                    run.end_noted = True  # its exit is our kill, not news
                    run.finished.set()
                    self._stop_run(run, timeout=1.0)  # a stopped process ignores SIGTERM: killed after 1 s
                    self._dispose(run)
                    self._run = self._spawn()
        elif state is WorkerState.CRASHED:
            with self._lock:
                if self.poll() is WorkerState.CRASHED:  # another thread may have restarted it meanwhile
                    self.restarts += 1
                    self._notify(f"The M3D worker stopped unexpectedly ({self.last_error}); restarting it.")
                    self.start(wait=False)
        else:
            self.start(wait=False)
        if on_progress is not None:
            on_progress(ProgressEvent("load", None, "starting the M3D worker and loading the model"))
        self.wait_ready(cancel_event=cancel_event, on_progress=on_progress)
        return self.client()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the worker and every process it started (the whole tree); returns when they are gone."""
        with self._lock:
            run, self._run = self._run, None
            self.last_error = None
        if run is not None:
            run.finished.set()
            self._stop_run(run, 1.0 if run.hung and timeout is None else timeout)
            self._dispose(run)
            logger.info("stopped the M3D worker (process %s)", run.popen.pid)

    def _stop_run(self, run: _Run, timeout: Optional[float] = None) -> None:
        kill_process_tree(run.popen, self.stop_timeout if timeout is None else timeout, extra=[run.server_process])

    @staticmethod
    def _dispose(run: _Run) -> None:
        run.join_readers(2.0)
        for stream in (run.popen.stdout, run.popen.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def _notify(self, message: str) -> None:
        logger.warning(message)
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception:  # a notice must not break the request that noticed
                logger.exception("on_message callback failed")


__all__ = ["WorkerProcess", "WorkerState", "WorkerError", "WorkerStartError", "WorkerCrashedError", "WorkerHungError",
           "LIB_PARENT"]
