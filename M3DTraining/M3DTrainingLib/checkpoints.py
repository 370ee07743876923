"""Training checkpoints: durable when listed, verified before a resume, and read back without running pickled code.

A checkpoint ``OUTPUT_DIR/checkpoints/step-0000200/`` holds

* what ``accelerator.save_state`` writes: ``model.safetensors`` (the trained weights only, see :mod:`.train`),
  ``optimizer.bin`` (tensors and numbers), accelerate's ``random_states_N.pkl`` (DeepSpeed: its own files);
* ``train_state.json``: the step, epoch and data position (:class:`TrainState`) and the learning-rate scheduler's state
  -- JSON, not accelerate's pickled ``custom_checkpoint_N.pkl``, which accelerate loads with ``weights_only=False``;
* ``rng_state_N.json`` + ``rng_state_N.safetensors``: each process's random generators (Python, numpy, torch CPU and
  CUDA), so an exact resume never depends on a pickle;
* ``manifest.json``, written last: the size and SHA-256 of every other file.

**Writing** goes to ``.tmp-step-…``; every file and folder is fsynced and the manifest written before the rename, so a
folder named ``step-N`` is complete on disk even after a power loss. **Resuming** takes the newest checkpoint that
verifies (manifest present, every size and hash equal, the safetensors header readable, the JSON complete) and loads;
a checkpoint that fails either is skipped, with its name and the reason in the run's progress. **Reading**: every
``torch.load`` of a resume -- accelerate's and DeepSpeed's own included -- runs with weights-only loading forced
(``TORCH_FORCE_WEIGHTS_ONLY_LOAD``): tensors, numbers, containers and accelerate's numpy allow-list only; a pickle that
would construct anything else (run code) is refused and its checkpoint skipped. Checkpoints of earlier versions (no
manifest, pickled state) are therefore not resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from M3DAssistantLib.errors import CheckpointError
from M3DAssistantLib.outputs import ordinary_permissions

from .config import CHECKPOINTS_DIR, checkpoint_dir_name, checkpoint_step

MANIFEST_FILE = "manifest.json"
TRAIN_STATE_FILE = "train_state.json"
CHECKPOINT_FORMAT = "m3d-training-checkpoint"
CHECKPOINT_VERSION = 1


class TrainState:
    """Where the run is: optimizer steps done, epoch, micro-batches of this epoch consumed (per process)."""

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])


# ---------------------------------------------------------------------------------------------------------- listing
def list_checkpoints(output_dir: Union[str, Path]) -> list[Path]:
    """Checkpoint folders of a run, oldest first (a ``.tmp-…`` one, from a kill while saving, is never listed)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p.name) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p.name))


def latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------- writing
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    """fsync a file, or a folder's entry table (POSIX; folders cannot be opened on Windows: skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(folder: Path, step: int) -> None:
    """fsync every file and folder below ``folder``, then write its manifest (fsynced too)."""
    files = _files(folder)
    for path in files:
        _fsync_path(path)
    for sub in sorted({p.parent for p in files} | {folder}, key=lambda p: len(p.parts), reverse=True):
        _fsync_path(sub)
    manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
                "files": {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                          for p in files}}
    path = folder / MANIFEST_FILE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(folder)


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """This process's random generators as (JSON, tensors for safetensors)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    json_state = {"python": [version, list(internal), gauss],
                  "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return json_state, tensors


