"""The local worker's lifecycle with REAL subprocesses (``python -m M3DAssistantLib.serving`` on the tiny checkpoint):
start, reuse across requests, crash (kill -9) -> restart on the next request, a request running when the worker dies,
cancel, stop kills the whole process tree, startup failures give the server's own message (not a timeout).

The POSIX-only parts use a shell launcher that starts Python as a *child* (as Slicer's ``PythonSlicer`` launcher
does), so killing only the process we started would not be enough. Every server binds 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")

from M3DAssistantLib.backends import LocalWorkerBackend  # noqa: E402
from M3DAssistantLib.errors import CancelledError  # noqa: E402
from M3DAssistantLib.processes import describe_exit  # noqa: E402
from M3DAssistantLib.results import SamplingOptions, TextResult  # noqa: E402
from M3DAssistantLib.serving.server import TOKEN_ENV  # noqa: E402
from M3DAssistantLib.worker import (  # noqa: E402
    LIB_PARENT,
    WorkerCrashedError,
    WorkerProcess,
    WorkerStartError,
    WorkerState,
)

SHORT = SamplingOptions(max_new_tokens=6)
LONG = SamplingOptions(max_new_tokens=400, min_new_tokens=400)  # several seconds on the tiny model: only interrupted
posix_only = pytest.mark.skipif(os.name == "nt", reason="the launcher stand-in is a POSIX shell script")


def small_volume() -> tuple[np.ndarray, np.ndarray]:
    """A 24x48x40 CT-like int16 volume (K, J, I) with 0.8 x 0.8 x 2.5 mm voxels."""
    rng = np.random.default_rng(0)
    array = rng.normal(40, 60, size=(24, 48, 40)).clip(-1000, 1000).astype(np.int16)
    ijk_to_ras = np.diag([-0.8, -0.8, 2.5, 1.0])
    ijk_to_ras[:3, 3] = (10.0, 20.0, -30.0)
    return array, ijk_to_ras


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def gone(process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def write_launcher(folder: Path, body: str) -> Path:
    """An executable shell script in a folder whose name has spaces."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Python Slicer"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def launcher(tmp_path) -> Path:
    """Like PythonSlicer: starts the real Python as a child (no exec) and waits for it. Windows: Python itself."""
    if os.name == "nt":
        return Path(sys.executable)
    return write_launcher(tmp_path / "Slicer 5.12" / "bin", f'"{sys.executable}" "$@"')


# ---------------------------------------------------------------------------------------------------------------------
# the whole lifecycle with one real worker (each start costs seconds: torch and the model are loaded)
# ---------------------------------------------------------------------------------------------------------------------


def test_worker_lifecycle_start_reuse_crash_restart_cancel_stop(tiny_phi3, launcher):
    messages, progress, chunks = [], [], []
    worker = WorkerProcess(launcher, tiny_phi3, device="cpu", dtype="float32", startup_timeout=120,
                           on_message=messages.append)
    backend = LocalWorkerBackend(worker, on_progress=progress.append)
    array, ijk_to_ras = small_volume()
    try:
        # -- lazy start on the first request, reuse afterwards
        assert worker.poll() is WorkerState.STOPPED and worker.pid is None  # nothing runs before a request
        backend.set_volume(array, ijk_to_ras, window="abdomen")  # starts the worker, uploads the volume
        first = backend.report(sampling=SHORT)
        assert isinstance(first, TextResult) and first.text.strip()
        assert worker.poll() is WorkerState.READY and worker.url.startswith("http://127.0.0.1:")
        pid, launcher_pid = worker.pid, worker.launcher_pid
        if os.name != "nt":  # the server is the launcher's child, as with PythonSlicer
            assert pid != launcher_pid and psutil.Process(pid).ppid() == launcher_pid
        stages = {event.stage for event in progress}
        assert {"load", "upload", "generate"} <= stages, stages

        second = backend.ask("Is there a lesion?", sampling=SHORT, on_text=chunks.append)
        assert "".join(chunks) == second.text  # streamed
        assert (worker.pid, worker.generation, worker.restarts) == (pid, 1, 0)  # reused, not restarted

        # -- kill -9 while idle: noticed, and the next request restarts it and sends the volume again
        psutil.Process(pid).kill()
        wait_for(lambda: worker.poll() is WorkerState.CRASHED, 15, "the crash to be noticed")
        assert "SIGKILL" in worker.last_error, worker.last_error
        assert worker.status_text() == f"stopped unexpectedly: {worker.last_error}"
        third = backend.report(sampling=SHORT)
        assert third.text == first.text  # same volume, same window, greedy: the restarted worker got it all
        assert worker.pid not in (None, pid) and (worker.generation, worker.restarts) == (2, 1)
        assert len(messages) == 1 and "stopped unexpectedly" in messages[0] and "restarting" in messages[0]

        # -- through the session on MRML (as the module runs it): cancel, then a crash during a request
        slicer = _slicer_core()
        if slicer is not None:
            _session_cancel_and_crash(slicer, worker)
            assert (worker.generation, worker.restarts) == (3, 2)

        # -- stop kills the whole process tree
        tree = [psutil.Process(worker.launcher_pid)] + psutil.Process(worker.launcher_pid).children(recursive=True)
        assert worker.pid in {p.pid for p in tree}
        worker.stop()
        assert all(gone(p) for p in tree), [p for p in tree if not gone(p)]
        assert worker.poll() is WorkerState.STOPPED and worker.pid is None
    finally:
        worker.stop()


