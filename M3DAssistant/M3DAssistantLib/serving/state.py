"""What the routes share: the engine, its queue, the store of uploaded volumes and the limits (``app.state.m3d``), and
the checks every task request gets before it is queued."""

from typing import Any

from fastapi import Request

from ..errors import InputError
from ..preprocessing import resolve_window
from ..results import SamplingOptions
from .engine_queue import EngineQueue
from .guard import ServerLimits
from .schemas import SamplingModel, display_window, ras_roi
from .volume_store import StoredVolume, VolumeStore


class ServingState:
    """The server's state: one engine, its queue, the uploaded volumes, the limits."""

    def __init__(self, engine: Any, limits: ServerLimits):
        self.engine, self.limits = engine, limits
        self.queue = EngineQueue(engine, limits.max_queue)
        self.store = VolumeStore(limits)

    def volume(self, volume_id: str) -> StoredVolume:
        """An uploaded volume, or the 404 that tells the client to upload it (again)."""
        return self.store.require(volume_id)

    def delete(self, volume_id: str) -> None:
        stored = self.store.pop(volume_id)
        if stored is None:
            self.volume(volume_id)  # raises the 404
        self.queue.forget(stored.engine_keys)

    def volume_options(self, body: Any, stored: StoredVolume) -> dict[str, Any]:
        """``set_volume`` keyword arguments from a request, checked now (before anything is queued or streamed), so
        that bad input is a plain 400 even for a streamed request (whose status is sent before the engine runs)."""
        window = tuple(body.window) if isinstance(body.window, (list, tuple)) else body.window
        resolve_window(window)
        options: dict[str, Any] = {"window": window}
        # what the reader sees: passed only when sent, so that engines without these options keep working
        if getattr(body, "display_window", None) is not None:
            options["display_window"] = display_window(body.display_window)
        if getattr(body, "modality", None):
            options["modality"] = body.modality.strip().upper()
        if hasattr(body, "roi"):
            options["roi"] = ras_roi(body.roi) if body.roi is not None else None
        if getattr(body, "slice_range", None) is not None:
            k0, k1 = body.slice_range
            depth = stored.array.shape[0]
            if not 0 <= k0 < k1 <= depth:
                raise InputError(f"slice_range [{k0}, {k1}] is outside the volume's K range [0, {depth}) or empty; "
                                 f"give [start, stop] with 0 <= start < stop <= {depth}")
            options["slice_range"] = (k0, k1)
        return options

    def sampling(self, model: SamplingModel) -> SamplingOptions:
        """The request's sampling options within this server's ``max_new_tokens`` limit."""
        sampling = SamplingOptions(**model.model_dump())
        if "max_new_tokens" not in model.model_fields_set:  # the default fits any limit
            sampling.max_new_tokens = min(sampling.max_new_tokens, self.limits.max_new_tokens)
        if max(sampling.max_new_tokens, sampling.min_new_tokens) > self.limits.max_new_tokens:
            raise InputError(f"sampling.max_new_tokens {sampling.max_new_tokens} (or min_new_tokens) exceeds this "
                             f"server's limit {self.limits.max_new_tokens}")
        return sampling


def serving_state(request: Request) -> ServingState:
    """The routes' dependency: the app's :class:`ServingState`."""
    return request.app.state.m3d
