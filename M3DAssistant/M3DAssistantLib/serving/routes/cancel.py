"""``POST /v1/cancel``: cancel one request (``{"request_id": ...}``) or every running and queued one (``{}``)."""

from typing import Any, Optional

from fastapi import APIRouter, Depends

from ..schemas import ERRORS, OPTIONAL_BODY, CancelRequest
from ..state import ServingState, serving_state

router = APIRouter()


@router.post("/v1/cancel", responses=ERRORS, summary="Cancel one request (by id) or all running and queued ones")
async def cancel(body: Optional[CancelRequest] = OPTIONAL_BODY,
                 state: ServingState = Depends(serving_state)) -> dict[str, Any]:
    return {"cancelled": state.queue.cancel(body.request_id if body is not None else None)}
