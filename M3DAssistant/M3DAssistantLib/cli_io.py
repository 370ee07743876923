"""What the ``m3d`` command line reads and writes around the model, all of it checked before the model loads: option
values (``--window``, ``--max-new-tokens``, ``--batch-size``), the input volume (refusing label maps), the task's
arguments (prompt, choices, ``--roi`` file), the ``-o`` target; and writing ``-o`` at the end without ever losing a
result.

No torch here: :mod:`.cli` calls these before it builds the engine (``Testing/cli/test_cli_startup.py`` checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

from .errors import InputError, M3DError
from .results import MAX_NEW_TOKENS
from .tasks import ArgumentKind, Task


def max_new_tokens(text: str) -> int:
    """--max-new-tokens: a whole number from 1 to :data:`~.results.MAX_NEW_TOKENS` (argparse reports the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; e.g. --max-new-tokens 256") from None
    if not 1 <= value <= MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..{MAX_NEW_TOKENS}: the model was trained on 512-token "
                                         f"sequences; e.g. --max-new-tokens 256")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts such as --batch-size: a whole number >= 1 (argparse reports the error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def window_option(value: Optional[str]):
    """--window: a preset name, a percentile scheme, "minmax", or CENTER,WIDTH in HU -- checked here, before any
    model loads, with a message in the command line's terms."""
    from .preprocessing import WINDOW_PRESETS, resolve_window

    if value is None:
        return None
    forms = f"{', '.join(WINDOW_PRESETS)}, minmax, percentile, volume-percentile, or CENTER,WIDTH in HU (e.g. " \
            f"--window 40,350)"
    window: Any = value
    if "," in value:
        try:
            center, width = (float(v) for v in value.split(","))
        except ValueError:
            raise InputError(f"--window {value!r} is not CENTER,WIDTH: give two numbers, e.g. --window 40,350 "
                             f"(or {forms})") from None
        window = (center, width)
    try:
        resolve_window(window)
    except InputError:
        if isinstance(window, tuple):
            raise InputError(f"--window {value!r}: the width must be a positive number, e.g. --window 40,350") \
                from None
        raise InputError(f"--window {value!r} is not a window; use {forms}") from None
    return window


@dataclasses.dataclass
class InputVolume:
    """A volume read and checked before any model loads: voxels, IJK->RAS, what its headers say, where it came from."""

    path: Path
    array: Any
    ijk_to_ras: Any
    metadata: Any


def read_input_volume(path: str) -> InputVolume:
    """Read a volume file or DICOM folder for a task and refuse what cannot be an image (a label map such as
    TotalSegmentator's segmentation.nii.gz: the message names the CT next to it). No torch."""
    from .volume_io import check_not_label_map, read_volume, read_volume_metadata

    p = Path(path)
    array, ijk_to_ras = read_volume(p)
    check_not_label_map(array, p)
    return InputVolume(p, array, ijk_to_ras, read_volume_metadata(p))  # DICOM window + modality: report/VQA default


def task_arguments(task: Task, args: argparse.Namespace) -> list:
    """The engine method's arguments from the command line, checked before the model loads: an ROI file is read,
    texts and choices go through the task's prompt builder (empty prompts, bad choices)."""
    from . import outputs

    values = []
    for argument in task.arguments:
        if argument.kind is ArgumentKind.REGION:
            values.append(outputs.read_roi(Path(getattr(args, argument.name))))
        elif argument.kind is not ArgumentKind.HISTORY:
            values.append(getattr(args, argument.name))
    if task.build_prompt is not None and task.takes(ArgumentKind.REGION) is None:
        task.build_prompt(*values)  # raises InputError naming the problem; the text itself is built again later
    return values


def check_output_option(args: argparse.Namespace, task: Task) -> None:
    """-o before the model loads: a known extension that can hold this task's result (a DICOM SEG only for DICOM
    input), and a writable target -- folder exists and is writable, no dangling link, no existing file without
    --overwrite."""
    from . import outputs

    if getattr(args, "output", None):
        outputs.check_output(args.output, task.result, overwrite=args.overwrite, source_path=args.volume,
                             overwrite_hint="pass --overwrite")


def write_outputs(args: argparse.Namespace, result, volume: InputVolume) -> bool:
    """-o: the format its extension names (outputs.FORMATS). Never overwrites without --overwrite. When the write
    fails after all (the disk filled, the folder went away), the result is kept: written under a free name beside
    the target, else in the working or temporary folder -- and said where. False when -o was not honoured."""
    from . import outputs

    out = getattr(args, "output", None)
    if not out:
        return True
    path = Path(out)
    try:
        written = outputs.write_result(path, result, volume.ijk_to_ras, overwrite=args.overwrite,
                                       source_path=volume.path)
    except (M3DError, OSError) as e:
        print(f"m3d {args.command}: error: {e}", file=sys.stderr)
        kept = keep_result(path, result, volume)
        print(f"m3d {args.command}: the result was kept in {kept}" if kept else
              f"m3d {args.command}: the result could not be kept in a file either; "
              f"{'it is printed below' if args.json else 'the answer text is above'}", file=sys.stderr)
        return False
    if written is None:
        print(f"no {outputs.format_for(path).holds} to write to {path} ({result.parse_error or 'target absent'})",
              file=sys.stderr)
        return True
    print(f"wrote {written}", file=sys.stderr)
    return True


def keep_result(path: Path, result, volume: InputVolume) -> Optional[Path]:
    """Write ``result`` as ``path``'s format under a free name: beside ``path``, else in the working folder, else in
    the temporary folder. The path written, or None when none of them could be written."""
    import tempfile

    from . import outputs

    for folder in (path.parent, Path.cwd(), Path(tempfile.gettempdir())):
        try:
            target = outputs.unique_path(folder / path.name, other_than_path=True)
            written = outputs.write_result(target, result, volume.ijk_to_ras, source_path=volume.path)
            if written is not None:
                return written
        except (M3DError, OSError):
            continue
    return None
