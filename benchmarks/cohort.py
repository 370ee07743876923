"""A cohort: 8 volumes x report, decoded together (engine.run_batch) vs the official one-at-a-time loop.

Workload (issue 15): the official-size ViT + projector (32x256x256 -> 256 image tokens) and an LLM of Phi-3 width
(hidden 3072, MLP 8192, 32 heads, the released vocabulary of 32015) with ``--layers`` layers (default 4: the full 32
do not fit this machine in fp32 beside other work; decoding time per layer is the same at any depth), random weights
(speed does not depend on them), fp32 on the CPU; 8 different volumes (the test CT under the 8 combinations of axis
flips, so every volume has its own image tokens); greedy report, exactly ``--tokens`` new tokens each.

Side by side in this process, on the same model:

* official: one volume at a time, nothing reused (``caching=False``: what the official scripts do per volume),
* batched: ``engine.run_batch`` with ``--batch-size`` (default 8) reports decoded together.

Printed for each: end-to-end time of the cohort and where it goes (resampling, vision encoder, prompt prefill and
other work until the first token, decoding of the remaining tokens), decode tokens/s (prompts x (tokens - 1) /
decoding time), and whether every volume's generated ids are identical to batch size 1. Decoding reads every LLM
weight once per step: batch size 1 reads them per token, batch 8 once for 8 tokens; the encoders and the prefill are
compute-bound and gain little from batching on a CPU. Last line: ``ratio: N.NN`` = batched decode tokens/s / batch
size 1 decode tokens/s (goal >= 4).

``--smoke`` runs it at tiny size in seconds (the test suite does, so the script cannot rot); ``--device cuda
--layers 32 --dtype bfloat16`` is the official size on a GPU (the ``cuda``-marked test in
``Testing/project/test_benchmarks_speed.py``).

Usage: python benchmarks/cohort.py [--tokens 32] [--layers 4] [--batch-size 8] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_weights  # noqa: E402  (the benchmarks' helper beside this script)

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "Testing" / "Data" / "totalsegmentator" / "example_ct_sm.nii.gz"
PHASES = ("resampling", "vision encoder", "prefill and other", "decoding")


class Clock:
    """Where a run's time goes: wraps the engine's resampling, vision encoder and generate calls, and takes the
    first token of each generate call from the progress events."""

    def __init__(self, engine: Any):
        import M3DAssistantLib.engine as engine_module

        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.decoded_tokens = 0
        self._generate_start: Optional[float] = None
        self._first_token: Optional[float] = None
        self._steps = 0
        self._rows = 1
        self._restore = []

        def timed(owner, name, phase):
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.seconds[phase] += time.perf_counter() - start

            setattr(owner, name, wrapper)
            self._restore.append(lambda: setattr(owner, name, original))

        timed(engine_module, "to_model_input", "resampling")
        timed(engine.model, "encode_images", "vision encoder")
        original_generate = engine.model.generate

        def generate(*args, **kwargs):
            self._generate_start, self._first_token, self._steps = time.perf_counter(), None, 0
            self._rows = kwargs["input_ids"].shape[0]
            try:
                return original_generate(*args, **kwargs)
            finally:
                if self._first_token is not None:
                    self.seconds["decoding"] += time.perf_counter() - self._first_token
                    self.decoded_tokens += self._rows * (self._steps - 1)

        engine.model.generate = generate
        self._restore.append(lambda: engine.model.__dict__.pop("generate", None))
        engine.progress = self.on_progress

    def on_progress(self, event: Any) -> None:
        if event.stage == "generate" and self._generate_start is not None:
            if self._first_token is None:
                self._first_token = time.perf_counter()
            self._steps += 1

    def close(self, total: float) -> None:
        for restore in self._restore:
            restore()
        self.seconds["prefill and other"] = total - sum(v for k, v in self.seconds.items() if k != "prefill and other")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decoded_tokens / max(self.seconds["decoding"], 1e-9)


def cohort_volumes(count: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` different volumes: the test CT under combinations of axis flips (same grid, other anatomy)."""
    from M3DAssistantLib.volume_io import read_volume

    array, ijk_to_ras = read_volume(CT)
    flips = list(itertools.product((False, True), repeat=3))
    volumes = []
    for i in range(count):
        axes = [axis for axis, flip in enumerate(flips[i % 8]) if flip]
        flipped = np.flip(array, axis=axes) if axes else array
        volumes.append((np.ascontiguousarray(flipped + (i // 8)), ijk_to_ras))  # > 8: shifted intensities too
    return volumes


def _recorded_ids(engine: Any) -> list[list[int]]:
    ids: list[list[int]] = []
    original = engine._generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        ids.append(out["ids"])
        return out

    engine._generate = generate
    return ids


def run(model_and_tokenizer: tuple, volumes: Sequence, tokens: int, batch_size: int,
        log=print) -> dict[str, Any]:
    """Both runs on the same model; returns the numbers printed."""
    from M3DAssistantLib.batched import BatchRequest
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.results import SamplingOptions

    sampling = SamplingOptions(max_new_tokens=tokens, min_new_tokens=tokens)  # exactly `tokens` each
    warm_up = InferenceEngine(model_and_tokenizer, caching=False)  # one-time costs (thread pools, lazy imports)
    warm_up.set_volume(*volumes[0])
    warm_up.run_batch([BatchRequest("report")] * 2, sampling=SamplingOptions(max_new_tokens=2))
    warm_up.report(sampling=SamplingOptions(max_new_tokens=2))
    results: dict[str, Any] = {}
    for name in ("official", "batched"):
        engine = InferenceEngine(model_and_tokenizer, caching=name == "batched", max_volumes=len(volumes))
        ids = _recorded_ids(engine)
        clock = Clock(engine)
        start = time.perf_counter()
        if name == "official":
            for array, ijk_to_ras in volumes:
                engine.set_volume(array, ijk_to_ras)
                engine.report(sampling=sampling)
        else:
            handles = [engine.set_volume(array, ijk_to_ras) for array, ijk_to_ras in volumes]
            answers = engine.run_batch([BatchRequest("report", volume=h) for h in handles], sampling=sampling,
                                       batch_size=batch_size)
            failed = [a for a in answers if isinstance(a, Exception)]
            if failed:
                raise failed[0]
        total = time.perf_counter() - start
        clock.close(total)
        results[name] = {"total_s": total, "phases_s": dict(clock.seconds), "ids": ids,
                         "decode_tokens_per_s": clock.decode_tokens_per_s}
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in clock.seconds.items())
        log(f"{name:9} cohort {total:7.1f} s  ({phases})  decode {clock.decode_tokens_per_s:6.1f} tokens/s")
    identical = [a == b for a, b in zip(results["official"]["ids"], results["batched"]["ids"])]
    results["identical"] = sum(identical)
    results["volumes"] = len(volumes)
    results["end_to_end"] = results["official"]["total_s"] / results["batched"]["total_s"]
    results["ratio"] = results["batched"]["decode_tokens_per_s"] / results["official"]["decode_tokens_per_s"]
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds on a CPU (for the test suite)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here: --device cuda needs one (skipped)")
        return
    from M3DAssistantLib.model import random_checkpoint as rc

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="m3d-cohort-") as tmp:
        if args.smoke:
            model = random_weights.build(Path(tmp), llm=rc.TINY_LLM, multimodal=rc.TINY_MULTIMODAL,
                                         device=args.device, dtype=dtype, skip=random_weights.SEGMENTATION)
            shape = "tiny (smoke run)"
        else:
            model = random_weights.build(Path(tmp), llm={**random_weights.PHI3_WIDTH, "num_hidden_layers": args.layers},
                                         vocab_size=random_weights.OFFICIAL_PHI3_VOCAB, device=args.device,
                                         dtype=dtype, skip=random_weights.SEGMENTATION)
            shape = f"official ViT, Phi-3 width x {args.layers} layers"
        device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
            f"CPU, {torch.get_num_threads()} threads"
        print(f"{args.volumes} volumes x report, {args.tokens} tokens each, {shape}, {args.dtype} on {device_name}; "
              f"batch size {args.batch_size}", flush=True)
        result = run(model, cohort_volumes(args.volumes), args.tokens, args.batch_size,
                     log=lambda line: print(line, flush=True))
    print(f"outputs identical to batch size 1: {result['identical']}/{result['volumes']} volumes, token for token")
    print(f"end to end: official loop {result['official']['total_s']:.1f} s, batched {result['batched']['total_s']:.1f}"
          f" s ({result['end_to_end']:.2f}x)")
    print(f"ratio: {result['ratio']:.2f}")


if __name__ == "__main__":
    main()
