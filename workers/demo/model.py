"""The demo model's architecture: a miniature Stable Diffusion 1.x.

Same component classes as SD1.5 (``AutoencoderKL``, ``UNet2DConditionModel`` with
cross-attention, ``CLIPTextModel`` on the real 49,408-token CLIP tokenizer), only smaller:
64x64 pixels, a VAE that downsamples by 4 into 16x16x4 latents, a UNet of 64/96/96
channels and a 3-layer CLIP text encoder of width 128. ``SMOKE_*`` are smaller still, for
the training script's smoke configuration.
"""

from __future__ import annotations

from typing import Any

IMAGE_SIZE = 64
LATENT_CHANNELS = 4

VAE_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "scaling_factor": 1.0,  # set from the trained encoder's latent spread
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 128,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "layers_per_block": 2,
    "block_out_channels": [64, 96, 96],
    # attention at 8x8 and 4x4 only (at 16x16 it costs 3/4 of a CPU training step); block 1
    # has cross-attention, so the loader finds input_blocks.4.1...attn2 as in SD1
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TEXT_ENCODER_CONFIG["hidden_size"],
    # diffusers reads attention_head_dim as the number of heads (SD1 naming): head width 32
    "attention_head_dim": [2, 3, 3],
    "norm_num_groups": 32,
}
# Stable Diffusion's training noise schedule, written into the checkpoint's metadata
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}

SMOKE_VAE_CONFIG: dict[str, Any] = {
    **VAE_CONFIG,
    "block_out_channels": [16, 32, 32],
    "norm_num_groups": 8,
}
SMOKE_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    **TEXT_ENCODER_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "projection_dim": 32,
}
SMOKE_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "layers_per_block": 2,
    "block_out_channels": [32, 32, 32],
    "cross_attention_dim": 32,
    "attention_head_dim": [1, 1, 1],
    "norm_num_groups": 8,
}

# what the demo renders with unless told otherwise
DEFAULT_SAMPLER = "DPM++ 2M"
DEFAULT_STEPS = 20
DEFAULT_CFG_SCALE = 5.0


def build_modules(
    vae_config: dict[str, Any], unet_config: dict[str, Any], text_encoder_config: dict[str, Any]
) -> tuple[Any, Any, Any]:
    """(vae, unet, text_encoder) with fresh weights from the current torch RNG."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL.from_config(vae_config)
    unet = UNet2DConditionModel.from_config(unet_config)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config))
    return vae, unet, text_encoder


def count_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())
