"""Where model weights live and whether there is room for them, checked before the worker downloads anything.

The worker downloads hub checkpoints into the Hugging Face cache (``huggingface_hub`` resumes partial downloads).
This module, light enough for Slicer's own process (standard library; ``huggingface_hub`` only to ask the hub for
file sizes), answers the questions the panel asks first:

* which cache folder is used (:func:`hub_cache_dir`, changeable with an ``HF_HOME``-like setting that the worker
  receives through :func:`worker_environment`),
* whether a hub model is already there (:func:`cached_snapshot`; then nothing is downloaded),
* how big the download is (:func:`download_size`, from the hub's file metadata) and whether the disk has room
  (:func:`check_disk_space`),
* which folder to load for a local checkpoint or a fine-tuned adapter (:func:`local_checkpoint`,
  :func:`checkpoint_for_adapter`): offline sites copy a checkpoint folder and choose it, nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Optional

from .errors import CheckpointError, M3DError
from .model.hub import CHECKPOINT_PATTERNS, is_hub_id, split_revision
from .model.weights_index import weight_files

logger = logging.getLogger(__name__)

DISK_MARGIN = 1.05  # keep 5 % more than the download needs (temporary files, the filesystem's own reserve)


class InsufficientDiskSpaceError(M3DError, OSError):
    """Not enough free space for a model download."""


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "unknown size"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------------------------------ the cache
def hub_cache_dir(hf_home: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Path:
    """The Hugging Face hub cache the worker uses: ``hf_home/hub`` when the setting is given, else as
    huggingface_hub decides (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``,
    ``~/.cache/huggingface/hub``)."""
    env = os.environ if environ is None else environ
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(variable):
            return Path(env[variable]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def worker_environment(hf_home: Optional[str]) -> dict[str, Optional[str]]:
    """Environment changes that make the worker use the chosen cache (``{}``: the default one)."""
    if not hf_home:
        return {}
    home = Path(hf_home).expanduser()
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HUGGINGFACE_HUB_CACHE": None}


def cached_snapshot(repo_id: str, cache_dir: Path, revision: Optional[str] = None) -> Optional[Path]:
    """The cached snapshot folder of a hub model that has its weights, or None (nothing to download then).

    ``revision``: only that branch, tag (through the cache's ``refs/``) or commit counts."""
    owner, _, name = repo_id.partition("/")
    repo = Path(cache_dir) / f"models--{owner}--{name}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    if revision is not None:
        ref = repo / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        candidates = [c for c in candidates if c.name == commit]
    for snapshot in candidates:
        try:
            if weight_files(snapshot) and (snapshot / "config.json").is_file():
                return snapshot
        except CheckpointError:  # partial: the download resumes
            continue
    return None


def download_size(repo_id: str, revision: Optional[str] = None) -> Optional[int]:
    """Bytes the worker will download for ``repo_id`` (the files matching the checkpoint patterns), from the hub's
    file metadata; None when it cannot be asked (offline, huggingface_hub missing)."""
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # network, auth and missing-package errors come in many types
        logger.info("could not get the size of %s from the hub (%s)", repo_id, type(e).__name__)
        return None
    total = 0
    for sibling in info.siblings or []:
        if any(fnmatch.fnmatch(sibling.rfilename, pattern) for pattern in CHECKPOINT_PATTERNS):
            total += int(sibling.size or 0)
    return total or None


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk_space(folder: Path, needed: Optional[int], margin: float = DISK_MARGIN) -> int:
    """Raise :class:`InsufficientDiskSpaceError` when ``folder``'s disk cannot hold ``needed`` bytes; returns the
    free bytes. ``needed=None`` (size unknown) passes."""
    free = free_bytes(folder)
    if needed is not None and free < needed * margin:
        raise InsufficientDiskSpaceError(
            f"the model download needs {human_bytes(needed)} but only {human_bytes(free)} is free on the disk of "
            f"{folder}. Free some space, choose a Hugging Face cache folder on a larger disk (M3D Assistant > "
            f"Advanced), or download the model on another computer and choose its folder as a local checkpoint.")
    return free


@dataclasses.dataclass
class WeightsStatus:
    """Where a model's weights are and what loading it will download."""

    source: str
    cache_dir: Path
    local_path: Optional[Path]  # a folder (local checkpoint or cached snapshot): nothing to download
    download_bytes: Optional[int]  # for a hub model not in the cache; None: unknown or nothing to download
    free_bytes: int

    @property
    def needs_download(self) -> bool:
        return self.local_path is None

    def describe(self) -> str:
        if self.local_path is not None:
            return f"{self.source}: ready at {self.local_path}"
        return (f"{self.source}: will be downloaded ({human_bytes(self.download_bytes)}) into {self.cache_dir} "
                f"({human_bytes(self.free_bytes)} free)")


def weights_status(source: str, hf_home: Optional[str] = None,
                   size_of: Callable[[str, Optional[str]], Optional[int]] = download_size) -> WeightsStatus:
    """Check ``source`` (hub id, ``owner/name@revision``, or folder) before the worker loads it; raises when a
    download would not fit. ``size_of(repo_id, revision)`` asks the hub for the download size.

    :raises InsufficientDiskSpaceError: the hub model is not cached and the cache's disk is too small.
    """
    cache = hub_cache_dir(hf_home)
    path = Path(source).expanduser()
    repo_id, revision = split_revision(source)
    if path.is_dir() or not is_hub_id(repo_id):
        return WeightsStatus(source, cache, local_checkpoint(path), None, free_bytes(path))
    snapshot = cached_snapshot(repo_id, cache, revision)
    if snapshot is not None:
        return WeightsStatus(source, cache, snapshot, None, free_bytes(cache))
    size = size_of(repo_id, revision)
    free = check_disk_space(cache, size)
    return WeightsStatus(source, cache, None, size, free)


# --------------------------------------------------------------------------------------------- local folders
def _is_full_checkpoint(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    try:
        return bool(weight_files(folder))
    except CheckpointError:
        return False


def local_checkpoint(folder: Path) -> Path:
    """``folder`` if it is a complete checkpoint (config.json + weights), else CheckpointError saying what is wrong."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; choose the folder that contains the checkpoint's "
                              f"config.json and weights.")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; choose the checkpoint folder itself (as downloaded "
                              f"from the Hugging Face hub).")
    weight_files(folder)  # names what is missing
    return folder


def checkpoint_for_adapter(folder: Path) -> Path:
    """The full checkpoint to load for a fine-tuned model from M3DTraining.

    The worker loads full checkpoints in the official layout: a merged model folder is used as it is, and for a
    training output (``adapter/``) its ``merged`` folder is found. An adapter that was not merged yet gives an
    error that says how to merge it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; choose the training output folder (or its merged model).")
    if _is_full_checkpoint(folder):
        return folder
    candidates = [folder / "merged"] + ([folder.parent / "merged"] if folder.name == "adapter" else [])
    for candidate in candidates:
        if _is_full_checkpoint(candidate):
            return candidate
    if any((f / name).is_file() for f in (folder, folder / "adapter")
           for name in ("adapter_config.json", "train_config.yaml")):
        output = folder.parent if folder.name == "adapter" else folder
        raise M3DError(
            f"{folder} holds a fine-tuning adapter, but the worker loads full checkpoints. Merge it once into "
            f"{output / 'merged'} (Python console: from M3DTrainingLib.merge import merge; "
            f"merge(r'{output}', r'{output / 'merged'}')) and choose {output} again: the merged model is then found.")
    raise CheckpointError(f"{folder} is neither an M3D checkpoint (config.json + weights) nor an M3DTraining output "
                          f"folder (adapter/).")


__all__ = ["InsufficientDiskSpaceError", "WeightsStatus", "hub_cache_dir", "worker_environment", "cached_snapshot",
           "download_size", "free_bytes", "check_disk_space", "weights_status", "local_checkpoint",
           "checkpoint_for_adapter", "human_bytes"]
