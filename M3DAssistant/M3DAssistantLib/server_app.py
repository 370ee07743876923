"""The HTTP API of ``m3d serve`` (FastAPI): routes, request models, the store of uploaded volumes, the engine queue.

:func:`create_app` builds the app around one :class:`~M3DAssistantLib.engine.InferenceEngine`;
:func:`M3DAssistantLib.server.serve` runs it with uvicorn. The wire protocol is described in
:mod:`M3DAssistantLib.client` and published as OpenAPI at ``/v1/openapi.json`` (token required, as everywhere).

Routes (all under ``/v1``, all need ``Authorization: Bearer <token>``):

=========================================  ===========================================================================
``GET /v1/health``                         ``{"status": "ok", "protocol", "running", "waiting"}``
``GET /v1/info``                           ``engine.info()`` + ``protocol``, ``server_version``, ``tasks``, ``limits``
``POST /v1/volumes``                       upload (raw little-endian voxels, zlib; shape/dtype/matrix in headers)
                                           -> 201 (new) or 200 (known) ``{"volume_id", "shape", "dtype", "bytes"}``
``GET /v1/volumes/{id}``                   the same description, or 404
``DELETE /v1/volumes/{id}``                204, or 404
``POST /v1/volumes/{id}/{task}``           ``task`` in report, ask, choose, locate, describe_region, segment,
                                           segment_expression; JSON body; ``?stream=true`` for server-sent events
``POST /v1/volumes/{id}/retrieve``         M3D-CLIP: rank ``texts`` for this volume
``POST /v1/retrieve``                      M3D-CLIP: rank uploaded ``volume_ids`` for a ``text``
``POST /v1/cancel``                        ``{"request_id": ...}`` cancels one request; ``{}`` or no body: all
=========================================  ===========================================================================

A task answers ``result.to_dict()`` plus ``kind`` (text, choice, box, segmentation, retrieval), ``volume_id`` and, for
segmentation, ``mask`` (:func:`~M3DAssistantLib.client.encode_mask`: packbits + zlib + base64, or null). Streamed, the
same object is the ``result`` event after ``progress`` (``ProgressEvent.to_dict()``) and ``text`` (``{"text": chunk}``)
events; a failure after the stream started is an ``error`` event ``{"status", "error", "detail"}``.

Errors are JSON ``{"detail": message, "error": exception name}``: 400 bad input (InputError, malformed JSON, headers
or fields), 401 missing or wrong token, 404 unknown volume or route, 409 cancelled, 413 too large, 503 queue full.
A 500 means a bug on our side, never bad input.

Requests run one at a time on the engine, first come first served; a request that would make more than ``max_queue``
wait gets 503 at once. Uploaded volumes live in memory only (nothing a request sends reaches the filesystem), least
recently used dropped beyond ``max_volumes`` / ``max_stored_bytes``.
"""

import asyncio
import collections
import dataclasses
import functools
import hmac
import json
import logging
import math
import threading
import uuid
import zlib
from typing import Annotated, Any, Callable, Optional, Union

import anyio
import numpy as np
from fastapi import Body, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import AI_LABEL, __version__
from .client import PROTOCOL_VERSION, TASKS, WIRE_DTYPES, encode_mask
from .client import volume_id as content_hash
from .errors import CancelledError, InputError, M3DError
from .geometry import RasRoi, validate_ijk_to_ras
from .preprocessing import resolve_window
from .results import BoxResult, ChoiceResult, RetrievalResult, SamplingOptions, SegmentationResult, TextResult

