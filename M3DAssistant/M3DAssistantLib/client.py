"""M3DClient: the engine's task methods over HTTP, for Slicer's own process. Standard library + numpy only.

Slicer never imports torch: it talks to a worker (``m3d serve``, see :mod:`M3DAssistantLib.server`) through this
client, which offers the same typed methods as :class:`~M3DAssistantLib.engine.InferenceEngine` and returns the same
result dataclasses (:mod:`M3DAssistantLib.results`), with masks, boxes and ROIs rebuilt::

    client = M3DClient("http://127.0.0.1:8765", token)
    client.set_volume(slicer.util.arrayFromVolume(node), ijk_to_ras, window="abdomen")  # uploaded once
    client.report(on_text=print)               # streamed
    client.segment("liver").mask               # uint8 K,J,I on the volume's grid

Protocol (version :data:`PROTOCOL_VERSION`; the server's OpenAPI schema is at ``/v1/openapi.json``):

* every request carries ``Authorization: Bearer <token>``;
* the first call checks the server's protocol version (``GET /v1/info``) and refuses a mismatch with a message that
  names both versions;
* a volume is identified by its content hash (:func:`volume_id`, part of the protocol; the server passes it to the
  engine as ``content_key``). :meth:`M3DClient.set_volume` asks the server whether it has that id and uploads only
  if not: ``POST /v1/volumes`` with the raw C-order voxels (little-endian), zlib-compressed, and the headers
  ``X-M3D-Shape: K,J,I``, ``X-M3D-Dtype: int16``, ``X-M3D-IJK-To-RAS: 16 numbers, row-major`` and
  ``X-M3D-Compression: zlib`` (or ``none``);
* tasks are ``POST /v1/volumes/{id}/{task}`` with a JSON body; ``?stream=true`` answers with server-sent events
  ``progress``, ``text``, ``result`` and ``error``; retrieval is ``POST /v1/volumes/{id}/retrieve`` (texts for a
  volume) and ``POST /v1/retrieve`` (uploaded volumes for a text);
* a segmentation result carries its mask as :func:`encode_mask` describes (packbits + zlib + base64).

Errors come back as our exceptions with the server's message: 400 -> InputError (or its subclass named by the
server), 401 -> :class:`AuthenticationError`, 404 -> :class:`VolumeNotFoundError`, 409 -> CancelledError,
413 -> :class:`RequestTooLargeError`, 503 -> :class:`ServerBusyError`, other 5xx -> the M3DError subclass the server
names (e.g. ModelNotAvailableError) or :class:`ServerError`, no connection -> :class:`ServerUnavailableError`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.client
import json
import ssl
import threading
import urllib.parse
import uuid
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from . import __version__, errors
from .errors import CancelledError, InputError, M3DError
from .geometry import RasRoi, validate_volume
from .progress import ProgressCallback, ProgressEvent
from .results import (
    BoxResult,
    ChoiceResult,
    Provenance,
    RetrievalResult,
    SamplingOptions,
    SegmentationResult,
    TextResult,
)

PROTOCOL_VERSION = 1
"""Version of the HTTP protocol between :class:`M3DClient` and ``m3d serve``; bumped on any incompatible change."""

TASKS = ("report", "ask", "choose", "locate", "describe_region", "segment", "segment_expression")

# dtypes a volume travels as (little-endian); anything else is converted by the client (see _wire_array)
WIRE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

MASK_ENCODING = "packbits-zlib-base64"

TextCallback = Callable[[str], None]
Result = Union[TextResult, ChoiceResult, BoxResult, SegmentationResult, RetrievalResult]


# ------------------------------------------------------------------------------------------------------ errors
class AuthenticationError(M3DError):
    """The server refused the token (HTTP 401)."""


class VolumeNotFoundError(M3DError):
    """The server does not have this volume (HTTP 404): it was deleted, evicted, or the worker restarted."""


class RequestTooLargeError(InputError):
    """The upload or request exceeds the server's limits (HTTP 413)."""


