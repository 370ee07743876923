"""How long ``m3d`` takes before it does anything: ``m3d --help``, every subcommand's ``--help`` and ``m3d inspect``
on a checkpoint (config and index JSON, safetensors headers; no torch), each against ``python -c pass`` -- the
interpreter's own start -- measured side by side in the same run, as fresh processes (what a user waits for).

Goals (issue #15, "An instant CLI"): every ``--help`` within 0.5 s and ``m3d inspect`` within 1.5 s on the machine
that runs this. Prints the median of ``--repeats`` runs of each command, its ratio to ``python -c pass``, whether the
goal is met, and last ``ratio: N.NN`` = the slowest ``--help`` / ``python -c pass``.

Usage: python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP_GOAL_S, INSPECT_GOAL_S = 0.5, 1.5


def m3d_command() -> list[str]:
    """The ``m3d`` entry point installed beside this Python (what a user types), else ``python -m M3DAssistantLib``."""
    script = Path(sys.executable).parent / "m3d"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "M3DAssistantLib"]


def time_command(argv: list[str], repeats: int) -> float:
    """Median wall time of ``argv`` as a fresh process (output discarded); fails loudly when it fails."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return statistics.median(times)


def subcommands() -> list[str]:
    from M3DAssistantLib import cli

    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a.choices, dict))  # argparse keeps no public list
    return list(action.choices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from M3DAssistantLib.model import random_checkpoint as rc

    folder = Path(tempfile.mkdtemp(prefix="m3d-startup-"))
    try:
        checkpoint = rc.write_random_lamed_checkpoint(folder / "tiny", "phi3", llm=rc.TINY_LLM,
                                                      multimodal=rc.TINY_MULTIMODAL)
        m3d = m3d_command()
        baseline = time_command([sys.executable, "-c", "pass"], args.repeats)
        rows = [("python -c pass", baseline, None)]
        helps = [["--help"]] + [[name, "--help"] for name in subcommands()]
        for extra in helps:
            rows.append((f"m3d {' '.join(extra)}", time_command(m3d + extra, args.repeats), HELP_GOAL_S))
        rows.append(("m3d inspect CHECKPOINT", time_command(m3d + ["inspect", str(checkpoint)], args.repeats),
                     INSPECT_GOAL_S))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"machine: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}; median of {args.repeats} runs each")
    print(f"{'command':34} {'time':>8} {'/ python':>9}  goal")
    for name, seconds, goal in rows:
        verdict = "" if goal is None else f"{'met' if seconds <= goal else 'MISSED'} (<= {goal} s)"
        print(f"{name:34} {seconds:7.3f}s {seconds / baseline:8.1f}x  {verdict}")
    slowest = max((r for r in rows if r[2] == HELP_GOAL_S), key=lambda r: r[1])
    print(f"slowest --help: {slowest[0]} ({slowest[1]:.3f} s)")
    print(f"ratio: {slowest[1] / baseline:.2f}")


if __name__ == "__main__":
    main()
