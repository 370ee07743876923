"""Typed results of the eight tasks, with provenance. Light: numpy and the standard library only.

Every result carries the raw model text (or scores), the parsed and geometry-mapped value, a parse error instead of
an exception when the answer is malformed, and a :class:`Provenance` with the label "AI-generated, not for clinical
use". ``to_dict()`` gives JSON-safe content (masks and maps are summarised, not inlined) for the CLI, the server and
the attributes of the nodes Slicer creates.

What is computed beyond the answer (:class:`AnalysisOptions`: confidence, evidence maps, zoom-in refinement, the
REC box next to a mask) comes back in :class:`Confidence`, :class:`EvidenceMap`, :class:`Refinement` and, with every
mask, its box and :class:`MaskMeasurements`; ``docs/analysis.md`` defines each number and the JSON schema.

Why this file is long: every typed result and each of its parts (confidence, evidence, measurements) is a
dataclass here, next to its JSON form, so that the engine, the wire and the scene share one definition.
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


MAX_EVIDENCE_STEPS = 64
"""Most integrated-gradients steps an evidence map may take (each is a forward and a backward pass)."""


@dataclasses.dataclass
class AnalysisOptions:
    """What a task computes beyond its answer (the registry's :data:`~.tasks.OPTIONS` say which task takes which;
    ``docs/analysis.md`` defines each result). The defaults are the plain task plus confidence, which costs no model
    call of its own (the numbers come from the scores of the answer's own decoding steps).

    * ``confidence``: probabilities of the answer's tokens, of each multiple-choice option, of a mask's voxels;
    * ``evidence``: an evidence map (integrated gradients of the answer's log-likelihood with respect to the model
      input, ``evidence_steps`` steps; 1 step is gradient x input) on the volume's grid, and its most relevant
      slice ranges;
    * ``refine`` (segmentation): zoom-in refinement of the mask (SegVol's zoom-out-zoom-in with the same [SEG]
      prompt);
    * ``locate`` (segmentation): also the model's own box for the same text (its REC answer), in the same request.
    """

    confidence: bool = True
    evidence: bool = False
    evidence_steps: int = 8
    refine: bool = False
    locate: bool = False

    def __post_init__(self) -> None:
        from .errors import InputError

        for name in ("confidence", "evidence", "refine", "locate"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"the analysis option {name} is true or false, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        steps = self.evidence_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_EVIDENCE_STEPS:
            raise InputError(f"evidence_steps is a whole number of integrated-gradients steps from 1 (gradient x "
                             f"input) to {MAX_EVIDENCE_STEPS}, got {steps!r}")
        self.evidence_steps = int(steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def requested(self) -> dict[str, Any]:
        """The options that differ from the defaults (what a client sends; empty for the plain task)."""
        default = AnalysisOptions()
        return {k: v for k, v in self.to_dict().items() if getattr(default, k) != v}

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> "AnalysisOptions":
        from .errors import InputError

        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data or {}) - names)
        if unknown:
            raise InputError(f"unknown analysis option(s) {', '.join(unknown)}; the options are {', '.join(names)}")
        return cls(**(data or {}))


# ------------------------------------------------------------------------------------------------------ confidence
LOW_TOKEN_PROBABILITY = 0.3
"""A generated token whose probability is below this is "low" (marked in the panel; :meth:`Confidence.low_spans`)."""

UNCERTAIN_BAND = (0.3, 0.7)
"""A voxel whose foreground probability lies strictly inside this band is "near 0.5" (:class:`MaskConfidence`)."""


@dataclasses.dataclass
class TokenProbability:
    """One generated token: its id, the text it added to the answer, and the probability the model gave it."""

    token_id: int
    text: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.token_id, "text": self.text, "probability": self.probability}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenProbability":
        return cls(int(d["id"]), str(d["text"]), float(d["probability"]))


@dataclasses.dataclass
class MaskConfidence:
    """How sure the mask is, on the volume's voxel grid: ``mean_probability`` = mean foreground probability
    (sigmoid of the logit) over the mask's voxels; ``uncertain_fraction`` = of the voxels the model gives more than
    :data:`UNCERTAIN_BAND`'s lower bound (the mask and its fringe), the share inside the band (near 0.5)."""

    mean_probability: Optional[float]
    uncertain_fraction: Optional[float]
    uncertain_voxels: int
    candidate_voxels: int
    band: tuple[float, float] = UNCERTAIN_BAND

    def to_dict(self) -> dict[str, Any]:
        return {"mean_probability": self.mean_probability, "uncertain_fraction": self.uncertain_fraction,
                "uncertain_voxels": self.uncertain_voxels, "candidate_voxels": self.candidate_voxels,
                "band": list(self.band)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MaskConfidence":
        return cls(d.get("mean_probability"), d.get("uncertain_fraction"), int(d["uncertain_voxels"]),
                   int(d["candidate_voxels"]), tuple(d.get("band", UNCERTAIN_BAND)))  # type: ignore[arg-type]


@dataclasses.dataclass
class Confidence:
    """How sure the model was of its answer (``docs/analysis.md`` says what these numbers do and do not mean).

    ``tokens``: every generated token with its probability under the model's own distribution at that step (before
    temperature or top-p: the same number greedy and sampled); ``mean_logprob``: the mean natural-log probability of
    those tokens (the end-of-answer token included when the model wrote one). ``choices`` (multiple choice): each
    offered letter's probability at the answer position, normalised over the offered letters; ``choice_mass``: the
    probability the model gave to the offered letters at all. ``mask`` (segmentation): :class:`MaskConfidence`.
    """

    tokens: list[TokenProbability] = dataclasses.field(default_factory=list)
    mean_logprob: Optional[float] = None
    choices: Optional[dict[str, float]] = None
    choice_mass: Optional[float] = None
    mask: Optional[MaskConfidence] = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def low_spans(self, threshold: float = LOW_TOKEN_PROBABILITY) -> list[tuple[int, int]]:
        """Character ranges ``[start, end)`` of the answer text made of tokens below ``threshold`` (adjacent low
        tokens merged), for marking them."""
        spans: list[tuple[int, int]] = []
        position = 0
        for token in self.tokens:
            end = position + len(token.text)
            if token.probability < threshold and end > position:
                if spans and spans[-1][1] == position:
                    spans[-1] = (spans[-1][0], end)
                else:
                    spans.append((position, end))
            position = end
        return spans

    def to_dict(self) -> dict[str, Any]:
        return {"mean_logprob": self.mean_logprob, "tokens": [t.to_dict() for t in self.tokens],
                "choices": self.choices, "choice_mass": self.choice_mass,
                "mask": self.mask.to_dict() if self.mask is not None else None, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Confidence":
        return cls([TokenProbability.from_dict(t) for t in d.get("tokens", [])], d.get("mean_logprob"),
                   {str(k): float(v) for k, v in d["choices"].items()} if d.get("choices") is not None else None,
                   d.get("choice_mass"), MaskConfidence.from_dict(d["mask"]) if d.get("mask") else None,
                   list(d.get("notes", [])))


# -------------------------------------------------------------------------------------------------------- evidence
@dataclasses.dataclass
class SliceRange:
    """A run of the volume's slices (K indices ``[start, stop)``) holding much of the evidence: its ``share`` of the
    positive evidence and the voxel where it peaks (``peak_ijk`` and ``peak_ras``, to jump the slice views there)."""

    start: int
    stop: int
    share: float
    peak_ijk: tuple[int, int, int]
    peak_ras: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop, "share": self.share, "peak_ijk": list(self.peak_ijk),
                "peak_ras": list(self.peak_ras)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SliceRange":
        return cls(int(d["start"]), int(d["stop"]), float(d["share"]),
                   tuple(int(v) for v in d["peak_ijk"]), tuple(float(v) for v in d["peak_ras"]))  # type: ignore


@dataclasses.dataclass
class EvidenceMap:
    """Which parts of the volume the answer depends on: integrated gradients (``steps`` steps from a black image;
    1 step = gradient x input) of the answer's log-likelihood with respect to the model input, per model voxel
    (``model_values``, (D, H, W)), with the mapping of the model input back to the volume.

    :meth:`on_volume` gives the map on the volume's own voxel grid through the same resampling as masks, scaled so
    that the strongest model voxel is 1 (positive: supports the answer; negative: speaks against it). ``ranges``:
    the slice ranges with most of the positive evidence, strongest first. ``answer_logprob`` and
    ``baseline_logprob``: the answer's log-likelihood with the image and with a black image; the attributions add
    up to about their difference (``attribution_sum``; integrated gradients' completeness)."""

    method: str
    steps: int
    model_values: np.ndarray  # float32 (D, H, W)
    mapping: Any  # geometry.VolumeToModelMapping of the model input the values belong to
    answer_logprob: float
    baseline_logprob: float
    attribution_sum: float
    ranges: list[SliceRange] = dataclasses.field(default_factory=list)

    @property
    def scale(self) -> float:
        """The largest absolute attribution of a model voxel (what 1.0 means in :meth:`on_volume`)."""
        peak = float(np.max(np.abs(self.model_values))) if self.model_values.size else 0.0
        return peak if peak > 0 else 1.0

    def on_volume(self) -> np.ndarray:
        """The map on the volume's voxel grid (K, J, I), float32 in [-1, 1] (1 = the strongest model voxel); 0
        outside the region the model saw."""
        from .geometry import model_values_to_volume

        return model_values_to_volume(self.model_values / np.float32(self.scale), self.mapping)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "steps": self.steps, "answer_logprob": self.answer_logprob,
                "baseline_logprob": self.baseline_logprob, "attribution_sum": self.attribution_sum,
                "scale": self.scale, "model_shape": list(self.model_values.shape),
                "ranges": [r.to_dict() for r in self.ranges]}


# ----------------------------------------------------------------------------------------------- masks: box, numbers
@dataclasses.dataclass
class MaskMeasurements:
    """What a radiologist reads off a mask, on the volume's own voxels (``docs/analysis.md`` defines each):

    ``volume_ml`` = voxels x voxel volume; ``max_diameter_mm`` = the largest distance between two voxel centres of
    the mask (Slicer's and ITK's Feret diameter), between ``max_diameter_ras``; ``axial_long_axis_mm`` = the longest
    in-plane diameter on any slice across the superior-inferior axis (RECIST's long axis), on slice
    ``axial_slice`` (index along array axis ``axial_axis``), between ``axial_long_axis_ras``;
    ``axial_short_axis_mm`` = the mask's width on that slice perpendicular to the long axis; ``mean`` / ``std`` /
    ``minimum`` / ``maximum`` of the volume's values inside (``std`` with n - 1, as Slicer's Segment Statistics);
    ``units`` = "HU" for CT, else None (the volume's own units)."""

    voxel_count: int
    volume_ml: float
    max_diameter_mm: float
    max_diameter_ras: tuple[tuple[float, float, float], tuple[float, float, float]]
    axial_long_axis_mm: float
    axial_short_axis_mm: float
    axial_slice: int
    axial_axis: int
    axial_long_axis_ras: tuple[tuple[float, float, float], tuple[float, float, float]]
    mean: float
    std: float
    minimum: float
    maximum: float
    units: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["max_diameter_ras"] = [list(p) for p in self.max_diameter_ras]
        d["axial_long_axis_ras"] = [list(p) for p in self.axial_long_axis_ras]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MaskMeasurements":
        d = dict(d)
        for key in ("max_diameter_ras", "axial_long_axis_ras"):
            d[key] = tuple(tuple(float(v) for v in p) for p in d[key])
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass
class Refinement:
    """How a mask was refined (zoom-in): the region of the volume (K, J, I half-open ``[start, stop)``) shown to
    the model again at its full resolution, the margin added around the first mask, how much finer the second look
    was along the model's axes (``zoom``), the first mask's voxel count, and the region's mapping to model space."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    margin: float
    zoom: tuple[float, float, float]
    coarse_voxel_count: int
    mapping: Any = None  # geometry.VolumeToModelMapping of the zoomed region

    def to_dict(self) -> dict[str, Any]:
        return {"start": list(self.start), "stop": list(self.stop), "margin": self.margin, "zoom": list(self.zoom),
                "coarse_voxel_count": self.coarse_voxel_count,
                "mapping": self.mapping.to_dict() if self.mapping is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Refinement":
        from .geometry import VolumeToModelMapping

        return cls(tuple(int(v) for v in d["start"]), tuple(int(v) for v in d["stop"]),  # type: ignore[arg-type]
                   float(d["margin"]), tuple(float(v) for v in d["zoom"]), int(d["coarse_voxel_count"]),  # type: ignore
                   VolumeToModelMapping.from_dict(d["mapping"]) if d.get("mapping") else None)


def _roi_dict(roi: Any) -> Optional[dict[str, Any]]:
    if roi is None:
        return None
    return {"center": [float(v) for v in roi.center], "size": [float(v) for v in roi.size],
            "axes": np.asarray(roi.axes, dtype=float).tolist()}


def _analysis_dict(result: Any) -> dict[str, Any]:
    """The parts every model-generated result may carry (None when not computed)."""
    return {"confidence": result.confidence.to_dict() if result.confidence is not None else None,
            "evidence": result.evidence.to_dict() if result.evidence is not None else None}


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
    analysis: dict = dataclasses.field(default_factory=dict)  # the AnalysisOptions that were applied

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
    confidence: Optional[Confidence] = None
    evidence: Optional[EvidenceMap] = None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.provenance.task, "text": self.text, **_analysis_dict(self),
                "provenance": self.provenance.to_dict()}


@dataclasses.dataclass
class ChoiceResult:
    """Closed VQA: the letter and text of the chosen option, or a parse error with the raw text."""

    text: str
    choices: list[str]
    letter: Optional[str]
    choice: Optional[str]
    provenance: Provenance
    parse_error: Optional[str] = None
    confidence: Optional[Confidence] = None
    evidence: Optional[EvidenceMap] = None

    @property
    def probability(self) -> Optional[float]:
        """The chosen option's probability (normalised over the offered letters), when confidence was computed."""
        if self.letter is None or self.confidence is None or not self.confidence.choices:
            return None
        return self.confidence.choices.get(self.letter)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.provenance.task, "text": self.text, "choices": self.choices, "letter": self.letter,
                "choice": self.choice, "probability": self.probability, "parse_error": self.parse_error,
                **_analysis_dict(self), "provenance": self.provenance.to_dict()}


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
    confidence: Optional[Confidence] = None
    evidence: Optional[EvidenceMap] = None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.provenance.task, "text": self.text, "target": self.target,
                "box": list(self.box) if self.box is not None else None, "roi_ras": _roi_dict(self.roi),
                "absent": self.absent, "parse_error": self.parse_error, **_analysis_dict(self),
                "provenance": self.provenance.to_dict()}


