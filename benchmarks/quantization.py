"""Weight-only int8 / int4 quantization on the CPU: faster than the best unquantized dtype, and close answers?

The study behind the decision not to ship ``--quantize`` (README, Performance). The official M3D-LaMed-Phi-3-4B LLM
(32 layers of Phi-3 width, vocabulary 32015) is built in memory with random weights in ``--dtype`` (default
float32, the faster unquantized dtype on this project's machine: ``decode_bound.py``), the reference; then, rebuilt
from the same seed each time, quantized in place with

* torchao ``Int8WeightOnlyConfig`` (int8 per output channel; on the CPU its linear converts the int8 weight back to
  the activation dtype at every call),
* torchao ``PrototypeInt4WeightOnlyConfig`` (int4, groups of 128; the CPU tinygemm kernel
  ``_weight_int4pack_mm_for_cpu``; the decoder layers only: the kernel needs output sizes divisible by 16, which the
  vocabulary of 32015 is not),
* PyTorch's own int8 CPU kernel ``torch._weight_int8pack_mm`` (int8 per output channel, the kernel an int8 CPU path
  would use; wired here by hand, no library ships it for this model),

and each is measured like the reference: ms/token of batch-1 greedy decoding after an M3D-length prompt (median
interval between tokens), the greedy tokens' first divergence from the reference, and the teacher-forced top-1
agreement (each fed the reference's continuation: the fraction of steps whose argmax agrees). Random weights make
the agreement a lower bound of what trained weights give (their logits have larger margins), not an estimate.

Last line: ``ratio: N.NN`` = the fastest quantized variant's speed / the reference's (> 1: faster).

``--smoke`` runs tiny sizes in seconds. Needs torchao (``pip install torchao``); without it only the PyTorch kernel
is measured.

Usage: python benchmarks/quantization.py [--tokens 16] [--dtype bfloat16] [--layers 32] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_bound  # noqa: E402  (the benchmarks beside this script)
import random_weights  # noqa: E402

PROMPT = decode_bound.PROMPT


class NativeInt8Linear(torch.nn.Module):
    """A Linear with int8 weights (symmetric, per output channel) on PyTorch's ``_weight_int8pack_mm`` CPU kernel."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight_int8 = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.scales = scales.to(linear.weight.dtype)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight_int8, self.scales)
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def native_int8(model: Any) -> None:
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, NativeInt8Linear(child))
                    del child
                    gc.collect()
    model.lm_head = NativeInt8Linear(model.lm_head)


def _only_layers(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and (fqn.startswith("model.layers.") or fqn == "lm_head")


def _int4_packable(module: torch.nn.Module, fqn: str) -> bool:
    """The CPU int4 packing needs output sizes divisible by 16: the decoder layers (lm_head's 32015 rows stay)."""
    return _only_layers(module, fqn) and module.out_features % 16 == 0


def torchao_variants() -> dict[str, Callable[[Any], None]]:
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {}
    return {
        "torchao int8 weight-only": lambda m: quantize_(m, Int8WeightOnlyConfig(), filter_fn=_only_layers),
        "torchao int4 weight-only (g128)": lambda m: quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=128),
                                                               filter_fn=_int4_packable),
    }


