import hashlib
import json
import struct

import pytest
import torch

from workers.engine.base import EngineError
from workers.engine.loader import SD_ATTN2_KEY, load_engine, probe_family
from workers.engine.tiny import main as tiny_main
from workers.engine.tiny import write_tiny_checkpoint


def fake_safetensors(path, shapes: dict[str, list[int]]):
    """A header-valid .safetensors file with zero-filled float32 tensors."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def test_round_trip_state_dicts_equal(tiny_modules, engine):
    for original, loaded in zip(
        tiny_modules, (engine.unet, engine.vae, engine.text_encoder), strict=True
    ):
        a, b = original.state_dict(), loaded.state_dict()
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_probe_tiny_is_sd1(tiny_path, engine):
    assert probe_family(tiny_path) == "sd1"
    assert engine.family == "sd1" and engine.device == "cpu"
    assert engine.dtype == torch.float32


def test_tiny_checkpoint_is_deterministic(tmp_path, tiny_path):
    a = write_tiny_checkpoint(tmp_path / "a.safetensors", seed=0)
    tiny_main([str(tmp_path / "b.safetensors"), "--seed", "1"])

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(a) == digest(tiny_path)
    assert digest(a) != digest(tmp_path / "b.safetensors")


@pytest.mark.parametrize(
    ("shapes", "family"),
    [
        ({SD_ATTN2_KEY: [320, 768]}, "sd1"),
        ({SD_ATTN2_KEY: [320, 1024]}, "sd2"),
        ({SD_ATTN2_KEY: [640, 2048], "conditioner.embedders.1.model.ln_final.weight": [4]}, "sdxl"),
        ({SD_ATTN2_KEY: [384, 1280]}, "sdxl-refiner"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": [128]}, "flux"),
    ],
)
def test_probe_families(tmp_path, shapes, family):
    assert probe_family(fake_safetensors(tmp_path / "m.safetensors", shapes)) == family


# the all-in-one Flux checkpoint (Forge, ComfyUI): its transformer under SD's UNet prefix
FLUX_ALL_IN_ONE = {
    "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": [128],
    "model.diffusion_model.single_blocks.0.linear2.weight": [4, 4],
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": [768],
    "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": [4096],
    "vae.decoder.conv_out.weight": [3, 128, 3, 3],
}


@pytest.mark.parametrize(
    "shapes",
    [FLUX_ALL_IN_ONE, {"double_blocks.0.img_attn.norm.key_norm.scale": [128]}],
)
def test_flux_files_probe_as_flux_for_worker_and_farm(tmp_path, shapes):
    from farm.models import probe_engine

    path = fake_safetensors(tmp_path / "flux.safetensors", shapes)
    assert probe_family(path) == "flux" == probe_engine(path)


def test_unsupported_family_is_a_clear_error(tmp_path):
    path = fake_safetensors(tmp_path / "big.safetensors", {SD_ATTN2_KEY: [384, 1280]})
    with pytest.raises(EngineError, match=r"big\.safetensors: family sdxl-refiner not supported"):
        load_engine(path)


def test_transformer_only_flux_file_names_what_it_lacks(tmp_path):
    """BFL's flux1-dev.safetensors holds the transformer only: the engine says which parts
    of an all-in-one file are missing, before it reads any tensor."""
    bare = {"double_blocks.0.img_attn.norm.key_norm.scale": [128]}
    path = fake_safetensors(tmp_path / "flux1-dev.safetensors", bare)
    match = (
        r"flux1-dev\.safetensors: not an all-in-one Flux checkpoint, it lacks text encoder "
        r"CLIP-L .*, text encoder T5-XXL .*, the VAE"
    )
    with pytest.raises(EngineError, match=match):
        load_engine(path)


def test_garbage_and_missing_files(tmp_path):
    garbage = tmp_path / "junk.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(EngineError, match="junk.safetensors is not a readable .safetensors"):
        probe_family(garbage)
    with pytest.raises(EngineError, match="does not exist"):
        load_engine(tmp_path / "nope.safetensors")
    unknown = fake_safetensors(tmp_path / "other.safetensors", {"encoder.weight": [2, 2]})
    with pytest.raises(EngineError, match="not a recognised diffusion checkpoint"):
        load_engine(unknown)


def test_weights_not_matching_config(tmp_path, tiny_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_path))
    del state["model.diffusion_model.out.2.weight"]
    from safetensors import safe_open

    with safe_open(str(tiny_path), "pt") as f:
        metadata = f.metadata()
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata=metadata)
    with pytest.raises(EngineError, match="UNet weights do not fit its config: 1 missing"):
        load_engine(broken)
