"""Acceptance: the engine's sampling equals diffusers' StableDiffusionPipeline on the same
weights (the components the engine loaded from the single-file checkpoint), same initial
latents, equivalent scheduler settings, within 1e-4 max abs on the final latents.

Equivalences (A1111 name -> diffusers):
- "Euler" + Uniform ("Automatic"): EulerDiscreteScheduler, timestep_spacing="linspace".
- "Euler" + Karras: the same with use_karras_sigmas=True.
- "DPM++ 2M" + Karras ("Automatic" since A1111 1.9): DPMSolverMultistepScheduler
  (dpmsolver++, order 2, final sigma 0) with use_karras_sigmas=True. diffusers rounds the
  timesteps it feeds the UNet; the engine does the same with quantize=True (A1111's
  "Enable quantization in K samplers"). Without it the two differ, asserted below.
- "DPM++ 2M" + Uniform: DPMSolverMultistepScheduler given the uniform timesteps explicitly
  (10 steps: 999, 888, ..., 0), since its own "linspace" spacing drops t=0.
- v-prediction on a zero-terminal-SNR schedule (scheduler config ``prediction_type:
  v_prediction``, ``rescale_betas_zero_snr: true``): the same schedulers with those two
  settings; both sides end the schedule at alpha-bar 2^-24 (sigma_max about 4096).

Initial latents: Euler's diffusers latents are sigma-scaled (init_noise_sigma = sigma_max);
DPM-Solver's are variance-preserving (x / sqrt(1 + sigma^2)), so the engine's equivalent
start is noise * sqrt(1 + sigma_max^2).
"""

from __future__ import annotations

import pytest
import torch

from workers.engine.base import BatchRequest, ImageRequest

STEPS = 10
TOL = 1e-4
CFG = 3.0
IMAGES = (ImageRequest("a photo of a cat", "blurry", 3), ImageRequest("a red car", "", 4))
BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 1,
}
UNIFORM_TIMESTEPS = [999 - 111 * i for i in range(STEPS)]


def diffusers_scheduler(kind: str, karras: bool, **settings):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    betas = {**BETAS, **settings}
    if kind == "euler":
        return EulerDiscreteScheduler(**betas, use_karras_sigmas=karras)
    return DPMSolverMultistepScheduler(
        **betas,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        use_karras_sigmas=karras,
    )


