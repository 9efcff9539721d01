"""Inpainting checkpoints (a UNet that reads 9 channels, as sd-v1-5-inpainting's): the
loader builds the UNet the file holds, the engine feeds it the latents, then the mask
rounded to 0 or 1 at the latents' size, then the VAE latent of the picture with the
masked part grey, as A1111's ``inpainting_image_conditioning``; txt2img (and its hires
pass) and img2img without a mask mask the whole picture; an image is the same alone and in
a batch; SDXL too; the render task writes A1111's ``Conditional mask weight``. Each is
checked against an independent computation from the picture's pixels and the VAE."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from farm.spec import ImageParams
from storage.keys import image_key
from storage.png import parse_parameters, read_parameters
from tests.engine.render_stub import runtime
from workers.engine.base import BatchRequest, EngineError, HiresRequest, ImageRequest

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32


def picture(w: int = SIZE, h: int = SIZE) -> Image.Image:
    out = Image.new("RGB", (w, h), (30, 60, 220))
    ImageDraw.Draw(out).ellipse((w // 4, h // 4, w - w // 4, h - h // 4), fill=(220, 30, 30))
    return out


def soft_mask() -> Image.Image:
    """White on the left, black on the right, a blurred edge of greys between."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 13, SIZE - 1), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(2))


def batch_of(images, init=None, mask=None, cfg=5.0, hires=None) -> BatchRequest:
    return BatchRequest(
        tuple(images), SIZE, SIZE, 3, cfg, "Euler", "Automatic", init_image=init,
        denoising_strength=0.8 if init is not None else 0.75, mask=mask, hires=hires,
    )  # fmt: skip


@pytest.fixture(scope="module")
def inpainting_path(tmp_path_factory):
    from workers.engine.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("inp") / "inp.safetensors", 3, True)


@pytest.fixture(scope="module")
def inpainting_engine(inpainting_path):
    from workers.engine.loader import load_engine

    return load_engine(inpainting_path)


class UNetInputs:
    """Every input the UNet is called with, from a forward pre-hook."""

    def __init__(self, unet) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls.append(args[0].detach().float().clone())

    def __enter__(self) -> UNetInputs:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def expected_conditioning(
    engine, init: Image.Image | None, mask: Image.Image | None, size: tuple[int, int] = (SIZE, SIZE)
) -> torch.Tensor:
    """(1, 5, h, w) from the pixels: the mask rounded and taken at every other pixel (these
    VAEs halve the size; nearest downsampling), then the VAE mean of the picture in [-1, 1]
    times (1 - the rounded mask), times the scaling factor."""
    w, h = size
    rgb = (np.zeros((h, w, 3), np.float32) if init is None
           else np.asarray(init, np.float32) / 127.5 - 1.0)  # fmt: skip
    m = np.ones((h, w), np.float32) if mask is None else np.asarray(mask, np.float32) / 255.0
    m = (m > 0.5).astype(np.float32)
    masked = torch.from_numpy(rgb * (1.0 - m)[..., None]).permute(2, 0, 1)[None]
    latent = engine.vae.encode(masked).latent_dist.mean * engine.vae.config.scaling_factor
    small = torch.from_numpy(m[::2, ::2].copy())[None, None]
    return torch.cat([small, latent], dim=1)


# ------------------------------------------------------------------------ loading


def test_a_9_channel_checkpoint_is_an_inpainting_model(inpainting_engine, engine) -> None:
    assert inpainting_engine.inpainting_model and not engine.inpainting_model
    assert inpainting_engine.unet.config.in_channels == 9
    batch = batch_of([ImageRequest("a cat", "", 1)])
    assert inpainting_engine.latent_shape(batch) == engine.latent_shape(batch) == (4, 16, 16)


