"""Draw the README figure: the sample CT as the model sees it and back on the CT, with a mask and a box.

The released weights cannot be downloaded on the machines that build this project, so the figure shows the geometry
every result goes through, with TotalSegmentator's liver label standing in for a model mask: the label is mapped into
model space (32x256x256, the model's input orientation), its official box is computed there (mask -> box text), and
both are mapped back onto the CT's own voxel grid (box -> RAS ROI). Usage: python Utilities/make_figures.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from M3DAssistantLib.geometry import (  # noqa: E402
    box_to_roi,
    format_box,
    mask_to_box,
    mask_to_model,
    model_mask_to_volume,
    to_model_input,
)
from M3DAssistantLib.volume_io import read_volume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "Testing" / "Data" / "totalsegmentator"
LIVER = 5


def main() -> None:
    ct, ijk_to_ras = read_volume(DATA / "example_ct_sm.nii.gz")
    labels, _ = read_volume(DATA / "example_seg.nii.gz")
    liver = (labels == LIVER).astype(np.uint8)
    image, mapping = to_model_input(ct, ijk_to_ras, window="abdomen", convention="m3d-seg-v1")
    liver_model = mask_to_model(liver, mapping)
    box = mask_to_box(liver_model)
    roi = box_to_roi(box, mapping)
    back = model_mask_to_volume(liver_model, mapping)

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    d = int(np.argmax(liver_model.sum(axis=(1, 2))))
    axes[0].imshow(image[0, d], cmap="gray")
    axes[0].contour(liver_model[d], levels=[0.5], colors="orange")
    d1, h1, w1, d2, h2, w2 = box
    size = mapping.model_shape
    axes[0].add_patch(plt.Rectangle((w1 * size[2] - 0.5, h1 * size[1] - 0.5), (w2 - w1) * size[2] + 1,
                                    (h2 - h1) * size[1] + 1, fill=False, ec="cyan", lw=1.5))
    axes[0].set_title(f"model input, slice {d} of {size[0]} (what M3D-LaMed sees)\nbox text {format_box(box)}",
                      fontsize=9)
    k = int(np.argmax(back.sum(axis=(1, 2))))
    # Radiological view of the axial slice: patient right on the viewer's left, anterior at the top.
    flip_cols = ijk_to_ras[0, 0] > 0  # i increases towards patient right
    flip_rows = ijk_to_ras[1, 1] > 0  # j increases towards anterior
    def view(a):
        return a[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]
    axes[1].imshow(view(ct[k]), cmap="gray", vmin=40 - 175, vmax=40 + 175)
    axes[1].contour(view(back[k]), levels=[0.5], colors="orange")
    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    lo = ras_to_ijk @ np.append(roi.center - roi.axes @ (roi.size / 2), 1)
    hi = ras_to_ijk @ np.append(roi.center + roi.axes @ (roi.size / 2), 1)
    cols = sorted((ct.shape[2] - 1 - v if flip_cols else v) for v in (lo[0], hi[0]))
    rows = sorted((ct.shape[1] - 1 - v if flip_rows else v) for v in (lo[1], hi[1]))
    axes[1].add_patch(plt.Rectangle((cols[0], rows[0]), cols[1] - cols[0], rows[1] - rows[0], fill=False, ec="cyan",
                                    lw=1.5))
    c = roi.center
    axes[1].set_title(f"the same mask and box back on the CT grid (axial slice k={k})\n"
                      f"ROI centre ({c[0]:.0f}, {c[1]:.0f}, {c[2]:.0f}) mm, "
                      f"size {roi.size[0]:.0f} x {roi.size[1]:.0f} x {roi.size[2]:.0f} mm", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("Volume <-> model space on the sample CT (liver label from TotalSegmentator standing in for a "
                 "model mask)", fontsize=10)
    fig.tight_layout()
    out = ROOT / "docs" / "geometry_sample_ct.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
