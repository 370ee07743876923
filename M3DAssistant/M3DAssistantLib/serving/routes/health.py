"""``GET /v1/health`` (is the server up, is it busy) and ``GET /v1/info`` (model, device, protocol, tasks, limits)."""

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends

from ... import AI_LABEL, __version__
from ...tasks import STREAMING_TASKS
from ..protocol import FEATURES, PROTOCOL_VERSION
from ..schemas import ERRORS
from ..state import ServingState, serving_state

router = APIRouter()
STATE = Depends(serving_state)


@router.get("/v1/health", responses=ERRORS, summary="Is the server up; is it busy")
async def health(state: ServingState = STATE) -> dict[str, Any]:
    return {"status": "ok", "protocol": PROTOCOL_VERSION, **state.queue.stats()}


@router.get("/v1/info", responses=ERRORS, summary="Model, device, protocol and limits")
async def info(state: ServingState = STATE) -> dict[str, Any]:
    return {**state.engine.info(), "protocol": PROTOCOL_VERSION, "features": list(FEATURES),
            "server_version": __version__, "tasks": [task.key for task in STREAMING_TASKS], "volumes": len(state.store),
            "limits": dataclasses.asdict(state.limits), "label": AI_LABEL}
