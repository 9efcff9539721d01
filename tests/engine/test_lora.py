"""LoRA on the SD1 engine: kohya-layout files written here with random low-rank factors
over UNet attention and convolution layers and a text-encoder layer of the tiny random
checkpoint, merged into its weights and removed again."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from workers.engine.base import BatchRequest, EngineError, ImageRequest, LoraRequest

# (component, dotted module name): two attention projections, a 1x1 and a 3x3 convolution
UNET_LAYERS = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("unet", "up_blocks.0.attentions.1.proj_in"),
    ("unet", "down_blocks.0.resnets.0.conv1"),
]
TE_LAYERS = [("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")]
# their original-layout (LDM) names, as some kohya files give them (layers_per_block 2)
LDM_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k":
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q":
        "middle_block.1.transformer_blocks.0.attn1.to_q",
    "up_blocks.0.attentions.1.proj_in": "output_blocks.1.1.proj_in",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
}  # fmt: skip

Layer = tuple[str, str]
Factors = dict[Layer, tuple[torch.Tensor, torch.Tensor, float]]


def module(engine: Any, layer: Layer) -> torch.nn.Module:
    component, dotted = layer
    root = getattr(engine, component)
    if component == "text_encoder" and not hasattr(root, "text_model"):
        dotted = dotted.removeprefix("text_model.")  # transformers >= 5.6 layout
    return root.get_submodule(dotted)


def kohya_name(layer: Layer, ldm: bool = False) -> str:
    component, dotted = layer
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    return prefix + (LDM_NAMES[dotted] if ldm else dotted).replace(".", "_")


def make_factors(
    shapes: Mapping[Layer, Sequence[int]], rank: int = 4, alpha: float = 2.0, seed: int = 0,
    std: float = 0.3,
) -> Factors:  # fmt: skip
    """Random (down, up, alpha) for each layer of the given weight shape: a conv layer's
    down factor carries its kernel, its up factor is 1x1, as kohya writes them."""
    gen = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for layer, shape in shapes.items():
        out_ch, in_ch, *kernel = shape
        down = torch.randn((rank, in_ch, *kernel), generator=gen) * std
        up = torch.randn((out_ch, rank, *([1] * len(kernel))), generator=gen) * std
        out[layer] = (down, up, alpha)
    return out


def save_lora(path: Path, factors: Factors, style: str = "kohya") -> Path:
    """Write ``factors`` as a LoRA file: ``kohya`` (lora_down/lora_up/alpha), ``ldm``
    (kohya with original-layout UNet names) or ``peft`` (unet.<path>.lora_A/lora_B)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for layer, (down, up, alpha) in factors.items():
        if style == "peft":
            component, dotted = layer
            base = f"{component}.{dotted}"
            tensors[f"{base}.lora_A.weight"] = down.contiguous()
            tensors[f"{base}.lora_B.weight"] = up.contiguous()
            tensors[f"{base}.alpha"] = torch.tensor(alpha)
        else:
            base = kohya_name(layer, ldm=style == "ldm" and layer[0] == "unet")
            tensors[f"{base}.lora_down.weight"] = down.contiguous()
            tensors[f"{base}.lora_up.weight"] = up.contiguous()
            tensors[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def write_lora(
    path: Path, shapes: Mapping[Layer, Sequence[int]], seed: int = 0, style: str = "kohya"
) -> tuple[Path, Factors]:
    factors = make_factors(shapes, seed=seed)
    return save_lora(path, factors, style), factors


def shapes_of(engine: Any, layers: Sequence[Layer]) -> dict[Layer, tuple[int, ...]]:
    return {layer: tuple(module(engine, layer).weight.shape) for layer in layers}


def snapshot(engine: Any) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{k}": v.detach().clone()
        for part in ("unet", "text_encoder")
        for k, v in getattr(engine, part).state_dict().items()
    }


def same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    """The names whose tensors are not bit-for-bit equal."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def batch(*loras: LoraRequest) -> BatchRequest:
    images = (ImageRequest("a red fox", "blurry", 11), ImageRequest("a blue jay", "", 12))
    return BatchRequest(images, 32, 32, 3, 5.0, "Euler", "Automatic", loras=tuple(loras))


def pixels(images: list[Any]) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in images]


@pytest.fixture(scope="module")
def engine(tiny_path: Path) -> Iterator[Any]:
    """An engine of its own: these tests change its weights. One torch thread: the tiny
    renders need no more, and spare threads spin for a busy CPU (0.2 s a render, 1-9 s
    with two threads on two cores that other processes keep busy)."""
    from workers.engine.loader import load_engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_engine(tiny_path)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(engine: Any) -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
    """The model's own weights and images (rendered before any LoRA)."""
    return snapshot(engine), pixels(engine.render(batch()))


@pytest.fixture
def clean(engine: Any, base: Any) -> Iterator[Any]:
    yield engine
    engine.apply_loras(())


@pytest.fixture(scope="module")
def unet_lora(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Factors]:
    path = tmp_path_factory.mktemp("lora") / "unet.safetensors"
    return write_lora(path, shapes_of(engine, UNET_LAYERS + TE_LAYERS), seed=1)


