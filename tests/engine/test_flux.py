"""The Flux engine on tiny random all-in-one Flux checkpoints (dev-like with guidance
embedding, schnell-like without): probing and loading, the BFL -> diffusers key mapping
(round trip, and diffusers' own converter on the same tensors), parity with diffusers'
FluxPipeline on the engine's modules, seeds and batches, guidance, and the errors a user
can cause (T5 tokenizer, transformer-only file, samplers Flux does not take)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from workers.engine.base import (
    BatchRequest,
    EngineError,
    HiresRequest,
    ImageRequest,
    LoraRequest,
)

STEPS = 4
TOL = 1e-4
WIDTH, HEIGHT = 48, 32  # not square, so that rows and columns cannot be swapped unseen
IMAGES = (ImageRequest("a photo of a cat", "blurry", 3), ImageRequest("a red car", "", 4))
ENV = "FARM_FLUX_T5_TOKENIZER"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux_modules():
    from workers.engine.tiny import build_tiny_flux_modules

    return build_tiny_flux_modules(seed=0)


@pytest.fixture(scope="module")
def flux_path(flux_modules, tmp_path_factory):
    from workers.engine.tiny import t5_tokenizer_dir, write_flux_checkpoint, write_tiny_t5_tokenizer

    path = write_flux_checkpoint(
        tmp_path_factory.mktemp("flux") / "tiny-flux.safetensors", *flux_modules
    )
    write_tiny_t5_tokenizer(t5_tokenizer_dir(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(flux_path):
    from workers.engine.tiny import t5_tokenizer_dir

    return t5_tokenizer_dir(flux_path)


@pytest.fixture(scope="module")
def flux_engine(flux_path, tokenizer_dir):
    from workers.engine.flux import FluxEngine

    return FluxEngine.from_single_file(flux_path, t5_tokenizer=tokenizer_dir)


@pytest.fixture(scope="module")
def schnell_path(tmp_path_factory):
    from workers.engine.tiny import write_tiny_flux_checkpoint

    path = tmp_path_factory.mktemp("schnell") / "tiny-schnell.safetensors"
    return write_tiny_flux_checkpoint(path, seed=1, guidance=False)


def batch(images, steps=STEPS, cfg=3.5, sampler="Euler", schedule="Automatic", **kw):
    w, h = kw.pop("width", WIDTH), kw.pop("height", HEIGHT)
    return BatchRequest(tuple(images), w, h, steps, cfg, sampler, schedule, **kw)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def rewrite(src, dst, edit):
    """``src`` with its tensors passed through ``edit`` (a dict -> dict), saved as ``dst``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    save_file(edit(load_file(str(src))), str(dst), metadata=metadata)
    return dst


# ---------------------------------------------------------------- file, probe, key mapping


def test_probe_and_load_give_the_flux_engine(flux_path, flux_engine):
    from farm.models import probe_engine
    from workers.engine.flux import FluxEngine
    from workers.engine.loader import SUPPORTED_FAMILIES, import_libraries, probe_family

    assert probe_family(flux_path) == "flux" == probe_engine(flux_path)  # worker and farm
    assert "flux" in SUPPORTED_FAMILIES
    import_libraries("flux")
    assert isinstance(flux_engine, FluxEngine)
    assert flux_engine.family == "flux" and flux_engine.device == "cpu"
    assert flux_engine.transformer.dtype == flux_engine.text_encoder_2.dtype == torch.float32
    assert flux_engine.guidance_embeds
    assert (flux_engine.vae.config.scaling_factor, flux_engine.vae.config.shift_factor) == (
        0.3611,
        0.1159,
    )
    assert flux_engine.scheduler_config["use_dynamic_shifting"]  # dev's shipped scheduler
    assert flux_path.stat().st_size < 5 * 1024 * 1024


