"""Tiny random-weight SD1.x and SDXL checkpoints in the original single-file layout, for
tests.

SD1: UNet 32/64 channels, VAE 32/64, CLIP text encoder hidden 32 with 2 layers and the real
49,408-token vocabulary, cross-attention 32. SDXL (about 6.6 MB): UNet 16/32 with 1 and 2
transformer layers and the ``text_time`` added conditioning, VAE 16/32, a CLIP-L-like text
encoder of width 8 and an OpenCLIP-bigG-like one of width 12 with a projection to 10 (3
layers each, the real vocabulary), so cross-attention 8 + 12 = 20. The diffusers configs
travel in the file's safetensors metadata (``farm.*_config``), so the loader needs nothing
else. Both render 64x64 (32x32 latents: these VAEs downsample by 2, not 8).

    python -m workers.engine.tiny OUT.safetensors [--seed N] [--family sd1|sdxl]
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


def build_tiny_modules(seed: int = 0) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) diffusers/transformers modules with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(TINY_UNET)
        vae = AutoencoderKL.from_config(TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    return unet.eval(), vae.eval(), text_encoder.eval()


def build_tiny_sdxl_modules(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """(unet, vae, text_encoder, text_encoder_2) of a tiny SDXL, seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(TINY_SDXL_UNET)
        vae = AutoencoderKL.from_config(TINY_SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_2))
    return unet.eval(), vae.eval(), text_encoder.eval(), text_encoder_2.eval()


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
    metadata = {
        "farm.family": "sd1",
        "farm.unet_config": json.dumps(unet_cfg, sort_keys=True, default=list),
        "farm.vae_config": json.dumps(vae_cfg, sort_keys=True, default=list),
        "farm.text_encoder_config": json.dumps(te_cfg, sort_keys=True, default=list),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata)
    return path


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
    metadata = {
        "farm.family": "sdxl",
        "farm.unet_config": json.dumps(unet_cfg, sort_keys=True, default=list),
        "farm.vae_config": json.dumps(vae_cfg, sort_keys=True, default=list),
        "farm.text_encoder_config": json.dumps(text_encoder.config.to_diff_dict(),
                                               sort_keys=True, default=list),
        "farm.text_encoder_2_config": json.dumps(text_encoder_2.config.to_diff_dict(),
                                                 sort_keys=True, default=list),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata)
    return path


def write_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD1.x checkpoint (deterministic given seed); returns its path."""
    return write_checkpoint(path, *build_tiny_modules(seed))


def write_tiny_sdxl_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL checkpoint (deterministic given seed); returns its path."""
    return write_sdxl_checkpoint(path, *build_tiny_sdxl_modules(seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write a tiny random checkpoint")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    args = parser.parse_args(argv)
    write = write_tiny_sdxl_checkpoint if args.family == "sdxl" else write_tiny_checkpoint
    print(write(args.out, args.seed))


if __name__ == "__main__":
    main()
