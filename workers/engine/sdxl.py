"""The Stable Diffusion XL (base) engine: an original-layout single-file checkpoint on
diffusers components, sampled with the same k-diffusion style samplers as SD1. Fully
offline: component configs come from ``configs/sdxl/`` (or the checkpoint's
``farm.*_config`` metadata) and both tokenizers from ``assets/clip_tokenizer/``.

What SDXL adds to SD1: two text encoders whose penultimate hidden states lie side by side
as the UNet's context (CLIP ViT-L 768 + OpenCLIP ViT-bigG 1280 = 2048 wide), the pooled and
projected output of the second, and six size numbers (original size, crop top-left, target
size) that the UNet embeds together with the pooled text (``addition_embed_type:
text_time``). Prompt chunking, samplers, schedules and seeding are SD1's (``sd1.py``).

LoRAs (``apply_loras``) are merged as SD1's (``lora.py``): kohya files name the UNet's
layers ``lora_unet_`` in the original layout (``input_blocks_4_1_...``, as kohya's SDXL
trainer writes them) or with their diffusers names, CLIP-L's ``lora_te1_`` and bigG's
``lora_te2_`` in transformers' CLIPTextModel(WithProjection) naming; peft files
``unet.``, ``text_encoder.`` (CLIP-L) and ``text_encoder_2.`` (bigG)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from workers.engine.base import (
    BatchRequest,
    EngineError,
    Progress,
    ancestral_generators,
    first_noise,
)
from workers.engine.embeddings import EmbeddingStore, token_fixes
from workers.engine.lora import ROOTS, MergedLoras, module_index
from workers.engine.names import resolve_schedule
from workers.engine.prompts import EmbeddingIndex, TokenChunk, prompt_chunks
from workers.engine.samplers import (
    PREDICTION_TYPES,
    DiscreteEpsDenoiser,
    alphas_cumprod,
    get_sigmas,
    rescale_zero_terminal_snr,
)
from workers.engine.sd1 import (
    CLIP_TOKENIZER_COMMA,
    CLIP_VOCAB_SIZE,
    ENGINE_DIR,
    MAX_TOKENS,
    TOKENIZER_DIR,
    ContextKVCache,
    UNetEngine,
    _load_into,
    chunk_weights,
    emphasize,
    load_tokenizer,
    sample,
    unet_config_for,
    with_conditioning,
)
from workers.engine.sd1 import import_libraries as sd1_libraries

CONFIG_DIR = ENGINE_DIR / "configs" / "sdxl"
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_PAD = "!"  # OpenCLIP pads with id 0 after the end token; CLIP-L repeats the end token
TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)
# peft / diffusers roots of an SDXL LoRA -> kohya prefixes: the first encoder is lora_te1_
LORA_ROOTS = {**ROOTS, "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}

Cond = tuple[Tensor, Tensor]  # (context, pooled text) of a group of images


def import_libraries() -> None:
    """What loading an SDXL checkpoint imports: SD1's libraries and CLIP with projection."""
    sd1_libraries()
    from transformers import CLIPTextModelWithProjection  # noqa: F401


def load_tokenizer_2() -> Any:
    """The second encoder's tokenizer: CLIP's BPE padding with "!" (id 0), as SDXL's
    ``tokenizer_2`` and A1111 do."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        str(TOKENIZER_DIR), local_files_only=True, pad_token=OPEN_CLIP_PAD
    )
    if len(tokenizer) != CLIP_VOCAB_SIZE or tokenizer.pad_token_id != 0:
        raise EngineError(
            f"CLIP tokenizer in {TOKENIZER_DIR} has {len(tokenizer)} tokens and "
            f"pad id {tokenizer.pad_token_id}, expected {CLIP_VOCAB_SIZE} and 0"
        )
    return tokenizer


@dataclass
class SDXLComponents:
    unet: Any
    vae: Any
    text_encoder: Any  # CLIP ViT-L (transformers CLIPTextModel)
    text_encoder_2: Any  # OpenCLIP ViT-bigG (CLIPTextModelWithProjection)
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]


def component_configs(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Shipped SDXL base configs, each overridden by the checkpoint's ``farm.<name>_config``."""
    files = {
        "unet": "unet/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "text_encoder_2": "text_encoder_2/config.json",
        "scheduler": "scheduler/scheduler_config.json",
    }
    configs = {}
    for name, rel in files.items():
        raw = metadata.get(f"farm.{name}_config")
        configs[name] = json.loads(raw) if raw else json.loads((CONFIG_DIR / rel).read_text())
    return configs


