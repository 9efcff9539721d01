"""A tiny random-weight SD1.x checkpoint in the original single-file layout, for tests.

UNet 32/64 channels, VAE 32/64, CLIP text encoder hidden 32 with 2 layers and the real
49,408-token vocabulary, cross-attention 32. The diffusers configs travel in the file's
safetensors metadata (``farm.*_config``), so the loader needs nothing else. Renders 64x64
(32x32 latents: this VAE downsamples by 2, not 8).

    python -m workers.engine.tiny OUT.safetensors [--seed N]
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


def write_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD1.x checkpoint (deterministic given seed); returns its path."""
    return write_checkpoint(path, *build_tiny_modules(seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write a tiny random SD1.x checkpoint")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_checkpoint(args.out, args.seed))


if __name__ == "__main__":
    main()
