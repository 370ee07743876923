"""Backends: the engine's task methods answered by an M3D server, so that an
:class:`~M3DAssistantLib.session.AssistantSession` uses a server as it uses an in-process
:class:`~M3DAssistantLib.engine.InferenceEngine`.

* :class:`ClientBackend`: a remote server, through its :class:`~M3DAssistantLib.serving.client.M3DClient` (no process
  to manage);
* :class:`LocalWorkerBackend`: a local :class:`~M3DAssistantLib.worker.WorkerProcess`, started lazily on the first
  request, reused across prompts and volumes, and restarted on the next request after a crash or a hang (the volume
  is sent again automatically). A request that was running when the worker died raises
  :class:`~M3DAssistantLib.worker.WorkerCrashedError`; the session writes nodes only after a successful result, so
  nothing half-written reaches the scene.

Both add server-side progress (``on_progress``) and a cancel that may come from any thread and ends the wait at once
(the client's connections are shut; the server is told in the background), even when the server does not respond.
Their task methods are made from the task registry (:data:`~M3DAssistantLib.tasks.STREAMING_TASKS`), with the
engine's signatures. Standard library only; runs inside Slicer's process.
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any, Callable, Optional

from .errors import CancelledError, M3DError
from .progress import ProgressCallback, ProgressEvent, report_progress
from .serving.client import M3DClient, ServerUnavailableError
from .tasks import STREAMING_TASKS, Task
from .worker import WorkerCrashedError, WorkerError, WorkerProcess, WorkerState


class ClientBackend:
    """The engine's task methods (what :class:`~M3DAssistantLib.session.AssistantSession` calls) answered by an
    :class:`M3DClient`, e.g. of a remote server. Adds server-side progress: ``on_progress`` receives
    :class:`~M3DAssistantLib.progress.ProgressEvent` (from the request's thread)."""

    def __init__(self, client: Optional[M3DClient] = None, *, on_progress: Optional[ProgressCallback] = None):
        self._fixed_client = client
        self.on_progress = on_progress
        self._cancel = threading.Event()
        self._busy = 0  # calls in progress: a cancel outside a call is ignored (it must not hit the next request)
        self._busy_lock = threading.Lock()
        self.cancel_acknowledged: Optional[bool] = None  # whether the server answered the last cancel

    # ------------------------------------------------------------------------------------------ plumbing
    def _client_for_task(self) -> M3DClient:
        if self._fixed_client is None:
            raise WorkerError("no M3D server client")
        return self._fixed_client

    def _call(self, work: Callable[[], Any], check_after: bool = False) -> Any:
        """Run one backend call, honouring a cancel that arrives before the server has the request
        (``check_after``: also one that arrived during the call, e.g. while a volume was uploaded)."""
        with self._busy_lock:
            self._busy += 1
        try:
            result = work()
            if check_after:
                self._check_cancel()
            return result
        finally:
            with self._busy_lock:
                self._busy -= 1
                if self._busy == 0:
                    self._cancel.clear()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise CancelledError("cancelled")

    def _progress(self, event: ProgressEvent) -> None:
        if self.on_progress is not None:
            self.on_progress(event)

    def _run_task(self, task: Task, arguments: tuple, sampling: Any, on_text: Any, analysis: Any = None) -> Any:
        client = self._client_for_task()
        self._check_cancel()
        return client.run_task(task, *arguments, sampling=sampling, on_text=on_text, on_progress=self._progress,
                               **_analysis(analysis))

    def _send_volume(self, array_kji: Any, ijk_to_ras: Any, options: dict[str, Any]) -> Any:
        client = self._client_for_task()
        self._check_cancel()
        report_progress(self.on_progress, "upload", None, "sending the volume")
        return client.set_volume(array_kji, ijk_to_ras, **options)

    def _send_display(self, display_window: Any, modality: Any) -> None:
        self._client_for_task().set_display(display_window, modality)

    def _run_selfcheck(self, options: dict[str, Any]) -> Any:
        client = self._client_for_task()
        self._check_cancel()
        return client.selfcheck(on_progress=self._progress, **options)

    def _run_retrieve(self, kwargs: dict) -> Any:
        client = self._client_for_task()
        self._check_cancel()
        report_progress(self.on_progress, "encode", None, "ranking with M3D-CLIP")
        return client.retrieve(**kwargs)

    # --------------------------------------------------------------------------------------- engine methods
    # The task methods (report, ask, ..., one per streaming task of the registry) are added below the class by
    # _task_method, with the engine's signatures; info, set_volume, retrieve and cancel are here.
    def info(self) -> dict[str, Any]:
        return self._call(lambda: self._client_for_task().info())

    def set_volume(self, array_kji: Any, ijk_to_ras: Any, *, window: Any = None, roi: Any = None,
                   display_window: Any = None, modality: Any = None) -> Any:
        options = {"window": window, "roi": roi, "display_window": display_window, "modality": modality}
        return self._call(lambda: self._send_volume(array_kji, ijk_to_ras, options), check_after=True)

    def set_display(self, display_window: Any = None, modality: Any = None) -> None:
        """The current volume's display window and modality changed (``InferenceEngine.set_display``): they go with
        the next requests; the voxels are not sent again."""
        self._call(lambda: self._send_display(display_window, modality))

    def retrieve(self, **kwargs: Any) -> Any:
        return self._call(lambda: self._run_retrieve(kwargs))

    def selfcheck(self, *, conventions: str = "default", max_new_tokens: int = 64, structures: Any = None) -> Any:
        """``m3d selfcheck`` in the server (``M3DClient.selfcheck``), with its progress on ``on_progress``."""
        options = {"conventions": conventions, "max_new_tokens": max_new_tokens, "structures": structures}
        return self._call(lambda: self._run_selfcheck(options))

    def cancel(self) -> None:
        """Stop the running request (from any thread, without waiting: the GUI calls it). The wait ends at once -- the
        request raises CancelledError even when the server does not respond -- and the server is told to stop the
        request at its next decoding step, in the background; the worker keeps running."""
        with self._busy_lock:
            busy = self._busy
            if busy:
                self._cancel.set()
        client = self._current_client()
        if client is None:
            return
        request_ids = client.active_requests()
        if busy:
            client.abort(CancelledError("cancelled"))
        threading.Thread(target=self._cancel_on_server, args=(client, request_ids), name="m3d-cancel",
                         daemon=True).start()

    def _cancel_on_server(self, client: M3DClient, request_ids: list[str]) -> None:
        try:
            client.cancel(request_ids=request_ids)
            self.cancel_acknowledged = True
        except M3DError:  # nothing to cancel, or the server is gone or hung: the request already ended here
            self.cancel_acknowledged = False

    def _current_client(self) -> Optional[M3DClient]:
        return self._fixed_client

    def close(self) -> None:
        """Nothing to release for a remote server (it is not ours to stop)."""


def _analysis(analysis: Any) -> dict[str, Any]:
    """``analysis=`` for the client only when given (a client of the plain task never sees the keyword)."""
    return {"analysis": analysis} if analysis is not None else {}


def _task_method(task: Task) -> Callable[..., Any]:
    """``backend.<task>(arguments..., *, sampling=None, on_text=None, analysis=None)``: the engine's method of
    ``task`` (same arguments, by position or name), answered by the backend's client."""
    parameter = inspect.Parameter
    signature = inspect.Signature(
        [parameter("self", parameter.POSITIONAL_OR_KEYWORD)]
        + [parameter(a.name, parameter.POSITIONAL_OR_KEYWORD, default=parameter.empty if a.required else ())
           for a in task.arguments]
        + [parameter(name, parameter.KEYWORD_ONLY, default=None) for name in ("sampling", "on_text", "analysis")])

    def method(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        backend: ClientBackend = values["self"]
        arguments = tuple(values[a.name] for a in task.arguments)
        return backend._call(lambda: backend._run_task(task, arguments, values["sampling"], values["on_text"],
                                                       values["analysis"]))

    method.__name__ = method.__qualname__ = task.engine_method
    method.__signature__ = signature  # type: ignore[attr-defined]
    method.__doc__ = f"{task.summary}, as ``InferenceEngine.{task.engine_method}``, answered by the M3D server."
    return method


for _task in STREAMING_TASKS:
    setattr(ClientBackend, _task.engine_method, _task_method(_task))


class LocalWorkerBackend(ClientBackend):
    """The engine's task methods answered by a local :class:`WorkerProcess`, started on the first request.

    After a crash the next request restarts the worker and sends the current volume again; a request that was
    running when it died raises :class:`WorkerCrashedError` (nothing is retried behind the user's back: an
    out-of-memory crash would just happen again).
    """

    def __init__(self, worker: WorkerProcess, *, on_progress: Optional[ProgressCallback] = None):
        super().__init__(None, on_progress=on_progress)
        self.worker = worker
        self._volume: Optional[tuple[tuple, dict]] = None  # the last set_volume call, to repeat after a restart
        self._volume_generation: Optional[int] = None

    def _ensure(self) -> M3DClient:
        return self.worker.ensure_running(cancel_event=self._cancel, on_progress=self._progress)

    def _client_for_task(self) -> M3DClient:
        client = self._ensure()
        if self._volume is not None and self._volume_generation != self.worker.generation:
            args, kwargs = self._volume  # the worker restarted since the volume was sent: send it again
            report_progress(self.on_progress, "upload", None, "sending the volume to the restarted M3D worker")
            generation = self.worker.generation
            self._guard(lambda: client.set_volume(*args, **kwargs), generation)
            self._volume_generation = generation
        return client

    def _guard(self, call: Callable[[], Any], generation: int) -> Any:
        """Run ``call``; a connection lost because the worker died becomes WorkerCrashedError."""
        try:
            return call()
        except ServerUnavailableError:
            if self._worker_died(generation):
                if self.worker.poll() is WorkerState.STOPPED:
                    raise CancelledError("the M3D worker was stopped") from None
                raise WorkerCrashedError(
                    f"The M3D worker stopped while answering ({self.worker.last_error}). Nothing was added to the "
                    f"scene; the worker restarts on the next request.", self.worker.last_log_tail) from None
            raise

    def _worker_died(self, generation: int, grace: float = 3.0) -> bool:
        """Whether the worker of ``generation`` is gone (the broken connection may come just before its exit)."""
        deadline = time.monotonic() + grace
        while True:
            if self.worker.generation != generation:
                return True
            if self.worker.poll() in (WorkerState.CRASHED, WorkerState.FAILED, WorkerState.STOPPED):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _send_display(self, display_window: Any, modality: Any) -> None:
        if self._volume is not None:  # a restarted worker gets the volume with the display it has now
            self._volume[1].update(display_window=display_window, modality=modality)
        super()._send_display(display_window, modality)

    def _run_selfcheck(self, options: dict[str, Any]) -> Any:
        client = self._client_for_task()
        self._check_cancel()
        return self._guard(lambda: client.selfcheck(on_progress=self._progress, **options), self.worker.generation)

    def _send_volume(self, array_kji: Any, ijk_to_ras: Any, options: dict[str, Any]) -> Any:
        kwargs = dict(options)
        self._volume = ((array_kji, ijk_to_ras), kwargs)
        self._volume_generation = None
        client = self._ensure()
        self._check_cancel()
        generation = self.worker.generation
        report_progress(self.on_progress, "upload", None, "sending the volume to the M3D worker")
        try:
            remote = client.set_volume(array_kji, ijk_to_ras, **kwargs)
        except ServerUnavailableError:
            if not self._worker_died(generation, grace=1.0):
                raise
            # It died while idle or while receiving the volume: nothing was computed, so restart and send again.
            client = self._ensure()
            generation = self.worker.generation
            remote = self._guard(lambda: client.set_volume(array_kji, ijk_to_ras, **kwargs), generation)
        self._volume_generation = generation
        return remote

    def _run_task(self, task: Task, arguments: tuple, sampling: Any, on_text: Any, analysis: Any = None) -> Any:
        client = self._client_for_task()
        self._check_cancel()
        generation = self.worker.generation
        return self._guard(lambda: client.run_task(task, *arguments, sampling=sampling, on_text=on_text,
                                                   on_progress=self._progress, **_analysis(analysis)), generation)

    def _run_retrieve(self, kwargs: dict) -> Any:
        client = self._client_for_task()
        self._check_cancel()
        report_progress(self.on_progress, "encode", None, "ranking with M3D-CLIP")
        return self._guard(lambda: client.retrieve(**kwargs), self.worker.generation)

    def _current_client(self) -> Optional[M3DClient]:
        return self.worker.current_client()  # also of a hung worker: its waits must end

    def close(self) -> None:
        """Stop the worker (its process tree)."""
        self.worker.stop()


__all__ = ["ClientBackend", "LocalWorkerBackend"]
