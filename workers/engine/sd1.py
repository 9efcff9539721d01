"""The Stable Diffusion 1.x engine: an original-layout single-file checkpoint on diffusers
components, sampled with our k-diffusion style samplers. Fully offline: component configs
come from ``configs/sd1/`` (or the checkpoint's ``farm.*_config`` metadata) and the tokenizer
from ``assets/clip_tokenizer/``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from workers.engine.base import (
    HIRES_LATENT_MODES,
    BatchRequest,
    EngineError,
    LoraRequest,
    Progress,
    TorchEngine,
    ancestral_generators,
    first_noise,
    hires_start,
    img2img_start,
)
from workers.engine.embeddings import EmbeddingStore, token_fixes
from workers.engine.lora import MergedLoras, module_index
from workers.engine.names import ANCESTRAL, resolve_schedule
from workers.engine.prompts import MAX_TOKENS, EmbeddingIndex, TokenChunk, prompt_chunks
from workers.engine.samplers import (
    PREDICTION_TYPES,
    SAMPLER_FUNCTIONS,
    DiscreteEpsDenoiser,
    alphas_cumprod,
    get_sigmas,
    rescale_zero_terminal_snr,
)

ENGINE_DIR = Path(__file__).parent
CONFIG_DIR = ENGINE_DIR / "configs" / "sd1"
TOKENIZER_DIR = ENGINE_DIR / "assets" / "clip_tokenizer"
CLIP_VOCAB_SIZE = 49408
CLIP_TOKENIZER_COMMA = ",</w>"


def chunk_weights(rows: Sequence[list[int]]) -> Tensor:
    """The emphasis weights of token chunks (a chunk of plain ids weighs 1 throughout)."""
    return torch.tensor([getattr(r, "weights", None) or [1.0] * len(r) for r in rows])


def emphasize(hidden: Tensor, weights: Tensor) -> Tensor:
    """A1111's "Original" emphasis on a text encoder's states (chunks, 77, width): each
    token's state times its weight, then the chunk scaled so that its mean is what it was.
    A chunk whose weights are all 1 is left as it is, to the bit."""
    rows = (weights != 1.0).any(dim=1)
    if not bool(rows.any()):
        return hidden
    z = hidden[rows].float()
    before = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[rows].to(z)[..., None]
    z = z * (before / z.mean(dim=(1, 2), keepdim=True))
    out = hidden.clone()
    out[rows] = z.to(hidden.dtype)
    return out


def picture_tensor(image: Image.Image) -> Tensor:
    """An RGB picture as the VAE reads it: (1, 3, height, width), float32 in [-1, 1]."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def img2img_sigmas(sigmas: Tensor, denoising_strength: float) -> Tensor:
    """A1111's img2img schedule: the full schedule's tail from ``img2img_start``."""
    return sigmas[img2img_start(len(sigmas) - 1, denoising_strength):]


def run_sampler(name: str, model: Any, x: Tensor, sigmas: Tensor,
                gens: list[torch.Generator], device: str) -> Tensor:
    """Sample with the A1111-named sampler; an ancestral one draws each image's fresh
    noise from that image's own CPU generator, so an image does not depend on its batch."""
    sampler = SAMPLER_FUNCTIONS[name]
    if name in ANCESTRAL:
        shape = x.shape[1:]

        def noise_fn(_: Tensor) -> Tensor:
            return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)

        return sampler(model, x, sigmas, noise_fn)
    return sampler(model, x, sigmas)


def keep_latents(x: Tensor, init: Tensor, keep: Tensor) -> Tensor:
    """``x`` where the mask repaints, the picture's latents ``init`` where ``keep`` (1:
    kept) says (A1111's ``init_latent * mask + nmask * x``)."""
    return init * keep + (1 - keep) * x


def masked_denoiser(model: Any, init: Tensor, keep: Tensor) -> Any:
    """Inpainting's denoiser (A1111's CFGDenoiser with a mask): each prediction is the
    picture's own latents outside the mask."""

    def denoised(x: Tensor, sigma: Tensor) -> Tensor:
        return keep_latents(model(x, sigma), init, keep)

    return denoised