def set_rng_state(json_state: dict[str, Any], tensors: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = json_state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _write_rng(folder: Path, process_index: int) -> None:
    from safetensors.torch import save_file

    json_state, tensors = rng_state()
    (folder / f"rng_state_{process_index}.json").write_text(json.dumps(json_state), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"rng_state_{process_index}.safetensors"))


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, state: Optional[dict[str, Any]] = None,
                    save_kwargs: Optional[dict[str, Any]] = None) -> Path:
    """``accelerator.save_state`` plus our JSON state and RNG files into ``.tmp-step-N``; every file fsynced and the
    manifest written before the folder is renamed to ``step-N``; only the newest ``keep`` are kept.

    ``state``: what ``train_state.json`` holds (TrainState and scheduler state dicts)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_dir_name(step)
    tmp = root / f".tmp-{checkpoint_dir_name(step)}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True, **(save_kwargs or {}))
    _write_rng(tmp, int(getattr(accelerator, "process_index", 0)))
    accelerator.wait_for_everyone()
    if main:
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps({"step": step, **(state or {})}, indent=1), encoding="utf-8")
        ordinary_permissions(tmp)
        write_manifest(tmp, step)
        if final.exists():  # a checkpoint of this step that a resume skipped (corrupted): replaced
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_path(root)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# -------------------------------------------------------------------------------------------------------- verifying
def verify_checkpoint(folder: Path) -> Optional[str]:
    """Why ``folder`` cannot be resumed from (a missing or differing file, a broken header), or None when every file
    is what its manifest says."""
    from M3DAssistantLib.model.checkpoint_files import read_safetensors_header

    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (f"it has no {MANIFEST_FILE} (written by an earlier version, or its writing was cut short); its state "
                f"is not loaded")
    except (OSError, ValueError) as e:
        return f"its {MANIFEST_FILE} is unreadable ({e})"
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT or not isinstance(
            manifest.get("files"), dict):
        return f"its {MANIFEST_FILE} is not an M3D training checkpoint manifest"
    if manifest.get("step") != checkpoint_step(folder.name):
        return f"its manifest is for step {manifest.get('step')}, not {checkpoint_step(folder.name)}"
    listed = manifest["files"]
    if TRAIN_STATE_FILE not in listed:
        return f"{TRAIN_STATE_FILE} is not in its manifest"
    for name, entry in sorted(listed.items()):
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"its manifest names {name!r}, outside the checkpoint"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry.get("bytes"):
            return f"{name} has {size} bytes, not the {entry.get('bytes')} it was written with (truncated or changed)"
        if _sha256(path) != entry.get("sha256"):
            return f"{name} differs from what was written (its SHA-256 does not match)"
    unlisted = [p.relative_to(folder).as_posix() for p in _files(folder)
                if p.relative_to(folder).as_posix() not in listed]
    if unlisted:
        return f"it holds files that were not written with it: {', '.join(unlisted[:3])}"
    try:
        for path in folder.glob("*.safetensors"):
            read_safetensors_header(path)
        state = json.loads((folder / TRAIN_STATE_FILE).read_text(encoding="utf-8"))
        TrainState().load_state_dict(state["train_state"])
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
        return f"its content is unreadable ({e})"
    return None


def intact_checkpoints(output_dir: Union[str, Path]) -> Iterator[tuple[Path, Optional[str]]]:
    """``(checkpoint, why it is skipped or None)``, newest first: the resume takes the first with None."""
    for folder in reversed(list_checkpoints(output_dir)):
        yield folder, verify_checkpoint(folder)


# ---------------------------------------------------------------------------------------------------------- reading
@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` in this block loads weights only, even where the caller (accelerate's custom state,
    DeepSpeed) asks for full unpickling."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def load_checkpoint(accelerator, folder: Path, load_kwargs: Optional[dict[str, Any]] = None,
                    apply_state: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Load a verified checkpoint: accelerate's files with weights-only loading forced, then our JSON state (given to
    ``apply_state``) and this process's random generators. A refused pickle or a load error is a CheckpointError."""
    import pickle

    from safetensors.torch import load_file

    try:
        with weights_only_loading():
            accelerator.load_state(str(folder), **(load_kwargs or {}))
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
        refused = "weights only" in str(e).lower() or isinstance(e, pickle.UnpicklingError)
        why = ("it holds pickled Python objects that could run code, which a resume never loads" if refused
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise CheckpointError(f"{folder.name}: {why}") from e
    state = json.loads((folder / TRAIN_STATE_FILE).read_text(encoding="utf-8"))
    if apply_state is not None:
        apply_state(state)
    index = int(getattr(accelerator, "process_index", 0))
    rng_json = folder / f"rng_state_{index}.json"
    if rng_json.is_file():  # one per process that wrote the checkpoint; a different process count draws afresh
        set_rng_state(json.loads(rng_json.read_text(encoding="utf-8")),
                      load_file(str(folder / f"rng_state_{index}.safetensors")))
    return state


__all__ = ["MANIFEST_FILE", "TRAIN_STATE_FILE", "TrainState", "intact_checkpoints", "latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "save_checkpoint", "verify_checkpoint", "weights_only_loading"]
