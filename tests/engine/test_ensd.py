"""A1111's ENSD (``BatchRequest.eta_noise_seed_delta``): once an image's first noise is
drawn, its ancestral noise comes from a new generator of ``seed + delta``, in the first
pass and the hires pass, on SD1 and SDXL; the first noise stays the seed's; a sampler
without ancestral noise renders the same; an image is the same alone and in a batch; the
render task writes ``ENSD`` where A1111 does, and only for a sampler that reads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.spec import ImageParams
from storage.png import parse_parameters, read_parameters
from tests.engine.render_stub import runtime
from workers.engine.base import (
    BatchRequest,
    EngineError,
    HiresRequest,
    ImageRequest,
    ancestral_generators,
)
from workers.render import _render_images

pytestmark = pytest.mark.usefixtures("one_thread")
DELTA = 31337


def batch(images, sampler="Euler a", delta=DELTA, steps=3, size=32, **kw) -> BatchRequest:
    return BatchRequest(tuple(images), size, size, steps, 5.0, sampler, "Automatic",
                        eta_noise_seed_delta=delta, **kw)  # fmt: skip


def first_draw(g: torch.Generator) -> torch.Tensor:
    return torch.randn(8, generator=g)


def fresh(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_ancestral_generators_are_new_ones_of_seed_plus_delta() -> None:
    images = [ImageRequest("", "", 5), ImageRequest("", "", 9)]
    gens = [fresh(5), fresh(9)]
    assert ancestral_generators(batch(images, delta=0), gens) is gens
    new = ancestral_generators(batch(images), gens)
    assert [torch.equal(first_draw(g), first_draw(fresh(s + DELTA))) for g, s in zip(
        new, (5, 9), strict=True)] == [True, True]  # fmt: skip
    with pytest.raises(EngineError, match="eta_noise_seed_delta: -1"):
        batch(images, delta=-1).validate()


@pytest.fixture
def sampler_gens(monkeypatch):
    """The first draw of each generator every sampler run was given, run by run."""
    import workers.engine.sd1 as sd1

    seen: list[list[torch.Tensor]] = []
    real = sd1.run_sampler

    def spy(name, model, x, sigmas, gens, device):
        states = [g.get_state() for g in gens]
        seen.append([first_draw(g) for g in gens])
        for g, state in zip(gens, states, strict=True):
            g.set_state(state)  # leave them as they were for the real run
        return real(name, model, x, sigmas, gens, device)

    # both engines sample through sd1.sample, which looks run_sampler up as it runs
    monkeypatch.setattr(sd1, "run_sampler", spy)
    return seen


def test_sd1_ancestral_noise_comes_from_seed_plus_delta_in_both_passes(
    engine, sampler_gens
) -> None:
    image = ImageRequest("a cat", "", 7)
    engine.sample_latents(batch([image], hires=HiresRequest(steps=2)))
    (first_pass,), (second_pass,) = sampler_gens
    assert torch.equal(first_pass, first_draw(fresh(7 + DELTA)))
    assert torch.equal(second_pass, first_draw(fresh(7 + DELTA)))
    sampler_gens.clear()
    engine.sample_latents(batch([image], delta=0))
    # without it: the seed's generator, after the first noise it drew
    after = fresh(7)
    torch.randn(engine.latent_shape(batch([image])), generator=after)
    assert torch.equal(sampler_gens[0][0], first_draw(after))


def test_sdxl_reads_it_too(tmp_path, sampler_gens) -> None:
    from workers.engine.loader import load_engine
    from workers.engine.tiny import write_tiny_sdxl_checkpoint

    sdxl = load_engine(write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", seed=0))
    sdxl.sample_latents(batch([ImageRequest("a cat", "", 4)], steps=2))
    assert len(sampler_gens) == 1, len(sampler_gens)
    assert torch.equal(sampler_gens[0][0], first_draw(fresh(4 + DELTA)))


def test_renders_change_with_euler_a_only_and_not_with_the_batch(engine) -> None:
    me, other = ImageRequest("a red car", "blurry", 7), ImageRequest("a cat", "", 8)

    def px(b: BatchRequest, i: int = 0) -> np.ndarray:
        return np.asarray(engine.render(b)[i], dtype=np.int16)

    plain, ensd = px(batch([me], delta=0)), px(batch([me]))
    assert np.abs(ensd - plain).max() > 1
    assert np.abs(px(batch([other, me]), 1) - ensd).max() <= 1
    # the first noise is the seed's: a sampler without ancestral noise renders the same
    assert np.array_equal(px(batch([me], "Euler", delta=0)), px(batch([me], "Euler")))


@pytest.mark.parametrize(("sampler", "written"), [("Euler a", True), ("Euler", False)])
def test_the_render_task_writes_ensd_as_a1111(tmp_path, engine, sampler, written) -> None:
    rt = runtime(tmp_path, engine)
    params = ImageParams(
        index=0, cell=0, prompt_index=0, repeat=0, prompt="a cat", negative_prompt="",
        seed=7, model="m", width=32, height=32, steps=2, cfg_scale=5.0,
        sampler_name=sampler, scheduler="Automatic", clip_skip=2,
        eta_noise_seed_delta=DELTA,
    )  # fmt: skip
    _render_images(rt, "job", 0, "out", [params])
    (key,) = rt.store.list("out/")
    text = read_parameters(rt.store.get_bytes(key)) or ""
    assert ("Clip skip: 2, ENSD: 31337, Farm job" in text) is written
    assert parse_parameters(text)["extra"].get("ENSD") == ("31337" if written else None)
