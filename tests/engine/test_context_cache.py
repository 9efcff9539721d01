"""The engine's cross-attention processor reuses the text context's keys and values across
sampling steps; pictures must be identical to diffusers' own attention processor."""

from __future__ import annotations

import numpy as np

from workers.engine.base import BatchRequest, ImageRequest


def test_context_cache_renders_identically(engine) -> None:  # type: ignore[no-untyped-def]
    from diffusers.models.attention_processor import AttnProcessor2_0

    from workers.engine.sd1 import ContextKVCache

    processors = engine.unet.attn_processors
    assert any(isinstance(p, ContextKVCache) for p in processors.values())
    batch = BatchRequest(
        (ImageRequest("a red fox", "blurry", 1), ImageRequest("a blue jay", "", 2)),
        64, 64, 4, 6.0, "DPM++ 2M", "Automatic")
    cached = engine.render(batch)
    again = engine.render(batch)  # a new render must not reuse the previous context
    try:
        engine.unet.set_attn_processor(AttnProcessor2_0())
        plain = engine.render(batch)
    finally:
        engine.unet.set_attn_processor(dict(processors))  # it pops from the dict
    for a, b, c in zip(cached, again, plain, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(c))
        assert np.array_equal(np.asarray(b), np.asarray(c))
    unguided = BatchRequest(batch.images, 64, 64, 3, 1.0, "Euler", "Automatic")
    first = engine.render(unguided)
    try:
        engine.unet.set_attn_processor(AttnProcessor2_0())
        plain = engine.render(unguided)
    finally:
        engine.unet.set_attn_processor(dict(processors))  # it pops from the dict
    for a, c in zip(first, plain, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(c))
