"""Answers of the HTTP API: JSON bodies, and every error as ``{"detail": message, "error": exception name}`` with its
status (400 bad input, 401 token, 404 unknown volume or route, 409 cancelled, 413 too large, 503 busy; 500 is a bug
on our side), the same for plain answers and streamed ``error`` events."""

import json
from typing import Any, Optional

import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from ..errors import CancelledError, InputError, M3DError


class ApiError(HTTPException):
    """An HTTP error with our JSON body (``detail`` + ``error`` name)."""

    def __init__(self, status_code: int, detail: str, error: str, headers: Optional[dict[str, str]] = None):
        super().__init__(status_code, detail, headers)
        self.error = error


DEFAULT_ERROR_NAMES = {400: "InputError", 401: "AuthenticationError", 404: "NotFound", 405: "MethodNotAllowed",
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
        name = getattr(exc, "error", None) or DEFAULT_ERROR_NAMES.get(exc.status_code, "HTTPError")
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


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, default=_json_default).encode("utf-8")


def json_response(data: Any, status_code: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    return Response(json_bytes(data), status_code=status_code, media_type="application/json", headers=headers)
