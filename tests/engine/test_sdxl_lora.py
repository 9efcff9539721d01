"""LoRA on the SDXL engine: files written here with random low-rank factors over UNet layers
(named in the original layout as kohya's SDXL trainer writes them, or with their diffusers
names), CLIP-L's ``lora_te1_`` and OpenCLIP bigG's ``lora_te2_`` layers, and peft files,
merged into the tiny random SDXL checkpoint's weights and removed again; LoRAs made for
another family refused by the SDXL and the SD1 engine; the registry's side."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from workers.engine.base import BatchRequest, ImageRequest, LoraError, LoraRequest

# (component, dotted diffusers name) -> its original-layout name (layers_per_block 2):
# attention projections of both transformer depths, a feed-forward and a projection layer,
# 3x3 and 1x1 convolutions, the downsampler and SDXL's added (pooled text + size) embedding
UNET_LDM = {
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q":
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k":
        "input_blocks.5.1.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj":
        "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
    "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
    "up_blocks.1.resnets.0.conv_shortcut": "output_blocks.3.0.skip_connection",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "add_embedding.linear_1": "label_emb.0.0",
}  # fmt: skip
UNET_LAYERS = [("unet", name) for name in UNET_LDM]
# layers 0 and 1 of 3: the context is the penultimate hidden states (after layer 1)
TE1_LAYERS = [
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    ("text_encoder", "text_model.encoder.layers.1.mlp.fc1"),
]
TE2_LAYERS = [
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.v_proj"),
    ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc2"),
]
ALL_LAYERS = UNET_LAYERS + TE1_LAYERS + TE2_LAYERS
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
UNET_FILE = "model.diffusion_model."
CLIP_L_FILE = "conditioner.embedders.0.transformer."
OPEN_CLIP_FILE = "conditioner.embedders.1.model."
CLIP_L_WIDTH = 8  # the tiny SDXL's CLIP-L; its bigG is 12 wide (tiny.py)

Layer = tuple[str, str]
Factors = dict[Layer, tuple[torch.Tensor, torch.Tensor, float]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.engine.tiny import write_tiny_sdxl_checkpoint

    return write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny-xl.safetensors")


@pytest.fixture(scope="module")
def xl(sdxl_path: Path) -> Any:
    """An engine of its own: these tests change its weights."""
    from workers.engine.loader import load_engine

    return load_engine(sdxl_path)


@pytest.fixture(scope="module")
def base(xl: Any) -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
    """The model's own weights and images (rendered before any LoRA)."""
    return snapshot(xl), pixels(xl.render(batch()))


@pytest.fixture
def clean(xl: Any, base: Any) -> Iterator[Any]:
    yield xl
    xl.apply_loras(())


def module(engine: Any, layer: Layer) -> torch.nn.Module:
    component, dotted = layer
    root = getattr(engine, component)
    if component.startswith("text_encoder") and not hasattr(root, "text_model"):
        dotted = dotted.removeprefix("text_model.")  # transformers >= 5.6 CLIPTextModel
    return root.get_submodule(dotted)


def kohya_name(layer: Layer, ldm: bool = False) -> str:
    component, dotted = layer
    name = UNET_LDM[dotted] if ldm and component == "unet" else dotted
    return KOHYA_PREFIX[component] + name.replace(".", "_")


def make_factors(
    shapes: Mapping[Layer, Sequence[int]], rank: int = 3, alpha: float = 2.0, seed: int = 0
) -> Factors:
    """Random (down, up, alpha) per layer: a conv layer's down factor carries its kernel,
    its up factor is 1x1, as kohya writes them."""
    gen = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for layer, shape in shapes.items():
        out_ch, in_ch, *kernel = shape
        down = torch.randn((rank, in_ch, *kernel), generator=gen) * 0.4
        up = torch.randn((out_ch, rank, *([1] * len(kernel))), generator=gen) * 0.4
        out[layer] = (down, up, alpha)
    return out


