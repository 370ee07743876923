"""A ninth task the registry does not have, declared as a new entry would be (test_task_registry.py: what adding one
takes)."""

from __future__ import annotations

from M3DAssistantLib import prompts, tasks
from M3DAssistantLib.tasks import ArgumentKind, Output, ResultKind

NINTH = tasks.Task(
    "count_lesions", "Count lesions", "count", ResultKind.TEXT, Output.ANSWER, "m3d-seg-v1", "percentile",
    summary="Count the lesions of a structure", help="count the lesions of a structure",
    arguments=(tasks.Argument("target", ArgumentKind.TEXT),), prompt_hint="a structure (e.g. liver)",
    build_prompt=lambda target: f" How many lesions are in the {prompts._clean(target, 'the target')}?")
