"""Decoding speed at the official M3D-LaMed-Phi-3-4B size on a CUDA GPU, against the memory-bandwidth bound.

Batch 1, bf16, greedy. Uses the real checkpoint when ``--model`` points at it; otherwise random weights of the
official shapes (speed does not depend on the values). Reports time to first token (vision tower + projector +
prompt prefill), tokens/s of the decode phase, and the HBM bound = bytes read per decoded token (all LLM weights) /
the GPU's copy bandwidth measured in this run. Last line: ``ratio: N.NN`` = measured tokens/s / bound tokens/s.
Without a GPU it says so and exits 0.

Usage: python benchmarks/gpu_decode.py [--model FOLDER] [--tokens 128]
"""

from __future__ import annotations

import argparse
import time

import torch


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    runs = 10
    start = time.perf_counter()
    for _ in range(runs):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * src.numel() * src.element_size() * runs / (time.perf_counter() - start)


def official_random_model(device: torch.device):
    from M3DAssistantLib.model.configuration_lamed import parse_lamed_config
    from M3DAssistantLib.model.modeling_lamed import build_lamed_model
    from M3DAssistantLib.model.random_checkpoint import official_config

    config = parse_lamed_config(official_config("phi3", vocab_size=32015, seg_token_id=32014, eos_token_id=32000,
                                                pad_token_id=32000))
    with torch.device("meta"):
        model = build_lamed_model(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        rotary = model.model.rotary_emb
        fresh = type(rotary)(config=rotary.config)
        rotary.inv_freq = fresh.inv_freq.to(device)
        rotary.original_inv_freq = fresh.original_inv_freq.to(device)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="real checkpoint folder (default: random official shapes)")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this benchmark needs one (skipped)")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    if args.model:
        from M3DAssistantLib.model import load_model

        model, _ = load_model(args.model, device=device, dtype=torch.bfloat16)
    else:
        model = official_random_model(device)
    mm = model.multimodal
    images = torch.rand(1, 1, *mm.image_size, device=device, dtype=torch.bfloat16)
    prompt_len = mm.num_image_tokens + 1 + 24
    ids = torch.randint(3, 30000, (1, prompt_len), device=device)
    lm_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if not n.startswith(("model.vision_tower", "model.mm_projector", "model.seg_")))

    def run(new_tokens: int) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.generate(images, ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    run(4)  # warm-up (kernels, allocator)
    ttft = min(run(1) for _ in range(3))
    total = run(args.tokens)
    tokens_per_s = (args.tokens - 1) / (total - ttft)
    bandwidth = copy_bandwidth(device)
    bound = bandwidth / lm_bytes
    print(f"GPU {name}; LLM weights {lm_bytes / 1e9:.2f} GB (bf16); measured copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s")
    print(f"time to first token: {ttft * 1e3:.1f} ms (vision tower + projector + {prompt_len}-token prefill)")
    print(f"decode: {tokens_per_s:.1f} tokens/s; HBM bound {bound:.1f} tokens/s")
    print(f"ratio: {tokens_per_s / bound:.2f}")


if __name__ == "__main__":
    main()
