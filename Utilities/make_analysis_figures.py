"""Draw the README's pictures of what comes with an answer: an evidence map, a refined mask, a mask's measurements.

The released weights cannot be downloaded on the machines that build this project, so each picture says what stands
in for the model (nothing here is a real model's output):

* ``docs/images/analysis_evidence.png``: a tiny random M3D-LaMed whose vision transformer was rebuilt to read one
  image patch only (``Testing/helpers/evidence_phantom.py``, as the evidence tests use it) answers a question about
  the bundled CT with an evidence map; the map, on the CT's own grid, finds that patch, and the panel's "most
  relevant slices" are marked;
* ``docs/images/analysis_refinement.png``: a 512 x 512 x 160 phantom with a 12 mm lesion, an oracle decoder (the
  lesion is what is bright in the tensor it is shown): the whole-volume mask at the model's 32 x 256 x 256 and the
  zoom-in refined one, against the truth;
* ``docs/images/analysis_measurements.png``: TotalSegmentator's liver label of the bundled CT standing in for a model
  mask: its box, its axial long and short axis, its volume and HU.

Usage: python Utilities/make_analysis_figures.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from M3DAssistantLib.geometry import logits_to_mask, to_model_input  # noqa: E402
from M3DAssistantLib.measurements import mask_roi, measure_mask  # noqa: E402
from M3DAssistantLib.refinement import refine_logits  # noqa: E402
from M3DAssistantLib.results import AnalysisOptions, SamplingOptions  # noqa: E402
from M3DAssistantLib.selfcheck import dice  # noqa: E402
from M3DAssistantLib.volume_io import read_volume  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "helpers"))
from evidence_phantom import region_only_model  # noqa: E402  (the phantom the evidence tests use)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "Testing" / "Data" / "totalsegmentator"
OUT = ROOT / "docs" / "images"
LIVER = 5


def radiological(ijk_to_ras: np.ndarray):
    """An axial slice as radiologists view it: patient right on the viewer's left, anterior at the top."""
    flip_cols, flip_rows = ijk_to_ras[0, 0] > 0, ijk_to_ras[1, 1] > 0
    return lambda a: a[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]