def save_lora(path: Path, factors: Factors, style: str = "kohya") -> Path:
    """``kohya`` (diffusers names with ``_``), ``ldm`` (kohya's SDXL trainer: the UNet in
    the original layout) or ``peft`` (``unet.``/``text_encoder.``/``text_encoder_2.`` with
    lora_A/lora_B)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for layer, (down, up, alpha) in factors.items():
        if style == "peft":
            base, parts = f"{layer[0]}.{layer[1]}", (".lora_A.weight", ".lora_B.weight")
        else:
            base = kohya_name(layer, ldm=style == "ldm")
            parts = (".lora_down.weight", ".lora_up.weight")
        tensors[base + parts[0]] = down.contiguous()
        tensors[base + parts[1]] = up.contiguous()
        tensors[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def shapes_of(engine: Any, layers: Sequence[Layer]) -> dict[Layer, tuple[int, ...]]:
    return {layer: tuple(module(engine, layer).weight.shape) for layer in layers}


def snapshot(engine: Any) -> dict[str, torch.Tensor]:
    parts = [p for p in ("unet", "text_encoder", "text_encoder_2") if hasattr(engine, p)]
    return {
        f"{part}.{k}": v.detach().clone()
        for part in parts
        for k, v in getattr(engine, part).state_dict().items()
    }


def changed(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    """The names whose tensors are not bit-for-bit equal."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def weight_key(engine: Any, layer: Layer) -> str:
    """The layer's weight in ``snapshot`` (transformers >= 5.6 has no CLIP-L text_model)."""
    component, dotted = layer
    if not hasattr(getattr(engine, component), "text_model"):
        dotted = dotted.removeprefix("text_model.")
    return f"{component}.{dotted}.weight"


def batch(*loras: LoraRequest) -> BatchRequest:
    images = (ImageRequest("a red fox", "blurry", 11), ImageRequest("a blue jay", "", 12))
    return BatchRequest(images, 32, 32, 2, 5.0, "Euler", "Automatic", loras=tuple(loras))


def pixels(images: list[Any]) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in images]


# ------------------------------------------------------------------------- the names


