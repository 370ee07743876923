"""``POST /v1/selfcheck``: ``m3d selfcheck`` on the server's model -- segmentation, boxes and a plane question on the
CT with ground-truth labels bundled with the server's installation, scored (:func:`~M3DAssistantLib.selfcheck.
run_selfcheck`). Queued like a task (one request at a time, cancellable by id); ``?stream=true`` sends ``progress``
events, then the JSON report (schema ``m3d-selfcheck``) as ``result``."""

from typing import Any, Optional

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from ..schemas import OPTIONAL_BODY, REQUEST_ID, TASK_ERRORS, SelfCheckRequest
from ..state import ServingState, serving_state

router = APIRouter()


@router.post("/v1/selfcheck", responses={**TASK_ERRORS, 200: {"description": "the JSON report (schema "
                                                                              "m3d-selfcheck), or server-sent events"}},
             operation_id="selfcheck", summary="Check the installation: Dice and box IoU on a CT with ground truth")
async def selfcheck(body: Optional[SelfCheckRequest] = OPTIONAL_BODY,
                    stream: bool = Query(False, description="answer as server-sent events: progress, result, error"),
                    request_id: Optional[str] = REQUEST_ID,
                    state: ServingState = Depends(serving_state)) -> Response:
    body = body if body is not None else SelfCheckRequest()

    def call(engine: Any, on_text: Any) -> Any:
        from ...selfcheck import run_selfcheck, structures_named

        # engine.progress is the request's progress sink while it runs (the queue sets it)
        return run_selfcheck(engine, conventions=body.conventions, max_new_tokens=body.max_new_tokens,
                             structures=structures_named(body.structures), progress=engine.progress)

    return await state.queue.submit("selfcheck", request_id, None, {}, call, stream,
                                    payload=lambda report: report.to_dict())
