"""Forcing the start of a tiny random model's answer, so tests reach the box / [SEG] / "absent" paths.

Random weights never say "[SEG]" or a box by themselves; these helpers make the model begin its answer with a chosen
text (then EOS), through transformers' own logits-processor hook, without touching the code under test.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


class ForceTokens:
    """Logits processor that forces ``tokens`` one per decoding step, then leaves the scores alone."""

    def __init__(self, tokens):
        self.tokens, self.step = list(tokens), 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.step < len(self.tokens):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.tokens[self.step]] = 0
            scores = forced
        self.step += 1
        return scores


def force_answer(engine, text: str) -> Callable[[], None]:
    """Make ``engine``'s model start every answer with ``text`` then EOS; returns a function that undoes it."""
    from transformers import LogitsProcessorList

    tokens = engine.tokenizer(text, add_special_tokens=False).input_ids + [engine.tokenizer.eos_token_id]
    original = engine.model.generate

    def generate(*args, **kwargs):
        return original(*args, logits_processor=LogitsProcessorList([ForceTokens(tokens)]), **kwargs)

    engine.model.generate = generate
    return lambda: engine.model.__dict__.pop("generate", None)


@contextlib.contextmanager
def forced_answer(engine, text: str) -> Iterator[None]:
    """``with forced_answer(engine, " It is [SEG]."):`` — :func:`force_answer` for the duration of the block."""
    restore = force_answer(engine, text)
    try:
        yield
    finally:
        restore()