def with_conditioning(x: Tensor, concat: Tensor | None) -> Tensor:
    """The UNet's input: ``x``, then an inpainting checkpoint's ``image_conditioning``."""
    return x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1)


def sample(name: str, model: Any, x: Tensor, sigmas: Tensor, gens: list[torch.Generator],
           device: torch.device, inpaint: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``run_sampler``; with ``inpaint`` ((picture latents, keep mask), ``inpaint_start``)
    every prediction and the result keep the picture outside the mask."""
    if inpaint is None:
        return run_sampler(name, model, x, sigmas, gens, device)
    out = run_sampler(name, masked_denoiser(model, *inpaint), x, sigmas, gens, device)
    return keep_latents(out, *inpaint)


@dataclass
class SD1Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]


def load_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise EngineError(f"CLIP tokenizer in {TOKENIZER_DIR} has {len(tokenizer)} tokens, "
                          f"expected {CLIP_VOCAB_SIZE}")
    return tokenizer


def component_configs(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Shipped SD1.5 configs, each overridden by the checkpoint's ``farm.<name>_config``."""
    files = {"unet": "unet/config.json", "vae": "vae/config.json",
             "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    configs = {}
    for name, rel in files.items():
        raw = metadata.get(f"farm.{name}_config")
        configs[name] = json.loads(raw) if raw else json.loads((CONFIG_DIR / rel).read_text())
    return configs


def unet_config_for(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the input channels the file's UNet reads (4, or 9 for an inpainting
    checkpoint: the latents, the mask and the masked picture's latents)."""
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        return config
    return {**config, "in_channels": int(conv_in.shape[1])}


def _load_into(model: Any, state: dict[str, Tensor], what: str, dtype: torch.dtype) -> Any:
    """Weights onto an empty module, names and shapes checked first (the module's state
    dict is taken once: taking it per tensor costs seconds on a full-size UNet)."""
    expected = model.state_dict()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()
             if k in expected or not k.endswith("position_ids")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise EngineError(f"{what} weights do not fit its config: {len(missing)} missing "
                          f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise EngineError(f"{what} weight {key} has shape {tuple(value.shape)}, config "
                              f"expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def import_libraries() -> None:
    """Import what loading a checkpoint needs (diffusers and transformers import their
    models lazily, seconds at the first use), so that a load's time is the load's own."""
    import accelerate  # noqa: F401
    import diffusers.loaders.single_file_utils  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: F401


def load_components(path: str | Path, dtype: torch.dtype = torch.float32,
                    progress: Progress | None = None) -> SD1Components:
    """Build unet, vae, text encoder and tokenizer from an original-layout SD1 file.
    ``progress`` is called after each step (reading the file, building each part)."""
    tick = progress or (lambda: None)
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    state = load_file(str(path))
    tick()
    cfg = component_configs(metadata)
    cfg["unet"] = unet_config_for(state, cfg["unet"])
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    tick()
    clip_state = convert_ldm_clip_checkpoint(state)
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        clip_state = {k.removeprefix("text_model."): v for k, v in clip_state.items()}
    name = path.name
    unet = _load_into(unet, convert_ldm_unet_checkpoint(state, dict(unet.config)),
                      f"{name}: UNet", dtype)
    tick()
    vae = _load_into(vae, convert_ldm_vae_checkpoint(state, dict(vae.config)),
                     f"{name}: VAE", dtype)
    tick()
    text_encoder = _load_into(text_encoder, clip_state, f"{name}: text encoder", dtype)
    tick()
    return SD1Components(unet=unet, vae=vae, text_encoder=text_encoder,
                         tokenizer=load_tokenizer(), scheduler_config=cfg["scheduler"])


class ContextKVCache:
    """Cross-attention processor that projects the text context to keys and values once per
    render instead of once per sampling step: the context is the same tensor at every step,
    so the result is identical and each step skips two matmuls per cross-attention layer.
    Anything unusual (masks, norms, 4-D input, a new context) takes diffusers' own path."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()
        self.context: Tensor | None = None
        self.kv: tuple[Tensor, Tensor] | None = None

    def __call__(self, attn: Any, hidden_states: Tensor,
                 encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Tensor:
        if (encoder_hidden_states is None or attention_mask is not None or args or kwargs
                or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None or attn.norm_cross or attn.norm_q is not None
                or attn.norm_k is not None or attn.residual_connection):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        batch, heads = hidden_states.shape[0], attn.heads
        if self.context is not encoder_hidden_states or self.kv is None:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            head_dim = key.shape[-1] // heads
            self.kv = (key.view(batch, -1, heads, head_dim).transpose(1, 2),
                       value.view(batch, -1, heads, head_dim).transpose(1, 2))
            self.context = encoder_hidden_states
        key, value = self.kv
        query = attn.to_q(hidden_states)
        query = query.view(batch, -1, heads, key.shape[-1]).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * key.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class UNetEngine(TorchEngine):
    """What the SD1 and SDXL engines share: a UNet whose LoRA layers kohya files name by
    their diffusers or original-layout names, LoRAs merged before each batch, and img2img
    (``takes_init_image``) from the picture's VAE latent on the tail of the schedule, and
    A1111's hires fix (``takes_hires``): a second, img2img-like pass over the upscaled
    first one. An engine has ``unet``, ``vae``, ``vae_scale_factor``, ``loras`` (a
    MergedLoras), ``embeddings`` (an EmbeddingStore), ``sigmas(batch)``,
    ``generators(batch)``, ``encode_image(picture)``, ``decode(latents)`` and
    ``denoise(batch, x, gens, sigmas, progress, size)``."""

    takes_init_image = True  # img2img: BatchRequest.init_image
    takes_mask = True  # inpainting: BatchRequest.mask
    takes_hires = True  # hires fix: BatchRequest.hires
    takes_embeddings = True  # textual inversion: BatchRequest.embeddings
    vae_scale_factor: int
    unet: Any
    loras: MergedLoras
    embeddings: EmbeddingStore

    inpainting_model = False  # its UNet reads 9 channels (``image_conditioning``)

    def unet_inputs(self) -> int:
        """The latent channels, from the VAE; sets ``inpainting_model`` when the UNet reads
        5 more (an inpainting checkpoint's mask and masked picture). EngineError for a
        UNet that reads anything else."""
        latent = int(self.vae.config.latent_channels)
        reads = int(self.unet.config.in_channels)
        if reads not in (latent, latent + 5):
            raise EngineError(f"the UNet reads {reads} channels; the farm renders UNets that read "
                              f"the {latent} latent channels, or {latent + 5} (inpainting)")
        self.inpainting_model = reads == latent + 5
        return latent

    @torch.no_grad()
    def image_conditioning(self, batch: BatchRequest, shape: torch.Size) -> Tensor | None:
        """What an inpainting checkpoint's UNet reads besides the latents ``shape``, per
        image (n, 5, h, w): the mask rounded to 0 or 1 at the latents' size (nearest), then
        the VAE latent of the picture with the masked part grey (0), as A1111's
        ``inpainting_image_conditioning`` with its default mask weight of 1. Without a mask
        the whole picture is masked, and txt2img's picture is all grey (A1111's
        ``txt2img_image_conditioning``). None for a model that reads only the latents."""
        if not self.inpainting_model:
            return None
        size = (1, 1, batch.height, batch.width)
        if batch.init_image is None:
            source, mask = torch.zeros(1, 3, batch.height, batch.width), torch.ones(size)
        else:
            import numpy as np

            source = picture_tensor(batch.init_image)
            mask = (torch.ones(size) if batch.mask is None else torch.from_numpy(
                np.asarray(batch.mask.convert("L"), dtype=np.float32) / 255.0)[None, None])
            mask = torch.round(mask)
        masked = (source * (1.0 - mask)).to(self.device, self.vae.dtype)
        latent = self.vae.encode(masked).latent_dist.mean.float() * self.vae.config.scaling_factor
        small = torch.nn.functional.interpolate(mask, size=tuple(shape[2:])).to(self.device)
        return torch.cat([small, latent], dim=1).expand(shape[0], -1, -1, -1)

    def unet_lora_names(self) -> Callable[[str], Iterable[str]]:
        """A UNet module's name -> the names a LoRA file may give it: its diffusers name
        and its original-layout one (what kohya's trainers write)."""
        from workers.engine.ldm_export import unet_key

        config = dict(self.unet.config)

        def names(name: str) -> Iterable[str]:
            try:
                return (name, unet_key(name + ".weight", config).removesuffix(".weight"))
            except KeyError:
                return (name,)

        return names

    def apply_loras(self, loras: Sequence[LoraRequest], progress: Progress | None = None) -> None:
        """Merge exactly ``loras`` into the weights (nothing to do when they are merged
        already). LoraError naming a file that cannot be read, fits no layer or is made for
        another model family."""
        if self.loras.apply(loras, progress):
            # keys and values projected from a context under other weights are stale
            for proc in self.unet.attn_processors.values():
                if isinstance(proc, ContextKVCache):
                    proc.context, proc.kv = None, None

    def embedding_index(self, batch: BatchRequest) -> EmbeddingIndex | None:
        """The batch's embeddings as prompts find them (None without any): files read once
        per engine. EmbeddingError naming one that cannot be used on this model."""
        return self.embeddings.index(batch.embeddings)

    def embeddings_used(self, batch: BatchRequest) -> list[list[str]]:
        """For each image of the batch, the names of the embeddings its prompt (and its
        negative prompt, where the guidance reads one) took vectors from, in the order of
        ``batch.embeddings``: what A1111 writes as ``TI hashes``."""
        found = self.embedding_index(batch)
        if found is None:
            return [[] for _ in batch.images]
        order = [e.name for e in batch.embeddings]
        out = []
        for r in batch.images:
            texts = [r.prompt] + ([r.negative_prompt] if batch.cfg_scale != 1.0 else [])
            names = {emb.name for t in texts for chunk in self.prompt_chunks(t, found)
                     for _, emb in chunk.fixes}  # fmt: skip
            out.append([n for n in order if n in names])
        return out

    def sigmas(self, batch: BatchRequest) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> Tensor:
        """img2img's x0: the VAE's latent of a picture (1, channels, h/8, w/8), float32,
        times the scaling factor, the VAE in its own dtype (SDXL's stays float32). The mean
        of the VAE's latent distribution, not a draw from it (A1111 draws, from the global
        RNG), so an image depends on its seed only through its noise and is the same in
        any batch."""
        pixels = picture_tensor(image).to(self.device, self.vae.dtype)
        latent = self.vae.encode(pixels).latent_dist.mean.float()
        return latent * self.vae.config.scaling_factor

    def initial_x(self, batch: BatchRequest, noise: Tensor, sigmas: Tensor) -> Tensor:
        """x at ``sigmas[0]``: the noise times it, or img2img's encoded picture plus that
        (A1111's ``x = init_latent + noise * sigma_sched[0]``)."""
        noise = noise.to(self.device)
        if batch.init_image is None:
            return noise * sigmas[0]
        return self.encode_image(batch.init_image) + noise * sigmas[0]

    def start_x(self, batch: BatchRequest, noise: Tensor, sigmas: Tensor,
                inpaint: tuple[Tensor, Tensor] | None,
                initial_latents: Tensor | None = None) -> Tensor:
        """x at ``sigmas[0]`` (float32): ``initial_latents`` if given, else ``initial_x``,
        or inpainting's picture latents (``inpaint_start``) plus the noise times it, as
        A1111's."""
        if initial_latents is not None:
            x = initial_latents
        elif inpaint is None:
            x = self.initial_x(batch, noise, sigmas)
        else:
            x = inpaint[0] + noise.to(self.device) * sigmas[0]
        return x.to(self.device, torch.float32)

    def inpaint_start(self, batch: BatchRequest) -> tuple[Tensor, Tensor] | None:
        """Inpainting's (picture latents per image, keep mask (1, 1, h, w), 1 kept), as
        A1111's: the mask at the latents' size, rounded; under it "latent noise" puts
        each image's seed noise (a fresh generator of its seed; A1111 takes the first
        batch's seeds), "latent nothing" zeros. None without a mask."""
        if batch.mask is None:
            return None
        from workers.engine.inpaint import latent_mask

        init = self.encode_image(batch.init_image).to(self.device)
        repaint = torch.from_numpy(latent_mask(batch.mask, init.shape[2], init.shape[3]))
        keep = (1 - repaint)[None, None].to(self.device, torch.float32)
        init = init.expand(len(batch.images), -1, -1, -1)
        if batch.masked_content == "latent noise":
            noise = torch.stack([torch.randn(init.shape[1:], generator=torch.Generator(
                "cpu").manual_seed(r.seed)) for r in batch.images]).to(self.device)
            init = keep_latents(noise, init, keep)
        elif batch.masked_content == "latent nothing":
            init = init * keep
        return init.contiguous(), keep

    def schedule(self, batch: BatchRequest) -> Tensor:
        """The sigmas a batch samples over: all of them, or img2img's tail."""
        sigmas = self.sigmas(batch)
        if batch.init_image is None:
            return sigmas
        return img2img_sigmas(sigmas, batch.denoising_strength)

    def generators(self, batch: BatchRequest) -> list[torch.Generator]:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> list[Image.Image]:
        raise NotImplementedError

    def denoise(self, batch: BatchRequest, x: Tensor, gens: list[torch.Generator],
                sigmas: Tensor, progress: Progress | None = None,
                size: tuple[int, int] | None = None) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ hires fix

    def hires_batch(self, batch: BatchRequest) -> BatchRequest:
        """The second pass as a batch of its own: the final size, the hires steps (0: the
        first pass's) and strength, no hires; its ``steps`` are the full schedule's
        (``hires_start``) of which it samples the last ``hires.steps``."""
        hr = batch.hires
        assert hr is not None
        _, _, width, height = hr.sizes(batch.width, batch.height)
        full, _ = hires_start(hr.steps or batch.steps, hr.denoising_strength)
        return replace(batch, width=width, height=height, steps=full, hires=None,
                       denoising_strength=hr.denoising_strength)

    def hires_schedule(self, batch: BatchRequest) -> Tensor:
        """The sigmas the hires pass samples over: the tail of ``hires_start``."""
        hr = batch.hires
        assert hr is not None
        _, start = hires_start(hr.steps or batch.steps, hr.denoising_strength)
        return self.sigmas(self.hires_batch(batch))[start:]

    @torch.no_grad()
    def hires_upscale(self, batch: BatchRequest, latents: Tensor) -> Tensor:
        """The first pass's latents at the hires size, as A1111 upscales them: a latent
        upscaler interpolates them (``HIRES_LATENT_MODES``), a pixel one decodes each
        image, resizes it with PIL ("None" and "Lanczos": Lanczos, "Nearest": nearest)
        and encodes it again (the VAE latent's mean, as img2img); then the crop to the
        box of ``resize_x x resize_y`` when both are given. Each image on its
        own, so an image does not depend on its batch."""
        hr = batch.hires
        assert hr is not None
        to_w, to_h, width, height = hr.sizes(batch.width, batch.height)
        f = self.vae_scale_factor
        if hr.upscaler in HIRES_LATENT_MODES:
            mode, antialias = HIRES_LATENT_MODES[hr.upscaler]
            x = torch.nn.functional.interpolate(latents.float(), size=(to_h // f, to_w // f),
                                                mode=mode, antialias=antialias)
        else:
            resample = (Image.Resampling.NEAREST if hr.upscaler == "Nearest"
                        else Image.Resampling.LANCZOS)
            pictures = [self.decode(z[None])[0].resize((to_w, to_h), resample)
                        for z in latents]
            x = torch.cat([self.encode_image(p) for p in pictures])
        crop_w, crop_h = x.shape[3] - width // f, x.shape[2] - height // f
        return x[:, :, crop_h // 2:x.shape[2] - (crop_h + 1) // 2,
                 crop_w // 2:x.shape[3] - (crop_w + 1) // 2]

    @torch.no_grad()
    def hires_pass(self, batch: BatchRequest, latents: Tensor,
                   progress: Progress | None = None) -> Tensor:
        """A1111's second pass over the first pass's final latents: upscaled, noised with
        a fresh generator per image seeded with its seed (A1111 makes a new RNG of the
        same seeds at the new shape, with the variation seeds and the seed resize, so
        ``first_noise`` at the final size), which then gives its ancestral noise, and sampled
        over the hires schedule's tail at the final size (SDXL's size conditioning: the
        upscaled size before a crop, as A1111's)."""
        hr = batch.hires
        assert hr is not None
        to_w, to_h, _, _ = hr.sizes(batch.width, batch.height)
        second = self.hires_batch(batch)
        x0 = self.hires_upscale(batch, latents).to(self.device, torch.float32)
        sigmas = self.hires_schedule(batch).to(self.device)
        gens = self.generators(second)
        resized = second.seed_noise_size(self.vae_scale_factor)
        noise = first_noise(second.images, x0.shape[1:], gens, resized)
        gens = ancestral_generators(second, gens)  # A1111's ENSD
        x = x0 + noise.to(self.device) * sigmas[0]
        return self.denoise(second, x, gens, sigmas, progress, (to_h, to_w))


class SD1Engine(UNetEngine):
    """Renders batches on one SD1.x model. ``quantize=True`` feeds the UNet integer
    timesteps (A1111's "Enable quantization in K samplers"); off by default as in A1111."""

    family = "sd1"
    module_names = ("unet", "vae", "text_encoder")
    takes_clip_skip = True  # BatchRequest.clip_skip

    def __init__(self, components: SD1Components, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, quantize: bool = False) -> None:
        self.dtype = dtype
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.device = device
        self.tokenizer = components.tokenizer
        sc = components.scheduler_config
        self.prediction_type = sc.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise EngineError(f"scheduler prediction_type {self.prediction_type!r} is not "
                              f"supported (supported: {', '.join(PREDICTION_TYPES)})")
        self.alphas_cumprod = alphas_cumprod(sc.get("beta_start", 0.00085),
                                             sc.get("beta_end", 0.012),
                                             sc.get("num_train_timesteps", 1000))
        if sc.get("rescale_betas_zero_snr", False):
            self.alphas_cumprod = rescale_zero_terminal_snr(self.alphas_cumprod)
        self.quantize = quantize
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.unet_inputs()
        self.unet.set_attn_processor({name: ContextKVCache() if name.endswith("attn2.processor")
                                      else proc for name, proc in
                                      self.unet.attn_processors.items()})
        self.loras = MergedLoras(self._lora_layers)
        width = self.text_encoder.config.hidden_size
        self.embeddings = EmbeddingStore(self.family, [("text encoder", width)], self._tokenize)

    @classmethod
    def from_single_file(cls, path: str | Path, device: str = "cpu",
                         dtype: torch.dtype | None = None, quantize: bool = False,
                         progress: Progress | None = None) -> SD1Engine:
        if dtype is None:
            dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        engine = cls(load_components(path, dtype, progress), device, dtype, quantize)
        if progress is not None:
            progress()  # on its device
        return engine

    # ------------------------------------------------------------------------ LoRAs

    def _lora_layers(self) -> dict[str, Any]:
        """The layers by the names LoRA files give them: kohya's ``lora_unet_`` (the
        UNet's diffusers names, also its original-layout ones) and ``lora_te_``."""
        def te_names(name: str) -> Iterable[str]:
            # transformers >= 5.6 dropped CLIPTextModel's text_model level; files name it
            return ("text_model." + name.removeprefix("text_model."),)

        return {**module_index("lora_unet", self.unet, self.unet_lora_names()),
                **module_index("lora_te", self.text_encoder, te_names)}

    # -------------------------------------------------------------- steps of a render

    def prompt_chunks(self, prompt: str,
                      embeddings: EmbeddingIndex | None = None) -> list[TokenChunk]:
        """The prompt's token ids in A1111's chunks (``prompts.prompt_chunks``: emphasis,
        BREAK, 75 tokens a chunk), each wrapped in BOS ... EOS and padded to 77 as CLIP
        expects, with each token's weight and the ``embeddings`` its text names (their
        vectors' positions, ``TokenChunk.fixes``); at least one chunk. A prompt of up to 75
        tokens without brackets, BREAK or an embedding's name gives exactly the usual 77
        ids."""
        tok = self.tokenizer
        comma = tok.convert_tokens_to_ids(CLIP_TOKENIZER_COMMA)
        return prompt_chunks(prompt, self._tokenize, comma, tok.bos_token_id, tok.eos_token_id,
                             tok.pad_token_id, embeddings)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=False,
                              verbose=False).input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], chunks: int = 1) -> Tensor:
        """CLIP last hidden states: 77 per chunk of 75 prompt tokens, the chunks of a prompt
        side by side (A1111's long prompts; the UNet attends to any context length). Every
        prompt is padded with empty-prompt chunks to ``chunks`` or to the most any of them
        needs, so the batch has one context length."""
        return self.encode_chunks([self.prompt_chunks(p) for p in prompts], chunks)

    @torch.no_grad()
    def encode_chunks(self, per: list[list[list[int]]], chunks: int = 1,
                      clip_skip: int = 1) -> Tensor:
        """``encode_prompts`` on prompts already split by ``prompt_chunks``; a chunk's
        embeddings replace its placeholders' token embeddings (``token_fixes``)."""
        n = max(chunks, *(len(c) for c in per))
        empty = self.prompt_chunks("")[0]
        rows = [chunk for c in per for chunk in c + [empty] * (n - len(c))]
        ids = torch.tensor(rows)
        with token_fixes(self.text_encoder, rows, 0):
            hidden = self.encoder_states(ids.to(self.device), clip_skip)
        hidden = emphasize(hidden, chunk_weights(rows))
        return hidden.reshape(len(per), n * MAX_TOKENS, hidden.shape[-1])

    def encoder_states(self, ids: Tensor, clip_skip: int = 1) -> Tensor:
        """The text encoder's states of ``ids`` (prompts x 77, width): its last layer's
        after the final layer norm, or with a Clip skip of n, the n-th layer from the last
        through that norm (A1111's ``CLIP_stop_at_last_layers``)."""
        if clip_skip == 1:
            return self.text_encoder(ids)[0]
        layers = self.text_encoder.config.num_hidden_layers
        if clip_skip > layers:
            raise EngineError(f"clip_skip: {clip_skip}, but the text encoder has {layers} layers")
        out = self.text_encoder(ids, output_hidden_states=True)
        text = getattr(self.text_encoder, "text_model", self.text_encoder)
        return text.final_layer_norm(out.hidden_states[-clip_skip])

    def sigmas(self, batch: BatchRequest) -> Tensor:
        schedule = resolve_schedule(batch.sampler_name, batch.scheduler)
        return get_sigmas(schedule, self._denoiser(None, None, 1.0), batch.steps)

    def latent_shape(self, batch: BatchRequest) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return self.latent_channels, batch.height // f, batch.width // f

    def generators(self, batch: BatchRequest) -> list[torch.Generator]:
        """One CPU generator per image: its initial noise, then its ancestral noise."""
        return [torch.Generator("cpu").manual_seed(r.seed) for r in batch.images]

    def _denoiser(self, cond: Tensor | None, uncond: Tensor | None,
                  cfg_scale: float, progress: Progress | None = None,
                  concat: Tensor | None = None) -> DiscreteEpsDenoiser:
        # one context tensor for the whole render: the UNet's cross-attention layers
        # (ContextKVCache) project it to keys and values once, not at every step
        context = cond if uncond is None else torch.cat([uncond, cond])

        def eps(x: Tensor, t: Tensor) -> Tensor:
            t = t.to(self.device)
            x = with_conditioning(x, concat)
            if uncond is None:
                out = self.unet(x.to(self.dtype), t, encoder_hidden_states=context).sample.float()
            else:
                both = self.unet(torch.cat([x, x]).to(self.dtype), t,
                                 encoder_hidden_states=context).sample.float()
                e_uncond, e_cond = both.chunk(2)
                out = e_uncond + cfg_scale * (e_cond - e_uncond)
            if progress is not None:
                progress()  # one UNet evaluation done
            return out

        return DiscreteEpsDenoiser(eps, self.alphas_cumprod, quantize=self.quantize,
                                   prediction_type=self.prediction_type)

    @torch.no_grad()
    def sample_latents(self, batch: BatchRequest, initial_latents: Tensor | None = None,
                       progress: Progress | None = None) -> Tensor:
        """Final latents before VAE decoding. ``initial_latents`` (x at the first sigma,
        already scaled) replaces the seeded initial noise (or img2img's noised picture);
        ancestral noise stays seeded. ``progress`` is called after every UNet evaluation."""
        batch.validate()
        self.embedding_index(batch)  # an embedding that cannot be used fails before LoRAs
        self.apply_loras(batch.loras, progress)
        shape = self.latent_shape(batch)
        gens = self.generators(batch)
        noise = first_noise(batch.images, shape, gens, batch.seed_noise_size(self.vae_scale_factor))
        gens = ancestral_generators(batch, gens)  # A1111's ENSD
        # the sampler's arithmetic runs in float32 whatever the UNet's dtype
        sigmas = self.schedule(batch).to(self.device)
        inpaint = self.inpaint_start(batch)
        x = self.start_x(batch, noise, sigmas, inpaint, initial_latents)
        out = self.denoise(batch, x, gens, sigmas, progress, inpaint=inpaint)
        if batch.hires is not None:
            out = self.hires_pass(batch, out, progress)
        return out

    @torch.no_grad()
    def denoise(self, batch: BatchRequest, x: Tensor, gens: list[torch.Generator],
                sigmas: Tensor, progress: Progress | None = None,
                size: tuple[int, int] | None = None,
                inpaint: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Sample ``x`` (at ``sigmas[0]``) over ``sigmas`` with the batch's prompts;
        ``gens`` give the ancestral noise (``size`` is SDXL's, unused here); ``inpaint``
        (``inpaint_start``) keeps the picture outside the mask."""
        # a prompt (or negative prompt) over 75 tokens takes more chunks of context. Images
        # are sampled in groups of one chunk count, so an image's context, and so the image,
        # never depends on the prompts it shares a batch with
        found = self.embedding_index(batch)
        pos = [self.prompt_chunks(r.prompt, found) for r in batch.images]
        neg = ([self.prompt_chunks(r.negative_prompt, found) for r in batch.images]
               if batch.cfg_scale != 1.0 else None)
        counts = [max(len(p), len(neg[i]) if neg else 1) for i, p in enumerate(pos)]
        concat = self.image_conditioning(batch, x.shape)
        out = torch.empty_like(x)
        for n in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == n]
            cond = self.encode_chunks([pos[i] for i in idx], n, batch.clip_skip)
            uncond = (self.encode_chunks([neg[i] for i in idx], n, batch.clip_skip)
                      if neg else None)
            keep = None if inpaint is None else (inpaint[0][idx], inpaint[1])
            out[idx] = self._sample(batch, cond, uncond, x[idx], [gens[i] for i in idx], sigmas,
                                    progress, keep, None if concat is None else concat[idx])
        return out

    def _sample(self, batch: BatchRequest, cond: Tensor, uncond: Tensor | None, x: Tensor,
                gens: list[torch.Generator], sigmas: Tensor,
                progress: Progress | None = None,
                inpaint: tuple[Tensor, Tensor] | None = None,
                concat: Tensor | None = None) -> Tensor:
        model = self._denoiser(cond, uncond, batch.cfg_scale, progress, concat)
        return sample(batch.sampler_name, model, x, sigmas, gens, self.device, inpaint)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        scaling = self.vae.config.scaling_factor
        pixels = self.vae.decode((latents / scaling).to(self.dtype)).sample.float()
        pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in arrays]

    def render(self, batch: BatchRequest, progress: Progress | None = None) -> list[Image.Image]:
        images = self.decode(self.sample_latents(batch, progress=progress))
        if progress is not None:
            progress()  # decoded
        return images