def test_kohya_names_name_the_layers_the_checkpoint_file_holds(clean: Any, sdxl_path: Path) -> None:
    """Every UNet Linear/Conv weight of the file, by its original-layout name, and the
    encoders' layers by transformers' names (bigG's read out of OpenCLIP's stacked
    ``in_proj``) name the engine's module that holds exactly that tensor."""
    from safetensors.torch import load_file

    state = load_file(str(sdxl_path))
    index = clean.loras.index
    unet = {k: v for k, v in state.items() if k.startswith(UNET_FILE) and v.ndim in (2, 4)}
    assert len(unet) > 150
    for key, tensor in unet.items():
        name = "lora_unet_" + key[len(UNET_FILE) :].removesuffix(".weight").replace(".", "_")
        assert torch.equal(index[name].weight, tensor), key
    for dotted, ldm in UNET_LDM.items():  # the test's layers: one module by either name
        layer = module(clean, ("unet", dotted))
        assert index[kohya_name(("unet", dotted))] is layer
        assert index[kohya_name(("unet", dotted), ldm=True)] is layer
        assert torch.equal(layer.weight, state[f"{UNET_FILE}{ldm}.weight"])
    te1 = CLIP_L_FILE + "text_model.encoder.layers.{}.{}.weight"
    assert torch.equal(
        index["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].weight,
        state[te1.format(0, "self_attn.q_proj")],
    )
    assert torch.equal(
        index["lora_te1_text_model_encoder_layers_2_mlp_fc2"].weight,
        state[te1.format(2, "mlp.fc2")],
    )
    in_proj = state[OPEN_CLIP_FILE + "transformer.resblocks.1.attn.in_proj_weight"]
    q, k, v = in_proj.chunk(3)
    for part, want in (("q", q), ("k", k), ("v", v)):
        got = index[f"lora_te2_text_model_encoder_layers_1_self_attn_{part}_proj"].weight
        assert torch.equal(got, want), part
    assert torch.equal(
        index["lora_te2_text_model_encoder_layers_2_mlp_fc1"].weight,
        state[OPEN_CLIP_FILE + "transformer.resblocks.2.mlp.c_fc.weight"],
    )
    assert torch.equal(  # OpenCLIP stores the projection as x @ P: the Linear's weight is P.T
        index["lora_te2_text_projection"].weight,
        state[OPEN_CLIP_FILE + "text_projection"].T,
    )
    assert not any(name.startswith("lora_te_") for name in index)  # SD1's encoder prefix


# ------------------------------------------------------------- merging and restoring


@pytest.fixture(scope="module")
def full_lora(xl: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Factors]:
    """Every test layer, kohya's SDXL layout (original-layout UNet names)."""
    factors = make_factors(shapes_of(xl, ALL_LAYERS), seed=1)
    return save_lora(tmp_path_factory.mktemp("lora") / "xl.safetensors", factors, "ldm"), factors


def test_weight_zero_renders_the_base_images(clean: Any, base: Any, full_lora: Any) -> None:
    weights, images = base
    got = pixels(clean.render(batch(LoraRequest("style", str(full_lora[0]), 0.0))))
    assert all(np.array_equal(a, b) for a, b in zip(got, images, strict=True))
    assert changed(snapshot(clean), weights) == []


def test_weight_one_changes_the_images_and_removing_restores_bit_for_bit(
    clean: Any, base: Any, full_lora: Any
) -> None:
    weights, images = base
    got = pixels(clean.render(batch(LoraRequest("style", str(full_lora[0]), 1.0))))
    assert all(np.abs(a - b).max() > 2 for a, b in zip(got, images, strict=True))
    # exactly the layers of the file changed, in all three parts
    assert set(changed(snapshot(clean), weights)) == {weight_key(clean, x) for x in ALL_LAYERS}
    again = pixels(clean.render(batch()))
    assert changed(snapshot(clean), weights) == []
    assert all(np.array_equal(a, b) for a, b in zip(again, images, strict=True))


def test_the_merged_weight_is_w_plus_scale_up_down(clean: Any, base: Any, tmp_path: Path) -> None:
    weights, _ = base
    for rank, alpha, weight in ((3, 2.0, 0.7), (2, 0.0, -1.5)):  # alpha 0: scale = weight
        factors = make_factors(shapes_of(clean, ALL_LAYERS), rank, alpha, seed=5)
        path = save_lora(tmp_path / f"r{rank}.safetensors", factors, "ldm")
        clean.apply_loras((LoraRequest("f", str(path), weight),))
        for layer, (down, up, a) in factors.items():
            got = module(clean, layer).weight.detach()
            w0 = weights[weight_key(clean, layer)]
            if down.ndim == 4:  # sum over the rank of up[o, r] * down[r, i, kh, kw]
                prod = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            else:
                prod = torch.einsum("or,ri->oi", up, down)
            expected = w0 + weight * (a or rank) / rank * prod
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), layer
            assert not torch.equal(got, w0)


@pytest.mark.parametrize("style", ["kohya", "peft"])
def test_diffusers_names_and_peft_files_merge_like_kohyas_sdxl_layout(
    clean: Any, full_lora: Any, style: str, tmp_path: Path
) -> None:
    path, factors = full_lora
    clean.apply_loras((LoraRequest("ldm", str(path), 0.8),))
    want = snapshot(clean)
    other = save_lora(tmp_path / f"{style}.safetensors", factors, style)
    clean.apply_loras((LoraRequest(style, str(other), 0.8),))
    assert changed(snapshot(clean), want) == []


