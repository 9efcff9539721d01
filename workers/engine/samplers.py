"""k-diffusion style samplers and sigma schedules, for epsilon- and v-prediction models.

Every sampler is one short function over a decreasing list of sigmas ending in 0. The model
is a *denoiser*: ``model(x, sigma) -> denoised x0``, where ``x = x0 + sigma * noise``
(variance-exploding form; the UNet's variance-preserving input is ``x / sqrt(1 + sigma^2)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]
EpsModel = Callable[[Tensor, Tensor], Tensor]  # (scaled x, timestep) -> predicted noise


# ---------------------------------------------------------------- the model's noise levels

def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                   num_train_timesteps: int = 1000) -> Tensor:
    """Stable Diffusion's "scaled_linear" training schedule (float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    algorithm 1: shift and scale sqrt(alphas_cumprod) so the last timestep carries no
    signal (alpha-bar 0) and the first keeps its value. The last value is then set to
    2^-24, as diffusers does, so that sigma_max stays finite (about 4096)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    out = ((root - last) * first / (first - last)) ** 2
    out[-1] = 2.0**-24
    return out


PREDICTION_TYPES = ("epsilon", "v_prediction")


class DiscreteEpsDenoiser:
    """Wrap a noise-prediction model as a denoiser over continuous sigma.

    The model was trained at 1000 discrete noise levels ``sigma_t``; a sigma between two of
    them maps to a fractional timestep by interpolating in log-sigma (k-diffusion's
    CompVisDenoiser). ``quantize=True`` rounds to the nearest trained timestep instead
    (A1111's "Enable quantization in K samplers"; also what diffusers' DPM-Solver does).
    ``prediction_type`` is what the model outputs: the noise ("epsilon") or
    ``v = sqrt(a) * noise - sqrt(1 - a) * x0`` ("v_prediction", k-diffusion's
    CompVisVDenoiser).
    """

    def __init__(self, eps_model: EpsModel, alphas_cumprod: Tensor, quantize: bool = False,
                 prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}: "
                             f"{prediction_type!r}")
        self.eps_model = eps_model
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().to(torch.float32)
        self.log_sigmas = self.sigmas.double().log()
        self.quantize = quantize
        self.prediction_type = prediction_type

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of a noise level (float64, on the CPU)."""
        log_sigma = sigma.detach().cpu().double().log().reshape(-1)
        dists = log_sigma[None, :] - self.log_sigmas[:, None]
        if self.quantize:
            return dists.abs().argmin(dim=0).double().reshape(sigma.shape)
        low = (dists >= 0).cumsum(dim=0).argmax(dim=0).clamp(max=len(self.log_sigmas) - 2)
        high = low + 1
        w = (self.log_sigmas[low] - log_sigma) / (self.log_sigmas[low] - self.log_sigmas[high])
        t = (1 - w.clamp(0, 1)) * low + w.clamp(0, 1) * high
        return t.reshape(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = t.detach().cpu().double()
        low = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]
        return log_sigma.exp()

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        t = self.sigma_to_t(sigma).to(torch.float32)
        out = self.eps_model(x / (sigma**2 + 1) ** 0.5, t)  # the UNet's input is x * c_in
        if self.prediction_type == "v_prediction":
            return x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
        return x - out * sigma


# ---------------------------------------------------------------- schedules (float32, end in 0)

def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas_uniform(denoiser: DiscreteEpsDenoiser, n: int) -> Tensor:
    """The model's own schedule: n timesteps evenly spaced from 999 down to 0."""
    t = torch.linspace(len(denoiser.sigmas) - 1, 0, n, dtype=torch.float64)
    return append_zero(denoiser.t_to_sigma(t)).to(torch.float32)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022): evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(torch.float32)


def get_sigmas(schedule: str, denoiser: DiscreteEpsDenoiser, n: int) -> Tensor:
    """Sigmas for a concrete A1111 schedule name ("Uniform" or "Karras")."""
    if schedule == "Uniform":
        return get_sigmas_uniform(denoiser, n)
    if schedule == "Karras":
        return get_sigmas_karras(n, denoiser.sigma_min, denoiser.sigma_max)
    raise ValueError(f"unknown schedule {schedule!r}")


# ---------------------------------------------------------------- samplers

def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0
                       ) -> tuple[Tensor, Tensor]:
    """Split a step into a deterministic part down to sigma_down and fresh noise sigma_up."""
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler(model: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, noise_fn: NoiseFn,
                           eta: float = 1.0) -> Tensor:
    """Euler step down to sigma_down, then add noise_fn(x) * sigma_up."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_fn(x) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in log-sigma time t = -log(sigma)."""
    old_denoised: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()  # t_next = inf at sigma 0
        h = t_next - t
        d = denoised
        if old_denoised is not None and sigmas[i + 1] > 0:
            r = (t + sigmas[i - 1].log()) / h  # h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old_denoised = denoised
    return x


SAMPLER_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "Euler a": sample_euler_ancestral,
    "Euler": sample_euler,
    "DPM++ 2M": sample_dpmpp_2m,
}
