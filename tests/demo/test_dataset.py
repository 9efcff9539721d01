"""The procedural data set and the analyser, on ground-truth drawings (no model)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from workers.demo.analyse import analyse, colour_error
from workers.demo.dataset import (
    COLORS,
    IMAGE_SIZE,
    PALETTE,
    POSITION_BOXES,
    SHAPES,
    SIZE_RANGES,
    SUPERSAMPLE,
    ShapeSpec,
    all_captions,
    caption,
    make_dataset,
    render,
    sample_spec,
    vertices,
)


def test_grammar() -> None:
    assert caption("red", "circle", "blue") == "a red circle on a blue background"
    assert (
        caption("yellow", "triangle", "black", "large", "top")
        == "a large yellow triangle at the top on a black background"
    )
    assert caption("white", "square", "green", "small", "left") == (
        "a small white square on the left on a green background"
    )
    assert len(COLORS) >= 8 and set(SHAPES) >= {"circle", "square", "triangle"}
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 8 * 7 * 3 * 3 * 6
    with pytest.raises(ValueError, match="differ"):
        caption("red", "circle", "red")
    with pytest.raises(ValueError, match="shape"):
        caption("red", "hexagon", "blue")


def test_specs_follow_the_rules() -> None:
    rng = random.Random(3)
    specs = [sample_spec(rng) for _ in range(2000)]
    assert all(s.fg != s.bg for s in specs)
    for s in specs:
        lo, hi = SIZE_RANGES[s.size]
        assert lo <= s.radius <= hi
        x0, x1, y0, y1 = POSITION_BOXES[s.position]
        assert x0 * IMAGE_SIZE <= s.cx <= x1 * IMAGE_SIZE
        assert y0 * IMAGE_SIZE <= s.cy <= y1 * IMAGE_SIZE
    # spread over the picture, not always centred; every word used
    xs = [s.cx for s in specs if s.position is None]
    assert min(xs) < 20 and max(xs) > 44
    assert {s.size for s in specs} == {None, "small", "large"}
    assert {s.position for s in specs} == {None, "left", "right", "top", "bottom", "center"}
    assert len({round(s.angle, 2) for s in specs}) > 500


def test_make_dataset_is_deterministic() -> None:
    a, sa = make_dataset(20, seed=5)
    b, sb = make_dataset(20, seed=5)
    assert a.shape == (20, IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb


def _score(pairs: list[tuple[Image.Image | np.ndarray, ShapeSpec]]) -> dict[str, float]:
    results = [(analyse(im), sp) for im, sp in pairs]
    n = len(results)
    return {
        "fg": sum(r.fg == s.fg for r, s in results) / n,
        "bg": sum(r.bg == s.bg for r, s in results) / n,
        "shape": sum(r.shape == s.shape for r, s in results) / n,
        "area": sum(abs(r.area - s.area) / s.area < 0.08 for r, s in results) / n,
        "centre": sum(math.hypot(r.cx - s.cx, r.cy - s.cy) < 1.0 for r, s in results) / n,
    }


def test_analyser_is_right_on_the_data_set() -> None:
    images, specs = make_dataset(200, seed=11)
    score = _score(list(zip(images, specs, strict=True)))
    assert score == {"fg": 1.0, "bg": 1.0, "shape": 1.0, "area": 1.0, "centre": 1.0}, score


def test_analyser_every_colour_pair_and_shape() -> None:
    rng = random.Random(0)
    pairs = []
    for fg in COLORS:
        for bg in COLORS:
            if fg != bg:
                for shape in SHAPES:
                    sp = sample_spec(rng, fg=fg, bg=bg, shape=shape, size="small")
                    pairs.append((render(sp), sp))
    score = _score(pairs)
    assert score["fg"] == score["bg"] == score["shape"] == 1.0, score


def _rounded(spec: ShapeSpec, corner_px: float) -> Image.Image:
    """The spec's shape with corners rounded to radius ``corner_px``: the polygon inset by
    that radius, grown back by a disc of it (Minkowski sum)."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), PALETTE[spec.bg])
    draw = ImageDraw.Draw(big)
    colour = PALETTE[spec.fg]
    cx, cy, rc = spec.cx * s, spec.cy * s, corner_px * s
    if spec.shape == "circle":
        r = spec.radius * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        n = 3 if spec.shape == "triangle" else 4
        outer = vertices(spec.shape, spec.radius * s, cx, cy, spec.angle)
        inset = [
            (
                cx + (x - cx) * (1 - rc / math.cos(math.pi / n) / math.dist((x, y), (cx, cy))),
                cy + (y - cy) * (1 - rc / math.cos(math.pi / n) / math.dist((x, y), (cx, cy))),
            )
            for x, y in outer
        ]
        draw.polygon(inset, fill=colour)
        for a, b in zip(inset, inset[1:] + inset[:1], strict=True):
            draw.line([a, b], fill=colour, width=round(2 * rc))
        for x, y in inset:
            draw.ellipse([x - rc, y - rc, x + rc, y + rc], fill=colour)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def test_analyser_not_fooled_by_rotation_rounding_blur_or_noise() -> None:
    rng = random.Random(7)
    nprng = np.random.default_rng(7)
    pairs = []
    for i in range(150):
        sp = sample_spec(rng, shape=SHAPES[i % 3])
        im = _rounded(sp, corner_px=0.3 * sp.radius)  # clearly rounded corners
        im = im.filter(ImageFilter.GaussianBlur(1.0))
        noisy = np.asarray(im, dtype=np.float32) + nprng.normal(0, 12, (64, 64, 3))
        pairs.append((np.clip(noisy, 0, 255).astype(np.uint8), sp))
    score = _score(pairs)
    assert score["fg"] == 1.0 and score["bg"] == 1.0, score
    assert score["shape"] >= 0.97, score


def test_analyser_on_a_plain_picture() -> None:
    r = analyse(Image.new("RGB", (64, 64), PALETTE["green"]))
    assert r.bg == "green" and r.fg is None and r.shape is None


def test_colour_error_is_small_on_drawings_and_large_for_other_colours() -> None:
    images, specs = make_dataset(40, seed=5)
    for image, spec in zip(images, specs, strict=True):
        a = analyse(image)
        assert colour_error(a, spec.fg, spec.bg) < 3.0, spec
        other = next(c for c in COLORS if c not in (spec.fg, spec.bg))
        assert colour_error(a, other, spec.bg) > 40.0, spec
    plain = analyse(Image.new("RGB", (64, 64), PALETTE["green"]))
    assert colour_error(plain, "green", "green") < 1.0  # no shape: read as the background
