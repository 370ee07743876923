"""Uploaded volumes: received (size-checked from the headers, then decompressed into a buffer of exactly the declared
size), identified by their content hash (:func:`~.protocol.volume_id`), kept in memory only (nothing a request sends
reaches the filesystem), least recently used dropped beyond ``max_volumes`` / ``max_stored_bytes``."""

import collections
import dataclasses
import logging
import math
import threading
import zlib
from typing import Any, Optional

import anyio
import numpy as np
from starlette.requests import ClientDisconnect, Request

from ..errors import InputError
from ..geometry import validate_ijk_to_ras
from .guard import MiB, ServerLimits
from .protocol import WIRE_DTYPES, volume_id
from .responses import ApiError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class StoredVolume:
    volume_id: str
    array: np.ndarray
    ijk_to_ras: np.ndarray
    engine_keys: set = dataclasses.field(default_factory=set)  # the engine's caches made from it

    def describe(self) -> dict[str, Any]:
        return {"volume_id": self.volume_id, "shape": list(self.array.shape),
                "dtype": self.array.dtype.newbyteorder("=").name, "bytes": int(self.array.nbytes)}


class VolumeStore:
    """Uploaded volumes by content hash, in memory, least recently used dropped beyond the limits; receives uploads
    (:meth:`receive`) with every size checked before anything is allocated."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.max_volumes, self.max_bytes = max(1, limits.max_volumes), limits.max_stored_bytes
        self._volumes: "collections.OrderedDict[str, StoredVolume]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._upload_lock = threading.Lock()
        self._uploading = 0  # bytes of voxel buffers being received: bounded by max_stored_bytes

    def get(self, key: str) -> Optional[StoredVolume]:
        with self._lock:
            volume = self._volumes.get(key)
            if volume is not None:
                self._volumes.move_to_end(key)
            return volume

    def put(self, volume: StoredVolume) -> tuple[StoredVolume, bool, list[StoredVolume]]:
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

    def pop(self, key: str) -> Optional[StoredVolume]:
        with self._lock:
            return self._volumes.pop(key, None)

    def require(self, key: str) -> StoredVolume:
        """The volume, or the 404 that tells the client to upload it (again)."""
        stored = self.get(key)
        if stored is None:
            raise ApiError(404, f"no volume {key} on this server; upload it with POST /v1/volumes (it was never "
                                f"uploaded, was deleted, was dropped to stay within {self.max_volumes} volumes, "
                                f"or the server restarted)", "VolumeNotFoundError")
        return stored

    async def receive(self, request: Request, shape: str, dtype: str, ijk_to_ras: str,
                      compression: str) -> Optional[tuple[StoredVolume, bool, list[StoredVolume]]]:
        """Read an upload (``POST /v1/volumes``) into the store: (the stored volume, whether it is new, the volumes
        dropped to make room), or None when the client went away before the end."""
        limits = self.limits
        dims, wire_dtype, matrix = parse_shape(shape, limits), parse_dtype(dtype), parse_matrix(ijk_to_ras)
        nbytes = math.prod(dims) * wire_dtype.itemsize
        if nbytes > limits.max_volume_bytes:
            raise ApiError(413, f"the volume {dims} of {wire_dtype.name} is {nbytes / MiB:.1f} MiB but this server "
                                f"accepts at most {limits.max_volume_bytes / MiB:.1f} MiB of voxels; crop it "
                                f"(ROI, slice range) or start the server with a larger --max-volume-mb",
                           "RequestTooLargeError")
        length = request.headers.get("content-length")
        if compression == "none" and length is not None and int(length) != nbytes:
            raise InputError(f"Content-Length {length} differs from the {nbytes} bytes that X-M3D-Shape and "
                             f"X-M3D-Dtype declare")
        with self._upload_lock:
            if self._uploading + nbytes > limits.max_stored_bytes:
                raise ApiError(503, f"other uploads are being received ({self._uploading / MiB:.0f} MiB); try again "
                                    f"when they are done", "ServerBusyError", {"Retry-After": "2"})
            self._uploading += nbytes
        try:
            body = VolumeBody(nbytes, compression)  # allocated only now, after every size check
            try:
                async for chunk in request.stream():
                    body.feed(chunk)
            except ClientDisconnect:  # e.g. the client stopped at its own size check: nobody to answer, no error
                logger.info("an upload of %s was abandoned by the client after %d bytes", dims, body.pos)
                return None
            array = body.finish().view(wire_dtype).reshape(dims)
        finally:
            with self._upload_lock:
                self._uploading -= nbytes
        key = await anyio.to_thread.run_sync(volume_id, array, matrix)
        return self.put(StoredVolume(key, array, matrix))

    def __len__(self) -> int:
        return len(self._volumes)


class VolumeBody:
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


def parse_shape(text: str, limits: ServerLimits) -> tuple[int, int, int]:
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


def parse_dtype(text: str) -> np.dtype:
    dtype = _WIRE_DTYPE_NAMES.get(text.strip().lower() if text.strip()[:1] not in "<|" else text.strip())
    if dtype is None:
        raise InputError(f"X-M3D-Dtype must be one of {', '.join(WIRE_DTYPES)} (little-endian), got {text[:40]!r}")
    return dtype


def parse_matrix(text: str) -> np.ndarray:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 16:
        raise InputError("X-M3D-IJK-To-RAS must be the 16 numbers of the 4x4 IJK->RAS matrix, row-major, "
                         "comma-separated")
    return validate_ijk_to_ras(np.array(values, dtype=np.float64).reshape(4, 4))
