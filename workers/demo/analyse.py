"""Read a demo picture back: background colour, foreground colour, shape, area and centre.

Written from the drawing rules in ``dataset.py`` (a plain background in one palette colour,
one filled shape in another), not from the model, with numpy and PIL only:

1. background: the palette colour nearest to most pixels of the picture's border ring;
2. foreground: among pixels far from the measured background colour, the palette colour
   that most of them (weighted by their distance from the background) are nearest to;
3. coverage: each pixel's position on the line from the background to the foreground
   colour (0..1), which undoes anti-aliasing and blur; the shape is the largest
   4-connected blob of covered pixels, its area the sum of coverage, its centre the
   coverage-weighted centroid;
4. shape: a circle, square and equilateral triangle of the same area and centre are laid
   over the coverage map, the polygons at every rotation (3 degree steps), each with its
   edges softened like the picture's; the best overlap (soft IoU) wins. Rotation cannot
   fool it and rounded or blurred corners only lower all overlaps a little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from workers.demo.dataset import CIRCUMRADIUS, PALETTE, SHAPES

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)
BORDER = 2  # px ring read for the background
MIN_CONTRAST = 60.0  # RGB distance from the background that counts as "shape"


@dataclass(frozen=True)
class Analysis:
    bg: str
    fg: str | None  # None when nothing stands out from the background
    shape: str | None
    area: float  # px covered by the shape (sum of coverage)
    cx: float  # centre in px, x to the right
    cy: float  # y downwards
    fit: float  # the winning template's soft IoU (1 = perfect)
    bg_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # median colour of the background
    fg_rgb: tuple[float, float, float] | None = None  # median colour of the shape

    def matches(self, fg: str, bg: str, shape: str) -> bool:
        return self.fg == fg and self.bg == bg and self.shape == shape


def nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """Index into ``PALETTE`` of the nearest colour of each RGB pixel (..., 3)."""
    d = ((pixels[..., None, :].astype(np.float32) - _RGB) ** 2).sum(-1)
    return d.argmin(-1)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (iterative flood fill)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _template_iou(coverage: np.ndarray, area: float, cx: float, cy: float) -> dict[str, float]:
    """Best soft IoU of each shape of the given area and centre over the coverage map."""
    h, w = coverage.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    px, py = xs + 0.5 - cx, ys + 0.5 - cy  # pixel centres relative to the shape's centre
    radius = math.sqrt(max(area, 1.0) / math.pi)
    scores: dict[str, float] = {}
    for shape in SHAPES:
        if shape == "circle":
            sdf = (np.sqrt(px**2 + py**2) - radius)[None]
        else:
            n = 3 if shape == "triangle" else 4
            apothem = radius * CIRCUMRADIUS[shape] * math.cos(math.pi / n)
            period = 2 * math.pi / n
            angles = np.arange(0, period, math.radians(3), dtype=np.float32)
            # signed distance of a convex regular polygon: max over edge normals
            normals = angles[:, None] + np.pi / n + period * np.arange(n)[None, :]
            nx, ny = np.cos(normals), np.sin(normals)  # (rotations, n)
            proj = px[None, None] * nx[..., None, None] + py[None, None] * ny[..., None, None]
            sdf = proj.max(axis=1) - apothem
        template = np.clip(0.5 - sdf, 0.0, 1.0)  # one-pixel soft edge
        inter = np.minimum(template, coverage[None]).sum(axis=(1, 2))
        union = np.maximum(template, coverage[None]).sum(axis=(1, 2))
        scores[shape] = float((inter / np.maximum(union, 1e-6)).max())
    return scores


def analyse(image: Image.Image | np.ndarray) -> Analysis:
    """Background, foreground, shape, area and centre of one demo picture."""
    rgb = np.asarray(
        image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32
    )
    h, w, _ = rgb.shape
    ring = np.ones((h, w), dtype=bool)
    ring[BORDER : h - BORDER, BORDER : w - BORDER] = False
    border_labels = nearest_palette(rgb[ring])
    bg_idx = int(np.bincount(border_labels, minlength=len(_NAMES)).argmax())
    bg_rgb = np.median(rgb[ring][border_labels == bg_idx], axis=0)

    dist_bg = np.sqrt(((rgb - bg_rgb) ** 2).sum(-1))
    candidates = dist_bg > MIN_CONTRAST
    labels = nearest_palette(rgb)
    votes = np.bincount(labels[candidates], weights=dist_bg[candidates], minlength=len(_NAMES))
    votes[bg_idx] = 0.0
    if not candidates.any() or votes.max() <= 0:
        return Analysis(_NAMES[bg_idx], None, None, 0.0, w / 2, h / 2, 0.0, _rgb(bg_rgb))
    fg_idx = int(votes.argmax())
    fg_pixels = rgb[candidates & (labels == fg_idx)]
    fg_rgb = np.median(fg_pixels, axis=0) if len(fg_pixels) else _RGB[fg_idx]

    axis = fg_rgb - bg_rgb
    coverage = np.clip(((rgb - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    blob = _largest_blob(coverage > 0.5)
    if not blob.any():
        return Analysis(
            _NAMES[bg_idx], _NAMES[fg_idx], None, 0.0, w / 2, h / 2, 0.0, _rgb(bg_rgb), _rgb(fg_rgb)
        )
    # keep the blob and its soft rim (one pixel around it), drop specks elsewhere
    rim = blob.copy()
    rim[1:] |= blob[:-1]
    rim[:-1] |= blob[1:]
    rim[:, 1:] |= blob[:, :-1]
    rim[:, :-1] |= blob[:, 1:]
    coverage = np.where(rim, coverage, 0.0).astype(np.float32)
    area = float(coverage.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cx = float((coverage * (xs + 0.5)).sum() / area)
    cy = float((coverage * (ys + 0.5)).sum() / area)
    scores = _template_iou(coverage, area, cx, cy)
    shape = max(scores, key=scores.__getitem__)
    return Analysis(
        _NAMES[bg_idx],
        _NAMES[fg_idx],
        shape,
        area,
        cx,
        cy,
        scores[shape],
        _rgb(bg_rgb),
        _rgb(fg_rgb),
    )


def _rgb(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def colour_error(a: Analysis, fg: str, bg: str) -> float:
    """Mean RGB distance (0..441) of the measured shape and background colours from the
    palette colours asked for; a missing shape counts as the background's colour."""
    fg_rgb = np.array(a.fg_rgb if a.fg_rgb is not None else a.bg_rgb, dtype=np.float32)
    d_fg = float(np.linalg.norm(fg_rgb - np.array(PALETTE[fg], dtype=np.float32)))
    d_bg = float(np.linalg.norm(np.array(a.bg_rgb) - np.array(PALETTE[bg], dtype=np.float32)))
    return (d_fg + d_bg) / 2
