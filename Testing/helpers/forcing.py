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


# The worker process (m3d serve) of the Slicer module, forced: the panel tests point the module's "Worker Python"
# setting at this launcher. It runs the real worker (`python -m M3DAssistantLib.serving ...`) in the real Python, with
# every engine's model starting its answers with the text of ANSWERS_FILE when that file is not empty (read at each
# answer, so a test changes it between tasks); anything else (`-c ...` checks) runs the real Python unchanged.
WORKER_LAUNCHER = """\
#!{python}
import os, runpy, sys
arguments = sys.argv[1:]
if arguments[:1] == ["-u"]:
    arguments = arguments[1:]
if arguments[:2] != ["-m", "M3DAssistantLib.serving"]:
    os.execv({python!r}, [{python!r}] + sys.argv[1:])
sys.path.insert(0, {testing!r})
import forcing
forcing.force_engines_from_file({answers!r})
sys.argv = ["M3DAssistantLib.serving"] + arguments[2:]
runpy.run_module("M3DAssistantLib.serving", run_name="__main__", alter_sys=True)
"""


def force_engines_from_file(answers_file: str) -> None:
    """Every InferenceEngine made from now on starts its answers with the text in ``answers_file`` (if any)."""
    from pathlib import Path

    from M3DAssistantLib.engine import InferenceEngine

    original_init = InferenceEngine.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        generate = self.model.generate

        def forced_generate(*g_args, **g_kwargs):
            path = Path(answers_file)
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
            if not text:
                return generate(*g_args, **g_kwargs)
            from transformers import LogitsProcessorList

            tokens = self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
            return generate(*g_args, logits_processor=LogitsProcessorList([ForceTokens(tokens)]), **g_kwargs)

        self.model.generate = forced_generate

    InferenceEngine.__init__ = __init__


def write_worker_launcher(folder, answers_file) -> str:
    """An executable "Python" for the module's Worker Python setting that runs the worker with forced answers."""
    import stat
    import sys
    from pathlib import Path

    path = Path(folder) / "forcing-python"
    path.write_text(WORKER_LAUNCHER.format(python=sys.executable, testing=str(Path(__file__).resolve().parent),
                                           answers=str(answers_file)), encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)
