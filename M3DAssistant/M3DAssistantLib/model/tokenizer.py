"""The checkpoint's tokenizer, the M3D special tokens, and prompt encoding.

M3D added four tokens to the base LLM tokenizer, in this order, at the end of its vocabulary: ``<im_patch>``,
``<bx_start>``, ``<bx_end>`` (special: dropped by ``skip_special_tokens``) and ``[SEG]`` (a *normal* added token, so it
survives decoding). Prompts have no chat template: the token ids are exactly what the checkpoint's tokenizer makes
of ``"<im_patch>" * N + question`` -- a BOS in front only if that tokenizer adds one by itself (``add_bos_token``),
as in every official inference, training and benchmark script. The model then overwrites positions ``1..N`` with
the image features *by position*: after a BOS those are the image tokens; without one, position 0 keeps the first
``<im_patch>`` and the last image feature lands on the first question token, which the released weights were
trained with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import InputError, TokenizerError

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<im_patch>"
BOX_START = "<bx_start>"
BOX_END = "<bx_end>"
SEG_TOKEN = "[SEG]"
M3D_TOKENS = (IMAGE_TOKEN, BOX_START, BOX_END, SEG_TOKEN)
MAX_SEQUENCE_LENGTH = 512  # the released models were trained with 512-token sequences

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Token ids M3D needs, read from (and verified against) the checkpoint's tokenizer and config."""

    image: int
    box_start: int
    box_end: int
    seg: int
    bos: int
    eos: int
    pad: int
    adds_bos: bool  # whether the tokenizer prepends BOS by itself


def load_tokenizer(folder: Path, seg_token_id: int | None, vocab_size: int):
    """Load the tokenizer of a checkpoint folder (no remote code) and verify the M3D tokens.

    Returns ``(tokenizer, SpecialTokens)``. Raises TokenizerError naming the folder and what is wrong.
    """
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{folder}: no tokenizer files (expected tokenizer.model or tokenizer.json beside config.json). "
            "Download the complete checkpoint, including its tokenizer files."
        )
    tokenizer_class = tokenizer_class_for(folder)
    options: dict[str, Any] = {}
    if saved_add_bos_token(folder) is None:
        # The slow LlamaTokenizer of training defaulted to add_bos_token=True; transformers 5 defaults to False.
        options["add_bos_token"] = True
    try:
        tokenizer = tokenizer_class.from_pretrained(
            str(folder), model_max_length=MAX_SEQUENCE_LENGTH, padding_side="right", **options
        )
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise TokenizerError(f"{folder}: the tokenizer cannot be loaded ({type(e).__name__}: {e}).") from e

    _warn_if_legacy_spacing(folder)
    vocab = tokenizer.get_vocab()
    missing = [t for t in M3D_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(
            f"{folder}: the tokenizer lacks the M3D token(s) {', '.join(missing)}; this is a base-LLM tokenizer, not "
            "an M3D-LaMed one. Use the tokenizer files shipped with the M3D checkpoint."
        )
    ids = {t: vocab[t] for t in M3D_TOKENS}
    if seg_token_id is not None and ids[SEG_TOKEN] != seg_token_id:
        raise TokenizerError(
            f"{folder}: config.json says seg_token_id={seg_token_id} but the tokenizer maps [SEG] to "
            f"{ids[SEG_TOKEN]}; the tokenizer and the weights come from different checkpoints."
        )
    if len(tokenizer) > vocab_size:
        raise TokenizerError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size} rows."
        )
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise TokenizerError(f"{folder}: the tokenizer defines no BOS or EOS token.")
    if tokenizer.pad_token is None:
        # As the official training code: pad with <unk> (Llama-2); Phi-3 already pads with <|endoftext|>.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    probe = tokenizer("a").input_ids
    adds_bos = bool(probe) and probe[0] == tokenizer.bos_token_id
    if not adds_bos:
        # Not an error: the official code tokenises the same way, so the released weights learned exactly this.
        logger.info(
            "%s: the tokenizer adds no BOS (add_bos_token false); prompts start with the first <im_patch> and the "
            "image features overwrite positions 1..N, the first question token included, as in the official code.",
            folder,
        )
    special = SpecialTokens(
        image=ids[IMAGE_TOKEN],
        box_start=ids[BOX_START],
        box_end=ids[BOX_END],
        seg=ids[SEG_TOKEN],
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        adds_bos=adds_bos,
    )
    tokenizer.m3d_special_tokens = special
    return tokenizer, special


