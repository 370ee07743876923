"""Answers and result records as files: UTF-8 text and strict JSON, written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import InputError
from .atomic import PathLike, atomic_write_bytes


def write_text(path: PathLike, text: str, *, overwrite: bool = False) -> Path:
    """UTF-8 text file, written atomically (newlines as given)."""
    if not isinstance(text, str):
        raise InputError(f"write_text needs a str, got {type(text).__name__}; convert it (or use write_json)")
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} cannot be written as JSON")


# A list of numbers that json.dumps spread over several lines (a real newline cannot occur inside a JSON string, so
# this never touches string contents): written on one line, as Slicer writes coordinates.
_NUMBER_ARRAY = re.compile(r"\[\n\s*((?:-?[0-9][0-9.eE+-]*,\n\s*)*-?[0-9][0-9.eE+-]*)\n\s*\]")


def write_json(path: PathLike, data: Any, *, overwrite: bool = False, indent: Optional[int] = 2) -> Path:
    """JSON file (UTF-8, strict: no NaN/Infinity), written atomically. numpy values, paths, dataclasses and objects
    with ``to_dict()`` are converted."""
    try:
        text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False, default=_json_default)
        if indent is not None:
            text = _NUMBER_ARRAY.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    except ValueError as exc:
        raise InputError(f"cannot write {path} as JSON: {exc} (NaN and infinity are not JSON); replace them with "
                         f"null or a number") from None
    except TypeError as exc:
        raise InputError(f"cannot write {path} as JSON: {exc}; convert it to lists, dicts, strings and numbers") \
            from None
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"), overwrite=overwrite)


__all__ = ["write_json", "write_text"]
