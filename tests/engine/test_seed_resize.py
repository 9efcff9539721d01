"""A1111's "Resize seed from" (``BatchRequest.seed_resize_from``): the seed's noise drawn at
the other size from a fresh generator of the seed, set into the middle of the image's own
draw (or cropped to its middle), with A1111's offsets; the main generator advances as
without it; variation seeds slerp at the drawn size; SD1, SDXL and Flux draw it so; the
same size changes nothing, bit for bit; the render task writes ``Seed resize from``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from farm.spec import ImageParams
from storage.png import parse_parameters, read_parameters
from tests.engine.render_stub import runtime
from workers.engine.base import BatchRequest, EngineError, ImageRequest, first_noise, slerp
from workers.render import _render_images

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def batch(images, size=(64, 64), resize=None, sampler="Euler", steps=3) -> BatchRequest:
    return BatchRequest(tuple(images), size[0], size[1], steps, 5.0, sampler, "Automatic",
                        seed_resize_from=resize)  # fmt: skip


def test_a_smaller_drawn_noise_sits_in_the_middle_of_the_images_own_draw() -> None:
    g = gen(5)
    (noise,) = first_noise([ImageRequest("", "", 5)], (4, 10, 12), [g], resized_from=(6, 8))
    own, small = randn((4, 10, 12), 5), randn((4, 6, 8), 5)
    want = own.clone()
    want[:, 2:8, 2:10] = small  # (10 - 6) / 2 rows and (12 - 8) / 2 columns in
    assert torch.equal(noise, want)
    # the image's generator drew its own size once, as without the resize: ancestral
    # noise after it is the same
    plain = gen(5)
    torch.randn((4, 10, 12), generator=plain)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=plain))


def test_a_larger_drawn_noise_is_cropped_to_its_middle_with_a1111s_offsets() -> None:
    (noise,) = first_noise([ImageRequest("", "", 9)], (4, 8, 8), [gen(9)], resized_from=(12, 11))
    big, own = randn((4, 12, 11), 9), randn((4, 8, 8), 9)
    # rows: (8 - 12) // 2 = -2, so 12 - 4 = 8 rows from row 2; columns: (8 - 11) // 2 = -2
    # (rounded down), so 11 - 4 = 7 columns from column 2 and the last column stays the
    # image's own draw, as A1111 leaves it
    assert torch.equal(noise[:, :, :7], big[:, 2:10, 2:9])
    assert torch.equal(noise[:, :, 7], own[:, :, 7])


def test_variation_seeds_slerp_at_the_drawn_size_before_the_placing() -> None:
    image = ImageRequest("", "", 3, subseed=44, subseed_strength=0.4)
    (noise,) = first_noise([image], (4, 8, 8), [gen(3)], resized_from=(4, 4))
    blended = slerp(0.4, randn((4, 4, 4), 3), randn((4, 4, 4), 44))
    assert torch.allclose(noise[:, 2:6, 2:6], blended)
    assert torch.equal(noise[:, 0], randn((4, 8, 8), 3)[:, 0])  # the rest: the seed's own


def test_the_batch_size_in_latents_decides_whether_it_resizes() -> None:
    one = [ImageRequest("", "", 1)]
    assert batch(one).seed_noise_size() is None
    assert batch(one, resize=(64, 64)).seed_noise_size() is None
    assert batch(one, resize=(70, 66)).seed_noise_size() is None  # the same latents
    assert batch(one, resize=(96, 48)).seed_noise_size() == (6, 12)
    assert batch(one, resize=(96, 48)).seed_noise_size(4) == (12, 24)
    with pytest.raises(EngineError, match="seed_resize_from: 4x64"):
        batch(one, resize=(4, 64)).validate()


def test_sd1_renders_from_the_resized_noise_and_the_same_size_changes_nothing(
    engine, monkeypatch
) -> None:
    me, other = ImageRequest("a red car", "blurry", 7), ImageRequest("a cat", "", 8)
    plain = engine.render(batch([me]))[0]
    same = engine.render(batch([me], resize=(64, 64)))[0]
    assert np.array_equal(np.asarray(plain), np.asarray(same))
    drawn: list[tuple[int, int] | None] = []

    def spy(images, shape, gens, resized_from=None):
        drawn.append(resized_from)
        return first_noise(images, shape, gens, resized_from)

    monkeypatch.setattr("workers.engine.sd1.first_noise", spy)
    resized = engine.render(batch([me], resize=(128, 96)))[0]
    f = engine.vae_scale_factor
    assert drawn == [(96 // f, 128 // f)]
    assert np.abs(np.asarray(resized, np.int16) - np.asarray(plain, np.int16)).max() > 1
    together = engine.render(batch([other, me], resize=(128, 96)))[1]
    assert np.abs(np.asarray(together, np.int16) - np.asarray(resized, np.int16)).max() <= 1


def test_sdxl_draws_the_resized_noise_too(tmp_path, monkeypatch) -> None:
    from workers.engine.loader import load_engine
    from workers.engine.tiny import write_tiny_sdxl_checkpoint

    sdxl = load_engine(write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", seed=0))
    drawn: list[tuple[int, int] | None] = []

    def spy(images, shape, gens, resized_from=None):
        drawn.append(resized_from)
        return first_noise(images, shape, gens, resized_from)

    monkeypatch.setattr("workers.engine.sdxl.first_noise", spy)
    sdxl.sample_latents(batch([ImageRequest("a cat", "", 3)], (32, 32), resize=(64, 48), steps=2))
    f = sdxl.vae_scale_factor
    assert drawn == [(48 // f, 64 // f)]


def test_flux_packs_the_resized_noise(tmp_path) -> None:
    from workers.engine.flux import FluxEngine, pack
    from workers.engine.tiny import (
        t5_tokenizer_dir,
        write_tiny_flux_checkpoint,
        write_tiny_t5_tokenizer,
    )

    path = write_tiny_flux_checkpoint(tmp_path / "flux.safetensors", seed=0)
    write_tiny_t5_tokenizer(t5_tokenizer_dir(path))
    flux = FluxEngine.from_single_file(path, t5_tokenizer=t5_tokenizer_dir(path))
    b = batch([ImageRequest("a cat", "", 3)], (32, 32), resize=(64, 48))
    shape, f = flux.latent_shape(b), flux.vae_scale_factor
    want = first_noise(b.images, shape, [gen(3)], (48 // f, 64 // f))
    assert torch.equal(flux.initial_noise(b), pack(want))
    assert not torch.equal(flux.initial_noise(batch(b.images, (32, 32))), pack(want))


def test_the_render_task_writes_seed_resize_from_as_a1111(tmp_path, engine) -> None:
    rt = runtime(tmp_path, engine)
    params = ImageParams(
        index=0, cell=0, prompt_index=0, repeat=0, prompt="a cat", negative_prompt="",
        seed=7, model="m", width=32, height=32, steps=2, cfg_scale=5.0,
        sampler_name="Euler", scheduler="Automatic", subseed=9, subseed_strength=0.5,
        seed_resize_from=(64, 48),
    )  # fmt: skip
    _render_images(rt, "job", 0, "out", [params])
    assert rt.ledger.marked == [([0], True)]
    (key,) = rt.store.list("out/")
    text = read_parameters(rt.store.get_bytes(key)) or ""
    assert Image.open(io.BytesIO(rt.store.get_bytes(key))).size == (32, 32)
    assert (
        "Model: m, Variation seed: 9, Variation seed strength: 0.5, Seed resize from: 64x48, "
        "Farm job: job" in text
    )
    assert parse_parameters(text)["extra"]["Seed resize from"] == "64x48"
