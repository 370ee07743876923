"""Segment colours: Slicer's anatomical colours for common structure names, distinct palette colours for the rest,
and the colour values users may give (0-1, 0-255, ``#rrggbb``).

Standard library and numpy only: Slicer's own process uses this (``scene.py``).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InputError

# Colours from Slicer's GenericAnatomyColors table (Base/Logic/Resources/ColorFiles/GenericAnatomyColors.txt), for the
# structure names M3D segments most often. Keys are normalised names (lower case, words joined by "_").
ANATOMY_COLORS: dict[str, tuple[int, int, int]] = {
    "tissue": (128, 174, 128), "bone": (241, 214, 145), "skin": (177, 122, 101), "blood": (216, 101, 79),
    "organ": (221, 130, 101), "mass": (144, 238, 144), "muscle": (192, 104, 88), "fat": (230, 220, 70),
    "nerve": (244, 214, 49), "vein": (0, 151, 206), "artery": (216, 101, 79), "cartilage": (111, 184, 210),
    "lymph_node": (68, 172, 100), "fluid": (170, 250, 250), "edema": (140, 224, 228), "bleeding": (188, 65, 28),
    "necrosis": (216, 191, 216), "clot": (145, 60, 66), "cyst": (205, 205, 100), "brain": (250, 250, 225),
    "spinal_cord": (244, 214, 49), "skull": (241, 213, 144), "mandible": (222, 198, 101),
    "pharynx": (184, 105, 108), "larynx": (150, 208, 243), "thyroid_gland": (62, 162, 114),
    "trachea": (182, 228, 255), "bronchi": (175, 216, 244), "right_lung": (197, 165, 145),
    "left_lung": (197, 165, 145), "pleura": (255, 245, 217), "heart": (206, 110, 84), "aorta": (224, 97, 76),
    "pericardium": (255, 244, 209), "esophagus": (211, 171, 143), "thymus": (47, 150, 103),
    "ribs": (253, 232, 158), "sternum": (244, 217, 154), "right_clavicle": (205, 179, 108),
    "left_clavicle": (205, 179, 108), "peritoneum": (255, 255, 220), "stomach": (216, 132, 105),
    "duodenum": (255, 253, 229), "small_bowel": (205, 167, 142), "colon": (204, 168, 143), "anus": (255, 224, 199),
    "liver": (221, 130, 101), "biliary_tree": (0, 145, 30), "gallbladder": (139, 150, 98),
    "pancreas": (249, 180, 111), "spleen": (157, 108, 162), "right_kidney": (185, 102, 83),
    "left_kidney": (185, 102, 83), "right_ureter": (247, 182, 164), "left_ureter": (247, 182, 164),
    "urinary_bladder": (222, 154, 132), "urethra": (124, 186, 223), "right_adrenal_gland": (249, 186, 150),
    "left_adrenal_gland": (249, 186, 150), "uterus": (255, 181, 158), "right_ovary": (213, 141, 113),
    "left_ovary": (213, 141, 113), "vagina": (193, 123, 103), "prostate": (230, 158, 140),
    "cervical_vertebral_column": (255, 255, 207), "thoracic_vertebral_column": (226, 202, 134),
    "lumbar_vertebral_column": (212, 188, 102),
}
_ANATOMY_SYNONYMS = {
    "lung": "right_lung", "lungs": "right_lung", "kidney": "right_kidney", "kidneys": "right_kidney",
    "adrenal_gland": "right_adrenal_gland", "adrenal_glands": "right_adrenal_gland", "adrenal": "right_adrenal_gland",
    "ureter": "right_ureter", "ovary": "right_ovary", "clavicle": "right_clavicle", "rib": "ribs",
    "bladder": "urinary_bladder", "gall_bladder": "gallbladder", "small_intestine": "small_bowel",
    "bowel": "small_bowel", "intestine": "small_bowel", "large_intestine": "colon", "rectum": "colon",
    "oesophagus": "esophagus", "thyroid": "thyroid_gland", "bronchus": "bronchi", "spine": "thoracic_vertebral_column",
    "vertebra": "thoracic_vertebral_column", "vertebrae": "thoracic_vertebral_column", "tumor": "mass",
    "tumour": "mass", "lesion": "mass", "nodule": "mass", "vessel": "artery", "vena_cava": "vein",
    "inferior_vena_cava": "vein", "superior_vena_cava": "vein", "portal_vein": "vein", "hemorrhage": "bleeding",
    "haemorrhage": "bleeding",
}

# Distinct colours for names without an anatomical colour: the "region_N" entries of GenericAnatomyColors.
FALLBACK_PALETTE: tuple[tuple[int, int, int], ...] = (
    (185, 232, 61), (0, 226, 255), (251, 159, 255), (230, 169, 29), (0, 194, 113), (104, 160, 249),
    (221, 108, 158), (137, 142, 0), (230, 70, 0), (0, 147, 0), (0, 147, 248), (231, 0, 206), (129, 78, 0),
    (0, 116, 0), (0, 0, 255), (157, 0, 0),
)


def _normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def anatomy_color(name: str) -> Optional[tuple[float, float, float]]:
    """Slicer's GenericAnatomyColors colour (0-1 floats) for a common structure name, else None.

    ``"Liver"``, ``"left kidney"``, ``"right_lung"``, ``"kidney"``, ``"gall bladder"`` ... all match.
    """
    key = _normalise_name(name)
    candidates = [key, _ANATOMY_SYNONYMS.get(key, "")]
    for side in ("left", "right"):  # "left kidney", "kidney_left" (TotalSegmentator's names)
        base = key[len(side) + 1:] if key.startswith(side + "_") else key[: -len(side) - 1] \
            if key.endswith("_" + side) else ""
        if base:
            candidates += [f"{side}_{base}", f"right_{base}", base, _ANATOMY_SYNONYMS.get(base, "")]
    if key.endswith("s"):
        candidates.append(_ANATOMY_SYNONYMS.get(key[:-1], key[:-1]))
    for c in candidates:
        if c and c in ANATOMY_COLORS:
            return tuple(v / 255.0 for v in ANATOMY_COLORS[c])
    return None


def parse_color(color: Any, what: str = "colour") -> tuple[float, float, float]:
    """RGB as three numbers in 0-1, or 0-255 when any component is above 1, or ``"#rrggbb"`` -> 0-1 floats."""
    if isinstance(color, str):
        m = re.fullmatch(r"#?([0-9a-fA-F]{6})", color.strip())
        if not m:
            raise InputError(f"{what} {color!r} is not a colour; give three numbers (0-1 or 0-255) or '#rrggbb'")
        h = m.group(1)
        return tuple(int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4))
    try:
        rgb = np.array(color, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        rgb = np.array([])
    if rgb.size != 3 or not np.all(np.isfinite(rgb)) or np.any(rgb < 0) or np.any(rgb > 255):
        raise InputError(f"{what} {color!r} is not a colour; give three numbers (0-1 or 0-255) or '#rrggbb'")
    if np.any(rgb > 1):
        rgb = rgb / 255.0
    return tuple(float(v) for v in rgb)


def default_colors(names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """Anatomical colours where the name is known, otherwise distinct palette colours not used yet."""
    out: dict[str, tuple[float, float, float]] = {}
    for name in names:
        c = anatomy_color(name)
        if c is not None:
            out[name] = c
    used = {tuple(round(v * 255) for v in c) for c in out.values()}
    free = [c for c in FALLBACK_PALETTE if c not in used] or list(FALLBACK_PALETTE)
    i = 0
    for name in names:
        if name not in out:
            out[name] = tuple(v / 255.0 for v in free[i % len(free)])
            i += 1
    return out


__all__ = ["ANATOMY_COLORS", "FALLBACK_PALETTE", "anatomy_color", "default_colors", "parse_color"]
