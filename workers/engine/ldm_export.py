"""diffusers -> original ("LDM") single-file layout, for SD1.x and SDXL components.

diffusers ships converters only from the original layout; this is the inverse, used to
write test checkpoints. Round trip: ``convert_ldm_*_checkpoint(export(sd)) == sd`` (and
``convert_open_clip_checkpoint(export_open_clip(sd)) == sd`` for SDXL's second encoder).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # CLIP ViT-L, HF layout
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG layout

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + size conditioning
    "add_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
    "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key(key: str, config: Mapping[str, Any]) -> str:
    """Original-layout name (without prefix) of one diffusers UNet2DConditionModel key."""
    per = config["layers_per_block"] + 1  # resnets (+ attentions) and one down/upsampler
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    for old, new in _UNET_FIXED.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{block * per + j + 1}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"input_blocks.{block * per + j + 1}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{block * per + j}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"output_blocks.{block * per + j}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if up_has_attn[block] else 1
        return f"output_blocks.{block * per + per - 1}.{slot}.conv.{m[2]}"
    raise KeyError(f"no original-layout name for UNet key {key!r}")


def vae_key(key: str, config: Mapping[str, Any]) -> str:
    """Original-layout name (without prefix) of one diffusers AutoencoderKL key."""
    n_up = len(config["up_block_types"])
    key = key.replace("conv_norm_out.", "norm_out.")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        rest = m[3].replace("conv_shortcut.", "nin_shortcut.")
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{rest}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTN)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut.', 'nin_shortcut.')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        rest = m[3].replace("conv_shortcut.", "nin_shortcut.")
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{rest}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


def export_unet(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    return {UNET_PREFIX + unet_key(k, config): v for k, v in state.items()}


def export_vae(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        name = vae_key(k, config)
        if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[VAE_PREFIX + name] = v
    return out


def export_clip(state: Mapping[str, Tensor], prefix: str = CLIP_PREFIX) -> dict[str, Tensor]:
    """transformers >= 5 flattens CLIPTextModel (no ``text_model.``); older ones keep it.
    ``prefix`` is SD1's by default, ``SDXL_CLIP_PREFIX`` for SDXL's first text encoder."""
    return {prefix + k.removeprefix("text_model."): v for k, v in state.items()
            if not k.endswith("position_ids")}


_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def export_open_clip(state: Mapping[str, Tensor],
                     prefix: str = SDXL_OPEN_CLIP_PREFIX) -> dict[str, Tensor]:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's ViT-bigG):
    q/k/v projections stacked into one ``attn.in_proj_*``, the projection stored as the
    matrix the pooled output is multiplied by (``x @ text_projection``, the transpose of the
    linear layer's weight), and ``logit_scale``, which OpenCLIP checkpoints carry."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[key]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            out[f"transformer.resblocks.{m[1]}.{_rename_head(m[2], _OPEN_CLIP_LAYER)}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for (layer, kind), parts in qkv.items():
        stacked = torch.cat([parts["q"], parts["k"], parts["v"]])
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = stacked
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return {prefix + k: v for k, v in out.items()}
