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
* a result is ``result.to_dict()`` plus ``kind`` (:class:`~M3DAssistantLib.tasks.ResultKind`), ``volume_id`` and, for a
  segmentation, ``mask`` as :func:`encode_mask` describes (packbits + zlib + base64): :func:`result_payload` writes it,
  :func:`result_from_dict` reads it;
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
from ..geometry import RasRoi, validate_volume
from ..results import BoxResult, ChoiceResult, Provenance, RetrievalResult, SegmentationResult, TextResult
from ..tasks import ArgumentKind, ResultKind, Task, result_kind

PROTOCOL_VERSION = 1
"""Version of the HTTP protocol between :class:`M3DClient` and ``m3d serve``; bumped on any incompatible change."""

# dtypes a volume travels as (little-endian); anything else is converted by the client (see _wire_array)
WIRE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

MASK_ENCODING = "packbits-zlib-base64"

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


# ------------------------------------------------------------------------------------------------------ results
def _provenance(data: dict[str, Any]) -> Provenance:
    names = {f.name for f in dataclasses.fields(Provenance)}
    return Provenance(**{k: v for k, v in data.items() if k in names})


def result_from_dict(data: dict[str, Any]) -> Result:
    """Rebuild the typed result of a task from the server's JSON (the inverse of ``to_dict`` + mask)."""
    prov = _provenance(data["provenance"])
    kind = data.get("kind")
    if kind == ResultKind.CHOICE:
        return ChoiceResult(data["text"], list(data["choices"]), data.get("letter"), data.get("choice"), prov,
                            data.get("parse_error"))
    if kind == ResultKind.BOX:
        roi = data.get("roi_ras")
        box = data.get("box")
        return BoxResult(data["text"], data["target"], tuple(float(v) for v in box) if box is not None else None,
                         RasRoi(roi["center"], roi["size"], roi["axes"]) if roi is not None else None, prov,
                         bool(data.get("absent")), data.get("parse_error"))
    if kind == ResultKind.SEGMENTATION:
        mask = decode_mask(data["mask"]) if data.get("mask") is not None else None
        return SegmentationResult(data["text"], data["target"], mask, prov, bool(data.get("absent")),
                                  data.get("parse_error"))
    if kind == ResultKind.TEXT:
        return TextResult(data["text"], prov)
    if kind == ResultKind.RETRIEVAL:
        return RetrievalResult(data["query"], [(int(r["index"]), str(r["label"]), float(r["score"]))
                                               for r in data["ranking"]], prov)
    raise ServerUnavailableError(f"the server sent a result of unknown kind {kind!r}")


def result_payload(result: Any, volume_id_: str) -> dict[str, Any]:
    """A result as the server answers it: ``result.to_dict()`` + ``kind``, ``volume_id`` (not for a ranking of
    several volumes) and, for segmentation, the encoded ``mask`` (or None). :func:`result_from_dict` reads it back."""
    data = result.to_dict()
    kind = result_kind(result)
    data["kind"] = kind.value
    if kind is not ResultKind.RETRIEVAL:
        data["volume_id"] = volume_id_
    if kind is ResultKind.SEGMENTATION:
        data["mask"] = encode_mask(result.mask) if result.mask is not None else None
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
    "PROTOCOL_VERSION", "WIRE_DTYPES", "MASK_ENCODING", "Result", "AuthenticationError", "VolumeNotFoundError",
    "RequestTooLargeError", "ServerBusyError", "ServerUnavailableError", "ProtocolMismatchError", "ServerError",
    "encode_mask", "decode_mask", "wire_array", "volume_id", "wire_matrix", "roi_json", "window_json", "request_body",
    "result_from_dict", "result_payload", "sse_events", "raise_for_status",
]
