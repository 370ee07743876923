"""What each opt-in analysis feature costs, against the plain task measured side by side in the same run.

Features (``docs/analysis.md``): confidence (token / option / mask probabilities; on by default because it needs no
model call of its own), evidence maps (integrated gradients, 1 step = gradient x input and the default 8 steps),
zoom-in refinement of masks, the REC box next to a mask (``locate``), and the measurements every mask gets.

Workloads (``--size``): ``tiny`` (the test checkpoint's sizes: seconds on a CPU), ``workload`` (official ViT and
SegVol on the official 32x256x256 grid, an LLM of Phi-3 width with ``--layers`` layers, as benchmarks/followup.py),
``official`` (the released Phi-3-4B sizes: for a GPU). Random weights, the real test CT, greedy decoding; free-text
answers are exactly ``--tokens`` tokens; segmentation answers are forced to " It is [SEG]." so that a mask exists.
Every timing is the median of ``--repeat`` runs after a warm-up (the volume's image features and SegVol embedding
are cached, as for a user's follow-up questions).

Each line prints a feature's time and its ratio to the plain task (same task, features off). Last line:
``ratio: N.NN`` = a segmentation with every opt-in feature on (confidence, evidence at 8 steps, refinement, locate)
over the plain segmentation (confidence off) -- the most a user can ask for at once.

Usage: python benchmarks/analysis_cost.py [--size tiny|workload|official] [--device cpu|cuda] [--tokens 32]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "Testing" / "Data" / "totalsegmentator" / "example_ct_sm.nii.gz"
sys.path.insert(0, str(ROOT / "Testing" / "helpers"))
from forcing import force_answer  # noqa: E402  (the tests' one way to force an answer's start)


def timed(runs, repeat, device):
    """Median seconds of each ``runs[name]()`` over ``repeat`` rounds, after one warm-up of each; the variants run
    in turn within a round, so that a machine busier at one moment slows all of them alike. Also the last results."""
    results = {name: run() for name, run in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, results


def checkpoint(size, layers, folder):
    from M3DAssistantLib.model import random_checkpoint as rc

    if size == "tiny":
        return rc.write_random_lamed_checkpoint(folder, "phi3", llm=rc.TINY_LLM, multimodal=rc.TINY_MULTIMODAL)
    if size == "workload":
        llm = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": layers,
               "num_attention_heads": 32, "num_key_value_heads": 32}
        return rc.write_random_lamed_checkpoint(folder, "phi3", llm=llm)
    return rc.write_random_lamed_checkpoint(folder, "phi3", dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "workload", "official"], default="tiny")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers of the 'workload' size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokens", type=int, default=32, help="length of the free-text answers")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.measurements import mask_roi, measure_mask
    from M3DAssistantLib.model import load_model
    from M3DAssistantLib.results import AnalysisOptions, SamplingOptions
    from M3DAssistantLib.volume_io import read_volume

    tmp = Path(tempfile.mkdtemp(prefix="m3d-analysis-cost-"))
    try:
        print(f"writing a random {args.size} checkpoint ...", flush=True)
        folder = checkpoint(args.size, args.layers, tmp / "ckpt")
        dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        engine = InferenceEngine(load_model(folder, device=args.device, dtype=dtype))
        device = engine.device
        array, ijk_to_ras = read_volume(CT)
        engine.set_volume(array, ijk_to_ras, window="abdomen")
        info = engine.info()
        print(f"model: image {info['image_size']}, {info['image_tokens']} image tokens, device {info['device']}, "
              f"dtype {info['dtype']}; CT {tuple(array.shape)}; median of {args.repeat}", flush=True)
        text = SamplingOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
        short = SamplingOptions(max_new_tokens=16)
        off = AnalysisOptions(confidence=False)

        def report(name, seconds, base):
            print(f"{name:44} {seconds:8.3f} s   ratio {seconds / base:6.2f}", flush=True)

        def ask(analysis):
            return lambda: engine.ask("Is there free fluid?", sampling=text, analysis=analysis)

        times, _ = timed({"plain": ask(off), "confidence": ask(None),
                          "evidence 1": ask(AnalysisOptions(confidence=False, evidence=True, evidence_steps=1)),
                          "evidence 8": ask(AnalysisOptions(confidence=False, evidence=True))}, args.repeat, device)
        base = times["plain"]
        report(f"ask, {args.tokens} tokens (plain)", base, base)
        report("  + confidence (token probabilities)", times["confidence"], base)
        report("  + evidence map, 1 step (gradient x input)", times["evidence 1"], base)
        report("  + evidence map, 8 steps (integrated gradients)", times["evidence 8"], base)

        def choose(analysis):
            return lambda: engine.choose("Which organ?", ["Liver", "Lung", "Bone", "Brain"], sampling=short,
                                         analysis=analysis)

        times, _ = timed({"plain": choose(off), "confidence": choose(None)}, args.repeat, device)
        report("choose, up to 16 tokens (plain)", times["plain"], times["plain"])
        report("  + confidence (option probabilities)", times["confidence"], times["plain"])

        def segment(analysis):
            return lambda: engine.segment("liver", sampling=short, analysis=analysis)

        restore = force_answer(engine, " It is [SEG].")
        try:
            times, results = timed({
                "plain": segment(off), "confidence": segment(None),
                "refine": segment(AnalysisOptions(confidence=False, refine=True)),
                "locate": segment(AnalysisOptions(confidence=False, locate=True)),
                "evidence": segment(AnalysisOptions(confidence=False, evidence=True)),
                "everything": segment(AnalysisOptions(evidence=True, refine=True, locate=True))}, args.repeat, device)
        finally:
            restore()
        plain_segment, everything = times["plain"], times["everything"]
        mask = results["plain"].mask
        start = time.perf_counter()
        measure_mask(mask, array, ijk_to_ras, units="HU")
        mask_roi(mask, ijk_to_ras)
        measuring = time.perf_counter() - start
        report(f"segment (plain, {results['plain'].voxel_count} voxels)", plain_segment, plain_segment)
        share = measuring / plain_segment
        print(f"  of which its box + measurements (always)   {measuring:8.3f} s   share {share:6.2f}", flush=True)
        report("  + confidence (mask statistics)", times["confidence"], plain_segment)
        report("  + refinement (zoom-in)", times["refine"], plain_segment)
        report("  + locate (REC box in the same request)", times["locate"], plain_segment)
        report("  + evidence map, 8 steps", times["evidence"], plain_segment)
        report("  + all of them", everything, plain_segment)
        print(f"ratio: {everything / plain_segment:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
