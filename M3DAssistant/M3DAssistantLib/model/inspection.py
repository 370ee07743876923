"""``m3d inspect``: what a checkpoint is and whether it will load, from config.json and the weight index alone.

Works on a folder whose download has not finished (only config.json and the index needed) and on machines without a
GPU. Weight files are never read beyond their safetensors headers. Without ``compare_with_model`` nothing here
imports torch (``m3d inspect`` answers in about half a second); the tensors whose shapes follow from config.json
alone are still compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from ..errors import M3DError

_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_M3D_TOKENS = ("<im_patch>", "<bx_start>", "<bx_end>", "[SEG]")


def _stored_tensors(folder: Path) -> tuple[dict[str, tuple], list[str], str]:
    """({name: (dtype, shape) or ()}, missing files, layout) from the index or safetensors headers."""
    from .checkpoint_files import read_safetensors_header, read_weight_index

    for index_name in _INDEX_NAMES:
        index = folder / index_name
        if index.is_file():
            weight_map = read_weight_index(index)
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            stored: dict[str, tuple] = {k: () for k in weight_map}
            if index_name.startswith("model.safetensors"):
                for shard in shards:
                    if shard not in missing:
                        stored.update({i.name: (i.dtype, i.shape)
                                       for i in read_safetensors_header(folder / shard)})
            return stored, missing, f"{len(shards)} shard(s) + {index_name}"
    single = folder / "model.safetensors"
    if single.is_file():
        return ({i.name: (i.dtype, i.shape) for i in read_safetensors_header(single)},
                [], "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return {}, [], "pytorch_model.bin (keys not listed without loading it)"
    return {}, ["model.safetensors or an index"], "none"


def _token_ids(folder: Path) -> dict[str, Any]:
    """M3D token ids from the tokenizer files (JSON only, no tokenizer library)."""
    ids: dict[str, Any] = {}
    added = folder / "added_tokens.json"
    if added.is_file():
        ids.update({k: v for k, v in json.loads(added.read_text()).items() if k in _M3D_TOKENS})
    config = folder / "tokenizer_config.json"
    if config.is_file():
        tok = json.loads(config.read_text())
        for token_id, entry in (tok.get("added_tokens_decoder") or {}).items():
            if entry.get("content") in _M3D_TOKENS:
                ids.setdefault(entry["content"], int(token_id))
        ids["add_bos_token"] = tok.get("add_bos_token")
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        for entry in json.loads(tokenizer_json.read_text()).get("added_tokens", []):
            if entry.get("content") in _M3D_TOKENS:
                ids.setdefault(entry["content"], entry["id"])
    return ids


def inspect_checkpoint(source: Union[str, Path], compare_with_model: bool = True) -> dict[str, Any]:
    """A report on a checkpoint (local folder or hub id): variant, sizes, dtype, tokens, loadability.

    For a hub id only the JSON files are fetched (or read from the cache), never the weights. ``will_load`` is True
    only when the config is supported, every weight file listed is present, the tokenizer has the M3D tokens
    matching ``seg_token_id`` and (with ``compare_with_model``, which imports torch to build the model on the meta
    device) the stored tensor names and shapes match the model exactly. Slicer's process passes False: it never
    imports torch.
    """
    from .configuration_lamed import parse_multimodal_config, read_config_json
    from .hub import resolve_checkpoint
    from .tokenizer import describe_bos

    folder = resolve_checkpoint(source, metadata_only=True)
    raw = read_config_json(folder)
    report: dict[str, Any] = {"folder": str(folder), "model_type": raw.get("model_type"), "problems": []}
    problems: list[str] = report["problems"]
    try:
        stored, missing_files, layout = _stored_tensors(folder)
    except M3DError as e:  # a corrupted or implausible safetensors header: one line in the report
        stored, missing_files, layout = {}, [], "unreadable"
        problems.append(str(e))
    report["weights"] = layout
    if missing_files:
        problems.append(f"missing weight file(s): {', '.join(missing_files)}")
    dtypes = sorted({v[0] for v in stored.values() if v})
    report["stored_dtypes"] = dtypes
    numels = [_numel(v[1]) for v in stored.values() if v]
    if numels and len(numels) == len(stored):
        report["parameters"] = sum(numels)

    if raw.get("model_type") == "m3d_clip":
        from .plausibility import check_clip_sizes

        report["variant"] = "M3D-CLIP"
        try:
            check_clip_sizes(raw, str(folder / "config.json"))
        except M3DError as e:
            problems.append(str(e))
        report["will_load"] = not problems
        return report
    try:
        mm = parse_multimodal_config(raw, source=str(folder / "config.json"))
    except M3DError as e:
        problems.append(str(e))
        report["will_load"] = False
        return report
    report.update(
        variant=f"M3D-LaMed ({'Phi-3' if raw['model_type'] == 'lamed_phi3' else 'Llama'})",
        llm={k: raw.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")},
        vision={"image_size": list(mm.image_size), "patch_size": list(mm.patch_size), "width": mm.mm_hidden_size,
                "layers": mm.vision_num_layers, "image_tokens": mm.num_image_tokens},
        segmentation=mm.segmentation_module,
        seg_token_id=mm.seg_token_id,
    )
    tokens = _token_ids(folder)
    report["tokens"] = tokens
    add_bos = tokens.get("add_bos_token")
    add_bos = True if add_bos is None else bool(add_bos)  # the LlamaTokenizer default
    report["add_bos_token"] = f"{str(add_bos).lower()}: {describe_bos(add_bos)}"
    absent = [t for t in _M3D_TOKENS if t not in tokens]
    if absent:
        problems.append(f"tokenizer files lack {', '.join(absent)}")
    elif mm.seg_token_id is not None and tokens["[SEG]"] != mm.seg_token_id:
        problems.append(f"[SEG] is {tokens['[SEG]']} in the tokenizer but seg_token_id is {mm.seg_token_id}")
    if stored and not compare_with_model:
        problems += _anchor_problems(raw, mm, stored)
        report["tensors_compared"] = ("embeddings, lm_head, vision position embeddings and layer counts against "
                                      "config.json (every tensor with --check-tensors)")
    if stored and compare_with_model:
        report["tensors_compared"] = "every tensor name and shape against the model config.json builds"
        expected = _expected_tensors(raw, folder, problems)
        if expected is not None:
            missing = sorted(set(expected) - set(stored))
            unexpected = sorted(set(stored) - set(expected))
            wrong = sorted(k for k, v in stored.items() if v and k in expected and tuple(v[1]) != expected[k])
            if missing:
                problems.append(f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}")
            if wrong:
                problems.append(f"{len(wrong)} tensor(s) with shapes that disagree with config.json, e.g. {wrong[0]}")
    report["will_load"] = not problems
    return report


def _anchor_problems(raw: dict, mm: Any, stored: dict[str, tuple]) -> list[str]:
    """Without torch: the tensors whose shapes follow from config.json alone -- the token embeddings and output head
    (vocabulary x width), the vision tower's position embeddings (patches x width) -- and the number of language
    model layers and vision blocks. A config.json that does not belong to the weights fails here."""
    problems = []
    vocab, hidden = raw.get("vocab_size"), raw.get("hidden_size")
    patches = 1
    for size, patch in zip(mm.image_size, mm.patch_size):
        patches *= int(size) // int(patch)
    expected = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.vision_tower.vision_tower.patch_embedding.position_embeddings": (1, patches, mm.mm_hidden_size),
    }
    for name, shape in expected.items():
        found = stored.get(name)
        if found and tuple(found[1]) != tuple(shape):
            problems.append(f"{name} has shape {tuple(found[1])}, config.json gives {tuple(shape)}: shapes that "
                            f"disagree with config.json (the config does not belong to these weights)")
    for prefix, key, count in (("model.layers.", "num_hidden_layers", raw.get("num_hidden_layers")),
                               ("model.vision_tower.vision_tower.blocks.", "vision_num_layers", mm.vision_num_layers)):
        indices = {int(n[len(prefix):].split(".")[0]) for n in stored if n.startswith(prefix)}
        if indices and count is not None and len(indices) != int(count):
            problems.append(f"the weights hold {len(indices)} layers under {prefix}N but config.json's {key} is "
                            f"{count}")
    return problems


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _expected_tensors(raw: dict, folder: Path, problems: list[str]) -> dict[str, tuple] | None:
    """Names and shapes the model built from config.json expects (on the meta device: no memory, no weights)."""
    import torch

    from .configuration_lamed import parse_lamed_config
    from .modeling_lamed import build_lamed_model

    try:
        config = parse_lamed_config(raw, source=str(folder / "config.json"))
    except M3DError as e:
        problems.append(str(e))
        return None
    with torch.device("meta"):
        model = build_lamed_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines for the CLI."""
    lines = [f"{'checkpoint':14} {report['folder']}"]
    for key in ("variant", "model_type", "weights", "stored_dtypes", "parameters", "llm", "vision", "segmentation",
                "seg_token_id", "tokens", "add_bos_token", "tensors_compared"):
        if key in report:
            value = report[key]
            if key == "parameters":
                value = f"{value / 1e9:.2f} B" if value >= 1e8 else f"{value / 1e6:.2f} M"
            lines.append(f"{key:14} {value}")
    lines.append(f"{'will load':14} {'yes' if report['will_load'] else 'NO'}")
    lines += [f"  problem: {p}" for p in report["problems"]]
    return "\n".join(lines)
