"""The demo model's procedural data set: one flat shape on a plain background.

The caption grammar, defined here and nowhere else::

    caption  := "a " [size " "] color " " shape [" " position] " on a " color " background"
    size     := "small" | "large"
    position := "on the left" | "on the right" | "at the top" | "at the bottom"
              | "in the center"

e.g. "a red circle on a blue background", "a large yellow triangle at the top on a black
background". Foreground and background colours always differ.

Drawing rules (the analyser in ``analyse.py`` is written from these, not from the model):

- the picture is ``IMAGE_SIZE`` square, filled with the background's ``PALETTE`` colour;
- one shape in the foreground's ``PALETTE`` colour, drawn 4x supersampled, so edges are
  anti-aliased; circle, square or equilateral triangle, rotated uniformly at random;
- its size is its *equivalent radius* ``r``: every shape of radius ``r`` has the area of a
  circle of radius ``r``; "small" draws ``r`` from ``SIZE_RANGES["small"]``, "large" from
  ``SIZE_RANGES["large"]``, no size word from the whole range;
- its centre (centroid) lies where the whole shape fits in the picture; a position word
  restricts the centre to ``POSITION_BOXES[word]`` (fractions of the picture's side), so
  "left" means the centre is in the left 40%; without one the centre is anywhere it fits.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 180),
    "orange": (250, 140, 10),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# equivalent radius in pixels (at IMAGE_SIZE)
SIZE_RANGES: dict[str | None, tuple[float, float]] = {
    "small": (6.5, 9.0),
    "large": (13.0, 16.0),
    None: (6.5, 16.0),
}
# allowed centre box (x0, x1, y0, y1) as fractions of the side; y grows downwards
POSITION_BOXES: dict[str | None, tuple[float, float, float, float]] = {
    "left": (0.0, 0.4, 0.0, 1.0),
    "right": (0.6, 1.0, 0.0, 1.0),
    "top": (0.0, 1.0, 0.0, 0.4),
    "bottom": (0.0, 1.0, 0.6, 1.0),
    "center": (0.4, 0.6, 0.4, 0.6),
    None: (0.0, 1.0, 0.0, 1.0),
}
# circumradius / equivalent radius of each polygon (equal areas)
CIRCUMRADIUS: dict[str, float] = {
    "circle": 1.0,
    "square": math.sqrt(math.pi / 2),  # side s = r*sqrt(pi); circumradius s/sqrt(2)
    "triangle": math.sqrt(4 * math.pi / (3 * math.sqrt(3))),  # area 3*sqrt(3)/4 * R^2
}
N_VERTICES = {"square": 4, "triangle": 3}


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one picture."""

    fg: str
    bg: str
    shape: str
    size: str | None  # size word in the caption, or None
    position: str | None  # position word in the caption, or None
    radius: float  # equivalent radius, px
    cx: float  # centre, px (x to the right, y down)
    cy: float
    angle: float  # rotation, radians

    @property
    def caption(self) -> str:
        return caption(self.fg, self.shape, self.bg, self.size, self.position)

    @property
    def area(self) -> float:
        return math.pi * self.radius**2


def caption(
    fg: str, shape: str, bg: str, size: str | None = None, position: str | None = None
) -> str:
    """The one caption grammar (see the module docstring)."""
    if fg not in PALETTE or bg not in PALETTE:
        raise ValueError(f"colours must be among {', '.join(COLORS)}: {fg!r}, {bg!r}")
    if fg == bg:
        raise ValueError(f"foreground and background must differ (both {fg!r})")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}: {shape!r}")
    if size is not None and size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)} or None: {size!r}")
    if position is not None and position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)} or None: {position!r}")
    words = ["a"] + ([size] if size else []) + [fg, shape]
    if position:
        words.append(POSITION_PHRASES[position])
    return " ".join(words + ["on a", bg, "background"])