def test_round_trip_state_dicts_equal(flux_modules, flux_engine):
    loaded = (
        flux_engine.transformer,
        flux_engine.vae,
        flux_engine.text_encoder,
        flux_engine.text_encoder_2,
    )
    for original, module in zip(flux_modules, loaded, strict=True):
        a, b = original.state_dict(), module.state_dict()
        assert set(a) == set(b)  # nothing missing, nothing unexpected
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_transformer_names_agree_with_diffusers_converter():
    """Our BFL -> diffusers mapping gives what diffusers' own converter gives on the same
    tensors. That converter assumes Flux.1's width (3072, MLP 12288) to split a single
    block's fused tensor, so the tensors have Flux.1's first dimension where it is split
    and a width of 1 elsewhere."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    from workers.engine.flux import transformer_key_map, transformer_to_diffusers

    gen = torch.Generator().manual_seed(0)
    bfl = {}
    for key, _, _ in transformer_key_map(2, 3, guidance=True):
        rows = 6
        if key.startswith("img_in."):
            rows = 3072  # the attention width our mapping reads
        elif ".linear1." in key:
            rows = 3 * 3072 + 4 * 3072
        shape = (rows,) if key.endswith((".bias", ".scale")) else (rows, 1)
        bfl[key] = torch.randn(shape, generator=gen)
    ours = transformer_to_diffusers(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + k: v for k, v in bfl.items()}
    )
    assert set(ours) == set(theirs) and len(ours) > len(bfl)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_tiny_flux_checkpoint_is_deterministic(tmp_path, flux_path, tokenizer_dir):
    from workers.engine.tiny import main, t5_tokenizer_dir

    main([str(tmp_path / "a.safetensors"), "--family", "flux"])
    main([str(tmp_path / "b.safetensors"), "--seed", "1", "--family", "flux"])

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(tmp_path / "a.safetensors") == digest(flux_path)
    assert digest(tmp_path / "a.safetensors") != digest(tmp_path / "b.safetensors")
    written = t5_tokenizer_dir(tmp_path / "a.safetensors")
    assert sorted(p.name for p in written.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert digest(written / name) == digest(tokenizer_dir / name)


def test_shipped_configs_are_flux_dev():
    """Without ``farm.*_config`` metadata the engine builds FLUX.1-dev's modules: the
    published parameter counts, widths that fit together; schnell's scheduler when the
    file has no guidance embedding."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from workers.engine.flux import _check_widths, component_configs

    cfg = component_configs({}, guidance=True)
    _check_widths("flux1-dev.safetensors", cfg)
    with init_empty_weights():
        modules = (
            FluxTransformer2DModel.from_config(cfg["transformer"]),
            AutoencoderKL.from_config(cfg["vae"]),
            CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            T5EncoderModel(T5Config(**cfg["text_encoder_2"])),
        )
    counts = [  # T5's input embedding once (it is shared.weight under a second name)
        sum(p.numel() for n, p in m.named_parameters() if n != "encoder.embed_tokens.weight")
        for m in modules
    ]
    assert counts == [11_901_408_320, 83_819_683, 123_060_480, 4_762_310_656]
    assert cfg["scheduler"]["use_dynamic_shifting"] and cfg["vae"]["latent_channels"] == 16
    schnell = component_configs({}, guidance=False)["scheduler"]
    assert not schnell["use_dynamic_shifting"] and schnell["shift"] == 1.0


# ---------------------------------------------------------------- parity with diffusers


