"""Evidence maps: which parts of the volume an answer depends on.

The attribution is **integrated gradients** (Sundararajan, Taly and Yan, "Axiomatic Attribution for Deep Networks",
ICML 2017) of the answer's log-likelihood -- the sum of the log-probabilities of the answer's tokens, given the
prompt and the image -- with respect to the model input (the (1, D, H, W) tensor in [0, 1]), from a black image:

    attribution(x) = x * mean over k = 1..n of  d log p(answer | prompt, k/n * x) / d x

With ``n = 1`` this is exactly **gradient x input**. Why more steps by default: gradient x input is a first-order
(Taylor) estimate at the image itself, and the vision transformer's layer norms, softmaxes and GELUs saturate, so a
region the answer does depend on can have a near-zero gradient there; integrated gradients follows the whole path
from "nothing seen" to the image and satisfies *completeness* -- the attributions add up to the change of the
log-likelihood from the black image to the image (``attribution_sum`` vs ``answer_logprob - baseline_logprob`` in the
result: their gap says how good ``n`` steps were). Each step costs one forward and one backward pass of the vision
encoder and the language model; ``benchmarks/analysis_cost.py`` measures it.

The map lives on the model grid; :meth:`~.results.EvidenceMap.on_volume` puts it on the volume's own voxel grid by the
same resampling as masks (:func:`~.geometry.map_model_values`), and :func:`relevant_ranges` finds the runs of
slices holding most of the positive evidence, for the panel to jump to. Black (0 after the intensity window) is the
baseline: what the window maps to black contributes nothing by construction (``docs/analysis.md``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from .geometry import VolumeToModelMapping, map_model_values
from .progress import ProgressCallback, report_progress
from .results import EvidenceMap, SliceRange

TOP_RANGES = 3
"""How many slice ranges an evidence map lists at most."""

MIN_SHARE = 0.05
"""A slice range holding less than this share of the positive evidence is not listed."""


def integrated_gradients(
    f: Callable[[Any], Any],
    x: Any,
    steps: int,
    *,
    check_cancel: Optional[Callable[[], None]] = None,
    progress: Optional[ProgressCallback] = None,
) -> tuple[Any, float, float]:
    """Integrated gradients of the scalar ``f`` at ``x`` (a torch tensor) from a zero baseline, by the right Riemann
    sum over ``steps`` points (``steps = 1``: gradient x input).

    Returns ``(attributions, f(x), f(0))``, the attributions as float32 of ``x``'s shape."""
    import torch

    x = x.detach().float()
    total = torch.zeros_like(x)
    value_at_x = float("nan")
    for k in range(1, steps + 1):
        point = (x * (k / steps)).requires_grad_(True)
        with torch.enable_grad():
            value = f(point)
            (gradient,) = torch.autograd.grad(value, point)
        total += gradient.float()
        if k == steps:
            value_at_x = float(value.detach())
        report_progress(progress, "evidence", k / (steps + 1), f"attribution step {k} of {steps}")
        if check_cancel is not None:
            check_cancel()
    with torch.no_grad():
        value_at_baseline = float(f(torch.zeros_like(x)))
    return x * total / steps, value_at_x, value_at_baseline


def answer_log_likelihood(model: Any, prompt_ids: Any, answer_ids: Sequence[int]) -> Callable[[Any], Any]:
    """``f(images) = log p(answer_ids | prompt_ids, images)`` under M3D-LaMed: one teacher-forced forward pass over
    the prompt and the answer, images [1, 1, D, H, W] (float; cast to the model's dtype)."""
    import torch

    answer = torch.tensor([list(answer_ids)], device=prompt_ids.device, dtype=prompt_ids.dtype)
    ids = torch.cat([prompt_ids, answer], dim=1)
    n_answer = answer.shape[1]
    dtype = next(model.parameters()).dtype

    def f(images: Any) -> Any:
        # the logits of the last n_answer + 1 positions; position t predicts token t + 1
        out = model(input_ids=ids, images=images.to(dtype), use_cache=False, logits_to_keep=n_answer + 1)
        logits = out.logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(1, answer[0][:, None]).sum()

    return f


