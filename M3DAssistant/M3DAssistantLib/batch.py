"""``m3d batch``: the same prompts over a folder of volumes, one result folder per volume, resumable, and one cohort
table for the whole output folder.

Names that cannot collide, and stay the same from run to run:

* each volume's folder is named after the volume's own entry in the input folder (``a.nii.gz/``, ``a.nrrd/``,
  ``case1/`` for a DICOM series folder) -- entries of one folder are unique, so their output folders are;
* each task's files are named :attr:`BatchTask.slug`: ``report``, ``segment_liver`` when the argument is already a
  plain lower-case name, else the readable part plus a hash of the exact text (``segment_liver_8f3a…`` for
  ``Liver``); ``results.json`` records the task text behind every name, so a name that would be reused for another
  task is refused instead of overwritten.

``results.json`` in a volume's folder is written after its tasks; a re-run runs only the tasks a volume does not
have yet (a volume with all of them is "done before, skipped"). Label maps (TotalSegmentator's
``segmentation.nii.gz``) are refused, naming the CT next to them; one unreadable volume does not stop the batch.
``cohort.csv`` and ``cohort.jsonl`` (:func:`write_cohort_tables`) hold one row per volume and task, rebuilt from the
``results.json`` files, so resumed runs never duplicate rows. ``--batch-size N`` decodes N volumes together (same
greedy answers, up to N times the decoding throughput; memory grows with N). Under ``accelerate launch`` the
volumes are split across the processes by accelerate (``split_between_processes``), each on its own device.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import AI_LABEL
from .errors import CancelledError, InputError, LabelMapError, M3DError
from .tasks import STREAMING_TASKS, TASKS, ArgumentKind, ResultKind, Task

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
RESULTS_FILE = "results.json"
# a results.json entry's "task" is the training name (Provenance.task); its result kind says if a box/mask is due
_RESULT_OF_TRAINING_NAME = {task.training_name: task.result for task in TASKS.values()}
COHORT_CSV, COHORT_JSONL = "cohort.csv", "cohort.jsonl"
COHORT_COLUMNS = ("case", "task", "prompt", "status", "answer", "choice", "box", "mask_file", "box_file",
                  "volume_ml", "model", "model_revision", "convention", "window", "time", "duration_s", "label")
"""The cohort table's columns, in order (CSV header; the keys of every JSON line)."""

BATCH_TASKS: dict[str, Task] = {
    task.key: task for task in STREAMING_TASKS
    if all(a.kind is ArgumentKind.TEXT for a in task.arguments if a.required) and
    sum(a.required for a in task.arguments) <= 1
}
"""The tasks a batch can run: those that need at most one text (report, ask, locate, segment, segment_expression)."""

_PLAIN_ARGUMENT = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*")


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
        if task.takes(ArgumentKind.TEXT) is None and argument.strip():
            raise InputError(f"batch task {key!r} takes no argument; write '--task {key}'.")
        spec = cls(task, argument.strip())
        if task.build_prompt is not None:
            task.build_prompt(*spec.arguments)  # an unusable prompt is refused now, before any model loads
        return spec

    @property
    def text(self) -> str:
        """The task as written on the command line, normalised (``segment:Liver``): what its files were made by."""
        return f"{self.task.key}:{self.argument}" if self.argument else self.task.key

    @property
    def arguments(self) -> tuple:
        """The engine method's arguments."""
        return (self.argument,) if self.task.takes(ArgumentKind.TEXT) is not None else ()

    @property
    def slug(self) -> str:
        """The stem of this task's files: the task key, then the argument when it is a plain lower-case name
        (``segment_liver``), else its readable part and a hash of the exact text (``segment_liver_1a2b3c4d``), so
        ``Liver`` and ``liver``, or two questions that start alike, never share a file."""
        if not self.argument:
            return self.task.key
        if _PLAIN_ARGUMENT.fullmatch(self.argument) and len(self.argument) <= 40:
            return f"{self.task.key}_{self.argument}"
        readable = re.sub(r"[^a-z0-9]+", "_", self.argument.lower()).strip("_")[:40].strip("_")
        digest = hashlib.blake2b(self.argument.encode("utf-8"), digest_size=4).hexdigest()
        return f"{self.task.key}_{readable}_{digest}" if readable else f"{self.task.key}_{digest}"


