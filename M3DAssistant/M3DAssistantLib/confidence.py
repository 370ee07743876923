"""How sure the model was: token probabilities, multiple-choice option probabilities and mask confidence.

Nothing here calls the model. The numbers come from what the answer's own computation already produced:

* **tokens**: the raw scores (logits) of every decoding step (transformers' ``output_logits``), softmaxed over the
  whole vocabulary; a token's probability is the model's probability of the token it actually wrote. The raw scores
  come before temperature and top-p, so the number is the same for a greedy and a sampled answer.
* **multiple choice**: the scores of the FIRST decoding step -- the forward pass at the answer position, where the
  model trained on ``"{letter}. {text}"`` answers writes the option letter -- read at each offered letter's token
  and normalised over the offered letters (:func:`choice_probabilities`).
* **masks**: the SegVol logits, resampled once onto the volume's voxel grid by the same resampling as the mask
  (:func:`~.geometry.map_model_values`), so the mask and its statistics come from one pass
  (:func:`mask_with_confidence`).

``docs/analysis.md`` says what these numbers mean and what they do not (they are the model's own belief, not a
calibrated probability of being right).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from .geometry import VolumeToModelMapping, map_model_values, new_volume_array
from .results import UNCERTAIN_BAND, Confidence, MaskConfidence, TokenProbability


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each generated token adds to the decoded answer (special tokens add nothing), so that the pieces
    join to ``decode(ids)`` exactly. A token's piece ends where the decoding of the answer up to it stops agreeing
    with the whole answer's: a token that ends inside a multi-byte character adds nothing, and the token that
    completes the character carries it."""
    import os

    from .model.tokenizer import decode

    ids = list(ids)
    full = decode(tokenizer, ids)
    pieces: list[str] = []
    done = 0
    for n in range(1, len(ids) + 1):
        agreed = len(os.path.commonprefix([decode(tokenizer, ids[:n]), full])) if n < len(ids) else len(full)
        end = max(done, agreed)
        pieces.append(full[done:end])
        done = end
    return pieces


def token_confidence(logits: Any, ids: Sequence[int], tokenizer: Any) -> Confidence:
    """Probabilities of the generated tokens ``ids`` from the raw logits of their decoding steps ``[T, vocab]``
    (step t scored token t); ``mean_logprob`` over all of them (the end-of-answer token included)."""
    import torch

    ids = list(ids)
    steps = min(len(ids), int(logits.shape[0]))
    if steps == 0:
        return Confidence([], None)
    logprobs = torch.log_softmax(logits[:steps].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(ids[:steps], device=logprobs.device)[:, None])[:, 0].cpu().numpy()
    pieces = token_pieces(tokenizer, ids[:steps])
    tokens = [TokenProbability(int(i), piece, float(math.exp(lp))) for i, piece, lp in zip(ids, pieces, chosen)]
    return Confidence(tokens, float(np.mean(chosen)))


def choice_letter_ids(tokenizer: Any, prompt: str, letters: Sequence[str], num_image_tokens: int) -> list[int]:
    """The token that starts each answer ``"{letter}. ..."`` right after ``prompt``: trained sequences are
    ``prompt + " " + answer`` tokenised as one text, so the letter's token is the first one after the prompt's
    tokens in ``tokenizer(image tokens + prompt + " " + letter + ".")``. ValueError when the prompt's tokens are
    not a prefix of that, or two letters share their first token (the letters cannot then be told apart)."""
    from .model.tokenizer import image_prefix

    text = image_prefix(num_image_tokens) + prompt
    base = list(tokenizer(text).input_ids)
    ids = []
    for letter in letters:
        full = list(tokenizer(f"{text} {letter}.").input_ids)
        if full[: len(base)] != base or len(full) <= len(base):
            raise ValueError(f"the tokenizer does not keep the prompt's tokens before the answer {letter!r}")
        token = full[len(base)]
        if not tokenizer.decode([token]).strip().startswith(letter):
            raise ValueError(f"the first answer token {tokenizer.decode([token])!r} is not the letter {letter!r}")
        ids.append(int(token))
    if len(set(ids)) != len(ids):
        raise ValueError("two option letters share their first token")
    return ids


def choice_probabilities(first_logits: Any, letter_ids: Sequence[int], letters: Sequence[str]
                         ) -> tuple[dict[str, float], float]:
    """``({letter: probability normalised over the offered letters}, probability of all offered letters under the
    full distribution)`` from the raw logits of the answer position."""
    import torch

    logits = first_logits.float().reshape(-1)
    index = torch.tensor(list(letter_ids), device=logits.device)
    mass = float(torch.softmax(logits, dim=-1)[index].sum())
    normalised = torch.softmax(logits[index], dim=-1).cpu().numpy()
    return {letter: float(p) for letter, p in zip(letters, normalised)}, mass


def add_choice_probabilities(confidence: Confidence, first_logits: Any, tokenizer: Any, prompt: str,
                             letters: Sequence[str], num_image_tokens: int) -> None:
    """Fill ``confidence.choices`` and ``choice_mass`` from the answer position's logits, or say in its notes why
    the letters cannot be read (a tokenizer that merges them)."""
    try:
        ids = choice_letter_ids(tokenizer, prompt, letters, num_image_tokens)
    except ValueError as e:
        confidence.notes.append(f"no option probabilities: {e}")
        return
    confidence.choices, confidence.choice_mass = choice_probabilities(first_logits, ids, letters)


def mask_with_confidence(logits_dhw: Any, mapping: VolumeToModelMapping, *, threshold: float = 0.5,
                         band: tuple[float, float] = UNCERTAIN_BAND) -> tuple[np.ndarray, MaskConfidence]:
    """The mask of :func:`~.geometry.logits_to_mask` (identical voxels) and its :class:`MaskConfidence`, from one
    resampling of the logits onto the volume's grid."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold is a probability in (0, 1), got {threshold}")
    t = math.log(threshold / (1.0 - threshold))
    low, high = (math.log(b / (1.0 - b)) for b in band)
    out = new_volume_array(mapping, np.uint8, "a mask")
    sums = {"inside": 0, "probability": 0.0, "uncertain": 0, "candidate": 0}

    def consume(index: tuple[slice, slice, slice], part: np.ndarray) -> None:
        inside = part > t
        out[index] = inside
        count = int(np.count_nonzero(inside))
        if count:
            sums["inside"] += count
            sums["probability"] += float(np.sum(1.0 / (1.0 + np.exp(-part[inside].astype(np.float64)))))
        candidate = part > low
        sums["candidate"] += int(np.count_nonzero(candidate))
        sums["uncertain"] += int(np.count_nonzero(candidate & (part < high)))

    map_model_values(logits_dhw, mapping, consume)
    inside, candidate = sums["inside"], sums["candidate"]
    return out, MaskConfidence(
        mean_probability=round(sums["probability"] / inside, 6) if inside else None,
        uncertain_fraction=round(sums["uncertain"] / candidate, 6) if candidate else None,
        uncertain_voxels=int(sums["uncertain"]), candidate_voxels=int(candidate), band=tuple(band))  # type: ignore


def merge(first: Optional[Confidence], **parts: Any) -> Confidence:
    """``first`` (or a new Confidence) with the given fields set."""
    confidence = first if first is not None else Confidence()
    for name, value in parts.items():
        setattr(confidence, name, value)
    return confidence


__all__ = ["token_pieces", "token_confidence", "choice_letter_ids", "choice_probabilities", "add_choice_probabilities",
           "mask_with_confidence", "merge"]
