"""A1111's hires fix in the engines and the render task: the final size (scale, one resize
side, both with the crop), the "Latent" upscale and the fresh seeded noise the second pass
starts from, its schedule (the tail of ``int(steps / strength)`` steps), an image the same
alone and in a batch, a small strength keeping the first pass (on the trained demo model)
and a large one renewing it, SDXL, and the PNG the render task writes with A1111's
parameters."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from farm.spec import HiresSpec, ImageParams
from storage.png import parse_parameters, read_parameters
from tests.engine.render_stub import runtime
from workers.engine.base import (
    BatchRequest,
    EngineError,
    HiresRequest,
    ImageRequest,
    first_noise,
    hires_sizes,
    hires_start,
    slerp,
)
from workers.render import _render_images

PROMPT = "a yellow square on a green background"


pytestmark = pytest.mark.usefixtures("one_thread")


def hires_batch(images, hires=None, sampler="Euler", steps=2, width=32, height=32, cfg=5.0):
    return BatchRequest(
        tuple(images), width, height, steps, cfg, sampler, "Automatic",
        hires=HiresRequest(steps=2) if hires is None else hires,
    )  # fmt: skip


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def karras(steps: int) -> np.ndarray:
    """Stable Diffusion's Karras schedule from its definition (rho 7), then 0."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas = np.cumprod(1 - betas)
    sigma = np.sqrt((1 - alphas) / alphas)
    lo, hi = sigma[0] ** (1 / 7), sigma[-1] ** (1 / 7)
    return np.append((hi + np.linspace(0, 1, steps) * (lo - hi)) ** 7, 0.0)


@pytest.fixture(scope="module")
def demo_engine():
    from workers.demo import demo_checkpoint_path
    from workers.engine.loader import load_engine

    return load_engine(demo_checkpoint_path())


# ---------------------------------------------------------------- sizes and schedule


@pytest.mark.parametrize(
    # (first pass, scale, resize_x, resize_y, A1111's upscale target, final size)
    ("size", "scale", "rx", "ry", "upscaled", "final"),
    [
        ((512, 512), 2.0, 0, 0, (1024, 1024), (1024, 1024)),
        ((512, 768), 1.5, 0, 0, (768, 1152), (768, 1152)),
        ((520, 400), 1.3, 0, 0, (676, 520), (672, 520)),  # rounded down to 8
        ((512, 768), 2.0, 1024, 0, (1024, 1536), (1024, 1536)),  # the aspect ratio kept
        ((512, 768), 2.0, 0, 1000, (666, 1000), (664, 1000)),
        ((512, 768), 2.0, 1024, 1024, (1024, 1536), (1024, 1024)),  # covered, then cropped
        ((768, 512), 2.0, 1024, 1024, (1536, 1024), (1024, 1024)),
    ],
)
def test_the_target_size_is_a1111s(size, scale, rx, ry, upscaled, final):
    assert hires_sizes(*size, scale, rx, ry) == (*upscaled, *final)


@pytest.mark.parametrize(
    # (hires steps, strength, A1111's full schedule int(steps / min(s, 0.999)))
    ("steps", "strength", "full"),
    [(20, 0.7, 28), (4, 0.5, 8), (10, 1.0, 10), (3, 0.3, 10), (7, 0.7, 10)],
)
def test_the_second_pass_runs_the_hires_steps_on_the_tail(demo_engine, steps, strength, full):
    assert hires_start(steps, strength) == (full, full - steps)
    hr = HiresRequest(steps=steps, denoising_strength=strength)
    batch = hires_batch([ImageRequest(PROMPT, "", 1)], hr, "DPM++ 2M", steps=5)
    got = demo_engine.hires_schedule(batch).numpy()
    np.testing.assert_allclose(got, karras(full)[full - steps :], rtol=1e-5)
    # 0 steps: the first pass's
    same = hires_batch(batch.images, HiresRequest(denoising_strength=strength), steps=steps)
    assert len(demo_engine.hires_schedule(same)) == steps + 1


def test_the_output_sizes_and_the_steps_run(engine):
    calls: list[int] = []
    req = [ImageRequest("a cat", "", 1)]
    images = engine.render(
        hires_batch(req, HiresRequest(steps=3)), progress=lambda: calls.append(1)
    )
    assert images[0].size == (64, 64)
    assert len(calls) == 2 + 3 + 1  # Euler: one UNet call a step, both passes; the decode
    one_side = engine.render(hires_batch(req, HiresRequest(resize_x=64, steps=1), height=48))
    assert one_side[0].size == (64, 96)
    cropped = engine.render(hires_batch(req, HiresRequest(resize_x=64, resize_y=64), height=48))
    assert cropped[0].size == (64, 64)
    plain = engine.render(BatchRequest(tuple(req), 32, 32, 2, 5.0, "Euler", "Automatic"))
    assert plain[0].size == (32, 32)


