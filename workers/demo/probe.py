"""Does the demo model listen to each word of its prompt? A conditioning probe.

For pictures of the data set (a seed the training never drew), encoded by the checkpoint's
own VAE and noised at fixed timesteps with fixed noise, the UNet's denoising loss is
measured with the true caption and with one kind of word replaced by another value of that
kind (the foreground colour, the background colour, the shape, the size word, the position
word). A model that uses a word predicts the noise better with the true one, so the loss
rises when the word is swapped; a model that ignores a word shows no change. A word
matters at some noise levels more than others (the background colour where the noise
hides it, the shape where edges form), so the figure is the largest rise over the
timesteps probed. Sampling
accuracy needs many renders and an analyser; this needs a few forward passes and tells
which word a training run has not learned yet.

    python -m workers.demo.probe [--checkpoint PATH] [--pictures 256]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from workers.demo.dataset import COLORS, POSITIONS, SHAPES, ShapeSpec, caption, make_dataset

KINDS = ("fg", "bg", "shape", "size", "position")
TIMESTEPS = (100, 300, 500, 700, 900)
PROBE_SEED = 12345  # the data set of training uses seed 0


def swapped(spec: ShapeSpec, kind: str, rng: random.Random) -> str | None:
    """The caption of ``spec`` with one word of ``kind`` replaced, or None if it has none."""
    fg, bg, shape, size, pos = spec.fg, spec.bg, spec.shape, spec.size, spec.position
    if kind == "fg":
        fg = rng.choice([c for c in COLORS if c not in (spec.fg, spec.bg)])
    elif kind == "bg":
        bg = rng.choice([c for c in COLORS if c not in (spec.fg, spec.bg)])
    elif kind == "shape":
        shape = rng.choice([s for s in SHAPES if s != spec.shape])
    elif kind == "size":
        if size is None:
            return None
        size = "large" if size == "small" else "small"
    elif kind == "position":
        if pos is None:
            return None
        pos = rng.choice([p for p in POSITIONS if p != spec.position])
    return caption(fg, shape, bg, size, pos)


def probe(engine: Any, pictures: int = 256, seed: int = PROBE_SEED) -> dict[str, tuple[float, int]]:
    """Kind of word -> (largest relative rise of the mean denoising loss when that word is
    swapped, e.g. 0.05 = 5% worse; the timestep where it is largest), on the pictures
    whose caption has that word."""
    import torch

    images, specs = make_dataset(pictures, seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    with torch.no_grad():
        x0 = engine.vae.encode(x).latent_dist.mean * engine.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        acp = engine.alphas_cumprod.float()

        def losses(captions: list[str], rows: list[int]) -> list[float]:
            cond = engine.encode_prompts(captions)
            out = []
            for t in TIMESTEPS:
                a = acp[t]
                xt = a.sqrt() * x0[rows] + (1 - a).sqrt() * noise[rows]
                ts = torch.full((len(rows),), t)
                pred = engine.unet(xt, ts, encoder_hidden_states=cond).sample
                out.append(float((pred - noise[rows]).pow(2).mean()))
            return out

        report: dict[str, tuple[float, int]] = {}
        for kind in KINDS:
            pairs = [(i, swapped(s, kind, rng)) for i, s in enumerate(specs)]
            rows = [i for i, c in pairs if c is not None]
            true = losses([specs[i].caption for i in rows], rows)
            swap = losses([c for _, c in pairs if c is not None], rows)
            rises = [(b - a) / a for a, b in zip(true, swap, strict=True)]
            k = max(range(len(TIMESTEPS)), key=rises.__getitem__)
            report[kind] = (rises[k], TIMESTEPS[k])
    return report


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from workers.demo import demo_checkpoint_path
    from workers.engine.loader import load_engine

    parser = argparse.ArgumentParser(description="how much each word kind conditions the model")
    parser.add_argument("--checkpoint", type=Path, default=demo_checkpoint_path())
    parser.add_argument("--pictures", type=int, default=256)
    args = parser.parse_args(argv)
    report = probe(load_engine(args.checkpoint), args.pictures)
    for kind, (rise, t) in report.items():
        print(f"{kind:9} swapped: denoising loss up to {rise:+.2%} (at t={t})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