def pipeline_output(engine, b: BatchRequest, noise, guidance: float) -> tuple:
    """(final packed latents, images as floats in [0, 1], the pipeline's sigmas) of
    diffusers' FluxPipeline on the engine's own modules, started from ``noise``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(engine.scheduler_config),
        vae=engine.vae,
        text_encoder=engine.text_encoder,
        tokenizer=engine.tokenizer,
        text_encoder_2=engine.text_encoder_2,
        tokenizer_2=engine.tokenizer_2,
        transformer=engine.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    images = pipe(
        prompt=[r.prompt for r in b.images],
        height=b.height,
        width=b.width,
        num_inference_steps=b.steps,
        guidance_scale=guidance,
        latents=noise.clone(),
        output_type="np",
        callback_on_step_end=keep,
    ).images
    return final["latents"], images, pipe


def test_parity_with_flux_pipeline_dev(flux_engine):
    """Same noise, same sigmas, same latents and images as FluxPipeline; the noise is what
    the pipeline draws from per-image generators; another guidance must show."""
    b = batch(IMAGES, cfg=3.5)
    noise = flux_engine.initial_noise(b)
    ours = flux_engine.sample_latents(b, initial_latents=noise)
    theirs, images, pipe = pipeline_output(flux_engine, b, noise, guidance=3.5)
    assert torch.allclose(pipe.scheduler.sigmas, flux_engine.sigmas(b), atol=1e-6)
    h, w = flux_engine.latent_size(b)
    drawn, _ = pipe.prepare_latents(
        2, 16, b.height, b.width, torch.float32, "cpu", flux_engine.generators(b)
    )
    assert torch.equal(drawn, noise) and noise.shape == (2, (h // 2) * (w // 2), 64)
    diff = (theirs - ours).abs().max().item()
    print(f"Flux dev Euler: max abs diff {diff:.3g} (latents up to {ours.abs().max():.3g})")
    assert diff <= TOL
    decoded = np.stack([pixels(im) for im in flux_engine.decode(ours, b)])
    assert decoded.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(decoded - images * 255).max() <= 1  # rounding apart
    other, _, _ = pipeline_output(flux_engine, b, noise, guidance=1.0)
    assert (other - ours).abs().max() > 100 * TOL


def test_schnell_loads_through_the_env_var_ignores_guidance_and_matches(schnell_path, monkeypatch):
    from workers.engine.loader import load_engine
    from workers.engine.tiny import t5_tokenizer_dir

    monkeypatch.setenv(ENV, str(t5_tokenizer_dir(schnell_path)))
    engine = load_engine(schnell_path)
    assert engine.family == "flux" and not engine.guidance_embeds
    assert not hasattr(engine.transformer.time_text_embed, "guidance_embedder")
    assert not engine.scheduler_config["use_dynamic_shifting"]  # schnell's
    b = batch(IMAGES, steps=3, cfg=1.0)
    assert torch.allclose(engine.sigmas(b), torch.tensor([1, 2 / 3, 1 / 3, 0]), atol=1e-6)
    noise = engine.initial_noise(b)
    ours = engine.sample_latents(b, initial_latents=noise)
    theirs, _, _ = pipeline_output(engine, b, noise, guidance=1.0)
    diff = (theirs - ours).abs().max().item()
    print(f"Flux schnell Euler: max abs diff {diff:.3g}")
    assert diff <= TOL
    assert torch.equal(engine.sample_latents(batch(IMAGES, steps=3, cfg=5.0)), ours)
    images = engine.render(b)
    assert len(images) == 2 and images[0].size == (WIDTH, HEIGHT)


# ---------------------------------------------------------------- rendering


def test_same_seed_same_image_whatever_the_batch(flux_engine):
    a, other = ImageRequest("mountains at night", "", 11), ImageRequest("a dog", "ugly", 12)
    together = flux_engine.render(batch([other, a]))
    alone = flux_engine.render(batch([a]))
    assert np.abs(pixels(together[1]) - pixels(alone[0])).max() <= 1
    reseeded = flux_engine.render(batch([ImageRequest(a.prompt, "", 13)]))
    assert np.abs(pixels(alone[0]) - pixels(reseeded[0])).max() > 1
    reworded = flux_engine.render(batch([ImageRequest("a red car", "", 11)]))
    assert np.abs(pixels(alone[0]) - pixels(reworded[0])).max() > 1  # the prompt counts


def test_guidance_changes_a_dev_image_the_negative_prompt_does_not(flux_engine):
    req = [ImageRequest("a photo of a cat", "", 21)]
    low, high = (flux_engine.render(batch(req, cfg=cfg))[0] for cfg in (1.0, 5.0))
    assert np.abs(pixels(low) - pixels(high)).max() > 1
    negative = flux_engine.render(batch([ImageRequest(req[0].prompt, "blurry", 21)], cfg=1.0))
    assert np.array_equal(pixels(low), pixels(negative[0]))


def test_progress_is_told_of_every_step(flux_engine):
    ticks = []
    flux_engine.render(batch(IMAGES, steps=3), progress=lambda: ticks.append(1))
    assert len(ticks) == 3 + 1  # one per transformer evaluation, one for the decode


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sampler": "Euler a"}, "sampler_name"),
        ({"sampler": "DPM++ 2M"}, "sampler_name"),
        ({"schedule": "Karras"}, "scheduler"),
        ({"width": 30}, "width"),  # a multiple of 2 x the VAE factor (4 here, 16 for Flux.1)
        ({"loras": (LoraRequest("style", "/nowhere/style.safetensors", 1.0),)}, "loras"),
        ({"init_image": Image.new("RGB", (WIDTH, HEIGHT))}, "init_image"),
        ({"hires": HiresRequest()}, "hires"),
    ],
)
def test_requests_flux_cannot_serve_are_engine_errors(flux_engine, change, field):
    with pytest.raises(EngineError, match=rf"^{field}:"):
        flux_engine.render(batch(IMAGES[:1], **change))


# ---------------------------------------------------------------- what a user gets wrong


def test_missing_or_unreadable_t5_tokenizer_names_the_variable(flux_path, tmp_path, monkeypatch):
    from workers.engine.loader import load_engine

    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(EngineError, match=rf"{ENV} is not set.*tokenizer\.json"):
        load_engine(flux_path)
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    with pytest.raises(EngineError, match=rf"{ENV}: no T5 tokenizer in nonexistent directory"):
        load_engine(flux_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    monkeypatch.setenv(ENV, str(tmp_path / "broken"))
    with pytest.raises(EngineError, match=rf"{ENV}: cannot read the T5 tokenizer in .*spiece"):
        load_engine(flux_path)


def test_transformer_only_file_names_the_missing_parts(flux_path, tmp_path, tokenizer_dir):
    from workers.engine.flux import FluxEngine

    def bfl_only(state):
        head = "model.diffusion_model."
        return {k.removeprefix(head): v for k, v in state.items() if k.startswith(head)}

    bare = rewrite(flux_path, tmp_path / "flux1-dev.safetensors", bfl_only)
    with pytest.raises(EngineError) as err:
        FluxEngine.from_single_file(bare, t5_tokenizer=tokenizer_dir)
    message = str(err.value)
    assert message.startswith("flux1-dev.safetensors: not an all-in-one Flux checkpoint")
    for part in ("CLIP-L", "T5-XXL", "VAE", "text_encoders.clip_l.", "vae.*"):
        assert part in message, part
    assert "lacks the transformer" not in message

    def no_t5(state):
        return {k: v for k, v in state.items() if not k.startswith("text_encoders.t5xxl.")}

    missing_t5 = rewrite(flux_path, tmp_path / "no-t5.safetensors", no_t5)
    with pytest.raises(
        EngineError,
        match=r"it lacks text encoder T5-XXL \(text_encoders\.t5xxl\.transformer\.\*\)\. A file",
    ):
        FluxEngine.from_single_file(missing_t5, t5_tokenizer=tokenizer_dir)


@pytest.mark.parametrize(
    ("key", "part"),
    [
        ("model.diffusion_model.single_blocks.1.linear1.weight", "transformer"),
        ("model.diffusion_model.guidance_in.out_layer.bias", "transformer"),
        ("vae.decoder.conv_out.weight", "VAE"),
        ("text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight", "text encoder T5-XXL"),
    ],
)
def test_missing_key_is_an_engine_error_naming_the_part(
    flux_path, tmp_path, tokenizer_dir, key, part
):
    from workers.engine.flux import FluxEngine

    broken = rewrite(
        flux_path,
        tmp_path / "broken.safetensors",
        lambda s: {k: v for k, v in s.items() if k != key},
    )
    with pytest.raises(EngineError, match=rf"^broken\.safetensors: {part} weights do not fit"):
        FluxEngine.from_single_file(broken, t5_tokenizer=tokenizer_dir)


def test_t5_embedding_under_both_names_loads(flux_path, flux_engine, tmp_path, tokenizer_dir):
    """A file may hold T5's input embedding as ``shared.weight`` and again as
    ``encoder.embed_tokens.weight`` (ComfyUI's t5xxl files do)."""
    from workers.engine.flux import FluxEngine

    head = "text_encoders.t5xxl.transformer."

    def both(state):
        embedding = state[head + "shared.weight"].clone()  # safetensors stores no aliases
        return {**state, head + "encoder.embed_tokens.weight": embedding}

    engine = FluxEngine.from_single_file(
        rewrite(flux_path, tmp_path / "both.safetensors", both), t5_tokenizer=tokenizer_dir
    )
    t5 = engine.text_encoder_2
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()
    assert torch.equal(t5.shared.weight, flux_engine.text_encoder_2.shared.weight)


def test_every_module_moves_with_the_device(flux_engine):
    from tests.engine.test_render import torch_modules

    assert set(flux_engine.module_names) == torch_modules(flux_engine)