def _slicer_core():
    try:
        import slicer
        from conftest import make_headless_slicer
    except ImportError:
        return None
    _slicer_core.keepalive = make_headless_slicer()
    return slicer


def _session_cancel_and_crash(slicer, worker: WorkerProcess) -> None:
    from M3DAssistantLib.session import AssistantSession

    scene = slicer.mrmlScene
    array, ijk_to_ras = small_volume()
    volume = slicer.util.addVolumeFromArray(array, ijkToRAS=ijk_to_ras, name="ct")
    session = AssistantSession(LocalWorkerBackend(worker), sampling=SHORT, window="abdomen")

    def text_nodes() -> int:
        return scene.GetNumberOfNodesByClass("vtkMRMLTextNode")

    node, result = session.report(volume)
    assert node.IsA("vtkMRMLTextNode") and result.text.strip() in node.GetText()
    pid, before = worker.pid, text_nodes()

    # Cancel stops the answer, not the worker.
    started = threading.Event()
    pending = session.report(volume, sampling=LONG, on_text=lambda text: started.set(), wait=False)
    assert started.wait(60)
    pending.cancel()
    assert pending.wait(30)
    with pytest.raises(CancelledError):
        pending.result()
    assert worker.pid == pid and text_nodes() == before

    # The worker dies while answering: a clear error and no node; the next request restarts it.
    started.clear()
    pending = session.report(volume, sampling=LONG, on_text=lambda text: started.set(), wait=False)
    assert started.wait(60)
    psutil.Process(pid).kill()
    assert pending.wait(30)
    with pytest.raises(WorkerCrashedError, match="stopped while answering") as error:
        pending.result()
    assert "SIGKILL" in str(error.value) and "Nothing was added to the scene" in str(error.value)
    assert text_nodes() == before

    answer, result = session.ask(volume, "Where is the liver?")
    assert isinstance(answer, str) and answer == result.text
    assert worker.pid not in (None, pid)


# ---------------------------------------------------------------------------------------------------------------------
# startup failures
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_model_path_gives_the_servers_message_not_a_timeout(tmp_path):
    missing = tmp_path / "no such checkpoint"
    worker = WorkerProcess(None, missing, device="cpu", startup_timeout=300)
    try:
        started = time.monotonic()
        assert worker.start(wait=False) is WorkerState.STARTING  # the GUI path: returns at once ...
        assert time.monotonic() - started < 5
        wait_for(lambda: worker.poll() is not WorkerState.STARTING, 120, "the worker to fail")  # ... and polls
        assert worker.poll() is WorkerState.FAILED
        assert time.monotonic() - started < 120  # its own exit, far before the 300 s startup timeout
        assert "no such folder" in worker.last_error and str(missing) in worker.last_error
        assert "exit code 2" in worker.last_error
        assert worker.status_text().startswith("could not start: ")
    finally:
        worker.stop()
    assert worker.poll() is WorkerState.STOPPED


@posix_only
def test_a_request_on_a_worker_that_cannot_start_raises_its_message(tmp_path):
    """The blocking path (scripts, the session's thread): a fake server that fails at once, as the real one does."""
    failing = write_launcher(tmp_path / "failing", 'echo "loading..." >&2; '
                                                   'echo "m3d serve: error: /x: no such folder. Pass a folder." >&2; '
                                                   "exit 2")
    backend = LocalWorkerBackend(WorkerProcess(failing, "/x", startup_timeout=60))
    with pytest.raises(WorkerStartError, match="could not start: /x: no such folder. Pass a folder. "
                                               r"\(exit code 2\)") as error:
        backend.report(sampling=SHORT)
    assert "loading..." in error.value.log_tail
    with pytest.raises(WorkerStartError, match="no such folder"):  # and again on the next request (not stuck)
        backend.ask("anything?")


def test_missing_python_is_a_clear_error(tmp_path):
    worker = WorkerProcess(tmp_path / "no python here" / "python", "any")
    with pytest.raises(WorkerStartError, match="cannot run"):
        worker.start(wait=True)
    assert worker.poll() is WorkerState.FAILED and "choose an existing Python" in worker.last_error


