"""Peak memory of loading a checkpoint: our loader vs a naive load_state_dict, side by side in one run.

Writes a >= 1 GB random M3D-LaMed checkpoint in the official layout (fp32 on disk, official-size ViT and SegVol, a
mid-size Phi-3), then, each in a fresh subprocess, loads it as bf16 and as fp32 with

* ours:  ``load_model`` (meta-device model, tensor-by-tensor reads straight into the target dtype),
* naive: an initialised model + ``safetensors.torch.load_file`` of every shard + ``load_state_dict`` + ``.to(dtype)``.

Reported per run: (peak RSS - RSS before loading) / bytes of the loaded tensors. Goal: ours <= 1.2.
Last line: ``ratio: N.NN`` = naive / ours (bf16 and fp32 averaged).

Usage: python benchmarks/load_memory.py [--checkpoint DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
folder, method, dtype_name = sys.argv[1:4]
dtype = getattr(torch, dtype_name)
from M3DAssistantLib.model import load_model
from M3DAssistantLib.model.configuration_lamed import parse_lamed_config, read_config_json
from M3DAssistantLib.model.modeling_lamed import build_lamed_model
from M3DAssistantLib.model.checkpoint_files import weight_files
from safetensors.torch import load_file
# imports are not loading
import transformers.models.phi3.modeling_phi3, M3DAssistantLib.model.loading, M3DAssistantLib.model.tokenizer
torch.set_num_threads(1)
before = rss()
if method == "ours":
    model, _ = load_model(folder, device="cpu", dtype=dtype)
else:
    model = build_lamed_model(parse_lamed_config(read_config_json(folder)))
    state = {}
    for f in weight_files(folder):
        state.update(load_file(str(f)))
    model.load_state_dict(state, strict=True)
    del state
    model = model.to(dtype)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loaded = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"before": before, "peak": peak, "loaded": loaded}))
"""


def run_child(folder: Path, method: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), method, dtype], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_checkpoint(folder: Path) -> None:
    from M3DAssistantLib.model.random_checkpoint import write_random_lamed_checkpoint

    # Official-size ViT + SegVol (~190 M parameters) and a 1024-wide 10-layer Phi-3: ~1.1 GB in fp32.
    llm = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 10, "num_attention_heads": 16,
           "num_key_value_heads": 16}
    write_random_lamed_checkpoint(folder, "phi3", llm=llm, max_shard_bytes=500_000_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="existing checkpoint folder (default: write one)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    args = parser.parse_args()
    tmp = None
    folder = args.checkpoint
    if folder is None:
        tmp = Path(tempfile.mkdtemp(prefix="m3d-bench-"))
        folder = tmp / "ckpt"
        print(f"writing a random official-layout checkpoint to {folder} ...", flush=True)
        write_checkpoint(folder)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"checkpoint: {size / 1e9:.2f} GB of safetensors (fp32 on disk)")
    ratios = {}
    try:
        for dtype in ("bfloat16", "float32"):
            row = {}
            for method in ("ours", "naive"):
                r = run_child(folder, method, dtype)
                row[method] = (r["peak"] - r["before"]) / r["loaded"]
                print(f"{dtype:9} {method:5}: peak - before = {(r['peak'] - r['before']) / 1e9:5.2f} GB for "
                      f"{r['loaded'] / 1e9:.2f} GB loaded -> {row[method]:.2f}x", flush=True)
            ratios[dtype] = row["naive"] / row["ours"]
            print(f"{dtype:9} naive/ours: {ratios[dtype]:.2f}")
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"ratio: {sum(ratios.values()) / len(ratios):.2f}")


if __name__ == "__main__":
    main()
