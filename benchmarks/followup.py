"""Follow-up questions on one volume: the engine's caches vs recomputing everything per question (official scripts).

Fixed workload (issue 4): official-size ViT and SegVol (32x256x256), an LLM of Phi-3 width (hidden 3072, 4 layers),
the real test CT, 5 questions (report, open VQA, closed VQA, locate, segment), greedy, 32 new tokens each, CPU.
Three engines run the same questions side by side in this process:

* official: nothing reused (resample + both encoders + prompt prefill for every question),
* features: image features and SegVol embedding reused, prompt prefill recomputed,
* features+KV: also the key/value cache of BOS + 256 image tokens reused.

"session" = the 5 questions on a freshly set volume (includes the first encodings); "follow-up" = the same 5
questions asked again on that volume (what a user pays per further question); "to first token" = the follow-ups'
summed time until their first answer token (what caching removes; the decoding of the 32 tokens themselves reads
all LLM weights per token and costs the same with or without caches). Last line: ``ratio: N.NN`` = official /
features+KV for the follow-ups' total time.

Usage: python benchmarks/followup.py [--tokens 32] [--layers 4]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "Testing" / "Data" / "totalsegmentator" / "example_ct_sm.nii.gz"


class FirstTokenClock:
    """A progress callback summing, over questions, the time from each question's start to its first token."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.total, self.start = 0.0, None

    def begin(self):
        self.start = time.perf_counter()

    def __call__(self, event):
        if event.stage == "generate" and self.start is not None:
            self.total += time.perf_counter() - self.start
            self.start = None


def questions(engine, sampling, clock=None):
    asks = [
        lambda: engine.report(sampling=sampling),
        lambda: engine.ask("Is there free fluid in the abdomen?", sampling=sampling),
        lambda: engine.choose("Which plane is this image in?", ["Axial", "Coronal", "Sagittal", "Oblique"],
                              sampling=sampling),
        lambda: engine.locate("liver", sampling=sampling),
        lambda: engine.segment("liver", sampling=sampling),
    ]
    for ask in asks:
        if clock is not None:
            clock.begin()
        ask()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.model import load_model
    from M3DAssistantLib.model.random_checkpoint import write_random_lamed_checkpoint
    from M3DAssistantLib.results import SamplingOptions
    from M3DAssistantLib.volume_io import read_volume

    tmp = Path(tempfile.mkdtemp(prefix="m3d-followup-"))
    try:
        llm = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": args.layers,
               "num_attention_heads": 32, "num_key_value_heads": 32}
        print("writing a random checkpoint (official ViT/SegVol, Phi-3 width) ...", flush=True)
        folder = write_random_lamed_checkpoint(tmp / "ckpt", "phi3", llm=llm)
        model = load_model(folder, device="cpu", dtype=torch.float32)
        array, ijk_to_ras = read_volume(CT)
        sampling = SamplingOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens)  # exactly N tokens
        engines = {
            "official": InferenceEngine(model, caching=False),
            "features": InferenceEngine(model, caching=True, cache_prefix=False),
            "features+KV": InferenceEngine(model, caching=True, cache_prefix=True),
        }
        times = {}
        for name, engine in engines.items():
            first_token = FirstTokenClock()
            engine.progress = first_token
            engine.set_volume(array, ijk_to_ras, window="abdomen")
            start = time.perf_counter()
            questions(engine, sampling)
            session = time.perf_counter() - start
            first_token.reset()
            start = time.perf_counter()
            questions(engine, sampling, first_token)
            follow = time.perf_counter() - start
            times[name] = (session, follow, first_token.total)
            print(f"{name:12} session {session:7.2f} s   follow-up {follow:7.2f} s   follow-up to first token "
                  f"{first_token.total:6.2f} s   (vision tower calls: {engine.counters['vision_tower']})", flush=True)
        base = times["official"]
        for name in ("features", "features+KV"):
            print(f"{name:12} speed-up: session {base[0] / times[name][0]:.2f}x, follow-up "
                  f"{base[1] / times[name][1]:.2f}x, follow-up to first token {base[2] / times[name][2]:.2f}x")
        print(f"ratio: {base[1] / times['features+KV'][1]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