@posix_only
def test_a_silent_worker_times_out_and_its_tree_is_killed(tmp_path):
    silent = write_launcher(tmp_path / "silent", "sleep 60 & wait")
    worker = WorkerProcess(silent, "any", startup_timeout=1.0)
    worker.start(wait=False)
    root = psutil.Process(worker.launcher_pid)
    wait_for(lambda: root.children(), 5, "the launcher's child")
    tree = [root] + root.children(recursive=True)
    with pytest.raises(WorkerStartError, match="no sign of progress for 1 s"):
        worker.wait_ready()
    assert all(gone(p) for p in tree)

    cancel = threading.Event()
    cancel.set()
    worker = WorkerProcess(silent, "any", startup_timeout=30)
    try:
        worker.start(wait=False)
        with pytest.raises(CancelledError, match="keeps starting"):
            worker.wait_ready(cancel_event=cancel)
        assert worker.poll() is WorkerState.STARTING  # cancel stops the wait, not the worker

        errors = []  # Stop pressed while a request waits for the worker: the wait ends at once
        waiter = threading.Thread(target=lambda: errors.append(pytest.raises(CancelledError, worker.wait_ready)))
        waiter.start()
        time.sleep(0.3)
        worker.stop()
        waiter.join(10)
        assert not waiter.is_alive() and "stopped while it was starting" in str(errors[0].value)
    finally:
        worker.stop()
    assert worker.poll() is WorkerState.STOPPED


@posix_only
def test_workers_are_stopped_when_the_python_process_exits(tmp_path):
    silent = write_launcher(tmp_path / "silent", "sleep 60 & wait")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(LIB_PARENT)!r})
        from M3DAssistantLib.worker import WorkerProcess
        worker = WorkerProcess({str(silent)!r}, "any")
        worker.start(wait=False)
        print(worker.launcher_pid, flush=True)
        """)  # exits without stop(): atexit must clean up
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[0])
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
             "the worker to be stopped at exit")


# ---------------------------------------------------------------------------------------------------------------------
# small parts
# ---------------------------------------------------------------------------------------------------------------------


def test_command_and_environment_keep_the_token_off_the_command_line():
    worker = WorkerProcess("/opt/Slicer 5.12/bin/PythonSlicer", "/data/my model", device="cuda", dtype="bfloat16",
                           clip_model="/data/clip", extra_args=["--max-queue", "2"],
                           env={"HF_HOME": "/big disk/hf", "HF_HUB_OFFLINE": None}, parent_pid=4242)
    command = worker.command()
    assert command[:4] == ["/opt/Slicer 5.12/bin/PythonSlicer", "-u", "-m", "M3DAssistantLib.serving"]
    for pair in (["--host", "127.0.0.1"], ["--port", "0"], ["--parent-pid", "4242"], ["--model", "/data/my model"],
                 ["--device", "cuda"], ["--dtype", "bfloat16"], ["--clip-model", "/data/clip"]):
        i = command.index(pair[0])
        assert command[i:i + 2] == pair
    assert command[-2:] == ["--max-queue", "2"]
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        env = worker.environment("secret-token")
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert env[TOKEN_ENV] == "secret-token" and not any("secret-token" in arg for arg in command)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(LIB_PARENT)
    assert (LIB_PARENT / "M3DAssistantLib" / "serving" / "__main__.py").is_file()  # what -m runs
    assert env["HF_HOME"] == "/big disk/hf" and "HF_HUB_OFFLINE" not in env
    assert worker.poll() is WorkerState.STOPPED and worker.status_text() == "not running"


def test_exit_descriptions_and_startup_progress():
    assert describe_exit(2) == "exit code 2"
    assert describe_exit(None) == "still running"
    if os.name != "nt":
        assert describe_exit(-9).startswith("killed by SIGKILL") and "memory" in describe_exit(-9)
        assert describe_exit(-15) == "killed by SIGTERM"
        assert "SIGKILL" in describe_exit(137)
    worker = WorkerProcess(None, "x")
    assert worker.startup_progress().stage == "load"


def test_pid_exists_with_and_without_psutil(monkeypatch):
    """The one liveness check the server's parent watch and the training run lock use: a running process exists, a
    finished one does not, with psutil and through the kill(pid, 0) fallback."""
    import builtins
    import subprocess
    import sys

    from M3DAssistantLib.processes import pid_exists

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    assert pid_exists(os.getpid()) and not pid_exists(child.pid)  # psutil
    monkeypatch.setattr(builtins, "__import__", no_psutil)
    assert pid_exists(os.getpid()) and not pid_exists(child.pid)  # kill(pid, 0)


def test_same_process_running_tells_a_reused_pid_apart():
    """The check training jobs and the run lock share: the pid runs and started when recorded (None: any start)."""
    import subprocess
    import sys

    from M3DAssistantLib.processes import process_start_time, same_process_running

    me, started = os.getpid(), process_start_time(os.getpid())
    assert started is not None
    assert same_process_running(me, started) and same_process_running(me, None)
    assert not same_process_running(me, started - 3600.0)  # another process that had this pid earlier
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not same_process_running(child.pid, None) and process_start_time(child.pid) is None
