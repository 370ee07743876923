"""M3D-CLIP retrieval: ``POST /v1/volumes/{volume_id}/retrieve`` ranks texts for an uploaded volume,
``POST /v1/retrieve`` ranks uploaded volumes for a text."""

from typing import Any, Optional

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ...errors import InputError
from ...tasks import FIND_SIMILAR
from ..schemas import (
    REQUEST_ID,
    TASK_ERRORS,
    VOLUME_ID,
    RetrieveTextsRequest,
    RetrieveVolumesRequest,
    display_window,
)
from ..state import ServingState, serving_state

router = APIRouter()
STATE = Depends(serving_state)


@router.post("/v1/volumes/{volume_id}/retrieve", responses=TASK_ERRORS, operation_id="retrieve_texts",
             summary="Rank texts for this volume (M3D-CLIP)")
async def retrieve_texts(body: RetrieveTextsRequest, volume_id: str = VOLUME_ID,
                         request_id: Optional[str] = REQUEST_ID, state: ServingState = STATE) -> Response:
    stored = state.volume(volume_id)
    options = state.volume_options(body, stored)
    texts, labels = list(body.texts), list(body.labels) if body.labels is not None else None

    def call(engine: Any, on_text: Any) -> Any:
        return getattr(engine, FIND_SIMILAR.engine_method)(texts=texts, labels=labels)

    return await state.queue.submit(FIND_SIMILAR.engine_method, request_id, stored, options, call, False)


@router.post("/v1/retrieve", responses=TASK_ERRORS, operation_id="retrieve_volumes",
             summary="Rank uploaded volumes for a text (M3D-CLIP)")
async def retrieve_volumes(body: RetrieveVolumesRequest, request_id: Optional[str] = REQUEST_ID,
                           state: ServingState = STATE) -> Response:
    candidates = [state.volume(v) for v in body.volume_ids]
    options = state.volume_options(body, candidates[0])
    labels = list(body.labels) if body.labels is not None else None
    volumes = [(v.array, v.ijk_to_ras) for v in candidates]
    extra: dict[str, Any] = {}  # each volume's display window and modality: its default window
    for field, value in (("display_windows", body.display_windows), ("modalities", body.modalities)):
        if value is not None:
            if len(value) != len(volumes):
                raise InputError(f"{field} has {len(value)} entries for {len(volumes)} volumes; give one per volume "
                                 "(null where unknown)")
            extra[field] = [display_window(v) for v in value] if field == "display_windows" else list(value)

    def call(engine: Any, on_text: Any) -> Any:
        # the engine embeds every candidate with the current volume's window: make it the request's
        return getattr(engine, FIND_SIMILAR.engine_method)(text=body.text, volumes=volumes, labels=labels, **extra)

    return await state.queue.submit(FIND_SIMILAR.engine_method, request_id, candidates[0], options, call, False)
