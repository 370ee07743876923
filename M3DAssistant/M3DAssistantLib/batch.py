"""``m3d batch``: the same prompts over a folder of volumes, one result folder per volume, resumable.

Each volume gets ``OUT/<name>/`` with the task outputs (``report.txt``, ``segment_<target>.seg.nrrd``,
``locate_<target>.mrk.json``, ...) and ``results.json`` written last: a volume whose ``results.json`` exists is
skipped on a re-run. ``--batch-size N`` decodes N volumes together (same answers, up to N times the decoding
throughput; memory grows with N). Under ``accelerate launch`` the volumes are split across the processes by accelerate
(``split_between_processes``), each on its own device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import AI_LABEL
from .errors import CancelledError, InputError, M3DError
from .tasks import STREAMING_TASKS, ArgumentKind, ResultKind, Task

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

BATCH_TASKS: dict[str, Task] = {
    task.key: task for task in STREAMING_TASKS
    if all(a.kind is ArgumentKind.TEXT for a in task.arguments if a.required) and
    sum(a.required for a in task.arguments) <= 1
}
"""The tasks a batch can run: those that need at most one text (report, ask, locate, segment, segment_expression)."""


def batch_task_forms() -> str:
    """``report | ask:QUESTION | ...``: how ``--task`` names each batch task."""
    forms = []
    for task in BATCH_TASKS.values():
        text = task.takes(ArgumentKind.TEXT)
        forms.append(f"{task.key}:{text.name.upper()}" if text is not None else task.key)
    return " | ".join(forms)


@dataclasses.dataclass(frozen=True)
class BatchTask:
    """One prompt to run on every volume: ``report``, ``ask:QUESTION``, ``locate:EXPRESSION``, ``segment:TARGET``,
    ``segment_expression:EXPRESSION`` (see :data:`BATCH_TASKS`)."""

    task: Task
    argument: str = ""

    @classmethod
    def parse(cls, text: str) -> "BatchTask":
        key, _, argument = text.partition(":")
        key = key.strip().replace("-", "_")
        if key not in BATCH_TASKS:
            raise InputError(f"unknown batch task {key!r}; use one of {', '.join(BATCH_TASKS)} (e.g. 'segment:liver').")
        task = BATCH_TASKS[key]
        if task.takes(ArgumentKind.TEXT) is not None and not argument.strip():
            raise InputError(f"batch task {key!r} needs an argument, e.g. '{key}:liver'.")
        return cls(task, argument.strip())

    @property
    def arguments(self) -> tuple:
        """The engine method's arguments."""
        return (self.argument,) if self.task.takes(ArgumentKind.TEXT) is not None else ()

    @property
    def slug(self) -> str:
        safe = "".join(c if c.isalnum() else "_" for c in self.argument.lower()).strip("_")[:40]
        return f"{self.task.key}_{safe}" if safe else self.task.key