def check_specs(specs: Sequence[BatchTask]) -> None:
    """Refuse a task given twice and two tasks whose file names would coincide (InputError naming them)."""
    seen: dict[str, BatchTask] = {}
    for spec in specs:
        other = seen.setdefault(spec.slug, spec)
        if other is not spec:
            if other.text == spec.text:
                raise InputError(f"--task {spec.text!r} is given twice; give each task once")
            raise InputError(f"--task {other.text!r} and --task {spec.text!r} would share the file name "
                             f"{spec.slug!r}; reword one of them")


def _is_dicom_folder(folder: Path) -> bool:
    """A folder holding DICOM files (the .dcm suffix or the DICM preamble), judged from its first few files."""
    files = [p for p in sorted(folder.iterdir())[:16] if p.is_file()]
    for f in files:
        if f.suffix.lower() == ".dcm":
            return True
        try:
            with open(f, "rb") as handle:
                if handle.read(132)[128:132] == b"DICM":
                    return True
        except OSError:
            continue
    return False


def find_volumes(folder: Path, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[Path]:
    """Volume files (NIfTI, NRRD, MetaImage) and DICOM series folders directly inside ``folder``, sorted. Other
    folders (e.g. TotalSegmentator's ``segmentations/``) are passed over, and said so."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give a folder of volumes (NIfTI, NRRD or DICOM series folders).")
    found = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES):
            found.append(path)
        elif path.is_dir() and any(p.is_file() for p in path.iterdir()):
            if _is_dicom_folder(path):
                found.append(path)  # read_volume treats a folder as a DICOM series
            else:
                log(f"{path.name}/: not a DICOM series folder, passed over (batch does not look into sub-folders)")
    if not found:
        raise InputError(f"{folder} holds no volumes ({', '.join(VOLUME_SUFFIXES)} files or DICOM folders).")
    lowered: dict[str, Path] = {}
    for path in found:
        clash = lowered.setdefault(path.name.lower(), path)
        if clash is not path:
            raise InputError(f"{clash.name} and {path.name} differ only in case, so their result folders would be one "
                             f"on Windows and macOS; rename one")
    return found


def volume_name(path: Path) -> str:
    """The volume's result folder: its own entry name (``a.nii.gz``, ``case1``), unique within its folder."""
    return Path(path).name


@dataclasses.dataclass
class BatchSummary:
    """What a batch run did: per volume ``done`` / ``skipped`` / ``refused: ...`` / ``failed: ...``, and what came
    back of the tasks that ran (``no_mask`` / ``no_box``: the model gave none -- absent, or an unparsable answer)."""

    status: dict[str, str] = dataclasses.field(default_factory=dict)
    answers: int = 0
    masks: int = 0
    boxes: int = 0
    no_mask: int = 0
    no_box: int = 0

    @property
    def failed(self) -> list[str]:
        return [name for name, s in self.status.items() if s.startswith("failed")]

    def count(self, state: str) -> int:
        return sum(1 for s in self.status.values() if s.split(":")[0] == state)

    def line(self) -> str:
        """One line for the end of a run, counting what actually ran."""
        volumes = (f"{len(self.status)} volume(s): {self.count('done')} run, {self.count('skipped')} done before "
                   f"(skipped), {self.count('refused')} refused, {self.count('failed')} failed")
        tasks = f"{self.answers} task(s) ran"
        extra = [f"{self.masks} mask(s)", f"{self.no_mask} without a mask"] if self.masks or self.no_mask else []
        extra += [f"{self.boxes} box(es)", f"{self.no_box} without a box"] if self.boxes or self.no_box else []
        return f"{volumes}; {tasks}" + (f": {', '.join(extra)}" if extra else "")


def _load_record(target: Path) -> dict[str, Any]:
    path = target / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is unreadable ({e}); move it away to run this volume again") from None
    return record if isinstance(record, dict) else {}


def _voxel_ml(ijk_to_ras: Any) -> float:
    return abs(float(np.linalg.det(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]))) / 1000.0


