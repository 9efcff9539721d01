"""The demo model on CPU: the farm's engine against diffusers' StableDiffusionPipeline on
the same weights and settings, in one run.

Both render the same prompts and seeds, 64x64, DPM++ 2M with Karras sigmas (the engine's
"DPM++ 2M"/"Automatic"; diffusers' DPMSolverMultistepScheduler, dpmsolver++, order 2,
use_karras_sigmas), the same steps and guidance, one CPU generator per image. The pipeline
is built from copies of the modules the engine loaded, so the weights are identical; it keeps
diffusers' own attention processors (the engine reuses the text context's cross-attention
keys and values across steps, see ``workers/engine/sd1.py``). Each
figure is the median of ``--runs`` timed renders after one warm-up render; the two sides
alternate run by run so that load from other processes hits both alike.

Usage: python bench/demo_model.py [--runs 5] [--steps 20] [--cfg 5] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from workers.demo import demo_checkpoint_path  # noqa: E402
from workers.demo.evaluate import quality_cases  # noqa: E402
from workers.demo.model import DEFAULT_CFG_SCALE, DEFAULT_STEPS  # noqa: E402


def build_pipeline(engine: Any, sc: dict[str, Any]) -> Any:
    """diffusers' StableDiffusionPipeline on copies of the engine's modules (same weights,
    diffusers' own attention processors); ``sc`` is the checkpoint's scheduler config."""
    import copy

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = copy.deepcopy(engine.unet)
    unet.set_attn_processor(AttnProcessor2_0())

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=sc.get("num_train_timesteps", 1000),
        beta_start=sc.get("beta_start", 0.00085),
        beta_end=sc.get("beta_end", 0.012),
        beta_schedule=sc.get("beta_schedule", "scaled_linear"),
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=True,
        steps_offset=sc.get("steps_offset", 1),
    )
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(engine.vae),
        text_encoder=copy.deepcopy(engine.text_encoder),
        tokenizer=engine.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts(n: int) -> list[str]:
    from workers.demo.dataset import caption

    cases = quality_cases()
    return [caption(*cases[i % len(cases)]) for i in range(n)]


def time_engine(engine: Any, n: int, steps: int, cfg: float) -> float:
    return render_engine(engine, n, steps, cfg)[0]


def render_engine(engine: Any, n: int, steps: int, cfg: float) -> tuple[float, list[Any]]:
    from workers.engine.base import BatchRequest, ImageRequest

    batch = BatchRequest(
        tuple(ImageRequest(p, "", 100 + i) for i, p in enumerate(prompts(n))),
        64,
        64,
        steps,
        cfg,
        "DPM++ 2M",
        "Automatic",
    )
    start = time.perf_counter()
    images = engine.render(batch)
    took = time.perf_counter() - start
    assert len(images) == n
    return took, images


def time_pipeline(pipe: Any, n: int, steps: int, cfg: float) -> float:
    return render_pipeline(pipe, n, steps, cfg)[0]


def render_pipeline(pipe: Any, n: int, steps: int, cfg: float) -> tuple[float, list[Any]]:
    import torch

    gens = [torch.Generator("cpu").manual_seed(100 + i) for i in range(n)]
    start = time.perf_counter()
    images = pipe(
        prompts(n),
        negative_prompt=[""] * n,
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=gens,
        output_type="pil",
    ).images
    took = time.perf_counter() - start
    assert len(images) == n
    return took, images


def main(argv: list[str] | None = None) -> int:
    import torch

    from workers.engine.loader import load_engine, read_header
    from workers.engine.sd1 import component_configs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=demo_checkpoint_path())
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG_SCALE)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)

    engine = load_engine(args.checkpoint)
    pipe = build_pipeline(engine, component_configs(read_header(args.checkpoint)[1])["scheduler"])
    rows: dict[int, dict[str, float]] = {}
    diffs: list[float] = []
    for n in args.batches:
        _, ours = render_engine(engine, n, args.steps, args.cfg)  # warm-up
        _, theirs = render_pipeline(pipe, n, args.steps, args.cfg)
        diffs += [
            float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())
            for a, b in zip(ours, theirs, strict=True)
        ]
        farm, diff = [], []
        for _ in range(args.runs):
            farm.append(time_engine(engine, n, args.steps, args.cfg))
            diff.append(time_pipeline(pipe, n, args.steps, args.cfg))
        rows[n] = {
            "engine_images_per_s": n / statistics.median(farm),
            "diffusers_images_per_s": n / statistics.median(diff),
        }

    print(
        f"demo model {args.checkpoint.name}, 64x64, DPM++ 2M Karras, {args.steps} steps, "
        f"cfg {args.cfg:g}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.runs}"
    )
    print(f"{'batch':>5} {'engine img/s':>14} {'diffusers img/s':>16} {'ratio':>7}")
    figures: dict[str, float | int | str] = {
        "steps": args.steps,
        "cfg_scale": args.cfg,
        "runs": args.runs,
        "torch_threads": torch.get_num_threads(),
    }
    for n, row in rows.items():
        ratio = row["engine_images_per_s"] / row["diffusers_images_per_s"]
        print(
            f"{n:>5} {row['engine_images_per_s']:>14.2f} "
            f"{row['diffusers_images_per_s']:>16.2f} {ratio:>7.3f}"
        )
        figures[f"engine_batch{n}_images_per_s"] = round(row["engine_images_per_s"], 3)
        figures[f"diffusers_batch{n}_images_per_s"] = round(row["diffusers_images_per_s"], 3)
        figures[f"engine_over_diffusers_batch{n}_ratio"] = round(ratio, 3)
    figures["mean_abs_pixel_difference_0_255"] = round(float(np.mean(diffs)), 2)
    print(
        f"same pictures? mean |engine - diffusers| = {figures['mean_abs_pixel_difference_0_255']}"
        " of 255 (diffusers rounds timesteps to integers, the engine does not)"
    )
    for n in rows:
        print(
            f"ratio engine / diffusers at batch {n}: "
            f"{figures[f'engine_over_diffusers_batch{n}_ratio']}"
        )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