logger = logging.getLogger(__name__)

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for. Sizes are checked from the headers before anything is allocated."""

    max_upload_bytes: int = 1024 * MiB  # request body of an upload (compressed)
    max_volume_bytes: int = 2048 * MiB  # voxels after decompression (shape x dtype size)
    max_dim: int = 4096  # voxels along any axis
    max_json_bytes: int = 1 * MiB  # request body of every other route
    max_queue: int = 8  # requests that may wait while one runs; more -> 503
    max_volumes: int = 8  # uploaded volumes kept (least recently used dropped)
    max_stored_bytes: int = 4096 * MiB  # voxels kept over all uploaded volumes
    max_new_tokens: int = 1024  # cap on sampling.max_new_tokens


# ------------------------------------------------------------------------------------------------ request models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Text = Annotated[str, Field(max_length=200_000)]
Vec3 = tuple[FiniteFloat, FiniteFloat, FiniteFloat]


class ErrorBody(BaseModel):
    """Every error answer."""

    detail: str = Field(description="what went wrong and how to fix it")
    error: str = Field(description="exception name, e.g. InputError, GeometryError, VolumeNotFoundError")


class SamplingModel(_Strict):
    """How tokens are chosen (greedy by default)."""

    max_new_tokens: int = Field(256, ge=1, le=4096, description="capped by the server's limits.max_new_tokens")
    min_new_tokens: int = Field(0, ge=0, le=4096, description="> 0 suppresses the end of the answer until then")
    do_sample: bool = False
    temperature: FiniteFloat = Field(1.0, gt=0, le=100)
    top_p: FiniteFloat = Field(0.9, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1)


class RoiModel(_Strict):
    """A box in RAS (mm): centre, full edge lengths, and the 3x3 ``axes`` matrix as a list of rows (its columns are
    the box's edge directions; identity when omitted)."""

    center: Vec3
    size: Vec3
    axes: Optional[tuple[Vec3, Vec3, Vec3]] = None


class TaskOptions(_Strict):
    """Preprocessing of the volume (as ``InferenceEngine.set_volume``) and sampling."""

    window: Union[Annotated[str, Field(max_length=64)], tuple[FiniteFloat, FiniteFloat], None] = Field(
        None, description='a preset ("abdomen", "lung", ...), "percentile", "minmax", or [center, width] in HU')
    roi: Optional[RoiModel] = Field(None, description="crop the volume to this RAS box first")
    slice_range: Optional[tuple[int, int]] = Field(None, description="half-open [start, stop) range of K indices")
    sampling: SamplingModel = Field(default_factory=SamplingModel)


class ReportRequest(TaskOptions):
    pass


class AskRequest(TaskOptions):
    question: Text
    history: list[tuple[Text, Text]] = Field(default_factory=list, max_length=64,
                                             description="earlier [question, answer] turns (experimental)")


class ChooseRequest(TaskOptions):
    question: Text
    choices: list[Annotated[str, Field(max_length=10_000)]] = Field(max_length=64)


class LocateRequest(TaskOptions):
    expression: Text


class DescribeRegionRequest(TaskOptions):
    region: RoiModel = Field(description="the RAS box to describe")


class SegmentRequest(TaskOptions):
    target: Text


class SegmentExpressionRequest(TaskOptions):
    expression: Text


class RetrieveTextsRequest(_Strict):
    """Rank texts for this volume with M3D-CLIP."""

    texts: list[Annotated[str, Field(max_length=10_000)]] = Field(min_length=1, max_length=1024)
    labels: Optional[list[Annotated[str, Field(max_length=1_000)]]] = Field(None, max_length=1024)
    window: Union[Annotated[str, Field(max_length=64)], tuple[FiniteFloat, FiniteFloat], None] = None


class RetrieveVolumesRequest(_Strict):
    """Rank uploaded volumes for a text with M3D-CLIP."""

    text: Text
    volume_ids: list[Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]] = Field(min_length=1, max_length=256)
    labels: Optional[list[Annotated[str, Field(max_length=1_000)]]] = Field(None, max_length=256)
    window: Union[Annotated[str, Field(max_length=64)], tuple[FiniteFloat, FiniteFloat], None] = None


class CancelRequest(_Strict):
    request_id: Optional[str] = Field(None, max_length=64, description="omit to cancel every request")


def _ras_roi(model: RoiModel) -> RasRoi:
    return RasRoi(model.center, model.size, model.axes if model.axes is not None else np.eye(3))


@dataclasses.dataclass(frozen=True)
class _TaskSpec:
    name: str
    request: type
    summary: str
    args: Callable[[Any], tuple]  # request body -> positional arguments of the engine method


TASK_SPECS = (
    _TaskSpec("report", ReportRequest, "Report generation", lambda b: ()),
    _TaskSpec("ask", AskRequest, "Open question (VQA)", lambda b: (b.question, [tuple(t) for t in b.history])),
    _TaskSpec("choose", ChooseRequest, "Multiple choice (closed VQA)", lambda b: (b.question, list(b.choices))),
    _TaskSpec("locate", LocateRequest, "Box for a target or description (REC)", lambda b: (b.expression,)),
    _TaskSpec("describe_region", DescribeRegionRequest, "Describe an RAS box (REG)", lambda b: (_ras_roi(b.region),)),
    _TaskSpec("segment", SegmentRequest, "Segment a named structure", lambda b: (b.target,)),
    _TaskSpec("segment_expression", SegmentExpressionRequest, "Segment a description", lambda b: (b.expression,)),
)
assert tuple(s.name for s in TASK_SPECS) == TASKS

