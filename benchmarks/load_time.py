"""Model load at disk speed: ``load_model`` of an official-size checkpoint vs reading the same files' bytes.

Writes an M3D-LaMed-Phi-3-4B checkpoint in the published layout (config.json, tokenizer, safetensors shards + index;
the official sizes: Phi-3-mini LLM, 3D ViT, projector, SegVol; random bf16 weights, ~8 GB) to a temporary folder
(one shard in memory at a time), then, each in a fresh subprocess and timed there:

* read: every weight file read start to end into one reused 64 MiB buffer (what ``cat`` does: the time the bytes
  take to come off the disk or the page cache),
* load: ``load_model(folder, device, dtype=bfloat16)`` -- config, tokenizer, every tensor in place, model ready.

Both under two page-cache regimes, the same for both methods: *cold* (each file's pages dropped from the page cache
with ``posix_fadvise(DONTNEED)`` before the run, which needs no privileges) and *warm* (each file read once just
before). Each measurement is the best of ``--repeats``. Printed: seconds and GB/s of each, load / read, and the load's
peak RSS above the RSS before it / the loaded weight bytes (goal <= 1.2).

Last line: ``ratio: N.NN`` = load time / read time, page cache cold (goal <= 1.3).

``--device cuda`` loads onto the GPU (direct to device: one tensor at a time through a pinned staging buffer, so
the CPU never holds the model; its peak RSS is printed) -- the ``cuda``-marked test runs it. ``--smoke`` uses a tiny
checkpoint (the test suite runs it, so the script cannot rot). The checkpoint is deleted afterwards unless
``--keep``.

Usage: python benchmarks/load_time.py [--checkpoint DIR] [--device cpu] [--repeats 2] [--keep] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import json, os, resource, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
method, folder, device = sys.argv[1:4]
files = json.loads(sys.argv[4])
import torch
from M3DAssistantLib.model import load_model
import M3DAssistantLib.model.loading, M3DAssistantLib.model.tokenizer, M3DAssistantLib.model.modeling_lamed  # imports
before = rss()
start = time.perf_counter()
if method == "read":
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    total = 0
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    loaded = total
else:
    model, tokenizer = load_model(folder, device=device, dtype=torch.bfloat16)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    loaded = sum(t.numel() * t.element_size() for t in model.state_dict().values())
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "bytes": loaded, "peak_above": peak - before}))
"""


def weight_files(folder: Path) -> list[Path]:
    from M3DAssistantLib.model.checkpoint_files import weight_files as files

    return list(files(folder))


def drop_from_page_cache(files: Sequence[Path]) -> None:
    """Evict the files' clean pages (no privileges needed; other processes' caches are untouched)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(files: Sequence[Path]) -> None:
    buffer = bytearray(64 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def run_child(method: str, folder: Path, device: str, files: Sequence[Path]) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    names = json.dumps([str(f) for f in files])
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(folder), device, names], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(folder: Path, device: str, repeats: int, log=print) -> dict[str, Any]:
    files = weight_files(folder)
    results: dict[str, Any] = {}
    for regime in ("cold", "warm"):
        for method in ("read", "load"):
            best = None
            for _ in range(repeats):
                if regime == "cold":
                    drop_from_page_cache(files)
                else:
                    warm_page_cache(files)
                run = run_child(method, folder, device, files)
                if best is None or run["seconds"] < best["seconds"]:
                    best = run
            results[(regime, method)] = best
            log(f"{regime:4} {method:4} {best['seconds']:7.2f} s  {best['bytes'] / best['seconds'] / 1e9:5.2f} GB/s"
                + (f"  peak RSS above start {best['peak_above'] / 1e9:.2f} GB = "
                   f"{best['peak_above'] / best['bytes']:.2f}x the weights" if method == "load" else ""))
    summary = {regime: results[(regime, "load")]["seconds"] / results[(regime, "read")]["seconds"]
               for regime in ("cold", "warm")}
    summary["peak_rss_ratio"] = max(results[(r, "load")]["peak_above"] / results[(r, "load")]["bytes"]
                                    for r in ("cold", "warm"))
    summary["runs"] = {f"{r}-{m}": v for (r, m), v in results.items()}
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="existing checkpoint folder (default: write one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint: seconds (for the test suite)")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here: --device cuda needs one (skipped)")
        return
    import random_weights

    from M3DAssistantLib.model import random_checkpoint as rc

    tmp = None
    folder = args.checkpoint
    if folder is None:
        tmp = Path(tempfile.mkdtemp(prefix="m3d-load-time-", dir=os.environ.get("M3D_BENCH_DIR")))
        folder = tmp / "ckpt"
        print("writing an official-size M3D-LaMed-Phi-3-4B checkpoint (random bf16 weights) ..." if not args.smoke
              else "writing a tiny checkpoint (smoke run) ...", flush=True)
        if args.smoke:
            written = random_weights.write_checkpoint(folder, llm=rc.TINY_LLM, multimodal=rc.TINY_MULTIMODAL,
                                                      max_shard_bytes=400_000)
        else:
            written = random_weights.write_checkpoint(folder, vocab_size=random_weights.OFFICIAL_PHI3_VOCAB)
        print(f"wrote {written / 1e9:.2f} GB in {len(weight_files(folder))} shards", flush=True)
    try:
        print(f"device {args.device}; best of {args.repeats}; page cache dropped per file with "
              "posix_fadvise(DONTNEED) (cold) or read just before (warm)", flush=True)
        result = measure(folder, args.device, args.repeats, log=lambda line: print(line, flush=True))
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"load / read: cold {result['cold']:.2f}x, warm {result['warm']:.2f}x; peak RSS "
          f"{result['peak_rss_ratio']:.2f}x the weights")
    print(f"ratio: {result['cold']:.2f}")


if __name__ == "__main__":
    main()
