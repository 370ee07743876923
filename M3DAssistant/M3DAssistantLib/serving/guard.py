"""The server's limits and the guard in front of every route: the bearer token (compared in constant time), then
the request body size limits, before any route code runs or any body is read."""

import dataclasses
import hmac
from typing import Any, Callable, Optional

from ..results import MAX_NEW_TOKENS
from .responses import ApiError, json_bytes

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
    max_new_tokens: int = MAX_NEW_TOKENS  # cap on sampling.max_new_tokens (one constant with the CLI)
    # Slow or stalled clients (enforced per connection by connections.GuardedH11Protocol):
    header_timeout_s: float = 10.0  # request line + headers complete within this of the connection / first byte
    body_timeout_s: float = 30.0  # a request body may pause this long; after it, it must average the next rate
    min_body_bytes_per_s: int = 1024
    max_connections: int = 64  # open connections in all; more get 503 and are closed
    max_connections_per_client: int = 32  # open connections from one address



class Guard:
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
                await _send_error(send, 413, too_large_message(declared, limit, upload), "RequestTooLargeError")
                return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, too_large_message(received, limit, upload), "RequestTooLargeError")
            return message

        await self.app(scope, limited_receive, send)


def too_large_message(size: int, limit: int, upload: bool) -> str:
    if upload:
        return (f"the upload is {size / MiB:.1f} MiB but this server accepts at most {limit / MiB:.1f} MiB; crop the "
                f"volume (ROI, slice range) or start the server with a larger --max-upload-mb")
    return f"the request body is {size} bytes but this server accepts at most {limit} bytes for this route"


async def _send_error(send: Callable, status: int, detail: str, error: str,
                      headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    body = json_bytes({"detail": detail, "error": error})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
