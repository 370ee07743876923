"""The HTTP API of ``m3d serve`` (FastAPI): :func:`create_app`, a small app factory in MONAI Label's manner.

:func:`create_app` builds the app around one :class:`~M3DAssistantLib.engine.InferenceEngine`;
:func:`.server.serve` runs it with uvicorn. The wire protocol is :mod:`.protocol`, published as OpenAPI at
``/v1/openapi.json`` (token required, as everywhere). The parts:

* :mod:`.guard`: the limits, and the token and body-size checks in front of every route;
* :mod:`.routes`: one router per resource; the task routes are built from the task registry;
* :mod:`.schemas`: request and answer models; :mod:`.responses`: JSON answers and errors;
* :mod:`.volume_store`: uploaded volumes; :mod:`.engine_queue`: one request at a time on the engine;
* :mod:`.state`: what the routes share (``app.state.m3d``).

Routes (all under ``/v1``, all need ``Authorization: Bearer <token>``):

=========================================  ===========================================================================
``GET /v1/health``                         ``{"status": "ok", "protocol", "running", "waiting"}``
``GET /v1/info``                           ``engine.info()`` + ``protocol``, ``server_version``, ``tasks``, ``limits``
``POST /v1/volumes``                       upload (raw little-endian voxels, zlib; shape/dtype/matrix in headers)
                                           -> 201 (new) or 200 (known) ``{"volume_id", "shape", "dtype", "bytes"}``
``GET /v1/volumes/{id}``                   the same description, or 404
``DELETE /v1/volumes/{id}``                204, or 404
``POST /v1/volumes/{id}/{task}``           ``task`` a streaming task's key (report, ask, choose, locate,
                                           describe_region, segment, segment_expression); JSON body;
                                           ``?stream=true`` for server-sent events
``POST /v1/volumes/{id}/retrieve``         M3D-CLIP: rank ``texts`` for this volume
``POST /v1/retrieve``                      M3D-CLIP: rank uploaded ``volume_ids`` for a ``text``
``POST /v1/cancel``                        ``{"request_id": ...}`` cancels one request; ``{}`` or no body: all
=========================================  ===========================================================================

A task answers ``result.to_dict()`` plus ``kind`` (text, choice, box, segmentation, retrieval), ``volume_id`` and, for
segmentation, ``mask`` (:func:`~.protocol.encode_mask`: packbits + zlib + base64, or null). Streamed, the same object
is the ``result`` event after ``progress`` (``ProgressEvent.to_dict()``) and ``text`` (``{"text": chunk}``) events; a
failure after the stream started is an ``error`` event ``{"status", "error", "detail"}``.

Errors are JSON ``{"detail": message, "error": exception name}``: 400 bad input (InputError, malformed JSON, headers
or fields), 401 missing or wrong token, 404 unknown volume or route, 409 cancelled, 413 too large, 503 queue full.
A 500 means a bug on our side, never bad input.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from .. import AI_LABEL, __version__
from ..errors import InputError, M3DError
from .guard import Guard, ServerLimits
from .protocol import PROTOCOL_VERSION
from .responses import error_answer, json_response
from .routes import ROUTERS
from .state import ServingState

logger = logging.getLogger(__name__)


def create_app(engine: Any, token: str, *, max_upload_bytes: int = ServerLimits.max_upload_bytes,
               max_queue: int = ServerLimits.max_queue, **limits: Any) -> FastAPI:
    """The FastAPI app serving ``engine`` to holders of ``token``. Other :class:`~.guard.ServerLimits` fields may be
    given as keyword arguments (``max_volume_bytes``, ``max_json_bytes``, ``max_dim``, ``max_volumes``, ...)."""
    if not token:
        raise InputError("the server needs a token; pass one or let serve() generate it")
    state = ServingState(engine, ServerLimits(max_upload_bytes=int(max_upload_bytes), max_queue=int(max_queue),
                                              **limits))
    app = FastAPI(title="M3D for 3D Slicer", version=__version__, openapi_url="/v1/openapi.json", docs_url=None,
                  redoc_url=None, description=f"M3D-LaMed tasks on uploaded volumes. Outputs are {AI_LABEL}. "
                                              f"Protocol {PROTOCOL_VERSION}.")
    app.state.m3d = state
    app.add_middleware(Guard, token=token, limits=state.limits)

    async def handle(request: Request, exc: Exception) -> Response:
        status, body, headers = error_answer(exc)
        if status == 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, body["detail"],
                         exc_info=None if isinstance(exc, M3DError) else exc)
        return json_response(body, status_code=status, headers=headers)

    for exc_type in (HTTPException, RequestValidationError, M3DError, Exception):
        app.add_exception_handler(exc_type, handle)
    for router in ROUTERS:
        app.include_router(router)

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


__all__ = ["create_app", "ServerLimits"]