_RESULT_KINDS = {TextResult: "text", ChoiceResult: "choice", BoxResult: "box", SegmentationResult: "segmentation",
                 RetrievalResult: "retrieval"}


# ---------------------------------------------------------------------------------------------------- errors
class ApiError(HTTPException):
    """An HTTP error with our JSON body (``detail`` + ``error`` name)."""

    def __init__(self, status_code: int, detail: str, error: str, headers: Optional[dict[str, str]] = None):
        super().__init__(status_code, detail, headers)
        self.error = error


_DEFAULT_ERROR_NAMES = {400: "InputError", 401: "AuthenticationError", 404: "NotFound", 405: "MethodNotAllowed",
                        409: "CancelledError", 413: "RequestTooLargeError", 503: "ServerBusyError"}


def error_answer(exc: BaseException) -> tuple[int, dict[str, str], dict[str, str]]:
    """(status, JSON body, headers) for an exception, the same for plain answers and ``error`` stream events."""
    if isinstance(exc, RequestValidationError):
        parts = []
        for err in exc.errors()[:8]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            where = " ".join(loc[:1]) + (" " + ".".join(loc[1:]) if loc[1:] else "") if loc and loc[0] in (
                "header", "query", "path") else ".".join(loc) or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return 400, {"detail": "invalid request: " + "; ".join(parts), "error": "InputError"}, {}
    if isinstance(exc, HTTPException):
        name = getattr(exc, "error", None) or _DEFAULT_ERROR_NAMES.get(exc.status_code, "HTTPError")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return exc.status_code, {"detail": detail, "error": name}, dict(exc.headers or {})
    if isinstance(exc, InputError):
        return 400, {"detail": str(exc), "error": type(exc).__name__}, {}
    if isinstance(exc, CancelledError):
        return 409, {"detail": str(exc) or "cancelled", "error": "CancelledError"}, {}
    if isinstance(exc, M3DError):
        return 500, {"detail": str(exc), "error": type(exc).__name__}, {}
    return 500, {"detail": f"internal error ({type(exc).__name__}: {exc}); see the server log",
                 "error": "InternalError"}, {}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, set, frozenset)):
        return list(value.tolist() if isinstance(value, np.ndarray) else value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, default=_json_default).encode("utf-8")


def _json_response(data: Any, status_code: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    return Response(_json_bytes(data), status_code=status_code, media_type="application/json", headers=headers)


# ----------------------------------------------------------------------------------------------- auth and limits
class _Guard:
    """ASGI middleware, outermost: the token on every route (constant-time compare), then the body size limits,
    before any route code runs or any body is read."""

    def __init__(self, app: Any, token: str, limits: ServerLimits):
        self.app, self.expected, self.limits = app, token.encode("utf-8"), limits

    def _authorized(self, header: Optional[bytes]) -> bool:
        scheme, _, value = (header or b"").partition(b" ")
        # compare_digest on every request, also for a missing or malformed header: no early exit to time
        return hmac.compare_digest(value.strip(), self.expected) and scheme.lower() == b"bearer"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        auth = length = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                auth = value
            elif key == b"content-length":
                length = value
        if not self._authorized(auth):
            await _send_error(send, 401, "missing or wrong token: send the header 'Authorization: Bearer <token>' "
                                         "with the token m3d serve printed or was given",
                              "AuthenticationError", [(b"www-authenticate", b"Bearer")])
            return
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/volumes"
        limit = self.limits.max_upload_bytes if upload else self.limits.max_json_bytes
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_error(send, 400, "Content-Length is not a number", "InputError")
                return
            if declared > limit:
                await _send_error(send, 413, _too_large_message(declared, limit, upload), "RequestTooLargeError")
                return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, _too_large_message(received, limit, upload), "RequestTooLargeError")
            return message

        await self.app(scope, limited_receive, send)


def _too_large_message(size: int, limit: int, upload: bool) -> str:
    if upload:
        return (f"the upload is {size / MiB:.1f} MiB but this server accepts at most {limit / MiB:.1f} MiB; crop the "
                f"volume (ROI, slice range) or start the server with a larger --max-upload-mb")
    return f"the request body is {size} bytes but this server accepts at most {limit} bytes for this route"


