"""``m3d``: M3D-LaMed from the shell (also ``python -m M3DAssistantLib``).

Errors the user can fix (missing model, bad input, offline) are printed as one line, without a traceback, and the
command exits with status 2. What is read and written around the model (options, volume, ``-o``), and checked before
it loads, is in :mod:`.cli_io`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import AI_LABEL
from .analysis_cli import add_analysis_args, analysis_options, check_analysis_outputs, write_analysis_outputs
from .cli_io import (
    InputVolume,
    check_output_option,
    max_new_tokens,
    positive_int,
    read_input_volume,
    task_arguments,
    window_option,
    write_outputs,
)
from .errors import InputError, M3DError
from .progress import ProgressEvent
from .results import MAX_NEW_TOKENS
from .tasks import FIND_SIMILAR, STREAMING_TASKS, TRAINING_NAMES, ArgumentKind, Task

SAMPLE_CT = Path(__file__).resolve().parents[2] / "Testing" / "Data" / "totalsegmentator" / "example_ct_sm.nii.gz"


class ProgressBar:
    """Shows ProgressEvents as a tqdm bar per stage on stderr (the CLI view of the one progress mechanism). Every
    bar is closed -- its line ended -- before the next message: the answer's first text, an error, the summary."""

    open_bars: "set[ProgressBar]" = set()

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.stage: Optional[str] = None
        self.bar = None

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=100, desc=event.stage, file=sys.stderr, leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
            ProgressBar.open_bars.add(self)
        if event.fraction is not None:
            self.bar.n = round(event.fraction * 100)
        self.bar.set_postfix_str(event.message, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage = None
        ProgressBar.open_bars.discard(self)

    def stop(self) -> None:
        """Close the bar and show no more: the answer's text is streaming on the terminal now."""
        self.close()
        self.enabled = False

    @classmethod
    def close_all(cls) -> None:
        for bar in list(cls.open_bars):
            bar.close()


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF hub id or local checkpoint folder (default: $M3D_MODEL, else "
                             "GoodBaiBai88/M3D-LaMed-Phi-3-4B)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on CUDA, else fp32)")


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", default=None,
                        help="intensity window for every task: abdomen, lung, bone, brain, minmax, percentile, "
                             "volume-percentile, or CENTER,WIDTH in HU (default: each task as its training data -- "
                             "report/VQA the DICOM WindowCenter/Width, else abdomen for CT; boxes and segmentation "
                             "the M3D-Seg percentiles; referring segmentation the M3D-RefSeg percentiles)")
    parser.add_argument("--max-new-tokens", type=max_new_tokens, default=256,
                        help=f"longest answer in tokens, 1 to {MAX_NEW_TOKENS} (default 256; the model was trained on "
                             f"512-token sequences)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the full result as JSON (with provenance)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Reads JSON files and safetensors headers only; torch is imported only with --check-tensors."""
    from .model.hub import with_model_hint
    from .model.inspection import format_report, inspect_checkpoint

    try:
        report = inspect_checkpoint(args.checkpoint, compare_with_model=args.check_tensors)
    except M3DError as e:  # the checkpoint is this command's argument, not --model / M3D_MODEL
        raise with_model_hint(e, "give that folder as the argument: m3d inspect PATH") from None
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0 if report["will_load"] else 1


def cmd_make_test_checkpoint(args: argparse.Namespace) -> int:
    from .model import random_checkpoint as rc

    folder = Path(args.folder)
    if folder.exists() and any(folder.iterdir()):
        raise M3DError(f"{folder} exists and is not empty; choose a new folder (nothing is overwritten).")
    if args.kind == "clip":
        rc.write_random_clip_checkpoint(folder, tiny=args.size == "tiny")
    else:
        tiny = args.size == "tiny"
        rc.write_random_lamed_checkpoint(folder, args.kind, llm=rc.TINY_LLM if tiny else None,
                                         multimodal=rc.TINY_MULTIMODAL if tiny else None)
    print(f"wrote a random-weight {args.size} {args.kind} checkpoint (official layout) to {folder}")
    return 0


def _sampling(args: argparse.Namespace):
    from .results import SamplingOptions

    return SamplingOptions(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed)


def _engine(args: argparse.Namespace, bar: "ProgressBar"):
    from .engine import InferenceEngine

    try:
        return InferenceEngine(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                               progress=bar)
    finally:
        bar.close()


def _set_volume(engine, volume: InputVolume, args: argparse.Namespace) -> None:
    engine.set_volume(volume.array, volume.ijk_to_ras, window=args.window_value,
                      display_window=volume.metadata.display_window, modality=volume.metadata.modality)


def _load_volume(engine, path: str, args: argparse.Namespace):
    args.window_value = window_option(args.window)
    volume = read_input_volume(path)
    _set_volume(engine, volume, args)
    return volume.array, volume.ijk_to_ras


def _emit(args: argparse.Namespace, result, human: str, streamed: bool = False) -> None:
    """Print a result: JSON with --json, else the human line (unless it was already streamed)."""
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    elif not streamed:
        print(human)


def _stream_printer(args: argparse.Namespace, bar: Optional["ProgressBar"] = None):
    """Print answer text as it is generated (not in --json mode); the progress bar ends its line first."""
    if args.json:
        return None

    def on_text(text: str) -> None:
        if bar is not None:
            bar.stop()
        sys.stdout.write(text)
        sys.stdout.flush()

    return on_text


def _finish_stream(args: argparse.Namespace) -> None:
    if not args.json:
        sys.stdout.write("\n")
        print(f"[{AI_LABEL}]", file=sys.stderr)


def _add_task_command(sub: "argparse._SubParsersAction", task: Task) -> argparse.ArgumentParser:
    """The subcommand of a streaming task: the volume, then the task's arguments by kind (TEXT: positional, CHOICES:
    ``--NAME A B ...``, REGION: ``--NAME FILE.mrk.json``; HISTORY is not offered on the command line)."""
    p = sub.add_parser(task.cli_command, help=task.help)
    p.add_argument("volume", help="NIfTI / NRRD file or DICOM folder")
    for argument in task.arguments:
        if argument.kind is ArgumentKind.TEXT:
            p.add_argument(argument.name)
        elif argument.kind is ArgumentKind.CHOICES:
            p.add_argument(f"--{argument.name}", nargs="+", required=True)
        elif argument.kind is ArgumentKind.REGION:
            p.add_argument(f"--{argument.name}", required=True)
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("-o", "--output", help="write the result, format by extension: .seg.nrrd or .nrrd (the mask "
                   "for Slicer), .nii.gz or .nii (the mask as a NIfTI label map), .dcm (the mask as DICOM SEG, for "
                   "DICOM input), .mrk.json (the box), .json (the result with provenance), .txt (the answer); "
                   "checked before the model loads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_analysis_args(p, task)
    p.set_defaults(func=cmd_task, task=task)
    return p


def cmd_task(args: argparse.Namespace) -> int:
    """One streaming task (report, ask, choose, locate, describe, segment, segment-expression) on one volume.

    Everything that can be checked without the model is checked first (options, prompt, ROI file, output, volume),
    so a mistake costs a second, not a model load and a generated answer."""
    task: Task = args.task
    args.window_value = window_option(args.window)
    arguments = task_arguments(task, args)
    check_output_option(args, task)
    check_analysis_outputs(task, args)
    analysis = analysis_options(task, args)
    volume = read_input_volume(args.volume)
    bar = ProgressBar(not args.quiet)
    engine = _engine(args, bar)
    _set_volume(engine, volume, args)
    sampling, on_text = _sampling(args), _stream_printer(args, bar)
    extra = {"analysis": analysis} if analysis is not None else {}
    try:
        result = getattr(engine, task.engine_method)(*arguments, sampling=sampling, on_text=on_text, **extra)
    finally:
        bar.close()
    _finish_stream(args)
    written = write_outputs(args, result, volume)
    write_analysis_outputs(args, result, volume.ijk_to_ras)
    if args.json:
        _emit(args, result, "")
    else:
        _print_parsed(result)
    return 0 if written else 2


def _print_parsed(result) -> None:
    """One line per parsed value, to stderr (stdout has the answer text); then what the analysis found."""
    from .analysis_cli import print_analysis
    from .results import BoxResult, ChoiceResult, SegmentationResult

    if getattr(result, "parse_error", None):
        print(f"note: {result.parse_error}", file=sys.stderr)
    if isinstance(result, ChoiceResult) and result.letter:
        print(f"choice: {result.letter}. {result.choice}", file=sys.stderr)
    print_analysis(result)
    if isinstance(result, BoxResult):
        if result.absent:
            print(f"the model says there is no {result.target}", file=sys.stderr)
        elif result.roi is not None:
            c, z = result.roi.center, result.roi.size
            print(f"box {list(result.box)}: RAS centre ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}) mm, "
                  f"size {z[0]:.1f} x {z[1]:.1f} x {z[2]:.1f} mm", file=sys.stderr)
    if isinstance(result, SegmentationResult):
        if result.mask is not None:
            print(f"mask: {result.voxel_count} voxels", file=sys.stderr)
        elif result.absent:
            print(f"the model says there is no {result.target}", file=sys.stderr)


def cmd_retrieve(args: argparse.Namespace) -> int:
    from .model.hub import with_model_hint
    from .retrieval import Retriever

    if args.texts and len(args.volumes) != 1:
        raise InputError("with --texts give exactly one volume to rank them for; to rank volumes, give --text once")
    window = window_option(args.window)
    volumes = [read_input_volume(v) for v in args.volumes]  # read and checked before M3D-CLIP loads
    bar = ProgressBar(not args.quiet)
    try:
        retriever = Retriever(args.clip_model, device=args.device, dtype=args.dtype)
    except M3DError as e:  # the CLIP model is named with --clip-model here, never --model / M3D_MODEL
        raise with_model_hint(e, "pass it with --clip-model PATH", "GoodBaiBai88/M3D-CLIP") from None
    finally:
        bar.close()
    # each volume's default window (retrieval's: the display window) from its DICOM WindowCenter/Width and Modality
    if args.texts:
        first = volumes[0]
        result = retriever.rank_texts((first.array, first.ijk_to_ras), args.texts, window=window,
                                      display_window=first.metadata.display_window, modality=first.metadata.modality)
    else:
        result = retriever.rank_volumes(args.text, [(v.array, v.ijk_to_ras) for v in volumes],
                                        labels=[v.path.name for v in volumes], window=window,
                                        display_windows=[v.metadata.display_window for v in volumes],
                                        modalities=[v.metadata.modality for v in volumes])
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for rank, (_index, label, score) in enumerate(result.ranking, start=1):
            print(f"{rank:3d}. {score:+.4f}  {label}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import (
        BatchTask,
        check_specs,
        find_volumes,
        finish_distributed,
        run_cohort,
        split_for_this_process,
        write_cohort_tables,
    )

    window = window_option(args.window)
    specs = [BatchTask.parse(t) for t in args.task]
    check_specs(specs)
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; give a folder for the results (-o)")
    if not out_dir.parent.is_dir():
        raise InputError(f"cannot write into {out_dir}: the folder {out_dir.parent} does not exist; create it first")
    volumes, device = split_for_this_process(find_volumes(Path(args.folder)))
    if device is not None:
        args.device = device
    bar = ProgressBar(not args.quiet)
    engine = _engine(args, bar)
    out_dir.mkdir(exist_ok=True)
    summary = run_cohort(engine, volumes, specs, out_dir, sampling=_sampling(args), window=window,
                        batch_size=args.batch_size)
    bar.close()
    tables = ""
    if finish_distributed():
        csv_path, jsonl_path = write_cohort_tables(out_dir)
        tables = f"; cohort table {csv_path} and {jsonl_path}"
    print(summary.line() + tables)
    return 1 if summary.failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from M3DTrainingLib.export import export_dataset

    from .scene import headless_slicer

    try:
        import slicer  # noqa: F401  (the Slicer application or PyPI slicer-core)
    except ImportError:
        raise M3DError("reading Slicer scenes needs slicer-core in a plain shell: pip install slicer-core") from None
    _scene, _logics = headless_slicer()  # registers the node types the scene files use
    result = export_dataset(args.scenes, args.output, model_shape=tuple(args.model_shape),
                            window=window_option(args.window), validation_fraction=args.validation_fraction,
                            seed=args.seed)
    print(result.summary())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from M3DTrainingLib.evaluate import evaluate_predictions, predict_dataset, write_evaluation

    from .model import load_model

    bar = ProgressBar(not args.quiet)
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                                      progress=bar)
        records = predict_dataset(model, tokenizer, args.dataset, split=args.split, tasks=args.tasks,
                                  max_new_tokens=args.max_new_tokens, limit=args.limit, progress=bar)
    finally:
        bar.close()
    results = evaluate_predictions(records)
    paths = write_evaluation(results, args.output, stem="evaluation")
    for task, entry in results["tasks"].items():
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items() if isinstance(v, (int, float)))
        print(f"{task:11} n={entry['n']:<4} {metrics}")
    print(f"wrote {', '.join(str(p) for p in paths)}")  # write_evaluation has logged each message once
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Report, liver segmentation and liver box for the bundled sample CT, written as files Slicer opens."""
    from . import outputs

    bar = ProgressBar(not args.quiet)
    engine = _engine(args, bar)
    info = engine.info()
    print(f"model    {info['model']} ({info['model_type']}, {info['device']}, {info['dtype']})")
    volume = Path(args.volume) if args.volume else SAMPLE_CT
    _array, ijk_to_ras = _load_volume(engine, str(volume), args)
    print(f"volume   {volume.name} {tuple(_array.shape)} (K,J,I)")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sampling = _sampling(args)
    results = {}
    try:
        results["report"] = engine.report(sampling=sampling)
        results["segment"] = engine.segment("liver", sampling=sampling)
        results["locate"] = engine.locate("liver", sampling=sampling)
    finally:
        bar.close()
    report_path = outputs.write_text(outputs.unique_path(out_dir / "report.txt"),
                                     f"{results['report'].text}\n\n[{AI_LABEL}]\n")
    print(f"report   {results['report'].text!r}\n         -> {report_path}")
    seg = results["segment"]
    if seg.mask is not None:
        path = outputs.write_segmentation_nrrd(outputs.unique_path(out_dir / "liver.seg.nrrd"), {"liver": seg.mask},
                                               ijk_to_ras, attributes=seg.provenance.as_node_attributes())
        print(f"segment  {seg.text!r}: {seg.voxel_count} voxels -> {path}")
    else:
        print(f"segment  {seg.text!r}: no mask ({seg.parse_error or 'the model says the target is absent'})")
    box = results["locate"]
    if box.roi is not None:
        path = outputs.write_roi(outputs.unique_path(out_dir / "liver.mrk.json"), box.roi, "liver",
                                 attributes=box.provenance.as_node_attributes())
        print(f"locate   {box.text!r}: box {list(box.box)} -> {path}")
    else:
        print(f"locate   {box.text!r}: no box ({box.parse_error or 'the model says the target is absent'})")
    all_path = outputs.write_json(outputs.unique_path(out_dir / "results.json"),
                                  {k: r.to_dict() for k, r in results.items()})
    print(f"all      -> {all_path}   (drag the CT and the .seg.nrrd / .mrk.json files into Slicer)")
    print(f"         [{AI_LABEL}]")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    """Segmentation, boxes and a plane question on a CT with ground truth, scored; a JSON report and a table."""
    from . import outputs
    from .selfcheck import DEFAULT_STRUCTURES, Structure, format_report, run_selfcheck

    structures = DEFAULT_STRUCTURES
    if args.structures:
        known = {s.name: s for s in DEFAULT_STRUCTURES}
        structures = tuple(known.get(name, Structure(name, (name,))) for name in args.structures)
    bar = ProgressBar(not args.quiet)
    try:
        engine = _engine(args, bar)
        result = run_selfcheck(engine, volume=args.volume, labels=args.labels, label_names=args.label_names,
                               structures=structures, conventions=args.conventions,
                               max_new_tokens=args.max_new_tokens, progress=bar)
    finally:
        bar.close()
    path = outputs.write_json(outputs.unique_path(Path(args.output)), result.to_dict())
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_report(result))
    print(f"wrote {path}", file=sys.stderr)
    return 0 if result.passed else 1


def build_parser() -> argparse.ArgumentParser:
    from .batch import batch_task_forms
    parser = argparse.ArgumentParser(prog="m3d", description="M3D-LaMed 3D medical vision-language model. "
                                     f"Outputs are {AI_LABEL}.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="describe a checkpoint and say whether it will load (reads no weights)")
    p.add_argument("checkpoint", help="local folder (or cached hub id)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--check-tensors", action="store_true",
                   help="also build the model on the meta device (no memory) and compare every tensor name and "
                        "shape (imports torch: a few seconds)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="report, liver mask and liver box for the bundled sample CT, as Slicer files")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--volume", default=None, help="NIfTI/NRRD file or DICOM folder (default: bundled sample CT)")
    p.add_argument("--output-dir", default="m3d-demo-output", help="where to write the files (never overwritten)")
    p.set_defaults(func=cmd_demo, max_new_tokens=64)

    for task in STREAMING_TASKS:
        _add_task_command(sub, task)

    p = sub.add_parser("batch", help="run prompts over a folder of volumes (resumable; accelerate launch for GPUs)")
    p.add_argument("folder", help="folder of NIfTI/NRRD files and/or DICOM series folders")
    p.add_argument("--task", action="append", required=True, help=f"{batch_task_forms()} (repeat)")
    p.add_argument("-o", "--output-dir", required=True, help="one subfolder per volume; done volumes are skipped")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="decode N volumes together: the same greedy answers, up to N times faster decoding; memory "
                        "grows with N (default 1)")
    _add_model_args(p)
    _add_generation_args(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser(FIND_SIMILAR.cli_command, help=FIND_SIMILAR.help)
    p.add_argument("volumes", nargs="+", help="volume file(s) / DICOM folder(s)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--texts", nargs="+", help="texts to rank for the (single) volume")
    group.add_argument("--text", help="text to rank the volumes for")
    p.add_argument("--clip-model", default=None, help="M3D-CLIP hub id or folder (default GoodBaiBai88/M3D-CLIP)")
    p.add_argument("--window", default=None,
                   help="intensity window for every volume: abdomen, lung, bone, brain, minmax, percentile, or "
                        "CENTER,WIDTH in HU (default: as M3D-CLIP's training images -- each volume's DICOM "
                        "WindowCenter/Width, else abdomen for CT, else percentiles)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser("selfcheck", help="check this installation on a CT with ground truth: Dice, box IoU and a "
                                         "plane question per convention (exit 1 when results look wrong)")
    _add_model_args(p)
    p.add_argument("--conventions", choices=["default", "all"], default="default",
                   help="default: each task's own convention; all: every task under every convention")
    p.add_argument("--volume", default=None, help="CT file or DICOM folder (default: the bundled TotalSegmentator CT)")
    p.add_argument("--labels", default=None, help="label map on the volume's grid (with --volume)")
    p.add_argument("--label-names", default=None, help='JSON {"1": "spleen", ...} naming the label values')
    p.add_argument("--structures", nargs="+", default=None,
                   help="targets to segment and locate (default: liver, spleen, right/left kidney, stomach, aorta)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--output", default="m3d-selfcheck.json", help="JSON report (a new name if it exists)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_selfcheck)

    p = sub.add_parser("make-test-checkpoint",
                       help="write a random-weight checkpoint in the official layout (for offline tests)")
    p.add_argument("folder")
    p.add_argument("--kind", choices=["phi3", "llama", "clip"], default="phi3")
    p.add_argument("--size", choices=["tiny", "official"], default="tiny",
                   help="tiny: seconds on a CPU; official: the released models' sizes (many GB)")
    p.set_defaults(func=cmd_make_test_checkpoint)

    from .serving.server import add_serve_arguments, run_serve  # light: the FastAPI app is imported when serving

    p = sub.add_parser("serve", help="run the inference worker (HTTP on 127.0.0.1, token required)")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("export", help="annotated Slicer scenes (.mrb/.mrml) -> an M3D-format training dataset")
    p.add_argument("scenes", nargs="+", help=".mrb or .mrml files (needs slicer-core: pip install slicer-core)")
    p.add_argument("-o", "--output", required=True, help="new dataset folder (must not exist)")
    p.add_argument("--model-shape", type=int, nargs=3, default=[32, 256, 256], metavar=("D", "H", "W"))
    p.add_argument("--window", default=None, help="one intensity window for every task (default: each task's own, "
                                                  "as at inference: report/VQA the volume's window/level in the scene, "
                                                  "boxes and masks the M3D-Seg percentiles)")
    p.add_argument("--validation-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="run a model on a dataset split and compute M3D-Bench metrics")
    p.add_argument("dataset", help="dataset folder written by m3d export")
    p.add_argument("-o", "--output", required=True, help="new folder for evaluation.json and the plot")
    p.add_argument("--split", default="validation")
    p.add_argument("--tasks", nargs="+", default=None, help=f"only these tasks ({' '.join(TRAINING_NAMES)})")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--quiet", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)

    try:  # training commands (M3DTrainingLib, same distribution; imports no torch at import time)
        from M3DTrainingLib import cli as training
    except ImportError:
        training = None
    if training is not None:
        p = sub.add_parser("train", help="fine-tune on a dataset folder (LoRA / projector; accelerate, resumable)")
        training.add_train_arguments(p)
        p.set_defaults(func=training.run_train)
        p = sub.add_parser("merge", help="merge a trained adapter into a full checkpoint (official layout)")
        training.add_merge_arguments(p)
        p.set_defaults(func=training.run_merge)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        try:
            return func(args)
        finally:
            ProgressBar.close_all()  # a bar's line ends before the error message
    except M3DError as e:
        print(f"m3d {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional dependency of this command is not installed
        print(f"m3d {args.command}: error: the Python package {e.name!r} is missing; install the extras this command "
              "needs, e.g. pip install -e '.[server,training]' in your clone (see README, Install)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"m3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
