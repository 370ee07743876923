"""Decoding at memory speed: ms per token of the official M3D-LaMed-Phi-3-4B LLM on the CPU vs the bandwidth bound.

The official LLM (Phi-3-mini: 32 layers of width 3072, MLP 8192, vocabulary 32015) with random weights is built in
memory in each dtype (tensor by tensor, so bf16 never exists in fp32 first; the encoders are not built: decoding
does not run them), then greedy-decodes ``--tokens`` tokens at batch 1 after a prompt as long as M3D's (1 + 256
image positions + 16 question tokens). ms/token = the median interval between tokens.

Bound = bytes one decoding step must read (every LLM weight except the input embedding, of which a step reads one
row, plus the KV cache of the context) / memory bandwidth measured in this run: a 1 GiB tensor copy, counted as
bytes read + written (the STREAM convention), with the same threads. Printed per dtype: ms/token, the bound and
the fraction of it reached (bound ms / measured ms). The dtype with the lower ms/token is the better one here; the
engine's default CPU dtype (``M3DAssistantLib.model.loading.parse_dtype``) follows this measurement.

Memory: fp32 at full size is 15.2 GB. When this machine has less available (``/proc/meminfo`` MemAvailable minus a
margin), the fp32 model is built with fewer layers, and its ms/token is scaled to 32 layers by bytes read (decoding
is memory-bound: time per step is proportional to the bytes it reads; the fraction of the bound is measured, not
scaled). The output says when it did so.

Last line: ``ratio: N.NN`` = the better dtype's fraction of the bound (goal >= 0.70).

``--smoke`` runs tiny sizes in seconds (the test suite does, so the script cannot rot).

Usage: python benchmarks/decode_bound.py [--tokens 16] [--dtypes float32 bfloat16] [--layers 32]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_weights  # noqa: E402  (the benchmarks' helper beside this script)

PROMPT = 1 + 256 + 16  # BOS + image positions + question tokens
MARGIN = 3 << 30  # bytes left to the rest of the machine


def copy_bandwidth(nbytes: int = 1 << 30, runs: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write), best of ``runs``."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def available_memory() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def llm_bytes(layers: int, dtype: torch.dtype, width: dict, vocab: int) -> int:
    """Bytes of the LLM's weights at ``layers`` layers (all of them, embedding included)."""
    h, m = width["hidden_size"], width["intermediate_size"]
    per_layer = h * 3 * h + h * h + h * 2 * m + m * h + 2 * h
    return (layers * per_layer + 2 * vocab * h + h) * torch.empty((), dtype=dtype).element_size()


class _Ticks:
    """A streamer noting the time of every generated token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel():
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure(model: Any, tokens: int, prompt: int, bandwidth: float) -> dict[str, Any]:
    """ms/token of greedy decoding at batch 1 and the bound for this model."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab - 20, (1, prompt), generator=torch.Generator().manual_seed(0))
    ticks = _Ticks()
    with torch.no_grad():
        from transformers import GenerationMixin

        # the LM's own generate on a text prompt of M3D's length: decoding cost does not depend on which positions
        # held image features
        GenerationMixin.generate(model, input_ids=ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1,
                                 do_sample=False, streamer=ticks)
    intervals = [b - a for a, b in zip(ticks.times, ticks.times[1:])]
    ms = 1000 * statistics.median(intervals)
    config = model.config
    kv = 2 * config.num_hidden_layers * (prompt + tokens // 2) * config.hidden_size * \
        next(model.parameters()).element_size()
    read = random_weights.weight_bytes(model) + kv
    bound_ms = 1000 * read / bandwidth
    return {"ms_per_token": ms, "mean_ms": 1000 * statistics.fmean(intervals), "bytes_per_token": read,
            "bound_ms": bound_ms, "fraction": bound_ms / ms, "layers": config.num_hidden_layers}


def run(dtypes: Sequence[str], tokens: int, layers: int, smoke: bool = False, log=print) -> dict[str, Any]:
    from M3DAssistantLib.model import random_checkpoint as rc

    bandwidth = copy_bandwidth(64 << 20 if smoke else 1 << 30)
    log(f"memory bandwidth (tensor copy, read + write, {torch.get_num_threads()} threads): {bandwidth / 1e9:.1f} GB/s")
    width = rc.TINY_LLM if smoke else random_weights.PHI3_WIDTH
    vocab = 1015 if smoke else random_weights.OFFICIAL_PHI3_VOCAB
    results: dict[str, Any] = {"bandwidth": bandwidth, "dtypes": {}}
    for name in dtypes:
        dtype = getattr(torch, name)
        built = layers
        if not smoke:
            while built > 1 and llm_bytes(built, dtype, width, vocab) > available_memory() - MARGIN:
                built -= 1
        with tempfile.TemporaryDirectory(prefix="m3d-decode-") as tmp:
            llm = {**width, "num_hidden_layers": built}
            model, _ = random_weights.build(Path(tmp), llm=llm, multimodal=rc.TINY_MULTIMODAL if smoke else None,
                                            vocab_size=vocab, dtype=dtype,
                                            skip=random_weights.ENCODERS + random_weights.SEGMENTATION)
            result = measure(model, tokens, 8 + 8 if smoke else PROMPT, bandwidth)
        del model
        gc.collect()
        if built != layers:  # scale to the full depth by bytes read (see the module docstring)
            full = llm_bytes(layers, dtype, width, vocab) - vocab * width["hidden_size"] * dtype.itemsize
            scale = full / result["bytes_per_token"]
            result.update(measured_layers=built, ms_per_token=result["ms_per_token"] * scale,
                          bound_ms=result["bound_ms"] * scale, bytes_per_token=full, layers=layers)
        results["dtypes"][name] = result
        scaled = f" (built with {built} layers to fit in memory; scaled to {layers} by bytes read)" \
            if built != layers else ""
        log(f"{name:9} {result['ms_per_token']:8.1f} ms/token   bound {result['bound_ms']:7.1f} ms "
            f"({result['bytes_per_token'] / 1e9:.2f} GB per token)   {100 * result['fraction']:5.1f} % of the "
            f"bound{scaled}")
    best = min(results["dtypes"], key=lambda n: results["dtypes"][n]["ms_per_token"])
    results["best"] = best
    results["ratio"] = results["dtypes"][best]["fraction"]
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds on a CPU (for the test suite)")
    args = parser.parse_args(argv)
    layers = 2 if args.smoke else args.layers
    print(f"batch 1 greedy decoding, {'tiny (smoke run)' if args.smoke else 'official Phi-3-4B LLM'}, {layers} "
          f"layers, CPU ({torch.get_num_threads()} threads; native bf16: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()})", flush=True)
    result = run(args.dtypes, args.tokens, layers, smoke=args.smoke, log=lambda line: print(line, flush=True))
    slower = {n: r["ms_per_token"] / result["dtypes"][result["best"]]["ms_per_token"]
              for n, r in result["dtypes"].items() if n != result["best"]}
    print(f"better dtype here: {result['best']}" + "".join(f" ({n} is {s:.2f}x slower)" for n, s in slower.items()))
    print(f"ratio: {result['ratio']:.2f}")


if __name__ == "__main__":
    main()
