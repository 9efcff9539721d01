"""Inpainting in the engines and the render task (A1111's, on normal models): outside the
latent mask every result is the picture's own latent, under it the image is repainted;
"latent noise" and "latent nothing" start the masked part from the seed's noise or zeros;
an image is the same alone and in a batch; SDXL too; the render task fetches the mask,
prepares the picture (whole or only the masked part), puts the picture's own pixels back
outside the mask, writes A1111's infotext entries, and fails the images naming
``inpaint.mask`` when the mask is not in the store."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from farm.spec import ImageParams, InpaintSpec
from storage.keys import image_key, input_key
from storage.png import parse_parameters, read_parameters
from tests.engine.render_stub import runtime
from workers.engine.base import BatchRequest, EngineError, ImageRequest
from workers.engine.inpaint import latent_mask
from workers.render import _render_images

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a yellow square on a green background"


def circle(w: int = 64, h: int | None = None) -> Image.Image:
    """A red circle on a blue background, in the demo model's world."""
    h = w if h is None else h
    picture = Image.new("RGB", (w, h), (30, 60, 220))
    ImageDraw.Draw(picture).ellipse((w // 4, h // 4, w - w // 4, h - h // 4), fill=(220, 30, 30))
    return picture


def box_mask(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    """White (repainted) inside ``box``, black elsewhere."""
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def inpaint_batch(images, mask, content="original", strength=0.9, size=32, sampler="Euler",
                  steps=3, init=None) -> BatchRequest:  # fmt: skip
    return BatchRequest(
        tuple(images), size, size, steps, 5.0, sampler, "Automatic",
        init_image=circle(size) if init is None else init, denoising_strength=strength,
        mask=mask, masked_content=content,
    )  # fmt: skip


def keep_of(engine, batch: BatchRequest) -> torch.Tensor:
    """Where the latents are kept (1) as A1111 has it: the mask at the latents' size."""
    h, w = engine.latent_shape(batch)[-2:]
    return torch.from_numpy(1 - latent_mask(batch.mask, h, w))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------- the engines


@pytest.mark.parametrize("content", ["original", "latent noise", "latent nothing", "fill"])
def test_outside_the_mask_the_latents_are_the_pictures_own(engine, content) -> None:
    mask = box_mask(32, 32, (0, 0, 15, 31))  # the left half is repainted
    batch = inpaint_batch([ImageRequest("a cat", "", 3)], mask, content)
    keep = keep_of(engine, batch)
    assert 0 < keep.sum() < keep.numel()
    init = engine.encode_image(batch.init_image)
    out = engine.sample_latents(batch)
    kept = keep.bool().expand_as(out)
    assert torch.equal(out[kept], init.expand_as(out)[kept])
    assert (out - init).abs()[~kept].mean() > 0.05  # repainted under the mask
    plain = engine.sample_latents(dataclasses.replace(batch, mask=None))
    assert (plain - init).abs()[kept].mean() > 0.05  # img2img alone moves it too


def test_masked_content_sets_where_the_masked_part_starts(engine) -> None:
    mask = box_mask(32, 32, (8, 8, 23, 23))
    image = ImageRequest("a cat", "", 5)
    batch = inpaint_batch([image], mask, "latent noise")
    keep = keep_of(engine, batch)
    init = engine.encode_image(batch.init_image)
    start, start_keep = engine.inpaint_start(batch)
    assert torch.equal(start_keep[0, 0], keep)
    seed_noise = torch.randn(init.shape[1:], generator=torch.Generator().manual_seed(5))
    assert torch.allclose(start[0], init[0] * keep + seed_noise * (1 - keep))
    start, _ = engine.inpaint_start(dataclasses.replace(batch, masked_content="latent nothing"))
    assert torch.equal(start[0], init[0] * keep)
    start, _ = engine.inpaint_start(dataclasses.replace(batch, masked_content="original"))
    assert torch.equal(start[0], init[0])
    assert engine.inpaint_start(dataclasses.replace(batch, mask=None)) is None
    # and so what is rendered under the mask differs
    outs = [engine.sample_latents(dataclasses.replace(batch, masked_content=c))
            for c in ("original", "latent noise", "latent nothing")]  # fmt: skip
    assert min((a - b).abs().max() for a in outs for b in outs if a is not b) > 0.05


def test_every_prediction_the_sampler_sees_keeps_the_picture(engine, monkeypatch) -> None:
    import workers.engine.sd1 as sd1

    predictions: list[torch.Tensor] = []
    real = sd1.run_sampler

    def spy(name, model, x, sigmas, gens, device):
        def seen(x, sigma):
            predictions.append(model(x, sigma))
            return predictions[-1]

        return real(name, seen, x, sigmas, gens, device)

    monkeypatch.setattr(sd1, "run_sampler", spy)
    batch = inpaint_batch([ImageRequest("a cat", "", 3)], box_mask(32, 32, (0, 0, 31, 15)),
                          steps=4, sampler="DPM++ 2M")  # fmt: skip
    kept = keep_of(engine, batch).bool()
    init = engine.encode_image(batch.init_image)[0]
    engine.sample_latents(batch)
    assert len(predictions) >= 3
    for p in predictions:  # A1111's CFGDenoiser blends each prediction, not only the last
        assert torch.equal(p[0][kept.expand_as(p[0])], init[kept.expand_as(init)])
        assert (p[0] - init).abs()[~kept.expand_as(init)].mean() > 0.01


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_an_image_is_the_same_alone_and_in_a_batch(engine, sampler) -> None:
    mask = box_mask(32, 32, (0, 10, 31, 25))
    requests = [ImageRequest("a cat", "", 3), ImageRequest("a red car", "ugly", 4)]
    together = engine.render(inpaint_batch(requests, mask, "latent noise", sampler=sampler))
    alone = engine.render(inpaint_batch(requests[1:], mask, "latent noise", sampler=sampler))
    assert np.abs(pixels(together[1]) - pixels(alone[0])).max() <= 1
    assert np.abs(pixels(together[0]) - pixels(together[1])).max() > 1


def test_a_mask_is_checked(engine) -> None:
    image = [ImageRequest("a cat", "", 1)]
    with pytest.raises(EngineError, match="mask: 16x16, not the batch's 32x32"):
        engine.render(inpaint_batch(image, box_mask(16, 16, (0, 0, 7, 7))))
    no_picture = dataclasses.replace(inpaint_batch(image, box_mask(32, 32, (0, 0, 7, 7))),
                                     init_image=None)  # fmt: skip
    with pytest.raises(EngineError, match="mask: inpainting needs an init_image"):
        engine.render(no_picture)
    with pytest.raises(EngineError, match="masked_content: 'smudge'"):
        engine.render(inpaint_batch(image, box_mask(32, 32, (0, 0, 7, 7)), "smudge"))


def test_sdxl_inpaints_too(tmp_path) -> None:
    from workers.engine.loader import load_engine
    from workers.engine.tiny import write_tiny_sdxl_checkpoint

    sdxl = load_engine(write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", seed=0))
    assert sdxl.takes_mask
    batch = inpaint_batch([ImageRequest("a cat", "", 3), ImageRequest("a dog", "", 4)],
                          box_mask(32, 32, (16, 0, 31, 31)), "latent nothing")  # fmt: skip
    keep = keep_of(sdxl, batch).bool()
    init = sdxl.encode_image(batch.init_image)
    out = sdxl.sample_latents(batch)
    kept = keep.expand_as(out)
    assert torch.equal(out[kept], init.expand_as(out)[kept])
    assert (out - init).abs()[~kept].mean() > 0.05


# ---------------------------------------------------------------- the render task


@pytest.fixture(scope="module")
def demo_engine():
    from workers.demo import demo_checkpoint_path
    from workers.engine.loader import load_engine

    return load_engine(demo_checkpoint_path())


def store_picture(store, picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    store.put_bytes(input_key(sha), buf.getvalue(), "image/png")
    return sha


def params(index: int, init: str, inpaint: InpaintSpec, size=(64, 64)) -> ImageParams:
    return ImageParams(
        index=index, cell=0, prompt_index=0, repeat=index, prompt=PROMPT, negative_prompt="",
        seed=7 + index, model="m", width=size[0], height=size[1], steps=4, cfg_scale=5.0,
        sampler_name="Euler", scheduler="Automatic", init_image=init, denoising_strength=1.0,
        inpaint=inpaint,
    )  # fmt: skip


def rendered(rt, index: int) -> tuple[Image.Image, dict]:
    data = rt.store.get_bytes(image_key("out", "job", index, 7 + index))
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB"), parse_parameters(read_parameters(data))["extra"]


def test_the_render_task_repaints_only_the_masked_part(tmp_path, demo_engine) -> None:
    rt = runtime(tmp_path, demo_engine)
    init = circle(64)
    sha = store_picture(rt.store, init)
    mask = store_picture(rt.store, box_mask(64, 64, (20, 20, 43, 43)).convert("RGB"))
    spec = InpaintSpec(mask=mask, mask_blur=2, masked_content="fill")
    _render_images(rt, "job", 0, "out", [params(0, sha, spec)])
    image, info = rendered(rt, 0)
    assert image.size == (64, 64)
    got, want = pixels(image), pixels(init)
    # far from the mask (blur 2, the latents' 8 pixel cells) the picture's own pixels
    outside = np.ones((64, 64), bool)
    outside[8:56, 8:56] = False
    assert np.array_equal(got[outside], want[outside])
    # the middle, the circle's red at strength 1, is repainted towards the prompt
    assert np.abs(got[28:36, 28:36] - want[28:36, 28:36]).mean() > 40
    assert (info["Mask blur"], info["Masked content"], info["Denoising strength"]) == (
        "2", "fill", "1.0")  # fmt: skip
    assert "Inpaint area" not in info and "Mask mode" not in info


def test_only_masked_renders_the_box_and_pastes_it_into_the_picture(tmp_path, demo_engine) -> None:
    rt = runtime(tmp_path, demo_engine)
    init = circle(128, 96)
    sha = store_picture(rt.store, init)
    # black is repainted, as the mask is inverted: the white frame and left part are kept
    mask = Image.new("L", (128, 96), 255)
    ImageDraw.Draw(mask).rectangle((60, 30, 91, 61), fill=0)
    mask_sha = store_picture(rt.store, mask)
    spec = InpaintSpec(mask=mask_sha, mask_blur=0, invert_mask=True, only_masked=True, padding=8)
    _render_images(rt, "job", 0, "out", [params(0, sha, spec)])
    image, info = rendered(rt, 0)
    assert image.size == (128, 96)  # the init picture's size, the render pasted into it
    got, want = pixels(image), pixels(init)
    outside = np.ones((96, 128), bool)
    outside[30:62, 60:92] = False
    assert np.array_equal(got[outside], want[outside])
    assert np.abs(got[40:52, 70:82] - want[40:52, 70:82]).mean() > 20
    assert info["Mask mode"] == "Inpaint not masked"
    assert (info["Inpaint area"], info["Masked area padding"]) == ("Only masked", "8")
    assert "Size: 64x64" in read_parameters(
        rt.store.get_bytes(image_key("out", "job", 0, 7))
    )  # the render's, as A1111 writes it


def test_a_mask_missing_from_the_store_fails_the_images_naming_it(tmp_path) -> None:
    def no_engine(model: str):
        raise AssertionError("no model is loaded for a task whose mask is missing")

    rt = runtime(tmp_path, None)
    rt.engine_for = no_engine
    sha = store_picture(rt.store, circle(64))
    spec = InpaintSpec(mask="cd" * 32)
    with pytest.raises(EngineError, match="inpaint.mask"):
        _render_images(rt, "job", 0, "out", [params(0, sha, spec), params(1, sha, spec)])
    (error,) = rt.ledger.errors
    assert "inpaint.mask" in error["error"] and input_key("cd" * 32) in error["error"]
    assert rt.ledger.marked == [([0, 1], False)]
    assert not list(rt.store.list("out/"))


def test_the_tasks_of_a_job_prepare_picture_and_mask_once(tmp_path, engine, monkeypatch) -> None:
    import workers.render as render

    prepared: list[tuple[int, int]] = []
    real = render.inpaint.prepare

    def counted(picture, mask, width, height, **kw):
        prepared.append((width, height))
        return real(picture, mask, width, height, **kw)

    monkeypatch.setattr(render.inpaint, "prepare", counted)
    monkeypatch.setattr(render, "PREPARED", type(render.PREPARED)())
    rt = runtime(tmp_path, engine)
    sha = store_picture(rt.store, circle(64))
    spec = InpaintSpec(mask=store_picture(rt.store, box_mask(64, 64, (8, 8, 40, 40))))
    small = dict(size=(32, 32))
    _render_images(rt, "job", 0, "out", [params(0, sha, spec, **small)])
    _render_images(rt, "job", 1, "out", [params(1, sha, spec, **small)])
    assert prepared == [(32, 32)]  # the second task took the first one's
    _render_images(rt, "job", 2, "out", [params(2, sha, spec.model_copy(update={"padding": 4}),
                                                **small)])  # fmt: skip
    _render_images(rt, "job", 3, "out", [params(3, sha, spec, size=(40, 32))])
    assert prepared == [(32, 32), (32, 32), (40, 32)]  # other settings, another size
    for i in range(5, 5 + render.PREPARED_MOST):  # the ones used last are kept, no more
        _render_images(rt, "job", i, "out", [params(i, sha, spec, size=(32 + 8 * i, 32))])
    assert len(render.PREPARED) == render.PREPARED_MOST
    assert rt.ledger.errors == []
