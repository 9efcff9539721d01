"""The Flux.1 engine (dev and schnell): an all-in-one single-file checkpoint, as Forge and
ComfyUI load one, on diffusers/transformers components, sampled by flow matching. Offline:
component configs come from ``configs/flux/`` (or the checkpoint's ``farm.*_config``
metadata), CLIP-L's tokenizer from ``assets/clip_tokenizer/`` and T5's from the directory
named by ``FARM_FLUX_T5_TOKENIZER`` (its vocabulary is not ours to ship).

The file holds four parts: ``model.diffusion_model.`` (BFL's transformer layout:
``double_blocks``, ``single_blocks``, ``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
``guidance_in`` on guidance-distilled "dev" models only, ``final_layer``),
``text_encoders.clip_l.transformer.`` and ``text_encoders.t5xxl.transformer.`` (the
transformers layouts of CLIPTextModel and T5EncoderModel) and ``vae.`` (the original LDM
autoencoder layout with 16 latent channels).

Conditioning is diffusers' FluxPipeline's: CLIP-L's pooled output (77 tokens) and T5's last
hidden states (512 tokens), text positions all zero, image positions the (row, column) of
each 2x2 patch of the latent. A dev model embeds ``cfg_scale`` as its distilled guidance
(A1111/Forge's "Distilled CFG"); there is no classifier-free guidance, so the negative
prompt is not used. The model predicts the velocity ``v = noise - x0`` of
``x = (1 - sigma) x0 + sigma noise``, so the denoiser is ``x - sigma v`` and the farm's
Euler sampler runs on it unchanged, from ``x = noise`` at sigma 1."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from workers.engine.base import BatchRequest, EngineError, Progress, TorchEngine, first_noise
from workers.engine.loader import read_header
from workers.engine.sd1 import ENGINE_DIR, _load_into, load_tokenizer, run_sampler
from workers.engine.sd1 import import_libraries as sd1_libraries
from workers.engine.sdxl import _convert, _unwrap

CONFIG_DIR = ENGINE_DIR / "configs" / "flux"
T5_TOKENIZER_ENV = "FARM_FLUX_T5_TOKENIZER"
TRANSFORMER_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."
CLIP_TOKENS = 77
MAX_SEQUENCE_LENGTH = 512  # diffusers' FluxPipeline default, for dev and schnell alike
SAMPLERS = ("Euler",)  # of workers.engine.names.SAMPLERS, those that fit a flow model
SCHEDULES = ("Automatic", "Uniform")  # both: the model's own shifted schedule
# extras an all-in-one file may carry in its CLIP-L part that CLIPTextModel has no use for
CLIP_L_EXTRAS = ("text_projection.weight", "logit_scale")
T5_TOKENIZER_HINT = (
    f"{T5_TOKENIZER_ENV} must name a directory holding T5 v1.1's Hugging Face tokenizer: "
    "tokenizer.json with its tokenizer_config.json (FLUX.1-dev's tokenizer_2/ folder), or "
    "spiece.model if the sentencepiece package is installed"
)

Cond = tuple[Tensor, Tensor]  # (T5 hidden states, CLIP-L pooled) of a batch


def import_libraries() -> None:
    """What loading a Flux checkpoint imports: SD1's libraries, T5 and Flux's transformer."""
    sd1_libraries()
    from diffusers import FluxTransformer2DModel  # noqa: F401
    from transformers import T5EncoderModel, T5Tokenizer  # noqa: F401


# ---------------------------------------------------------------- BFL <-> diffusers names


def transformer_key_map(
    num_layers: int, num_single_layers: int, guidance: bool
) -> list[tuple[str, tuple[str, ...], str]]:
    """(BFL name, diffusers names, how) for every tensor of a Flux transformer. How:
    "copy"; "cat" (the BFL tensor is the diffusers ones concatenated along dim 0: fused
    q/k/v, and q/k/v/MLP-in of a single block); "swap" (the final norm's modulation:
    BFL stores (shift, scale), diffusers (scale, shift))."""
    pairs: list[tuple[str, tuple[str, ...], str]] = []

    def linear(bfl: str, names: tuple[str, ...], how: str = "copy") -> None:
        for kind in ("weight", "bias"):
            pairs.append((f"{bfl}.{kind}", tuple(f"{n}.{kind}" for n in names), how))

    def norm(bfl: str, name: str) -> None:
        pairs.append((f"{bfl}.scale", (f"{name}.weight",), "copy"))

    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if guidance:
        embedders["guidance_in"] = "guidance_embedder"
    for bfl, name in embedders.items():
        linear(f"{bfl}.in_layer", (f"time_text_embed.{name}.linear_1",))
        linear(f"{bfl}.out_layer", (f"time_text_embed.{name}.linear_2",))
    linear("img_in", ("x_embedder",))
    linear("txt_in", ("context_embedder",))
    for i in range(num_layers):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        linear(f"{b}.img_mod.lin", (f"{d}.norm1.linear",))
        linear(f"{b}.txt_mod.lin", (f"{d}.norm1_context.linear",))
        linear(f"{b}.img_attn.qkv", tuple(f"{d}.attn.to_{x}" for x in "qkv"), "cat")
        linear(f"{b}.txt_attn.qkv", tuple(f"{d}.attn.add_{x}_proj" for x in "qkv"), "cat")
        norm(f"{b}.img_attn.norm.query_norm", f"{d}.attn.norm_q")
        norm(f"{b}.img_attn.norm.key_norm", f"{d}.attn.norm_k")
        norm(f"{b}.txt_attn.norm.query_norm", f"{d}.attn.norm_added_q")
        norm(f"{b}.txt_attn.norm.key_norm", f"{d}.attn.norm_added_k")
        linear(f"{b}.img_attn.proj", (f"{d}.attn.to_out.0",))
        linear(f"{b}.txt_attn.proj", (f"{d}.attn.to_add_out",))
        linear(f"{b}.img_mlp.0", (f"{d}.ff.net.0.proj",))
        linear(f"{b}.img_mlp.2", (f"{d}.ff.net.2",))
        linear(f"{b}.txt_mlp.0", (f"{d}.ff_context.net.0.proj",))
        linear(f"{b}.txt_mlp.2", (f"{d}.ff_context.net.2",))
    for i in range(num_single_layers):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(f"{b}.modulation.lin", (f"{d}.norm.linear",))
        fused = (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
        linear(f"{b}.linear1", fused, "cat")
        norm(f"{b}.norm.query_norm", f"{d}.attn.norm_q")
        norm(f"{b}.norm.key_norm", f"{d}.attn.norm_k")
        linear(f"{b}.linear2", (f"{d}.proj_out",))
    linear("final_layer.linear", ("proj_out",))
    linear("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap")
    return pairs


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _layer_counts(keys: Any) -> tuple[int, int]:
    def count(head: str) -> int:
        return 1 + max((int(k.split(".")[1]) for k in keys if k.startswith(head)), default=-1)

    return count("double_blocks."), count("single_blocks.")


def transformer_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """FluxTransformer2DModel's state dict from BFL's (no prefix). A fused q/k/v is cut in
    three; a single block's ``linear1`` into three of attention's width (``img_in``'s
    output) and the MLP's input.
    Tensors with no diffusers name stay as they are (the loader reports them); a missing
    one is a KeyError."""
    inner = state["img_in.weight"].shape[0]
    left = dict(state)
    out: dict[str, Tensor] = {}
    n, n_single = _layer_counts(state)
    for bfl, names, how in transformer_key_map(n, n_single, "guidance_in.in_layer.weight" in state):
        t = left.pop(bfl)
        if how == "swap":
            out[names[0]] = _swap_halves(t)
        elif how == "cat" and len(names) == 3:  # q, k, v
            out.update(zip(names, t.chunk(3, dim=0), strict=True))
        elif how == "cat":  # q, k, v and the MLP's input
            if t.shape[0] <= 3 * inner:
                raise ValueError(f"{bfl} has {t.shape[0]} rows, not 3 x {inner} and an MLP's")
            sizes = [inner, inner, inner, t.shape[0] - 3 * inner]
            out.update(zip(names, torch.split(t, sizes, dim=0), strict=True))
        else:
            out[names[0]] = t
    return {**out, **left}


def transformer_from_diffusers(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict:
    """BFL's layout (no prefix) of a FluxTransformer2DModel's state dict: the inverse of
    ``transformer_to_diffusers``, for writing test checkpoints."""
    pairs = transformer_key_map(
        config["num_layers"], config["num_single_layers"], config["guidance_embeds"]
    )
    out: dict[str, Tensor] = {}
    used = {n for _, names, _ in pairs for n in names}
    if unnamed := sorted(set(state) - used):
        raise KeyError(f"diffusers tensors with no BFL name: {unnamed[:3]}")
    for bfl, names, how in pairs:
        if how == "swap":
            out[bfl] = _swap_halves(state[names[0]])
        elif how == "cat":
            out[bfl] = torch.cat([state[n] for n in names], dim=0)
        else:
            out[bfl] = state[names[0]]
    return out


# ---------------------------------------------------------------- the file and its parts


@dataclass
class FluxComponents:
    transformer: Any  # diffusers FluxTransformer2DModel
    vae: Any  # AutoencoderKL, 16 latent channels
    text_encoder: Any  # CLIP ViT-L (transformers CLIPTextModel): pooled text
    text_encoder_2: Any  # T5 v1.1 XXL (T5EncoderModel): the context
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]


def component_configs(metadata: Mapping[str, str], guidance: bool) -> dict[str, dict[str, Any]]:
    """Shipped FLUX.1 configs (dev's, or schnell's scheduler for a model without guidance
    embedding), each overridden by the checkpoint's ``farm.<name>_config``."""
    files = {
        "transformer": "transformer/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "text_encoder_2": "text_encoder_2/config.json",
        "scheduler": f"{'scheduler' if guidance else 'scheduler_schnell'}/scheduler_config.json",
    }
    configs = {}
    for name, rel in files.items():
        raw = metadata.get(f"farm.{name}_config")
        configs[name] = json.loads(raw) if raw else json.loads((CONFIG_DIR / rel).read_text())
    return configs