def teacher_forced_logits(model: Any, prompt: torch.Tensor, continuation: Sequence[int]) -> torch.Tensor:
    """Logits [T, vocab] predicting each continuation token after the prompt, in one forward."""
    full = torch.cat([prompt, torch.tensor([list(continuation)])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, use_cache=False, logits_to_keep=len(continuation) + 1).logits[0].float()
    return logits[:-1]


def greedy(model: Any, prompt: torch.Tensor, tokens: int) -> list[int]:
    from transformers import GenerationMixin

    with torch.no_grad():
        out = GenerationMixin.generate(model, input_ids=prompt, max_new_tokens=tokens, min_new_tokens=tokens,
                                       do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


def run(dtype_name: str, tokens: int, layers: int, smoke: bool = False, log=print,
        only: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from M3DAssistantLib.model import random_checkpoint as rc

    warnings.filterwarnings("ignore")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    dtype = getattr(torch, dtype_name)
    bandwidth = decode_bound.copy_bandwidth(64 << 20 if smoke else 1 << 30)
    width = rc.TINY_LLM if smoke else random_weights.PHI3_WIDTH
    vocab = 1015 if smoke else random_weights.OFFICIAL_PHI3_VOCAB
    prompt_length = 16 if smoke else PROMPT
    prompt = torch.randint(3, vocab - 20, (1, prompt_length), generator=torch.Generator().manual_seed(0))
    variants: dict[str, Optional[Callable[[Any], None]]] = {f"{dtype_name} (reference)": None}
    variants.update(torchao_variants())
    variants["PyTorch int8 kernel (_weight_int8pack_mm)"] = native_int8
    if only:
        variants = {n: q for n, q in variants.items() if q is None or any(word in n for word in only)}
    results: dict[str, Any] = {}
    reference: dict[str, Any] = {}
    for name, quantize in variants.items():
        with tempfile.TemporaryDirectory(prefix="m3d-quant-") as tmp:
            model, _ = random_weights.build(Path(tmp), llm={**width, "num_hidden_layers": layers},
                                            multimodal=rc.TINY_MULTIMODAL if smoke else None, vocab_size=vocab,
                                            dtype=dtype, skip=random_weights.ENCODERS + random_weights.SEGMENTATION)
            try:
                if quantize is not None:
                    quantize(model)
                    gc.collect()
                speed = decode_bound.measure(model, tokens, prompt_length, bandwidth)
                ids = greedy(model, prompt, tokens)
                if quantize is None:
                    reference = {"ids": ids, "logits": teacher_forced_logits(model, prompt, ids)}
                    row = {"ms_per_token": speed["ms_per_token"], "first_divergence": None, "agreement": 1.0}
                else:
                    forced = teacher_forced_logits(model, prompt, reference["ids"])
                    first = next((t for t, (a, b) in enumerate(zip(reference["ids"], ids)) if a != b), None)
                    agreement = float((forced.argmax(-1) == reference["logits"].argmax(-1)).float().mean())
                    row = {"ms_per_token": speed["ms_per_token"], "first_divergence": first, "agreement": agreement}
            except Exception as error:  # a variant this torch/torchao cannot run on this CPU: said, not hidden
                row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
                error.__traceback__ = None  # its frames hold the model
            del model
            gc.collect()
        results[name] = row
        if "error" in row:
            log(f"{name:42} failed: {row['error']}")
        else:
            diverges = "never" if row["first_divergence"] is None else f"at token {row['first_divergence']}"
            log(f"{name:42} {row['ms_per_token']:8.1f} ms/token   greedy diverges {diverges:12}   teacher-forced "
                f"top-1 agreement {100 * row['agreement']:5.1f} %")
    base = results[f"{dtype_name} (reference)"]["ms_per_token"]
    speedups = {n: base / r["ms_per_token"] for n, r in results.items() if "error" not in r and "reference" not in n}
    return {"variants": results, "speedups": speedups, "ratio": max(speedups.values(), default=0.0)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--only", nargs="+", default=None, help="variants whose name holds one of these words")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds on a CPU (for the test suite)")
    args = parser.parse_args(argv)
    layers = 2 if args.smoke else args.layers
    print(f"weight-only quantization, {'tiny (smoke run)' if args.smoke else 'official Phi-3-4B LLM'}, {layers} "
          f"layers, CPU ({torch.get_num_threads()} threads), batch 1, {args.tokens} tokens", flush=True)
    result = run(args.dtype, args.tokens, layers, smoke=args.smoke, log=lambda line: print(line, flush=True),
                 only=args.only)
    for name, speedup in result["speedups"].items():
        print(f"{name}: {speedup:.2f}x the speed of {args.dtype}")
    print(f"ratio: {result['ratio']:.2f}")


if __name__ == "__main__":
    main()