def evidence_figure(ct: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.model import load_model
    from M3DAssistantLib.model import random_checkpoint as rc

    with tempfile.TemporaryDirectory() as tmp:
        folder = rc.write_random_lamed_checkpoint(Path(tmp) / "tiny", "phi3", llm=rc.TINY_LLM,
                                                  multimodal=rc.TINY_MULTIMODAL)
        model, tokenizer = load_model(folder, device="cpu", dtype="float32")
    vit = model.model.vision_tower.vision_tower
    patch = (1, 2, 1)
    region_only_model(model, patch)  # every token keeps its own patch; all but one are squashed by the final norm
    engine = InferenceEngine((model, tokenizer))
    engine.set_volume(ct, ijk_to_ras, window="abdomen")
    result = engine.ask("Is there a lesion in the liver?", sampling=SamplingOptions(max_new_tokens=4),
                        analysis=AnalysisOptions(evidence=True, evidence_steps=8))
    evidence = result.evidence
    values = evidence.on_volume()
    top = evidence.ranges[0]
    k = top.peak_ijk[2]
    view = radiological(ijk_to_ras)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
    axes[0].imshow(view(ct[k]), cmap="gray", vmin=40 - 175, vmax=40 + 175)
    shown = np.ma.masked_less(view(values[k]), 0.1)
    image = axes[0].imshow(shown, cmap="hot", vmin=0, vmax=1, alpha=0.6)
    # the CT voxels of the patch the model reads (its model-voxel box through the mapping), dashed
    import itertools

    size = vit.config.patch_size
    corners = np.array([[p * s - 0.5 + e * s for p, s, e in zip(patch, size, c)] + [1.0]
                        for c in itertools.product((0, 1), repeat=3)])
    ijk = (evidence.mapping.model_to_ijk @ corners.T)[:2].T
    flip_cols, flip_rows = ijk_to_ras[0, 0] > 0, ijk_to_ras[1, 1] > 0
    cols = [ct.shape[2] - 1 - v if flip_cols else v for v in ijk[:, 0]]
    rows = [ct.shape[1] - 1 - v if flip_rows else v for v in ijk[:, 1]]
    axes[0].add_patch(plt.Rectangle((min(cols), min(rows)), max(cols) - min(cols), max(rows) - min(rows), fill=False,
                                    ec="cyan", ls="--", lw=1.2))
    axes[0].set_title(f"evidence on axial slice {k} (below 0.1 transparent); dashed: the patch the model reads",
                      fontsize=9)
    axes[0].axis("off")
    fig.colorbar(image, ax=axes[0], fraction=0.04, label="evidence (1 = strongest model voxel)")
    per_slice = np.maximum(values, 0).sum(axis=(1, 2))
    axes[1].bar(np.arange(len(per_slice)), per_slice / per_slice.sum(), color="0.4")
    for rank, r in enumerate(evidence.ranges, start=1):
        axes[1].axvspan(r.start - 0.5, r.stop - 0.5, color="orange", alpha=0.3)
        axes[1].text((r.start + r.stop - 1) / 2, axes[1].get_ylim()[1] * 0.9, f"{rank}: {100 * r.share:.0f}%",
                     ha="center", fontsize=8)
    axes[1].set_xlabel("slice (K index)")
    axes[1].set_ylabel("share of the positive evidence")
    axes[1].set_title("most relevant slice ranges (the panel's list; click = jump)", fontsize=9)
    fig.suptitle(f"Evidence map ({evidence.method}, {evidence.steps} steps) of a tiny model built to read one image "
                 "patch: the map finds that patch on the CT's own grid", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "analysis_evidence.png", dpi=90)
    plt.close(fig)


def refinement_figure() -> None:
    shape, spacing = (160, 512, 512), (0.7, 0.7, 2.0)  # K, J, I voxels; I, J, K mm
    ijk_to_ras = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    ras = [i * spacing[0], j * spacing[1], k * spacing[2]]
    centre = (170.0, 190.0, 150.0)
    distance = np.sqrt(sum((a - c) ** 2 for a, c in zip(ras, centre)))
    body = np.sqrt((ras[0] - 179) ** 2 / 1.4 + (ras[1] - 179) ** 2) < 150
    ct = np.where(np.broadcast_to(body, shape), 40, -1000).astype(np.int16)
    ct[distance <= 6.0] = 200  # a 12 mm enhancing lesion
    truth = (distance <= 6.0).astype(np.uint8)

    def oracle(tensor, mapping):
        """The lesion is what is brighter than halfway between body and lesion, as normalised for the model."""
        low, high = mapping.intensity["low"], mapping.intensity["high"]
        body_value, lesion_value = ((v - low) / (high - low) for v in (40.0, 200.0))
        return (tensor[0] - (body_value + lesion_value) / 2) * 60.0

    tensor, mapping = to_model_input(ct, ijk_to_ras, window="abdomen")
    coarse = logits_to_mask(oracle(tensor, mapping), mapping)
    logits, zoomed, record = refine_logits(ct, ijk_to_ras, coarse, mapping, oracle)
    refined = logits_to_mask(logits, zoomed)
    kc = int(round(centre[2] / spacing[2]))
    jc, ic = int(round(centre[1] / spacing[1])), int(round(centre[0] / spacing[0]))
    window = (slice(jc - 20, jc + 21), slice(ic - 20, ic + 21))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    for ax, mask, name in ((axes[0], coarse, "whole volume at 32 x 256 x 256"),
                           (axes[1], refined, f"zoom-in ({' x '.join(f'{z:.1f}' for z in record.zoom)} finer)")):
        ax.imshow(ct[kc][window], cmap="gray", vmin=40 - 175, vmax=40 + 175)
        ax.contour(truth[kc][window], levels=[0.5], colors="lime", linewidths=1.5)
        ax.contour(mask[kc][window], levels=[0.5], colors="orange", linewidths=1.5)
        ax.set_title(f"{name}: Dice {dice(mask, truth):.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Zoom-in refinement of a 12 mm lesion on a 512 x 512 x 160 phantom (oracle decoder; green: truth, "
                 "orange: mask)", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "analysis_refinement.png", dpi=90)
    plt.close(fig)


def measurements_figure(ct: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    labels, _ = read_volume(DATA / "example_seg.nii.gz")
    liver = (labels == LIVER).astype(np.uint8)
    m = measure_mask(liver, ct, ijk_to_ras, units="HU")
    roi = mask_roi(liver, ijk_to_ras)
    k = m.axial_slice
    view = radiological(ijk_to_ras)
    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    flip_cols, flip_rows = ijk_to_ras[0, 0] > 0, ijk_to_ras[1, 1] > 0

    def pixel(point_ras):
        i, j, _ = (ras_to_ijk @ np.append(point_ras, 1.0))[:3]
        return (ct.shape[2] - 1 - i if flip_cols else i), (ct.shape[1] - 1 - j if flip_rows else j)

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.imshow(view(ct[k]), cmap="gray", vmin=40 - 175, vmax=40 + 175)
    ax.contour(view(liver[k]), levels=[0.5], colors="orange")
    corners = [pixel(c) for c in roi.corners()]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    ax.add_patch(plt.Rectangle((min(xs), min(ys)), max(xs) - min(xs), max(ys) - min(ys), fill=False, ec="cyan"))
    (x0, y0), (x1, y1) = (pixel(p) for p in m.axial_long_axis_ras)
    ax.plot([x0, x1], [y0, y1], color="yellow", lw=2)
    ax.set_title(f"liver: {m.volume_ml:.0f} mL, largest diameter {m.max_diameter_mm:.0f} mm\n"
                 f"axial long axis {m.axial_long_axis_mm:.0f} mm (yellow), short axis {m.axial_short_axis_mm:.0f} mm "
                 f"on slice {k}\n{m.mean:.0f} \u00b1 {m.std:.0f} {m.units} inside; box (cyan) = the mask's ROI",
                 fontsize=9)
    ax.axis("off")
    fig.suptitle("A mask's box and measurements (TotalSegmentator's liver label standing in for a model mask)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "analysis_measurements.png", dpi=90)
    plt.close(fig)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ct, ijk_to_ras = read_volume(DATA / "example_ct_sm.nii.gz")
    evidence_figure(ct, ijk_to_ras)
    refinement_figure()
    measurements_figure(ct, ijk_to_ras)
    for name in ("analysis_evidence", "analysis_refinement", "analysis_measurements"):
        print(f"wrote {OUT / name}.png")


if __name__ == "__main__":
    main()
