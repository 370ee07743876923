"""The task table."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One of the eight tasks as the panel and the console API see it."""

    key: str  # the Logic's method name (console API)
    label: str  # button text
    session_method: str  # AssistantSession method
    prompt: Optional[str] = None  # what the prompt box must hold (None: no prompt)
    needs_describe_roi: bool = False
    needs_choices: bool = False


TASKS: dict[str, TaskSpec] = {spec.key: spec for spec in (
    TaskSpec("report", "Report", "report"),
    TaskSpec("ask", "Ask", "ask", prompt="a question"),
    TaskSpec("choose", "Multiple choice", "choose", prompt="a question", needs_choices=True),
    TaskSpec("locate", "Locate", "locate", prompt="what to find (e.g. liver)"),
    TaskSpec("describeRegion", "Describe ROI", "describe_region", needs_describe_roi=True),
    TaskSpec("segment", "Segment", "segment", prompt="a structure (e.g. liver)"),
    TaskSpec("segmentExpression", "Segment by description", "segment_expression",
             prompt="a description (e.g. the lesion in the right lobe)"),
    TaskSpec("findSimilar", "Find similar", "find_similar", prompt="a text to rank the loaded volumes by"),
)}

__all__ = ["TaskSpec", "TASKS"]
