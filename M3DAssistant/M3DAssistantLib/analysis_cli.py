"""The analysis options on the ``m3d`` task commands: their flags (from the task registry's
:data:`~M3DAssistantLib.tasks.OPTIONS`), the engine's ``analysis=`` from them, the files they write (checked before
the model loads) and what is printed about them. Light: the heavy modules are imported when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tasks import Task


def add_analysis_args(p: argparse.ArgumentParser, task: Task) -> None:
    """The task's analysis options (the registry's :data:`~.tasks.OPTIONS`): an option that is off by default is a
    flag that turns it on (``--refine``), one that is on a ``--no-...`` flag, a number ``--NAME N``, and one that
    computes something to save takes the file (``--evidence MAP.nrrd``). Segmentation also writes the mask's box."""
    group = p.add_argument_group("beyond the answer (docs/analysis.md)")
    for option in task.options:
        if option.cli_file is not None:
            group.add_argument(option.cli_flag, metavar="FILE", dest=option.name, help=f"{option.help}; "
                               f"write {option.cli_file}")
        elif option.type is bool and option.default:
            group.add_argument(f"--no-{option.cli_flag[2:]}", dest=option.name, action="store_false",
                               help=f"leave out: {option.help}")
        elif option.type is bool:
            group.add_argument(option.cli_flag, action="store_true", help=option.help)
        else:
            group.add_argument(option.cli_flag, type=option.type, default=option.default, metavar="N",
                               help=f"{option.help} (default {option.default})")
    if task.segments:
        group.add_argument("--box-output", metavar="FILE.mrk.json",
                           help="also write the mask's box as a Slicer ROI (.mrk.json)")


def analysis_options(task: Task, args: argparse.Namespace):
    """The engine's ``analysis=`` from the command line (None: the plain task's defaults)."""
    from .results import AnalysisOptions

    values = {}
    for option in task.options:
        value = getattr(args, option.name, option.default)
        values[option.name] = (value is not None) if option.cli_file is not None else value
    analysis = AnalysisOptions(**values)
    return analysis if analysis.requested() else None


def check_analysis_outputs(task: Task, args: argparse.Namespace) -> None:
    """The files the analysis options write, checked before the model loads (extension, no overwrite)."""
    from . import outputs
    from .errors import InputError

    paths = [getattr(args, option.name, None) for option in task.options if option.cli_file is not None]
    for path in paths:
        if path is not None:
            outputs.check_scalar_volume_path(path)
    box = getattr(args, "box_output", None)
    if box is not None and not box.lower().endswith(".mrk.json"):
        raise InputError(f"--box-output {box}: the mask's box is a Slicer ROI file; give a name ending in .mrk.json")
    for path in [*paths, box]:
        if path is not None and Path(path).exists() and not args.overwrite:
            raise InputError(f"{path} exists; choose another name or add --overwrite (nothing was run)")


def write_analysis_outputs(args: argparse.Namespace, result, ijk_to_ras) -> None:
    """``--evidence FILE`` (the map on the volume's grid) and ``--box-output FILE`` (the mask's box)."""
    from . import outputs

    path = getattr(args, "evidence", None)
    if path:
        if result.evidence is None:
            print(f"no evidence map to write to {path} (the answer is empty)", file=sys.stderr)
        else:
            written = outputs.write_scalar_volume(path, result.evidence.on_volume(), ijk_to_ras,
                                                  attributes=result.provenance.as_node_attributes(),
                                                  overwrite=args.overwrite)
            print(f"wrote {written}", file=sys.stderr)
    path = getattr(args, "box_output", None)
    if path:
        if result.roi is None:
            print(f"no mask, so no box to write to {path}", file=sys.stderr)
        else:
            written = outputs.write_roi(path, result.roi, f"{result.target} box",
                                        attributes=result.provenance.as_node_attributes(), overwrite=args.overwrite)
            print(f"wrote {written}", file=sys.stderr)



def print_analysis(result) -> None:
    """What the analysis found, to stderr: option probabilities, the answer's mean token log-probability and its
    unsure tokens, a mask's measurements and confidence, the evidence map's slice ranges."""
    from .analysis_text import choice_lines, evidence_items, measurement_lines
    from .results import LOW_TOKEN_PROBABILITY

    for line in choice_lines(result):
        print(f"  {line}", file=sys.stderr)
    confidence = getattr(result, "confidence", None)
    if confidence is not None and confidence.mean_logprob is not None:
        low = [t.text for t in confidence.tokens if t.probability < LOW_TOKEN_PROBABILITY and t.text.strip()]
        print(f"confidence: mean token log-probability {confidence.mean_logprob:.3f}; "
              f"{len(low)} of {len(confidence.tokens)} tokens below {LOW_TOKEN_PROBABILITY:g}"
              + (f" ({', '.join(repr(t) for t in low[:8])}{', ...' if len(low) > 8 else ''})" if low else ""),
              file=sys.stderr)
    for line in measurement_lines(result):
        print(line, file=sys.stderr)
    for label, _ in evidence_items(getattr(result, "evidence", None)):
        print(f"evidence {label}", file=sys.stderr)


__all__ = ["add_analysis_args", "analysis_options", "check_analysis_outputs", "write_analysis_outputs",
           "print_analysis"]
