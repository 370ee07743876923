"""A checkpoint folder on disk: which weight files it has, their index and safetensors headers, and whether a folder
(or an M3DTraining output) holds a complete checkpoint to load.

No torch here (``inspection`` and the panel run in Slicer's process); :mod:`.checkpoint_reader` reads the tensors.
Offline sites copy a checkpoint folder and choose it: :func:`local_checkpoint`, :func:`checkpoint_for_adapter`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

from ..errors import CheckpointError, M3DError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_RANK = 8


def _header_int(value: object) -> int:
    """A size or offset of a safetensors header: a non-negative JSON integer (not a float, a string or a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a checkpoint file."""

    name: str
    file: Path
    dtype: str  # safetensors dtype name: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset (safetensors only)
    nbytes: int = 0


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in load order; CheckpointError naming what is missing."""
    folder = Path(folder)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = folder / index_name
        if index_path.is_file():
            shards = sorted(set(read_weight_index(index_path).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{folder}: shard(s) {', '.join(missing)} listed in {index_name} are missing; the download is "
                    "incomplete. Run the download again (it resumes) or copy the missing files."
                )
            return [folder / s for s in shards]
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or "
        f"{BIN_INDEX}). Point to a complete M3D checkpoint folder."
    )


def read_weight_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index."""
    try:
        index = json.loads(Path(index_path).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        return {str(k): str(v) for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: unreadable weight index ({e}). Re-download the checkpoint.") from e


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Tensor names, dtypes, shapes and byte ranges of a .safetensors file, validated against the file size."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_len} does not fit in a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}); it is corrupted or truncated. "
                              "Delete it and download it again.") from e
    data_start = 8 + header_len
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupted. Delete it "
                              "and download it again.")
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(_header_int(s) for s in entry["shape"])
            begin, end = (_header_int(o) for o in entry["data_offsets"])
            nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for {name!r} ({e}); the file is corrupted.") from e
        if not name or len(shape) > _MAX_RANK or end - begin != nbytes or begin > end or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} (shape {list(shape)}, {dtype}) claims bytes {begin}..{end} but needs "
                f"{nbytes} and the file has {size - data_start} data bytes; the file is corrupted or truncated. Delete "
                "it and download it again."
            )
        infos.append(TensorInfo(name, path, dtype, shape, data_start + begin, nbytes))
    # As the safetensors format requires: the tensors tile the data, without overlaps or holes.
    position = 0
    for info in sorted(infos, key=lambda i: i.offset):
        if info.offset - data_start != position:
            raise CheckpointError(f"{path}: tensor {info.name!r} starts at data byte {info.offset - data_start}, not "
                                  f"{position}; tensors overlap or leave holes, so the file is corrupted. Delete it "
                                  "and download it again.")
        position += info.nbytes
    return infos


# --------------------------------------------------------------------------------------------- folders to load
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


__all__ = ["BIN_INDEX", "BIN_SINGLE", "SAFETENSORS_INDEX", "SAFETENSORS_SINGLE", "TensorInfo", "checkpoint_for_adapter",
           "local_checkpoint", "read_safetensors_header", "read_weight_index", "weight_files"]
