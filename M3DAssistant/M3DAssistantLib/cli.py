"""``m3d``: M3D-LaMed from the shell (also ``python -m M3DAssistantLib``).

Errors the user can fix (missing model, bad input, offline) are printed as one line, without a traceback, and the
command exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import AI_LABEL
from .errors import M3DError
from .progress import ProgressEvent

SAMPLE_CT = Path(__file__).resolve().parents[2] / "Testing" / "Data" / "totalsegmentator" / "example_ct_sm.nii.gz"


class ProgressBar:
    """Shows ProgressEvents as a tqdm bar per stage on stderr (the CLI view of the one progress mechanism)."""

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
        if event.fraction is not None:
            self.bar.n = round(event.fraction * 100)
        self.bar.set_postfix_str(event.message, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF hub id or local checkpoint folder (default: $M3D_MODEL, else "
                             "GoodBaiBai88/M3D-LaMed-Phi-3-4B)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on CUDA, else fp32)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .model.inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint)
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Load the model and answer one question about the bundled sample CT."""
    import time

    import torch

    from .model import encode_prompt, load_model
    from .model.tokenizer import decode

    bar = ProgressBar(not args.quiet)
    start = time.perf_counter()
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                                      progress=bar)
    finally:
        bar.close()
    config = model.lamed_config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model      {model.source} ({config.model_type}, {n_params / 1e6:.1f} M parameters)")
    print(f"loaded     in {time.perf_counter() - start:.1f} s on {model.device}, {next(model.parameters()).dtype}")
    print(f"folder     {model.checkpoint_path}")

    volume = Path(args.volume) if args.volume else SAMPLE_CT
    images, source_desc = _demo_image(volume, config.multimodal.image_size)
    question = "Please generate a medical report based on this image."
    ids = encode_prompt(tokenizer, question, config.multimodal.num_image_tokens)
    input_ids = torch.tensor([ids], device=model.device)
    images = torch.from_numpy(images)[None].to(model.device, next(model.parameters()).dtype)
    start = time.perf_counter()
    output = model.generate(images, input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"volume     {source_desc}")
    print(f"question   {question}")
    print(f"answer     {decode(tokenizer, output[0])!r}  ({output.shape[1]} tokens, {time.perf_counter() - start:.1f} s)")
    print(f"           [{AI_LABEL}]")
    return 0


def _demo_image(volume: Path, model_shape: Sequence[int]):
    """The model input for ``volume`` via the geometry module (shape [1, D, H, W] in [0, 1])."""
    from .geometry import to_model_input
    from .volume_io import read_volume

    array, ijk_to_ras = read_volume(volume)
    tensor, _mapping = to_model_input(array, ijk_to_ras, window="abdomen", model_shape=tuple(model_shape))
    return tensor, f"{volume.name} {tuple(array.shape)} (K,J,I)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3d", description="M3D-LaMed 3D medical vision-language model. "
                                     f"Outputs are {AI_LABEL}.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="describe a checkpoint and say whether it will load (reads no weights)")
    p.add_argument("checkpoint", help="local folder (or cached hub id)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="load a model and write a report for the bundled sample CT")
    _add_model_args(p)
    p.add_argument("--volume", default=None, help="NIfTI/NRRD file or DICOM folder (default: bundled sample CT)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-test-checkpoint",
                       help="write a random-weight checkpoint in the official layout (for offline tests)")
    p.add_argument("folder")
    p.add_argument("--kind", choices=["phi3", "llama", "clip"], default="phi3")
    p.add_argument("--size", choices=["tiny", "official"], default="tiny",
                   help="tiny: seconds on a CPU; official: the released models' sizes (many GB)")
    p.set_defaults(func=cmd_make_test_checkpoint)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except M3DError as e:
        print(f"m3d {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"m3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
