"""The training commands of ``m3d`` (:mod:`M3DAssistantLib.cli` adds them when this package is installed):

* ``m3d train CONFIG``: trains in this process, or -- with ``--detach`` or several processes -- starts a
  :class:`~.jobs.Job` that runs ``python -m M3DTrainingLib.train`` (through ``accelerate launch`` for several) and
  follows it;
* ``m3d merge RUN OUT``: :func:`~.merge.merge`, the trained adapter merged into a full checkpoint (official layout).

The only module here that knows both the trainer and the job launcher; neither imports the other.
"""

from __future__ import annotations

import argparse
import os

from .jobs import Job
from .memory import estimate_memory
from .merge import merge
from .preflight import check_dataset_fits_model
from .train import add_config_arguments, config_from_args, exit_on_termination, print_event, run_training


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``m3d train``: those of ``python -m M3DTrainingLib.train``, and how to launch."""
    add_config_arguments(parser)
    parser.add_argument("--num-processes", type=int, default=None,
                        help="launch N processes through accelerate launch (one per GPU; gloo on CPU)")
    parser.add_argument("--detach", action="store_true",
                        help="run as a background job that survives this shell; follow OUTPUT_DIR/progress.jsonl")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.estimate_only:
        print(estimate_memory(config).format())
        return 0
    inside_launch = "LOCAL_RANK" in os.environ
    check_dataset_fits_model(config.dataset, config.base_model)  # also before a detached job is started
    if not inside_launch and (args.detach or config.num_processes > 1):
        job = Job.start(config)
        print(f"started training job (pid {job.pid}); progress: {job.progress_path}, log: {job.log_path}")
        if args.detach:
            return 0
        status = job.wait(on_event=None if args.quiet else print_event)
        print(f"training {status.state}: {status.message}")
        return 0 if status.state == "completed" else 1
    exit_on_termination()
    result = run_training(config, progress=None if args.quiet else print_event)
    print(f"trained {result.steps} steps; adapter: {result.adapter_dir}")
    return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``m3d merge``."""
    parser.add_argument("adapter", help="training output_dir (or its 'adapter' folder)")
    parser.add_argument("output", help="new folder for the merged checkpoint (official layout)")
    parser.add_argument("--base-model", default=None, help="base checkpoint (default: the one in train_config.yaml)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the base's torch_dtype)")


def run_merge(args: argparse.Namespace) -> int:
    out = merge(args.adapter, args.output, base_model=args.base_model, dtype=args.dtype)
    print(f"wrote merged checkpoint {out}; use it with --model {out}")
    return 0