async def _send_error(send: Callable, status: int, detail: str, error: str,
                      headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    body = _json_bytes({"detail": detail, "error": error})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------- uploaded volumes
@dataclasses.dataclass(eq=False)
class _StoredVolume:
    volume_id: str
    array: np.ndarray
    ijk_to_ras: np.ndarray
    engine_keys: set = dataclasses.field(default_factory=set)  # the engine's caches made from it

    def describe(self) -> dict[str, Any]:
        return {"volume_id": self.volume_id, "shape": list(self.array.shape),
                "dtype": self.array.dtype.newbyteorder("=").name, "bytes": int(self.array.nbytes)}


class _VolumeStore:
    """Uploaded volumes by content hash, in memory, least recently used dropped beyond the limits."""

    def __init__(self, max_volumes: int, max_bytes: int):
        self.max_volumes, self.max_bytes = max(1, max_volumes), max_bytes
        self._volumes: "collections.OrderedDict[str, _StoredVolume]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[_StoredVolume]:
        with self._lock:
            volume = self._volumes.get(key)
            if volume is not None:
                self._volumes.move_to_end(key)
            return volume

    def put(self, volume: _StoredVolume) -> tuple[_StoredVolume, bool, list[_StoredVolume]]:
        """Store; returns (the stored volume, whether it is new, the volumes dropped to make room)."""
        with self._lock:
            if volume.volume_id in self._volumes:
                self._volumes.move_to_end(volume.volume_id)
                return self._volumes[volume.volume_id], False, []
            self._volumes[volume.volume_id] = volume
            dropped = []
            while len(self._volumes) > 1 and (len(self._volumes) > self.max_volumes or sum(
                    v.array.nbytes for v in self._volumes.values()) > self.max_bytes):
                dropped.append(self._volumes.popitem(last=False)[1])
            return volume, True, dropped

    def pop(self, key: str) -> Optional[_StoredVolume]:
        with self._lock:
            return self._volumes.pop(key, None)

    def __len__(self) -> int:
        return len(self._volumes)


class _VolumeBody:
    """Receives an upload into a buffer of exactly the declared size (allocated only after the size checks)."""

    def __init__(self, nbytes: int, compression: str):
        self.buffer = np.empty(nbytes, dtype=np.uint8)
        self.pos = 0
        self.inflate = zlib.decompressobj(47) if compression == "zlib" else None  # 47: zlib or gzip header

    def _write(self, data: bytes) -> None:
        end = self.pos + len(data)
        if end > self.buffer.size:
            raise InputError(f"the body holds more than the {self.buffer.size} bytes of voxels that X-M3D-Shape and "
                             f"X-M3D-Dtype declare; send the array's C-order bytes exactly")
        self.buffer[self.pos:end] = np.frombuffer(data, dtype=np.uint8)
        self.pos = end

    def feed(self, chunk: bytes) -> None:
        if self.inflate is None:
            self._write(chunk)
            return
        data = chunk
        while data:
            if self.inflate.eof:
                raise InputError("the body continues after the end of the zlib stream; send one zlib.compress()d "
                                 "array")
            try:
                out = self.inflate.decompress(data, self.buffer.size - self.pos + 1)
            except zlib.error as e:
                raise InputError(f"the body is not valid zlib data ({e}); compress with zlib.compress, or send "
                                 f"X-M3D-Compression: none") from None
            self._write(out)
            data = self.inflate.unconsumed_tail
        if self.inflate.eof and self.inflate.unused_data:
            raise InputError("the body continues after the end of the zlib stream; send one zlib.compress()d array")

    def finish(self) -> np.ndarray:
        if self.inflate is not None and not self.inflate.eof:
            raise InputError("the zlib stream is truncated; the upload was cut short or is not zlib data")
        if self.pos != self.buffer.size:
            raise InputError(f"the body holds {self.pos} bytes of voxels but X-M3D-Shape and X-M3D-Dtype declare "
                             f"{self.buffer.size}")
        return self.buffer


_WIRE_DTYPE_NAMES = {**{name: np.dtype(name).newbyteorder("<") for name in WIRE_DTYPES},
                     **{np.dtype(name).newbyteorder("<").str: np.dtype(name).newbyteorder("<") for name in WIRE_DTYPES}}


def _parse_shape(text: str, limits: ServerLimits) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        dims = tuple(int(p.strip()) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise InputError(f"X-M3D-Shape must be three positive integers K,J,I (e.g. 30,101,122), got {text[:80]!r}")
    if max(dims) > limits.max_dim:
        raise ApiError(413, f"the volume is {dims} voxels but this server accepts at most {limits.max_dim} along any "
                            f"axis; crop or resample it", "RequestTooLargeError")
    return dims  # type: ignore[return-value]


def _parse_dtype(text: str) -> np.dtype:
    dtype = _WIRE_DTYPE_NAMES.get(text.strip().lower() if text.strip()[:1] not in "<|" else text.strip())
    if dtype is None:
        raise InputError(f"X-M3D-Dtype must be one of {', '.join(WIRE_DTYPES)} (little-endian), got {text[:40]!r}")
    return dtype


def _parse_matrix(text: str) -> np.ndarray:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 16:
        raise InputError("X-M3D-IJK-To-RAS must be the 16 numbers of the 4x4 IJK->RAS matrix, row-major, "
                         "comma-separated")
    return validate_ijk_to_ras(np.array(values, dtype=np.float64).reshape(4, 4))


# ------------------------------------------------------------------------------------------------ the engine queue
@dataclasses.dataclass(eq=False)
class _Job:
    id: str
    task: str
    ahead: int = 0  # requests running or waiting when it was admitted
    emit: Optional[Callable[[str, dict], None]] = None  # streaming: hands events to the response
    cancelled: bool = False


class _EngineQueue:
    """One request at a time on the engine, first come first served; cancel running or queued requests by id."""

    def __init__(self, engine: Any, max_queue: int):
        self.engine, self.max_queue = engine, max(0, int(max_queue))
        self._cond = threading.Condition()
        self._waiting: "collections.deque[_Job]" = collections.deque()
        self._running: Optional[_Job] = None
        self._jobs: dict[str, _Job] = {}
        # ids cancelled before their request arrived (a client that timed out while its request was in transit)
        self._cancelled_early: "collections.OrderedDict[str, None]" = collections.OrderedDict()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"running": self._running.task if self._running else None, "waiting": len(self._waiting)}

    def admit(self, request_id: str, task: str) -> _Job:
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
            job = _Job(request_id, task, ahead=ahead)
            self._jobs[request_id] = job
            self._waiting.append(job)
            return job

    def run(self, job: _Job, work: Callable[[], Any]) -> Any:
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

    def recheck(self, job: _Job) -> None:
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


# --------------------------------------------------------------------------------------------------- the app
class _Server:
    """State shared by the routes: the engine, its queue, the uploaded volumes, the limits."""

    def __init__(self, engine: Any, limits: ServerLimits):
        self.engine, self.limits = engine, limits
        self.queue = _EngineQueue(engine, limits.max_queue)
        self.store = _VolumeStore(limits.max_volumes, limits.max_stored_bytes)
        self._upload_lock = threading.Lock()
        self._uploading = 0  # bytes of voxel buffers being received: bounded by max_stored_bytes

    def volume(self, volume_id: str) -> _StoredVolume:
        stored = self.store.get(volume_id)
        if stored is None:
            raise ApiError(404, f"no volume {volume_id} on this server; upload it with POST /v1/volumes (it was never "
                                f"uploaded, was deleted, was dropped to stay within {self.limits.max_volumes} volumes, "
                                f"or the server restarted)", "VolumeNotFoundError")
        return stored

    async def upload(self, request: Request, shape: str, dtype: str, ijk_to_ras: str, compression: str) -> Response:
        dims, wire_dtype, matrix = _parse_shape(shape, self.limits), _parse_dtype(dtype), _parse_matrix(ijk_to_ras)
        nbytes = math.prod(dims) * wire_dtype.itemsize
        if nbytes > self.limits.max_volume_bytes:
            raise ApiError(413, f"the volume {dims} of {wire_dtype.name} is {nbytes / MiB:.1f} MiB but this server "
                                f"accepts at most {self.limits.max_volume_bytes / MiB:.1f} MiB of voxels; crop it "
                                f"(ROI, slice range) or start the server with a larger --max-volume-mb",
                           "RequestTooLargeError")
        length = request.headers.get("content-length")
        if compression == "none" and length is not None and int(length) != nbytes:
            raise InputError(f"Content-Length {length} differs from the {nbytes} bytes that X-M3D-Shape and "
                             f"X-M3D-Dtype declare")
        with self._upload_lock:
            if self._uploading + nbytes > self.limits.max_stored_bytes:
                raise ApiError(503, f"other uploads are being received ({self._uploading / MiB:.0f} MiB); try again "
                                    f"when they are done", "ServerBusyError", {"Retry-After": "2"})
            self._uploading += nbytes
        try:
            body = _VolumeBody(nbytes, compression)  # allocated only now, after every size check
            try:
                async for chunk in request.stream():
                    body.feed(chunk)
            except ClientDisconnect:  # e.g. the client stopped at its own size check: nobody to answer, no error
                logger.info("an upload of %s was abandoned by the client after %d bytes", dims, body.pos)
                return Response(status_code=400)
            array = body.finish().view(wire_dtype).reshape(dims)
        finally:
            with self._upload_lock:
                self._uploading -= nbytes
        key = await anyio.to_thread.run_sync(content_hash, array, matrix)
        stored, created, dropped = self.store.put(_StoredVolume(key, array, matrix))
        for old in dropped:
            self.queue.forget(old.engine_keys)
        return _json_response(stored.describe(), status_code=201 if created else 200)

    def delete(self, volume_id: str) -> None:
        stored = self.store.pop(volume_id)
        if stored is None:
            self.volume(volume_id)  # raises the 404
        self.queue.forget(stored.engine_keys)

    def _volume_options(self, body: Any, stored: _StoredVolume) -> dict[str, Any]:
        """``set_volume`` keyword arguments from a request, checked now (before anything is queued or streamed)."""
        window = tuple(body.window) if isinstance(body.window, (list, tuple)) else body.window
        resolve_window(window)
        options: dict[str, Any] = {"window": window}
        if hasattr(body, "roi"):
            options["roi"] = _ras_roi(body.roi) if body.roi is not None else None
        if getattr(body, "slice_range", None) is not None:
            k0, k1 = body.slice_range
            depth = stored.array.shape[0]
            if not 0 <= k0 < k1 <= depth:
                raise InputError(f"slice_range [{k0}, {k1}] is outside the volume's K range [0, {depth}) or empty; "
                                 f"give [start, stop] with 0 <= start < stop <= {depth}")
            options["slice_range"] = (k0, k1)
        return options

    def _sampling(self, model: SamplingModel) -> SamplingOptions:
        sampling = SamplingOptions(**model.model_dump())
        if "max_new_tokens" not in model.model_fields_set:  # the default fits any limit
            sampling.max_new_tokens = min(sampling.max_new_tokens, self.limits.max_new_tokens)
        if max(sampling.max_new_tokens, sampling.min_new_tokens) > self.limits.max_new_tokens:
            raise InputError(f"sampling.max_new_tokens {sampling.max_new_tokens} (or min_new_tokens) exceeds this "
                             f"server's limit {self.limits.max_new_tokens}")
        return sampling

    async def run_task(self, spec: _TaskSpec, volume_id: str, body: Any, stream: bool,
                       request_id: Optional[str]) -> Response:
        stored = self.volume(volume_id)
        # Everything that can be checked without the model is checked here, so that bad input is a plain 400 even
        # for a streamed request (whose status is sent before the engine runs).
        options = self._volume_options(body, stored)
        sampling = self._sampling(body.sampling)
        args = spec.args(body)

        def call(engine: Any, on_text: Optional[Callable[[str], None]]) -> Any:
            return getattr(engine, spec.name)(*args, sampling=sampling, on_text=on_text)

        return await self.submit(spec.name, request_id, stored, options, call, stream)

    async def submit(self, name: str, request_id: Optional[str], stored: _StoredVolume, options: dict[str, Any],
                     call: Callable[[Any, Optional[Callable[[str], None]]], Any], stream: bool) -> Response:
        """Queue ``call(engine, on_text)`` on ``stored`` (set as the engine's volume with ``options`` first); answer
        its result as JSON, or as server-sent events when ``stream``."""
        job = self.queue.admit(request_id or uuid.uuid4().hex, name)
        headers = {"X-M3D-Request-Id": job.id}

        def work() -> dict[str, Any]:
            return self.queue.run(job, functools.partial(self._execute, job, stored, options, call))

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
            return _json_response(await answer, headers=headers)

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
                    yield f"event: {kind}\ndata: {_json_bytes(data).decode('utf-8')}\n\n"
                    if kind in ("result", "error"):
                        finished = True
                        return
            finally:
                if not finished:  # the client went away: stop the work
                    self.queue.cancel(job.id)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _execute(self, job: _Job, stored: _StoredVolume, options: dict[str, Any],
                 call: Callable[[Any, Optional[Callable[[str], None]]], Any]) -> dict[str, Any]:
        """Runs in a worker thread, with the engine to itself."""
        engine = self.engine

        def on_progress(event: Any) -> None:
            self.queue.recheck(job)
            if job.emit is not None:
                job.emit("progress", event.to_dict())

        sent: list[str] = []

        def on_text(text: str) -> None:
            self.queue.recheck(job)
            sent.append(text)
            job.emit("text", {"text": text})  # type: ignore[misc]

        previous = engine.progress
        engine.progress = on_progress
        try:
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
        return result_payload(result, stored.volume_id)

    async def retrieve_texts(self, volume_id: str, body: "RetrieveTextsRequest",
                             request_id: Optional[str]) -> Response:
        stored = self.volume(volume_id)
        options = self._volume_options(body, stored)
        texts, labels = list(body.texts), list(body.labels) if body.labels is not None else None

        def call(engine: Any, on_text: Any) -> Any:
            return engine.retrieve(texts=texts, labels=labels)

        return await self.submit("retrieve", request_id, stored, options, call, False)

    async def retrieve_volumes(self, body: "RetrieveVolumesRequest", request_id: Optional[str]) -> Response:
        candidates = [self.volume(v) for v in body.volume_ids]
        options = self._volume_options(body, candidates[0])
        labels = list(body.labels) if body.labels is not None else None
        volumes = [(v.array, v.ijk_to_ras) for v in candidates]

        def call(engine: Any, on_text: Any) -> Any:
            # the engine embeds every candidate with the current volume's window: make it the request's
            return engine.retrieve(text=body.text, volumes=volumes, labels=labels)

        return await self.submit("retrieve", request_id, candidates[0], options, call, False)


def result_payload(result: Any, volume_id: str) -> dict[str, Any]:
    """``result.to_dict()`` + ``kind``, ``volume_id`` and, for segmentation, the encoded ``mask`` (or None)."""
    data = result.to_dict()
    data["kind"] = _RESULT_KINDS[type(result)]
    if data["kind"] != "retrieval":
        data["volume_id"] = volume_id
    if isinstance(result, SegmentationResult):
        data["mask"] = encode_mask(result.mask) if result.mask is not None else None
    return data


_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "bad input"), (401, "missing or wrong token"), (413, "too large"))}
_VOLUME_ERRORS = {**_ERRORS, 404: {"model": ErrorBody, "description": "unknown volume"}}
_TASK_ERRORS = {**_VOLUME_ERRORS, 409: {"model": ErrorBody, "description": "cancelled"},
                503: {"model": ErrorBody, "description": "queue full"}}
