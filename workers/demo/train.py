"""Train the demo model from scratch on the procedural data set, on CPU.

    python -m workers.demo.train --config full --out DIR --seed 0

Stages: (1) the VAE on pictures (L1 + MSE per pixel, KL weighed per pixel too), (2) the
pictures encoded once by the frozen VAE, (3) the UNet and the CLIP text encoder together on
those latents (epsilon prediction weighted towards high noise, 10% empty captions for
classifier-free guidance, EMA weights), (4) the decoder alone on those latents, (5) position
words: the UNet and text encoder learn that the word, not the lumps of the start noise,
decides where the shape goes (``train_position``). The result is one original-layout
single-file checkpoint (fp16, configs in the safetensors metadata) that
``workers.engine.loader.load_engine`` loads like any SD1 file.

Everything is seeded and runs a fixed number of steps. State is saved to
``DIR/state.pt`` every ``--save-every`` seconds and at each stage's end; running the same
command again resumes from there (same data, same RNG states), so an interrupted run
finishes as the uninterrupted one would, up to floating-point thread scheduling. The log
(``DIR/train.log``) records each logged step's wall time and process CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workers.demo import model as M
from workers.demo.dataset import make_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# idle OpenMP threads sleep instead of spinning at barriers (the same speed measured alone)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass(frozen=True)
class TrainConfig:
    name: str
    n_images: int
    vae_steps: int
    vae_batch: int
    vae_lr: float
    unet_steps: int
    unet_batch: int
    unet_lr: float
    decoder_steps: int
    decoder_batch: int
    decoder_lr: float
    log_every: int
    vae_config: dict[str, Any] = field(default_factory=lambda: dict(M.VAE_CONFIG))
    unet_config: dict[str, Any] = field(default_factory=lambda: dict(M.UNET_CONFIG))
    text_encoder_config: dict[str, Any] = field(default_factory=lambda: dict(M.TEXT_ENCODER_CONFIG))
    kl_weight: float = 1e-3  # on KL summed per picture / values per picture
    uncond_prob: float = 0.1  # empty caption, for classifier-free guidance
    # eps loss weighted by clamp(1/SNR, 1, max_loss_weight): more weight where the noise
    # dominates (SNR < 1), where background colour and layout are decided and a plain eps
    # loss barely sees them (a trial with min-SNR weighting learned foreground colours by
    # step 440, backgrounds not). Capped low: at 50, 92% of the weight fell on t >= 600,
    # where the best prediction is the mean colour, and the run learned colours only
    max_loss_weight: float = 50.0
    # the text encoder learns at this fraction of the UNet's rate: at the full rate it
    # soon carried colour words only (its outputs for "circle" and "square" at cosine 0.98)
    text_encoder_lr_scale: float = 1.0
    ema_decay: float = 0.995
    warmup_steps: int = 100
    # stage 5, position words (see train_position): steps, lesson pairs drawn for it,
    # peak learning rate (warm-up, cosine to 10%; the text encoder at the same rate), share
    # of each batch that is a placement lesson, the lowest timestep of a lesson, and the
    # lessons' loss weight against the plain half's
    position_steps: int = 0
    position_pairs: int = 3000
    position_lr: float = 2e-4
    position_share: float = 0.5
    position_min_t: int = 800
    position_lesson_weight: float = 2.0
    # torch threads. Spinning OpenMP threads ran 4-12x slower per step on a shared machine
    # (load 16); OMP_WAIT_POLICY=PASSIVE, set above, makes them sleep instead
    threads: int = 1


CONFIGS: dict[str, TrainConfig] = {
    "full": TrainConfig(
        name="full",
        n_images=16_000,
        vae_steps=1000,
        vae_batch=16,
        vae_lr=1e-3,
        unet_steps=2800,
        unet_batch=64,
        unet_lr=6e-4,
        decoder_steps=300,
        decoder_batch=16,
        decoder_lr=2e-4,
        log_every=25,
        max_loss_weight=3.0,
        text_encoder_lr_scale=0.1,
        position_steps=400,
        threads=2,
    ),
    "smoke": TrainConfig(
        name="smoke",
        n_images=128,
        vae_steps=20,
        vae_batch=8,
        vae_lr=2e-3,
        unet_steps=30,
        unet_batch=16,
        unet_lr=1e-3,
        decoder_steps=3,
        decoder_batch=8,
        decoder_lr=1e-4,
        log_every=5,
        warmup_steps=5,
        position_steps=4,
        position_pairs=48,
        vae_config=dict(M.SMOKE_VAE_CONFIG),
        unet_config=dict(M.SMOKE_UNET_CONFIG),
        text_encoder_config=dict(M.SMOKE_TEXT_ENCODER_CONFIG),
    ),
}
CHECKPOINT_NAME = "demo-shapes.safetensors"
STAGES = ["vae", "encode", "unet", "decoder", "position", "done"]
# a placement lesson noises a picture of the same caption drawn in the opposite place
OPPOSITE = {
    "left": ("right",),
    "right": ("left",),
    "top": ("bottom",),
    "bottom": ("top",),
    "center": ("left", "right", "top", "bottom"),
}


class Clock:
    """Wall and process CPU seconds since the run started, carried across resumes."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self.base_wall, self.base_cpu = wall, cpu
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return self.base_wall + time.perf_counter() - self.t0

    def cpu(self) -> float:
        return self.base_cpu + time.process_time() - self.c0


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, seed: int, save_every: float) -> None:
        import torch

        self.torch = torch
        self.cfg, self.out, self.seed, self.save_every = cfg, out, seed, save_every
        out.mkdir(parents=True, exist_ok=True)
        self.state_path = out / "state.pt"
        self.log_file = (out / "train.log").open("a")
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(seed)
        self.vae, self.unet, self.text_encoder = M.build_modules(
            cfg.vae_config, cfg.unet_config, cfg.text_encoder_config
        )
        self.gen = torch.Generator().manual_seed(seed + 1)  # batches, noise, timesteps
        self.stage, self.step = "vae", 0
        self.losses: dict[str, list[tuple[int, float]]] = {
            "vae": [],
            "unet": [],
            "decoder": [],
            "position": [],
        }
        self.opt: Any = None
        self.ema: dict[str, Any] | None = None
        self.latents: Any = None  # (n, 2, C, h, w): posterior mean and std
        self.clock = Clock()
        self.last_save = time.perf_counter()
        self.images, specs = make_dataset(cfg.n_images, seed)
        self.captions = [s.caption for s in specs]

    # ------------------------------------------------------------------ bookkeeping

    def log(self, msg: str) -> None:
        line = f"[{self.clock.wall():8.1f}s wall {self.clock.cpu():8.1f}s cpu] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save_state(self) -> None:
        torch = self.torch
        state = {
            "config": asdict(self.cfg),
            "seed": self.seed,
            "stage": self.stage,
            "step": self.step,
            "losses": self.losses,
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "opt": self.opt.state_dict() if self.opt is not None else None,
            "ema": self.ema,
            "scaling_factor": self.vae.config.scaling_factor,
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "wall": self.clock.wall(),
            "cpu": self.clock.cpu(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)
        self.last_save = time.perf_counter()

    def maybe_save(self) -> None:
        if time.perf_counter() - self.last_save >= self.save_every:
            self.save_state()

    def resume(self) -> bool:
        if not self.state_path.exists():
            return False
        torch = self.torch
        state = torch.load(self.state_path, weights_only=False)
        if state["config"] != asdict(self.cfg) or state["seed"] != self.seed:
            raise SystemExit(
                f"{self.state_path} belongs to another config or seed; "
                "remove it or pick another --out"
            )
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.stage, self.step = state["stage"], state["step"]
        self.losses.update(state["losses"])
        self.ema = state["ema"]
        if (self.out / "latents.pt").exists():
            self.latents = torch.load(self.out / "latents.pt")
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.clock = Clock(state["wall"], state["cpu"])
        self._pending_opt = state["opt"]
        self.log(f"resumed at stage {self.stage} step {self.step}")
        return True

    def make_optimizer(
        self,
        groups: list[tuple[list[Any], float]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        """AdamW over (tensors, scale) groups, each learning at ``lr`` times its scale."""
        self.opt = self.torch.optim.AdamW(
            [{"params": params, "lr_scale": scale, "lr": lr * scale} for params, scale in groups],
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
        )
        pending = getattr(self, "_pending_opt", None)
        if pending is not None:
            self.opt.load_state_dict(pending)
            self._pending_opt = None

    def set_lr(self, base_lr: float, step: int, total: int) -> None:
        """Linear warm-up, then cosine down to 10%."""
        warm = min(self.cfg.warmup_steps, max(total // 10, 1))
        if step < warm:
            lr = base_lr * (step + 1) / warm
        else:
            p = (step - warm) / max(total - warm, 1)
            lr = base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def record(self, stage: str, losses: list[float]) -> None:
        mean = float(np.mean(losses))
        self.losses[stage].append((self.step, mean))
        lr = self.opt.param_groups[0]["lr"]
        self.log(f"{stage} step {self.step:5d} loss {mean:.5f} lr {lr:.2e}")

    def pixels(self, idx: Any) -> Any:
        x = self.torch.from_numpy(self.images[idx.numpy()]).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    # ------------------------------------------------------------------ stages

    def vae_loss(self, x: Any, decoder_only: bool = False) -> Any:
        torch = self.torch
        if decoder_only:
            z = self.sample_latents(self.batch_idx) / self.vae.config.scaling_factor
            kl = torch.zeros(())
        else:
            post = self.vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=self.gen)
            kl = post.kl().mean() / x[0].numel()
        rec = self.vae.decode(z).sample
        err = rec - x
        return err.abs().mean() + err.pow(2).mean() + self.cfg.kl_weight * kl

    def train_vae(self, decoder_only: bool = False) -> None:
        torch, cfg = self.torch, self.cfg
        stage = "decoder" if decoder_only else "vae"
        steps = cfg.decoder_steps if decoder_only else cfg.vae_steps
        batch = cfg.decoder_batch if decoder_only else cfg.vae_batch
        base_lr = cfg.decoder_lr if decoder_only else cfg.vae_lr
        module = self.vae.decoder if decoder_only else self.vae
        if decoder_only:
            params = list(self.vae.decoder.parameters()) + list(
                self.vae.post_quant_conv.parameters()
            )
        else:
            params = list(module.parameters())
        self.vae.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.vae.train()
        self.make_optimizer([(params, 1.0)], base_lr)
        if self.step == 0 and decoder_only:
            self.gen.manual_seed(self.seed + 3)  # a stage's randomness depends on the seed only
        window: list[float] = []
        while self.step < steps:
            self.set_lr(base_lr, self.step, steps)
            self.batch_idx = torch.randint(0, cfg.n_images, (batch,), generator=self.gen)
            loss = self.vae_loss(self.pixels(self.batch_idx), decoder_only)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            window.append(loss.item())
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == steps:
                self.record(stage, window)
                window = []
            self.maybe_save()
        self.vae.eval().requires_grad_(False)

    def encode_pictures(self, pictures: Any) -> Any:
        """(n, 2, C, h, w): the VAE's posterior mean and std of uint8 (n, H, W, 3) pictures,
        256 at a time."""
        torch = self.torch
        chunks = []
        with torch.no_grad():
            for start in range(0, len(pictures), 256):
                x = torch.from_numpy(np.asarray(pictures[start : start + 256]))
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                post = self.vae.encode(x).latent_dist
                chunks.append(torch.stack([post.mean, post.std], dim=1))
        return torch.cat(chunks)

    def encode_dataset(self) -> None:
        """Posterior mean and std of every picture; sets the VAE's scaling factor."""
        torch = self.torch
        self.latents = self.encode_pictures(self.images)
        torch.save(self.latents, self.out / "latents.pt")  # written once, read on resume
        std = float(self.latents[:, 0].std())
        self.vae.register_to_config(scaling_factor=1.0 / std)
        mean = self.latents[:, 0].mean(dim=(0, 2, 3)).tolist()
        self.save_reconstructions(self.out / "vae_reconstructions.png")
        self.log(
            f"encoded {len(self.latents)} pictures: latent std {std:.4f} -> scaling "
            f"factor {1 / std:.4f}; channel means {[round(m, 3) for m in mean]}"
        )

    def save_reconstructions(self, path: Path, n: int = 8) -> None:
        """First row: pictures of the data set; second row: the VAE's reconstructions."""
        from PIL import Image

        torch = self.torch
        idx = torch.arange(n)
        with torch.no_grad():
            z = self.latents[idx, 0]
            rec = self.vae.decode(z).sample.clamp(-1, 1)
        rows = [self.images[:n], ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()]
        grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
        Image.fromarray(grid).save(path)

    def sample_latents(self, idx: Any) -> Any:
        lat = self.latents[idx]
        z = lat[:, 0] + lat[:, 1] * self.torch.randn(lat[:, 0].shape, generator=self.gen)
        return z * self.vae.config.scaling_factor

    def tokenize_captions(self, captions: list[str] | None = None) -> tuple[Any, Any]:
        from workers.engine.sd1 import MAX_TOKENS, load_tokenizer

        tok = load_tokenizer()
        ids = tok(
            self.captions if captions is None else captions,
            padding="max_length",
            max_length=MAX_TOKENS,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        empty = tok(
            [""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt"
        ).input_ids
        return ids, empty

    def ema_modules(self) -> tuple[tuple[str, Any], ...]:
        return (("unet.", self.unet), ("text_encoder.", self.text_encoder))

    def ema_start(self) -> None:
        """The EMA of the UNet's and text encoder's weights starts at their values now."""
        self.ema = {
            prefix + name: p.detach().clone()
            for prefix, mod in self.ema_modules()
            for name, p in mod.named_parameters()
        }

    def ema_apply(self) -> None:
        """Copy the EMA weights into the UNet and text encoder."""
        assert self.ema is not None
        with self.torch.no_grad():
            for prefix, mod in self.ema_modules():
                for name, p in mod.named_parameters():
                    p.copy_(self.ema[prefix + name])

    def ema_update(self, decay: float) -> None:
        torch = self.torch
        assert self.ema is not None
        with torch.no_grad():
            for prefix, mod in self.ema_modules():
                for name, p in mod.named_parameters():
                    self.ema[prefix + name].lerp_(p.detach(), 1 - decay)

    def train_unet(self) -> None:
        torch, cfg = self.torch, self.cfg
        from workers.engine.samplers import alphas_cumprod

        sc = M.SCHEDULER_CONFIG
        acp = alphas_cumprod(sc["beta_start"], sc["beta_end"], sc["num_train_timesteps"])
        acp = acp.float()
        snr = acp / (1 - acp)
        weight = torch.clamp(1 / snr, min=1.0, max=cfg.max_loss_weight)
        ids, empty = self.tokenize_captions()
        unet_params = list(self.unet.parameters())
        text_params = list(self.text_encoder.parameters())
        params = unet_params + text_params
        self.unet.train().requires_grad_(True)
        self.text_encoder.train().requires_grad_(True)
        self.make_optimizer(
            [(unet_params, 1.0), (text_params, cfg.text_encoder_lr_scale)], cfg.unet_lr
        )
        if self.ema is None:
            self.ema_start()
        if self.step == 0:
            self.gen.manual_seed(self.seed + 2)  # a stage's randomness depends on the seed only
        window: list[float] = []
        n = cfg.unet_batch
        while self.step < cfg.unet_steps:
            self.set_lr(cfg.unet_lr, self.step, cfg.unet_steps)
            idx = torch.randint(0, cfg.n_images, (n,), generator=self.gen)
            x0 = self.sample_latents(idx)
            tokens = ids[idx].clone()
            drop = torch.rand(n, generator=self.gen) < cfg.uncond_prob
            tokens[drop] = empty
            t = torch.randint(0, sc["num_train_timesteps"], (n,), generator=self.gen)
            noise = torch.randn(x0.shape, generator=self.gen)
            a = acp[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            cond = self.text_encoder(tokens)[0]
            pred = self.unet(xt, t, encoder_hidden_states=cond).sample
            per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
            loss = (per_sample * weight[t]).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            self.step += 1
            self.ema_update(min(cfg.ema_decay, (1 + self.step) / (10 + self.step)))
            window.append(per_sample.mean().item())  # the plain eps MSE, comparable
            if self.step % cfg.log_every == 0 or self.step == cfg.unet_steps:
                self.record("unet", window)
                window = []
            self.maybe_save()
        self.ema_apply()  # the checkpoint carries the EMA weights
        self.unet.eval().requires_grad_(False)
        self.text_encoder.eval().requires_grad_(False)

    def position_data(self) -> tuple[Any, Any, Any, Any]:
        """``position_pairs`` pictures with a position word, each with a picture of the
        same caption (colours, shape, size word) drawn in the opposite place, both encoded
        by the frozen VAE (posterior mean, scaled): (named latents, opposite latents,
        caption ids, empty caption ids)."""
        from workers.demo.dataset import POSITIONS, render, sample_spec

        cfg = self.cfg
        rng = random.Random(self.seed + 5)
        named, opposite = [], []
        for _ in range(cfg.position_pairs):
            spec = sample_spec(rng, position=rng.choice(POSITIONS))
            named.append(spec)
            opposite.append(
                sample_spec(
                    rng,
                    size=spec.size,
                    position=rng.choice(OPPOSITE[spec.position]),
                    fg=spec.fg,
                    bg=spec.bg,
                    shape=spec.shape,
                )
            )
        scale = self.vae.config.scaling_factor

        def encode(specs: list[Any]) -> Any:
            pictures = np.stack([np.asarray(render(s)) for s in specs])
            return self.encode_pictures(pictures)[:, 0] * scale

        ids, empty = self.tokenize_captions([s.caption for s in named])
        return encode(named), encode(opposite), ids, empty

    def train_position(self) -> None:
        """Stage 5: position words. The SD1 schedule leaves 6.8% of the picture in the
        noise at its last timestep, so on every training picture the noise shows where the
        shape is, always on the side the word names, and the word is never needed; when
        sampling starts from pure noise, its random lumps place the shape. Here part of
        each batch (``position_share``) is a placement lesson on a caption with a position
        word: the noise at timestep ``position_min_t``..999 is laid over a picture of the
        same caption drawn in the opposite place, and the target is the noise that turns
        the named picture into that input. The model learns that the word, not a lump in
        the other half, decides the side. The rest of the batch is the usual denoising
        loss on the data set (posterior means), so colours and shapes are kept. The stage
        starts from the weights as the checkpoint stores them (fp16), so running it on a
        stage-4 checkpoint (``--from-checkpoint``) is this stage of the full run, but for
        the plain half's latents, which the checkpoint's fp16 encoder makes there. AdamW
        with betas (0.9, 0.999) and weight decay 0.01, warm-up and cosine decay of the
        learning rate, no EMA: ``MODEL_CARD.md`` has what the alternatives measured."""
        torch, cfg = self.torch, self.cfg
        from workers.engine.samplers import alphas_cumprod

        if self.step == 0:
            with torch.no_grad():
                for mod in (self.unet, self.text_encoder, self.vae):
                    for p in mod.parameters():
                        p.copy_(p.half().float())
        self.vae.eval().requires_grad_(False)
        named, opposite, lesson_ids, empty = self.position_data()
        self.log(f"position lessons: {len(named)} pairs drawn and encoded")
        plain = self.latents[:, 0] * self.vae.config.scaling_factor
        ids, _ = self.tokenize_captions()
        sc = M.SCHEDULER_CONFIG
        acp = alphas_cumprod(sc["beta_start"], sc["beta_end"], sc["num_train_timesteps"]).float()
        weight = torch.clamp((1 - acp) / acp, min=1.0, max=cfg.max_loss_weight)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.unet.train().requires_grad_(True)
        self.text_encoder.train().requires_grad_(True)
        self.make_optimizer([(params, 1.0)], cfg.position_lr, (0.9, 0.999), 0.01)
        if self.step == 0:
            self.gen.manual_seed(self.seed + 4)
        n_lesson = round(cfg.unet_batch * cfg.position_share)
        n_plain = cfg.unet_batch - n_lesson
        total_t = sc["num_train_timesteps"]
        window: list[float] = []
        while self.step < cfg.position_steps:
            self.set_lr(cfg.position_lr, self.step, cfg.position_steps)
            idx = torch.randint(0, len(plain), (n_plain,), generator=self.gen)
            tokens = ids[idx].clone()
            tokens[torch.rand(n_plain, generator=self.gen) < cfg.uncond_prob] = empty
            t = torch.randint(0, total_t, (n_plain,), generator=self.gen)
            noise = torch.randn(plain[idx].shape, generator=self.gen)
            a = acp[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * plain[idx] + (1 - a).sqrt() * noise
            k = torch.randint(0, len(named), (n_lesson,), generator=self.gen)
            lt = torch.randint(cfg.position_min_t, total_t, (n_lesson,), generator=self.gen)
            lnoise = torch.randn(named[k].shape, generator=self.gen)
            b = acp[lt].view(-1, 1, 1, 1)
            lesson = b.sqrt() * opposite[k] + (1 - b).sqrt() * lnoise
            # the noise that turns the named picture into the lesson's input
            ltarget = (lesson - b.sqrt() * named[k]) / (1 - b).sqrt()
            cond = self.text_encoder(torch.cat([tokens, lesson_ids[k]]))[0]
            pred = self.unet(
                torch.cat([xt, lesson]), torch.cat([t, lt]), encoder_hidden_states=cond
            ).sample
            per_sample = (pred - torch.cat([noise, ltarget])).pow(2).mean(dim=(1, 2, 3))
            share = torch.ones(cfg.unet_batch)
            share[n_plain:] = cfg.position_lesson_weight
            loss = (per_sample * weight[torch.cat([t, lt])] * share).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            self.step += 1
            window.append(per_sample[:n_plain].mean().item())  # the plain eps MSE
            if self.step % cfg.log_every == 0 or self.step == cfg.position_steps:
                self.record("position", window)
                window = []
            self.maybe_save()
        self.unet.eval().requires_grad_(False)
        self.text_encoder.eval().requires_grad_(False)

    # ------------------------------------------------------------------ driver

    def start_from_checkpoint(self, path: Path) -> None:
        """Take the weights of a single-file checkpoint (as this script exports them) and
        go on from stage 5, as the full run does after stage 4."""
        from workers.engine.sd1 import load_components

        comp = load_components(path)
        self.vae.register_to_config(scaling_factor=comp.vae.config.scaling_factor)
        for mine, theirs in (
            (self.vae, comp.vae),
            (self.unet, comp.unet),
            (self.text_encoder, comp.text_encoder),
        ):
            mine.load_state_dict(theirs.state_dict())
        # the plain half of stage 5 draws on the data set's latents; the full run has them
        # from stage 2 (encoded before the fp16 rounding), here the checkpoint's encoder
        # makes them, keeping its scaling factor
        self.latents = self.encode_pictures(self.images)
        self.torch.save(self.latents, self.out / "latents.pt")
        self.stage, self.step = "position", 0
        self.log(f"starting at stage position from {path}")

    def run(self, from_checkpoint: Path | None = None) -> Path:
        resumed = self.resume()
        if not resumed and from_checkpoint is not None:
            self.start_from_checkpoint(from_checkpoint)
        if not resumed:
            self.log(f"config {self.cfg.name} seed {self.seed}: {json.dumps(asdict(self.cfg))}")
            self.log(
                f"parameters: vae {M.count_parameters(self.vae):,} unet "
                f"{M.count_parameters(self.unet):,} text encoder "
                f"{M.count_parameters(self.text_encoder):,}; torch threads "
                f"{self.torch.get_num_threads()}"
            )
        if self.stage == "vae":
            self.train_vae()
            self.stage, self.step, self.opt = "encode", 0, None
            self.save_state()
        if self.stage == "encode":
            self.encode_dataset()
            self.stage, self.step, self.opt = "unet", 0, None
            self.save_state()
        if self.stage == "unet":
            self.train_unet()
            self.stage, self.step, self.opt = "decoder", 0, None
            self.ema = None
            self.save_state()
        if self.stage == "decoder":
            if self.cfg.decoder_steps:
                self.train_vae(decoder_only=True)
            self.stage, self.step, self.opt = "position", 0, None
            self.save_state()
        if self.stage == "position":
            if self.cfg.position_steps:
                self.train_position()
            self.stage, self.step, self.opt = "done", 0, None
            self.save_state()
        assert self.stage in STAGES
        path = export_checkpoint(self.out / CHECKPOINT_NAME, self.unet, self.vae, self.text_encoder)
        (self.out / "losses.json").write_text(json.dumps(self.losses))
        plot_losses(self.losses, self.out / "loss_curve.png")
        self.log(
            f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); total "
            f"{self.clock.wall() / 60:.1f} min wall, {self.clock.cpu() / 60:.1f} min "
            "process CPU"
        )
        return path


def export_checkpoint(
    path: Path, unet: Any, vae: Any, text_encoder: Any, dtype: str = "float16"
) -> Path:
    """Original single-file layout, floating tensors in ``dtype``, the diffusers configs
    (and the scheduler's) in the safetensors metadata."""
    import torch

    from workers.engine.ldm_export import export_clip, export_unet, export_vae
    from workers.engine.tiny import save_safetensors

    unet_cfg, vae_cfg = dict(unet.config), dict(vae.config)
    te_cfg = text_encoder.config.to_diff_dict()
    te_cfg.pop("dtype", None)
    te_cfg.pop("torch_dtype", None)
    target = getattr(torch, dtype)
    tensors = {
        **export_unet(unet.state_dict(), unet_cfg),
        **export_vae(vae.state_dict(), vae_cfg),
        **export_clip(text_encoder.state_dict()),
    }
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {
        "farm.family": "sd1",
        "farm.model": "demo-shapes",
        "farm.unet_config": json.dumps(unet_cfg, sort_keys=True, default=list),
        "farm.vae_config": json.dumps(vae_cfg, sort_keys=True, default=list),
        "farm.text_encoder_config": json.dumps(te_cfg, sort_keys=True, default=list),
        "farm.scheduler_config": json.dumps(M.SCHEDULER_CONFIG, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata)
    return path


def plot_losses(losses: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """One panel per stage, log-scale loss against step, drawn with PIL."""
    from PIL import Image, ImageDraw

    stages = [s for s in ("vae", "unet", "decoder", "position") if losses.get(s)]
    w, h, pad = 360, 240, 40
    img = Image.new("RGB", (w * max(len(stages), 1), h), "white")
    draw = ImageDraw.Draw(img)
    for k, stage in enumerate(stages):
        pts = losses[stage]
        x0 = k * w
        steps = [p[0] for p in pts]
        vals = [math.log10(max(p[1], 1e-8)) for p in pts]
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1
        smax = max(steps) or 1

        def xy(
            s: float, v: float, x0: int = x0, lo: float = lo, hi: float = hi, smax: float = smax
        ) -> tuple[float, float]:
            return (
                x0 + pad + (w - 2 * pad) * s / smax,
                h - pad - (h - 2 * pad) * (v - lo) / (hi - lo),
            )

        draw.rectangle([x0 + pad, pad, x0 + w - pad, h - pad], outline="gray")
        draw.line([xy(s, v) for s, v in zip(steps, vals, strict=True)], fill="blue", width=2)
        draw.text((x0 + pad, 10), f"{stage} loss (log10), {len(pts)} points", fill="black")
        draw.text((x0 + 2, pad - 5), f"{10**hi:.3g}", fill="black")
        draw.text((x0 + 2, h - pad - 5), f"{10**lo:.3g}", fill="black")
        draw.text((x0 + w - pad - 40, h - pad + 5), f"step {smax}", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--save-every",
        type=float,
        default=300.0,
        help="seconds between resumable state saves (default 300)",
    )
    parser.add_argument(
        "--from-checkpoint",
        type=Path,
        help="start at stage 5 (position words) from the weights of this checkpoint, as this "
        "script exports them after stage 4",
    )
    args = parser.parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    trainer = Trainer(CONFIGS[args.config], args.out, args.seed, args.save_every)
    trainer.run(args.from_checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
