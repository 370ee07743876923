"""Helper for the benchmarks (not a benchmark itself): M3D-LaMed with random weights built in memory.

Tensor by tensor in the target dtype on the target device (a bf16 model never exists in fp32 first, so the official
Phi-3-4B size fits in 7.6 GB), with a real tokenizer, config.json and the official generation config written to a
folder, exactly as :func:`M3DAssistantLib.model.load_model` would return them from a checkpoint. Parts a benchmark
does not run (``skip``: e.g. the vision tower for pure decoding) stay on the meta device and cost nothing.

Weights: normal(0, 0.02) as the Phi-3/Llama initialisers; 1-D scales (norms) 1 + normal(0, 0.02); biases
normal(0, 0.02). Speed does not depend on the values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

PHI3_WIDTH = {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32}
"""Phi-3-mini's layer shape (the official M3D-LaMed-Phi-3-4B LLM has 32 such layers)."""

OFFICIAL_PHI3_VOCAB = 32015  # len(tokenizer) of the released model (Phi-3's 32011 + 4 M3D tokens)
ENCODERS = ("model.vision_tower.", "model.mm_projector.")
SEGMENTATION = ("model.seg_projector.", "model.seg_module.")


def write_folder(folder: Path, *, family: str = "phi3", llm: Optional[dict] = None, multimodal: Optional[dict] = None,
                 vocab_size: Optional[int] = None, dtype: torch.dtype = torch.float32) -> Any:
    """Tokenizer files, config.json and (Phi-3) the official generation_config.json; returns the parsed config."""
    from M3DAssistantLib.model import random_checkpoint as rc
    from M3DAssistantLib.model.configuration_lamed import parse_lamed_config
    from M3DAssistantLib.model.tokenizer import SEG_TOKEN

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    added = rc.write_tokenizer(folder, family, rc.train_sentencepiece(1000))
    vocab = vocab_size or max(added.values()) + 1
    eos = added["<|endoftext|>"] if family == "phi3" else 2
    config = rc.official_config(family, llm=llm, multimodal=multimodal, vocab_size=vocab,
                                seg_token_id=added[SEG_TOKEN], eos_token_id=eos,
                                pad_token_id=eos if family == "phi3" else 0,
                                dtype=str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if family == "phi3":
        rc.write_generation_config(folder, family, "official", added)
    return parse_lamed_config(config)


def _random_like(tensor: torch.Tensor, name: str, dtype: torch.dtype, device: Any,
                 generator: torch.Generator) -> torch.Tensor:
    value = torch.empty(tensor.shape, dtype=dtype if tensor.is_floating_point() else tensor.dtype, device=device)
    if value.is_floating_point():
        value.normal_(0.0, 0.02, generator=generator)
        if value.ndim == 1 and name.endswith("weight"):
            value.add_(1.0)  # a norm's scale
    else:
        value.zero_()
    return value


def build(
    folder: Path,
    *,
    family: str = "phi3",
    llm: Optional[dict] = None,
    multimodal: Optional[dict] = None,
    vocab_size: Optional[int] = None,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    skip: Sequence[str] = (),
    seed: int = 0,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the given sizes (official ones by default); ``folder`` receives the tokenizer files
    and config.json and must outlive the engine using the model."""
    from M3DAssistantLib.model.checkpoint_reader import _materialize_meta_buffers
    from M3DAssistantLib.model.loading import checkpoint_generation_config
    from M3DAssistantLib.model.modeling_lamed import build_lamed_model
    from M3DAssistantLib.model.tokenizer import load_tokenizer

    parsed = write_folder(folder, family=family, llm=llm, multimodal=multimodal, vocab_size=vocab_size, dtype=dtype)
    with torch.device("meta"):
        model = build_lamed_model(parsed)
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        if name.startswith(tuple(skip)):
            continue
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        value = _random_like(tensor, name, dtype, device, generator)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value
    if not skip:
        _materialize_meta_buffers(model, device)
    else:  # the rotary tables of the LLM (the skipped parts keep theirs on the meta device)
        rotary = model.model.rotary_emb
        with torch.device("cpu"):
            fresh = type(rotary)(config=rotary.config)
        for key, buffer in fresh._buffers.items():
            rotary._buffers[key] = buffer.to(device)
    model.eval().requires_grad_(False)
    tokenizer, _ = load_tokenizer(folder, parsed.multimodal.seg_token_id, parsed.text_config.vocab_size)
    model.generation_config, _ = checkpoint_generation_config(folder, tokenizer.m3d_special_tokens,
                                                              parsed.text_config.vocab_size)
    model.checkpoint_path = folder
    model.source = f"random {family} ({folder})"
    return model, tokenizer


def write_checkpoint(folder: Path, *, family: str = "phi3", llm: Optional[dict] = None,
                     multimodal: Optional[dict] = None, vocab_size: Optional[int] = None,
                     dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 2 << 30, seed: int = 0) -> int:
    """A checkpoint in the published layout (shards + index), written one shard at a time so that memory stays at
    one shard even at the official size; returns the weight bytes written."""
    from safetensors.torch import save_file

    from M3DAssistantLib.model.modeling_lamed import build_lamed_model

    folder = Path(folder)
    parsed = write_folder(folder, family=family, llm=llm, multimodal=multimodal, vocab_size=vocab_size, dtype=dtype)
    with torch.device("meta"):
        state = build_lamed_model(parsed).state_dict()
    generator = torch.Generator().manual_seed(seed)
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        part = {name: _random_like(state[name], name, dtype, "cpu", generator) for name in names}
        total += sum(t.numel() * t.element_size() for t in part.values())
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        del part
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def weight_bytes(model: Any, prefixes: Sequence[str] = ENCODERS + SEGMENTATION) -> int:
    """Bytes of the LLM weights a decoding step reads: every parameter except the encoders, SegVol and the input
    embedding (a step looks up one row of it)."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(tuple(prefixes)) or name.endswith("embed_tokens.weight") or p.is_meta:
            continue
        total += p.numel() * p.element_size()
    return total