def test_each_encoders_lora_changes_its_own_part_of_the_context(
    clean: Any, base: Any, tmp_path: Path
) -> None:
    """CLIP-L's layers (te1) feed the first 8 columns of the context and not the pooled
    text, bigG's (te2) the other 12 and the pooled text."""
    _, images = base
    context, pooled = clean.encode_prompts(["a red fox"])
    for name, layers, cols in (("te1", TE1_LAYERS, 0), ("te2", TE2_LAYERS, 1)):
        factors = make_factors(shapes_of(clean, layers), seed=4)
        for style in ("kohya", "peft"):
            path = save_lora(tmp_path / f"{name}-{style}.safetensors", factors, style)
            clean.apply_loras((LoraRequest(name, str(path), 1.0),))
            got, got_pooled = clean.encode_prompts(["a red fox"])
            halves = got.split([CLIP_L_WIDTH, got.shape[-1] - CLIP_L_WIDTH], dim=-1)
            base_halves = context.split([CLIP_L_WIDTH, got.shape[-1] - CLIP_L_WIDTH], dim=-1)
            assert not torch.equal(halves[cols], base_halves[cols]), (name, style)
            assert torch.equal(halves[1 - cols], base_halves[1 - cols]), (name, style)
            assert torch.equal(got_pooled, pooled) == (name == "te1"), (name, style)
        # the images change too: the cross-attention caches hold no stale keys and values
        got_images = pixels(clean.render(batch(LoraRequest(name, str(path), 1.0))))
        assert all(not np.array_equal(a, b) for a, b in zip(got_images, images, strict=True))
        unet = [k for k in changed(snapshot(clean), base[0]) if k.startswith("unet.")]
        assert unet == []


def test_two_loras_switch_without_drift(
    clean: Any, base: Any, full_lora: Any, tmp_path: Path
) -> None:
    other = save_lora(
        tmp_path / "b.safetensors", make_factors(shapes_of(clean, ALL_LAYERS[:3]), seed=9)
    )
    a = LoraRequest("a", str(full_lora[0]), 1.0)
    b = LoraRequest("b", str(other), -0.5)
    clean.apply_loras((a, b))
    both = snapshot(clean)
    for _ in range(2):
        clean.apply_loras((b,))
        clean.apply_loras((a, b))
    assert changed(snapshot(clean), both) == []
    clean.apply_loras(())
    assert changed(snapshot(clean), base[0]) == []


# ----------------------------------------------------------- LoRAs of another family


def write(path: Path, tensors: Mapping[str, torch.Tensor]) -> LoraRequest:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return LoraRequest(path.stem, str(path), 1.0)


def kohya_layer(name: str, out: int, inp: int, rank: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(name))
    return {
        f"{name}.lora_down.weight": torch.randn(rank, inp, generator=gen),
        f"{name}.lora_up.weight": torch.randn(out, rank, generator=gen),
        f"{name}.alpha": torch.tensor(float(rank)),
    }


def refused(engine: Any, request: LoraRequest, *words: str) -> None:
    """The render raises naming the LoRA (name and file) and ``words``; nothing changed."""
    before = snapshot(engine)
    with pytest.raises(LoraError, match=f"LoRA '{request.name}'") as info:
        engine.render(batch(request))
    assert Path(request.path).name in str(info.value)
    for w in words:
        assert w in str(info.value)
    assert changed(snapshot(engine), before) == []


