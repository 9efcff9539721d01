"""A1111's variation seeds (``ImageRequest.subseed``, ``subseed_strength``): ``slerp``
against its formula worked out column by column, its near-parallel fallback, the first
noise of SD1, SDXL and Flux slerp'd toward the subseed's noise while the main generator
(and so ancestral noise) stays the seed's, strength 0 bit-identical to no variation,
strength 1 the subseed's image, a varied image the same in any batch, img2img, the
synthetic engine's colour blend, and the refusals naming the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from workers.engine.base import BatchRequest, EngineError, ImageRequest, first_noise, slerp
from workers.engine.synthetic import SyntheticEngine, seed_colour

PROMPT = "a photo of a cat"
SEED_A, SEED_B = 21, 58

pytestmark = pytest.mark.usefixtures("one_thread")


def req(seed=SEED_A, subseed=0, strength=0.0, prompt=PROMPT, negative="ugly"):
    return ImageRequest(prompt, negative, seed, subseed=subseed, subseed_strength=strength)


def batch(images, sampler="Euler", steps=3, size=64, cfg=5.0, **kw):
    return BatchRequest(tuple(images), size, size, steps, cfg, sampler, "Automatic", **kw)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


# ---------------------------------------------------------------- slerp


def reference_slerp(val: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The spherical interpolation written out per (channel, column) vector ``x[c, :, w]``
    (A1111 normalises a (C, H, W) noise along dim 1), in float64 with ``math``."""
    out = np.empty_like(low)
    channels, _, width = low.shape
    for c in range(channels):
        for w in range(width):
            a, b = low[c, :, w], high[c, :, w]
            cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
            omega = math.acos(cos)
            out[c, :, w] = (math.sin((1 - val) * omega) * a + math.sin(val * omega) * b) / math.sin(
                omega
            )
    return out


@pytest.mark.parametrize("val", [0.1, 0.5, 0.83])
def test_slerp_is_the_formula_per_column(val):
    low, high = randn((4, 8, 6), 1), randn((4, 8, 6), 2)
    got = slerp(val, low, high)
    want = reference_slerp(val, low.double().numpy(), high.double().numpy())
    assert got.shape == low.shape and got.dtype == torch.float32
    assert np.allclose(got.numpy(), want, atol=1e-5)
    # not a plain linear blend: slerp keeps the norm up where lerp shrinks it
    lerp = low * (1 - val) + high * val
    assert (got - lerp).abs().max() > 1e-2


def test_slerp_ends_are_low_and_high():
    low, high = randn((4, 8, 8), 3), randn((4, 8, 8), 4)
    assert torch.allclose(slerp(0.0, low, high), low, atol=1e-6)
    assert torch.allclose(slerp(1.0, low, high), high, atol=1e-6)


def test_near_parallel_slerp_falls_back_to_a1111s_linear_weights():
    """A1111's fallback weighs ``low`` by ``val`` (the other way round from its slerp)."""
    low = randn((4, 8, 8), 5)
    high = 2 * low + 1e-4 * randn((4, 8, 8), 6)  # parallel but for a whisker
    got = slerp(0.25, low, high)
    assert torch.allclose(got, low * 0.25 + high * 0.75, atol=1e-6)
    assert not torch.allclose(got, low * 0.75 + high * 0.25, atol=1e-2)
    assert torch.isfinite(slerp(0.25, low, 2 * low)).all()  # exactly parallel: no acos NaN


# ---------------------------------------------------------------- first_noise


def test_first_noise_without_variation_is_the_plain_draw_and_advances_the_same():
    shape = (4, 8, 8)
    images = [req(7), req(8, subseed=99, strength=0.0)]
    gens = [torch.Generator("cpu").manual_seed(r.seed) for r in images]
    plain_gens = [torch.Generator("cpu").manual_seed(r.seed) for r in images]
    plain = torch.stack([torch.randn(shape, generator=g) for g in plain_gens])
    assert torch.equal(first_noise(images, shape, gens), plain)
    for g, p in zip(gens, plain_gens, strict=True):  # the next (ancestral) draws agree
        assert torch.equal(torch.randn(shape, generator=g), torch.randn(shape, generator=p))


def test_first_noise_slerps_toward_the_subseed_and_leaves_the_generator_as_it_was():
    shape = (4, 8, 8)
    images = [req(7, subseed=40, strength=0.3), req(8, subseed=41, strength=1.0), req(9)]
    gens = [torch.Generator("cpu").manual_seed(r.seed) for r in images]
    noise = first_noise(images, shape, gens)
    assert noise.shape == (3, *shape)
    assert torch.equal(noise[0], slerp(0.3, randn(shape, 7), randn(shape, 40)))
    assert torch.equal(noise[1], randn(shape, 41))  # strength 1: the subseed's noise
    assert torch.equal(noise[2], randn(shape, 9))
    for g, r in zip(gens, images, strict=True):  # one draw of the seed's, whatever else
        after = torch.Generator("cpu").manual_seed(r.seed)
        torch.randn(shape, generator=after)
        assert torch.equal(torch.randn(shape, generator=g), torch.randn(shape, generator=after))