def find_volumes(folder: Path) -> list[Path]:
    """Volume files (NIfTI, NRRD, MetaImage) and DICOM series folders directly inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give a folder of volumes (NIfTI, NRRD or DICOM series folders).")
    found = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES):
            found.append(path)
        elif path.is_dir() and any(p.is_file() for p in path.iterdir()):
            found.append(path)  # read_volume treats a folder as a DICOM series
    if not found:
        raise InputError(f"{folder} holds no volumes ({', '.join(VOLUME_SUFFIXES)} files or DICOM folders).")
    return found


def volume_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def run_batch(
    engine,
    volumes: Sequence[Path],
    specs: Sequence[BatchTask],
    out_dir: Path,
    *,
    sampling=None,
    window=None,
    batch_size: int = 1,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> dict[str, str]:
    """Run ``specs`` on each volume; returns {volume name: "done" | "skipped" | "failed: ..."}.

    ``batch_size`` volumes are read and held at once, and each task is decoded for all of them together
    (:meth:`~M3DAssistantLib.engine.InferenceEngine.run_batch`: greedy answers identical to one at a time)."""
    from . import outputs
    from .batched import BatchRequest
    from .volume_io import read_volume

    status: dict[str, str] = {}
    out_dir = Path(out_dir)
    engine.max_volumes = max(engine.max_volumes, batch_size)  # a group's volumes must all stay held
    pending = []
    for path in volumes:
        name = volume_name(path)
        if (out_dir / name / "results.json").is_file():
            status[name] = "skipped"
            log(f"{name}: done before, skipped")
        else:
            pending.append(path)
    for start in range(0, len(pending), batch_size):
        held = {}  # path -> (handle, ijk_to_ras)
        for path in pending[start : start + batch_size]:
            try:
                array, ijk_to_ras = read_volume(path)
                held[path] = (engine.set_volume(array, ijk_to_ras, window=window), ijk_to_ras)
            except M3DError as e:  # one bad volume must not stop the batch
                status[volume_name(path)] = f"failed: {e}"
                log(f"{volume_name(path)}: FAILED: {e}")
        # task-major: each chunk decodes one prompt over the group's volumes (same length, no padding)
        requests = [(path, spec, BatchRequest(spec.task.engine_method, spec.arguments, volume=handle))
                    for spec in specs for path, (handle, _) in held.items()]
        try:
            answers = engine.run_batch([r for _, _, r in requests], sampling=sampling, batch_size=batch_size)
        except CancelledError:
            raise
        except M3DError as e:  # e.g. out of memory for this group: its volumes fail, the next group still runs
            answers = [e] * len(requests)
        for path, (handle, ijk_to_ras) in held.items():
            name = volume_name(path)
            target = out_dir / name
            try:
                mine = [(spec, answer) for (p, spec, _), answer in zip(requests, answers) if p == path]
                error = next((answer for _, answer in mine if isinstance(answer, M3DError)), None)
                if error is not None:
                    raise error
                target.mkdir(parents=True, exist_ok=True)
                results = {}
                for spec, result in mine:
                    results[spec.slug] = result.to_dict()
                    _write_files(outputs, target, spec, result, ijk_to_ras)
                outputs.write_json(target / "results.json",
                                   {"volume": str(path), "label": AI_LABEL, "results": results}, overwrite=True)
                status[name] = "done"
                log(f"{name}: done")
            except M3DError as e:  # one bad volume must not stop the batch
                status[name] = f"failed: {e}"
                log(f"{name}: FAILED: {e}")
            finally:
                engine.forget_volume(handle.key)
    return status


def _write_files(outputs, folder: Path, spec: BatchTask, result, ijk_to_ras) -> None:
    """The file Slicer opens for the result, by its kind: a mask as .seg.nrrd, a box as .mrk.json, a text as .txt."""
    attributes = result.provenance.as_node_attributes()
    kind = spec.task.result
    if kind is ResultKind.SEGMENTATION and result.mask is not None:
        outputs.write_segmentation_nrrd(folder / f"{spec.slug}.seg.nrrd", {spec.argument: result.mask}, ijk_to_ras,
                                        attributes=attributes, overwrite=True)
    elif kind is ResultKind.BOX and result.roi is not None:
        outputs.write_roi(folder / f"{spec.slug}.mrk.json", result.roi, spec.argument, attributes=attributes,
                          overwrite=True)
    elif kind is ResultKind.TEXT:
        outputs.write_text(folder / f"{spec.slug}.txt", f"{result.text}\n\n[{AI_LABEL}]\n", overwrite=True)


def split_for_this_process(volumes: Sequence[Path]) -> tuple[list[Path], Optional[str]]:
    """Under ``accelerate launch`` (WORLD_SIZE > 1): this process's share of the volumes and its device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return list(volumes), None
    from accelerate import PartialState

    state = PartialState()
    with state.split_between_processes(list(volumes)) as share:
        return list(share), str(state.device)