def relevant_ranges(model_values: np.ndarray, mapping: VolumeToModelMapping, *, top: int = TOP_RANGES,
                    min_share: float = MIN_SHARE) -> list[SliceRange]:
    """The runs of the volume's slices (array axis K) that hold most of the positive evidence, strongest first.

    The map is resampled onto the volume's grid (chunk by chunk, as masks are); each slice's positive evidence is
    summed; from the strongest slice a run grows while its neighbours hold at least half of that slice's evidence
    (full width at half maximum); runs holding less than ``min_share`` of all positive evidence are left out. Each
    run's peak is its strongest voxel."""
    depth = mapping.volume_shape[0]
    per_slice = np.zeros(depth)
    best = np.full(depth, -np.inf)
    best_ji = np.zeros((depth, 2), dtype=int)

    def consume(index: tuple[slice, slice, slice], part: np.ndarray) -> None:
        ks = np.arange(index[0].start, index[0].stop)
        np.add.at(per_slice, ks, np.maximum(part, 0.0).reshape(len(ks), -1).sum(axis=1))
        flat = part.reshape(len(ks), -1)
        where = flat.argmax(axis=1)
        peaks = flat[np.arange(len(ks)), where]
        better = peaks > best[ks]
        best[ks[better]] = peaks[better]
        j, i = np.unravel_index(where[better], part.shape[1:])
        best_ji[ks[better]] = np.c_[j + index[1].start, i + index[2].start]

    map_model_values(np.asarray(model_values, dtype=np.float32), mapping, consume)
    total = float(per_slice.sum())
    if total <= 0:
        return []
    remaining = per_slice.copy()
    ranges: list[SliceRange] = []
    while len(ranges) < top:
        k = int(np.argmax(remaining))
        if remaining[k] <= 0:
            break
        half = remaining[k] / 2.0
        a, b = k, k + 1
        while a > 0 and remaining[a - 1] >= half:
            a -= 1
        while b < depth and remaining[b] >= half:
            b += 1
        share = float(per_slice[a:b].sum()) / total
        remaining[a:b] = 0.0
        if share < min_share:
            break
        peak_k = a + int(np.argmax(best[a:b]))
        j, i = (int(v) for v in best_ji[peak_k])
        ras = (mapping.ijk_to_ras @ np.array([i, j, peak_k, 1.0]))[:3]
        ranges.append(SliceRange(a, b, round(share, 4), (i, j, peak_k), tuple(round(float(v), 3) for v in ras)))
    return ranges


def explain_answer(model: Any, images: Any, mapping: VolumeToModelMapping, prompt_ids: Any,
                   answer_ids: Sequence[int], steps: int, *, check_cancel: Optional[Callable[[], None]] = None,
                   progress: Optional[ProgressCallback] = None) -> Optional[EvidenceMap]:
    """The :class:`~.results.EvidenceMap` of an answer (its generated token ids, the end-of-answer token included)
    to the prompt ``prompt_ids`` [1, L] about ``images`` [1, 1, D, H, W] (the model input ``mapping`` describes);
    None when the answer is empty."""
    if not len(answer_ids):
        return None
    f = answer_log_likelihood(model, prompt_ids, answer_ids)
    attributions, at_image, at_black = integrated_gradients(f, images, steps, check_cancel=check_cancel,
                                                            progress=progress)
    values = attributions[0, 0].cpu().numpy().astype(np.float32)
    report_progress(progress, "evidence", steps / (steps + 1), "mapping the evidence to the volume's slices")
    return EvidenceMap(
        method="gradient-x-input" if steps == 1 else "integrated-gradients", steps=steps, model_values=values,
        mapping=mapping, answer_logprob=round(at_image, 6), baseline_logprob=round(at_black, 6),
        attribution_sum=round(float(values.sum(dtype=np.float64)), 6), ranges=relevant_ranges(values, mapping))


__all__ = ["TOP_RANGES", "MIN_SHARE", "integrated_gradients", "answer_log_likelihood", "relevant_ranges",
           "explain_answer"]
