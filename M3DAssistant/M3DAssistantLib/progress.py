"""One progress mechanism for engine callbacks, CLI bars, server streams and training logs."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """What is happening now.

    ``stage`` is a short machine-readable name ("load", "download", "encode", "generate", ...), ``fraction`` is in
    [0, 1] or None when the amount of work is unknown, ``message`` is for people.
    """

    stage: str
    fraction: Optional[float] = None
    message: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]


def report_progress(callback: Optional[ProgressCallback], stage: str, fraction: Optional[float] = None,
                    message: str = "") -> None:
    """Send an event to ``callback`` if there is one."""
    if callback is not None:
        callback(ProgressEvent(stage, None if fraction is None else min(max(float(fraction), 0.0), 1.0), message))