OPTIONAL_BODY = Body(None)
VOLUME_ID = Path(pattern=r"^[0-9a-f]{32}$", description="content hash returned by POST /v1/volumes")
REQUEST_ID = Header(None, alias="X-M3D-Request-Id", max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                    description="your id for this request, to cancel it with POST /v1/cancel")


def create_app(engine: Any, token: str, *, max_upload_bytes: int = ServerLimits.max_upload_bytes,
               max_queue: int = ServerLimits.max_queue, **limits: Any) -> FastAPI:
    """The FastAPI app serving ``engine`` to holders of ``token``. Other :class:`ServerLimits` fields may be given
    as keyword arguments (``max_volume_bytes``, ``max_json_bytes``, ``max_dim``, ``max_volumes``, ...)."""
    if not token:
        raise InputError("the server needs a token; pass one or let serve() generate it")
    server = _Server(engine, ServerLimits(max_upload_bytes=int(max_upload_bytes), max_queue=int(max_queue), **limits))
    app = FastAPI(title="M3D for 3D Slicer", version=__version__, openapi_url="/v1/openapi.json", docs_url=None,
                  redoc_url=None, description=f"M3D-LaMed tasks on uploaded volumes. Outputs are {AI_LABEL}. "
                                              f"Protocol {PROTOCOL_VERSION}.")
    app.state.m3d = server
    app.add_middleware(_Guard, token=token, limits=server.limits)

    async def handle(request: Request, exc: Exception) -> Response:
        status, body, headers = error_answer(exc)
        if status == 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, body["detail"],
                         exc_info=None if isinstance(exc, M3DError) else exc)
        return _json_response(body, status_code=status, headers=headers)

    for exc_type in (HTTPException, RequestValidationError, M3DError, Exception):
        app.add_exception_handler(exc_type, handle)

    @app.get("/v1/health", responses=_ERRORS, summary="Is the server up; is it busy")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "protocol": PROTOCOL_VERSION, **server.queue.stats()}

    @app.get("/v1/info", responses=_ERRORS, summary="Model, device, protocol and limits")
    async def info() -> dict[str, Any]:
        return {**engine.info(), "protocol": PROTOCOL_VERSION, "server_version": __version__, "tasks": list(TASKS),
                "volumes": len(server.store), "limits": dataclasses.asdict(server.limits), "label": AI_LABEL}

    @app.post("/v1/volumes", status_code=201, responses={**_ERRORS, 200: {"description": "already uploaded"}},
              summary="Upload a volume once (raw little-endian voxels in C order, zlib-compressed)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_volume(
        request: Request,
        shape: str = Header(alias="X-M3D-Shape", max_length=64, description="K,J,I (e.g. 30,101,122)"),
        dtype: str = Header(alias="X-M3D-Dtype", max_length=16, description=", ".join(WIRE_DTYPES)),
        ijk_to_ras: str = Header(alias="X-M3D-IJK-To-RAS", max_length=1024,
                                 description="the 4x4 IJK->RAS matrix, 16 numbers, row-major, comma-separated"),
        compression: str = Header("zlib", alias="X-M3D-Compression", pattern="^(zlib|none)$"),
    ) -> Response:
        return await server.upload(request, shape, dtype, ijk_to_ras, compression)

    @app.get("/v1/volumes/{volume_id}", responses=_VOLUME_ERRORS, summary="Describe an uploaded volume")
    async def get_volume(volume_id: str = VOLUME_ID) -> dict[str, Any]:
        return server.volume(volume_id).describe()

    @app.delete("/v1/volumes/{volume_id}", status_code=204, responses=_VOLUME_ERRORS, summary="Delete a volume")
    async def delete_volume(volume_id: str = VOLUME_ID) -> Response:
        server.delete(volume_id)
        return Response(status_code=204)

    for spec in TASK_SPECS:
        _add_task_route(app, server, spec)

    @app.post("/v1/volumes/{volume_id}/retrieve", responses=_TASK_ERRORS, operation_id="retrieve_texts",
              summary="Rank texts for this volume (M3D-CLIP)")
    async def retrieve_texts(body: RetrieveTextsRequest, volume_id: str = VOLUME_ID,
                             request_id: Optional[str] = REQUEST_ID) -> Response:
        return await server.retrieve_texts(volume_id, body, request_id)

    @app.post("/v1/retrieve", responses=_TASK_ERRORS, operation_id="retrieve_volumes",
              summary="Rank uploaded volumes for a text (M3D-CLIP)")
    async def retrieve_volumes(body: RetrieveVolumesRequest, request_id: Optional[str] = REQUEST_ID) -> Response:
        return await server.retrieve_volumes(body, request_id)

    @app.post("/v1/cancel", responses=_ERRORS, summary="Cancel one request (by id) or all running and queued ones")
    async def cancel(body: Optional[CancelRequest] = OPTIONAL_BODY) -> dict[str, Any]:
        return {"cancelled": server.queue.cancel(body.request_id if body is not None else None)}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    operation.get("responses", {}).pop("422", None)  # validation errors are 400 here
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _add_task_route(app: FastAPI, server: _Server, spec: _TaskSpec) -> None:
    body_type = Optional[spec.request] if spec.name == "report" else spec.request
    body_default = OPTIONAL_BODY if spec.name == "report" else Body()

    async def task(volume_id: str = VOLUME_ID, body: body_type = body_default,  # type: ignore[valid-type]
                   stream: bool = Query(False, description="answer as server-sent events: progress, text, result, "
                                                           "error"),
                   request_id: Optional[str] = REQUEST_ID) -> Response:
        return await server.run_task(spec, volume_id, body if body is not None else spec.request(), stream, request_id)

    app.post(f"/v1/volumes/{{volume_id}}/{spec.name}", name=spec.name, operation_id=spec.name, summary=spec.summary,
             responses={**_TASK_ERRORS, 200: {"description": "the result (JSON), or server-sent events with "
                                                             "?stream=true"}})(task)