def saved_add_bos_token(folder: Path) -> Optional[bool]:
    """``add_bos_token`` as saved in the folder's ``tokenizer_config.json``; None when the file or key is absent."""
    config_path = Path(folder) / "tokenizer_config.json"
    try:
        value = json.loads(config_path.read_text(encoding="utf-8")).get("add_bos_token")
    except (OSError, ValueError):
        return None
    return None if value is None else bool(value)


def tokenizer_class_for(folder: Path, default: str = "LlamaTokenizer"):
    """The transformers tokenizer class named in ``tokenizer_config.json`` (default: Llama's).

    Resolved by name so that transformers never reads config.json: the published configs carry an ``auto_map`` to
    remote code, which we never run.
    """
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    name = default
    config_path = Path(folder) / "tokenizer_config.json"
    if config_path.is_file():
        try:
            name = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class") or name
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{config_path}: not valid JSON ({e}); re-download the tokenizer files.") from e
    cls = tokenizer_class_from_name(name) or tokenizer_class_from_name(name.removesuffix("Fast"))
    if cls is None:
        raise TokenizerError(
            f"{config_path}: tokenizer_class {name!r} is not a transformers tokenizer (remote-code tokenizers are not "
            "run); M3D-LaMed checkpoints use LlamaTokenizer."
        )
    return cls


def _warn_if_legacy_spacing(folder: Path) -> None:
    """transformers 5 builds SentencePiece tokenizers as fast tokenizers; with ``legacy: true`` in the saved config
    the old slow tokenizer put an extra "▁" before text that starts with a space after a special token, which the fast
    one does not reproduce. The released M3D tokenizers come from Phi-3 / Llama-2-chat configs saved with
    ``legacy: false``; warn for anything else rather than tokenise silently differently from training."""
    config_path = folder / "tokenizer_config.json"
    if (folder / "tokenizer.json").is_file() or not config_path.is_file():
        return
    try:
        legacy = json.loads(config_path.read_text(encoding="utf-8")).get("legacy", True)
    except (OSError, ValueError):
        return
    if legacy is not False:
        logger.warning(
            "%s: tokenizer saved with legacy SentencePiece spacing (legacy=%s); transformers >= 5 tokenises a space "
            "after <im_patch> as one piece where training saw two. Answers may differ slightly from the official "
            "code; prompts without a leading space are unaffected.", folder, legacy
        )


def describe_bos(add_bos_token: bool) -> str:
    """What a tokenizer's ``add_bos_token`` means for M3D's prompts, in one sentence (``m3d inspect``)."""
    if add_bos_token:
        return ("prompts are BOS + <im_patch> x N + question; the image features replace positions 1..N, the image "
                "tokens")
    return ("prompts are <im_patch> x N + question, no BOS (as the official code tokenises them); the image features "
            "replace positions 1..N, so the first question token is overwritten, as in training")


def image_prefix(num_image_tokens: int) -> str:
    return IMAGE_TOKEN * num_image_tokens


