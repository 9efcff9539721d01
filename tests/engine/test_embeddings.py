"""Textual-inversion embeddings in the SD1 and SDXL engines (``workers/engine/embeddings.py``)
on the tiny random models: the encoders' states against the text model run by hand with
the token-embedding rows replaced, chunking at the 75-token boundary, emphasis, SDXL's two
encoders and pooled text, renders (negative prompt, batch independence), the file checks
and Flux's refusal. The torch-free chunking rules are in test_prompts.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from workers.engine.base import (
    AddonError,
    BatchRequest,
    EmbeddingError,
    EmbeddingRequest,
    EngineError,
    HiresRequest,
    ImageRequest,
    LoraError,
    LoraRequest,
)
from workers.engine.prompts import CHUNK_TOKENS
from workers.engine.sd1 import emphasize

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "myemb"  # tokenizes to two ids ("mye", "mb</w>")
UNUSED = (1000, 1001, 1002, 1003)  # vocabulary ids none of the prompts here use


@pytest.fixture(scope="module")
def sdxl_engine(tmp_path_factory):
    from workers.engine.loader import load_engine
    from workers.engine.tiny import write_tiny_sdxl_checkpoint

    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    return load_engine(write_tiny_sdxl_checkpoint(path, seed=0))


@pytest.fixture()
def files(tmp_path):
    """``write(name, **tensors)``: a safetensors file of these tensors, its path."""

    def write(name: str, **tensors: torch.Tensor) -> str:
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return str(path)

    return write


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def tokens(engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False).input_ids


def by_hand(encoder, ids: list[int], rows: dict[int, torch.Tensor]):
    """The encoder's output for one 77-id chunk whose token-embedding rows ``rows`` (vocab
    id -> vector) are replaced in a copy of the model: textual inversion as new words."""
    model = copy.deepcopy(encoder)
    with torch.no_grad():
        for token, vector in rows.items():
            model.get_input_embeddings().weight[token] = vector
        return model(torch.tensor([ids]), output_hidden_states=True)


def chunk_ids(engine, before: str, after: str, n: int, pad: int) -> list[int]:
    """BOS, ``before``'s ids, UNUSED[:n], ``after``'s ids, EOS, ``pad`` to 77."""
    tok = engine.tokenizer
    body = tokens(engine, before) + list(UNUSED[:n]) + tokens(engine, after)
    return [tok.bos_token_id, *body, tok.eos_token_id] + [pad] * (CHUNK_TOKENS - len(body))


# ---------------------------------------------------------------------------- SD1 encoder


def test_sd1_states_are_the_model_with_the_rows_replaced(engine, files):
    vec = vectors(3, 32, seed=1)
    batch = [EmbeddingRequest(NAME, files("e", emb_params=vec))]
    index = engine.embeddings.index(batch)
    chunks = engine.prompt_chunks(f"a photo of {NAME} cat", index)
    assert len(chunks) == 1 and len(chunks[0]) == 77
    got = engine.encode_chunks([chunks])
    ids = chunk_ids(engine, "a photo of", "cat", 3, engine.tokenizer.pad_token_id)
    want = by_hand(engine.text_encoder, ids, dict(zip(UNUSED, vec, strict=False)))
    assert torch.allclose(got[0], want.last_hidden_state[0], atol=1e-5)
    # the name's tokens are gone: 3 positions for the 3 vectors
    assert [t for t in chunks[0] if t in tokens(engine, NAME)] == []
    assert chunks[0][4:7] == [0, 0, 0] and chunks[0].fixes[0][0] == 4


def test_own_token_embeddings_give_the_plain_prompt(engine, files):
    ids = tokens(engine, NAME)
    own = engine.text_encoder.get_input_embeddings().weight[ids].detach().clone()
    prompt = f"a photo of {NAME} cat"
    plain = engine.encode_prompts([prompt])
    same = [EmbeddingRequest(NAME, files("own", emb_params=own))]
    other = [EmbeddingRequest(NAME, files("other", emb_params=vectors(2, 32, seed=2)))]
    with_own = engine.encode_chunks([engine.prompt_chunks(prompt, engine.embeddings.index(same))])
    with_other = engine.encode_chunks(
        [engine.prompt_chunks(prompt, engine.embeddings.index(other))]
    )
    assert torch.allclose(with_own, plain, atol=1e-6)
    assert (with_other - plain).abs().max() > 1e-3


def test_names_not_in_the_batch_are_plain_text(engine, files):
    index = engine.embeddings.index(
        [EmbeddingRequest(NAME, files("e", emb_params=vectors(2, 32, 3)))]
    )
    for prompt in ("a photo of otheremb cat", "a photo of myembs cat", "(mye) mb, a (cat:1.2)"):
        chunks, today = engine.prompt_chunks(prompt, index), engine.prompt_chunks(prompt)
        assert chunks == today and [c.weights for c in chunks] == [c.weights for c in today]
        assert all(not c.fixes for c in chunks)
    assert engine.embeddings.index([]) is None
    # case does not matter (CLIP lowercases), the ids do
    assert engine.prompt_chunks("a MyEmb", index)[0].fixes


def test_an_embedding_never_straddles_two_chunks(engine, files):
    index = engine.embeddings.index(
        [EmbeddingRequest(NAME, files("e", emb_params=vectors(4, 32, 4)))]
    )
    fits = engine.prompt_chunks("cat " * 71 + NAME + " dog", index)
    assert len(fits) == 2 and fits[0].fixes[0][0] == 72 and fits[0][72:76] == [0] * 4
    moved = engine.prompt_chunks("cat " * 72 + NAME + " dog", index)  # 72 + 4 > 75
    assert len(moved) == 2 and not moved[0].fixes
    cat, eos = tokens(engine, "cat")[0], engine.tokenizer.eos_token_id
    assert moved[0][1:74] == [cat] * 72 + [eos]  # closed short
    assert moved[1].fixes[0][0] == 1 and moved[1][1:6] == [0, 0, 0, 0, tokens(engine, "dog")[0]]
    # the second chunk's states are the model's with the rows replaced
    got = engine.encode_chunks([moved])[0, 77:]
    ids = chunk_ids(engine, "", "dog", 4, engine.tokenizer.pad_token_id)
    want = by_hand(
        engine.text_encoder,
        ids,
        dict(zip(UNUSED, index.find(tokens(engine, NAME), 0).vectors[0], strict=False)),
    )
    assert torch.allclose(got, want.last_hidden_state[0], atol=1e-5)


def test_emphasis_scales_the_embeddings_positions(engine, files):
    index = engine.embeddings.index(
        [EmbeddingRequest(NAME, files("e", emb_params=vectors(3, 32, 5)))]
    )
    plain = engine.prompt_chunks(f"a {NAME} cat", index)
    strong = engine.prompt_chunks(f"a ({NAME}:1.5) cat", index)
    assert list(strong[0]) == list(plain[0])
    assert strong[0].weights[:6] == (1.0, 1.0, 1.5, 1.5, 1.5, 1.0)
    got = engine.encode_chunks([strong])
    want = emphasize(engine.encode_chunks([plain]), torch.tensor([strong[0].weights]))
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(
        got, engine.encode_chunks([plain])
    )


def test_a_lora_on_the_text_encoder_composes_with_an_embedding(engine, files):
    vec = vectors(2, 32, seed=13)
    index = engine.embeddings.index([EmbeddingRequest(NAME, files("e", emb_params=vec))])
    chunks = engine.prompt_chunks(f"{NAME} cat", index)
    before = engine.encode_chunks([chunks])
    layer = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    lora = files(
        "lora",
        **{
            f"{layer}.lora_down.weight": vectors(4, 32, 14),
            f"{layer}.lora_up.weight": vectors(32, 4, 15),
            f"{layer}.alpha": torch.tensor(4.0),
        },
    )
    engine.apply_loras([LoraRequest("te", lora, 1.0)])
    try:
        got = engine.encode_chunks([chunks])
        ids = chunk_ids(engine, "", "cat", 2, engine.tokenizer.pad_token_id)
        want = by_hand(engine.text_encoder, ids, dict(zip(UNUSED, vec, strict=False)))
    finally:
        engine.apply_loras([])
    assert torch.allclose(got[0], want.last_hidden_state[0], atol=1e-5)
    assert (got - before).abs().max() > 1e-3
    assert torch.equal(engine.encode_chunks([chunks]), before)


# --------------------------------------------------------------------------- SDXL encoders


def test_sdxl_clip_l_goes_to_clip_l_and_clip_g_to_bigg_and_pooled(sdxl_engine, files):
    e = sdxl_engine
    l1, l2, g1, g2 = vectors(2, 8, 6), vectors(2, 8, 7), vectors(2, 12, 8), vectors(2, 12, 9)
    prompt = f"a photo of {NAME} cat"

    def encode(lv, gv):
        index = e.embeddings.index(
            [EmbeddingRequest(NAME, files(f"x{id(lv)}{id(gv)}", clip_l=lv, clip_g=gv))]
        )
        return e.encode_chunks([e.prompt_chunks(prompt, index)])

    (c11, p11), (c12, p12), (c21, p21) = encode(l1, g1), encode(l1, g2), encode(l2, g1)
    assert (
        torch.equal(c11[..., :8], c12[..., :8]) and (c11[..., 8:] - c12[..., 8:]).abs().max() > 1e-3
    )
    assert (p11 - p12).abs().max() > 1e-3  # pooled text: bigG's, with clip_g
    assert torch.equal(c11[..., 8:], c21[..., 8:]) and torch.equal(p11, p21)
    assert (c11[..., :8] - c21[..., :8]).abs().max() > 1e-3
    # both against the models run by hand (bigG padded with "!" = id 0, pooled at its EOS)
    want_l = by_hand(
        e.text_encoder,
        chunk_ids(e, "a photo of", "cat", 2, e.tokenizer.pad_token_id),
        dict(zip(UNUSED, l1, strict=False)),
    )
    want_g = by_hand(
        e.text_encoder_2,
        chunk_ids(e, "a photo of", "cat", 2, 0),
        dict(zip(UNUSED, g1, strict=False)),
    )
    assert torch.allclose(c11[0, :, :8], want_l.hidden_states[-2][0], atol=1e-5)
    assert torch.allclose(c11[0, :, 8:], want_g.hidden_states[-2][0], atol=1e-5)
    assert torch.allclose(p11[0], want_g.text_embeds[0], atol=1e-5)


# -------------------------------------------------------------------------------- renders


def render_batch(images, embeddings=(), **kw):
    return BatchRequest(
        tuple(images),
        32,
        32,
        kw.pop("steps", 3),
        5.0,
        kw.pop("sampler", "Euler a"),
        "Automatic",
        embeddings=tuple(embeddings),
        **kw,
    )


def px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_sd1_render_negative_embedding_and_batch_independence(engine, files):
    emb = [EmbeddingRequest(NAME, files("neg", emb_params=vectors(3, 32, 10) * 3))]
    own = engine.text_encoder.get_input_embeddings().weight[tokens(engine, NAME)].detach()
    same = [EmbeddingRequest(NAME, files("same", emb_params=own.clone()))]
    me = ImageRequest("a red car", f"{NAME}, blurry", 7)
    others = [ImageRequest("a photo of a cat", "ugly", 8), ImageRequest("a bowl of soup", "", 9)]
    without = engine.render(render_batch([me]))[0]
    identity = engine.render(render_batch([me], same))[0]
    alone = engine.render(render_batch([me], emb))[0]
    together = engine.render(render_batch([others[0], me, others[1]], emb))
    assert np.abs(px(identity) - px(without)).max() <= 1  # the name's own rows: no change
    assert np.abs(px(alone) - px(without)).max() > 1
    assert np.abs(px(together[1]) - px(alone)).max() <= 1
    plain_others = engine.render(render_batch(others))
    assert np.abs(px(together[0]) - px(plain_others[0])).max() <= 1  # not named: unchanged
    # img2img: the same, from a picture
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    kw = {"init_image": picture, "denoising_strength": 0.6}
    i2i_without = engine.render(render_batch([me], **kw))[0]
    i2i_alone = engine.render(render_batch([me], emb, **kw))[0]
    i2i_together = engine.render(render_batch([others[0], me], emb, **kw))
    assert np.abs(px(i2i_alone) - px(i2i_without)).max() > 1
    assert np.abs(px(i2i_together[1]) - px(i2i_alone)).max() <= 1


def test_embeddings_used_are_those_whose_tokens_took_vectors(engine, files):
    """What the render task writes as TI hashes: per image, the embeddings its prompt (and
    negative prompt, unless cfg 1 reads none) took vectors from, on token ids."""
    emb = [
        EmbeddingRequest("other", files("other", emb_params=vectors(1, 32, 3))),
        EmbeddingRequest(NAME, files("mine", emb_params=vectors(2, 32, 4))),
    ]
    images = [
        ImageRequest(f"a ({NAME.upper()}:1.2) car", "other", 1),  # any case, emphasised
        ImageRequest("a car", f"blurry, {NAME}", 2),
        ImageRequest(f"{NAME}s car", "", 3),  # a longer word: other tokens
        ImageRequest("a car", "", 4),
    ]
    used = engine.embeddings_used(render_batch(images, emb))
    assert used == [["other", NAME], [NAME], [], []]
    unguided = BatchRequest(tuple(images), 32, 32, 3, 1.0, "Euler", "Automatic",
                            embeddings=tuple(emb))  # fmt: skip
    assert engine.embeddings_used(unguided) == [[NAME], [], [], []]
    assert engine.embeddings_used(render_batch(images)) == [[], [], [], []]


def test_sdxl_render_with_embedding_hires_and_batch(sdxl_engine, files):
    e = sdxl_engine
    emb = [
        EmbeddingRequest(
            NAME, files("xl", clip_l=vectors(2, 8, 11) * 3, clip_g=vectors(2, 12, 12) * 3)
        )
    ]
    me = ImageRequest(f"a (photo:1.2) of {NAME} BREAK a cat", "ugly", 3)
    hires = HiresRequest(scale=1.5, steps=2)
    without = e.render(render_batch([me], steps=2, hires=hires))[0]
    alone = e.render(render_batch([me], emb, steps=2, hires=hires))[0]
    together = e.render(render_batch([ImageRequest("a dog", "", 4), me], emb, steps=2, hires=hires))
    assert alone.size == (48, 48)
    assert np.abs(px(alone) - px(without)).max() > 1
    assert np.abs(px(together[1]) - px(alone)).max() <= 1


# --------------------------------------------------------------------------------- errors


def test_files_that_do_not_fit_are_errors_naming_the_embedding(
    engine, sdxl_engine, files, tmp_path
):
    xl = files("xl", clip_l=vectors(1, 8, 0), clip_g=vectors(1, 12, 0))
    sd1 = files("sd1", emb_params=vectors(1, 32, 0))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    cases = [
        (engine, xl, "made for SDXL"),
        (sdxl_engine, sd1, "made for SD1"),
        (engine, files("wide", emb_params=vectors(2, 768, 0)), "768 wide.*takes 32"),
        (
            sdxl_engine,
            files("xlwide", clip_l=vectors(1, 8, 0), clip_g=vectors(1, 8, 0)),
            "'clip_g' has vectors 8 wide.*takes 12",
        ),
        (engine, files("two", a=vectors(1, 32, 0), b=vectors(1, 32, 0)), "no 'emb_params'"),
        (
            sdxl_engine,
            files("half", clip_l=vectors(1, 8, 0), other=vectors(1, 12, 0)),
            "no clip_l and clip_g",
        ),
        (engine, files("long", emb_params=vectors(76, 32, 0)), "76 vectors"),
        (engine, str(broken), "cannot read"),
        (engine, str(tmp_path / "missing.safetensors"), "cannot read"),
    ]
    for eng, path, message in cases:
        with pytest.raises(EmbeddingError, match=f"embedding 'bad': .*{message}"):
            eng.embeddings.index([EmbeddingRequest("bad", path)])
    # diffusers' learned_embeds (one tensor, any key, 1-D too) is the SD1 layout
    one = engine.embeddings.index(
        [EmbeddingRequest("one", files("l", **{"<one>": vectors(1, 32, 0)[0]}))]
    )
    assert one.find(tokens(engine, "one"), 0).length == 1
    # a render refuses before it changes anything; both are add-on errors, as LoRA's
    with pytest.raises(EmbeddingError, match="embedding 'bad'"):
        engine.render(render_batch([ImageRequest("bad", "", 1)], [EmbeddingRequest("bad", xl)]))
    assert issubclass(LoraError, AddonError) and issubclass(EmbeddingError, AddonError)
    assert issubclass(AddonError, EngineError)


def test_files_are_cached_by_path_and_stat(engine, files):
    path = files("c", emb_params=vectors(2, 32, 0))
    first = engine.embeddings.vectors(EmbeddingRequest("c", path))
    assert engine.embeddings.vectors(EmbeddingRequest("other name", path)) is first
    save_file({"emb_params": vectors(3, 32, 1)}, path)  # replaced: another size, read again
    again = engine.embeddings.vectors(EmbeddingRequest("c", path))
    assert again[0].shape == (3, 32)


def test_flux_refuses_embeddings(tmp_path):
    from workers.engine.flux import FluxEngine
    from workers.engine.tiny import (
        t5_tokenizer_dir,
        write_tiny_flux_checkpoint,
        write_tiny_t5_tokenizer,
    )

    path = write_tiny_flux_checkpoint(tmp_path / "flux.safetensors")
    write_tiny_t5_tokenizer(t5_tokenizer_dir(path))
    flux = FluxEngine.from_single_file(path, t5_tokenizer=t5_tokenizer_dir(path))
    assert not flux.takes_embeddings
    batch = BatchRequest(
        (ImageRequest("a cat", "", 1),),
        32,
        32,
        2,
        3.5,
        "Euler",
        "Automatic",
        embeddings=(EmbeddingRequest(NAME, str(tmp_path / "e.safetensors")),),
    )
    with pytest.raises(EngineError, match="^embeddings: "):
        flux.render(batch)
