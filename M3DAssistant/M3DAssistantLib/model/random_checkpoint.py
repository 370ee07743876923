"""Random-weight checkpoints in the official published layout, for tests, demos and benchmarks without the hub.

A written folder looks like a released M3D-LaMed repo: ``config.json`` with the official fields (LLM fields as the
official transformers-4.4x config, multimodal fields, ``auto_map`` and ``architectures`` as published), weights with
the official parameter names (safetensors, optionally sharded with an index, or ``pytorch_model.bin``), and a
SentencePiece tokenizer saved the way transformers' slow ``LlamaTokenizer`` saves it, with the four M3D tokens added
in the official order. Sizes are configurable; the vision/SegVol defaults are the official ones.

The SentencePiece model is trained on a small built-in corpus, so its vocabulary is small but real (byte fallback,
dummy prefix, digits split: the Llama recipe).

A test-checkpoint generator (``m3d make-test-checkpoint``, the tests' fixtures): the weights are written by the
product's :mod:`.checkpoint_writer`, which the training's merge uses too.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .checkpoint_writer import save_state_dict
from .tokenizer import BOX_END, BOX_START, IMAGE_TOKEN, SEG_TOKEN

# The published configs' LLM fields (transformers 4.4x spelling), per family.
OFFICIAL_LLM_FIELDS: dict[str, dict[str, Any]] = {
    "phi3": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": 2047,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    "llama": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
}

OFFICIAL_MULTIMODAL_FIELDS: dict[str, Any] = {
    "image_channel": 1,
    "image_size": [32, 256, 256],
    "patch_size": [4, 16, 16],
    "vision_tower": "vit3d",
    "vision_select_layer": -1,
    "vision_select_feature": "patch",
    "mm_hidden_size": 768,
    "mm_projector_type": "spp",
    "proj_layer_type": "mlp",
    "proj_layer_num": 2,
    "proj_pooling_type": "spatial",
    "proj_pooling_size": 2,
    "segmentation_module": "segvol",
    "tune_mm_mlp_adapter": False,
}

# Small sizes for fast tests: 16x64x64 image -> 4x4x4 patches -> 8 image tokens.
TINY_MULTIMODAL: dict[str, Any] = {
    "image_size": [16, 64, 64],
    "mm_hidden_size": 32,
    "vision_mlp_dim": 64,
    "vision_num_layers": 2,
    "vision_num_heads": 2,
    "seg_mlp_dim": 64,
    "seg_num_layers": 2,
    "seg_num_heads": 2,
    "seg_decoder_mlp_dim": 64,
    "seg_decoder_num_heads": 2,
    "seg_iou_head_hidden_dim": 16,
}
TINY_LLM: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}

PHI3_CHAT_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)

# generation_config.json of the base LLMs (Microsoft Phi-3-mini-4k-instruct, Meta Llama-2-7b-chat-hf), by token
# name; ``save_pretrained`` of the merged M3D model writes the base model's generation config it was loaded with.
OFFICIAL_GENERATION_FIELDS: dict[str, dict[str, Any]] = {
    "phi3": {"bos_token_id": "<s>", "eos_token_id": ["<|endoftext|>", "<|assistant|>", "<|end|>"],
             "pad_token_id": "<|endoftext|>"},
    "llama": {"bos_token_id": "<s>", "eos_token_id": "</s>", "pad_token_id": "<unk>", "do_sample": True,
              "temperature": 0.6, "top_p": 0.9, "max_length": 4096},
}

AUTO_MAP = {
    "phi3": {
        "AutoConfig": "configuration_lamed_phi3.LamedPhi3Config",
        "AutoModelForCausalLM": "modeling_lamed_phi3.LamedPhi3ForCausalLM",
    },
    "llama": {
        "AutoConfig": "configuration_lamed_llama.LamedConfig",
        "AutoModelForCausalLM": "modeling_lamed_llama.LamedLlamaForCausalLM",
    },
}

_CORPUS = """Please generate a medical report based on this image.
Can you provide a caption consists of findings for this medical image?
What is liver in this image? Please output the segmentation mask.
What is liver in this image? Please output the box.
Where is the spleen in this image? Please output the box.
Can you segment the kidney in this image? Can you find the aorta in this image? Give coordinates.
Do you know what it is in the bounding box? What target is present within the coordinates?
The target is liver and the coordinates is. Coordinates are. Sure, it is liver. It is. Sure.
Sorry, there is no pancreas. The target is stomach and the segmentation mask is.
Choices: A. Axial B. Coronal C. Sagittal D. Oblique. Which plane is this image in?
In which phase is this CT scan taken? Non-contrast, arterial, portal venous, delayed.
What abnormality is seen in the left lobe of the liver? A hypodense lesion in the right kidney.
Findings: The lungs are clear. No pleural effusion. Mild hepatomegaly with fatty infiltration.
Please answer and segment. Please answer and find it by box based on the above description.
Description: an organ in the upper right abdomen that filters blood and produces bile.
0 1 2 3 4 5 6 7 8 9 [0.094, 0.301, 0.223, 0.75, 0.617, 0.551] ( ) , . ? ! : ; - / %
"""


def train_sentencepiece(vocab_size: int = 1000) -> bytes:
    """A small Llama-style SentencePiece BPE model (byte fallback, dummy prefix, split digits) as bytes."""
    import sentencepiece as spm

    lines = [line for line in _CORPUS.splitlines() if line.strip()] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def _added_token_entry(content: str, special: bool) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": not special, "rstrip": False,
            "single_word": False, "special": special}


def write_tokenizer(folder: Path, family: str, sp_model: bytes, add_bos_token: bool = True,
                    legacy: bool = False, m3d_tokens: bool = True) -> dict[str, int]:
    """Write slow-tokenizer files as transformers 4.4x saves them; returns {token: id} of the added tokens."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sp_model)
    base = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size()
    decoder = {str(i): _added_token_entry(t, True) for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    added: dict[str, int] = {}
    next_id = base
    if family == "phi3":
        for token in PHI3_CHAT_TOKENS:
            # Phi-3's chat tokens: <|endoftext|> and <|end|>... are special, placeholders are not.
            decoder[str(next_id)] = _added_token_entry(token, "placeholder" not in token)
            added[token] = next_id
            next_id += 1
    if m3d_tokens:
        for token in (IMAGE_TOKEN, BOX_START, BOX_END):
            decoder[str(next_id)] = _added_token_entry(token, True)
            added[token] = next_id
            next_id += 1
        decoder[str(next_id)] = _added_token_entry(SEG_TOKEN, False)  # [SEG] is a normal added token
        added[SEG_TOKEN] = next_id
    eos = "<|endoftext|>" if family == "phi3" else "</s>"
    pad = "<|endoftext|>" if family == "phi3" else "<unk>"
    config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [IMAGE_TOKEN, BOX_START, BOX_END] if m3d_tokens else [],
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "legacy": legacy,
        "model_max_length": 512,
        "pad_token": pad,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"bos_token": "<s>", "eos_token": eos, "pad_token": pad, "unk_token": "<unk>"}
    if m3d_tokens:
        special_map["additional_special_tokens"] = [IMAGE_TOKEN, BOX_START, BOX_END]
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    return added


