"""Prompt templates (official wording and spacing) and answer parsers: good, malformed and fuzzed answers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from M3DAssistantLib import prompts
from M3DAssistantLib.errors import InputError

CHOICES = ["Axial", "Coronal", "Sagittal", "Oblique"]


def test_spacing_rules():
    assert prompts.report_prompt() == "Please generate a medical report based on this image."  # no leading space
    assert prompts.question_prompt("  Is there  ascites? ") == " Is there ascites?"
    assert prompts.choice_prompt("Which plane?", CHOICES) == (
        " Which plane? Choices: A. Axial B. Coronal C. Sagittal D. Oblique")
    assert prompts.locate_prompt("liver") == " Where is liver in this image? Please output the box."
    assert prompts.locate_prompt("an organ that filters blood and makes bile.").startswith(" Description: ")
    assert prompts.segment_prompt("liver") == " What is liver in this image? Please respond with segmentation mask."
    assert prompts.segment_expression_prompt("the cyst in the right kidney") == (
        " the cyst in the right kidney. Please answer and segment.")
    text = "Please segment where the cyst is."
    assert prompts.segment_expression_prompt(text) == " " + text
    assert prompts.describe_region_prompt((0.1, 0.2, 0.3, 0.5, 0.6, 0.7)) == (
        " What target is present within the coordinates <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end> ?")


@pytest.mark.parametrize("text", ["", "  ", "\n\t", "a <bx_start> b", "x" * 30_000])
def test_bad_prompts_are_refused(text):
    with pytest.raises(InputError):
        prompts.question_prompt(text)


@pytest.mark.parametrize("answer,expected", [
    ("Coordinates are <bx_start>[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]<bx_end>.", ((0.1, 0.2, 0.3, 0.5, 0.6, 0.7), False)),
    ("The target is liver and the coordinates is [0.094, 0.301, 0.223, 0.75, 0.617, 0.551].",
     ((0.094, 0.301, 0.223, 0.75, 0.617, 0.551), False)),
    ("Sorry, there is no liver.", (None, True)),
])
def test_box_answers(answer, expected):
    parsed = prompts.parse_box_answer(answer)
    assert (parsed.box, parsed.absent, parsed.error) == (*expected, None)


@pytest.mark.parametrize("answer,message", [
    ("Coordinates are [0.1, 0.2, 0.3].", "6 comma-separated numbers"),
    ("Coordinates are [0.5, 0.2, 0.3, 0.1, 0.6, 0.7].", "box"),  # inverted: min > max
    ("Coordinates are [0.1, 0.2, 0.3, 0.5, 1.6, 0.7].", "box"),  # out of [0, 1]
    ("It is somewhere in the abdomen.", "contains no box"),
])
def test_malformed_box_answers_give_errors_not_boxes(answer, message):
    parsed = prompts.parse_box_answer(answer)
    assert parsed.box is None and not parsed.absent and message in parsed.error


@pytest.mark.parametrize("answer,letter", [("C. Sagittal", "C"), ("The answer is B. Coronal", "B"),
                                           ("sagittal", "C"), ("A.", "A")])
def test_choice_answers(answer, letter):
    parsed = prompts.parse_choice_answer(answer, CHOICES)
    assert parsed.letter == letter and parsed.choice == CHOICES["ABCD".index(letter)]


@pytest.mark.parametrize("answer", ["I am not sure", "Axial or coronal", "E. Other"])
def test_unclear_choice_answers(answer):
    parsed = prompts.parse_choice_answer(answer, CHOICES)
    assert parsed.letter is None and parsed.error


@pytest.mark.parametrize("choices,message", [([], "between 2 and 8"), (["Liver"], "between 2 and 8"),
                                             (["Liver", "liver "], "duplicates"), ("ABCD", "list of option")])
def test_bad_choices(choices, message):
    with pytest.raises(InputError, match=message):
        prompts.validate_choices(choices)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parsers_never_raise_on_any_text(text):
    box = prompts.parse_box_answer(text)
    assert box.box is None or len(box.box) == 6
    assert (box.box is not None) + box.absent + (box.error is not None) == 1
    choice = prompts.parse_choice_answer(text, CHOICES)
    assert (choice.letter is None) == (choice.error is not None)
    seg = prompts.parse_segmentation_answer(text)
    assert seg.has_seg + seg.absent + (seg.error is not None) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=0.999, allow_nan=False), min_size=6, max_size=6))
def test_box_text_round_trips(values):
    lo, hi = [min(values[i], values[i + 3]) for i in range(3)], [max(values[i], values[i + 3]) for i in range(3)]
    box = tuple(round(v, 3) for v in lo + hi)
    prompt = prompts.describe_region_prompt(box)
    parsed = prompts.parse_box_answer(prompt)
    assert parsed.box == tuple(v + 0.0 for v in box)
