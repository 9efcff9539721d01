"""The SDXL engine on a tiny random SDXL checkpoint in the original single-file layout:
probing and loading, the key mapping (round trip and an independent OpenCLIP reading of the
file), parity with diffusers' StableDiffusionXLPipeline, seeds, long prompts, progress and
broken files.

Parity settings are test_parity.py's (A1111 sampler name -> diffusers scheduler). diffusers
zeroes the negative context and pooled text only when ``negative_prompt`` is None
(``force_zeros_for_empty_prompt``); the engine does it per image whose negative prompt is "",
so the engine's "" is compared with diffusers' None, a real negative prompt with itself.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.engine.test_parity import diffusers_scheduler
from workers.engine.base import BatchRequest, EngineError, ImageRequest

STEPS = 6
TOL = 1e-4
CFG = 3.0
WIDTH, HEIGHT = 48, 32  # not square, so that (height, width) and (width, height) differ
IMAGES = (ImageRequest("a photo of a cat", "blurry", 3), ImageRequest("a red car", "ugly", 4))
NO_NEGATIVE = tuple(ImageRequest(r.prompt, "", r.seed) for r in IMAGES)
# 119 tokens: 40 phrases "fine detail" with commas between (two chunks, see test_render.py)
LONG = ", ".join(f"{w} detail" for w in ["fine", "sharp", "soft", "warm", "cold"] * 8)
OPEN_CLIP = "conditioner.embedders.1.model."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_modules():
    from workers.engine.tiny import build_tiny_sdxl_modules

    return build_tiny_sdxl_modules(seed=0)


@pytest.fixture(scope="module")
def sdxl_path(sdxl_modules, tmp_path_factory):
    from workers.engine.tiny import write_sdxl_checkpoint

    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    return write_sdxl_checkpoint(path, *sdxl_modules)


@pytest.fixture(scope="module")
def sdxl_engine(sdxl_path):
    from workers.engine.loader import load_engine

    return load_engine(sdxl_path)


def batch(images, sampler="Euler a", steps=4, cfg=CFG, width=32, height=32, schedule="Automatic"):
    return BatchRequest(tuple(images), width, height, steps, cfg, sampler, schedule)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------- file, probe, key mapping


def test_probe_and_load_give_the_sdxl_engine(sdxl_path, sdxl_engine):
    from farm.models import probe_engine
    from workers.engine.loader import SUPPORTED_FAMILIES, import_libraries, probe_family
    from workers.engine.sdxl import SDXLEngine

    assert probe_family(sdxl_path) == "sdxl" == probe_engine(sdxl_path)  # worker and farm
    assert "sdxl" in SUPPORTED_FAMILIES
    import_libraries("sdxl")
    assert isinstance(sdxl_engine, SDXLEngine)
    assert sdxl_engine.family == "sdxl" and sdxl_engine.device == "cpu"
    assert sdxl_engine.unet.dtype == torch.float32
    assert sdxl_engine.vae.config.scaling_factor == 0.13025
    assert sdxl_path.stat().st_size < 10 * 1024 * 1024


def test_round_trip_state_dicts_equal(sdxl_modules, sdxl_engine):
    loaded = (
        sdxl_engine.unet,
        sdxl_engine.vae,
        sdxl_engine.text_encoder,
        sdxl_engine.text_encoder_2,
    )
    for original, module in zip(sdxl_modules, loaded, strict=True):
        a, b = original.state_dict(), module.state_dict()
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key


def open_clip_reference(state: dict, ids: torch.Tensor, heads: int) -> tuple:
    """OpenCLIP's text tower computed straight from the file in OpenCLIP's own terms
    (nn.MultiheadAttention over the stacked ``in_proj``, ``x @ text_projection`` at the end
    token): (penultimate hidden states, pooled), independent of diffusers' key mapping."""
    width = state[OPEN_CLIP + "positional_embedding"].shape[1]
    x = state[OPEN_CLIP + "token_embedding.weight"][ids] + state[OPEN_CLIP + "positional_embedding"]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    layers = 1 + max(int(k.split(".")[6]) for k in state if ".resblocks." in k)
    hidden = []
    for i in range(layers):
        p = f"{OPEN_CLIP}transformer.resblocks.{i}."

        def norm(name: str, t: torch.Tensor, p: str = p) -> torch.Tensor:
            return F.layer_norm(t, (width,), state[p + name + ".weight"], state[p + name + ".bias"])

        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict(
            {k.removeprefix(p + "attn."): v for k, v in state.items() if k.startswith(p + "attn.")}
        )
        h = norm("ln_1", x)
        x = x + attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.linear(norm("ln_2", x), state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = F.gelu(h)
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        hidden.append(x)
    final = F.layer_norm(
        x, (width,), state[OPEN_CLIP + "ln_final.weight"], state[OPEN_CLIP + "ln_final.bias"]
    )
    end = final[torch.arange(len(ids)), ids.argmax(dim=-1)]  # the end token has the top id
    pooled = end @ state[OPEN_CLIP + "text_projection"]
    return hidden[-2], pooled


def test_file_reads_as_open_clip_and_engine_encodes_like_sdxl(sdxl_path, sdxl_engine):
    """The second encoder's half of the context and the pooled text equal OpenCLIP's own
    computation on the file's tensors with "!"-padded ids: the q/k/v split, the transposed
    projection, the penultimate layer and the pad token are right."""
    from safetensors.torch import load_file

    from workers.engine.tiny import TINY_SDXL_TEXT_ENCODER, TINY_SDXL_TEXT_ENCODER_2

    prompts = ["a photo of a cat", "a red car, at night"]
    tok2 = sdxl_engine.tokenizer_2
    assert tok2.pad_token_id == 0 and tok2.convert_ids_to_tokens(0) == "!"
    ids = torch.tensor(tok2(prompts, padding="max_length", max_length=77).input_ids)
    assert (ids[:, -1] == 0).all()  # padded with "!", not with the end token
    with torch.no_grad():
        hidden, pooled = open_clip_reference(
            load_file(str(sdxl_path)), ids, TINY_SDXL_TEXT_ENCODER_2["num_attention_heads"]
        )
    context, ours = sdxl_engine.encode_prompts(prompts)
    width_l = TINY_SDXL_TEXT_ENCODER["hidden_size"]
    assert context.shape == (2, 77, width_l + TINY_SDXL_TEXT_ENCODER_2["hidden_size"])
    assert torch.allclose(context[..., width_l:], hidden, atol=1e-5)
    assert torch.allclose(ours, pooled, atol=1e-5)


def test_tiny_sdxl_checkpoint_is_deterministic(tmp_path, sdxl_path):
    from workers.engine.tiny import main, write_tiny_sdxl_checkpoint

    a = write_tiny_sdxl_checkpoint(tmp_path / "a.safetensors", seed=0)
    main([str(tmp_path / "b.safetensors"), "--seed", "1", "--family", "sdxl"])

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(a) == digest(sdxl_path)
    assert digest(a) != digest(tmp_path / "b.safetensors")


def test_shipped_configs_are_sdxl_base():
    """Without ``farm.*_config`` metadata the engine builds SDXL base 1.0's modules: their
    parameter counts are the published model's and the widths fit together."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from workers.engine.sdxl import _check_widths, component_configs

    cfg = component_configs({})
    _check_widths("sd_xl_base_1.0.safetensors", cfg)
    with init_empty_weights():
        modules = (
            UNet2DConditionModel.from_config(cfg["unet"]),
            AutoencoderKL.from_config(cfg["vae"]),
            CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
        )
    counts = [sum(p.numel() for p in m.parameters()) for m in modules]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    assert cfg["vae"]["scaling_factor"] == 0.13025 and cfg["unet"]["cross_attention_dim"] == 2048


# ---------------------------------------------------------------- parity with diffusers


def engine_latents(engine, b: BatchRequest, scheduler, quantize: bool) -> tuple:
    """(engine's final latents, the noise) started as diffusers starts (test_parity.py)."""
    from diffusers import EulerDiscreteScheduler

    noise = torch.stack(
        [
            torch.randn(engine.latent_shape(b), generator=torch.Generator().manual_seed(r.seed))
            for r in b.images
        ]
    )
    if isinstance(scheduler, EulerDiscreteScheduler):
        scheduler.set_timesteps(b.steps)
        start = noise * scheduler.init_noise_sigma
    else:
        start = noise * (1 + float(engine.sigmas(b)[0]) ** 2) ** 0.5
    engine.quantize = quantize
    try:
        return engine.sample_latents(b, initial_latents=start), noise
    finally:
        engine.quantize = False


def pipeline_output(
    engine, b: BatchRequest, scheduler, noise, negative, output_type="latent", **kwargs
) -> tuple:
    """(final latents, images or None) of diffusers' StableDiffusionXLPipeline on the
    engine's own modules."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=engine.vae,
        text_encoder=engine.text_encoder,
        text_encoder_2=engine.text_encoder_2,
        tokenizer=engine.tokenizer,
        tokenizer_2=engine.tokenizer_2,
        unet=engine.unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    out = pipe(
        prompt=[r.prompt for r in b.images],
        negative_prompt=negative,
        guidance_scale=b.cfg_scale,
        height=b.height,
        width=b.width,
        num_inference_steps=b.steps,
        latents=noise.clone(),
        output_type=output_type,
        callback_on_step_end=keep,
        **kwargs,
    ).images
    return final["latents"], None if output_type == "latent" else out


def test_parity_euler_with_negative_prompts_and_decode(sdxl_engine):
    b = batch(IMAGES, "Euler", STEPS, width=WIDTH, height=HEIGHT)
    scheduler = diffusers_scheduler("euler", False)
    ours, noise = engine_latents(sdxl_engine, b, scheduler, quantize=False)
    theirs, images = pipeline_output(
        sdxl_engine, b, scheduler, noise, [r.negative_prompt for r in IMAGES], output_type="np"
    )
    diff = (theirs - ours).abs().max().item()
    print(f"Euler: max abs diff {diff:.3g} (latents up to {ours.abs().max():.3g})")
    assert diff <= TOL
    decoded = np.stack([pixels(im) for im in sdxl_engine.decode(ours)])
    assert decoded.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(decoded - images * 255).max() <= 1  # same VAE scaling, rounding apart


def test_parity_dpmpp_2m_karras_with_empty_negative_prompts_and_it_can_fail(sdxl_engine):
    """Equal to diffusers with zeros for the "" negative prompts; other size numbers, or
    an encoded "" instead of zeros, must show."""
    b = batch(NO_NEGATIVE, "DPM++ 2M", STEPS, width=WIDTH, height=HEIGHT)
    ours, noise = engine_latents(sdxl_engine, b, diffusers_scheduler("dpm", True), quantize=True)

    def theirs(negative, **kwargs):
        scheduler = diffusers_scheduler("dpm", True)
        return pipeline_output(sdxl_engine, b, scheduler, noise, negative, **kwargs)[0]

    diff = (theirs(None) - ours).abs().max().item()  # None: zeros
    print(f"DPM++ 2M Karras: max abs diff {diff:.3g} (latents up to {ours.abs().max():.3g})")
    assert diff <= TOL
    swapped = theirs(None, original_size=(WIDTH, HEIGHT), target_size=(WIDTH, HEIGHT))
    assert (swapped - ours).abs().max() > 100 * TOL
    assert (theirs(["", ""]) - ours).abs().max() > 100 * TOL


# ---------------------------------------------------------------- rendering


def test_same_seed_same_image_whatever_the_batch(sdxl_engine):
    requests = [
        ImageRequest(p, "ugly" if i % 2 else "", 100 + i)
        for i, p in enumerate(["a photo of a cat", "a red car", "mountains", LONG])
    ]
    together = sdxl_engine.render(batch(requests))
    for i in (2, 3):  # a short prompt, and the long one (sampled in its own group)
        alone = sdxl_engine.render(batch([requests[i]]))
        assert np.abs(pixels(together[i]) - pixels(alone[0])).max() <= 1, i
    other_seed = sdxl_engine.render(batch([ImageRequest("mountains", "", 7)]))
    assert np.abs(pixels(together[2]) - pixels(other_seed[0])).max() > 1
    assert together[0].size == (32, 32) and together[0].mode == "RGB"


def test_long_prompts_take_more_chunks(sdxl_engine):
    chunks = sdxl_engine.prompt_chunks(LONG)
    assert [len(c) for c in chunks] == [77, 77]
    assert len(sdxl_engine.prompt_chunks("a cat BREAK a dog")) == 2
    context, pooled = sdxl_engine.encode_prompts([LONG, "a cat"])
    assert context.shape[:2] == (2, 2 * 77)
    first, first_pooled = sdxl_engine.encode_chunks([chunks[:1]])
    assert torch.allclose(context[0, :77], first[0], atol=1e-6)
    assert torch.allclose(pooled[0], first_pooled[0], atol=1e-6)  # the first chunk's pooled
    first_75 = ", ".join(LONG.split(", ")[:25]) + ","  # LONG's first chunk as a prompt
    assert sdxl_engine.prompt_chunks(first_75) == chunks[:1]
    long, short = sdxl_engine.render(
        batch([ImageRequest(LONG, "", 1), ImageRequest(first_75, "", 1)], "Euler", 3)
    )
    assert np.abs(pixels(long) - pixels(short)).max() > 1  # the tokens past 75 count


def test_progress_is_told_of_every_step(sdxl_engine):
    req = [ImageRequest("a red car", "ugly", 5), ImageRequest("a cat", "", 6)]
    for sampler, steps in (("Euler", 4), ("DPM++ 2M", 3)):
        ticks = []
        sdxl_engine.render(batch(req, sampler, steps), progress=lambda t=ticks: t.append(1))
        assert len(ticks) == steps + 1  # one per UNet evaluation, one for the decode


def test_bad_request_is_engine_error(sdxl_engine):
    with pytest.raises(EngineError, match="width"):
        sdxl_engine.render(batch([ImageRequest("a", "", 1)], width=60))


def test_fp16_keeps_the_vae_in_float32(sdxl_path):
    from workers.engine.sdxl import load_components

    comps = load_components(sdxl_path, torch.float16)
    assert comps.unet.dtype == comps.text_encoder_2.dtype == torch.float16
    assert comps.vae.dtype == torch.float32


# ---------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    ("key", "part"),
    [
        ("model.diffusion_model.label_emb.0.0.weight", "UNet"),
        ("model.diffusion_model.out.2.weight", "UNet"),
        (
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            r"text encoder 1 \(CLIP-L\)",
        ),
        (
            OPEN_CLIP + "transformer.resblocks.1.attn.in_proj_weight",
            r"text encoder 2 \(OpenCLIP bigG\)",
        ),
        (OPEN_CLIP + "text_projection", r"text encoder 2 \(OpenCLIP bigG\)"),
    ],
)
def test_missing_key_is_an_engine_error_naming_the_file(tmp_path, sdxl_path, key, part):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from workers.engine.loader import load_engine

    state = load_file(str(sdxl_path))
    del state[key]
    with safe_open(str(sdxl_path), "pt") as f:
        metadata = f.metadata()
    broken = tmp_path / "broken-xl.safetensors"
    save_file(state, str(broken), metadata=metadata)
    with pytest.raises(EngineError, match=rf"broken-xl\.safetensors: {part} weights do not fit"):
        load_engine(broken)


def test_inconsistent_config_is_an_engine_error(tmp_path, sdxl_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from workers.engine.loader import load_engine

    with safe_open(str(sdxl_path), "pt") as f:
        metadata = f.metadata()
    unet = json.loads(metadata["farm.unet_config"])
    metadata["farm.unet_config"] = json.dumps({**unet, "cross_attention_dim": 32})
    bad = tmp_path / "wide.safetensors"
    save_file(load_file(str(sdxl_path)), str(bad), metadata=metadata)
    with pytest.raises(EngineError, match=r"wide\.safetensors: UNet cross_attention_dim 32"):
        load_engine(bad)


def test_emphasis_scales_each_encoders_states_and_not_the_pooled_text(sdxl_engine):
    plain, plain_pooled = sdxl_engine.encode_prompts(["a red fox"])
    got, pooled = sdxl_engine.encode_prompts(["a (red:1.5) fox"])
    assert torch.equal(pooled, plain_pooled)  # same ids; A1111 weights only the states
    weights = torch.ones(77, 1)
    weights[2] = 1.5  # BOS, "a", "red"
    width_l = sdxl_engine.text_encoder.config.hidden_size
    for part in (slice(0, width_l), slice(width_l, None)):  # each encoder's own mean
        z = plain[0, :, part]
        expected = z * weights * (z.mean() / (z * weights).mean())
        assert torch.allclose(got[0, :, part], expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_every_module_moves_with_the_device(sdxl_engine):
    from tests.engine.test_render import torch_modules

    assert set(sdxl_engine.module_names) == torch_modules(sdxl_engine)
