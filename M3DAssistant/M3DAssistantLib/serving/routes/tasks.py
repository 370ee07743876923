"""``POST /v1/volumes/{volume_id}/{task}``: one route per streaming task of the registry, all built by
:func:`add_task_route` (as MONAI Label's ``/infer/{model}``, but one route each so that each has its own request
model in the OpenAPI schema)."""

from typing import Any, Callable, Optional

from fastapi import APIRouter, Body, Depends, Query
from fastapi.responses import Response

from ...tasks import STREAMING_TASKS, Task
from ..schemas import (
    OPTIONAL_BODY,
    REQUEST_ID,
    TASK_ERRORS,
    VOLUME_ID,
    engine_analysis,
    engine_arguments,
    task_request_model,
)
from ..state import ServingState, serving_state

router = APIRouter()
STREAM = Query(False, description="answer as server-sent events: progress, text, result, error")


async def run_task(state: ServingState, task: Task, volume_id: str, body: Any, stream: bool,
                   request_id: Optional[str]) -> Response:
    """Check the request (a plain 400 for bad input, even when streamed), then queue the engine's task method."""
    stored = state.volume(volume_id)
    options = state.volume_options(body, stored)
    sampling = state.sampling(body.sampling)
    arguments = engine_arguments(task, body)
    analysis = engine_analysis(body)
    extra = {"analysis": analysis} if analysis is not None else {}

    def call(engine: Any, on_text: Optional[Callable[[str], None]]) -> Any:
        return getattr(engine, task.engine_method)(*arguments, sampling=sampling, on_text=on_text, **extra)

    return await state.queue.submit(task.key, request_id, stored, options, call, stream)


def add_task_route(router: APIRouter, task: Task) -> None:
    """The route of ``task``; its body is optional when the task takes no required argument (``report``)."""
    request = task_request_model(task)
    optional = not any(argument.required for argument in task.arguments)
    body_type = Optional[request] if optional else request
    body_default = OPTIONAL_BODY if optional else Body()

    async def run(volume_id: str = VOLUME_ID, body: body_type = body_default,  # type: ignore[valid-type]
                  stream: bool = STREAM, request_id: Optional[str] = REQUEST_ID,
                  state: ServingState = Depends(serving_state)) -> Response:
        return await run_task(state, task, volume_id, body if body is not None else request(), stream, request_id)

    router.post(f"/v1/volumes/{{volume_id}}/{task.key}", name=task.key, operation_id=task.key, summary=task.summary,
                responses={**TASK_ERRORS, 200: {"description": "the result (JSON), or server-sent events with "
                                                               "?stream=true"}})(run)


for _task in STREAMING_TASKS:
    add_task_route(router, _task)
