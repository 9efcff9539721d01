"""img2img in the engines and the render task: the schedule's tail A1111 samples over, the
picture kept at a low denoising strength and renewed at 1 (on the trained demo model, whose
VAE and UNet mean something), an image the same alone and in a batch, SDXL, and the render
task's refusals (an engine that cannot start from a picture, an input missing from the
store), each naming the input."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from farm.spec import ImageParams
from storage import LocalStore
from storage.keys import input_key
from tests.engine.render_stub import runtime
from workers.engine.base import BatchRequest, EngineError, ImageRequest, img2img_start
from workers.render import InputPictures, _render_images, fit_picture

PROMPT = "a yellow square on a green background"


pytestmark = pytest.mark.usefixtures("one_thread")


def circle(size: int = 64) -> Image.Image:
    """A red circle on a blue background, in the demo model's world."""
    picture = Image.new("RGB", (size, size), (30, 60, 220))
    q = size // 4
    ImageDraw.Draw(picture).ellipse((q, q, size - q, size - q), fill=(220, 30, 30))
    return picture


def img2img(images, strength=0.5, init=None, sampler="Euler", steps=4, size=64, cfg=5.0):
    return BatchRequest(
        tuple(images), size, size, steps, cfg, sampler, "Automatic",
        init_image=circle(size) if init is None else init, denoising_strength=strength,
    )  # fmt: skip


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.fixture(scope="module")
def demo_engine():
    from workers.demo import demo_checkpoint_path
    from workers.engine.loader import load_engine

    return load_engine(demo_checkpoint_path())


# ---------------------------------------------------------------- the schedule