def run_cohort(
    engine,
    volumes: Sequence[Path],
    specs: Sequence[BatchTask],
    out_dir: Path,
    *,
    sampling=None,
    window=None,
    batch_size: int = 1,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> BatchSummary:
    """Run ``specs`` on each volume that does not have them yet; see the module docstring.

    Each volume's DICOM WindowCenter/WindowWidth and Modality (:func:`~.volume_io.read_volume_metadata`) go to the
    engine with it: the default window of report and VQA, as ``m3d report`` does for one volume. ``batch_size``
    volumes are read and held at once, and each task is decoded for all of them together
    (:meth:`~M3DAssistantLib.engine.InferenceEngine.run_batch`: greedy answers identical to one at a time)."""
    check_specs(specs)
    summary = BatchSummary()
    out_dir = Path(out_dir)
    engine.max_volumes = max(engine.max_volumes, batch_size)  # a group's volumes must all stay held
    pending: list[tuple[Path, dict, list[BatchTask]]] = []
    for path in volumes:
        name = volume_name(path)
        target = out_dir / name
        try:
            record = _load_record(target)
            done = record.get("tasks", {})
            for spec in specs:
                if spec.slug in done and done[spec.slug] != spec.text:
                    raise InputError(f"{target / RESULTS_FILE} holds {done[spec.slug]!r} under the name {spec.slug!r} "
                                     f"that --task {spec.text!r} would use; use another output folder")
        except M3DError as e:
            summary.status[name] = f"failed: {e}"
            log(f"{name}: FAILED: {e}")
            continue
        todo = [spec for spec in specs if spec.slug not in done]
        if not todo:
            summary.status[name] = "skipped"
            log(f"{name}: done before, skipped")
            continue
        pending.append((path, record, todo))
    for start in range(0, len(pending), batch_size):
        _run_group(engine, pending[start : start + batch_size], out_dir, sampling, window, batch_size, summary, log)
    return summary


def _run_group(engine, group, out_dir: Path, sampling, window, batch_size: int, summary: BatchSummary,
               log: Callable[[str], None]) -> None:
    """Read and hold the group's volumes, decode each task over them together, write each volume's files."""
    from . import outputs
    from .batched import BatchRequest
    from .volume_io import check_not_label_map, read_volume, read_volume_metadata

    held = []  # (path, record, todo, handle, ijk_to_ras)
    for path, record, todo in group:
        name = volume_name(path)
        try:
            array, ijk_to_ras = read_volume(path)
            check_not_label_map(array, path)
            meta = read_volume_metadata(path)
            handle = engine.set_volume(array, ijk_to_ras, window=window, display_window=meta.display_window,
                                       modality=meta.modality)
            held.append((path, record, todo, handle, ijk_to_ras))
        except LabelMapError as e:
            summary.status[name] = f"refused: {e}"
            log(f"{name}: refused: {e}")
        except M3DError as e:  # one bad volume must not stop the batch
            summary.status[name] = f"failed: {e}"
            log(f"{name}: FAILED: {e}")
    # task-major: each chunk decodes one prompt over the group's volumes (same length, little padding)
    order = list({spec.slug: spec for _p, _r, todo, _h, _a in held for spec in todo}.values())
    requests = [(path, spec, BatchRequest(spec.task.engine_method, spec.arguments, volume=handle))
                for spec in order for path, _r, todo, handle, _a in held if spec in todo]
    try:
        answers = engine.run_batch([r for _p, _s, r in requests], sampling=sampling, batch_size=batch_size)
    except CancelledError:
        raise
    except M3DError as e:  # e.g. out of memory for this group: its volumes fail, the next group still runs
        answers = [e] * len(requests)
    for path, record, todo, handle, ijk_to_ras in held:
        name = volume_name(path)
        target = out_dir / name
        try:
            mine = [(spec, answer) for (p, spec, _r), answer in zip(requests, answers) if p == path]
            error = next((answer for _s, answer in mine if isinstance(answer, M3DError)), None)
            if error is not None:
                raise error
            target.mkdir(parents=True, exist_ok=True)
            results = dict(record.get("results", {}))
            tasks = dict(record.get("tasks", {}))
            for spec, result in mine:
                entry = result.to_dict()
                entry["files"] = _write_files(outputs, target, spec, result, ijk_to_ras, summary)
                if spec.task.result is ResultKind.SEGMENTATION and result.mask is not None:
                    entry["volume_ml"] = round(result.voxel_count * _voxel_ml(ijk_to_ras), 3)
                results[spec.slug] = entry
                tasks[spec.slug] = spec.text
                summary.answers += 1
            outputs.write_json(target / RESULTS_FILE, {"volume": str(path), "label": AI_LABEL, "tasks": tasks,
                                                       "results": results}, overwrite=True)
            summary.status[name] = "done"
            log(f"{name}: done ({len(todo)} task(s))")
        except M3DError as e:  # one bad volume must not stop the batch
            summary.status[name] = f"failed: {e}"
            log(f"{name}: FAILED: {e}")
        finally:
            engine.forget_volume(handle.key)


def _write_files(outputs, folder: Path, spec: BatchTask, result, ijk_to_ras, summary: BatchSummary) -> dict:
    """The file Slicer opens for the result, by its kind: a mask as .seg.nrrd, a box as .mrk.json, a text as .txt.
    Returns {"mask": name} / {"box": name} / {"text": name}, or {} when the model gave no mask or box."""
    attributes = result.provenance.as_node_attributes()
    kind = spec.task.result
    name = spec.argument or spec.task.key
    if kind is ResultKind.SEGMENTATION:
        if result.mask is None:
            summary.no_mask += 1
            return {}
        path = outputs.write_segmentation_nrrd(folder / f"{spec.slug}.seg.nrrd", {name: result.mask}, ijk_to_ras,
                                               attributes=attributes, overwrite=True)
        summary.masks += 1
        return {"mask": path.name}
    if kind is ResultKind.BOX:
        if result.roi is None:
            summary.no_box += 1
            return {}
        path = outputs.write_roi(folder / f"{spec.slug}.mrk.json", result.roi, name, attributes=attributes,
                                 overwrite=True)
        summary.boxes += 1
        return {"box": path.name}
    path = outputs.write_text(folder / f"{spec.slug}.txt", f"{result.text}\n\n[{AI_LABEL}]\n", overwrite=True)
    return {"text": path.name}


def _window_name(provenance: dict) -> str:
    try:
        return str(json.loads(provenance.get("intensity") or "{}").get("name", ""))
    except (ValueError, AttributeError):
        return ""


def cohort_rows(out_dir: Path) -> list[dict[str, Any]]:
    """One row per volume and task, from every ``*/results.json`` under ``out_dir`` (sorted by case, then task)."""
    rows = []
    for record_path in sorted(Path(out_dir).glob(f"*/{RESULTS_FILE}")):
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("%s is unreadable; its volume is left out of the cohort table", record_path)
            continue
        case = record_path.parent.name
        for slug, entry in sorted(record.get("results", {}).items()):
            prov = entry.get("provenance", {})
            files = entry.get("files", {})
            kind = entry.get("task")
            has_value = entry.get("box") is not None or entry.get("mask_shape_kji") is not None
            result = _RESULT_OF_TRAINING_NAME.get(kind)
            status = "answered" if result not in (ResultKind.BOX, ResultKind.SEGMENTATION) or has_value else \
                "absent" if entry.get("absent") else f"no {'box' if result is ResultKind.BOX else 'mask'}"
            rows.append({
                "case": case, "task": record.get("tasks", {}).get(slug, slug), "prompt": prov.get("prompt", ""),
                "status": status, "answer": entry.get("text", ""), "choice": entry.get("choice") or "",
                "box": json.dumps(entry["box"]) if entry.get("box") is not None else "",
                "mask_file": f"{case}/{files['mask']}" if files.get("mask") else "",
                "box_file": f"{case}/{files['box']}" if files.get("box") else "",
                "volume_ml": entry.get("volume_ml", ""), "model": prov.get("model", ""),
                "model_revision": prov.get("model_revision") or "", "convention": prov.get("convention") or "",
                "window": _window_name(prov), "time": prov.get("time", ""), "duration_s": prov.get("duration_s", ""),
                "label": prov.get("label", AI_LABEL),
            })
    return rows


def write_cohort_tables(out_dir: Path) -> tuple[Path, Path]:
    """``cohort.csv`` and ``cohort.jsonl`` in ``out_dir`` (:data:`COHORT_COLUMNS`), rebuilt from the volumes'
    ``results.json`` and each written atomically (replacing the previous table, never half-written)."""
    from . import outputs

    rows = cohort_rows(out_dir)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COHORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = outputs.atomic_write_bytes(Path(out_dir) / COHORT_CSV, text.getvalue().encode("utf-8"),
                                          overwrite=True)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    jsonl_path = outputs.atomic_write_bytes(Path(out_dir) / COHORT_JSONL, lines.encode("utf-8"), overwrite=True)
    return csv_path, jsonl_path


def split_for_this_process(volumes: Sequence[Path]) -> tuple[list[Path], Optional[str]]:
    """Under ``accelerate launch`` (WORLD_SIZE > 1): this process's share of the volumes and its device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return list(volumes), None
    from accelerate import PartialState

    state = PartialState()
    with state.split_between_processes(list(volumes)) as share:
        return list(share), str(state.device)


def finish_distributed() -> bool:
    """Under ``accelerate launch``: wait for every process; True in the one process that writes the cohort table
    (always True without accelerate)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    return state.is_main_process
