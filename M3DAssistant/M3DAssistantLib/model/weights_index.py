"""Checkpoint layout on disk: which weight files a folder has, their index, and safetensors headers.

No torch here (``inspect`` runs in Slicer's process); :mod:`.checkpoint` reads the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

from ..errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


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
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for {name!r} ({e}); the file is corrupted.") from e
        if end - begin != nbytes or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} claims bytes {begin}..{end} but needs {nbytes} and the file has "
                f"{size - data_start} data bytes; the file is corrupted or truncated. Delete it and download it again."
            )
        infos.append(TensorInfo(name, path, dtype, shape, data_start + begin, nbytes))
    return infos
