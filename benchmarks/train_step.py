"""Training step with and without gradient checkpointing: samples/s and peak memory, side by side.

The model is M3D-LaMed with a tiny language model and the FULL-size 3D ViT vision tower and SegVol (official sizes,
32x256x256 input, 256 image tokens), random weights, trained as the official recipe does (LoRA on the LLM; vision
tower, projector, embeddings, head and SegVol trained fully). One step = ``training_loss`` (LM + Dice + BCE, every
sample with a mask) + backward + AdamW step, through :func:`M3DTrainingLib.lora.prepare_model` (the training code
path, including its ViT-block checkpointing).

Each configuration runs in its own subprocess so that memory numbers do not leak between them:
CPU (fp32): peak resident memory during the measured steps, above the resident memory before them (weights,
gradients and Adam states already allocated by a warm-up step) = activations and temporaries of a step; glibc is
told to hand freed blocks back at once (MALLOC_MMAP_THRESHOLD_), so resident memory follows the live tensors.
CUDA (bf16 autocast, when a GPU is present): ``torch.cuda.max_memory_allocated`` during the measured steps, above the
allocation before them.

Printed: per device, samples/s and step memory for both settings, the speed ratio (checkpointing / none) and the
memory ratio (checkpointing / none). Last line: ``ratio: N.NN`` = step-memory ratio of the last device measured
(GPU if present, else CPU): the fraction of step memory that gradient checkpointing keeps.

Usage: python benchmarks/train_step.py [--steps 2] [--batch 1] [--devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def build_module(device: str, checkpointing: bool):
    import torch

    from M3DAssistantLib.model.configuration_lamed import parse_lamed_config
    from M3DAssistantLib.model.modeling_lamed import build_lamed_model
    from M3DAssistantLib.model.random_checkpoint import TINY_LLM, official_config
    from M3DTrainingLib.config import TrainConfig
    from M3DTrainingLib.lora import prepare_model

    config = parse_lamed_config(official_config("phi3", llm=TINY_LLM, vocab_size=32015, seg_token_id=32014,
                                                eos_token_id=32000, pad_token_id=32000))
    torch.manual_seed(0)
    with torch.device(device):
        model = build_lamed_model(config)
    train_config = TrainConfig.from_dict({"preset": "official", "dataset": "-", "output_dir": "-",
                                          "gradient_checkpointing": checkpointing, "mixed_precision": "no"})
    return prepare_model(train_config, model), config


def make_batch(config, batch: int, device: str):
    import torch

    mm = config.multimodal
    n = mm.num_image_tokens
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 30000, (batch, 40), generator=g)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n), 32010), text], dim=1)
    input_ids[:, -2] = mm.seg_token_id
    labels = input_ids.clone()
    labels[:, : n + 21] = -100
    images = torch.rand(batch, 1, *mm.image_size, generator=g)
    segs = torch.zeros_like(images)
    segs[:, :, 8:24, 64:192, 64:192] = 1
    tensors = dict(images=images, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                   segs=segs)
    return {k: v.to(device) for k, v in tensors.items()}


class RssPeak:
    """Peak resident set size of this process, sampled every 2 ms in a thread."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker(device: str, checkpointing: bool, steps: int, batch: int) -> dict:
    import psutil
    import torch

    module, config = build_module(device, checkpointing)
    data = make_batch(config, batch, device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)

    def step():
        with autocast:
            loss, _ = module(**data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates gradients and Adam states
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
        with RssPeak() as rss:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            elapsed = time.perf_counter() - start
        peak = rss.peak
    return {"device": device, "checkpointing": checkpointing, "samples_per_s": steps * batch / elapsed,
            "step_s": elapsed / steps, "step_memory_bytes": peak - base, "peak_bytes": peak,
            "trainable_params": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


def run_worker(device: str, checkpointing: bool, steps: int, batch: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", device, "--steps", str(steps), "--batch",
               str(batch)] + (["--checkpointing"] if checkpointing else [])
    env = dict(os.environ)
    if device == "cpu":
        # glibc: return every freed block above 64 KB to the OS at once, so resident memory follows live tensors
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"worker {device} checkpointing={checkpointing} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--devices", default=None, help="comma-separated: cpu,cuda (default: cpu, and cuda if any)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpointing, args.steps, args.batch)))
        return

    import torch

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gb = 1024**3
    ratio = None
    print(f"training step, tiny LLM + full-size ViT/SegVol (official preset parts), batch {args.batch}, "
          f"{args.steps} measured steps")
    for device in devices:
        plain = run_worker(device, False, args.steps, args.batch)
        ckpt = run_worker(device, True, args.steps, args.batch)
        print(f"{device}: {plain['trainable_params'] / 1e6:.1f} M trained parameters, {plain['threads']} threads")
        for name, r in (("no checkpointing", plain), ("gradient checkpointing", ckpt)):
            print(f"  {name:24s} {r['samples_per_s']:8.3f} samples/s  {r['step_s']:7.2f} s/step  step memory "
                  f"{r['step_memory_bytes'] / gb:6.2f} GB  (peak {r['peak_bytes'] / gb:.2f} GB)")
        speed = ckpt["samples_per_s"] / plain["samples_per_s"]
        ratio = ckpt["step_memory_bytes"] / max(plain["step_memory_bytes"], 1)
        print(f"  speed ratio (checkpointing / none):  {speed:.2f}")
        print(f"  memory ratio (checkpointing / none): {ratio:.2f}")
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
