"""Running the server for tests: ``m3d serve`` as a subprocess (as the Slicer module starts it) or the app in this
process (uvicorn in a thread). Both bind 127.0.0.1 only, and every wait is bounded."""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

from M3DAssistantLib.serving.server import parse_ready_line

START_TIMEOUT = 120.0


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def start_server_process(
    args: Sequence[str], env_extra: Optional[dict] = None, launcher: Sequence[str] = ()
) -> tuple[subprocess.Popen, dict, "queue.Queue[str]", str]:
    """Start ``python [LAUNCHER...] -m M3DAssistantLib.serving ARGS`` (``launcher``, e.g. an auditing wrapper, replaces
    ``-m``); wait for its ready line. Returns (process, ready line, remaining stdout lines, stderr file)."""
    stderr_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"m3d-serve-{os.getpid()}-{time.time_ns()}.err")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("M3D_SERVER_TOKEN", None)
    env.update(env_extra or {})
    command = [sys.executable, *(launcher or ["-m"]), "M3DAssistantLib.serving", *args]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            ready = parse_ready_line(lines.get(timeout=0.5).strip())
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if ready is not None:
            return proc, ready, lines, stderr_path
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"no ready line; stderr:\n{open(stderr_path).read()[-3000:]}")


def stop_server_process(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[tuple[str, int]]:
    """Serve ``app`` with uvicorn in a daemon thread on 127.0.0.1 (a free port); yields (url, port)."""
    import uvicorn

    from M3DAssistantLib.serving.connections import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, app.state.m3d.limits, log_level="warning"))  # as m3d serve runs
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30)
        port = sock.getsockname()[1]
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
