"""The progress file of a run, ``OUTPUT_DIR/progress.jsonl``: what one line holds, how it is written and read.

The trainer appends a :class:`TrainingProgressEvent` per line through :class:`ProgressLog`; :mod:`.jobs` reads the
file for a job's status, the panel follows it with :class:`ProgressTail`. One JSON object per line: the fields of a
:class:`~M3DAssistantLib.progress.ProgressEvent` (stage, fraction, message) plus the training metrics (step, epoch,
loss, lr, samples_per_s, eta_s, gpu_memory_bytes, time). Only the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Union

from M3DAssistantLib.progress import ProgressEvent

# Terminal stages: the trainer's last event, the one a cancel appends, or the one written for a run that died
# without a word (SIGKILL, out of memory, power loss) by the next process that looks at the folder.
DONE_STAGE = "done"
ERROR_STAGE = "error"
CANCELLED_STAGE = "cancelled"
INTERRUPTED_STAGE = "interrupted"
TERMINAL_STAGES = frozenset({DONE_STAGE, ERROR_STAGE, CANCELLED_STAGE, INTERRUPTED_STAGE})


@dataclasses.dataclass(frozen=True)
class TrainingProgressEvent(ProgressEvent):
    """A :class:`ProgressEvent` with the training metrics; one JSON line of ``progress.jsonl`` each.

    ``stage`` is "estimate", "start", "train", "checkpoint", "save", "done", "error", "cancelled" or
    "interrupted".
    """

    step: Optional[int] = None
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    loss: Optional[float] = None
    lm_loss: Optional[float] = None
    dice_loss: Optional[float] = None
    bce_loss: Optional[float] = None
    lr: Optional[float] = None
    samples_per_s: Optional[float] = None
    eta_s: Optional[float] = None
    gpu_memory_bytes: Optional[int] = None
    time: float = dataclasses.field(default_factory=time.time)
    details: Optional[dict] = None


class ProgressLog:
    """Appends ProgressEvents (and their subclasses' metric fields) to a JSON-lines file; reads them back.

    Every event is one line written with one ``write`` call and flushed, so a reader never sees half an event
    except after a kill mid-write, and :meth:`read` skips such a line.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    def __call__(self, event: ProgressEvent) -> None:
        record = event.to_dict()
        record.setdefault("time", time.time())
        line = json.dumps(record, default=_json_default) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    @staticmethod
    def read(path: Union[str, Path], offset: int = 0) -> tuple[list[dict], int]:
        """Events from byte ``offset`` on, and the offset after the last complete line (for incremental polling)."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        events = []
        end = data.rfind(b"\n") + 1  # an unfinished last line is read on the next poll
        for raw in data[:end].splitlines():
            try:
                events.append(json.loads(raw))
            except ValueError:
                continue  # a line cut by a kill
        return events, offset + end


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class ProgressTail:
    """Reads a job's ``progress.jsonl`` incrementally: each call returns only the events added since the previous
    one (an unfinished last line waits for the next call); a replaced or truncated file is read again from the start.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self.offset = 0
        self._identity: Optional[tuple[int, int]] = None

    def read_new(self) -> tuple[list[dict], bool]:
        """``(events, restarted)``; ``restarted`` says that earlier events no longer hold (the file was replaced)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            restarted = self.offset > 0
            self.offset, self._identity = 0, None
            return [], restarted
        identity = (stat.st_dev, stat.st_ino)
        restarted = self._identity is not None and (identity != self._identity or stat.st_size < self.offset)
        if restarted:
            self.offset = 0
        self._identity = identity
        if stat.st_size == self.offset:
            return [], restarted
        events, self.offset = ProgressLog.read(self.path, self.offset)
        return events, restarted


def last_event(path: Union[str, Path]) -> Optional[dict]:
    """The last complete event of a progress file (None when it is empty or missing)."""
    events = ProgressLog.read(path)[0]
    return events[-1] if events else None


def record_interruption(path: Union[str, Path], message: str) -> bool:
    """Append an ``interrupted`` event unless the run already ended with a terminal event (or never started): the
    record of a run that died without writing one. Returns whether it was written."""
    last = last_event(path)
    if last is None or last.get("stage") in TERMINAL_STAGES:
        return False
    ProgressLog(path)(ProgressEvent(INTERRUPTED_STAGE, None, message))
    return True