def test_an_sd1_lora_is_refused_naming_it(
    clean: Any, base: Any, tiny_modules: Any, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from tests.engine import test_lora

    # the tiny SD1 model's own LoRA (kohya, diffusers names, lora_te_): no shape fits
    sd1_unet, _, sd1_te = tiny_modules
    sd1 = SimpleNamespace(unet=sd1_unet, text_encoder=sd1_te)
    shapes = test_lora.shapes_of(sd1, test_lora.UNET_LAYERS + test_lora.TE_LAYERS)
    path = test_lora.save_lora(tmp_path / "sd1.safetensors", test_lora.make_factors(shapes))
    refused(clean, LoraRequest("sd1", str(path), 1.0), "matches no layer", "another model family")
    # real SD1 LoRAs partly fit SDXL by name and shape (SD1's down_blocks.1 attention is
    # SDXL's); its encoder's lora_te_ layers, or a cross-attention layer reading SD1's
    # context width, still say it is SD1's
    attn1 = kohya_name(("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"))
    to_k = kohya_name(("unet", "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"))
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    fits = kohya_layer(attn1, 32, 32)
    with_te = write(tmp_path / "sd1-te.safetensors", {**fits, **kohya_layer(te, 8, 8)})
    refused(clean, with_te, "another model family", "lora_te_", "lora_te1_, lora_te2_, lora_unet_")
    wide = write(tmp_path / "sd1-unet.safetensors", {**fits, **kohya_layer(to_k, 32, 32)})
    refused(clean, wide, "another model family", "text context 32 wide, this model's 20")
    # the same layers at SDXL's own widths apply
    own = write(tmp_path / "own.safetensors", {**fits, **kohya_layer(to_k, 32, 20)})
    clean.apply_loras((own,))
    assert len(changed(snapshot(clean), base[0])) == 2


def test_an_sdxl_lora_on_an_sd1_model_is_refused_naming_it(engine: Any, tmp_path: Path) -> None:
    """The other direction, on the shared tiny SD1 engine (nothing is merged into it)."""
    attn1 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # SD1's (64, 64)
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    request = write(
        tmp_path / "xl.safetensors",
        {**kohya_layer(attn1, 64, 64), **kohya_layer(te1, 32, 32), **kohya_layer(te2, 32, 32)},
    )
    refused(
        engine, request, "another model family", "lora_te1_, lora_te2_", "has lora_te_, lora_unet_"
    )


# ------------------------------------------------------------------------ registry


def test_the_registry_takes_loras_for_sdxl_and_tells_their_family(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from farm.models import LORA_ENGINES, SYNTHETIC_ENTRY, lora_family, no_loras, probe_engine

    assert "sdxl" in LORA_ENGINES and "sd1" in LORA_ENGINES
    assert "sdxl" in no_loras(SYNTHETIC_ENTRY)

    def lora(name: str, layers: dict[str, tuple[int, int]], peft: bool = False) -> Path:
        parts = (
            (".lora_A.weight", ".lora_B.weight")
            if peft
            else (".lora_down.weight", ".lora_up.weight")
        )
        tensors = {}
        for layer, (out, inp) in layers.items():
            tensors[layer + parts[0]] = np.zeros((1, inp), np.float32)
            tensors[layer + parts[1]] = np.zeros((out, 1), np.float32)
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        return path

    sd1_k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    xl_k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v"
    peft_k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    q = "text_model_encoder_layers_0_self_attn_q_proj"
    cases = {
        "sd1": lora("sd1", {sd1_k: (640, 768), f"lora_te_{q}": (768, 768)}),
        "sd2": lora("sd2", {sd1_k: (640, 1024)}),
        "sdxl": lora("xl", {xl_k: (640, 2048), f"lora_te1_{q}": (768, 768)}),
        None: lora(
            "attn1", {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8)}
        ),
    }
    for family, path in cases.items():
        assert probe_engine(path) == "lora"
        assert lora_family(path) == family, path.name
    # encoders alone: bigG says SDXL; a lone CLIP encoder says its width
    assert lora_family(lora("te2", {f"lora_te2_{q}": (1280, 1280)})) == "sdxl"
    assert lora_family(lora("te-sd1", {f"lora_te_{q}": (768, 768)})) == "sd1"
    assert lora_family(lora("te-sd2", {f"lora_te_{q}": (1024, 1024)})) == "sd2"
    assert lora_family(lora("peft", {peft_k: (640, 2048)}, peft=True)) == "sdxl"
    te_peft = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert lora_family(lora("peft-te", {te_peft: (768, 768)}, peft=True)) == "sd1"
