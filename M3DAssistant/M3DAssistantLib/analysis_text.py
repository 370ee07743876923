"""Confidence, measurements and evidence maps in words: the lines the panel's conversation view and the ``m3d``
command line both show under an answer (the options' probabilities, the mask's numbers, the most relevant slice
ranges). Plain Python over the result types; no Qt, no torch."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["choice_lines", "measurement_lines", "evidence_items"]


def choice_lines(result: Any) -> list[str]:
    """Every option with its probability at the answer position (the chosen one marked), best first."""
    confidence = getattr(result, "confidence", None)
    if confidence is None or not confidence.choices:
        return []
    letters = sorted(confidence.choices, key=lambda letter: -confidence.choices[letter])
    lines = []
    for letter in letters:
        option = result.choices["ABCDEFGH".index(letter)]
        mark = " \u2190 answer" if letter == result.letter else ""
        lines.append(f"{letter}. {option}: {100 * confidence.choices[letter]:.0f}%{mark}")
    if confidence.choice_mass is not None and confidence.choice_mass < 0.5:
        lines.append(f"(only {100 * confidence.choice_mass:.0f}% of the model's probability went to the option "
                     "letters: it did not answer in the trained format)")
    return lines


def measurement_lines(result: Any, statistics: Optional[dict] = None) -> list[str]:
    """The mask's numbers: volume, diameters, values inside (Segment Statistics' when ``statistics`` came from it),
    mask confidence, refinement and the model's own box."""
    lines = []
    m = getattr(result, "measurements", None)
    if m is not None:
        units = f" {m.units}" if m.units else ""
        volume, mean, std = m.volume_ml, m.mean, m.std
        source = ""
        if statistics:
            volume = statistics.get("volume_ml", volume)
            mean, std = statistics.get("mean", mean), statistics.get("std", std)
            source = " (Segment Statistics)"
        lines.append(f"Volume {volume:.1f} mL{source}; largest diameter {m.max_diameter_mm:.1f} mm")
        lines.append(f"Axial long axis {m.axial_long_axis_mm:.1f} mm, short axis {m.axial_short_axis_mm:.1f} mm "
                     f"(slice {m.axial_slice})")
        lines.append(f"Inside: mean {mean:.1f}{units}, SD {std:.1f}{units}, range {m.minimum:g} to {m.maximum:g}"
                     f"{units}")
    mask = getattr(getattr(result, "confidence", None), "mask", None)
    if mask is not None and mask.mean_probability is not None:
        lines.append(f"Mask confidence: mean probability {mask.mean_probability:.2f}; "
                     f"{100 * mask.uncertain_fraction:.0f}% of its voxels and fringe between "
                     f"{mask.band[0]:g} and {mask.band[1]:g}")
    refinement = getattr(result, "refinement", None)
    if refinement is not None:
        zoom = " x ".join(f"{z:.1f}" for z in refinement.zoom)
        lines.append(f"Refined by zoom-in ({zoom} finer; first mask {refinement.coarse_voxel_count} voxels)")
    located = getattr(result, "located", None)
    if located is not None:
        if located.box is None:
            lines.append(f"Located: no box ({located.parse_error or 'the model says it is absent'})")
        else:
            agreement = getattr(result, "located_iou", None)
            lines.append(f"Located: box {list(located.box)}" + (
                f", IoU {agreement:.2f} with the mask's box" if agreement is not None else ""))
    return lines


def evidence_items(evidence: Any) -> list[tuple[str, tuple[float, float, float]]]:
    """The evidence map's most relevant slice ranges for the panel's list: (label, RAS point to jump to)."""
    if evidence is None:
        return []
    items = []
    for rank, r in enumerate(evidence.ranges, start=1):
        slices = f"slice {r.start}" if r.stop - r.start == 1 else f"slices {r.start}-{r.stop - 1}"
        items.append((f"{rank}. {slices}: {100 * r.share:.0f}% of the evidence (peak at R {r.peak_ras[0]:.0f}, "
                      f"A {r.peak_ras[1]:.0f}, S {r.peak_ras[2]:.0f})", tuple(r.peak_ras)))
    return items
