import numpy as np
import pytest

from workers.engine.base import BatchRequest, EngineError, ImageRequest

PROMPTS = ["a photo of a cat", "a red car", "mountains at dusk", "a bowl of soup"]


def batch(images, sampler="Euler a", steps=6, cfg=7.0, width=64, height=64):
    return BatchRequest(
        images=tuple(images),
        width=width,
        height=height,
        steps=steps,
        cfg_scale=cfg,
        sampler_name=sampler,
        scheduler="Automatic",
    )


@pytest.mark.parametrize("sampler", ["Euler a", "Euler", "DPM++ 2M"])
def test_same_seed_same_image_whatever_the_batch(engine, sampler):
    requests = [ImageRequest(p, "ugly" if i % 2 else "", 100 + i) for i, p in enumerate(PROMPTS)]
    together = engine.render(batch(requests, sampler))
    alone = engine.render(batch([requests[2]], sampler))
    a = np.asarray(together[2], dtype=np.int16)
    b = np.asarray(alone[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    other = np.asarray(together[1], dtype=np.int16)
    assert np.abs(a - other).max() > 1  # different seed and prompt: a different image


def test_render_size_mode_and_cfg_one(engine):
    images = engine.render(
        batch([ImageRequest("a cat", "", 1)], "Euler", steps=2, cfg=1.0, width=48, height=64)
    )
    assert len(images) == 1
    assert images[0].size == (48, 64) and images[0].mode == "RGB"


def test_seed_changes_ancestral_noise(engine):
    req = ImageRequest("a cat", "", 5)
    x = engine.render(batch([req], steps=3))[0]
    y = engine.render(batch([ImageRequest("a cat", "", 6)], steps=3))[0]
    z = engine.render(batch([req], steps=3))[0]
    assert np.array_equal(np.asarray(x), np.asarray(z))
    assert not np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sampler": "Heun"}, "sampler_name"),
        ({"width": 60}, "width"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_requests_are_engine_errors(engine, kwargs, field):
    with pytest.raises(EngineError, match=field):
        engine.render(batch([ImageRequest("a", "", 1)], **kwargs))
    with pytest.raises(EngineError, match="scheduler"):
        engine.render(BatchRequest((ImageRequest("a", "", 1),), 64, 64, 2, 7.0, "Euler", "Beta"))
