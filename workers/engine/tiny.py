"""Tiny random-weight SD1.x and SDXL checkpoints in the original single-file layout, for
tests.

SD1: UNet 32/64 channels, VAE 32/64, CLIP text encoder hidden 32 with 2 layers and the real
49,408-token vocabulary, cross-attention 32. SDXL (about 6.6 MB): UNet 16/32 with 1 and 2
transformer layers and the ``text_time`` added conditioning, VAE 16/32, a CLIP-L-like text
encoder of width 8 and an OpenCLIP-bigG-like one of width 12 with a projection to 10 (3
layers each, the real vocabulary), so cross-attention 8 + 12 = 20. The diffusers configs
travel in the file's safetensors metadata (``farm.*_config``), so the loader needs nothing
else. Both render 64x64 (32x32 latents: these VAEs downsample by 2, not 8).

Flux (about 2 MB): the all-in-one layout Forge and ComfyUI load (BFL's transformer under
``model.diffusion_model.``, ``text_encoders.clip_l.transformer.``,
``text_encoders.t5xxl.transformer.``, ``vae.``), a transformer of width 16 (2 heads of 8)
with 2 double and 2 single blocks and guidance embedding (dev; ``guidance=False``: schnell),
a VAE 16/32 with 16 latent channels, Flux's scaling and shift and no quant convs, CLIP-L
width 8 and a T5 of width 12 with 2 layers over a 128-token vocabulary. Its T5 tokenizer (a
small Unigram one, T5's special ids) is written next to it, in ``<stem>-t5-tokenizer/``.
Any multiple of 4 renders (VAE factor 2 x 2x2 patches).

    python -m workers.engine.tiny OUT.safetensors [--seed N] [--family sd1|sdxl|flux]
        [--inpainting]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TINY_UNET: dict[str, Any] = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32,
}
TINY_VAE: dict[str, Any] = {
    "sample_size": 64, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "scaling_factor": 0.18215,
}
TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
    "num_hidden_layers": 2, "vocab_size": 49408, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "projection_dim": 32,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}


TINY_SDXL_UNET: dict[str, Any] = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4],
    "use_linear_projection": True, "cross_attention_dim": 20, "norm_num_groups": 8,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 10 + 6 * 8,  # pooled text + six size numbers
}
TINY_SDXL_VAE: dict[str, Any] = {
    **TINY_VAE, "block_out_channels": [16, 32], "norm_num_groups": 8,
    "scaling_factor": 0.13025, "force_upcast": True,
}
TINY_SDXL_TEXT_ENCODER: dict[str, Any] = {  # CLIP ViT-L's shape, scaled down
    **TINY_TEXT_ENCODER, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
    "num_hidden_layers": 3, "projection_dim": 8,
}
TINY_SDXL_TEXT_ENCODER_2: dict[str, Any] = {  # OpenCLIP ViT-bigG's, scaled down
    "hidden_size": 12, "intermediate_size": 24, "num_attention_heads": 2,
    "num_hidden_layers": 3, "vocab_size": 49408, "max_position_embeddings": 77,
    "hidden_act": "gelu", "projection_dim": 10,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,  # as SDXL's: pool at argmax(ids)
}


TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 12,
    "pooled_projection_dim": 8, "guidance_embeds": True, "axes_dims_rope": [2, 2, 4],
}
TINY_FLUX_VAE: dict[str, Any] = {
    **TINY_SDXL_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
TINY_FLUX_TEXT_ENCODER = TINY_SDXL_TEXT_ENCODER  # CLIP-L's shape, width 8
TINY_FLUX_T5: dict[str, Any] = {  # T5 v1.1's shape (gated GELU, no biases), scaled down
    "vocab_size": 128, "d_model": 12, "d_kv": 6, "d_ff": 24, "num_layers": 2, "num_heads": 2,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "is_encoder_decoder": False, "use_cache": False,
    "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
}
# T5's special ids (<pad> 0, </s> 1, <unk> 2), then SentencePiece-style pieces ("\u2581"
# starts a word): a few words, every lowercase letter and digit alone and word-initial
_T5_WORDS = ("a", "photo", "of", "cat", "red", "car", "the", "dog", "mountains", "at", "night")
_T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """(piece, log probability) of the tiny T5 tokenizer's Unigram model."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in _T5_WORDS if len(w) > 1]
    vocab += [(c, -5.0) for c in _T5_CHARS + ",.!?'-"]
    vocab += [("\u2581" + c, -5.5) for c in _T5_CHARS]
    return vocab