def encode_prompt(
    tokenizer: Any, question: str, num_image_tokens: int, max_length: int = MAX_SEQUENCE_LENGTH,
    what: str = "the prompt",
) -> list[int]:
    """Token ids of ``"<im_patch>" * N + question``: exactly ``tokenizer(image_prefix(N) + question).input_ids``.

    This is the official call (README Quickstart, ``LaMed/src/dataset/multi_dataset.py``, ``Bench/eval/*.py``):
    BOS only where the tokenizer adds one itself, nothing added on top. The splice in
    :meth:`~M3DAssistantLib.model.modeling_lamed.LamedMixin.splice_image_features` then replaces positions
    ``1..N`` whatever they hold, so for a tokenizer without BOS the first question token is overwritten -- which
    is what the released weights saw in training. ``question`` is used as given (the official templates decide
    spacing, see :mod:`M3DAssistantLib.prompts`).

    Raises InputError when the text holds M3D control tokens or any other control token of the tokenizer (checked on
    the ids, so no spelling gets past it; :func:`control_token_ids`), when there is nothing for the splice to
    overwrite after the image tokens, or when the prompt does not fit in ``max_length`` tokens.
    """
    special: SpecialTokens = tokenizer.m3d_special_tokens
    ids = list(tokenizer(image_prefix(num_image_tokens) + question).input_ids)
    start = 1 if special.adds_bos else 0
    expected = ([special.bos] if special.adds_bos else []) + [special.image] * num_image_tokens
    if ids[: start + num_image_tokens] != expected or special.image in ids[start + num_image_tokens:]:
        raise InputError(
            "the prompt must be the image tokens followed by text; the text must not contain M3D control tokens "
            f"({', '.join(M3D_TOKENS)})."
        )
    control = control_token_ids(tokenizer)
    found = list(dict.fromkeys(i for i in ids[start + num_image_tokens:] if i in control))
    if found:
        raise InputError(control_token_message(tokenizer.convert_ids_to_tokens(found), what))
    if len(ids) < num_image_tokens + 1:
        raise InputError("the prompt has no text after the image tokens; ask a question or name a target.")
    if len(ids) > max_length:
        raise InputError(
            f"the prompt is {len(ids)} tokens long ({num_image_tokens} of them image tokens) but the model was "
            f"trained on at most {max_length}; shorten the question or drop earlier turns."
        )
    return ids


def control_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids the base model reads as instructions, not text: every special and added token of the tokenizer (``<s>``,
    ``</s>``, ``<unk>``, Phi-3's ``<|endoftext|>``, ``<|user|>``, ``<|end|>``, ``<|assistant|>``, ...) except the four
    M3D tokens, which only our prompt and answer templates place (user text with those is refused by
    :mod:`M3DAssistantLib.prompts`)."""
    vocab = tokenizer.get_added_vocab()
    ids = set(vocab.values()) | set(tokenizer.all_special_ids)
    return frozenset(ids - {vocab[t] for t in M3D_TOKENS if t in vocab})


def control_token_names(tokenizer: Any) -> list[str]:
    """How the control tokens (:func:`control_token_ids`) are spelled in text (``</s>``, ``<|end|>``, ...)."""
    return _names(tokenizer, control_token_ids(tokenizer))


def find_control_tokens(tokenizer: Any, text: str) -> list[str]:
    """The control tokens (see :func:`control_token_ids`) that ``text`` spells out, in order of appearance."""
    return _spelled_out(control_token_names(tokenizer), text)


def _names(tokenizer: Any, ids: frozenset[int]) -> list[str]:
    return [t for t in tokenizer.convert_ids_to_tokens(sorted(ids)) if t]


def _spelled_out(names: Sequence[str], text: str) -> list[str]:
    return sorted((t for t in set(names) if t in text), key=text.index)


def control_token_message(tokens: Sequence[str], what: str) -> str:
    """The one refusal of control tokens in user text (prompts, history, choices, training text)."""
    shown = ", ".join(repr(t) for t in tokens)
    return (f"{what} contains {shown}, {'a control token' if len(tokens) == 1 else 'control tokens'} of this model's "
            f"tokenizer: the model would read {'it' if len(tokens) == 1 else 'them'} as an instruction (end of text, "
            f"a chat turn), not as text. Remove {'it' if len(tokens) == 1 else 'them'} or rephrase.")


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of generated ids as the official code decodes it (special tokens dropped, [SEG] kept), and without the
    base tokenizer's other control tokens (:func:`control_token_ids`, e.g. Phi-3's ``<|placeholder6|>``, which
    ``skip_special_tokens`` keeps as text): an answer is fed back as history in a follow-up question, where a control
    token is refused; the model emitting one is noise, not text of the answer. A control token spelled out by
    ordinary tokens is removed from the text for the same reason."""
    control = control_token_ids(tokenizer)
    text = tokenizer.decode([i for i in ids if i not in control], skip_special_tokens=True)
    # ordinary tokens may also spell one out ("<|" "end" "|>"), which would become the control token when re-read
    for name in _spelled_out(_names(tokenizer, control), text):
        text = text.replace(name, "")
    return text