def _convert(what: str, convert: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Tensor]:
    """diffusers' converter, its KeyErrors (a tensor the layout needs is missing) as an
    EngineError naming the file and the part."""
    try:
        state = convert(*args)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise EngineError(
            f"{what} weights do not fit its config: cannot map them from the "
            f"original layout ({type(exc).__name__}: {exc})"
        ) from None
    return {k: v for k, v in state.items() if v is not None}


def _unwrap(model: Any, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level)."""
    if hasattr(model, "text_model"):
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _text_encoder_names(model: Any) -> Callable[[str], Iterable[str]]:
    """A text encoder's module name -> the one LoRA files give it, transformers'
    ``text_model.encoder.layers.0.self_attn.q_proj``; transformers >= 5.6 dropped
    CLIPTextModel's ``text_model`` level (the projection of CLIPTextModelWithProjection
    lies outside it either way)."""
    if hasattr(model, "text_model"):
        return lambda name: (name,)
    return lambda name: (name if name.startswith("text_projection") else "text_model." + name,)


def _check_widths(name: str, cfg: dict[str, dict[str, Any]]) -> None:
    """The UNet's context and added-embedding widths must be what the encoders give."""
    unet, te1, te2 = cfg["unet"], cfg["text_encoder"], cfg["text_encoder_2"]
    if unet.get("addition_embed_type") != "text_time":
        raise EngineError(
            f"{name}: UNet config has addition_embed_type "
            f"{unet.get('addition_embed_type')!r}, SDXL needs 'text_time'"
        )
    context = te1["hidden_size"] + te2["hidden_size"]
    if unet["cross_attention_dim"] != context:
        raise EngineError(
            f"{name}: UNet cross_attention_dim {unet['cross_attention_dim']} is "
            f"not the text encoders' {te1['hidden_size']} + {te2['hidden_size']}"
        )
    added = te2["projection_dim"] + TIME_IDS * unet["addition_time_embed_dim"]
    if unet["projection_class_embeddings_input_dim"] != added:
        raise EngineError(
            f"{name}: UNet projection_class_embeddings_input_dim "
            f"{unet['projection_class_embeddings_input_dim']} is not {added} "
            f"(pooled text {te2['projection_dim']} + {TIME_IDS} size numbers)"
        )


def load_components(
    path: str | Path, dtype: torch.dtype = torch.float32, progress: Progress | None = None
) -> SDXLComponents:
    """Build unet, vae, both text encoders and tokenizers from an original-layout SDXL file.
    The VAE is kept in float32 whatever ``dtype`` (SDXL's VAE overflows in fp16).
    ``progress`` is called after each step (reading the file, building each part)."""
    tick = progress or (lambda: None)
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    name = path.name
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    state = load_file(str(path))
    tick()
    cfg = component_configs(metadata)
    cfg["unet"] = unet_config_for(state, cfg["unet"])
    _check_widths(name, cfg)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    tick()
    what = f"{name}: UNet"
    unet = _load_into(
        unet, _convert(what, convert_ldm_unet_checkpoint, state, dict(unet.config)), what, dtype
    )
    tick()
    what = f"{name}: VAE"
    vae = _load_into(
        vae,
        _convert(what, convert_ldm_vae_checkpoint, state, dict(vae.config)),
        what,
        torch.float32,
    )
    tick()
    what = f"{name}: text encoder 1 (CLIP-L)"
    clip_l = {k: v for k, v in state.items() if k.startswith("conditioner.embedders.0.")}
    clip_l = _unwrap(text_encoder, _convert(what, convert_ldm_clip_checkpoint, clip_l))
    text_encoder = _load_into(text_encoder, clip_l, what, dtype)
    tick()
    what = f"{name}: text encoder 2 (OpenCLIP bigG)"
    clip_g = _convert(what, convert_open_clip_checkpoint, text_encoder_2, state, OPEN_CLIP_PREFIX)
    text_encoder_2 = _load_into(text_encoder_2, _unwrap(text_encoder_2, clip_g), what, dtype)
    tick()
    return SDXLComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_tokenizer(),
        tokenizer_2=load_tokenizer_2(),
        scheduler_config=cfg["scheduler"],
    )