def karras(steps: int) -> np.ndarray:
    """Stable Diffusion's Karras schedule written out from its definition (rho 7 between
    the model's smallest and largest sigma), then 0."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas = np.cumprod(1 - betas)
    sigma = np.sqrt((1 - alphas) / alphas)
    lo, hi = sigma[0] ** (1 / 7), sigma[-1] ** (1 / 7)
    return np.append((hi + np.linspace(0, 1, steps) * (lo - hi)) ** 7, 0.0)


@pytest.mark.parametrize(
    # (steps, strength, sampling steps A1111 runs: int(min(s, 0.999) * steps) + 1)
    ("steps", "strength", "runs"),
    [(20, 0.75, 16), (20, 1.0, 20), (4, 0.1, 1), (4, 0.5, 3), (10, 0.3, 4), (5, 0.999, 5)],
)
def test_the_schedule_is_a1111s_tail_of_the_full_one(demo_engine, steps, strength, runs):
    batch = img2img([ImageRequest(PROMPT, "", 1)], strength, sampler="DPM++ 2M", steps=steps)
    full = karras(steps)
    got = demo_engine.schedule(batch).numpy()
    np.testing.assert_allclose(got, full[steps - runs :], rtol=1e-5)
    assert img2img_start(steps, strength) == steps - runs
    # txt2img keeps the whole schedule
    plain = BatchRequest(batch.images, 64, 64, steps, 5.0, "DPM++ 2M", "Automatic")
    np.testing.assert_allclose(demo_engine.schedule(plain).numpy(), full, rtol=1e-5)


def test_the_sampler_runs_exactly_the_tail(engine):
    """Euler evaluates the UNet once per step: a strength that leaves 2 of 4 steps calls
    progress twice, once more for the decode."""
    calls = []
    batch = img2img([ImageRequest("a cat", "", 1)], 0.5, steps=4, size=32)
    assert len(engine.schedule(batch)) == 4  # t_enc 2: sigmas[1:], 3 steps
    engine.render(batch, progress=lambda: calls.append(1))
    assert len(calls) == 3 + 1


# ---------------------------------------------------------------- the pictures


def test_low_strength_keeps_the_picture_and_full_strength_renews_it(demo_engine):
    init = circle()
    seen = demo_engine.decode(demo_engine.encode_image(init))[0]  # what the VAE keeps
    req = [ImageRequest(PROMPT, "", 3)]
    diffs = {s: mean_diff(demo_engine.render(img2img(req, s))[0], init) for s in (0.1, 0.5, 1.0)}
    txt2img = demo_engine.render(BatchRequest(tuple(req), 64, 64, 4, 5.0, "Euler", "Automatic"))
    # at 0.1 the picture is the VAE's round trip of the input, give or take a little ...
    assert diffs[0.1] < mean_diff(seen, init) + 5
    # ... half way it has moved towards the prompt, at 1 it is the prompt's picture
    assert diffs[0.1] + 40 < diffs[0.5] and diffs[0.1] + 40 < diffs[1.0]
    assert mean_diff(txt2img[0], init) > diffs[0.1] + 40
    # the circle's red centre stays red at 0.1; at 1 the square's yellow is there
    low = demo_engine.render(img2img(req, 0.1))[0]
    full = demo_engine.render(img2img(req, 1.0))[0]
    r, g, b = pixels(low)[32, 32]
    assert r > 150 and g < 90 and b < 90, (r, g, b)
    r, g, b = pixels(full)[32, 32]
    assert r > 150 and g > 150 and b < min(r, g) - 40, (r, g, b)  # yellow, not red


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_same_seed_same_image_alone_and_in_a_batch(engine, sampler):
    requests = [
        ImageRequest("a cat", "", 3),
        ImageRequest("a red car", "ugly", 4),
        ImageRequest("mountains", "", 5),
    ]
    together = engine.render(img2img(requests, 0.6, sampler=sampler, steps=3, size=32))
    alone = engine.render(img2img(requests[1:2], 0.6, sampler=sampler, steps=3, size=32))[0]
    assert np.abs(pixels(together[1]) - pixels(alone)).max() <= 1
    assert np.abs(pixels(together[0]) - pixels(together[1])).max() > 1
    again = engine.render(img2img(requests[1:2], 0.6, sampler=sampler, steps=3, size=32))[0]
    assert np.array_equal(pixels(alone), pixels(again))  # the encoding draws nothing
    plain = BatchRequest(requests[1:2], 32, 32, 3, 5.0, sampler, "Automatic")
    assert np.abs(pixels(engine.render(plain)[0]) - pixels(alone)).max() > 1


def test_a_picture_of_another_size_is_an_engine_error_naming_it(engine):
    batch = img2img([ImageRequest("a cat", "", 1)], 0.5, init=circle(48), size=32)
    with pytest.raises(EngineError, match="init_image"):
        engine.render(batch)
    with pytest.raises(EngineError, match="denoising_strength"):
        engine.render(img2img([ImageRequest("a cat", "", 1)], 0.0, size=32))


def test_sdxl_renders_img2img(tmp_path):
    from workers.engine.loader import load_engine
    from workers.engine.tiny import build_tiny_sdxl_modules, write_sdxl_checkpoint

    path = write_sdxl_checkpoint(tmp_path / "sdxl.safetensors", *build_tiny_sdxl_modules(seed=0))
    sdxl = load_engine(path)
    assert sdxl.family == "sdxl" and sdxl.takes_init_image
    init = circle(32)
    x0 = sdxl.encode_image(init)
    assert x0.dtype == torch.float32 and next(sdxl.vae.parameters()).dtype == torch.float32
    seen = sdxl.decode(x0)[0]
    req = [ImageRequest("a cat", "", 3), ImageRequest("a dog", "", 4)]
    low = sdxl.render(img2img(req, 0.1, steps=3, size=32, cfg=3.0))
    full = sdxl.render(img2img(req, 1.0, steps=3, size=32, cfg=3.0))
    alone = sdxl.render(img2img(req[1:], 0.1, steps=3, size=32, cfg=3.0))[0]
    assert np.abs(pixels(low[1]) - pixels(alone)).max() <= 1
    for a, b in zip(low, full, strict=True):
        assert mean_diff(a, seen) + 5 < mean_diff(b, seen)


# ---------------------------------------------------------------- the render task


def image_params(index: int, sha: str) -> ImageParams:
    return ImageParams(
        index=index, cell=0, prompt_index=0, repeat=index, prompt="a cat", negative_prompt="",
        seed=7 + index, model="m", width=64, height=64, steps=2, cfg_scale=5.0,
        sampler_name="Euler", scheduler="Automatic", init_image=sha, denoising_strength=0.5,
    )  # fmt: skip


def store_picture(store: LocalStore, picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    store.put_bytes(input_key(sha), buf.getvalue(), "image/png")
    return sha


def test_an_engine_without_img2img_fails_the_images_naming_init_image(tmp_path):
    from workers.engine.synthetic import SyntheticEngine

    rt = runtime(tmp_path, SyntheticEngine())
    rt.record_failure = rt.failures.append
    sha = store_picture(rt.store, circle(40))
    with pytest.raises(EngineError, match="init_image"):
        _render_images(rt, "job", 0, "out", [image_params(0, sha), image_params(1, sha)])
    (error,) = rt.ledger.errors
    assert error["images"] == [0, 1] and error["images_failed"] and error["stage"] == "load"
    assert "init_image" in error["error"] and "synthetic" in error["error"]
    assert rt.ledger.marked == [([0, 1], False)]
    assert rt.failures == []  # not the model's fault: the worker stays on it
    assert not list(rt.store.list("out/"))


def test_an_input_missing_from_the_store_fails_the_images_naming_it(tmp_path):
    def no_engine(model: str) -> Any:
        raise AssertionError("no model is loaded for a task whose input is missing")

    rt = runtime(tmp_path, None)
    rt.engine_for = no_engine
    sha = "ab" * 32
    with pytest.raises(EngineError, match=sha):
        _render_images(rt, "job", 0, "out", [image_params(0, sha)])
    (error,) = rt.ledger.errors
    assert sha in error["error"] and input_key(sha) in error["error"]
    assert rt.ledger.marked == [([0], False)]


def test_inputs_are_fetched_once_checked_and_fitted(tmp_path):
    store = LocalStore(tmp_path / "s")
    sha = store_picture(store, circle(40))
    fetched: list[str] = []

    def fetch(key: str) -> bytes:
        fetched.append(key)
        return store.get_bytes(key)

    cache = InputPictures(most=1)
    first = cache.get(sha, fetch)
    assert cache.get(sha, fetch) is first and fetched == [input_key(sha)]
    fitted = fit_picture(first, 64, 32)  # "Just resize": stretched to exactly the size
    assert fitted.size == (64, 32) and fit_picture(first, 40, 40) is first
    store.put_bytes(input_key("cd" * 32), store.get_bytes(input_key(sha)))
    with pytest.raises(EngineError, match="sha256"):
        cache.get("cd" * 32, store.get_bytes)
