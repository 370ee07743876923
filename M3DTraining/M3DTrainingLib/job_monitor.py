"""What the panel shows of a training job and of its helper processes, polled from the panel's timer.

:class:`JobMonitor` follows one :class:`~.jobs.Job`: its progress read incrementally, its loss curve, its state and
the status line; :class:`HelperQueue` holds the helper processes (GPU query, estimate, evaluation, merge) and calls
back on the caller's thread when one ends.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from M3DAssistantLib.units import format_bytes  # standard library only

from .config import ADAPTER_DIR
from .loss_curve import LossCurve
from .progress_log import ProgressTail

log = logging.getLogger(__name__)


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0)))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def format_progress(event: Optional[dict]) -> str:
    """One line from the last ``train`` event: step, epoch, loss, learning rate, throughput, ETA, GPU memory."""
    if not event:
        return ""
    parts = []
    if event.get("step") is not None:
        total = event.get("total_steps")
        parts.append(f"step {event['step']}/{total}" if total else f"step {event['step']}")
    if event.get("epoch") is not None:
        parts.append(f"epoch {event['epoch']:.2f}")
    if event.get("loss") is not None:
        parts.append(f"loss {event['loss']:.4f}")
    if event.get("lr") is not None:
        parts.append(f"lr {event['lr']:.2e}")
    if event.get("samples_per_s") is not None:
        parts.append(f"{event['samples_per_s']:.2f} samples/s")
    if event.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(event['eta_s'])}")
    if event.get("gpu_memory_bytes"):
        parts.append(f"GPU memory {format_bytes(event['gpu_memory_bytes'])}")
    return " \u00b7 ".join(parts)


def remember_folder(folders: Sequence[str], folder: str, limit: int = 10) -> list[str]:
    """``folder`` first, then the others (no duplicates), at most ``limit``: the jobs to look for on reopening."""
    folder = str(Path(folder))
    return [folder] + [f for f in folders if f and str(Path(f)) != folder][: limit - 1]


class JobMonitor:
    """One job as the panel sees it: its progress read incrementally, its loss curve, its state.

    :param job: an :class:`M3DTrainingLib.jobs.Job` (started here or reconnected from its output folder)
    """

    RESUMABLE = ("cancelled", "interrupted", "failed")

    def __init__(self, job: Any):
        self.job = job
        self.tail = ProgressTail(job.progress_path)
        self.curve = LossCurve()
        self.last_event: Optional[dict] = None
        self.last_train_event: Optional[dict] = None
        self.final_status: Any = None  # the JobStatus once the job's process has ended

    def poll(self) -> tuple[list[dict], bool]:
        """``(new events, whether the loss curve changed)``; checks the process while it runs (or when new events
        come after it ended: a resume from elsewhere)."""
        events, restarted = self.tail.read_new()
        if restarted:
            self.curve = LossCurve()
            self.last_event = self.last_train_event = None
        for event in events:
            self.last_event = event
            if event.get("stage") == "train":
                self.last_train_event = event
        changed = self.curve.add(events) or restarted
        if self.final_status is None or events:
            try:
                alive = self.job.is_alive()
            except ImportError:  # psutil missing: a job of an earlier session cannot be checked
                alive = False
            self.final_status = None if alive else self.job.status()
        return events, changed

    @property
    def state(self) -> str:
        """"running", or the ended job's state ("completed", "failed", "cancelled", "interrupted")."""
        return "running" if self.final_status is None else self.final_status.state

    def can_resume(self) -> bool:
        return self.state in self.RESUMABLE and not (Path(self.job.output_dir) / ADAPTER_DIR).exists()

    def fraction(self) -> Optional[float]:
        if self.state == "completed":
            return 1.0
        event = self.last_train_event or self.last_event
        return None if not event or event.get("fraction") is None else float(event["fraction"])

    def status_text(self) -> str:
        """The state with the last message, then the metrics line of the last training step."""
        if self.state == "running":
            message = (self.last_event or {}).get("message") or "starting"
            head = f"Running (process {self.job.pid}): {message}"
        else:
            head = f"{self.state.capitalize()}: {self.final_status.message}"
        metrics = format_progress(self.last_train_event)
        return head + ("\n" + metrics if metrics else "")

    def cancelled(self, status: Any) -> None:
        self.poll()
        self.final_status = status

    def resumed(self) -> None:
        self.final_status = None


class HelperQueue:
    """Helper processes (anything with ``poll()`` returning None until done) and what to do with their results;
    :meth:`poll` runs on the caller's thread (the panel's timer), so callbacks may touch Qt and MRML."""

    def __init__(self) -> None:
        self._items: list[tuple[Any, Callable[[Any], Any], Optional[Callable[[Any], None]]]] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, helper: Any, finish: Callable[[Any], Any], callback: Optional[Callable[[Any], None]]) -> None:
        """``finish(result)`` turns the helper's result into a value (or raises); ``callback`` receives the value or
        the exception."""
        self._items.append((helper, finish, callback))

    def poll(self) -> None:
        for item in list(self._items):
            helper, finish, callback = item
            result = helper.poll()
            if result is None:
                continue
            self._items.remove(item)
            try:
                value = finish(result)
            except Exception as error:  # handed to the callback: the panel shows it
                value = error
            if callback is not None:
                callback(value)
            elif isinstance(value, Exception):
                log.error("%s", value)

    def cancel_all(self) -> None:
        for helper, _finish, _callback in self._items:
            cancel = getattr(helper, "cancel", None)
            if cancel is not None:
                cancel()
        self._items = []
