"""A1111's Clip skip on the SD1 engine (tiny random model): the prompt's states are the text
encoder's n-th layer from the last through its final layer norm, as A1111's
``CLIP_stop_at_last_layers``; an image is the same alone and in a batch; SDXL refuses it;
the render task writes ``Clip skip`` in A1111's place."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from farm.spec import ImageParams
from storage.png import parse_parameters, read_parameters
from tests.engine.render_stub import runtime
from workers.engine.base import BatchRequest, EngineError, ImageRequest
from workers.render import _render_images

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(images: list[ImageRequest], clip_skip: int) -> BatchRequest:
    return BatchRequest(tuple(images), 32, 32, 3, 5.0, "Euler a", "Automatic",
                        clip_skip=clip_skip)  # fmt: skip


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_states_are_the_nth_layer_from_the_last_through_the_final_norm(engine) -> None:
    chunk = engine.prompt_chunks("a red circle on a blue background")[0]
    ids = torch.tensor([chunk])
    with torch.no_grad():
        out = engine.text_encoder(ids, output_hidden_states=True)
        text = getattr(engine.text_encoder, "text_model", engine.text_encoder)
        layers = engine.text_encoder.config.num_hidden_layers
        assert len(out.hidden_states) == layers + 1  # the embeddings, then each layer
        for n in (1, 2, layers):
            want = text.final_layer_norm(out.hidden_states[-n])
            assert torch.allclose(engine.encoder_states(ids, n), want, atol=1e-6), n
    # Clip skip 1 is the encoder's own output, bit for bit
    assert torch.equal(engine.encoder_states(ids, 1), out.last_hidden_state)
    assert not torch.allclose(engine.encoder_states(ids, 2), out.last_hidden_state)
    with pytest.raises(EngineError, match=f"clip_skip: {layers + 1}, but the text encoder"):
        engine.encoder_states(ids, layers + 1)


def test_a_render_with_clip_skip_differs_and_is_the_same_in_any_batch(engine) -> None:
    me = ImageRequest("a red car", "blurry", 7)
    other = ImageRequest("a photo of a cat", "", 8)
    plain = engine.render(batch([me], 1))[0]
    skipped = engine.render(batch([me], 2))[0]
    together = engine.render(batch([other, me], 2))
    assert np.abs(px(skipped) - px(plain)).max() > 1
    assert np.abs(px(together[1]) - px(skipped)).max() <= 1


def test_sdxl_refuses_it(tmp_path) -> None:
    from workers.engine.loader import load_engine
    from workers.engine.tiny import write_tiny_sdxl_checkpoint

    sdxl = load_engine(write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", seed=0))
    with pytest.raises(EngineError, match="clip_skip"):
        sdxl.render(batch([ImageRequest("a cat", "", 1)], 2))


def test_the_render_task_writes_clip_skip_as_a1111(tmp_path, engine) -> None:
    rt = runtime(tmp_path, engine)
    params = ImageParams(
        index=0, cell=0, prompt_index=0, repeat=0, prompt="a cat", negative_prompt="",
        seed=7, model="m", width=32, height=32, steps=2, cfg_scale=5.0,
        sampler_name="Euler", scheduler="Automatic", clip_skip=2,
    )  # fmt: skip
    _render_images(rt, "job", 0, "out", [params])
    assert rt.ledger.marked == [([0], True)]
    (key,) = rt.store.list("out/")
    data = rt.store.get_bytes(key)
    assert Image.open(io.BytesIO(data)).size == (32, 32)
    text = read_parameters(data) or ""
    assert "Model: m, Clip skip: 2, Farm job: job" in text
    assert parse_parameters(text)["extra"]["Clip skip"] == "2"