def run_both(
    engine,
    sampler: str,
    schedule: str,
    scheduler,
    quantize: bool,
    timesteps: list[int] | None = None,
) -> tuple[float, float]:
    """(max abs diff, max abs latent) between the engine and diffusers' pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    batch = BatchRequest(
        images=IMAGES,
        width=64,
        height=64,
        steps=STEPS,
        cfg_scale=CFG,
        sampler_name=sampler,
        scheduler=schedule,
    )
    noise = torch.stack(
        [
            torch.randn(engine.latent_shape(batch), generator=torch.Generator().manual_seed(r.seed))
            for r in IMAGES
        ]
    )
    sigma_max = float(engine.sigmas(batch)[0])
    if isinstance(scheduler, EulerDiscreteScheduler):
        scheduler.set_timesteps(STEPS)
        start = noise * scheduler.init_noise_sigma
    else:
        start = noise * (1 + sigma_max**2) ** 0.5

    engine.quantize = quantize
    try:
        ours = engine.sample_latents(batch, initial_latents=start)
    finally:
        engine.quantize = False

    pipe = StableDiffusionPipeline(
        vae=engine.vae,
        text_encoder=engine.text_encoder,
        tokenizer=engine.tokenizer,
        unet=engine.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    steps = {"timesteps": timesteps} if timesteps else {"num_inference_steps": STEPS}
    theirs = pipe(
        prompt=[r.prompt for r in IMAGES],
        negative_prompt=[r.negative_prompt for r in IMAGES],
        guidance_scale=CFG,
        height=64,
        width=64,
        latents=noise.clone(),
        output_type="latent",
        **steps,
    ).images
    assert theirs.shape == ours.shape
    return (theirs - ours).abs().max().item(), ours.abs().max().item()


CASES = [
    ("Euler", "Automatic", "euler", False, False, None),
    ("Euler", "Karras", "euler", True, False, None),
    ("DPM++ 2M", "Automatic", "dpm", True, True, None),
    ("DPM++ 2M", "Karras", "dpm", True, True, None),
    ("DPM++ 2M", "Uniform", "dpm", False, False, UNIFORM_TIMESTEPS),
]


@pytest.mark.parametrize(
    ("sampler", "schedule", "kind", "karras", "quantize", "timesteps"),
    CASES,
    ids=[f"{c[0]}-{c[1]}" for c in CASES],
)
def test_parity_with_diffusers(engine, sampler, schedule, kind, karras, quantize, timesteps):
    diff, scale = run_both(
        engine, sampler, schedule, diffusers_scheduler(kind, karras), quantize, timesteps
    )
    print(f"{sampler} / {schedule}: max abs diff {diff:.3g} (latents up to {scale:.3g})")
    assert diff <= TOL


def test_parity_check_can_fail(engine):
    """Mismatched settings must show: a wrong schedule, or continuous vs rounded timesteps."""
    wrong_schedule, _ = run_both(
        engine, "Euler", "Uniform", diffusers_scheduler("euler", True), False
    )
    assert wrong_schedule > 100 * TOL
    unquantized, _ = run_both(engine, "DPM++ 2M", "Karras", diffusers_scheduler("dpm", True), False)
    assert unquantized > 10 * TOL


V_ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}


@pytest.fixture(scope="module")
def v_engine(tiny_path):
    """The tiny checkpoint read as a v-prediction model on a zero-terminal-SNR schedule
    (its scheduler config says so, as a checkpoint's metadata would)."""
    from dataclasses import replace

    from workers.engine.sd1 import SD1Engine, load_components

    comps = load_components(tiny_path)
    return SD1Engine(replace(comps, scheduler_config={**comps.scheduler_config, **V_ZERO_SNR}))


V_CASES = [
    ("Euler", "Karras", "euler", False),
    ("DPM++ 2M", "Karras", "dpm", True),
]


@pytest.mark.parametrize(
    ("sampler", "schedule", "kind", "quantize"), V_CASES, ids=[f"{c[0]}-{c[1]}" for c in V_CASES]
)
def test_parity_v_prediction_zero_terminal_snr(v_engine, sampler, schedule, kind, quantize):
    scheduler = diffusers_scheduler(kind, True, **V_ZERO_SNR)
    assert float(scheduler.alphas_cumprod[-1]) == 2.0**-24
    assert float(
        v_engine.sigmas(BatchRequest(IMAGES, 64, 64, STEPS, CFG, sampler, schedule))[0]
    ) == pytest.approx(4096, rel=1e-3)  # sigma_max with alpha-bar 2^-24 at the end
    diff, scale = run_both(v_engine, sampler, schedule, scheduler, quantize)
    print(
        f"v-prediction {sampler} / {schedule}: max abs diff {diff:.3g} (latents up to {scale:.3g})"
    )
    assert diff <= TOL


def test_v_prediction_changes_the_result(engine, v_engine):
    """The same weights read as v-prediction give other latents: the setting is used."""
    batch = BatchRequest(IMAGES, 64, 64, STEPS, CFG, "Euler", "Karras")
    assert (engine.sample_latents(batch) - v_engine.sample_latents(batch)).abs().max() > 1e-2


def test_unknown_prediction_type_is_refused_by_name(tiny_path):
    from dataclasses import replace

    from workers.engine.base import EngineError
    from workers.engine.sd1 import SD1Engine, load_components

    comps = load_components(tiny_path)
    bad = replace(comps, scheduler_config={**comps.scheduler_config, "prediction_type": "sample"})
    with pytest.raises(EngineError, match="prediction_type 'sample'"):
        SD1Engine(bad)
