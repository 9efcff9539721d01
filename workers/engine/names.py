"""Sampler and schedule names the engine accepts (A1111 spelling). Torch-free on purpose:
the API validates job specs against these without importing torch."""

SAMPLERS: tuple[str, ...] = ("Euler a", "Euler", "DPM++ 2M")

# "Automatic" is the sampler's own default, as in A1111 >= 1.9: "Uniform" for Euler and
# Euler a, "Karras" for DPM++ 2M. "Uniform" is the model's discrete schedule (k-diffusion's
# get_sigmas), "Karras" is Karras et al. (2022) rho=7 between the model's sigma_min/max.
SCHEDULES: tuple[str, ...] = ("Automatic", "Uniform", "Karras")

DEFAULT_SCHEDULE: dict[str, str] = {"Euler a": "Uniform", "Euler": "Uniform", "DPM++ 2M": "Karras"}
# the samplers that draw fresh noise at each step (and so read A1111's ENSD)
ANCESTRAL: frozenset[str] = frozenset({"Euler a"})


def resolve_schedule(sampler_name: str, scheduler: str) -> str:
    """The concrete schedule ("Uniform" or "Karras") a sampler/schedule pair runs with."""
    if sampler_name not in SAMPLERS:
        raise ValueError(f"unknown sampler_name {sampler_name!r}; allowed: {', '.join(SAMPLERS)}")
    if scheduler not in SCHEDULES:
        raise ValueError(f"unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULES)}")
    return DEFAULT_SCHEDULE[sampler_name] if scheduler == "Automatic" else scheduler


# A1111's inpainting_fill, by index: what the masked part starts from
MASKED_CONTENT: tuple[str, ...] = ("fill", "original", "latent noise", "latent nothing")
MAX_MASK_BLUR = 64  # A1111's slider goes to 64
MAX_MASK_PADDING = 256  # A1111's "Only masked padding" slider goes to 256
