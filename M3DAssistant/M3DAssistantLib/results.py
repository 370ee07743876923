"""Typed results of the eight tasks, with provenance. Light: numpy and the standard library only.

Every result carries the raw model text (or scores), the parsed and geometry-mapped value, a parse error instead of
an exception when the answer is malformed, and a :class:`Provenance` with the label "AI-generated, not for clinical
use". ``to_dict()`` gives JSON-safe content (masks are summarised, not inlined) for the CLI, the server and the
attributes of the nodes Slicer creates.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any, Optional

import numpy as np

from . import AI_LABEL, __version__

MAX_NEW_TOKENS = 1024
"""The longest answer anyone may ask for: the CLI's --max-new-tokens and the server's default limit. The model was
trained on 512-token sequences (256 of them image tokens), so answers near this length are already far outside what
it saw; the cap stops a typo (100000) from generating for minutes."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class SamplingOptions:
    """How tokens are chosen. Greedy by default (as the official benchmark scripts)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0  # >0 suppresses EOS until then (fixed-length benchmarks)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    seed: Optional[int] = None

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens), "do_sample": bool(self.do_sample)}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = int(self.min_new_tokens)
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p))
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Provenance:
    """Where a result comes from: enough to reproduce it and to label it."""

    task: str
    model: str
    model_revision: Optional[str]
    dtype: str
    device: str
    prompt: str
    convention: Optional[str] = None  # geometry mapping convention/version used for the volume
    intensity: Optional[str] = None
    sampling: dict = dataclasses.field(default_factory=dict)
    seed: Optional[int] = None
    time: str = dataclasses.field(default_factory=utc_now)
    duration_s: Optional[float] = None
    software: str = f"m3d-slicer {__version__}"
    notes: list = dataclasses.field(default_factory=list)  # e.g. earlier turns dropped to fit the context
    label: str = AI_LABEL

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def as_node_attributes(self, prefix: str = "M3D.") -> dict[str, str]:
        """Flat string attributes for MRML nodes (``node.SetAttribute(key, value)``): strings as they are, other
        values as JSON (``{"max_new_tokens": 256, ...}``, ``[]``, ``12.5``), None as ``""``."""
        out = {}
        for key, value in self.to_dict().items():
            out[prefix + key] = value if isinstance(value, str) else json.dumps(value, default=str) \
                if value is not None else ""
        return out


@dataclasses.dataclass
class TextResult:
    """Report generation, open VQA and referring-expression generation."""

    text: str
    provenance: Provenance

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.provenance.task, "text": self.text, "provenance": self.provenance.to_dict()}


@dataclasses.dataclass
class ChoiceResult:
    """Closed VQA: the letter and text of the chosen option, or a parse error with the raw text."""

    text: str
    choices: list[str]
    letter: Optional[str]
    choice: Optional[str]
    provenance: Provenance
    parse_error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.provenance.task, "text": self.text, "choices": self.choices, "letter": self.letter,
                "choice": self.choice, "parse_error": self.parse_error, "provenance": self.provenance.to_dict()}


@dataclasses.dataclass
class BoxResult:
    """Referring-expression comprehension: the box in official model coordinates and as an RAS ROI.

    ``absent`` is True when the model says the target is not in the image; ``box``/``roi`` are then None, as they are
    when the answer cannot be parsed (``parse_error`` says why). Never a made-up box.
    """

    text: str
    target: str
    box: Optional[tuple[float, ...]]
    roi: Any  # geometry.RasRoi or None
    provenance: Provenance
    absent: bool = False
    parse_error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        roi = None
        if self.roi is not None:
            roi = {"center": [float(v) for v in self.roi.center], "size": [float(v) for v in self.roi.size],
                   "axes": np.asarray(self.roi.axes, dtype=float).tolist()}
        return {"task": self.provenance.task, "text": self.text, "target": self.target,
                "box": list(self.box) if self.box is not None else None, "roi_ras": roi, "absent": self.absent,
                "parse_error": self.parse_error, "provenance": self.provenance.to_dict()}


@dataclasses.dataclass
class SegmentationResult:
    """Semantic or referring-expression segmentation: a binary mask on the original volume grid (K, J, I order)."""

    text: str
    target: str
    mask: Optional[np.ndarray]  # uint8 KJI, same shape as the input volume; None when no [SEG] / absent
    provenance: Provenance
    absent: bool = False
    parse_error: Optional[str] = None

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask)) if self.mask is not None else 0

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.provenance.task, "text": self.text, "target": self.target,
                "mask_shape_kji": list(self.mask.shape) if self.mask is not None else None,
                "voxel_count": self.voxel_count, "absent": self.absent, "parse_error": self.parse_error,
                "provenance": self.provenance.to_dict()}


@dataclasses.dataclass
class RetrievalResult:
    """Image-text retrieval with M3D-CLIP: candidates ranked by cosine similarity to the query."""

    query: str  # the text, or a description of the query volume
    ranking: list[tuple[int, str, float]]  # (candidate index, candidate label, similarity), best first
    provenance: Provenance

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.provenance.task, "query": self.query,
                "ranking": [{"index": i, "label": label, "score": float(score)} for i, label, score in self.ranking],
                "provenance": self.provenance.to_dict()}
