"""Numerical parity at the official M3D-LaMed-Phi-3-4B size on a CUDA GPU: bf16 vs fp32, SDPA vs eager attention,
cached vs uncached follow-up questions. One short script (well under 5 minutes on an H100).

The model is the official architecture at full size (Phi-3-mini LLM, 3D ViT, projector, SegVol) with random weights
from the modules' own initialisers, built directly on the GPU; answers do not matter here, agreement does. For each
pair the script prints the greedy tokens' first divergence (step, the two tokens, and the reference's top-1 margin
there: a divergence at a near-tie is benign, one at a large margin is a bug), the teacher-forced top-1 agreement
(both variants fed the reference's sequence: the fraction of steps whose argmax agrees) and the largest logit
difference relative to the reference's logit spread.

Pairs (reference first):
  bf16-vs-fp32        fp32 SDPA        vs  bf16 SDPA          (what running in bf16 costs)
  eager-vs-sdpa-fp32  fp32 eager       vs  fp32 SDPA          (must agree to float rounding)
  eager-vs-sdpa-bf16  bf16 eager       vs  bf16 SDPA
  cached-vs-uncached  bf16, uncached   vs  bf16 with the engine's prefix KV cache, two follow-up questions

Last line: ``ratio: N.NN`` = bf16 teacher-forced top-1 agreement with fp32 (1.00 = every step agrees).
``--smoke`` runs the same at tiny size on the CPU in seconds (the test suite does, so the script cannot rot);
``Testing/project/test_gpu_parity.py`` has the ``cuda``-marked test at full size.

Usage: python benchmarks/gpu_parity.py [--tokens 32] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Optional, Sequence

import torch

PROMPT_TOKENS = 24  # question tokens after the image tokens


def build_model(size: str, device: torch.device) -> Any:
    """The official (or tiny) architecture with random weights, fp32, on ``device``."""
    from M3DAssistantLib.model.configuration_lamed import parse_lamed_config
    from M3DAssistantLib.model.modeling_lamed import build_lamed_model
    from M3DAssistantLib.model.random_checkpoint import TINY_LLM, TINY_MULTIMODAL, official_config

    tiny = size == "tiny"
    vocab = 1015 if tiny else 32015
    config = parse_lamed_config(official_config(
        "phi3", llm=TINY_LLM if tiny else None, multimodal=TINY_MULTIMODAL if tiny else None, vocab_size=vocab,
        seg_token_id=vocab - 1, eos_token_id=vocab - 5, pad_token_id=vocab - 5))
    torch.manual_seed(0)
    with torch.device(device):
        model = build_lamed_model(config)  # the modules' own initialisers, on the GPU: seconds at full size
    model.generation_config.eos_token_id = None  # run every step: parity of long continuations
    model.generation_config.pad_token_id = vocab - 5
    return model.float().eval().requires_grad_(False)


def _prompt(model, device: torch.device, seed: int) -> torch.Tensor:
    """BOS + image tokens + random question tokens (ids below the added tokens)."""
    g = torch.Generator().manual_seed(seed)
    n = model.num_image_tokens
    vocab = model.config.vocab_size
    question = torch.randint(3, vocab - 20, (1, PROMPT_TOKENS), generator=g)
    return torch.cat([torch.tensor([[1]]), torch.full((1, n), vocab - 4), question], dim=1).to(device)


def _greedy(model, images, ids, tokens: int, cache: Any = None) -> list[int]:
    kwargs = {} if cache is None else {"cache": cache}
    out = model.generate(images, ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)
    return out[0].tolist()


@torch.no_grad()
def _step_logits(model, images, ids, continuation: Sequence[int]) -> torch.Tensor:
    """Logits [T, vocab] (fp32) predicting each token of ``continuation`` after ``ids``, in one forward."""
    full = torch.cat([ids, torch.tensor([continuation], device=ids.device)], dim=1)
    logits = model(images=images, input_ids=full, use_cache=False).logits[0].float()
    return logits[ids.shape[1] - 1: full.shape[1] - 1]


def compare(name: str, reference: dict, other: dict) -> dict:
    """First greedy divergence, teacher-forced top-1 agreement, largest relative logit difference."""
    ref_ids, ids = reference["ids"], other["ids"]
    first = next((t for t, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), None)
    result: dict[str, Any] = {"pair": name, "tokens": len(ref_ids), "first_divergence": first}
    ref_logits, logits = reference["forced"], other["forced"]
    top2 = ref_logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).cpu()
    if first is not None:
        result.update(reference_token=ref_ids[first], other_token=ids[first], margin=float(margins[first]),
                      median_margin=float(margins.median()))
    result["agreement"] = float((ref_logits.argmax(-1) == logits.argmax(-1)).float().mean())
    spread = float(ref_logits.std())
    result["max_logit_diff_rel"] = float((ref_logits - logits).abs().max()) / spread
    return result


def _variant(model, images, ids, tokens: int, reference_ids: Optional[list[int]] = None) -> dict:
    ids_out = _greedy(model, images, ids, tokens)
    forced = _step_logits(model, images, ids, reference_ids if reference_ids is not None else ids_out)
    return {"ids": ids_out, "forced": forced}


def _follow_ups(model, images, questions: Sequence[torch.Tensor], tokens: int, cached: bool) -> list[list[int]]:
    """Answers to several questions about one image, as the engine asks them: with a copy of the prefix KV cache
    (positions 0..N) per question, or each from scratch."""
    from transformers import DynamicCache

    features = model.encode_images(images)
    answers = []
    prefix = None
    for ids in questions:
        kwargs: dict[str, Any] = {}
        if cached:
            if prefix is None:
                prefix = DynamicCache(config=model.config)
                model(input_ids=ids[:, :model.num_image_tokens + 1], image_features=features, use_cache=True,
                      cache=prefix)
            kwargs["cache"] = copy.deepcopy(prefix)
        out = model.generate(input_ids=ids, image_features=features, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, **kwargs)
        answers.append(out[0].tolist())
    return answers


@torch.no_grad()
def run(size: str = "official", device: str = "cuda", tokens: int = 32, log=print) -> dict[str, Any]:
    """All comparisons; returns ``{"pairs": [...], "follow_ups": {...}, "device": ..., "seconds": ...}``."""
    start = time.perf_counter()
    dev = torch.device(device)
    model32 = build_model(size, dev)
    mm = model32.multimodal
    images = torch.rand(1, 1, *mm.image_size, generator=torch.Generator().manual_seed(1)).to(dev)
    ids = _prompt(model32, dev, seed=2)
    n_params = sum(p.numel() for p in model32.parameters())
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    size_text = f"{n_params / 1e9:.2f} B" if n_params > 1e8 else f"{n_params / 1e6:.2f} M"
    log(f"{size} model on {dev} ({where}): {size_text} parameters, {mm.num_image_tokens} image tokens, prompt "
        f"{ids.shape[1]} tokens, {tokens} new tokens greedy")

    fp32 = _variant(model32, images, ids, tokens)
    model32.set_attn_implementation("eager")
    fp32_eager = _variant(model32, images, ids, tokens, fp32["ids"])
    model32.set_attn_implementation("sdpa")
    model16 = model32.to(torch.bfloat16)  # in place: the fp32 weights, rounded (no second copy in memory)
    del model32
    bf16 = _variant(model16, images, ids, tokens, fp32["ids"])
    model16.set_attn_implementation("eager")
    bf16_eager = _variant(model16, images, ids, tokens, bf16["ids"])
    model16.set_attn_implementation("sdpa")
    bf16_self = {"ids": bf16["ids"], "forced": _step_logits(model16, images, ids, bf16["ids"])}
    pairs = [compare("bf16-vs-fp32", fp32, bf16), compare("eager-vs-sdpa-fp32", fp32_eager, fp32),
             compare("eager-vs-sdpa-bf16", bf16_eager, bf16_self)]

    questions = [ids, _prompt(model16, dev, seed=3)]
    uncached = _follow_ups(model16, images, questions, tokens, cached=False)
    cached = _follow_ups(model16, images, questions, tokens, cached=True)
    follow = {"pair": "cached-vs-uncached", "questions": len(questions),
              "first_divergence": [next((t for t, (a, b) in enumerate(zip(u, c)) if a != b), None)
                                   for u, c in zip(uncached, cached)]}
    for p in pairs:
        where = "none" if p["first_divergence"] is None else (
            f"step {p['first_divergence']} ({p['reference_token']} vs {p['other_token']}, reference top-1 margin "
            f"{p['margin']:.3f}, median margin {p['median_margin']:.3f})")
        log(f"{p['pair']:20} first diverging token: {where}; teacher-forced top-1 agreement {p['agreement']:.3f}; "
            f"max |logit diff| / logit std {p['max_logit_diff_rel']:.2e}")
    log(f"{'cached-vs-uncached':20} first diverging token per follow-up question (bf16): "
        f"{', '.join('none' if d is None else f'step {d}' for d in follow['first_divergence'])}")
    seconds = time.perf_counter() - start
    log(f"took {seconds:.1f} s")
    return {"pairs": pairs, "follow_ups": follow, "device": str(dev), "size": size, "seconds": seconds}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (seconds; for the test suite)")
    args = parser.parse_args(argv)
    if args.smoke:
        result = run("tiny", "cpu", args.tokens)
    elif not torch.cuda.is_available():
        print("no CUDA GPU here: this check needs one (skipped); --smoke runs it at tiny size on the CPU")
        return
    else:
        result = run("official", "cuda", args.tokens)
    print(f"ratio: {result['pairs'][0]['agreement']:.2f}")


if __name__ == "__main__":
    main()
