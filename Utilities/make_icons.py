#!/usr/bin/env python3
"""Draw the extension and module icons (128x128 PNG) with Pillow, so they can be regenerated and restyled.

    python Utilities/make_icons.py

M3D.png and M3DAssistant.png: a CT volume (isometric cube with slice lines) and a speech bubble — a model that
talks about the volume. M3DTraining.png: the same volume with a falling loss curve — a model that learns from it.
Drawn at 4x and downsampled for smooth edges.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE = 128
SCALE = 4  # supersampling factor

# Colours: a blue-grey volume (CT) and a teal accent.
TOP = (168, 205, 238)
LEFT = (74, 130, 190)
RIGHT = (42, 86, 146)
EDGE = (20, 40, 72)
SLICE = (230, 240, 250)
ACCENT = (0, 150, 136)
ACCENT_DARK = (0, 105, 92)
WHITE = (255, 255, 255)


def _s(*values: float) -> list[float]:
    return [v * SCALE for v in values]


def _cube(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    """Isometric cube centred at (cx, cy) with edge length ~r; slice lines on the two side faces."""
    h = r * 0.5  # vertical offset of the isometric top face
    top = [(cx, cy - r), (cx + r, cy - r + h), (cx, cy - r + 2 * h), (cx - r, cy - r + h)]
    left = [(cx - r, cy - r + h), (cx, cy - r + 2 * h), (cx, cy + r), (cx - r, cy + r - h)]
    right = [(cx, cy - r + 2 * h), (cx + r, cy - r + h), (cx + r, cy + r - h), (cx, cy + r)]
    width = int(2.5 * SCALE)
    for face, colour in ((left, LEFT), (right, RIGHT), (top, TOP)):
        draw.polygon([tuple(_s(x, y)) for x, y in face], fill=colour)
    # Axial slices: lines parallel to the top face's lower edges on both side faces.
    n = 4
    for i in range(1, n):
        t = i / n
        dy = t * (2 * r - 2 * h)
        draw.line(_s(cx - r, cy - r + h + dy, cx, cy - r + 2 * h + dy), fill=SLICE, width=int(1.2 * SCALE))
        draw.line(_s(cx, cy - r + 2 * h + dy, cx + r, cy - r + h + dy), fill=SLICE, width=int(1.2 * SCALE))
    # A highlighted structure (an organ) on the top face.
    draw.ellipse(_s(cx - r * 0.35, cy - r + h * 0.55, cx + r * 0.35, cy - r + h * 1.45), fill=(240, 120, 100))
    for face in (top, left, right):
        draw.line([tuple(_s(x, y)) for x, y in face + face[:1]], fill=EDGE, width=width, joint="curve")


def _bubble(draw: ImageDraw.ImageDraw) -> None:
    """Speech bubble in the upper right with three dots; its tail points at the volume."""
    box = (58, 6, 122, 50)
    draw.polygon([tuple(_s(x, y)) for x, y in ((70, 44), (62, 62), (84, 46))], fill=ACCENT_DARK)
    draw.rounded_rectangle(_s(*box), radius=12 * SCALE, fill=ACCENT, outline=ACCENT_DARK, width=3 * SCALE)
    draw.polygon([tuple(_s(x, y)) for x, y in ((72, 44), (66, 56), (82, 45))], fill=ACCENT)
    for x in (75, 90, 105):
        draw.ellipse(_s(x - 5, 28 - 5, x + 5, 28 + 5), fill=WHITE)


def _loss_curve(draw: ImageDraw.ImageDraw) -> None:
    """Rounded badge in the upper right with axes and a falling training-loss curve."""
    draw.rounded_rectangle(_s(60, 4, 124, 56), radius=10 * SCALE, fill=WHITE, outline=ACCENT_DARK, width=3 * SCALE)
    draw.line(_s(70, 12, 70, 48, 116, 48), fill=EDGE, width=int(2.5 * SCALE), joint="curve")
    points = [(72 + 4 * i, 14 + 30 * (1 - 0.78 ** i)) for i in range(11)]
    draw.line([tuple(_s(x, y)) for x, y in points], fill=ACCENT, width=4 * SCALE, joint="curve")
    draw.ellipse(_s(points[-1][0] - 4, points[-1][1] - 4, points[-1][0] + 4, points[-1][1] + 4), fill=(240, 120, 100))


def draw_icon(variant: str) -> Image.Image:
    """Return a 128x128 RGBA icon; ``variant`` is "assistant" or "training"."""
    image = Image.new("RGBA", (SIZE * SCALE, SIZE * SCALE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    _cube(draw, cx=46, cy=80, r=40)
    if variant == "assistant":
        _bubble(draw)
    elif variant == "training":
        _loss_curve(draw)
    else:
        raise ValueError(f"unknown icon variant {variant!r}; use 'assistant' or 'training'")
    return image.resize((SIZE, SIZE), Image.LANCZOS)


ICONS = {
    "M3D.png": "assistant",
    "M3DAssistant/Resources/Icons/M3DAssistant.png": "assistant",
    "M3DTraining/Resources/Icons/M3DTraining.png": "training",
}


def main() -> None:
    for relative, variant in ICONS.items():
        path = REPO_ROOT / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_icon(variant).save(path, optimize=True)
        print(f"wrote {relative}")


if __name__ == "__main__":
    main()