class ServerBusyError(M3DError):
    """The server's queue is full (HTTP 503); try again when the running requests are done."""


class ServerUnavailableError(M3DError):
    """The server cannot be reached, or answered something that is not the M3D protocol."""


class ProtocolMismatchError(M3DError):
    """Client and server speak different protocol versions."""


class _NoAnswer(ServerUnavailableError):
    """The request was sent but no answer came within the timeout."""


class ServerError(M3DError):
    """The server failed on its side (HTTP 5xx other than 503); the message says what it reported."""


# ------------------------------------------------------------------------------------- wire helpers (shared)
def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask as JSON: ``{"encoding": "packbits-zlib-base64", "shape": [K, J, I], "data": str}``.

    ``data`` = base64(zlib(numpy.packbits(mask != 0 in C order, bitorder="big"))). Decode with :func:`decode_mask`,
    or by hand: ``np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(data)), np.uint8),
    count=K*J*I).reshape(K, J, I)``.
    """
    mask = np.asarray(mask)
    bits = np.packbits(np.ascontiguousarray(mask != 0).reshape(-1), bitorder="big")
    return {"encoding": MASK_ENCODING, "shape": [int(s) for s in mask.shape],
            "data": base64.b64encode(zlib.compress(bits.tobytes(), 6)).decode("ascii")}


def decode_mask(payload: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_mask`: a uint8 array of 0/1 with the encoded shape."""
    if payload.get("encoding") != MASK_ENCODING:
        raise ServerUnavailableError(f"unknown mask encoding {payload.get('encoding')!r}; expected {MASK_ENCODING}")
    shape = tuple(int(s) for s in payload["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    packed = np.frombuffer(zlib.decompress(base64.b64decode(payload["data"])), dtype=np.uint8)
    if packed.size != (count + 7) // 8:
        raise ServerUnavailableError(f"the mask holds {packed.size} bytes, not the {(count + 7) // 8} of {shape}")
    return np.unpackbits(packed, count=count, bitorder="big").reshape(shape)


def _wire_array(array_kji: Any) -> np.ndarray:
    """The volume as it travels: C-contiguous, little-endian, one of :data:`WIRE_DTYPES` (the server rebuilds
    exactly this array, so both sides hash the same bytes)."""
    array = validate_volume(array_kji)  # booleans come back as uint8
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        info = np.iinfo(np.int32)
        array = array.astype(np.int32) if info.min <= lo and hi <= info.max else array.astype(np.float64)
    if array.dtype.newbyteorder("=").name not in WIRE_DTYPES:
        raise InputError(f"volumes of dtype {array.dtype} cannot be sent; convert to one of {', '.join(WIRE_DTYPES)}")
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def volume_id(array_kji: np.ndarray, ijk_to_ras: Any) -> str:
    """The volume id of the protocol: blake2b-128 of the array as it travels (dtype, shape, C-order bytes) and of the
    IJK->RAS matrix (float64). Client and server compute it on the same bytes, so the client knows the id before
    uploading."""
    array = _wire_array(array_kji)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(np.asarray(ijk_to_ras, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _matrix(ijk_to_ras: Any) -> np.ndarray:
    try:
        matrix = np.array(ijk_to_ras, dtype=np.float64)
    except (TypeError, ValueError):
        raise errors.GeometryError(f"the IJK->RAS matrix must be a 4x4 array of numbers, got {ijk_to_ras!r}") from None
    if matrix.shape != (4, 4):
        raise errors.GeometryError(f"the IJK->RAS matrix must be 4x4, got shape {matrix.shape}")
    return matrix


def _roi_json(roi: Optional[RasRoi]) -> Optional[dict[str, Any]]:
    if roi is None:
        return None
    if not isinstance(roi, RasRoi):
        raise errors.GeometryError(f"roi must be a RasRoi, got {type(roi).__name__}")
    return {"center": [float(v) for v in roi.center], "size": [float(v) for v in roi.size],
            "axes": np.asarray(roi.axes, dtype=float).tolist()}


def _window_json(window: Any) -> Any:
    if window is None or isinstance(window, str):
        return window
    try:
        return [float(v) for v in window]
    except (TypeError, ValueError):
        raise InputError(f"window must be a preset name or a (center, width) pair, got {window!r}") from None


def _provenance(data: dict[str, Any]) -> Provenance:
    names = {f.name for f in dataclasses.fields(Provenance)}
    return Provenance(**{k: v for k, v in data.items() if k in names})


def result_from_dict(data: dict[str, Any]) -> Result:
    """Rebuild the typed result of a task from the server's JSON (the inverse of ``to_dict`` + mask)."""
    prov = _provenance(data["provenance"])
    kind = data.get("kind")
    if kind == "choice":
        return ChoiceResult(data["text"], list(data["choices"]), data.get("letter"), data.get("choice"), prov,
                            data.get("parse_error"))
    if kind == "box":
        roi = data.get("roi_ras")
        box = data.get("box")
        return BoxResult(data["text"], data["target"], tuple(float(v) for v in box) if box is not None else None,
                         RasRoi(roi["center"], roi["size"], roi["axes"]) if roi is not None else None, prov,
                         bool(data.get("absent")), data.get("parse_error"))
    if kind == "segmentation":
        mask = decode_mask(data["mask"]) if data.get("mask") is not None else None
        return SegmentationResult(data["text"], data["target"], mask, prov, bool(data.get("absent")),
                                  data.get("parse_error"))
    if kind == "text":
        return TextResult(data["text"], prov)
    if kind == "retrieval":
        return RetrievalResult(data["query"], [(int(r["index"]), str(r["label"]), float(r["score"]))
                                               for r in data["ranking"]], prov)
    raise ServerUnavailableError(f"the server sent a result of unknown kind {kind!r}")


# ------------------------------------------------------------------------------------------------ the client
@dataclasses.dataclass(frozen=True)
class RemoteVolume:
    """What :meth:`M3DClient.set_volume` registered on the server."""

    volume_id: str
    shape: tuple[int, int, int]
    uploaded: bool  # False when the server already had this content


@dataclasses.dataclass
class _CurrentVolume:
    remote: RemoteVolume
    array: np.ndarray  # the wire array, kept to re-upload if the server lost it (restart, eviction)
    ijk_to_ras: np.ndarray
    options: dict[str, Any]


class M3DClient:
    """The engine's task methods, answered by an ``m3d serve`` worker. Thread-safe: one client may run requests
    from a worker thread while another thread calls :meth:`cancel`.

    Args:
        url: the server's base URL, e.g. the ``url`` of its ``M3D_SERVER_READY`` line.
        token: the server's bearer token.
        timeout: seconds to wait for any single read (a whole non-streamed answer must arrive within it; streamed
            answers only need events to keep coming).
        connect_timeout: seconds to wait for the connection and for quick calls (health, info, uploads' checks).
        ca_file: for an ``https://`` server, the certificate (or its CA's) to trust in addition to the system's --
            what a server started with ``--ssl-certfile`` and a self-signed certificate needs.
    """

    def __init__(self, url: str, token: str, *, timeout: float = 600.0, connect_timeout: float = 10.0,
                 ca_file: Optional[str] = None):
        parts = urllib.parse.urlsplit(url if "//" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"the server URL must look like http://127.0.0.1:8765, got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._netloc, self._prefix = parts.netloc, parts.path.rstrip("/")
        self._token = str(token)
        self._tls = None
        if parts.scheme == "https":
            try:  # verified against the system's CAs, plus ca_file; never unverified
                self._tls = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise InputError(f"cannot use {ca_file!r} as the server's certificate: {e}; give the PEM file the "
                                 f"server was started with (--ssl-certfile) or its CA's") from None
        elif ca_file:
            raise InputError(f"ca_file is for https:// servers; {self.url} is plain http")
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self._info: Optional[dict[str, Any]] = None
        self._volume: Optional[_CurrentVolume] = None
        self._lock = threading.Lock()
        self._active: set[str] = set()  # request ids in flight, for cancel()

    def __repr__(self) -> str:
        return f"M3DClient({self.url!r})"

    # ----------------------------------------------------------------------------------------------- transport
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._tls is not None:
            return http.client.HTTPSConnection(self._netloc, timeout=timeout, context=self._tls)
        return http.client.HTTPConnection(self._netloc, timeout=timeout)

    def _send(self, method: str, path: str, *, body: Union[bytes, Iterable[bytes], None] = None,
              headers: Optional[dict[str, str]] = None, timeout: Optional[float] = None
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request; returns the open connection and response (status < 400), else raises our exception."""
        all_headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json",
                       "User-Agent": f"m3d-slicer-client/{__version__}"}
        all_headers.update(headers or {})
        seconds = self.timeout if timeout is None else timeout
        conn = self._connection(seconds)
        try:
            conn.request(method, self._prefix + path, body=body, headers=all_headers)
            response = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise _NoAnswer(f"no answer from the M3D server at {self.url} within {seconds:g} s") from None
        except (ssl.SSLError, ssl.CertificateError) as e:
            conn.close()
            raise ServerUnavailableError(
                f"the TLS connection to {self.url} failed ({e}); if the server uses a self-signed certificate, "
                f"pass its certificate file as ca_file (in Slicer: the remote server's certificate setting)"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ServerUnavailableError(
                f"cannot reach the M3D server at {self.url} ({type(e).__name__}: {e}); check that the worker "
                f"(m3d serve) is running and the URL and port are right"
            ) from None
        except BaseException:  # e.g. the upload stream stopped at the size limit
            conn.close()
            raise
        if response.status >= 400:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            finally:
                conn.close()
            _raise_for_status(response.status, raw, self.url, method, path)
        return conn, response

    def _json(self, method: str, path: str, payload: Any = None, *, timeout: Optional[float] = None,
              headers: Optional[dict[str, str]] = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        hdrs = dict(headers or {})
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        conn, response = self._send(method, path, body=body, headers=hdrs, timeout=timeout)
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ServerUnavailableError(f"the M3D server at {self.url} stopped answering ({e})") from None
        finally:
            conn.close()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerUnavailableError(f"{self.url}{path} did not answer JSON; is this an M3D server?") from None

    # ------------------------------------------------------------------------------------------ server state
    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: status, protocol, whether a request runs and how many wait."""
        return self._json("GET", "/v1/health", timeout=self.connect_timeout)

    def info(self) -> dict[str, Any]:
        """What the server runs (model, device, dtype, limits) after the protocol handshake."""
        self._handshake()
        assert self._info is not None
        return dict(self._info)

    def _handshake(self) -> None:
        if self._info is not None:
            return
        info = self._json("GET", "/v1/info", timeout=self.connect_timeout)
        if not isinstance(info, dict) or "protocol" not in info:
            raise ServerUnavailableError(f"{self.url} answered /v1/info without a protocol version; is this an M3D "
                                         f"server?")
        if info["protocol"] != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                f"the M3D server at {self.url} speaks protocol {info['protocol']} (m3d-slicer "
                f"{info.get('server_version', '?')}) but this client speaks protocol {PROTOCOL_VERSION} (m3d-slicer "
                f"{__version__}); install the same m3d-slicer version on both sides, or restart the worker from "
                f"this installation"
            )
        self._info = info

    # ------------------------------------------------------------------------------------------------ volumes
    def has_volume(self, volume_id_: str) -> bool:
        """Whether the server holds this volume id."""
        self._handshake()
        try:
            self._json("GET", f"/v1/volumes/{volume_id_}", timeout=self.connect_timeout)
        except VolumeNotFoundError:
            return False
        return True

    def upload_volume(self, array_kji: np.ndarray, ijk_to_ras: Any) -> str:
        """Upload a volume (always) and return its id."""
        self._handshake()
        array, matrix = _wire_array(array_kji), _matrix(ijk_to_ras)
        expected = volume_id(array, matrix)
        limits = (self._info or {}).get("limits", {})
        mib = 1 << 20
        # The server checks these too; checking here first gives the message without sending hundreds of MB.
        if max(array.shape) > limits.get("max_dim", np.inf) or array.nbytes > limits.get("max_volume_bytes", np.inf):
            raise RequestTooLargeError(
                f"the volume {array.shape} of {array.dtype.name} is {array.nbytes / mib:.1f} MiB but the server at "
                f"{self.url} accepts at most {limits['max_volume_bytes'] / mib:.1f} MiB and {limits['max_dim']} "
                f"voxels along an axis; crop it (ROI, slice range) or restart the server with a larger --max-volume-mb"
            )
        body = self._compressed_chunks(array, limits.get("max_upload_bytes", np.inf))
        headers = {"Content-Type": "application/octet-stream", "X-M3D-Shape": ",".join(map(str, array.shape)),
                   "X-M3D-Dtype": array.dtype.newbyteorder("=").name, "X-M3D-Compression": "zlib",
                   "X-M3D-IJK-To-RAS": ",".join(repr(float(v)) for v in matrix.ravel())}
        answer = self._upload(body, headers)
        if answer.get("volume_id") != expected:
            raise ServerUnavailableError(f"the server stored the volume as {answer.get('volume_id')!r}, not "
                                         f"{expected!r}; client and server hash volumes differently (versions?)")
        return expected

    def _compressed_chunks(self, array: np.ndarray, limit: float, chunk_bytes: int = 8 << 20) -> Iterator[bytes]:
        """The zlib stream of ``array``'s bytes, compressed while it is sent (chunked transfer): never the whole
        compressed volume in memory. Stops with RequestTooLargeError once it passes the server's upload limit."""
        raw = memoryview(array).cast("B")
        compressor = zlib.compressobj(1)
        sent = 0
        for start in range(0, len(raw), chunk_bytes):
            out = compressor.compress(raw[start:start + chunk_bytes])
            out += compressor.flush() if start + chunk_bytes >= len(raw) else b""
            sent += len(out)
            if sent > limit:
                mib = 1 << 20
                raise RequestTooLargeError(
                    f"the compressed volume is over {sent / mib:.1f} MiB but the server at {self.url} accepts uploads "
                    f"of at most {limit / mib:.1f} MiB; crop it or restart the server with a larger --max-upload-mb"
                )
            if out:
                yield out

    def _upload(self, body: Iterable[bytes], headers: dict[str, str]) -> dict[str, Any]:
        conn, response = self._send("POST", "/v1/volumes", body=body, headers=headers)
        try:
            return json.loads(response.read())
        except (ValueError, OSError, http.client.HTTPException) as e:
            raise ServerUnavailableError(f"the upload to {self.url} got no proper answer ({e})") from None
        finally:
            conn.close()

    def set_volume(self, array_kji: np.ndarray, ijk_to_ras: Any, *, window: Any = None, roi: Optional[RasRoi] = None,
                   slice_range: Optional[tuple[int, int]] = None, content_key: Optional[str] = None) -> RemoteVolume:
        """Make this volume the current one; it is uploaded only if the server does not have it yet.

        ``window``, ``roi`` and ``slice_range`` are the preprocessing used by every later task, as in the engine.
        ``content_key``: :func:`volume_id` of the volume if the caller already computed it.
        """
        array, matrix = _wire_array(array_kji), _matrix(ijk_to_ras)
        key = content_key or volume_id(array, matrix)
        options = {"window": _window_json(window), "roi": _roi_json(roi),
                   "slice_range": [int(v) for v in slice_range] if slice_range is not None else None}
        uploaded = False
        if not self.has_volume(key):
            self.upload_volume(array, matrix)
            uploaded = True
        remote = RemoteVolume(key, tuple(int(s) for s in array.shape), uploaded)  # type: ignore[arg-type]
        with self._lock:
            self._volume = _CurrentVolume(remote, array, matrix, options)
        return remote

    def forget_volume(self, volume_id_: Optional[str] = None) -> None:
        """Delete a volume from the server (the current one by default)."""
        with self._lock:
            current = self._volume
        key = volume_id_ or (current.remote.volume_id if current else None)
        if key is None:
            return
        try:
            self._json("DELETE", f"/v1/volumes/{key}", timeout=self.connect_timeout)
        except VolumeNotFoundError:
            pass
        if current is not None and current.remote.volume_id == key:
            with self._lock:
                self._volume = None

    # -------------------------------------------------------------------------------------------------- tasks
    def report(self, *, sampling: Optional[SamplingOptions] = None, on_text: Optional[TextCallback] = None,
               on_progress: Optional[ProgressCallback] = None) -> TextResult:
        """Report generation for the current volume."""
        return self._task("report", {}, sampling, on_text, on_progress)  # type: ignore[return-value]

    def ask(self, question: str, history: Sequence[tuple[str, str]] = (), *,
            sampling: Optional[SamplingOptions] = None, on_text: Optional[TextCallback] = None,
            on_progress: Optional[ProgressCallback] = None) -> TextResult:
        """Open VQA; ``history`` = earlier (question, answer) turns (experimental)."""
        body = {"question": question, "history": [[str(q), str(a)] for q, a in history]}
        return self._task("ask", body, sampling, on_text, on_progress)  # type: ignore[return-value]

    def choose(self, question: str, choices: Sequence[str], *, sampling: Optional[SamplingOptions] = None,
               on_text: Optional[TextCallback] = None, on_progress: Optional[ProgressCallback] = None) -> ChoiceResult:
        """Closed VQA: which of ``choices`` answers the question."""
        body = {"question": question, "choices": list(choices)}
        return self._task("choose", body, sampling, on_text, on_progress)  # type: ignore[return-value]

    def locate(self, expression: str, *, sampling: Optional[SamplingOptions] = None,
               on_text: Optional[TextCallback] = None, on_progress: Optional[ProgressCallback] = None) -> BoxResult:
        """Referring-expression comprehension: a box and its RAS ROI."""
        return self._task("locate", {"expression": expression}, sampling, on_text, on_progress)  # type: ignore

    def describe_region(self, roi: RasRoi, *, sampling: Optional[SamplingOptions] = None,
                        on_text: Optional[TextCallback] = None,
                        on_progress: Optional[ProgressCallback] = None) -> TextResult:
        """Referring-expression generation for an RAS box."""
        return self._task("describe_region", {"region": _roi_json(roi)}, sampling, on_text, on_progress)  # type: ignore

    def segment(self, target: str, *, sampling: Optional[SamplingOptions] = None,
                on_text: Optional[TextCallback] = None,
                on_progress: Optional[ProgressCallback] = None) -> SegmentationResult:
        """Semantic segmentation: a mask on the volume's grid."""
        return self._task("segment", {"target": target}, sampling, on_text, on_progress)  # type: ignore

    def segment_expression(self, expression: str, *, sampling: Optional[SamplingOptions] = None,
                           on_text: Optional[TextCallback] = None,
                           on_progress: Optional[ProgressCallback] = None) -> SegmentationResult:
        """Referring-expression segmentation."""
        return self._task("segment_expression", {"expression": expression}, sampling, on_text, on_progress)  # type: ignore

    def retrieve(self, *, texts: Optional[Sequence[str]] = None, text: Optional[str] = None,
                 volumes: Optional[Sequence[tuple[np.ndarray, Any]]] = None,
                 labels: Optional[Sequence[str]] = None) -> RetrievalResult:
        """M3D-CLIP retrieval, as ``InferenceEngine.retrieve``: rank ``texts`` for the current volume, or ``volumes``
        (each ``(array_kji, ijk_to_ras)``, uploaded if the server lacks them) for ``text``. The current volume's
        window is used, as in the engine."""
        self._handshake()
        with self._lock:
            current = self._volume
        window = current.options["window"] if current is not None else None
        extra = {"labels": list(labels)} if labels is not None else {}
        if texts is not None:
            if current is None:
                raise InputError("no volume is set; call set_volume(array, ijk_to_ras) first.")
            payload = {"texts": list(texts), "window": window, **extra}
            path = f"/v1/volumes/{current.remote.volume_id}/retrieve"
            try:
                return result_from_dict(self._json("POST", path, payload))  # type: ignore[return-value]
            except VolumeNotFoundError:
                self.upload_volume(current.array, current.ijk_to_ras)
                return result_from_dict(self._json("POST", path, payload))  # type: ignore[return-value]
        if text is not None and volumes is not None:
            ids = []
            for array, ijk_to_ras in volumes:
                wire, matrix = _wire_array(array), _matrix(ijk_to_ras)
                key = volume_id(wire, matrix)
                if not self.has_volume(key):
                    self.upload_volume(wire, matrix)
                ids.append(key)
            payload = {"text": text, "volume_ids": ids, "window": window, **extra}
            return result_from_dict(self._json("POST", "/v1/retrieve", payload))  # type: ignore[return-value]
        raise InputError("retrieve needs texts=[...] (ranked for the current volume) or text=... with volumes=[...].")

    def stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Union[str, Result]]:
        """Yield a task's text as it is generated, then its typed result (as ``InferenceEngine.stream``)."""
        if method not in TASKS:
            raise InputError(f"{method!r} is not a streamable task; use one of {', '.join(TASKS)}")
        items: list[str] = []
        holder: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                holder["result"] = getattr(self, method)(*args, on_text=items.append, **kwargs)
            except BaseException as e:  # handed to the consumer
                holder["error"] = e
            finally:
                done.set()

        # Iterating the SSE stream directly would tie the HTTP read to the consumer's pace; a thread keeps it simple.
        thread = threading.Thread(target=work, name=f"m3d-client-{method}", daemon=True)
        thread.start()
        sent = 0
        while True:
            finished = done.wait(0.02)
            while sent < len(items):
                yield items[sent]
                sent += 1
            if finished:
                break
        if "error" in holder:
            raise holder["error"]
        yield holder["result"]

    def cancel(self, *, everything: bool = False) -> dict[str, Any]:
        """Stop this client's running or queued requests (they raise CancelledError). ``everything=True`` cancels
        every request on the server, from any client."""
        if everything:
            return self._json("POST", "/v1/cancel", {}, timeout=self.connect_timeout)
        with self._lock:
            active = sorted(self._active)
        cancelled: list[str] = []
        for request_id in active:
            answer = self._json("POST", "/v1/cancel", {"request_id": request_id}, timeout=self.connect_timeout)
            cancelled += answer.get("cancelled", [])
        return {"cancelled": cancelled}

    # ------------------------------------------------------------------------------------------- task plumbing
    def _task(self, task: str, body: dict[str, Any], sampling: Optional[SamplingOptions],
              on_text: Optional[TextCallback], on_progress: Optional[ProgressCallback]) -> Result:
        self._handshake()
        with self._lock:
            current = self._volume
        if current is None:
            raise InputError("no volume is set; call set_volume(array, ijk_to_ras) first.")
        payload = dict(current.options, **body)
        if sampling is not None:
            payload["sampling"] = sampling.to_dict()
        try:
            return self._request_task(task, current.remote.volume_id, payload, on_text, on_progress)
        except VolumeNotFoundError:
            # The worker restarted or evicted the volume: upload it again, once.
            self.upload_volume(current.array, current.ijk_to_ras)
            return self._request_task(task, current.remote.volume_id, payload, on_text, on_progress)

    def _request_task(self, task: str, key: str, payload: dict[str, Any], on_text: Optional[TextCallback],
                      on_progress: Optional[ProgressCallback]) -> Result:
        request_id = uuid.uuid4().hex
        stream = on_text is not None or on_progress is not None
        path = f"/v1/volumes/{key}/{task}" + ("?stream=true" if stream else "")
        headers = {"Content-Type": "application/json", "X-M3D-Request-Id": request_id}
        if stream:
            headers["Accept"] = "text/event-stream"
        with self._lock:
            self._active.add(request_id)
        timed_out = ServerUnavailableError(f"no answer from {self.url} within {self.timeout:g} s; the request was "
                                           f"cancelled (give the client a longer timeout for long answers)")
        try:
            try:
                conn, response = self._send("POST", path, body=json.dumps(payload).encode("utf-8"), headers=headers)
            except _NoAnswer:
                self._cancel_quietly(request_id)
                raise timed_out from None
            try:
                if not stream:
                    return result_from_dict(json.loads(response.read()))
                return self._read_events(response, on_text, on_progress)
            except TimeoutError:
                self._cancel_quietly(request_id)
                raise timed_out from None
            except (OSError, http.client.HTTPException) as e:
                raise ServerUnavailableError(f"the connection to {self.url} broke during {task} ({e}); the worker "
                                             f"may have stopped") from None
            finally:
                conn.close()
        finally:
            with self._lock:
                self._active.discard(request_id)

    def _cancel_quietly(self, request_id: str) -> None:
        try:
            self._json("POST", "/v1/cancel", {"request_id": request_id}, timeout=self.connect_timeout)
        except M3DError:
            pass

    def _read_events(self, response: http.client.HTTPResponse, on_text: Optional[TextCallback],
                     on_progress: Optional[ProgressCallback]) -> Result:
        for event, data in _sse_events(response):
            if event == "text":
                if on_text is not None:
                    on_text(data["text"])
            elif event == "progress":
                if on_progress is not None:
                    on_progress(ProgressEvent(data["stage"], data.get("fraction"), data.get("message", "")))
            elif event == "result":
                return result_from_dict(data)
            elif event == "error":
                _raise_for_status(int(data.get("status", 500)), json.dumps(data).encode(), self.url, "POST", "")
        raise ServerUnavailableError(f"the stream from {self.url} ended without a result; the worker may have stopped")


def _sse_events(response: http.client.HTTPResponse) -> Iterator[tuple[str, Any]]:
    """Server-sent events as (event name, decoded JSON data)."""
    event, data = "message", []
    while True:
        raw = response.readline()
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def _raise_for_status(status: int, raw: bytes, url: str, method: str, path: str) -> None:
    """Turn an HTTP error answer into our exception, with the server's message."""
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"detail": raw[:300].decode("utf-8", "replace")}
    if not isinstance(body, dict):
        body = {"detail": str(body)}
    detail = body.get("detail") or f"HTTP {status}"
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    name = body.get("error", "")
    if status == 400:
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, InputError)):
            cls = InputError
        raise cls(detail)
    if status == 401:
        raise AuthenticationError(f"the M3D server at {url} refused the token: {detail}")
    if status == 404:
        if name == "VolumeNotFoundError":
            raise VolumeNotFoundError(detail)
        raise ServerUnavailableError(f"{url} has no {method} {path} ({detail}); is this an M3D server of protocol "
                                     f"{PROTOCOL_VERSION}?")
    if status == 409:
        raise CancelledError(detail)
    if status == 413:
        raise RequestTooLargeError(detail)
    if status == 503:
        raise ServerBusyError(detail)
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, M3DError) and cls is not M3DError:
        raise cls(f"{detail} (on the M3D server at {url})")  # e.g. ModelNotAvailableError for a missing CLIP
    raise ServerError(f"the M3D server at {url} failed (HTTP {status}): {detail}")


__all__ = [
    "PROTOCOL_VERSION", "TASKS", "M3DClient", "RemoteVolume", "AuthenticationError", "VolumeNotFoundError",
    "RequestTooLargeError", "ServerBusyError", "ServerUnavailableError", "ProtocolMismatchError", "ServerError",
    "encode_mask", "decode_mask", "volume_id", "result_from_dict",
]