def test_the_file_written_is_kohya_layout(unet_lora: tuple[Path, Factors]) -> None:
    from safetensors import safe_open

    with safe_open(str(unet_lora[0]), framework="pt") as f:
        keys = set(f.keys())
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys


def test_weight_zero_renders_the_base_images(clean: Any, base: Any, unet_lora: Any) -> None:
    weights, images = base
    got = pixels(clean.render(batch(LoraRequest("style", str(unet_lora[0]), 0.0))))
    assert all(np.array_equal(a, b) for a, b in zip(got, images, strict=True))
    assert same_weights(snapshot(clean), weights) == []


def test_weight_one_changes_the_images_and_removing_restores_bit_for_bit(
    clean: Any, base: Any, unet_lora: Any
) -> None:
    weights, images = base
    got = pixels(clean.render(batch(LoraRequest("style", str(unet_lora[0]), 1.0))))
    assert all(np.abs(a - b).max() > 2 for a, b in zip(got, images, strict=True))
    # exactly the layers of the file changed
    changed = same_weights(snapshot(clean), weights)
    touched = {f"{c}.{d}.weight" for c, d in UNET_LAYERS + TE_LAYERS}
    assert {k.replace(".text_model.", ".") for k in changed} == {
        k.replace(".text_model.", ".") for k in touched
    }
    # a batch without LoRAs restores the model's own weights, bit for bit
    again = pixels(clean.render(batch()))
    assert same_weights(snapshot(clean), weights) == []
    assert all(np.array_equal(a, b) for a, b in zip(again, images, strict=True))


def test_the_merged_weight_is_w_plus_scale_up_down(clean: Any, base: Any, tmp_path: Path) -> None:
    weights, _ = base
    for rank, alpha, weight in ((4, 2.0, 0.7), (2, 0.0, -1.5)):  # alpha 0: scale = weight
        factors = make_factors(shapes_of(clean, UNET_LAYERS + TE_LAYERS), rank, alpha, seed=5)
        path = save_lora(tmp_path / f"r{rank}.safetensors", factors)
        clean.apply_loras((LoraRequest("f", str(path), weight),))
        for layer, (down, up, a) in factors.items():
            before = module(clean, layer).weight.detach().clone()
            key = f"{layer[0]}.{layer[1]}.weight"
            w0 = weights.get(key, weights.get(key.replace(".text_model.", ".")))
            assert w0 is not None
            if down.ndim == 4:  # sum over the rank of up[o, r] * down[r, i, kh, kw]
                prod = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            else:
                prod = torch.einsum("or,ri->oi", up, down)
            expected = w0 + weight * (a or rank) / rank * prod
            assert torch.allclose(before, expected, atol=1e-5, rtol=1e-5), layer
            assert not torch.equal(before, w0)


def test_applying_the_same_set_again_changes_nothing(clean: Any, base: Any, unet_lora: Any) -> None:
    lora = (LoraRequest("style", str(unet_lora[0]), 0.8),)
    clean.apply_loras(lora)
    once = snapshot(clean)
    assert clean.loras.apply(lora) is False  # nothing to do
    clean.apply_loras(lora)
    assert same_weights(snapshot(clean), once) == []  # not merged twice
    clean.apply_loras(())
    assert same_weights(snapshot(clean), base[0]) == []


def test_switching_sets_restores_then_merges_without_drift(
    clean: Any, base: Any, unet_lora: Any, tmp_path: Path
) -> None:
    other, _ = write_lora(tmp_path / "b.safetensors", shapes_of(clean, UNET_LAYERS[:2]), seed=9)
    a = (LoraRequest("a", str(unet_lora[0]), 1.0),)
    b = (LoraRequest("b", str(other), 1.0),)
    clean.apply_loras(b)
    b_alone = snapshot(clean)
    for _ in range(3):
        clean.apply_loras(a)
        clean.apply_loras(b)
    assert same_weights(snapshot(clean), b_alone) == []
    clean.apply_loras(())
    assert same_weights(snapshot(clean), base[0]) == []


def test_two_loras_apply_together(clean: Any, base: Any, tmp_path: Path) -> None:
    weights, images = base
    shared = UNET_LAYERS[0]
    fa = make_factors(shapes_of(clean, [shared, UNET_LAYERS[1]]), seed=2)
    fb = make_factors(shapes_of(clean, [shared, *TE_LAYERS]), seed=3)
    a = LoraRequest("a", str(save_lora(tmp_path / "a.safetensors", fa)), 0.5)
    b = LoraRequest("b", str(save_lora(tmp_path / "b.safetensors", fb)), -1.0)
    both = pixels(clean.render(batch(a, b)))
    merged = module(clean, shared).weight.detach().clone()
    only_a = pixels(clean.render(batch(a)))
    only_b = pixels(clean.render(batch(b)))
    for x, y, z, w in zip(both, only_a, only_b, images, strict=True):
        assert not np.array_equal(x, y) and not np.array_equal(x, z) and not np.array_equal(x, w)
    w0 = weights[f"unet.{shared[1]}.weight"]
    (da, ua, alpha), (db, ub, _) = fa[shared], fb[shared]
    expected = w0 + 0.5 * alpha / 4 * (ua @ da) - 1.0 * alpha / 4 * (ub @ db)
    assert torch.allclose(merged, expected, atol=1e-5, rtol=1e-5)


