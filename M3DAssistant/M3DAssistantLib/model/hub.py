"""Where a checkpoint is: a local folder, or an HF hub id downloaded/cached with huggingface_hub.

No torch here: the Slicer process uses this (through ``inspect``) without the heavy stack. The hub is used through
huggingface_hub (cache, resume, progress). Offline, a model that is not in the cache gives a
:class:`ModelNotAvailableError` that says how to point at a local folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

from ..errors import CheckpointError, ModelNotAvailableError
from ..progress import ProgressCallback, report_progress

DEFAULT_MODEL = "GoodBaiBai88/M3D-LaMed-Phi-3-4B"
DEFAULT_CLIP = "GoodBaiBai88/M3D-CLIP"
MODEL_ENV = "M3D_MODEL"
PASS_MODEL_HINT = f"pass it with --model PATH (or set {MODEL_ENV}=PATH)"
"""How a message tells the user to name a model folder; commands that take the model otherwise (``m3d inspect
PATH``, ``m3d retrieve --clip-model PATH``) say their own way instead (:func:`with_model_hint`)."""


def with_model_hint(error: Exception, hint: str, example: Optional[str] = None) -> Exception:
    """The same error with :data:`PASS_MODEL_HINT` replaced by ``hint`` (and the default hub id in examples by
    ``example``), for a command whose model is not given with ``--model``."""
    text = str(error).replace(PASS_MODEL_HINT, hint)
    if example:
        text = text.replace(f"such as {DEFAULT_MODEL}", f"such as {example}")
    return type(error)(text)
# What a checkpoint needs; remote-code .py files and other extras on the hub repos are not downloaded.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt"]
# Enough to describe a checkpoint (config, weight index, tokenizer config) without its weights.
METADATA_PATTERNS = ["*.json"]


def is_hub_id(source: str) -> bool:
    """``owner/name`` as on the Hugging Face hub (a relative path of two parts looks the same: folders win)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", source) is not None


def split_revision(source: str, revision: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``owner/name@revision`` -> (``owner/name``, ``revision``): a pinned hub checkpoint in one string, so a model
    field, ``--model`` or ``$M3D_MODEL`` can pin a commit. Anything else comes back unchanged with ``revision``.

    :raises CheckpointError: the string pins one revision and ``revision`` names another.
    """
    repo, at, pinned = str(source).rpartition("@")
    if not at or not is_hub_id(repo) or not re.fullmatch(r"[\w./-]+", pinned):
        return str(source), revision
    if revision is not None and revision != pinned:
        raise CheckpointError(f"{source} pins revision {pinned!r} but revision={revision!r} was also given; "
                              f"give the revision once")
    return repo, pinned


def snapshot_revision(folder: Union[str, Path, None]) -> Optional[str]:
    """The commit of a hub-cache snapshot folder (``.../snapshots/<commit>``); None for any other folder."""
    if folder is None:
        return None
    folder = Path(folder)
    return folder.name if folder.parent.name == "snapshots" else None


def resolve_checkpoint(
    source: Union[str, Path, None] = None,
    revision: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
    metadata_only: bool = False,
) -> Path:
    """A local folder holding the checkpoint ``source`` (local folder, or hub id downloaded/cached).

    ``source=None`` uses ``$M3D_MODEL`` and then the default model. A hub id may pin its revision (branch, tag or
    commit) as ``owner/name@revision`` or with ``revision``. ``metadata_only`` fetches only the JSON files of a hub
    checkpoint (config, weight index, tokenizer config), for ``inspect``.
    """
    source = str(source or os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    source, revision = split_revision(source, revision)
    path = Path(source).expanduser()
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that contains config.json.")
    if not is_hub_id(source):
        raise CheckpointError(
            f"{source}: no such folder. Pass an existing checkpoint folder, or a Hugging Face hub id such as "
            f"{DEFAULT_MODEL}."
        )
    return _download(source, revision, progress, METADATA_PATTERNS if metadata_only else CHECKPOINT_PATTERNS)


def _download(repo_id: str, revision: Optional[str], progress: Optional[ProgressCallback], patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:  # a cached snapshot works offline and costs no network round trip
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    report_progress(progress, "download", None, f"downloading {repo_id} from the Hugging Face hub")
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, tqdm_class=_progress_tqdm(progress)
        )
    except Exception as e:  # network errors come in many types (requests, httpx, hub-specific)
        name = type(e).__name__
        raise ModelNotAvailableError(
            f"{repo_id} is not in the Hugging Face cache ({HF_HUB_CACHE}) and could not be downloaded ({name}). "
            "If this machine is offline, download the model elsewhere (`hf download "
            f"{repo_id} --local-dir M3D-model`), copy the folder here and {PASS_MODEL_HINT}."
        ) from None
    report_progress(progress, "download", 1.0, f"{repo_id} ready")
    return Path(folder)


def _has_weights(folder: Path) -> bool:
    from .checkpoint_files import weight_files

    try:
        weight_files(folder)
        return (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file() or (
            folder / "vocab.txt"
        ).is_file()
    except CheckpointError:
        return False


def _progress_tqdm(progress: Optional[ProgressCallback]):
    """A tqdm class that also forwards download progress to ``progress`` (the CLI shows tqdm's own bar)."""
    from tqdm.auto import tqdm

    if progress is None:
        return tqdm

    class ProgressTqdm(tqdm):
        def update(self, n=1):
            result = super().update(n)
            if self.total:
                report_progress(progress, "download", self.n / self.total, str(self.desc or ""))
            return result

    return ProgressTqdm