def transformer_prefix(name: str, keys: Any) -> str:
    """The prefix of the file's transformer tensors, or an EngineError naming every part of
    an all-in-one Flux file that it lacks."""
    keys = list(keys)
    prefix = None
    if any(k.startswith(TRANSFORMER_PREFIX + "double_blocks.") for k in keys):
        prefix = TRANSFORMER_PREFIX
    elif any(k.startswith("double_blocks.") for k in keys):
        prefix = ""  # BFL's own transformer-only file
    parts = {
        f"the transformer ({TRANSFORMER_PREFIX}double_blocks.*)": prefix is not None,
        f"text encoder CLIP-L ({CLIP_L_PREFIX}*)": any(k.startswith(CLIP_L_PREFIX) for k in keys),
        f"text encoder T5-XXL ({T5_PREFIX}*)": any(k.startswith(T5_PREFIX) for k in keys),
        f"the VAE ({VAE_PREFIX}*)": any(k.startswith(VAE_PREFIX) for k in keys),
    }
    missing = [part for part, present in parts.items() if not present]
    if missing:
        raise EngineError(
            f"{name}: not an all-in-one Flux checkpoint, it lacks {', '.join(missing)}. A "
            "file holding only the transformer (as BFL's flux1-dev.safetensors) needs its text "
            "encoders and VAE from other files, which the farm does not read: use a single "
            "file that bundles all four (the checkpoint layout Forge and ComfyUI load)"
        )
    return prefix or ""


