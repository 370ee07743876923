"""M3DClient: the engine's task methods over HTTP, for Slicer's own process. Standard library + numpy only.

Slicer never imports torch: it talks to a worker (``m3d serve``, see :mod:`.server`) through this client, which
offers the same typed methods as :class:`~M3DAssistantLib.engine.InferenceEngine` and returns the same result
dataclasses (:mod:`M3DAssistantLib.results`), with masks, boxes and ROIs rebuilt::

    client = M3DClient("http://127.0.0.1:8765", token)
    client.set_volume(slicer.util.arrayFromVolume(node), ijk_to_ras, window="abdomen")  # uploaded once
    client.set_display(DisplayWindow(40, 400, "Slicer"), "CT")  # a new window/level: nothing is uploaded
    client.report(on_text=print)               # streamed
    client.segment("liver").mask               # uint8 K,J,I on the volume's grid

What travels is :mod:`.protocol`. Errors come back as our exceptions with the server's message (defined there and
importable from here): 400 -> InputError (or its subclass named by the server), 401 -> :class:`AuthenticationError`,
404 -> :class:`VolumeNotFoundError`, 409 -> CancelledError, 413 -> :class:`RequestTooLargeError`,
503 -> :class:`ServerBusyError`, other 5xx -> the M3DError subclass the server names (e.g. ModelNotAvailableError) or
:class:`ServerError`, no connection -> :class:`ServerUnavailableError`. :meth:`M3DClient.abort` ends every wait at once
(a cancel, a hung server).

Why this file is long: one class offers the engine's whole API over HTTP (a typed, documented method per task, the
volume and its display, retrieval, the self-check, cancel) on one transport and its error mapping; splitting it would
split that class.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import http.client
import json
import socket
import ssl
import threading
import urllib.parse
import uuid
import warnings
import weakref
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .. import __version__
from ..errors import CancelledError, InputError, M3DError
from ..geometry import RasRoi
from ..progress import ProgressCallback, ProgressEvent
from ..results import (
    AnalysisOptions,
    BoxResult,
    ChoiceResult,
    RetrievalResult,
    SamplingOptions,
    SegmentationResult,
    TextResult,
)
from ..tasks import ASK, CHOOSE, DESCRIBE_REGION, LOCATE, REPORT, SEGMENT, SEGMENT_EXPRESSION, STREAMING_TASKS, Task
from ..tasks import get as get_task
from .protocol import (
    FEATURE_DISPLAY_WINDOW,
    FEATURE_SELFCHECK,
    PROTOCOL_VERSION,
    AuthenticationError,
    ProtocolMismatchError,
    RequestTooLargeError,
    Result,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
    VolumeNotFoundError,
    analysis_json,
    display_window_json,
    modality_json,
    raise_for_status,
    request_body,
    result_from_dict,
    roi_json,
    sse_events,
    volume_id,
    window_json,
    wire_array,
    wire_matrix,
)
from .trust import plain_http_warning

if TYPE_CHECKING:
    from ..selfcheck import SelfCheckReport

TextCallback = Callable[[str], None]


class InsecureTransportWarning(UserWarning):
    """The server is another machine reached over plain http: the token and the voxels travel in clear."""


class _NoAnswer(ServerUnavailableError):
    """The request was sent but no answer came within the timeout."""


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
    options: dict[str, Any]  # window, roi, slice_range as they travel
    display: dict[str, Any] = dataclasses.field(default_factory=dict)  # display_window, modality as they travel


def _is_hostname_mismatch(error: BaseException) -> bool:
    """OpenSSL's verdict X509_V_ERR_HOSTNAME_MISMATCH (62) or X509_V_ERR_IP_ADDRESS_MISMATCH (64: the URL names an IP
    address the certificate does not list), or the matching message of older Pythons."""
    text = str(error).lower()
    return getattr(error, "verify_code", None) in (62, 64) or "mismatch" in text or "doesn't match" in text


class M3DClient:
    """The engine's task methods, answered by an ``m3d serve`` worker. Thread-safe: one client may run requests
    from a worker thread while another thread calls :meth:`cancel`.

    Args:
        url: the server's base URL, e.g. the ``url`` of its ``M3D_SERVER_READY`` line. A plain ``http://`` URL of
            another machine works but gives an :class:`InsecureTransportWarning` (and ``transport_warning``): the
            token and the images would travel in clear.
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
        self.transport_warning = plain_http_warning(self.url)
        """Why this connection is not private (plain http to another machine), or None: shown by the panel."""
        if self.transport_warning:
            warnings.warn(self.transport_warning, InsecureTransportWarning, stacklevel=2)
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self._info: Optional[dict[str, Any]] = None
        self._volume: Optional[_CurrentVolume] = None
        self._lock = threading.Lock()
        self._active: set[str] = set()  # request ids in flight, for cancel()
        self._open: "weakref.WeakSet[http.client.HTTPConnection]" = weakref.WeakSet()  # for abort()
        self._abort_epoch = 0
        self._abort_errors: dict[int, BaseException] = {}

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
        with self._lock:
            conn._m3d_epoch = self._abort_epoch  # type: ignore[attr-defined]
            self._open.add(conn)
        try:
            with self._abortable(conn):
                conn.request(method, self._prefix + path, body=body, headers=all_headers)
                self._raise_if_aborted(conn)  # an abort() that came before the socket existed
                response = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise _NoAnswer(f"no answer from the M3D server at {self.url} within {seconds:g} s") from None
        except (ssl.SSLError, ssl.CertificateError) as e:
            conn.close()
            if _is_hostname_mismatch(e):
                raise ServerUnavailableError(
                    f"the TLS certificate of {self.url} is not made for the host name "
                    f"{urllib.parse.urlsplit(self.url).hostname!r} (hostname mismatch: {e}); connect with a name the "
                    f"certificate lists (its subjectAltName), or make a certificate for this name") from None
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
            raise_for_status(response.status, raw, self.url, method, path)
        return conn, response

    # ---------------------------------------------------------------------------------------------------- abort
    def abort(self, error: Optional[BaseException] = None) -> None:
        """End every wait of this client now, from any thread: the connections of its running calls are shut, and
        those calls raise ``error`` (default CancelledError) instead of waiting for an answer -- also from a server
        that stopped responding. The server is not told: :meth:`cancel` does that. Later calls are not affected."""
        with self._lock:
            self._abort_epoch += 1
            self._abort_errors[self._abort_epoch] = error if error is not None else CancelledError("cancelled")
            connections = list(self._open)
        for conn in connections:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
                except OSError:
                    pass

    def _aborted(self, conn: http.client.HTTPConnection) -> Optional[BaseException]:
        """The error of the first abort() since ``conn`` was opened (a copy per caller), or None."""
        epoch = getattr(conn, "_m3d_epoch", None)
        with self._lock:
            if epoch is None or epoch >= self._abort_epoch:
                return None
            return copy.copy(self._abort_errors[epoch + 1])

    def _raise_if_aborted(self, conn: http.client.HTTPConnection) -> None:
        error = self._aborted(conn)
        if error is not None:
            conn.close()
            raise error

    @contextlib.contextmanager
    def _abortable(self, conn: http.client.HTTPConnection) -> Iterator[None]:
        """Whatever a call on ``conn`` raises after an abort() becomes the abort's error."""
        try:
            yield
        except Exception:
            error = self._aborted(conn)
            if error is None:
                raise
            conn.close()
            raise error from None

    def _json(self, method: str, path: str, payload: Any = None, *, timeout: Optional[float] = None,
              headers: Optional[dict[str, str]] = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        hdrs = dict(headers or {})
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        conn, response = self._send(method, path, body=body, headers=hdrs, timeout=timeout)
        try:
            with self._abortable(conn):
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
        array, matrix = wire_array(array_kji), wire_matrix(ijk_to_ras)
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
            with self._abortable(conn):
                return json.loads(response.read())
        except (ValueError, OSError, http.client.HTTPException) as e:
            raise ServerUnavailableError(f"the upload to {self.url} got no proper answer ({e})") from None
        finally:
            conn.close()

    def set_volume(self, array_kji: np.ndarray, ijk_to_ras: Any, *, window: Any = None, roi: Optional[RasRoi] = None,
                   slice_range: Optional[tuple[int, int]] = None, content_key: Optional[str] = None,
                   display_window: Any = None, modality: Optional[str] = None) -> RemoteVolume:
        """Make this volume the current one; it is uploaded only if the server does not have it yet.

        ``window``, ``roi`` and ``slice_range`` are the preprocessing used by every later task, as in the engine;
        ``display_window`` and ``modality`` as :meth:`set_display`.
        ``content_key``: :func:`volume_id` of the volume if the caller already computed it.
        """
        array, matrix = wire_array(array_kji), wire_matrix(ijk_to_ras)
        key = content_key or volume_id(array, matrix)
        options = {"window": window_json(window), "roi": roi_json(roi),
                   "slice_range": [int(v) for v in slice_range] if slice_range is not None else None}
        display = self._display(display_window, modality)
        uploaded = False
        if not self.has_volume(key):
            self.upload_volume(array, matrix)
            uploaded = True
        remote = RemoteVolume(key, tuple(int(s) for s in array.shape), uploaded)  # type: ignore[arg-type]
        with self._lock:
            self._volume = _CurrentVolume(remote, array, matrix, options, display)
        return remote

    def set_display(self, display_window: Any = None, modality: Optional[str] = None) -> None:
        """How the reader sees the current volume -- its display window (a
        :class:`~M3DAssistantLib.preprocessing.DisplayWindow` or ``(center, width)``: Slicer's window/level, the DICOM
        WindowCenter/Width) and its DICOM Modality -- for the tasks whose default window is the display window
        (report, VQA, retrieval), as ``InferenceEngine.set_display``. Nothing is sent now: they travel with the next
        requests (the voxels are not uploaded again)."""
        display = self._display(display_window, modality)
        with self._lock:
            if self._volume is None:
                raise InputError("no volume is set; call set_volume(array, ijk_to_ras) first.")
            self._volume = dataclasses.replace(self._volume, display=display)

    @staticmethod
    def _display(display_window: Any, modality: Optional[str]) -> dict[str, Any]:
        return {"display_window": display_window_json(display_window), "modality": modality_json(modality)}

    def _volume_options(self, current: _CurrentVolume) -> dict[str, Any]:
        """The volume's options of a request: the display window and modality only when they are known and no window
        is chosen (a chosen window overrides every default), so that a server older than them still answers when
        the user picked a window."""
        options = dict(current.options)
        if options.get("window") is None:
            options.update({k: v for k, v in current.display.items() if v is not None})
        if "display_window" in options or "modality" in options:
            self._require(FEATURE_DISPLAY_WINDOW, "the volume's display window and modality (the default window of "
                                                  "report, VQA and retrieval)",
                          "or choose an intensity window (a preset, or --window), which needs neither")
        return options

    def _require(self, feature: str, what: str, alternative: str = "") -> None:
        """ProtocolMismatchError naming both versions when the server lacks an optional feature of the protocol."""
        self._handshake()
        info = self._info or {}
        if feature not in info.get("features", ()):
            raise ProtocolMismatchError(
                f"the M3D server at {self.url} (m3d-slicer {info.get('server_version', '?')}, protocol "
                f"{info.get('protocol')}) does not take {what}: it is older than this client (m3d-slicer "
                f"{__version__}, feature {feature!r}). Update m3d-slicer where the server runs and restart it"
                + (f", {alternative}" if alternative else "") + "."
            )

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
    def run_task(self, task: Union[Task, str], *arguments: Any, sampling: Optional[SamplingOptions] = None,
                 on_text: Optional[TextCallback] = None, on_progress: Optional[ProgressCallback] = None,
                 analysis: Optional[AnalysisOptions] = None) -> Result:
        """Any streaming task of the registry (a :class:`~M3DAssistantLib.tasks.Task` or any of its names) on the
        current volume, with the engine method's arguments: ``client.run_task("segment", "liver")`` is
        ``client.segment("liver")``. The task methods below are this with their own signatures.
        ``POST /v1/volumes/{id}/{task.key}``, streamed when ``on_text`` or ``on_progress`` is given; ``analysis``
        (:class:`~M3DAssistantLib.results.AnalysisOptions`) travels as the request's ``analysis`` object."""
        task = task if isinstance(task, Task) else get_task(task)
        if not task.streams:
            raise InputError(f"{task.key} has no task route; use retrieve() for M3D-CLIP")
        required = sum(argument.required for argument in task.arguments)
        if not required <= len(arguments) <= len(task.arguments):
            raise TypeError(f"{task.key} takes {', '.join(a.name for a in task.arguments) or 'no arguments'}; "
                            f"got {len(arguments)} argument(s)")
        if analysis is not None:
            task.check_analysis(analysis)  # an option the task does not take fails here, before anything is sent
        return self._task(task, arguments, sampling, on_text, on_progress, analysis)

    def report(self, *, sampling: Optional[SamplingOptions] = None, on_text: Optional[TextCallback] = None,
               on_progress: Optional[ProgressCallback] = None,
               analysis: Optional[AnalysisOptions] = None) -> TextResult:
        """Report generation for the current volume."""
        return self.run_task(REPORT, sampling=sampling, on_text=on_text, on_progress=on_progress,
                             analysis=analysis)  # type: ignore[return-value]

    def ask(self, question: str, history: Sequence[tuple[str, str]] = (), *,
            sampling: Optional[SamplingOptions] = None, on_text: Optional[TextCallback] = None,
            on_progress: Optional[ProgressCallback] = None,
            analysis: Optional[AnalysisOptions] = None) -> TextResult:
        """Open VQA; ``history`` = earlier (question, answer) turns (experimental)."""
        return self.run_task(ASK, question, history, sampling=sampling, on_text=on_text,
                             on_progress=on_progress, analysis=analysis)  # type: ignore[return-value]

    def choose(self, question: str, choices: Sequence[str], *, sampling: Optional[SamplingOptions] = None,
               on_text: Optional[TextCallback] = None, on_progress: Optional[ProgressCallback] = None,
               analysis: Optional[AnalysisOptions] = None) -> ChoiceResult:
        """Closed VQA: which of ``choices`` answers the question."""
        return self.run_task(CHOOSE, question, choices, sampling=sampling, on_text=on_text,
                             on_progress=on_progress, analysis=analysis)  # type: ignore[return-value]

    def locate(self, expression: str, *, sampling: Optional[SamplingOptions] = None,
               on_text: Optional[TextCallback] = None, on_progress: Optional[ProgressCallback] = None,
               analysis: Optional[AnalysisOptions] = None) -> BoxResult:
        """Referring-expression comprehension: a box and its RAS ROI."""
        return self.run_task(LOCATE, expression, sampling=sampling, on_text=on_text,
                             on_progress=on_progress, analysis=analysis)  # type: ignore[return-value]

    def describe_region(self, roi: RasRoi, *, sampling: Optional[SamplingOptions] = None,
                        on_text: Optional[TextCallback] = None,
                        on_progress: Optional[ProgressCallback] = None,
                        analysis: Optional[AnalysisOptions] = None) -> TextResult:
        """Referring-expression generation for an RAS box."""
        return self.run_task(DESCRIBE_REGION, roi, sampling=sampling, on_text=on_text,
                             on_progress=on_progress, analysis=analysis)  # type: ignore[return-value]

    def segment(self, target: str, *, sampling: Optional[SamplingOptions] = None,
                on_text: Optional[TextCallback] = None,
                on_progress: Optional[ProgressCallback] = None,
                analysis: Optional[AnalysisOptions] = None) -> SegmentationResult:
        """Semantic segmentation: a mask on the volume's grid."""
        return self.run_task(SEGMENT, target, sampling=sampling, on_text=on_text,
                             on_progress=on_progress, analysis=analysis)  # type: ignore[return-value]

    def segment_expression(self, expression: str, *, sampling: Optional[SamplingOptions] = None,
                           on_text: Optional[TextCallback] = None,
                           on_progress: Optional[ProgressCallback] = None,
                           analysis: Optional[AnalysisOptions] = None) -> SegmentationResult:
        """Referring-expression segmentation."""
        return self.run_task(SEGMENT_EXPRESSION, expression, sampling=sampling, on_text=on_text,
                             on_progress=on_progress, analysis=analysis)  # type: ignore

    def retrieve(self, *, texts: Optional[Sequence[str]] = None, text: Optional[str] = None,
                 volumes: Optional[Sequence[tuple[np.ndarray, Any]]] = None,
                 labels: Optional[Sequence[str]] = None, display_windows: Optional[Sequence[Any]] = None,
                 modalities: Optional[Sequence[Optional[str]]] = None) -> RetrievalResult:
        """M3D-CLIP retrieval, as ``InferenceEngine.retrieve``: rank ``texts`` for the current volume, or ``volumes``
        (each ``(array_kji, ijk_to_ras)``, uploaded if the server lacks them) for ``text``. The current volume's
        window is used, as in the engine; without one, each volume's default from its display window and modality
        (the current volume's, or ``display_windows`` / ``modalities``, one per volume)."""
        self._handshake()
        with self._lock:
            current = self._volume
        window = current.options["window"] if current is not None else None
        extra: dict[str, Any] = {"labels": list(labels)} if labels is not None else {}
        if texts is not None:
            if current is None:
                raise InputError("no volume is set; call set_volume(array, ijk_to_ras) first.")
            options = self._volume_options(current)
            payload = {"texts": list(texts), "window": window, **extra, **{
                k: v for k, v in options.items() if k in ("display_window", "modality")}}
            path = f"/v1/volumes/{current.remote.volume_id}/retrieve"
            try:
                return result_from_dict(self._json("POST", path, payload))  # type: ignore[return-value]
            except VolumeNotFoundError:
                self.upload_volume(current.array, current.ijk_to_ras)
                return result_from_dict(self._json("POST", path, payload))  # type: ignore[return-value]
        if text is not None and volumes is not None:
            volumes = list(volumes)
            if window is None:  # each volume's default window is made from its display window and modality
                for name, values, to_json in (("display_windows", display_windows, display_window_json),
                                              ("modalities", modalities, modality_json)):
                    if values is not None and any(v is not None for v in values):
                        if len(values) != len(volumes):
                            raise InputError(f"{len(values)} {name} were given for {len(volumes)} volumes; give one "
                                             "per volume (None where unknown)")
                        extra[name] = [to_json(v) for v in values]
                if "display_windows" in extra or "modalities" in extra:
                    self._require(FEATURE_DISPLAY_WINDOW, "the volumes' display windows and modalities",
                                  "or choose an intensity window")
            ids = []
            for array, ijk_to_ras in volumes:
                wire, matrix = wire_array(array), wire_matrix(ijk_to_ras)
                key = volume_id(wire, matrix)
                if not self.has_volume(key):
                    self.upload_volume(wire, matrix)
                ids.append(key)
            payload = {"text": text, "volume_ids": ids, "window": window, **extra}
            return result_from_dict(self._json("POST", "/v1/retrieve", payload))  # type: ignore[return-value]
        raise InputError("retrieve needs texts=[...] (ranked for the current volume) or text=... with volumes=[...].")

    def selfcheck(self, *, conventions: str = "default", max_new_tokens: int = 64,
                  structures: Optional[Sequence[str]] = None,
                  on_progress: Optional[ProgressCallback] = None) -> "SelfCheckReport":
        """``m3d selfcheck`` in the server, on its model and the sample CT of its installation: a
        :class:`~M3DAssistantLib.selfcheck.SelfCheckReport` (``.verdict``, ``.to_dict()``). ``structures``: what to
        segment and locate (default: liver, spleen, kidneys, stomach, aorta). ``POST /v1/selfcheck``, streamed when
        ``on_progress`` is given (it takes a few minutes on a CPU); :meth:`cancel` stops it."""
        from ..selfcheck import SelfCheckReport

        self._require(FEATURE_SELFCHECK, "the installation check (POST /v1/selfcheck)",
                      "or run m3d selfcheck where it runs")
        payload: dict[str, Any] = {"conventions": conventions, "max_new_tokens": int(max_new_tokens)}
        if structures is not None:
            payload["structures"] = [str(name) for name in structures]
        data = self._request_json("/v1/selfcheck", "selfcheck", payload, on_progress)
        return SelfCheckReport.from_dict(data)

    def stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Union[str, Result]]:
        """Yield a task's text as it is generated, then its typed result (as ``InferenceEngine.stream``)."""
        if method not in {task.key for task in STREAMING_TASKS}:
            raise InputError(f"{method!r} is not a streamable task; use one of "
                             f"{', '.join(task.key for task in STREAMING_TASKS)}")
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

    def active_requests(self) -> list[str]:
        """The ids of this client's requests in flight (what :meth:`cancel` stops)."""
        with self._lock:
            return sorted(self._active)

    def cancel(self, *, everything: bool = False, request_ids: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """Stop this client's running or queued requests (they raise CancelledError), or those of ``request_ids``.
        ``everything=True`` cancels every request on the server, from any client. Waits for the server's answer (at
        most ``connect_timeout``); :meth:`abort` ends the local wait at once."""
        if everything:
            return self._json("POST", "/v1/cancel", {}, timeout=self.connect_timeout)
        active = self.active_requests() if request_ids is None else list(request_ids)
        cancelled: list[str] = []
        for request_id in active:
            answer = self._json("POST", "/v1/cancel", {"request_id": request_id}, timeout=self.connect_timeout)
            cancelled += answer.get("cancelled", [])
        return {"cancelled": cancelled}

    # ------------------------------------------------------------------------------------------- task plumbing
    def _task(self, task: Task, arguments: Sequence[Any], sampling: Optional[SamplingOptions],
              on_text: Optional[TextCallback], on_progress: Optional[ProgressCallback],
              analysis: Optional[AnalysisOptions] = None) -> Result:
        """The one implementation of the task methods: ``POST /v1/volumes/{id}/{task.key}`` on the current volume."""
        self._handshake()
        with self._lock:
            current = self._volume
        if current is None:
            raise InputError("no volume is set; call set_volume(array, ijk_to_ras) first.")
        payload = dict(self._volume_options(current), **request_body(task, arguments))
        if sampling is not None:
            payload["sampling"] = sampling.to_dict()
        if analysis_json(analysis) is not None:
            payload["analysis"] = analysis_json(analysis)
        try:
            return self._request_task(task.key, current.remote.volume_id, payload, on_text, on_progress)
        except VolumeNotFoundError:
            # The worker restarted or evicted the volume: upload it again, once.
            self.upload_volume(current.array, current.ijk_to_ras)
            return self._request_task(task.key, current.remote.volume_id, payload, on_text, on_progress)

    def _request_task(self, task: str, key: str, payload: dict[str, Any], on_text: Optional[TextCallback],
                      on_progress: Optional[ProgressCallback]) -> Result:
        return result_from_dict(self._request_json(f"/v1/volumes/{key}/{task}", task, payload, on_progress, on_text))

    def _request_json(self, route: str, what: str, payload: dict[str, Any], on_progress: Optional[ProgressCallback],
                      on_text: Optional[TextCallback] = None) -> dict[str, Any]:
        """POST a cancellable request (its id is tracked for :meth:`cancel`); the JSON answer, read from the
        server-sent events when ``on_text`` or ``on_progress`` is given."""
        request_id = uuid.uuid4().hex
        stream = on_text is not None or on_progress is not None
        path = route + ("?stream=true" if stream else "")
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
                with self._abortable(conn):
                    if not stream:
                        return json.loads(response.read())
                    return self._read_events(response, on_text, on_progress)
            except TimeoutError:
                self._cancel_quietly(request_id)
                raise timed_out from None
            except (OSError, http.client.HTTPException) as e:
                raise ServerUnavailableError(f"the connection to {self.url} broke during {what} ({e}); the worker "
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
                     on_progress: Optional[ProgressCallback]) -> dict[str, Any]:
        for event, data in sse_events(response):
            if event == "text":
                if on_text is not None:
                    on_text(data["text"])
            elif event == "progress":
                if on_progress is not None:
                    on_progress(ProgressEvent(data["stage"], data.get("fraction"), data.get("message", "")))
            elif event == "result":
                return data
            elif event == "error":
                raise_for_status(int(data.get("status", 500)), json.dumps(data).encode(), self.url, "POST", "")
        raise ServerUnavailableError(f"the stream from {self.url} ended without a result; the worker may have stopped")


__all__ = [  # the protocol's errors and volume_id too: what a user of the client catches and computes
    "M3DClient", "RemoteVolume", "PROTOCOL_VERSION", "InsecureTransportWarning", "AuthenticationError",
    "VolumeNotFoundError", "RequestTooLargeError", "ServerBusyError", "ServerUnavailableError", "ProtocolMismatchError",
    "ServerError", "volume_id",
]