# ---------------------------------------------------------------- SD1


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_strength_zero_renders_bit_identical_to_no_variation(engine, sampler):
    plain = batch([ImageRequest(PROMPT, "ugly", SEED_A)], sampler)
    zero = batch([req(SEED_A, subseed=SEED_B, strength=0.0)], sampler)
    ours = engine.sample_latents(plain)
    assert torch.equal(engine.sample_latents(zero), ours)
    # and the code path before variation seeds: randn of the seed times the first sigma
    start = randn(engine.latent_shape(plain), SEED_A)[None] * engine.schedule(plain)[0]
    assert torch.equal(engine.sample_latents(plain, initial_latents=start), ours)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_strength_one_is_the_subseeds_image_and_half_is_neither(engine, sampler):
    seed_b = engine.sample_latents(batch([req(SEED_B)], sampler))
    full = engine.sample_latents(batch([req(SEED_A, SEED_B, 1.0)], sampler))
    assert torch.equal(full, seed_b)
    seed_a = engine.sample_latents(batch([req(SEED_A)], sampler))
    half = engine.sample_latents(batch([req(SEED_A, SEED_B, 0.5)], sampler))
    assert (half - seed_a).abs().max() > 1e-2 and (half - seed_b).abs().max() > 1e-2
    images = engine.decode(torch.cat([seed_a, seed_b, full, half]))
    assert max_diff(images[1], images[2]) == 0
    assert max_diff(images[3], images[0]) > 1 and max_diff(images[3], images[1]) > 1


def test_ancestral_noise_stays_the_main_seeds(engine):
    """Only the first noise varies: with Euler a, strength 1 is seed A's ancestral noise
    on seed B's first noise, not seed B's image."""
    b = batch([req(SEED_A, SEED_B, 1.0)], "Euler a")
    start = randn(engine.latent_shape(b), SEED_B)[None] * engine.schedule(b)[0]
    ours = engine.sample_latents(b)
    assert torch.equal(ours, engine.sample_latents(batch([req(SEED_A)], "Euler a"), start))
    seed_b = engine.sample_latents(batch([req(SEED_B)], "Euler a"))
    assert (ours - seed_b).abs().max() > 1e-2


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_a_varied_image_is_the_same_alone_and_in_a_batch(engine, sampler):
    requests = [
        ImageRequest("a red car", "", 5),
        req(SEED_A, SEED_B, 0.4),
        req(9, subseed=SEED_A, strength=0.7, prompt="a dog"),
    ]
    together = engine.render(batch(requests, sampler))
    for i in (1, 2):
        alone = engine.render(batch([requests[i]], sampler))[0]
        assert max_diff(together[i], alone) <= 1, i
    unvaried = engine.render(batch([req(SEED_A)], sampler))[0]
    assert max_diff(together[1], unvaried) > 1


def circle(size: int = 64) -> Image.Image:
    picture = Image.new("RGB", (size, size), (30, 60, 220))
    q = size // 4
    picture.paste((220, 30, 30), (q, q, size - q, size - q))
    return picture


def test_img2img_varies_with_the_strength_too(engine):
    def latents(*images):
        b = batch(images, steps=4, init_image=circle(), denoising_strength=0.6)
        return engine.sample_latents(b)

    seed_a, seed_b = latents(req(SEED_A)), latents(req(SEED_B))
    assert torch.equal(latents(req(SEED_A, SEED_B, 1.0)), seed_b)
    assert torch.equal(latents(req(SEED_A, SEED_B, 0.0)), seed_a)
    half = latents(req(SEED_A, SEED_B, 0.5))
    assert (half - seed_a).abs().max() > 1e-2 and (half - seed_b).abs().max() > 1e-2


# ---------------------------------------------------------------- SDXL and Flux


@pytest.fixture(scope="module")
def sdxl_engine(tmp_path_factory):
    from workers.engine.loader import load_engine
    from workers.engine.tiny import write_tiny_sdxl_checkpoint

    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    return load_engine(write_tiny_sdxl_checkpoint(path, seed=0))