def load_t5_tokenizer(directory: str | Path | None = None) -> Any:
    """T5's tokenizer from ``directory``, or else from the directory ``FARM_FLUX_T5_TOKENIZER``
    names; an EngineError saying what that directory must hold if there is none to read."""
    source = "t5_tokenizer" if directory is not None else T5_TOKENIZER_ENV
    if directory is None:
        directory = os.environ.get(T5_TOKENIZER_ENV, "")
    if not str(directory):
        raise EngineError(
            f"{T5_TOKENIZER_ENV} is not set: the Flux engine needs T5's tokenizer, which the "
            f"farm does not ship; {T5_TOKENIZER_HINT}"
        )
    path = Path(directory)
    if not (path / "tokenizer.json").is_file() and not (path / "spiece.model").is_file():
        what = "directory" if path.is_dir() else "nonexistent directory"
        raise EngineError(
            f"{source}: no T5 tokenizer in {what} {path} (neither tokenizer.json nor "
            f"spiece.model); {T5_TOKENIZER_HINT}"
        )
    from transformers import T5Tokenizer

    try:
        tokenizer = T5Tokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # any reason a tokenizer cannot be read: the user's to fix
        raise EngineError(
            f"{source}: cannot read the T5 tokenizer in {path} "
            f"({type(exc).__name__}: {exc}); {T5_TOKENIZER_HINT}"
        ) from None
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise EngineError(f"{source}: the tokenizer in {path} has no <pad> or </s> token")
    return tokenizer