def write_generation_config(folder: Path, family: str, fields: Union[str, dict], added: dict[str, int]) -> Path:
    """``generation_config.json`` as ``save_pretrained`` writes it: ``"official"`` (the base LLM's fields, token
    names turned into this tokenizer's ids) or a dict of fields."""
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, **added}
    if fields == "official":
        fields = {k: [ids[t] for t in v] if isinstance(v, list) else ids.get(v, v) if isinstance(v, str) else v
                  for k, v in OFFICIAL_GENERATION_FIELDS[family].items()}
    if not isinstance(fields, dict):
        raise ValueError(f"generation_config must be None, 'official' or a dict, not {fields!r}")
    path = Path(folder) / "generation_config.json"
    path.write_text(json.dumps({**fields, "transformers_version": "4.44.1"}, indent=2))
    return path


def official_config(family: str, *, llm: Optional[dict] = None, multimodal: Optional[dict] = None,
                    vocab_size: int, seg_token_id: Optional[int], eos_token_id: int, pad_token_id: int,
                    dtype: str = "float32") -> dict[str, Any]:
    """config.json content in the published layout."""
    config = dict(OFFICIAL_LLM_FIELDS[family])
    config.update(llm or {})
    config.update(OFFICIAL_MULTIMODAL_FIELDS)
    config.update(multimodal or {})
    config.update(
        {
            "vocab_size": vocab_size,
            "seg_token_id": seg_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "model_type": "lamed_phi3" if family == "phi3" else "lamed_llama",
            "architectures": ["LamedPhi3ForCausalLM" if family == "phi3" else "LamedLlamaForCausalLM"],
            "auto_map": AUTO_MAP[family],
            "torch_dtype": dtype,
            "transformers_version": "4.44.1",
        }
    )
    return config


