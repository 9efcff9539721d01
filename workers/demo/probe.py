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

It also measures how much of a picture's layout survives the noise at the highest
timesteps (``layout_leak``): the SD1 schedule ends at alpha-bar 0.0047 at t = 999, not 0,
so a noised training picture still carries 6.8% of its latent, enough to tell a picture
from its mirror image far more often than chance. A model trained on that learns to read
layout from the noise; sampling starts from pure noise, whose random lumps then decide
where the shape goes.

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
                target = noise[rows]
                if engine.prediction_type == "v_prediction":
                    target = a.sqrt() * noise[rows] - (1 - a).sqrt() * x0[rows]
                out.append(float((pred - target).pow(2).mean()))
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


LEAK_TIMESTEPS = (999, 950, 900, 800)


def layout_leak(
    engine: Any, pictures: int = 256, seed: int = PROBE_SEED, draws: int = 5
) -> dict[int, float]:
    """Timestep -> share of noised pictures from which an ideal observer that knows the
    picture tells it from its mirror image (left-right and top-bottom): the sign of the
    log-likelihood ratio of the two, the best any denoiser knowing the colours and shape
    (the caption says them) can do about layout without a position word. 0.5 is chance."""
    import torch

    images, _ = make_dataset(pictures, seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    gen = torch.Generator().manual_seed(seed)
    acp = engine.alphas_cumprod.float()
    with torch.no_grad():
        x0 = engine.vae.encode(x).latent_dist.mean * engine.vae.config.scaling_factor
    out: dict[int, float] = {}
    for t in LEAK_TIMESTEPS:
        a = acp[t]
        right = total = 0
        for dim in (3, 2):  # mirrored left-right, then top-bottom
            mirror = x0.flip(dim)
            diff = x0 - mirror
            usable = diff.flatten(1).norm(dim=1) > 1e-3  # a symmetric picture has no mirror
            for _ in range(draws):
                xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
                score = ((xt - a.sqrt() * (x0 + mirror) / 2) * diff).flatten(1).sum(1)
                right += int((score[usable] > 0).sum())
                total += int(usable.sum())
        out[t] = right / total
    return out


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
    engine = load_engine(args.checkpoint)
    report = probe(engine, args.pictures)
    for kind, (rise, t) in report.items():
        print(f"{kind:9} swapped: denoising loss up to {rise:+.2%} (at t={t})")
    for t, share in layout_leak(engine, args.pictures).items():
        print(f"t={t}: a picture told from its mirror image in {share:.1%} of noised copies")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