def write_tiny_t5_tokenizer(directory: str | Path) -> Path:
    """A T5-like tokenizer as ``T5Tokenizer.from_pretrained(directory)`` reads it: a
    ``tokenizers`` Unigram model with T5's pre-tokenizer, ``</s>`` appended, no extra ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.Unigram(tiny_t5_vocab(), unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always",
                                           split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "<pad>", "extra_ids": 0, "model_max_length": 512}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def t5_tokenizer_dir(checkpoint: str | Path) -> Path:
    """Where ``write_tiny_flux_checkpoint`` puts the checkpoint's T5 tokenizer."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + "-t5-tokenizer")


def build_tiny_modules(seed: int = 0, inpainting: bool = False) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) diffusers/transformers modules with seeded random weights;
    ``inpainting``: a UNet that reads 9 channels, as an inpainting checkpoint's."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({**TINY_UNET, **_inputs(inpainting)})
        vae = AutoencoderKL.from_config(TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    return unet.eval(), vae.eval(), text_encoder.eval()


def _inputs(inpainting: bool) -> dict[str, int]:
    return {"in_channels": 9} if inpainting else {}


def build_tiny_sdxl_modules(seed: int = 0,
                            inpainting: bool = False) -> tuple[Any, Any, Any, Any]:
    """(unet, vae, text_encoder, text_encoder_2) of a tiny SDXL, seeded random weights;
    ``inpainting``: a UNet that reads 9 channels."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({**TINY_SDXL_UNET, **_inputs(inpainting)})
        vae = AutoencoderKL.from_config(TINY_SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_2))
    return unet.eval(), vae.eval(), text_encoder.eval(), text_encoder_2.eval()


def build_tiny_flux_modules(seed: int = 0, guidance: bool = True) -> tuple[Any, Any, Any, Any]:
    """(transformer, vae, text_encoder CLIP-L, text_encoder_2 T5) of a tiny Flux, seeded
    random weights; ``guidance=False`` leaves out the guidance embedding (schnell)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel.from_config(
            {**TINY_FLUX_TRANSFORMER, "guidance_embeds": guidance})
        vae = AutoencoderKL.from_config(TINY_FLUX_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_FLUX_TEXT_ENCODER))
        text_encoder_2 = T5EncoderModel(T5Config(**TINY_FLUX_T5))
        # the q/k RMSNorm scales start as ones: made distinct, so that a test can tell
        # one from another
        for p in transformer.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.data.add_(torch.randn_like(p) * 0.1)
    return transformer.eval(), vae.eval(), text_encoder.eval(), text_encoder_2.eval()


