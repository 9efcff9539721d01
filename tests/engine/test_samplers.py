"""Samplers on analytic denoisers, and schedules against diffusers' own."""

import pytest
import torch

from workers.engine.samplers import (
    DiscreteEpsDenoiser,
    alphas_cumprod,
    get_sigmas_karras,
    get_sigmas_uniform,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
)

MU = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)


def gaussian_denoiser(mu: torch.Tensor, s: float):
    """Exact denoiser E[x0 | x] for data ~ N(mu, s^2) (s = 0: a single point)."""
    return lambda x, sigma: mu + s**2 / (s**2 + sigma**2) * (x - mu)


def sigmas(n: int) -> torch.Tensor:
    return get_sigmas_karras(n, 0.03, 14.6).double()


def seeded_noise(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)


@pytest.mark.parametrize("sampler", [sample_euler, sample_dpmpp_2m])
def test_single_point_data_is_reached(sampler):
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sampler(gaussian_denoiser(MU, 0.0), x * 14.6, sigmas(8))
    assert torch.allclose(out, MU.expand_as(out), atol=1e-9)


def test_single_point_data_is_reached_ancestral():
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sample_euler_ancestral(gaussian_denoiser(MU, 0.0), x * 14.6, sigmas(8), seeded_noise())
    assert torch.allclose(out, MU.expand_as(out), atol=1e-9)


def test_ode_samplers_follow_the_exact_flow():
    """For Gaussian data the probability-flow ODE has a closed form; DPM++ 2M is more
    accurate than Euler at equal steps, and both converge."""
    s, x_t = 0.5, torch.linspace(-3, 3, 61, dtype=torch.float64) * 14.6
    exact = s / (s**2 + 14.6**2) ** 0.5 * x_t  # mu = 0, from sigma_max 14.6 down to 0
    err = {}
    for name, sampler in (("euler", sample_euler), ("dpmpp_2m", sample_dpmpp_2m)):
        for n in (10, 40):
            sig = torch.cat([get_sigmas_karras(n, 0.03, 14.6).double()[:-1], torch.zeros(1)])
            out = sampler(gaussian_denoiser(torch.zeros(()), s), x_t.clone(), sig)
            err[name, n] = (out - exact).abs().max().item()
    assert err["dpmpp_2m", 10] < err["euler", 10]
    assert err["euler", 40] < err["euler", 10] and err["dpmpp_2m", 40] < err["dpmpp_2m", 10]
    assert err["dpmpp_2m", 40] < 0.02


def test_ancestral_samples_the_data_distribution():
    s = 0.5
    x = torch.randn(20000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = sample_euler_ancestral(
        gaussian_denoiser(torch.tensor(1.0), s), x * 14.6, sigmas(100), seeded_noise(3)
    )
    assert abs(out.mean().item() - 1.0) < 0.03
    assert abs(out.std().item() - s) < 0.03


def test_schedules_match_diffusers():
    from diffusers import EulerDiscreteScheduler

    betas = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "linspace",
    }
    den = DiscreteEpsDenoiser(lambda x, t: x, alphas_cumprod())
    for karras in (False, True):
        ref = EulerDiscreteScheduler(**betas, use_karras_sigmas=karras)
        ref.set_timesteps(10)
        ours = (
            get_sigmas_karras(10, den.sigma_min, den.sigma_max)
            if karras
            else get_sigmas_uniform(den, 10)
        )
        assert torch.allclose(ours, ref.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_sigma_timestep_round_trip_and_quantize():
    den = DiscreteEpsDenoiser(lambda x, t: x, alphas_cumprod())
    t = torch.tensor([0.0, 10.25, 500.3, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(den.sigma_to_t(den.t_to_sigma(t)), t, atol=1e-6)
    den.quantize = True
    assert den.sigma_to_t(den.t_to_sigma(t)).tolist() == [0, 10, 500, 999, 999]
    assert den.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert den.sigma_max == pytest.approx(14.6146, abs=1e-4)