def test_latent_upscale_and_fresh_noise_feed_the_second_pass(engine, monkeypatch):
    """The second pass starts from A1111's x: the first pass's latents interpolated
    bilinearly (no antialias) plus noise drawn from a new generator of the image's seed
    at the new shape, times the first sigma of the hires schedule."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    denoise = engine.denoise

    def spy(batch, x, gens, sigmas, progress=None, size=None, **kw):
        out = denoise(batch, x, gens, sigmas, progress, size, **kw)
        seen.append((x.clone(), sigmas.clone(), out.clone()))
        return out

    monkeypatch.setattr(engine, "denoise", spy)
    seeds = [11, 12]
    hr = HiresRequest(steps=3, denoising_strength=0.6)
    batch = hires_batch([ImageRequest("a cat", "", s) for s in seeds], hr, "Euler a")
    engine.sample_latents(batch)
    (_, _, first), (x, sigmas, _) = seen
    up = torch.nn.functional.interpolate(first, scale_factor=2.0, mode="bilinear")
    noise = torch.stack(
        [torch.randn(up.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    full, start = hires_start(3, 0.6)  # 5 steps, from the 3rd sigma
    second = BatchRequest(batch.images, 64, 64, full, 5.0, "Euler a", "Automatic")
    expected_sigmas = engine.sigmas(second)[start:]
    torch.testing.assert_close(sigmas, expected_sigmas)
    assert len(sigmas) == 3 + 1
    torch.testing.assert_close(x, up + noise * expected_sigmas[0], rtol=1e-5, atol=1e-5)


def test_the_second_pass_noise_has_the_variation_seed_and_the_seed_resize(engine, monkeypatch):
    """As A1111's new RNG for the second pass, made with the subseeds, strength and seed
    resize at the final shape: its noise is ``first_noise`` of a new generator of the seed
    there, the subseed's noise slerp'd in and the resized noise set in the middle."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    denoise = engine.denoise

    def spy(batch, x, gens, sigmas, progress=None, size=None, **kw):
        out = denoise(batch, x, gens, sigmas, progress, size, **kw)
        seen.append((x.clone(), sigmas.clone(), out.clone()))
        return out

    monkeypatch.setattr(engine, "denoise", spy)
    image = ImageRequest("a cat", "", 11, subseed=40, subseed_strength=0.5)
    hr = HiresRequest(steps=2, denoising_strength=0.6)
    batch = replace(hires_batch([image], hr), seed_resize_from=(48, 40))
    engine.sample_latents(batch)
    (_, _, first), (x, sigmas, _) = seen
    up = torch.nn.functional.interpolate(first, scale_factor=2.0, mode="bilinear")
    f = engine.vae_scale_factor
    assert up.shape[2:] == (64 // f, 64 // f)
    want = first_noise([image], up.shape[1:], [torch.Generator().manual_seed(11)],
                       (40 // f, 48 // f))  # fmt: skip
    torch.testing.assert_close(x, up + want * sigmas[0], rtol=1e-5, atol=1e-5)
    # the middle is the variation blend drawn at 48x40, the edges the seed's own draw
    drawn = (up.shape[1], 40 // f, 48 // f)
    sub = torch.randn(drawn, generator=torch.Generator().manual_seed(40))
    main = torch.randn(drawn, generator=torch.Generator().manual_seed(11))
    dy, dx = (up.shape[2] - drawn[1]) // 2, (up.shape[3] - drawn[2]) // 2
    torch.testing.assert_close(
        want[0, :, dy : dy + drawn[1], dx : dx + drawn[2]], slerp(0.5, main, sub)
    )


def test_same_image_alone_and_in_a_batch(engine):
    requests = [
        ImageRequest("a cat", "", 3),
        ImageRequest("a red car", "ugly", 4),
        ImageRequest("mountains", "", 5),
    ]
    for upscaler in ("Latent", "Lanczos"):
        hr = HiresRequest(upscaler=upscaler, steps=2)
        together = engine.render(hires_batch(requests, hr, "Euler a"))
        alone = engine.render(hires_batch(requests[1:2], hr, "Euler a"))[0]
        assert np.abs(pixels(together[1]) - pixels(alone)).max() <= 1, upscaler
        assert np.abs(pixels(together[0]) - pixels(together[1])).max() > 1


def test_bad_hires_requests_are_engine_errors_naming_the_field(engine):
    req = [ImageRequest("a cat", "", 1)]
    for hr, field in [
        (HiresRequest(upscaler="R-ESRGAN 4x+"), "hires.upscaler"),
        (HiresRequest(scale=8), "hires.scale"),
        (HiresRequest(denoising_strength=0), "hires.denoising_strength"),
        (HiresRequest(resize_x=60), "hires.resize_x"),
    ]:
        with pytest.raises(EngineError, match=field):
            engine.render(hires_batch(req, hr))
    with_picture = BatchRequest(
        tuple(req), 32, 32, 2, 5.0, "Euler", "Automatic",
        init_image=Image.new("RGB", (32, 32)), hires=HiresRequest(),
    )  # fmt: skip
    with pytest.raises(EngineError, match="hires"):
        engine.render(with_picture)


# ---------------------------------------------------------------- the pictures


def test_small_strength_keeps_the_first_pass_and_a_large_one_renews_it(demo_engine):
    req = [ImageRequest(PROMPT, "", 3)]
    first = demo_engine.render(BatchRequest(tuple(req), 32, 32, 4, 5.0, "Euler", "Automatic"))[0]
    resized = first.resize((64, 64), Image.Resampling.LANCZOS)
    kept = demo_engine.decode(demo_engine.encode_image(resized))[0]  # what the VAE keeps
    for upscaler in ("Latent", "Lanczos"):
        diffs = {}
        for strength in (0.1, 0.9):
            hr = HiresRequest(upscaler=upscaler, steps=3, denoising_strength=strength)
            image = demo_engine.render(hires_batch(req, hr, steps=4))[0]
            assert image.size == (64, 64)
            diffs[strength] = mean_diff(image, resized)
        if upscaler == "Lanczos":  # at 0.1: the VAE's round trip of the resize, about
            assert diffs[0.1] < mean_diff(kept, resized) + 5, diffs
        assert diffs[0.1] < 20 and diffs[0.9] > diffs[0.1] + 15, (upscaler, diffs)


def test_sdxl_renders_hires(tmp_path, monkeypatch):
    from workers.engine.loader import load_engine
    from workers.engine.tiny import build_tiny_sdxl_modules, write_sdxl_checkpoint

    path = write_sdxl_checkpoint(tmp_path / "sdxl.safetensors", *build_tiny_sdxl_modules(seed=0))
    sdxl = load_engine(path)
    assert sdxl.takes_hires
    sizes: list[tuple[float, ...]] = []
    time_ids = sdxl.time_ids
    monkeypatch.setattr(
        sdxl, "time_ids", lambda b, s=None: sizes.append(tuple(time_ids(b, s)[0].tolist()))
        or time_ids(b, s),
    )  # fmt: skip
    req = [ImageRequest("a cat", "", 3), ImageRequest("a dog", "", 4)]
    hr = HiresRequest(steps=2, upscaler="Lanczos", denoising_strength=0.5)
    together = sdxl.render(hires_batch(req, hr, cfg=3.0))
    assert [im.size for im in together] == [(64, 64)] * 2
    # the first pass is conditioned on its size, the second on the upscaled one
    assert sizes == [(32, 32, 0, 0, 32, 32), (64, 64, 0, 0, 64, 64)]
    alone = sdxl.render(hires_batch(req[1:], hr, cfg=3.0))[0]
    assert np.abs(pixels(together[1]) - pixels(alone)).max() <= 1


# ---------------------------------------------------------------- the render task


def image_params(index: int, hires: HiresSpec) -> ImageParams:
    return ImageParams(
        index=index, cell=0, prompt_index=0, repeat=index, prompt="a cat", negative_prompt="",
        seed=7 + index, model="m", width=32, height=32, steps=2, cfg_scale=5.0,
        sampler_name="Euler", scheduler="Automatic", hires=hires,
    )  # fmt: skip


def test_the_render_task_stores_the_final_size_with_a1111s_parameters(tmp_path, engine):
    rt = runtime(tmp_path, engine)
    hires = HiresSpec(scale=2, steps=2, denoising_strength=0.5)
    _render_images(rt, "job", 0, "out", [image_params(0, hires)])
    assert rt.ledger.marked == [([0], True)]
    (key,) = rt.store.list("out/")
    data = rt.store.get_bytes(key)
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    text = read_parameters(data)
    assert text is not None
    assert (
        "Size: 32x32, Model: m, Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, "
        "Hires upscaler: Latent, Farm job: job" in text
    )
    assert parse_parameters(text)["width"] == 32  # the first pass's, as A1111 writes it
    resized = HiresSpec(resize_x=64, resize_y=0, upscaler="Lanczos")
    _render_images(rt, "job", 0, "out", [image_params(1, resized)])
    text = read_parameters(rt.store.get_bytes(sorted(rt.store.list("out/"))[1])) or ""
    assert "Denoising strength: 0.7, Hires resize: 64x0, Hires upscaler: Lanczos," in text


def test_an_engine_without_hires_fails_the_images_naming_hires(tmp_path):
    from workers.engine.synthetic import SyntheticEngine

    rt = runtime(tmp_path, SyntheticEngine())
    rt.record_failure = rt.failures.append
    with pytest.raises(EngineError, match="hires"):
        _render_images(rt, "job", 0, "out", [image_params(0, HiresSpec())])
    (error,) = rt.ledger.errors
    assert error["stage"] == "load" and "hires" in error["error"]
    assert rt.ledger.marked == [([0], False)] and rt.failures == []
    assert not list(rt.store.list("out/"))
