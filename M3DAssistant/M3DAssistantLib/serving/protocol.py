"""The wire protocol between :class:`~.client.M3DClient` and ``m3d serve``: what travels, in both directions.
Standard library + numpy only (the client side runs in Slicer's process).

Protocol version :data:`PROTOCOL_VERSION`; the server publishes its OpenAPI schema at ``/v1/openapi.json``:

* every request carries ``Authorization: Bearer <token>``;
* the first call checks the server's protocol version (``GET /v1/info``) and refuses a mismatch with a message that
  names both versions;
* a volume is identified by its content hash (:func:`volume_id`; the server passes it to the engine as
  ``content_key``). A client asks the server whether it has that id and uploads only if not: ``POST /v1/volumes``
  with the raw C-order voxels (little-endian, :func:`wire_array`), zlib-compressed, and the headers
  ``X-M3D-Shape: K,J,I``, ``X-M3D-Dtype: int16``, ``X-M3D-IJK-To-RAS: 16 numbers, row-major`` and
  ``X-M3D-Compression: zlib`` (or ``none``);
* tasks are ``POST /v1/volumes/{id}/{task}`` (one per streaming task of :mod:`M3DAssistantLib.tasks`) with a JSON body
  of the task's arguments (:func:`request_body`) and the volume's options; ``?stream=true`` answers with server-sent
  events ``progress``, ``text``, ``result`` and ``error`` (:func:`sse_events`); retrieval is
  ``POST /v1/volumes/{id}/retrieve`` (texts for a volume) and ``POST /v1/retrieve`` (uploaded volumes for a text);
* the volume's options are ``window``, ``roi``, ``slice_range`` and -- what the reader sees, for the tasks whose
  default window is the display window -- ``display_window`` (``{"center", "width", "source"}``,
  :func:`display_window_json`) and ``modality`` (the DICOM Modality). They travel with every request, not with the
  upload: a new window/level between two questions changes the request, never the stored voxels. A client sends the
  last two only when no ``window`` is chosen (a chosen window overrides every default);
* ``GET /v1/info`` lists the server's optional ``features`` (:data:`FEATURES`): within one protocol version new
  request fields and routes are only added, never changed, so an older client keeps working with a newer server; a
  newer client checks the feature before it uses one and says which server it needs otherwise
  (:class:`ProtocolMismatchError`). ``POST /v1/selfcheck`` (feature ``selfcheck``) runs ``m3d selfcheck`` in the
  server and answers its JSON report (schema ``m3d-selfcheck``), streamed as ``progress`` events then ``result``;
* a result is ``result.to_dict()`` plus ``kind`` (:class:`~M3DAssistantLib.tasks.ResultKind`), ``volume_id`` and, for a
  segmentation, ``mask`` as :func:`encode_mask` describes (packbits + zlib + base64); an evidence map adds
  ``evidence.values`` (:func:`encode_map`: the model-grid map, float16 relative to its peak, zlib + base64) and
  ``evidence.mapping`` (the model input's mapping), from which the client puts the map on the volume's grid with
  the same code as the server would: :func:`result_payload` writes it, :func:`result_from_dict` reads it
  (``docs/analysis.md`` has the JSON schema of the analysis fields);
* errors are JSON ``{"detail", "error"}`` with the status codes :func:`raise_for_status` turns into our exceptions:
  400 -> InputError (or its subclass named by the server), 401 -> :class:`AuthenticationError`,
  404 -> :class:`VolumeNotFoundError`, 409 -> CancelledError, 413 -> :class:`RequestTooLargeError`,
  503 -> :class:`ServerBusyError`, other 5xx -> the M3DError subclass the server names (e.g. ModelNotAvailableError)
  or :class:`ServerError`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.client
import json
import zlib
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .. import errors
from ..errors import CancelledError, InputError, M3DError
from ..geometry import RasRoi, VolumeToModelMapping, validate_volume
from ..results import (
    BoxResult,
    ChoiceResult,
    Confidence,
    EvidenceMap,
    MaskMeasurements,
    Provenance,
    Refinement,
    RetrievalResult,
    SegmentationResult,
    SliceRange,
    TextResult,
)
from ..tasks import ArgumentKind, ResultKind, Task, result_kind

PROTOCOL_VERSION = 1
"""Version of the HTTP protocol between :class:`M3DClient` and ``m3d serve``; bumped on any incompatible change."""

READY_PREFIX = "M3D_SERVER_READY"
"""``m3d serve`` prints ``M3D_SERVER_READY {json}`` on stdout once it listens (url, host, port, protocol, pid)."""
TOKEN_ENV = "M3D_SERVER_TOKEN"
"""The environment variable that hands the bearer token to ``m3d serve`` (a worker's parent sets it)."""


def parse_ready_line(line: str) -> Optional[dict[str, Any]]:
    """The JSON of an ``M3D_SERVER_READY`` line, or None for any other line (for the process that started us)."""
    if not line.startswith(READY_PREFIX + " "):
        return None
    return json.loads(line[len(READY_PREFIX) + 1:])


FEATURE_DISPLAY_WINDOW = "display-window"
"""Task and retrieval requests take ``display_window`` and ``modality`` (the display window travels with the volume)."""
FEATURE_SELFCHECK = "selfcheck"
"""``POST /v1/selfcheck`` runs the installation self-check."""
FEATURES = (FEATURE_DISPLAY_WINDOW, FEATURE_SELFCHECK)
"""What this side of the protocol offers beyond protocol 1's first release (``GET /v1/info`` -> ``features``)."""

# dtypes a volume travels as (little-endian); anything else is converted by the client (see _wire_array)
WIRE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

MASK_ENCODING = "packbits-zlib-base64"
MAP_ENCODING = "float16-zlib-base64"

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


class ServerError(M3DError):
    """The server failed on its side (HTTP 5xx other than 503); the message says what it reported."""


# --------------------------------------------------------------------------------------------- volumes and masks
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


def encode_map(values: np.ndarray, scale: float) -> dict[str, Any]:
    """A float map as JSON: ``{"encoding": "float16-zlib-base64", "shape", "scale", "data"}``, ``data`` =
    base64(zlib(little-endian float16 of values / scale, C order)); :func:`decode_map` multiplies by ``scale`` again
    (relative precision about 5e-4 of the peak when ``scale`` is the largest absolute value)."""
    values = np.asarray(values, dtype=np.float32)
    scaled = np.ascontiguousarray(values / np.float32(scale if scale else 1.0), dtype="<f2")
    return {"encoding": MAP_ENCODING, "shape": [int(s) for s in values.shape], "scale": float(scale),
            "data": base64.b64encode(zlib.compress(scaled.tobytes(), 6)).decode("ascii")}


def decode_map(payload: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_map`: float32 values of the encoded shape."""
    if payload.get("encoding") != MAP_ENCODING:
        raise ServerUnavailableError(f"unknown map encoding {payload.get('encoding')!r}; expected {MAP_ENCODING}")
    shape = tuple(int(s) for s in payload["shape"])
    raw = np.frombuffer(zlib.decompress(base64.b64decode(payload["data"])), dtype="<f2")
    if raw.size != int(np.prod(shape, dtype=np.int64)):
        raise ServerUnavailableError(f"the map holds {raw.size} values, not the {int(np.prod(shape))} of {shape}")
    return raw.reshape(shape).astype(np.float32) * np.float32(payload.get("scale", 1.0))


def wire_array(array_kji: Any) -> np.ndarray:
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
    array = wire_array(array_kji)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(np.asarray(ijk_to_ras, dtype=np.float64).tobytes())
    return digest.hexdigest()


def wire_matrix(ijk_to_ras: Any) -> np.ndarray:
    try:
        matrix = np.array(ijk_to_ras, dtype=np.float64)
    except (TypeError, ValueError):
        raise errors.GeometryError(f"the IJK->RAS matrix must be a 4x4 array of numbers, got {ijk_to_ras!r}") from None
    if matrix.shape != (4, 4):
        raise errors.GeometryError(f"the IJK->RAS matrix must be 4x4, got shape {matrix.shape}")
    return matrix


def roi_json(roi: Optional[RasRoi]) -> Optional[dict[str, Any]]:
    if roi is None:
        return None
    if not isinstance(roi, RasRoi):
        raise errors.GeometryError(f"roi must be a RasRoi, got {type(roi).__name__}")
    return {"center": [float(v) for v in roi.center], "size": [float(v) for v in roi.size],
            "axes": np.asarray(roi.axes, dtype=float).tolist()}


def window_json(window: Any) -> Any:
    if window is None or isinstance(window, str):
        return window
    try:
        return [float(v) for v in window]
    except (TypeError, ValueError):
        raise InputError(f"window must be a preset name or a (center, width) pair, got {window!r}") from None


def display_window_json(display_window: Any) -> Optional[dict[str, Any]]:
    """A display window (:class:`~M3DAssistantLib.preprocessing.DisplayWindow`, or a ``(center, width)`` pair) as it
    travels: ``{"center", "width", "source"}``; None stays None. Invalid values are refused here (InputError)."""
    from ..preprocessing import DisplayWindow

    if display_window is None:
        return None
    if not isinstance(display_window, DisplayWindow):
        try:
            center, width = display_window
        except (TypeError, ValueError):
            raise InputError(f"display_window must be a DisplayWindow or a (center, width) pair, got "
                             f"{display_window!r}") from None
        display_window = DisplayWindow(center, width)
    return {"center": display_window.center, "width": display_window.width, "source": display_window.source}


def modality_json(modality: Optional[str]) -> Optional[str]:
    """A DICOM Modality as it travels (upper case, e.g. ``CT``); empty is None."""
    if modality is None or not str(modality).strip():
        return None
    text = str(modality).strip().upper()
    if len(text) > 16 or not all(c.isalnum() or c in " _" for c in text):
        raise InputError(f"modality {modality!r} is not a DICOM Modality (up to 16 letters, digits, spaces or "
                         f"underscores, e.g. CT or MR)")
    return text


# ------------------------------------------------------------------------------------------------ task requests
def request_body(task: Task, arguments: Sequence[Any]) -> dict[str, Any]:
    """The JSON fields of a task request for the task's arguments (in the engine method's order), by argument kind."""
    body: dict[str, Any] = {}
    for argument, value in zip(task.arguments, arguments):
        if argument.kind is ArgumentKind.HISTORY:
            body[argument.field] = [[str(question), str(answer)] for question, answer in value]
        elif argument.kind is ArgumentKind.CHOICES:
            body[argument.field] = list(value)
        elif argument.kind is ArgumentKind.REGION:
            body[argument.field] = roi_json(value)
        else:
            body[argument.field] = value
    return body


def analysis_json(analysis: Any) -> Optional[dict[str, Any]]:
    """The request's ``analysis`` object: the options that differ from the defaults (None: the plain task)."""
    if analysis is None:
        return None
    requested = analysis.requested()
    return requested or None


# ------------------------------------------------------------------------------------------------------ results
def _provenance(data: dict[str, Any]) -> Provenance:
    names = {f.name for f in dataclasses.fields(Provenance)}
    return Provenance(**{k: v for k, v in data.items() if k in names})


def _roi(data: Optional[dict[str, Any]]) -> Optional[RasRoi]:
    return RasRoi(data["center"], data["size"], data["axes"]) if data is not None else None


def _box(values: Optional[Sequence[float]]) -> Optional[tuple[float, ...]]:
    return tuple(float(v) for v in values) if values is not None else None


def _evidence(data: Optional[dict[str, Any]]) -> Optional[EvidenceMap]:
    if data is None:
        return None
    return EvidenceMap(data["method"], int(data["steps"]), decode_map(data["values"]),
                       VolumeToModelMapping.from_dict(data["mapping"]), float(data["answer_logprob"]),
                       float(data["baseline_logprob"]), float(data["attribution_sum"]),
                       [SliceRange.from_dict(r) for r in data.get("ranges", [])])


def _analysed(data: dict[str, Any]) -> dict[str, Any]:
    """The analysis fields every model-generated result may carry."""
    return {"confidence": Confidence.from_dict(data["confidence"]) if data.get("confidence") else None,
            "evidence": _evidence(data.get("evidence"))}


def _box_result(data: dict[str, Any]) -> BoxResult:
    return BoxResult(data["text"], data["target"], _box(data.get("box")), _roi(data.get("roi_ras")),
                     _provenance(data["provenance"]), bool(data.get("absent")), data.get("parse_error"),
                     **_analysed(data))


def result_from_dict(data: dict[str, Any]) -> Result:
    """Rebuild the typed result of a task from the server's JSON (the inverse of ``to_dict`` + mask + maps)."""
    prov = _provenance(data["provenance"])
    kind = data.get("kind")
    if kind == ResultKind.CHOICE:
        return ChoiceResult(data["text"], list(data["choices"]), data.get("letter"), data.get("choice"), prov,
                            data.get("parse_error"), **_analysed(data))
    if kind == ResultKind.BOX:
        return _box_result(data)
    if kind == ResultKind.SEGMENTATION:
        mask = decode_mask(data["mask"]) if data.get("mask") is not None else None
        measurements, refinement = data.get("measurements"), data.get("refinement")
        return SegmentationResult(
            data["text"], data["target"], mask, prov, bool(data.get("absent")), data.get("parse_error"),
            **_analysed(data), roi=_roi(data.get("roi_ras")), box=_box(data.get("box")),
            measurements=MaskMeasurements.from_dict(measurements) if measurements else None,
            refinement=Refinement.from_dict(refinement) if refinement else None,
            located=_box_result(data["located"]) if data.get("located") else None,
            located_iou=data.get("located_iou"))
    if kind == ResultKind.TEXT:
        return TextResult(data["text"], prov, **_analysed(data))
    if kind == ResultKind.RETRIEVAL:
        return RetrievalResult(data["query"], [(int(r["index"]), str(r["label"]), float(r["score"]))
                                               for r in data["ranking"]], prov)
    raise ServerUnavailableError(f"the server sent a result of unknown kind {kind!r}")


def result_payload(result: Any, volume_id_: str) -> dict[str, Any]:
    """A result as the server answers it: ``result.to_dict()`` + ``kind``, ``volume_id`` (not for a ranking of
    several volumes), for segmentation the encoded ``mask`` (or None), and with an evidence map its values and
    mapping. :func:`result_from_dict` reads it back."""
    data = result.to_dict()
    kind = result_kind(result)
    data["kind"] = kind.value
    if kind is not ResultKind.RETRIEVAL:
        data["volume_id"] = volume_id_
    if kind is ResultKind.SEGMENTATION:
        data["mask"] = encode_mask(result.mask) if result.mask is not None else None
    evidence = getattr(result, "evidence", None)
    if evidence is not None:
        data["evidence"].update(values=encode_map(evidence.model_values, evidence.scale),
                                mapping=evidence.mapping.to_dict())
    return data


# ------------------------------------------------------------------------------------------- answers and errors
def sse_events(response: http.client.HTTPResponse) -> Iterator[tuple[str, Any]]:
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


def raise_for_status(status: int, raw: bytes, url: str, method: str, path: str) -> None:
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
        raise AuthenticationError(
            f"the M3D server at {url} refused the token: {detail}. Use the token the server was started with (its "
            f"--token / --token-file / M3D_SERVER_TOKEN, or the one its ready line printed); in 3D Slicer enter it in "
            f"M3D Assistant > Model > Server token: (Run on: Remote server)")
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
    "PROTOCOL_VERSION", "FEATURE_DISPLAY_WINDOW", "FEATURE_SELFCHECK", "FEATURES", "WIRE_DTYPES", "MASK_ENCODING",
    "Result", "AuthenticationError", "VolumeNotFoundError", "RequestTooLargeError", "ServerBusyError",
    "ServerUnavailableError", "ProtocolMismatchError", "ServerError", "encode_mask", "decode_mask", "wire_array",
    "volume_id", "wire_matrix", "roi_json", "window_json", "display_window_json", "modality_json", "request_body",
    "result_from_dict", "result_payload", "sse_events", "raise_for_status", "MAP_ENCODING", "encode_map",
    "decode_map", "analysis_json"
]
