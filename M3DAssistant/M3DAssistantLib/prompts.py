"""Prompts for the eight tasks, in the wording and spacing the released models were trained on, and answer parsers.

Every question is a template the released models were trained with (``LaMed/src/dataset/prompt_templates.py``:
caption line 17, REC lines 53 and 71, REG line 211, segmentation lines 341 and 367). Spacing as the official
datasets (``multi_dataset.py``): the caption prompt follows the image tokens directly; every other task puts one
space between the image tokens and the question. No chat template.

Parsers never raise on a malformed answer: they return what they found and a ``parse_error`` naming the problem, so
the caller can show the raw text (never a made-up box or choice).
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Optional, Sequence

from .errors import GeometryError, InputError
from .geometry import Box, format_box, parse_box

MAX_PROMPT_CHARS = 20_000  # far beyond 512 tokens; rejects pasted documents before tokenising them
CHOICE_LETTERS = string.ascii_uppercase[:8]

REPORT_PROMPT = "Please generate a medical report based on this image."


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise InputError(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid UTF-8 text (undecodable bytes); retype it or save the file as "
                         "UTF-8.") from None
    cleaned = " ".join(text.split())
    if not cleaned:
        raise InputError(f"{what} is empty; type a question or a target name.")
    if len(cleaned) > MAX_PROMPT_CHARS:
        raise InputError(
            f"{what} is {len(cleaned)} characters long; the model reads at most 512 tokens in all. Shorten it."
        )
    if any(marker in cleaned for marker in ("<im_patch>", "<bx_start>", "<bx_end>", "[SEG]")):
        raise InputError(f"{what} must not contain the model's control tokens (<im_patch>, <bx_start>, <bx_end>, "
                         "[SEG]).")
    return cleaned


def report_prompt() -> str:
    """Report generation (M3D-Cap): no space after the image tokens."""
    return REPORT_PROMPT


def question_prompt(question: str) -> str:
    """Open VQA: one space, then the question as asked."""
    return " " + _clean(question, "the question")


def conversation_prompt(turns: Sequence[tuple[str, str]], question: str) -> str:
    """Multi-turn open VQA (experimental: the model was trained on single turns): earlier questions and answers
    follow each other with single spaces, as in the training sequences ``question + ' ' + answer``."""
    parts = []
    for q, a in turns:
        parts += [_clean(q, "an earlier question"), _clean(a, "an earlier answer")]
    parts.append(_clean(question, "the question"))
    return " " + " ".join(parts)


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """Closed VQA: ``' Question Choices: A. a B. b C. c D. d'`` (the released models saw four choices)."""
    question = _clean(question, "the question")
    choices = validate_choices(choices)
    options = " ".join(f"{letter}. {choice}" for letter, choice in zip(CHOICE_LETTERS, choices))
    return f" {question} Choices: {options}"


def validate_choices(choices: Sequence[str]) -> list[str]:
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise InputError("choices must be a list of option texts, e.g. ['Axial', 'Coronal', 'Sagittal', 'Oblique'].")
    cleaned = [_clean(c, f"choice {i + 1}") for i, c in enumerate(choices)]
    if not 2 <= len(cleaned) <= len(CHOICE_LETTERS):
        raise InputError(f"give between 2 and {len(CHOICE_LETTERS)} choices (the model was trained with 4), "
                         f"got {len(cleaned)}.")
    lowered = [c.lower() for c in cleaned]
    duplicates = sorted({c for c in cleaned if lowered.count(c.lower()) > 1})
    if duplicates:
        raise InputError(f"the choices contain duplicates: {', '.join(duplicates)}; each option must differ.")
    return cleaned


def locate_prompt(target: str) -> str:
    """Referring-expression comprehension: a target name, or a longer description of it."""
    target = _clean(target, "the target")
    if _is_description(target):
        return f" Description: {target} Please answer and find it by box based on the above description."
    return f" Where is {target} in this image? Please output the box."


def describe_region_prompt(box: Box) -> str:
    """Referring-expression generation for a box in official model coordinates."""
    return f" What target is present within the coordinates <bx_start>{format_box(box)}<bx_end> ?"


def segment_prompt(target: str) -> str:
    """Semantic segmentation of a named structure, in the wording of a training template (``Seg_templates``
    ``cls_questions``, ``LaMed/src/dataset/prompt_templates.py:341``), not the README's "Please output the
    segmentation mask." which no training sample used."""
    target = _clean(target, "the target")
    return f" What is {target} in this image? Please respond with segmentation mask."


def segment_expression_prompt(expression: str) -> str:
    """Referring-expression segmentation: a description (or a free-form request) followed by the official ask."""
    expression = _clean(expression, "the description")
    if re.search(r"\bsegment", expression, re.IGNORECASE):
        return " " + expression  # already a request, as in M3D-RefSeg ("Please segment where ...")
    if expression[-1] not in ".?!":
        expression += "."
    return f" {expression} Please answer and segment."


def _is_description(text: str) -> bool:
    return len(text.split()) > 4 or text.endswith(".")


# ---------------------------------------------------------------------------------------------------- parsers
_ABSENT = re.compile(r"\b(?:there is no|there are no|no such|cannot find|can't find|not present|absent)\b", re.I)


@dataclasses.dataclass(frozen=True)
class ParsedBox:
    box: Optional[Box]
    absent: bool
    error: Optional[str]


def parse_box_answer(text: str) -> ParsedBox:
    """A REC answer -> box, or absent ("Sorry, there is no liver."), or an error naming what is wrong."""
    if "[" in text:
        try:
            return ParsedBox(parse_box(text), False, None)
        except GeometryError as e:
            return ParsedBox(None, False, str(e))
    if _ABSENT.search(text):
        return ParsedBox(None, True, None)
    return ParsedBox(None, False, "the answer contains no box ([d1, h1, w1, d2, h2, w2])")


@dataclasses.dataclass(frozen=True)
class ParsedChoice:
    letter: Optional[str]
    choice: Optional[str]
    error: Optional[str]


def parse_choice_answer(text: str, choices: Sequence[str]) -> ParsedChoice:
    """A closed-VQA answer ("C. Liver") -> the chosen option.

    The official benchmark counts an answer as choosing X when ``"X."`` appears in it; we take the first such letter
    among the offered ones, else an option whose text appears in the answer when exactly one does.
    """
    letters = CHOICE_LETTERS[: len(choices)]
    match = re.search(rf"(?<![A-Za-z])([{letters}])\.", text)
    if match:
        letter = match.group(1)
        return ParsedChoice(letter, choices[letters.index(letter)], None)
    lowered = text.lower()
    named = [i for i, c in enumerate(choices) if c.lower() in lowered]
    if len(named) == 1:
        return ParsedChoice(letters[named[0]], choices[named[0]], None)
    why = "names several options" if named else "names none of the options"
    return ParsedChoice(None, None, f"the answer {why} (expected e.g. 'C. {choices[min(2, len(choices) - 1)]}')")


@dataclasses.dataclass(frozen=True)
class ParsedSegmentation:
    has_seg: bool
    absent: bool
    error: Optional[str]


def parse_segmentation_answer(text: str, seg_token: str = "[SEG]") -> ParsedSegmentation:
    if seg_token in text:
        return ParsedSegmentation(True, False, None)
    if _ABSENT.search(text):
        return ParsedSegmentation(False, True, None)
    return ParsedSegmentation(False, False, "the answer has no [SEG] token, so there is no mask")