def test_a_text_encoder_only_lora_changes_the_images(clean: Any, base: Any, tmp_path: Path) -> None:
    _, images = base
    path, _ = write_lora(tmp_path / "te.safetensors", shapes_of(clean, TE_LAYERS), seed=4)
    clean.render(batch())  # the cross-attention caches hold the base context now
    before = clean.encode_prompts(["a red fox"])
    got = pixels(clean.render(batch(LoraRequest("te", str(path), 1.0))))
    assert not torch.equal(clean.encode_prompts(["a red fox"]), before)
    assert all(not np.array_equal(a, b) for a, b in zip(got, images, strict=True))
    unet_changed = [k for k in same_weights(snapshot(clean), base[0]) if k.startswith("unet.")]
    assert unet_changed == []


@pytest.mark.parametrize("style", ["peft", "ldm"])
def test_peft_and_original_layout_names_merge_like_kohya(
    clean: Any, style: str, tmp_path: Path
) -> None:
    factors = make_factors(shapes_of(clean, UNET_LAYERS + TE_LAYERS), seed=6)
    kohya = save_lora(tmp_path / "kohya.safetensors", factors)
    other = save_lora(tmp_path / f"{style}.safetensors", factors, style)
    clean.apply_loras((LoraRequest("k", str(kohya), 1.0),))
    want = snapshot(clean)
    clean.apply_loras((LoraRequest("o", str(other), 1.0),))
    assert same_weights(snapshot(clean), want) == []


def test_a_file_matching_nothing_raises_naming_it(clean: Any, base: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    def lora(name: str, tensors: dict[str, torch.Tensor]) -> LoraRequest:
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        return LoraRequest(name, str(path), 1.0)

    rank_4 = {"lora_down.weight": torch.ones(4, 64), "lora_up.weight": torch.ones(64, 4)}
    nowhere = lora("nowhere", {f"lora_unet_no_such_layer.{k}": v for k, v in rank_4.items()})
    # the right name, the shape of a bigger model's layer (SDXL's 2048-wide context)
    wide = {"lora_down.weight": torch.ones(4, 2048), "lora_up.weight": torch.ones(64, 4)}
    name = kohya_name(UNET_LAYERS[0])
    misfit = lora("misfit", {f"{name}.{k}": v for k, v in wide.items()})
    loha = lora("loha", {f"{name}.hada_w1_a": torch.ones(64, 4)})
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    unreadable = LoraRequest("garbage", str(garbage), 1.0)
    for request, words in (
        (nowhere, "1 of its 1 layers name none"),
        (misfit, "1 have another shape"),
        (loha, "no LoRA layer"),
        (unreadable, "not a readable"),
    ):
        with pytest.raises(EngineError, match=f"LoRA '{request.name}'") as info:
            clean.render(batch(request))
        assert Path(request.path).name in str(info.value) and words in str(info.value)
    assert same_weights(snapshot(clean), base[0]) == []  # nothing was changed


def test_a_partial_match_applies_what_matches_and_logs_the_rest(
    clean: Any, base: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import save_file

    factors = make_factors(shapes_of(clean, UNET_LAYERS[:1]), seed=7)
    path = save_lora(tmp_path / "part.safetensors", factors)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.ones(4, 8)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.ones(8, 4)
    tensors["lora_unet_no_such_layer.alpha"] = torch.tensor(4.0)
    tensors[f"{kohya_name(UNET_LAYERS[1])}.dora_scale"] = torch.ones(1, 64)
    save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING, logger="farm.engine"):
        clean.apply_loras((LoraRequest("part", str(path), 1.0),))
    assert same_weights(snapshot(clean), base[0]) == [f"unet.{UNET_LAYERS[0][1]}.weight"]
    assert "1 of its 2 layers applied; 4 keys not applied" in caplog.text


def test_fp16_weights_merge_in_float32_and_restore_exactly(tmp_path: Path) -> None:
    from workers.engine.lora import MergedLoras, module_index

    layer = torch.nn.Linear(48, 40).half()
    original = layer.weight.detach().clone()
    factors = make_factors({("unet", "proj"): (40, 48)}, seed=8)
    path = save_lora(tmp_path / "half.safetensors", factors)
    merged = MergedLoras(lambda: module_index("lora_unet", torch.nn.ModuleDict({"proj": layer})))
    assert merged.apply((LoraRequest("h", str(path), 1.0),)) is True
    down, up, alpha = factors[("unet", "proj")]
    expected = (original.float() + alpha / 4 * (up @ down)).half()
    assert layer.weight.dtype == torch.float16 and torch.equal(layer.weight, expected)
    merged.apply(())
    assert torch.equal(layer.weight, original)