@pytest.fixture(scope="module")
def flux_engine(tmp_path_factory):
    from workers.engine.flux import FluxEngine
    from workers.engine.tiny import (
        t5_tokenizer_dir,
        write_tiny_flux_checkpoint,
        write_tiny_t5_tokenizer,
    )

    path = tmp_path_factory.mktemp("flux") / "tiny-flux.safetensors"
    write_tiny_flux_checkpoint(path, seed=0)
    write_tiny_t5_tokenizer(t5_tokenizer_dir(path))
    return FluxEngine.from_single_file(path, t5_tokenizer=t5_tokenizer_dir(path))


def test_sdxl_first_noise_follows_the_same_rule(sdxl_engine):
    def latents(*images):
        return sdxl_engine.sample_latents(batch(images, steps=3, size=32, cfg=3.0))

    seed_a, seed_b = latents(req(SEED_A)), latents(req(SEED_B))
    assert torch.equal(latents(req(SEED_A, SEED_B, 1.0)), seed_b)
    assert torch.equal(latents(req(SEED_A, SEED_B, 0.0)), seed_a)
    half = latents(req(SEED_A, SEED_B, 0.5))
    assert (half - seed_a).abs().max() > 1e-3 and (half - seed_b).abs().max() > 1e-3
    b = batch([req(SEED_A, SEED_B, 0.5)], steps=3, size=32, cfg=3.0)
    shape = sdxl_engine.latent_shape(b)
    start = slerp(0.5, randn(shape, SEED_A), randn(shape, SEED_B))[None]
    started = sdxl_engine.sample_latents(b, initial_latents=start * sdxl_engine.schedule(b)[0])
    assert torch.equal(started, half)


def test_flux_first_noise_follows_the_same_rule(flux_engine):
    from workers.engine.flux import pack

    def b(*images):
        return batch(images, steps=3, size=32, cfg=3.5)

    shape = flux_engine.latent_shape(b(req()))
    noise = flux_engine.initial_noise(b(req(SEED_A, SEED_B, 0.5), req(SEED_B), req(SEED_A)))
    assert torch.equal(
        noise[0], pack(slerp(0.5, randn(shape, SEED_A), randn(shape, SEED_B))[None])[0]
    )
    assert torch.equal(noise[1], pack(randn(shape, SEED_B)[None])[0])
    assert torch.equal(noise[2], pack(randn(shape, SEED_A)[None])[0])
    seed_b = flux_engine.sample_latents(b(req(SEED_B)))
    assert torch.equal(flux_engine.sample_latents(b(req(SEED_A, SEED_B, 1.0))), seed_b)
    seed_a = flux_engine.sample_latents(b(req(SEED_A)))
    assert torch.equal(flux_engine.sample_latents(b(req(SEED_A, SEED_B, 0.0))), seed_a)
    half = flux_engine.sample_latents(b(req(SEED_A, SEED_B, 0.5)))
    assert (half - seed_a).abs().max() > 1e-3 and (half - seed_b).abs().max() > 1e-3


# ---------------------------------------------------------------- synthetic engine


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_synthetic_colour_blends_seed_and_subseed(strength):
    a, b = seed_colour(1), seed_colour(2)
    want = tuple(round(x * (1 - strength) + y * strength) for x, y in zip(a, b, strict=True))
    images = SyntheticEngine().render(batch([req(1, 2, strength), req(1)], size=16))
    assert images[0].getcolors() == [(16 * 16, want)]
    assert images[1].getcolors() == [(16 * 16, a)]


def test_synthetic_colour_is_the_blend_not_either_end():
    a, b = seed_colour(1), seed_colour(2)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 8  # seeds far enough apart
    image = SyntheticEngine().render(batch([req(1, 2, 0.5)], size=16))[0]
    colour = image.getpixel((3, 3))
    assert colour != a and colour != b
    assert colour == tuple(round((x + y) / 2) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), float("inf"), -float("inf")])
def test_a_strength_outside_0_to_1_is_refused_naming_the_field(engine, strength):
    b = batch([req(1), req(1, 2, strength)])
    with pytest.raises(EngineError, match=r"^subseed_strength: .* must be between 0 and 1"):
        b.validate()
    with pytest.raises(EngineError, match="subseed_strength"):
        SyntheticEngine().render(b)
    with pytest.raises(EngineError, match="subseed_strength"):
        engine.render(b)


def test_a_negative_subseed_is_refused_naming_the_field(engine):
    b = batch([req(1, -3, 0.5)])
    with pytest.raises(EngineError, match=r"^subseed: -3 must be >= 0"):
        b.validate()
    with pytest.raises(EngineError, match="subseed:"):
        engine.render(b)


def test_the_ends_of_the_range_are_accepted():
    batch([req(1, 0, 0.0), req(1, 2**32 - 1, 1.0)]).validate()