def test_the_loader_reads_the_input_channels_from_the_file(inpainting_path, tmp_path) -> None:
    """A real inpainting checkpoint carries no configs: the shipped SD1.5 UNet config says 4
    input channels, the file's first convolution 9, and the file wins."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from workers.engine.loader import load_engine

    with safe_open(str(inpainting_path), framework="pt") as f:
        metadata = f.metadata()
    unet = json.loads(metadata["farm.unet_config"])
    assert unet["in_channels"] == 9
    metadata["farm.unet_config"] = json.dumps({**unet, "in_channels": 4})
    out = tmp_path / "says4.safetensors"
    save_file(load_file(str(inpainting_path)), str(out), metadata)
    assert load_engine(out).inpainting_model


def test_a_unet_reading_other_channels_is_refused_naming_them(tiny_modules) -> None:
    from diffusers import UNet2DConditionModel

    from workers.engine.sd1 import SD1Components, SD1Engine, load_tokenizer
    from workers.engine.tiny import TINY_UNET

    _, vae, text_encoder = tiny_modules
    unet = UNet2DConditionModel.from_config({**TINY_UNET, "in_channels": 8})
    parts = SD1Components(unet, vae, text_encoder, load_tokenizer(), {})
    with pytest.raises(EngineError, match="reads 8 channels.*4 latent channels, or 9"):
        SD1Engine(parts)


# ------------------------------------------------------------------- what it reads


def test_the_unet_reads_the_latents_the_mask_and_the_masked_pictures_latents(
    inpainting_engine,
) -> None:
    init, mask = picture(), soft_mask()
    grey = np.asarray(mask)
    assert ((grey > 0) & (grey < 255)).any()  # greys to round
    batch = batch_of([ImageRequest("a cat", "", 1), ImageRequest("a dog", "", 2)], init, mask)
    want = expected_conditioning(inpainting_engine, init, mask)
    with UNetInputs(inpainting_engine.unet) as seen:
        out = inpainting_engine.sample_latents(batch)
    assert out.shape == (2, 4, 16, 16)
    assert len(seen.calls) == 3  # one call a step: cond and uncond together
    for x in seen.calls:
        assert x.shape == (4, 9, 16, 16)  # 2 images x (uncond, cond)
        for row in x:
            torch.testing.assert_close(row[None, 4:], want, rtol=0, atol=1e-5)
    # the first 4 channels are the sampler's latents: the first call's, the noised picture
    noise_free = inpainting_engine.encode_image(init)
    assert not torch.allclose(seen.calls[0][0, :4], noise_free[0], atol=1e-3)
    assert 0 < want[0, 0].sum() < want[0, 0].numel()  # a mask with both parts


@pytest.mark.parametrize("init", [None, picture()], ids=["txt2img", "img2img"])
def test_without_a_mask_the_whole_picture_is_masked(inpainting_engine, init) -> None:
    """A1111's txt2img conditioning (all masked, the picture grey), and its img2img one with
    no mask, which comes to the same."""
    batch = batch_of([ImageRequest("a cat", "", 4)], init)
    want = expected_conditioning(inpainting_engine, None, None)
    assert torch.equal(want[0, 0], torch.ones(16, 16))
    with UNetInputs(inpainting_engine.unet) as seen:
        inpainting_engine.sample_latents(batch)
    for x in seen.calls:
        torch.testing.assert_close(x[:, 4:], want.expand(2, -1, -1, -1), rtol=0, atol=1e-5)


def test_the_hires_pass_reads_the_conditioning_at_its_own_size(inpainting_engine) -> None:
    hires = HiresRequest(scale=1.5, steps=2, denoising_strength=0.6)
    batch = batch_of([ImageRequest("a cat", "", 5)], hires=hires)
    with UNetInputs(inpainting_engine.unet) as seen:
        out = inpainting_engine.sample_latents(batch)
    assert out.shape == (1, 4, 24, 24)
    first, second = seen.calls[:3], seen.calls[3:]
    assert [x.shape[-1] for x in first] == [16] * 3 and second
    want = expected_conditioning(inpainting_engine, None, None, (48, 48))
    for x in second:
        assert x.shape == (2, 9, 24, 24)
        torch.testing.assert_close(x[:, 4:], want.expand(2, -1, -1, -1), rtol=0, atol=1e-5)


def test_an_image_is_the_same_alone_and_in_a_batch(inpainting_engine) -> None:
    """Images of a batch are sampled in groups by prompt length (here 1 and 2 chunks): each
    group reads the conditioning of as many images as it has (to float rounding)."""
    init, mask = picture(), soft_mask()
    long = ", ".join(["a very long prompt about a red circle"] * 12)
    images = [ImageRequest("a cat", "", 1), ImageRequest(long, "", 2),
              ImageRequest("a dog", "", 3)]  # fmt: skip
    together = inpainting_engine.sample_latents(batch_of(images, init, mask))
    for i, image in enumerate(images):
        alone = inpainting_engine.sample_latents(batch_of([image], init, mask))
        torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-3)
    assert (together[0] - together[2]).abs().max() > 0.1  # other seeds, other images


def test_the_conditioning_is_diffusers_inpainting_pipelines(inpainting_engine) -> None:
    """diffusers' StableDiffusionInpaintPipeline builds the same mask and masked-picture
    latents (its mask binarized at 0.5, the picture's latent distribution's mode: the mean
    the engine takes)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    e = inpainting_engine
    pipe = StableDiffusionInpaintPipeline(
        vae=e.vae, text_encoder=e.text_encoder, tokenizer=e.tokenizer, unet=e.unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    init, mask = picture(), soft_mask()
    image = pipe.image_processor.preprocess(init, height=SIZE, width=SIZE)
    binary = pipe.mask_processor.preprocess(mask, height=SIZE, width=SIZE)
    sample = DiagonalGaussianDistribution.sample
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
    try:
        small, latents = pipe.prepare_mask_latents(
            binary, image * (binary < 0.5), 1, SIZE, SIZE, torch.float32, "cpu", None, False
        )
    finally:
        DiagonalGaussianDistribution.sample = sample
    ours = e.image_conditioning(batch_of([ImageRequest("a", "", 1)], init, mask), (1, 4, 16, 16))
    torch.testing.assert_close(ours[:, :1], small, rtol=0, atol=0)
    torch.testing.assert_close(ours[:, 1:], latents, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------ SDXL


def test_an_sdxl_inpainting_checkpoint_reads_the_same(tmp_path) -> None:
    from workers.engine.loader import load_engine
    from workers.engine.tiny import write_tiny_sdxl_checkpoint

    engine = load_engine(write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", 1, True))
    assert type(engine).__name__ == "SDXLEngine" and engine.inpainting_model
    init, mask = picture(), soft_mask()
    want = expected_conditioning(engine, init, mask)
    with UNetInputs(engine.unet) as seen:
        out = engine.sample_latents(batch_of([ImageRequest("a cat", "", 1)], init, mask))
    assert out.shape == (1, 4, 16, 16) and seen.calls
    for x in seen.calls:
        assert x.shape == (2, 9, 16, 16)
        torch.testing.assert_close(x[:, 4:], want.expand(2, -1, -1, -1), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the render task


def params(index: int, **more) -> ImageParams:
    return ImageParams(
        index=index, cell=0, prompt_index=0, repeat=index, prompt="a cat", negative_prompt="",
        seed=7 + index, model="m", width=SIZE, height=SIZE, steps=2, cfg_scale=5.0,
        sampler_name="Euler", scheduler="Automatic", **more,
    )  # fmt: skip


def rendered(rt, index: int) -> tuple[Image.Image, dict]:
    data = rt.store.get_bytes(image_key("out", "job", index, 7 + index))
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB"), parse_parameters(read_parameters(data))["extra"]


def infotext(rt, index: int) -> dict:
    image, extra = rendered(rt, index)
    assert image.size == (SIZE, SIZE)
    return extra


def test_the_render_task_writes_conditional_mask_weight(tmp_path, inpainting_engine,
                                                        engine) -> None:  # fmt: skip
    from workers.render import _render_images

    rt = runtime(tmp_path / "inp", inpainting_engine)
    _render_images(rt, "job", 0, "out", [params(0)])
    assert infotext(rt, 0)["Conditional mask weight"] == "1.0"  # A1111's, its default weight
    plain = runtime(tmp_path / "plain", engine)
    _render_images(plain, "job", 0, "out", [params(0)])
    assert "Conditional mask weight" not in infotext(plain, 0)


def test_the_render_task_inpaints_with_an_inpainting_model(tmp_path, inpainting_engine) -> None:
    from farm.spec import InpaintSpec
    from tests.engine.test_inpaint import box_mask, store_picture
    from workers.render import _render_images

    rt = runtime(tmp_path, inpainting_engine)
    init = picture()
    sha = store_picture(rt.store, init)
    mask = store_picture(rt.store, box_mask(SIZE, SIZE, (0, 0, 13, SIZE - 1)))
    spec = InpaintSpec(mask=mask, mask_blur=0, masked_content="fill")
    _render_images(rt, "job", 0, "out", [params(0, init_image=sha, denoising_strength=1.0,
                                                inpaint=spec)])  # fmt: skip
    image, extra = rendered(rt, 0)
    got, want = np.asarray(image, np.int16), np.asarray(init, np.int16)
    assert np.array_equal(got[:, 16:], want[:, 16:])  # outside the mask: its own pixels
    assert np.abs(got[:, :12] - want[:, :12]).mean() > 5  # repainted
    keys = list(extra)
    assert extra["Conditional mask weight"] == "1.0" and extra["Masked content"] == "fill"
    assert (
        keys.index("Denoising strength")
        < keys.index("Conditional mask weight")
        < keys.index("Masked content")
    )  # A1111's order