def vertices(
    shape: str, radius: float, cx: float, cy: float, angle: float
) -> list[tuple[float, float]]:
    """Polygon vertices (square/triangle) of a shape of equivalent radius ``radius``."""
    n = N_VERTICES[shape]
    big_r = radius * CIRCUMRADIUS[shape]
    return [
        (
            cx + big_r * math.cos(angle + 2 * math.pi * k / n),
            cy + big_r * math.sin(angle + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def extent(shape: str, radius: float, angle: float) -> tuple[float, float]:
    """Half-width and half-height of the shape's bounding box around its centre."""
    if shape == "circle":
        return radius, radius
    pts = vertices(shape, radius, 0.0, 0.0, angle)
    return max(abs(x) for x, _ in pts), max(abs(y) for _, y in pts)


def sample_spec(
    rng: random.Random,
    size: str | None = None,
    position: str | None = None,
    fg: str | None = None,
    bg: str | None = None,
    shape: str | None = None,
    p_size: float = 2 / 3,
    p_position: float = 0.5,
    size_px: int = IMAGE_SIZE,
) -> ShapeSpec:
    """A random picture; fixed fields are kept, the others drawn. Without an explicit
    ``size``/``position`` a size word is used with probability ``p_size`` (small or
    large alike) and a position word with probability ``p_position``."""
    fg = fg or rng.choice(COLORS)
    bg = bg or rng.choice([c for c in COLORS if c != fg])
    shape = shape or rng.choice(SHAPES)
    if size is None and rng.random() < p_size:
        size = rng.choice(SIZES)
    if position is None and rng.random() < p_position:
        position = rng.choice(POSITIONS)
    lo, hi = SIZE_RANGES[size]
    radius = rng.uniform(lo, hi) * size_px / IMAGE_SIZE
    angle = rng.uniform(0, 2 * math.pi)
    ex, ey = extent(shape, radius, angle)
    x0, x1, y0, y1 = POSITION_BOXES[position]
    margin = 0.5  # px kept free around the shape
    cx = _uniform_in(rng, x0 * size_px, x1 * size_px, ex + margin, size_px - ex - margin)
    cy = _uniform_in(rng, y0 * size_px, y1 * size_px, ey + margin, size_px - ey - margin)
    return ShapeSpec(fg, bg, shape, size, position, radius, cx, cy, angle)


def _uniform_in(rng: random.Random, lo: float, hi: float, fit_lo: float, fit_hi: float) -> float:
    """Uniform in [lo, hi] intersected with [fit_lo, fit_hi]; if they miss each other, the
    end of the box nearest to where it fits (the position word wins over a clipped edge)."""
    a, b = max(lo, fit_lo), min(hi, fit_hi)
    if a <= b:
        return rng.uniform(a, b)
    return hi if fit_lo > hi else lo


def render(spec: ShapeSpec, size_px: int = IMAGE_SIZE) -> Image.Image:
    """Draw one picture (RGB, ``size_px`` square) following the drawing rules."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (size_px * s, size_px * s), PALETTE[spec.bg])
    draw = ImageDraw.Draw(big)
    colour = PALETTE[spec.fg]
    # pixel centres sit at +0.5: scale the continuous coordinates, not the pixel indices
    if spec.shape == "circle":
        r = spec.radius * s
        cx, cy = spec.cx * s - 0.5, spec.cy * s - 0.5
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        pts = vertices(
            spec.shape, spec.radius * s, spec.cx * s - 0.5, spec.cy * s - 0.5, spec.angle
        )
        draw.polygon(pts, fill=colour)
    return big.resize((size_px, size_px), Image.Resampling.BOX)


def make_dataset(
    n: int, seed: int, size_px: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[ShapeSpec]]:
    """``n`` pictures as a uint8 array (n, size, size, 3) and their specs; deterministic."""
    rng = random.Random(seed)
    specs = [sample_spec(rng, size_px=size_px) for _ in range(n)]
    images = np.stack([np.asarray(render(sp, size_px)) for sp in specs])
    return images, specs


def all_captions() -> list[str]:
    """Every caption the grammar produces (8*7*3*3*6 = 3,024)."""
    return [
        caption(fg, shape, bg, size, pos)
        for fg in COLORS
        for bg in COLORS
        if bg != fg
        for shape in SHAPES
        for size in (None, *SIZES)
        for pos in (None, *POSITIONS)
    ]
