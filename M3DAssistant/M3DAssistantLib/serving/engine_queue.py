"""The engine queue: requests run one at a time on the engine, first come first served; a request that would make more
than ``max_queue`` wait gets 503 at once; any request can be cancelled by id, running or waiting. A result is answered
as JSON, or streamed as server-sent events (``progress``, ``text``, then ``result`` or ``error``)."""

import asyncio
import collections
import dataclasses
import functools
import logging
import threading
import uuid
from typing import Any, Callable, Optional

from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import CancelledError, M3DError
from .protocol import result_payload
from .responses import ApiError, error_answer, json_bytes, json_response
from .volume_store import StoredVolume

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Job:
    id: str
    task: str
    ahead: int = 0  # requests running or waiting when it was admitted
    emit: Optional[Callable[[str, dict], None]] = None  # streaming: hands events to the response
    cancelled: bool = False


class EngineQueue:
    """One request at a time on the engine, first come first served; cancel running or queued requests by id.
    :meth:`submit` queues a call on a stored volume and answers its result as JSON or server-sent events."""

    def __init__(self, engine: Any, max_queue: int):
        self.engine, self.max_queue = engine, max(0, int(max_queue))
        self._cond = threading.Condition()
        self._waiting: "collections.deque[Job]" = collections.deque()
        self._running: Optional[Job] = None
        self._jobs: dict[str, Job] = {}
        # ids cancelled before their request arrived (a client that timed out while its request was in transit)
        self._cancelled_early: "collections.OrderedDict[str, None]" = collections.OrderedDict()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"running": self._running.task if self._running else None, "waiting": len(self._waiting)}

    def admit(self, request_id: str, task: str) -> Job:
        with self._cond:
            if self._cancelled_early.pop(request_id, False) is None:
                raise CancelledError("cancelled before the request reached the server's queue")
            if request_id in self._jobs:
                raise ApiError(400, f"request id {request_id!r} is already in use; send a new one per request",
                               "InputError")
            ahead = len(self._waiting) + (self._running is not None)
            if ahead > self.max_queue:
                raise ApiError(503, f"the server is busy: {ahead} requests are ahead and at most {self.max_queue} "
                                    f"may wait; try again when they are done", "ServerBusyError", {"Retry-After": "2"})
            job = Job(request_id, task, ahead=ahead)
            self._jobs[request_id] = job
            self._waiting.append(job)
            return job

    def run(self, job: Job, work: Callable[[], Any]) -> Any:
        """Wait for ``job``'s turn (in a worker thread), then run ``work``."""
        with self._cond:
            while not job.cancelled and (self._running is not None or self._waiting[0] is not job):
                self._cond.wait()
            self._waiting.remove(job)
            if job.cancelled:
                self._jobs.pop(job.id, None)
                self._cond.notify_all()
                raise CancelledError("cancelled while waiting in the queue")
            self._running = job
        try:
            return work()
        finally:
            with self._cond:
                self._running = None
                self._jobs.pop(job.id, None)
                self._cond.notify_all()

    def cancel(self, request_id: Optional[str] = None) -> list[str]:
        """Cancel one request (by id) or all; returns the ids cancelled."""
        with self._cond:
            if request_id is None:
                jobs = list(self._jobs.values())
            else:
                jobs = [self._jobs[request_id]] if request_id in self._jobs else []
                if not jobs:
                    self._cancelled_early[request_id] = None
                    while len(self._cancelled_early) > 1024:
                        self._cancelled_early.popitem(last=False)
            for job in jobs:
                job.cancelled = True
                if job is self._running:
                    self.engine.cancel()
            self._cond.notify_all()
            return [job.id for job in jobs]

    def recheck(self, job: Job) -> None:
        """Called at every progress/text event of the running job: re-raise a cancel the engine may have cleared
        (it clears its flag when a request starts, which can be just after our cancel)."""
        if job.cancelled:
            self.engine.cancel()

    def forget(self, keys: set) -> None:
        """Drop the engine's caches of a deleted volume, now if the engine is idle (else its LRU drops them)."""
        with self._cond:
            if self._running is None:  # the engine's lock is free: only a running job holds it
                for key in keys:
                    self.engine.forget_volume(key)

    # -------------------------------------------------------------------------------------- running and answering
    async def submit(self, name: str, request_id: Optional[str], stored: Optional[StoredVolume],
                     options: dict[str, Any], call: Callable[[Any, Optional[Callable[[str], None]]], Any],
                     stream: bool, payload: Optional[Callable[[Any], dict[str, Any]]] = None) -> Response:
        """Queue ``call(engine, on_text)`` on ``stored`` (set as the engine's volume with ``options`` first; None:
        a call that sets its own volumes, such as the self-check); answer its result as JSON, or as server-sent events
        when ``stream``. ``payload`` turns the result into the answer (default: a task result's
        :func:`~.protocol.result_payload`)."""
        job = self.admit(request_id or uuid.uuid4().hex, name)
        headers = {"X-M3D-Request-Id": job.id}
        if payload is None:
            payload = functools.partial(_task_payload, stored)

        def work() -> dict[str, Any]:
            return self.run(job, functools.partial(self._execute, job, stored, options, call, payload))

        loop = asyncio.get_running_loop()
        if not stream:
            # A thread of our own rather than anyio's pool: waiting requests must not starve the pool's other users.
            answer: "asyncio.Future[dict[str, Any]]" = loop.create_future()

            def settle(ok: bool, value: Any) -> None:
                if not answer.done():
                    answer.set_result(value) if ok else answer.set_exception(value)

            def run_plain() -> None:
                try:
                    value, ok = work(), True
                except BaseException as e:  # re-raised in the route, where the exception handlers answer it
                    value, ok = e, False
                try:
                    loop.call_soon_threadsafe(settle, ok, value)
                except RuntimeError:  # the event loop is gone: the server is stopping
                    pass

            threading.Thread(target=run_plain, name=f"m3d-{name}-{job.id[:8]}", daemon=True).start()
            return json_response(await answer, headers=headers)

        events: "asyncio.Queue[tuple[str, dict]]" = asyncio.Queue()

        def emit(kind: str, data: dict) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, data))
            except RuntimeError:  # the event loop is gone: the server is stopping
                pass

        def produce() -> None:
            try:
                emit("result", work())
            except BaseException as e:  # reported to the client as an error event
                if not isinstance(e, (M3DError, HTTPException)):
                    logger.exception("%s failed", name)
                status, error, _ = error_answer(e)
                emit("error", dict(error, status=status))

        job.emit = emit
        if job.ahead:
            emit("progress", {"stage": "queue", "fraction": None, "message": f"{job.ahead} request(s) ahead"})
        threading.Thread(target=produce, name=f"m3d-{name}-{job.id[:8]}", daemon=True).start()

        async def sse() -> Any:
            finished = False
            try:
                while True:
                    kind, data = await events.get()
                    yield f"event: {kind}\ndata: {json_bytes(data).decode('utf-8')}\n\n"
                    if kind in ("result", "error"):
                        finished = True
                        return
            finally:
                if not finished:  # the client went away: stop the work
                    self.cancel(job.id)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _execute(self, job: Job, stored: Optional[StoredVolume], options: dict[str, Any],
                 call: Callable[[Any, Optional[Callable[[str], None]]], Any],
                 payload: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """Runs in a worker thread, with the engine to itself."""
        engine = self.engine

        def on_progress(event: Any) -> None:
            self.recheck(job)
            if job.emit is not None:
                job.emit("progress", event.to_dict())

        sent: list[str] = []

        def on_text(text: str) -> None:
            self.recheck(job)
            sent.append(text)
            job.emit("text", {"text": text})  # type: ignore[misc]

        previous = engine.progress
        engine.progress = on_progress
        try:
            if stored is not None:
                handle = engine.set_volume(stored.array, stored.ijk_to_ras, content_key=stored.volume_id, **options)
                stored.engine_keys.add(handle.key)
            result = call(engine, on_text if job.emit is not None else None)
        finally:
            engine.progress = previous
        streamed = "".join(sent)
        text = getattr(result, "text", "")
        if job.emit is not None and text.startswith(streamed) and len(text) > len(streamed):
            # the engine holds back an incomplete character at the end; send the rest so the stream adds up
            job.emit("text", {"text": text[len(streamed):]})
        return payload(result)


def _task_payload(stored: Optional[StoredVolume], result: Any) -> dict[str, Any]:
    return result_payload(result, stored.volume_id if stored is not None else "")