def _check_widths(name: str, cfg: Mapping[str, Mapping[str, Any]]) -> None:
    """The transformer's input widths must be what the VAE and the encoders give."""
    tr, vae = cfg["transformer"], cfg["vae"]
    checks = [
        ("in_channels", tr["in_channels"], 4 * vae["latent_channels"], "4 x the VAE's latents"),
        (
            "joint_attention_dim",
            tr["joint_attention_dim"],
            cfg["text_encoder_2"]["d_model"],
            "T5's d_model",
        ),
        (
            "pooled_projection_dim",
            tr["pooled_projection_dim"],
            cfg["text_encoder"]["hidden_size"],
            "CLIP-L's hidden_size",
        ),
        ("axes_dims_rope", sum(tr["axes_dims_rope"]), tr["attention_head_dim"], "head width"),
    ]
    for field, have, want, what in checks:
        if have != want:
            raise EngineError(f"{name}: transformer {field} {have} is not {what} ({want})")


def load_components(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    t5_tokenizer: str | Path | None = None,
) -> FluxComponents:
    """Build the transformer, VAE, both text encoders and tokenizers from an all-in-one
    Flux file, one part at a time (a part's tensors are read only when it is built). The
    VAE stays in float32 whatever ``dtype``. ``progress`` is called after each step."""
    tick = progress or (lambda: None)
    path = Path(path)
    name = path.name
    tensors, metadata = read_header(path)
    prefix = transformer_prefix(name, tensors)
    tokenizer_2 = load_t5_tokenizer(t5_tokenizer)
    tick()
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    others = (CLIP_L_PREFIX, T5_PREFIX, VAE_PREFIX)
    transformer_keys = [k for k in tensors if k.startswith(prefix) and not k.startswith(others)]
    bfl_keys = [k.removeprefix(prefix) for k in transformer_keys]
    guidance = any(k.startswith("guidance_in.") for k in bfl_keys)
    cfg = component_configs(metadata, guidance)
    n, n_single = _layer_counts(bfl_keys)  # the file says how deep, and dev or schnell
    cfg["transformer"] = {
        **cfg["transformer"],
        "num_layers": n,
        "num_single_layers": n_single,
        "guidance_embeds": guidance,
    }
    _check_widths(name, cfg)
    if len(tokenizer_2) > cfg["text_encoder_2"]["vocab_size"]:
        raise EngineError(
            f"{T5_TOKENIZER_ENV}: its tokenizer has {len(tokenizer_2)} tokens, more than "
            f"{name}'s T5 ({cfg['text_encoder_2']['vocab_size']}): not T5 v1.1's tokenizer"
        )
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(cfg["transformer"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        text_encoder_2 = T5EncoderModel(T5Config(**cfg["text_encoder_2"]))
    tick()
    with safe_open(str(path), framework="pt") as f:

        def part(head: str, strip: bool = True) -> dict[str, Tensor]:
            return {
                (k.removeprefix(head) if strip else k): f.get_tensor(k)
                for k in tensors
                if k.startswith(head)
            }

        what = f"{name}: transformer"
        state = {k.removeprefix(prefix): f.get_tensor(k) for k in transformer_keys}
        state = _convert(what, transformer_to_diffusers, state)
        transformer = _load_into(transformer, state, what, dtype)
        tick()
        what = f"{name}: VAE"
        state = _convert(
            what, convert_ldm_vae_checkpoint, part(VAE_PREFIX, False), dict(vae.config)
        )
        vae = _load_into(vae, state, what, torch.float32)
        tick()
        what = f"{name}: text encoder CLIP-L"
        state = {k: v for k, v in part(CLIP_L_PREFIX).items() if k not in CLIP_L_EXTRAS}
        text_encoder = _load_into(text_encoder, _unwrap(text_encoder, state), what, dtype)
        tick()
        what = f"{name}: text encoder T5-XXL"
        state = part(T5_PREFIX)
        # the input embedding is one tensor under two names; a file may hold either or both
        embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        if embedding is not None:
            state["shared.weight"] = state["encoder.embed_tokens.weight"] = embedding
        text_encoder_2 = _load_into(text_encoder_2, state, what, dtype)
        tick()
    return FluxComponents(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_tokenizer(),
        tokenizer_2=tokenizer_2,
        scheduler_config=cfg["scheduler"],
    )


# ---------------------------------------------------------------- latents and schedule


def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) latents as the transformer's (B, H/2 x W/2, 4C) sequence of 2x2
    patches, row by row (FluxPipeline's ``_pack_latents``)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: Tensor, height: int, width: int) -> Tensor:
    """The inverse of ``pack`` for latents of ``height`` x ``width``."""
    b, _, channels = packed.shape
    patches = packed.view(b, height // 2, width // 2, channels // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int) -> Tensor:
    """Position of each packed patch for the rotary embedding: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def flow_sigmas(steps: int, image_seq_len: int, config: Mapping[str, Any]) -> Tensor:
    """FluxPipeline's schedule: ``steps`` sigmas evenly spaced from 1 to 1/steps, shifted
    (FlowMatchEulerDiscreteScheduler), then 0. With dynamic shifting (dev) the shift
    ``mu`` grows linearly with the image's token count from ``base_shift`` at
    ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` and
    ``sigma' = e^mu / (e^mu + 1/sigma - 1)``; without it (schnell)
    ``sigma' = shift sigma / (1 + (shift - 1) sigma)``."""
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if config.get("use_dynamic_shifting", False):
        lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = base + (top - base) * (image_seq_len - lo) / (hi - lo)
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    else:
        shift = config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


# ---------------------------------------------------------------- the engine


class FluxEngine(TorchEngine):
    """Renders batches on one Flux.1 model: Euler on the model's shifted flow-matching
    schedule, per-image CPU generators for the initial noise, ``cfg_scale`` as the
    distilled guidance of a dev model (ignored by schnell), negative prompts unused."""

    family = "flux"
    module_names = ("transformer", "vae", "text_encoder", "text_encoder_2")
    takes_embeddings = False  # BatchRequest.embeddings are refused (``validate``)

    def __init__(
        self, components: FluxComponents, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.dtype = dtype
        self.transformer = components.transformer
        self.vae = components.vae.float()  # decoded in float32, as SDXL's
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        self.scheduler_config = components.scheduler_config
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels
        self.max_sequence_length = MAX_SEQUENCE_LENGTH
        self.device = device

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        progress: Progress | None = None,
        t5_tokenizer: str | Path | None = None,
    ) -> FluxEngine:
        """``t5_tokenizer``: T5's tokenizer directory; None reads ``FARM_FLUX_T5_TOKENIZER``.
        bfloat16 on CUDA (Flux's own dtype: T5 overflows in fp16), float32 elsewhere."""
        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        engine = cls(load_components(path, dtype, progress, t5_tokenizer), device, dtype)
        if progress is not None:
            progress()  # on its device
        return engine

    # -------------------------------------------------------------- steps of a render

    def validate(self, batch: BatchRequest) -> None:
        """BatchRequest.validate with Flux's size multiple (VAE factor x 2x2 patches), and
        EngineErrors naming the samplers, schedules and LoRAs Flux does not take."""
        batch.validate(multiple=2 * self.vae_scale_factor)
        if batch.sampler_name not in SAMPLERS:
            raise EngineError(
                f"sampler_name: {batch.sampler_name!r} does not sample a Flux (flow matching) "
                f"model; allowed for Flux: {', '.join(SAMPLERS)}"
            )
        if batch.scheduler not in SCHEDULES:
            raise EngineError(
                f"scheduler: {batch.scheduler!r} is not a Flux schedule; allowed for Flux: "
                f"{', '.join(SCHEDULES)} (both the model's own shifted schedule)"
            )
        if getattr(batch, "loras", ()):
            raise EngineError("loras: the Flux engine takes no LoRA yet")
        if getattr(batch, "clip_skip", 1) != 1:
            raise EngineError("clip_skip: the Flux engine reads its encoders' own layers")
        if getattr(batch, "embeddings", ()):
            raise EngineError("embeddings: the Flux engine takes no textual-inversion embeddings")
        if batch.init_image is not None:
            raise EngineError("init_image: the Flux engine does not start from a picture")
        if batch.hires is not None:
            raise EngineError("hires: the Flux engine has no hires fix")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """(T5's last hidden states over 512 tokens, CLIP-L's pooled output over 77), each
        prompt truncated to fit, as FluxPipeline encodes them."""
        kw: dict[str, Any] = {"padding": "max_length", "truncation": True, "return_tensors": "pt"}
        ids_l = self.tokenizer(prompts, max_length=CLIP_TOKENS, **kw).input_ids
        ids_t5 = self.tokenizer_2(prompts, max_length=self.max_sequence_length, **kw).input_ids
        pooled = self.text_encoder(ids_l.to(self.device)).pooler_output
        context = self.text_encoder_2(ids_t5.to(self.device))[0]
        return context.to(self.dtype), pooled.to(self.dtype)

    def latent_size(self, batch: BatchRequest) -> tuple[int, int]:
        f = self.vae_scale_factor
        return batch.height // f, batch.width // f

    def latent_shape(self, batch: BatchRequest) -> tuple[int, int, int]:
        return (self.latent_channels, *self.latent_size(batch))

    def sigmas(self, batch: BatchRequest) -> Tensor:
        h, w = self.latent_size(batch)
        return flow_sigmas(batch.steps, (h // 2) * (w // 2), self.scheduler_config)

    def generators(self, batch: BatchRequest) -> list[torch.Generator]:
        """One CPU generator per image, seeded with its seed."""
        return [torch.Generator("cpu").manual_seed(r.seed) for r in batch.images]

    def initial_noise(self, batch: BatchRequest) -> Tensor:
        """Each image's noise drawn as (16, H/8, W/8) from its own generator, slerp'd toward
        its subseed's (``first_noise``, A1111's variation seed), then packed."""
        shape = self.latent_shape(batch)
        resized = batch.seed_noise_size(self.vae_scale_factor)  # A1111's seed resize
        return pack(first_noise(batch.images, shape, self.generators(batch), resized))

    def _denoiser(
        self, cond: Cond, guidance: Tensor | None, img_ids: Tensor, progress: Progress | None
    ) -> Any:
        context, pooled = cond
        txt_ids = torch.zeros(context.shape[1], 3, device=self.device, dtype=self.dtype)

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            v = self.transformer(
                hidden_states=x.to(self.dtype),
                timestep=sigma.expand(len(x)).to(self.device, self.dtype),
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=context,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0].float()
            if progress is not None:
                progress()  # one transformer evaluation done
            return x - sigma * v

        return denoise

    @torch.no_grad()
    def sample_latents(
        self,
        batch: BatchRequest,
        initial_latents: Tensor | None = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """Final packed latents (B, tokens, 64). ``initial_latents`` (packed, at sigma 1)
        replaces the seeded noise. ``progress`` is called after every transformer step."""
        self.validate(batch)
        x = self.initial_noise(batch) if initial_latents is None else initial_latents
        x = x.to(self.device, torch.float32)  # sampler arithmetic in float32
        sigmas = self.sigmas(batch).to(self.device)
        cond = self.encode_prompts([r.prompt for r in batch.images])
        guidance = (
            torch.full((len(x),), float(batch.cfg_scale), device=self.device, dtype=self.dtype)
            if self.guidance_embeds
            else None
        )
        ids = image_ids(*self.latent_size(batch)).to(self.device, self.dtype)
        model = self._denoiser(cond, guidance, ids, progress)
        return run_sampler(
            batch.sampler_name, model, x, sigmas, self.generators(batch), self.device
        )

    @torch.no_grad()
    def decode(self, latents: Tensor, batch: BatchRequest) -> list[Image.Image]:
        """Unpack, undo the VAE's scaling and shift, decode in float32 one image at a time."""
        z = unpack(latents.float(), *self.latent_size(batch))
        z = z / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = []
        for one in z:
            pixels = self.vae.decode(one[None].to(self.device, torch.float32)).sample
            pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            images.append(Image.fromarray(pixels[0].permute(1, 2, 0).cpu().numpy(), mode="RGB"))
        return images

    def render(self, batch: BatchRequest, progress: Progress | None = None) -> list[Image.Image]:
        images = self.decode(self.sample_latents(batch, progress=progress), batch)
        if progress is not None:
            progress()  # decoded
        return images