@dataclasses.dataclass
class SegmentationResult:
    """Semantic or referring-expression segmentation: a binary mask on the original volume grid (K, J, I order).

    With a non-empty mask also its box -- ``roi`` (RAS, covering the mask's voxels on the volume's grid) and ``box``
    (the official normalised box of the model voxels inside it, comparable with a REC answer) -- and its
    :class:`MaskMeasurements`. ``refinement`` says how a refined mask was made; ``located`` is the model's own REC
    box for the same text (option ``locate``) and ``located_iou`` its IoU with the mask's box (model space)."""

    text: str
    target: str
    mask: Optional[np.ndarray]  # uint8 KJI, same shape as the input volume; None when no [SEG] / absent
    provenance: Provenance
    absent: bool = False
    parse_error: Optional[str] = None
    confidence: Optional[Confidence] = None
    evidence: Optional[EvidenceMap] = None
    roi: Any = None  # geometry.RasRoi of the mask's voxels, or None
    box: Optional[tuple[float, ...]] = None
    measurements: Optional[MaskMeasurements] = None
    refinement: Optional[Refinement] = None
    located: Optional[BoxResult] = None
    located_iou: Optional[float] = None

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask)) if self.mask is not None else 0

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.provenance.task, "text": self.text, "target": self.target,
                "mask_shape_kji": list(self.mask.shape) if self.mask is not None else None,
                "voxel_count": self.voxel_count, "absent": self.absent, "parse_error": self.parse_error,
                "box": list(self.box) if self.box is not None else None, "roi_ras": _roi_dict(self.roi),
                "measurements": self.measurements.to_dict() if self.measurements is not None else None,
                "refinement": self.refinement.to_dict() if self.refinement is not None else None,
                "located": self.located.to_dict() if self.located is not None else None,
                "located_iou": self.located_iou, **_analysis_dict(self), "provenance": self.provenance.to_dict()}


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