_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32"}


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """Like safetensors.torch.save_file, but byte-for-byte reproducible (sorted header):
    the farm's model store addresses checkpoints by sha256."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = tensors[name].detach().cpu().contiguous().numpy()
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _DTYPES[str(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for chunk in chunks:
            f.write(chunk)


def write_family(path: str | Path, tensors: dict[str, Any], family: str,
                 configs: dict[str, dict[str, Any]]) -> Path:
    """Write one checkpoint file with the ``farm.family`` and ``farm.<component>_config``
    metadata the engines read their component configs from."""
    metadata = {"farm.family": family}
    for name, cfg in configs.items():
        metadata[f"farm.{name}_config"] = json.dumps(cfg, sort_keys=True, default=list)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata)
    return path


def write_checkpoint(path: str | Path, unet: Any, vae: Any, text_encoder: Any) -> Path:
    """Write diffusers SD1 components as one original-layout .safetensors file."""
    from workers.engine.ldm_export import export_clip, export_unet, export_vae

    unet_cfg, vae_cfg = dict(unet.config), dict(vae.config)
    te_cfg = text_encoder.config.to_diff_dict()
    tensors = {
        **export_unet(unet.state_dict(), unet_cfg),
        **export_vae(vae.state_dict(), vae_cfg),
        **export_clip(text_encoder.state_dict()),
    }
    return write_family(path, tensors, "sd1",
                        {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": te_cfg})


def write_sdxl_checkpoint(path: str | Path, unet: Any, vae: Any, text_encoder: Any,
                          text_encoder_2: Any) -> Path:
    """Write diffusers SDXL components as one original-layout .safetensors file, as SDXL
    base 1.0 is published: ``model.diffusion_model.`` (with ``label_emb``),
    ``first_stage_model.``, ``conditioner.embedders.0.transformer.`` (CLIP-L, transformers
    layout) and ``conditioner.embedders.1.model.`` (OpenCLIP bigG layout)."""
    from workers.engine.ldm_export import (
        SDXL_CLIP_PREFIX,
        export_clip,
        export_open_clip,
        export_unet,
        export_vae,
    )

    unet_cfg, vae_cfg = dict(unet.config), dict(vae.config)
    tensors = {
        **export_unet(unet.state_dict(), unet_cfg),
        **export_vae(vae.state_dict(), vae_cfg),
        **export_clip(text_encoder.state_dict(), SDXL_CLIP_PREFIX),
        **export_open_clip(text_encoder_2.state_dict()),
    }
    return write_family(path, tensors, "sdxl", {
        "unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_encoder.config.to_diff_dict(),
        "text_encoder_2": text_encoder_2.config.to_diff_dict()})


def write_flux_checkpoint(path: str | Path, transformer: Any, vae: Any, text_encoder: Any,
                          text_encoder_2: Any) -> Path:
    """Write diffusers/transformers Flux components as one all-in-one .safetensors file:
    ``model.diffusion_model.`` in BFL's layout, ``text_encoders.clip_l.transformer.`` and
    ``text_encoders.t5xxl.transformer.`` in transformers' (T5's input embedding once, as
    ``shared.weight``), ``vae.`` in the original LDM layout."""
    from workers.engine.flux import (
        CLIP_L_PREFIX,
        T5_PREFIX,
        TRANSFORMER_PREFIX,
        VAE_PREFIX,
        transformer_from_diffusers,
    )
    from workers.engine.ldm_export import VAE_PREFIX as LDM_VAE_PREFIX
    from workers.engine.ldm_export import export_clip, export_vae

    tr_cfg, vae_cfg = dict(transformer.config), dict(vae.config)
    bfl = transformer_from_diffusers(transformer.state_dict(), tr_cfg)
    vae_state = export_vae(vae.state_dict(), vae_cfg)
    t5 = {k: v for k, v in text_encoder_2.state_dict().items()
          if k != "encoder.embed_tokens.weight"}
    tensors = {
        **{TRANSFORMER_PREFIX + k: v for k, v in bfl.items()},
        **{VAE_PREFIX + k.removeprefix(LDM_VAE_PREFIX): v for k, v in vae_state.items()},
        **export_clip(text_encoder.state_dict(), CLIP_L_PREFIX + "text_model."),
        **{T5_PREFIX + k: v for k, v in t5.items()},
    }
    return write_family(path, tensors, "flux", {
        "transformer": tr_cfg, "vae": vae_cfg,
        "text_encoder": text_encoder.config.to_diff_dict(),
        "text_encoder_2": text_encoder_2.config.to_diff_dict()})


def write_tiny_checkpoint(path: str | Path, seed: int = 0, inpainting: bool = False) -> Path:
    """Write a tiny random SD1.x checkpoint (deterministic given seed; ``inpainting``: its
    UNet reads 9 channels); returns its path."""
    return write_checkpoint(path, *build_tiny_modules(seed, inpainting))


def write_tiny_sdxl_checkpoint(path: str | Path, seed: int = 0,
                               inpainting: bool = False) -> Path:
    """Write a tiny random SDXL checkpoint (deterministic given seed; ``inpainting``: its
    UNet reads 9 channels); returns its path."""
    return write_sdxl_checkpoint(path, *build_tiny_sdxl_modules(seed, inpainting))


def write_tiny_flux_checkpoint(path: str | Path, seed: int = 0, guidance: bool = True) -> Path:
    """Write a tiny random all-in-one Flux checkpoint (dev-like; schnell-like without
    ``guidance``) and its T5 tokenizer in ``t5_tokenizer_dir(path)``; returns its path."""
    path = write_flux_checkpoint(path, *build_tiny_flux_modules(seed, guidance))
    write_tiny_t5_tokenizer(t5_tokenizer_dir(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write a tiny random checkpoint")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=("sd1", "sdxl", "flux"), default="sd1")
    parser.add_argument("--inpainting", action="store_true",
                        help="an inpainting checkpoint (SD1, SDXL): its UNet reads 9 channels")
    args = parser.parse_args(argv)
    if args.inpainting and args.family == "flux":
        parser.error("--inpainting: SD1 and SDXL checkpoints only")
    if args.family == "sd1":
        print(write_tiny_checkpoint(args.out, args.seed, args.inpainting))
    elif args.family == "sdxl":
        print(write_tiny_sdxl_checkpoint(args.out, args.seed, args.inpainting))
    else:
        print(write_tiny_flux_checkpoint(args.out, args.seed))
    if args.family == "flux":  # the engine reads it from FARM_FLUX_T5_TOKENIZER
        print(t5_tokenizer_dir(args.out))


if __name__ == "__main__":
    main()