class SDXLEngine(UNetEngine):
    """Renders batches on one SDXL base model. As SD1Engine: A1111 sampler semantics,
    per-image CPU generators, ``quantize=True`` for integer UNet timesteps. An image whose
    negative prompt is "" gets zeros as its negative context and pooled text (A1111's and
    diffusers' default for SDXL); the size numbers are (height, width), (0, 0),
    (height, width) for prompt and negative prompt alike."""

    family = "sdxl"
    module_names = ("unet", "vae", "text_encoder", "text_encoder_2")

    def __init__(
        self,
        components: SDXLComponents,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        quantize: bool = False,
    ) -> None:
        self.dtype = dtype
        self.unet = components.unet
        self.vae = components.vae.float()  # decoded in float32: it overflows in fp16
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        sc = components.scheduler_config
        self.prediction_type = sc.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise EngineError(
                f"scheduler prediction_type {self.prediction_type!r} is not "
                f"supported (supported: {', '.join(PREDICTION_TYPES)})"
            )
        self.alphas_cumprod = alphas_cumprod(
            sc.get("beta_start", 0.00085),
            sc.get("beta_end", 0.012),
            sc.get("num_train_timesteps", 1000),
        )
        if sc.get("rescale_betas_zero_snr", False):
            self.alphas_cumprod = rescale_zero_terminal_snr(self.alphas_cumprod)
        self.quantize = quantize
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.unet_inputs()
        self.unet.set_attn_processor(
            {
                name: ContextKVCache() if name.endswith("attn2.processor") else proc
                for name, proc in self.unet.attn_processors.items()
            }
        )
        self.device = device
        self.loras = MergedLoras(self._lora_layers, LORA_ROOTS)
        encoders = [
            ("CLIP-L", self.text_encoder.config.hidden_size),
            ("OpenCLIP bigG", self.text_encoder_2.config.hidden_size),
        ]
        self.embeddings = EmbeddingStore(self.family, encoders, self._tokenize)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        quantize: bool = False,
        progress: Progress | None = None,
    ) -> SDXLEngine:
        if dtype is None:
            dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        engine = cls(load_components(path, dtype, progress), device, dtype, quantize)
        if progress is not None:
            progress()  # on its device
        return engine

    # ------------------------------------------------------------------------ LoRAs

    def _lora_layers(self) -> dict[str, Any]:
        """The layers by the names LoRA files give them: ``lora_unet_`` (the UNet's
        original-layout names and its diffusers ones), ``lora_te1_`` (CLIP-L) and
        ``lora_te2_`` (bigG)."""
        te1, te2 = self.text_encoder, self.text_encoder_2
        return {
            **module_index("lora_unet", self.unet, self.unet_lora_names()),
            **module_index("lora_te1", te1, _text_encoder_names(te1)),
            **module_index("lora_te2", te2, _text_encoder_names(te2)),
        }

    # -------------------------------------------------------------- steps of a render

    def prompt_chunks(
        self, prompt: str, embeddings: EmbeddingIndex | None = None
    ) -> list[TokenChunk]:
        """The prompt's token ids in A1111's chunks (``prompts.prompt_chunks``: emphasis,
        BREAK, 75 tokens a chunk), each wrapped in BOS ... EOS and padded to 77 with EOS, as
        CLIP-L reads them (``encode_chunks`` pads the second encoder's copy with "!"), with
        each token's weight and the ``embeddings`` its text names (``TokenChunk.fixes``);
        at least one chunk."""
        tok = self.tokenizer
        return prompt_chunks(
            prompt,
            self._tokenize,
            tok.convert_tokens_to_ids(CLIP_TOKENIZER_COMMA),
            tok.bos_token_id,
            tok.eos_token_id,
            tok.pad_token_id,
            embeddings,
        )

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(
            text, add_special_tokens=False, truncation=False, verbose=False
        ).input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], chunks: int = 1) -> Cond:
        """(context, pooled) of prompts: ``encode_chunks`` of their ``prompt_chunks``."""
        return self.encode_chunks([self.prompt_chunks(p) for p in prompts], chunks)

    @torch.no_grad()
    def encode_chunks(self, per: list[list[list[int]]], chunks: int = 1) -> Cond:
        """Context: per chunk the penultimate hidden states of CLIP-L and of OpenCLIP-bigG
        side by side (77 x (768 + 1280) for SDXL), the chunks of a prompt one after another,
        every prompt padded with empty-prompt chunks to ``chunks`` or to the most any of
        them needs. Pooled: bigG's projected end-token state of the prompt's first chunk
        (A1111's choice; diffusers has only one chunk). A chunk's embeddings replace its
        placeholders' token embeddings, ``clip_l`` in CLIP-L and ``clip_g`` in bigG (so
        also in the pooled text), as A1111's; the placeholders (id 0) are no end token, so
        the pooled state is still the real end token's."""
        n = max(chunks, *(len(c) for c in per))
        empty = self.prompt_chunks("")[0]
        rows = [chunk for c in per for chunk in c + [empty] * (n - len(c))]
        ids = torch.tensor(rows)
        # bigG's copy: everything after the (first) end token becomes its pad token
        end = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)
        after = torch.arange(ids.shape[1])[None, :] > end
        ids_g = ids.masked_fill(after, self.tokenizer_2.pad_token_id)
        with token_fixes(self.text_encoder, rows, 0):
            out_l = self.text_encoder(ids.to(self.device), output_hidden_states=True)
        with token_fixes(self.text_encoder_2, rows, 1):
            out_g = self.text_encoder_2(ids_g.to(self.device), output_hidden_states=True)
        # emphasis on each encoder's states (as A1111, whose two embedders each apply it);
        # the pooled text is left as the encoder gave it
        weights = chunk_weights(rows)
        hidden = torch.cat(
            [
                emphasize(out_l.hidden_states[-2], weights),
                emphasize(out_g.hidden_states[-2], weights),
            ],
            dim=-1,
        )
        context = hidden.reshape(len(per), n * MAX_TOKENS, hidden.shape[-1])
        pooled = out_g.text_embeds.reshape(len(per), n, -1)[:, 0]
        return context, pooled

    def time_ids(self, batch: BatchRequest, size: tuple[int, int] | None = None) -> Tensor:
        """SDXL's size conditioning: original size, crop top-left, target size, as (h, w):
        ``size`` or the batch's."""
        h, w = size or (batch.height, batch.width)
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)

    def sigmas(self, batch: BatchRequest) -> Tensor:
        schedule = resolve_schedule(batch.sampler_name, batch.scheduler)
        return get_sigmas(schedule, self._noise_levels(), batch.steps)

    def latent_shape(self, batch: BatchRequest) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return self.latent_channels, batch.height // f, batch.width // f

    def generators(self, batch: BatchRequest) -> list[torch.Generator]:
        """One CPU generator per image: its initial noise, then its ancestral noise."""
        return [torch.Generator("cpu").manual_seed(r.seed) for r in batch.images]

    def _noise_levels(self) -> DiscreteEpsDenoiser:
        return DiscreteEpsDenoiser(
            lambda x, t: x,
            self.alphas_cumprod,
            quantize=self.quantize,
            prediction_type=self.prediction_type,
        )

    def _denoiser(
        self,
        cond: Cond,
        uncond: Cond | None,
        cfg_scale: float,
        time_ids: Tensor,
        progress: Progress | None = None,
        concat: Tensor | None = None,
    ) -> DiscreteEpsDenoiser:
        # one context tensor for the whole render: the UNet's cross-attention layers
        # (ContextKVCache) project it to keys and values once, not at every step
        context, pooled = (
            cond
            if uncond is None
            else (torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]]))
        )
        added = {"text_embeds": pooled, "time_ids": time_ids.to(self.device).repeat(len(pooled), 1)}

        def eps(x: Tensor, t: Tensor) -> Tensor:
            t = t.to(self.device)
            x = with_conditioning(x, concat)
            if uncond is None:
                out = self.unet(
                    x.to(self.dtype), t, encoder_hidden_states=context, added_cond_kwargs=added
                ).sample.float()
            else:
                both = self.unet(
                    torch.cat([x, x]).to(self.dtype),
                    t,
                    encoder_hidden_states=context,
                    added_cond_kwargs=added,
                ).sample.float()
                e_uncond, e_cond = both.chunk(2)
                out = e_uncond + cfg_scale * (e_cond - e_uncond)
            if progress is not None:
                progress()  # one UNet evaluation done
            return out

        return DiscreteEpsDenoiser(
            eps, self.alphas_cumprod, quantize=self.quantize, prediction_type=self.prediction_type
        )

    @torch.no_grad()
    def sample_latents(
        self,
        batch: BatchRequest,
        initial_latents: Tensor | None = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """Final latents before VAE decoding. ``initial_latents`` (x at the first sigma,
        already scaled) replaces the seeded initial noise (or img2img's noised picture);
        ancestral noise stays seeded. ``progress`` is called after every UNet evaluation."""
        batch.validate()
        if batch.clip_skip != 1:
            raise EngineError("clip_skip: SDXL reads its encoders' own layers (A1111 skips none)")
        self.embedding_index(batch)  # an embedding that cannot be used fails before LoRAs
        self.apply_loras(batch.loras, progress)
        shape = self.latent_shape(batch)
        gens = self.generators(batch)
        noise = first_noise(batch.images, shape, gens, batch.seed_noise_size(self.vae_scale_factor))
        gens = ancestral_generators(batch, gens)  # A1111's ENSD
        sigmas = self.schedule(batch).to(self.device)  # sampler arithmetic in float32
        inpaint = self.inpaint_start(batch)
        x = self.start_x(batch, noise, sigmas, inpaint, initial_latents)
        out = self.denoise(batch, x, gens, sigmas, progress, inpaint=inpaint)
        if batch.hires is not None:
            out = self.hires_pass(batch, out, progress)
        return out

    @torch.no_grad()
    def denoise(
        self,
        batch: BatchRequest,
        x: Tensor,
        gens: list[torch.Generator],
        sigmas: Tensor,
        progress: Progress | None = None,
        size: tuple[int, int] | None = None,
        inpaint: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Sample ``x`` (at ``sigmas[0]``) over ``sigmas`` with the batch's prompts; ``gens``
        give the ancestral noise. ``size`` (height, width) is the size conditioning, the
        batch's own if None (the hires pass gives its upscaled size); ``inpaint``
        (``inpaint_start``) keeps the picture outside the mask."""
        time_ids = self.time_ids(batch, size)
        # as in SD1: images are sampled in groups of one chunk count, so that an image never
        # depends on the prompts it shares a batch with
        found = self.embedding_index(batch)
        pos = [self.prompt_chunks(r.prompt, found) for r in batch.images]
        neg = (
            [self.prompt_chunks(r.negative_prompt, found) for r in batch.images]
            if batch.cfg_scale != 1.0
            else None
        )
        counts = [max(len(p), len(neg[i]) if neg else 1) for i, p in enumerate(pos)]
        concat = self.image_conditioning(batch, x.shape)
        out = torch.empty_like(x)
        for n in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == n]
            cond = self.encode_chunks([pos[i] for i in idx], n)
            uncond = None
            if neg is not None:
                context, pooled = self.encode_chunks([neg[i] for i in idx], n)
                empty = torch.tensor(
                    [batch.images[i].negative_prompt == "" for i in idx], device=context.device
                )
                uncond = (
                    context.masked_fill(empty[:, None, None], 0),
                    pooled.masked_fill(empty[:, None], 0),
                )
            keep = None if inpaint is None else (inpaint[0][idx], inpaint[1])
            out[idx] = self._sample(
                batch,
                cond,
                uncond,
                time_ids,
                x[idx],
                [gens[i] for i in idx],
                sigmas,
                progress,
                keep,
                None if concat is None else concat[idx],
            )
        return out

    def _sample(
        self,
        batch: BatchRequest,
        cond: Cond,
        uncond: Cond | None,
        time_ids: Tensor,
        x: Tensor,
        gens: list[torch.Generator],
        sigmas: Tensor,
        progress: Progress | None = None,
        inpaint: tuple[Tensor, Tensor] | None = None,
        concat: Tensor | None = None,
    ) -> Tensor:
        model = self._denoiser(cond, uncond, batch.cfg_scale, time_ids, progress, concat)
        return sample(batch.sampler_name, model, x, sigmas, gens, self.device, inpaint)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        """VAE decode in float32, one image at a time (a 1024x1024 decode in float32 takes
        a few GB of activations; a batch of them at once would take that many times more)."""
        scaling = self.vae.config.scaling_factor
        images = []
        for z in latents:
            pixels = self.vae.decode((z[None] / scaling).to(self.device, torch.float32)).sample
            pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            images.append(Image.fromarray(pixels[0].permute(1, 2, 0).cpu().numpy(), mode="RGB"))
        return images

    def render(self, batch: BatchRequest, progress: Progress | None = None) -> list[Image.Image]:
        images = self.decode(self.sample_latents(batch, progress=progress))
        if progress is not None:
            progress()  # decoded
        return images
