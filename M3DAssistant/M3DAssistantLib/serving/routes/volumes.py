"""``POST /v1/volumes`` (upload once, by content), ``GET`` and ``DELETE /v1/volumes/{volume_id}``."""

from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response

from ..protocol import WIRE_DTYPES
from ..responses import json_response
from ..schemas import ERRORS, VOLUME_ERRORS, VOLUME_ID
from ..state import ServingState, serving_state

router = APIRouter()
STATE = Depends(serving_state)


@router.post("/v1/volumes", status_code=201, responses={**ERRORS, 200: {"description": "already uploaded"}},
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
    state: ServingState = STATE,
) -> Response:
    received = await state.store.receive(request, shape, dtype, ijk_to_ras, compression)
    if received is None:  # the client went away: nobody to answer
        return Response(status_code=400)
    stored, created, dropped = received
    for old in dropped:
        state.queue.forget(old.engine_keys)
    return json_response(stored.describe(), status_code=201 if created else 200)


@router.get("/v1/volumes/{volume_id}", responses=VOLUME_ERRORS, summary="Describe an uploaded volume")
async def get_volume(volume_id: str = VOLUME_ID, state: ServingState = STATE) -> dict[str, Any]:
    return state.volume(volume_id).describe()


@router.delete("/v1/volumes/{volume_id}", status_code=204, responses=VOLUME_ERRORS, summary="Delete a volume")
async def delete_volume(volume_id: str = VOLUME_ID, state: ServingState = STATE) -> Response:
    state.delete(volume_id)
    return Response(status_code=204)