def write_random_lamed_checkpoint(
    folder: Path,
    family: str = "phi3",
    *,
    llm: Optional[dict] = None,
    multimodal: Optional[dict] = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    weights_format: str = "safetensors",
    max_shard_bytes: Optional[int] = None,
    sp_vocab_size: int = 1000,
    add_bos_token: bool = True,
    generation_config: Union[None, str, dict] = None,
) -> Path:
    """Write a random M3D-LaMed checkpoint (official layout) to ``folder`` and return it.

    ``llm`` / ``multimodal`` override the official sizes, e.g. :data:`TINY_LLM` and :data:`TINY_MULTIMODAL`.
    ``add_bos_token``: the tokenizer config's flag (Microsoft's current Phi-3 config says false).
    ``generation_config``: None writes no ``generation_config.json``; ``"official"`` writes the base LLM's (Phi-3:
    EOS list ``<|endoftext|>``, ``<|assistant|>``, ``<|end|>``), with this tokenizer's ids; a dict is written as given.
    """
    from .configuration_lamed import parse_lamed_config
    from .modeling_lamed import build_lamed_model

    if family not in OFFICIAL_LLM_FIELDS:
        raise ValueError(f"family must be 'phi3' or 'llama', not {family!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    added = write_tokenizer(folder, family, train_sentencepiece(sp_vocab_size), add_bos_token=add_bos_token)
    vocab_size = max(added.values()) + 1
    eos = added["<|endoftext|>"] if family == "phi3" else 2
    pad = eos if family == "phi3" else 0
    dtype_name = str(dtype).removeprefix("torch.")
    config = official_config(family, llm=llm, multimodal=multimodal, vocab_size=vocab_size,
                             seg_token_id=added[SEG_TOKEN], eos_token_id=eos, pad_token_id=pad, dtype=dtype_name)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if generation_config is not None:
        write_generation_config(folder, family, generation_config, added)

    torch.manual_seed(seed)
    model = build_lamed_model(parse_lamed_config(config))
    _randomize_zero_initialised(model, seed)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_state_dict(state, folder, weights_format=weights_format, max_shard_bytes=max_shard_bytes)
    return folder


def _randomize_zero_initialised(model: torch.nn.Module, seed: int) -> None:
    """Give every tensor that its init left constant (biases, norms, tokens) small random values, so that a test
    which loads the wrong tensor into a slot, or none, sees different outputs."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and tensor.numel() and bool((tensor == tensor.flatten()[0]).all()):
                base = 1.0 if float(tensor.flatten()[0]) == 1.0 else 0.0  # norms keep their scale
                tensor.copy_(base + 0.02 * torch.randn(tensor.shape, generator=generator))


def write_random_clip_checkpoint(folder: Path, *, tiny: bool = True, seed: int = 0,
                                 dtype: torch.dtype = torch.float32) -> Path:
    """Write a random M3D-CLIP checkpoint (official key names) with a BERT WordPiece tokenizer."""
    from .modeling_clip import M3DCLIP, M3DCLIPConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "model_type": "m3d_clip",
        "architectures": ["M3DCLIP"],
        "language_model_name_or_path": "bert-base-uncased",
        "local_loss": False,
        "gather_loss": True,
        "in_channels": 1,
        "img_size": [32, 256, 256],
        "patch_size": [4, 16, 16],
        "hidden_size": 768,
        "mlp_dim": 3072,
        "num_layers": 12,
        "num_heads": 12,
        "pos_embed": "perceptron",
        "dropout_rate": 0,
        "spatial_dims": 3,
        "max_text_len": 128,
        "vocab_size": 30522,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.44.1",
    }
    vocab = _write_wordpiece_vocab(folder)
    if tiny:
        config.update({"img_size": [16, 64, 64], "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2,
                       "vocab_size": len(vocab)})
        config["text_config"] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                 "intermediate_size": 64, "vocab_size": len(vocab), "max_position_embeddings": 128}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = M3DCLIP(M3DCLIPConfig.from_dict(config))
    _randomize_zero_initialised(model, seed)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()
             if k not in M3DCLIP.ignorable_keys}
    save_state_dict(state, folder)
    return folder


def _write_wordpiece_vocab(folder: Path) -> list[str]:
    words = sorted({w.strip(".,?!:;()[]").lower() for w in _CORPUS.split()} - {""})
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list("abcdefghijklmnopqrstuvwxyz0123456789.,?!:;()[]-/%") + words
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
         "unk_token": "[UNK]"}, indent=2))
    return vocab


__all__ = [
    "OFFICIAL_LLM_FIELDS",
    "OFFICIAL_MULTIMODAL_FIELDS",
    "TINY_LLM",
    "TINY_MULTIMODAL",
    "write_random_lamed_checkpoint",
    "write_random_clip_checkpoint",
    "write_tokenizer",
    "write_generation_config",
    "train_sentencepiece",
]
