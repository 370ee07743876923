"""A hung local worker (worker.py heartbeat, backends.py cancel, client.abort): stopped with SIGSTOP it is marked
hung within a heartbeat, the request waiting on it ends at once with a message that says so, Cancel ends a wait at
once even when the worker does not answer, and the next request kills and restarts it. REAL worker processes on the
tiny checkpoint, 127.0.0.1 only; every stopped process is killed by the test."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")

from M3DAssistantLib import worker as worker_module  # noqa: E402
from M3DAssistantLib.backends import LocalWorkerBackend  # noqa: E402
from M3DAssistantLib.errors import CancelledError  # noqa: E402
from M3DAssistantLib.results import SamplingOptions, TextResult  # noqa: E402
from M3DAssistantLib.worker import WorkerHungError, WorkerProcess, WorkerState  # noqa: E402

pytestmark = pytest.mark.skipif(os.name == "nt", reason="SIGSTOP is POSIX")
SHORT = SamplingOptions(max_new_tokens=4)
LONG = SamplingOptions(max_new_tokens=400, min_new_tokens=400)


def _volume():
    rng = np.random.default_rng(0)
    return rng.normal(40, 60, size=(16, 32, 32)).clip(-1000, 1000).astype(np.int16), np.diag([0.8, 0.8, 2.5, 1.0])


def _in_thread(call):
    """Run ``call`` in a thread; returns (thread, outcome dict with 'result' or 'error' and 'seconds')."""
    outcome: dict = {}

    def run():
        start = time.monotonic()
        try:
            outcome["result"] = call()
        except BaseException as e:  # handed to the test
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.fixture
def worker(tiny_phi3):
    messages: list[str] = []
    worker = WorkerProcess(sys.executable, tiny_phi3, device="cpu", dtype="float32", startup_timeout=120,
                           heartbeat_interval=0.5, hang_timeout=3.0, on_message=messages.append)
    worker.messages = messages
    stopped: list[int] = []
    worker.stopped_pids = stopped
    yield worker
    for pid in stopped:  # never leave a stopped process behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.stop(timeout=2.0)


def _stop(worker) -> int:
    pid = worker.pid
    worker.stopped_pids.append(pid)
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_a_stopped_worker_is_marked_hung_its_request_ends_and_it_restarts(worker):
    """case: the local worker hangs (SIGSTOP) during a request -> marked hung by its heartbeat within a second, the
    request ends at once with WorkerHungError saying the process is stopped (not 'cancelled', not after the client
    timeout); the next request kills it and restarts a new worker"""
    backend = LocalWorkerBackend(worker)
    backend.set_volume(*_volume(), window="abdomen")
    assert isinstance(backend.report(sampling=SHORT), TextResult)
    pid = _stop(worker)
    thread, outcome = _in_thread(lambda: backend.report(sampling=SHORT))
    thread.join(15)
    assert not thread.is_alive(), "the request still waits on the hung worker"
    error = outcome.get("error")
    assert isinstance(error, WorkerHungError), outcome
    assert f"its process {pid} is stopped" in str(error) and "restarted on the next request" in str(error)
    assert outcome["seconds"] < 5
    assert worker.poll() is WorkerState.HUNG and not worker.ready
    assert worker.status_text().startswith(f"not responding: its process {pid} is stopped")
    assert any("not responding" in m for m in worker.messages)

    answer = backend.report(sampling=SHORT)  # restarts: the stopped process is killed, a new one answers
    assert isinstance(answer, TextResult) and worker.poll() is WorkerState.READY
    assert worker.pid != pid and worker.restarts == 1
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_cancel_ends_the_wait_at_once_even_when_the_worker_does_not_answer(worker, monkeypatch):
    """case: Cancel while the worker does not answer (hung, not yet detected) -> the request ends at once with
    CancelledError; the cancel the server never acknowledged is reported as such; the heartbeat then marks the worker
    hung from its unanswered health checks and the next request restarts it"""
    monkeypatch.setattr(worker_module, "_process_stopped", lambda process: False)  # a hang the OS does not show
    backend = LocalWorkerBackend(worker)
    backend.set_volume(*_volume(), window="abdomen")
    thread, outcome = _in_thread(lambda: backend.report(sampling=LONG))
    deadline = time.monotonic() + 30
    while not backend._client_for_task().active_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = _stop(worker)
    time.sleep(0.3)
    start = time.monotonic()
    backend.cancel()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - start < 2.0, outcome
    assert isinstance(outcome.get("error"), CancelledError), outcome

    deadline = time.monotonic() + 30  # 3 s of unanswered health checks
    while worker.poll() is not WorkerState.HUNG and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker.poll() is WorkerState.HUNG
    assert "has not answered a health check for about" in worker.last_error
    deadline = time.monotonic() + 20
    while backend.cancel_acknowledged is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backend.cancel_acknowledged is False  # the server never answered the cancel: not claimed

    assert isinstance(backend.report(sampling=SHORT), TextResult)
    assert worker.pid != pid and worker.restarts == 1


def test_cancel_of_a_responsive_worker_still_stops_it_on_the_server(worker):
    """The unforced twin: a worker that answers gets the cancel (acknowledged) and serves the next request without a
    restart."""
    backend = LocalWorkerBackend(worker)
    backend.set_volume(*_volume(), window="abdomen")
    thread, outcome = _in_thread(lambda: backend.report(sampling=LONG, on_text=lambda t: None))
    deadline = time.monotonic() + 30
    while not backend._client_for_task().active_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = worker.pid
    backend.cancel()
    thread.join(5)
    assert isinstance(outcome.get("error"), CancelledError), outcome
    deadline = time.monotonic() + 15
    while backend.cancel_acknowledged is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.cancel_acknowledged is True
    assert isinstance(backend.report(sampling=SHORT), TextResult)
    assert worker.pid == pid and worker.restarts == 0 and worker.poll() is WorkerState.READY
