import numpy as np
import pytest
import torch

from workers.engine.base import BatchRequest, EngineError, ImageRequest

PROMPTS = ["a photo of a cat", "a red car", "mountains at dusk", "a bowl of soup"]


def batch(images, sampler="Euler a", steps=6, cfg=7.0, width=64, height=64):
    return BatchRequest(
        images=tuple(images),
        width=width,
        height=height,
        steps=steps,
        cfg_scale=cfg,
        sampler_name=sampler,
        scheduler="Automatic",
    )


@pytest.mark.parametrize("sampler", ["Euler a", "Euler", "DPM++ 2M"])
def test_same_seed_same_image_whatever_the_batch(engine, sampler):
    requests = [ImageRequest(p, "ugly" if i % 2 else "", 100 + i) for i, p in enumerate(PROMPTS)]
    together = engine.render(batch(requests, sampler))
    alone = engine.render(batch([requests[2]], sampler))
    a = np.asarray(together[2], dtype=np.int16)
    b = np.asarray(alone[0], dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    other = np.asarray(together[1], dtype=np.int16)
    assert np.abs(a - other).max() > 1  # different seed and prompt: a different image


def test_render_size_mode_and_cfg_one(engine):
    images = engine.render(
        batch([ImageRequest("a cat", "", 1)], "Euler", steps=2, cfg=1.0, width=48, height=64)
    )
    assert len(images) == 1
    assert images[0].size == (48, 64) and images[0].mode == "RGB"


def test_seed_changes_ancestral_noise(engine):
    req = ImageRequest("a cat", "", 5)
    x = engine.render(batch([req], steps=3))[0]
    y = engine.render(batch([ImageRequest("a cat", "", 6)], steps=3))[0]
    z = engine.render(batch([req], steps=3))[0]
    assert np.array_equal(np.asarray(x), np.asarray(z))
    assert not np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sampler": "Heun"}, "sampler_name"),
        ({"width": 60}, "width"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_requests_are_engine_errors(engine, kwargs, field):
    with pytest.raises(EngineError, match=field):
        engine.render(batch([ImageRequest("a", "", 1)], **kwargs))
    with pytest.raises(EngineError, match="scheduler"):
        engine.render(BatchRequest((ImageRequest("a", "", 1),), 64, 64, 2, 7.0, "Euler", "Beta"))


# prompts over 75 tokens: A1111's chunks of 75 tokens, encoded side by side

# 119 tokens: 40 phrases "fine detail" with commas between; the 25th comma is the 75th
# token, so the first chunk holds exactly the first 75 tokens
LONG = ", ".join(f"{w} detail" for w in ["fine", "sharp", "soft", "warm", "cold"] * 8)


COMMA = 267  # ",</w>"


@pytest.mark.parametrize(
    ("pieces", "sizes"),
    [
        ([list(range(1000, 1080))], [75, 5]),  # no comma: cut at 75
        # a comma 15 tokens before the cut: the chunk ends after it
        ([[*range(1000, 1060), COMMA, *range(2000, 2019)]], [61, 19]),
        # the last comma 25 tokens back (more than 20): cut at 75 all the same
        ([[*range(1000, 1050), COMMA, *range(2000, 2029)]], [75, 5]),
        ([[1, 2], [3]], [2, 1]),  # "a b BREAK c"
        ([[], [3]], [0, 1]),  # "BREAK c": an empty chunk first, as in A1111
        ([[1], []], [1]),  # "a BREAK": no empty chunk last
        ([[]], [0]),  # the empty prompt: one empty chunk
        ([list(range(1000, 1150))], [75, 75]),
    ],
)
def test_chunks_follow_a1111(pieces, sizes):
    from workers.engine.prompts import chunk_tokens

    chunks = chunk_tokens(pieces, COMMA)
    assert [len(c) for c in chunks] == sizes
    assert [t for c in chunks for t in c] == [t for p in pieces for t in p]  # order kept


def test_break_and_the_comma_token_in_real_prompts(engine):
    assert engine.tokenizer.convert_tokens_to_ids(",</w>") == COMMA
    chunks = engine.prompt_chunks("a red car BREAK a blue boat")
    assert len(chunks) == 2
    assert engine.prompt_chunks("a red car")[0] == chunks[0]
    assert engine.prompt_chunks("a blue boat")[0] == chunks[1]
    assert len(engine.prompt_chunks("a BREAKFAST table, Break")) == 1  # the word only, in capitals


def test_prompts_within_75_tokens_encode_exactly_as_one_clip_window(engine):
    prompts = ["a photo of a cat", "a red car on a road at night, rain, neon lights, 35mm"]
    ids = engine.tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert all(len(engine.prompt_chunks(p)) == 1 for p in prompts)
    assert engine.prompt_chunks(prompts[0])[0] == ids[0].tolist()
    ours = engine.encode_prompts(prompts)
    assert ours.shape[:2] == (2, 77)
    assert torch.allclose(ours, engine.text_encoder(ids)[0], atol=1e-6)


def test_a_long_prompt_is_encoded_in_chunks_of_75_tokens(engine):
    tok = engine.tokenizer
    ids = tok(LONG, add_special_tokens=False).input_ids
    assert len(ids) == 119 and ids[74] == COMMA
    chunks = engine.prompt_chunks(LONG)
    assert [len(c) for c in chunks] == [77, 77]
    assert chunks[0] == [tok.bos_token_id, *ids[:75], tok.eos_token_id]
    rest = ids[75:]
    assert chunks[1][: len(rest) + 2] == [tok.bos_token_id, *rest, tok.eos_token_id]
    assert chunks[0][1:-1] + chunks[1][1 : len(rest) + 1] == ids  # nothing dropped
    enc = engine.encode_prompts([LONG, "a cat"])
    assert enc.shape[:2] == (2, 154)
    first = engine.text_encoder(torch.tensor([chunks[0]]))[0][0]
    assert torch.allclose(enc[0, :77], first, atol=1e-5)
    empty = engine.encode_prompts([""])[0]  # a short prompt is padded with an empty chunk
    assert torch.allclose(enc[1, 77:], empty, atol=1e-5)


def test_words_after_the_75th_token_change_the_result(engine):
    def latents(prompt):
        return engine.sample_latents(batch([ImageRequest(prompt, "", 3)], "Euler", steps=3))

    a, b = latents(LONG + ", a red car"), latents(LONG + ", a blue boat")
    # truncated at 77 tokens, both prompts would give the very same latents
    assert (a - b).abs().max() > 1e-3


@pytest.fixture(scope="module")
def demo_engine():
    # the trained demo model: its output depends on the context enough that one empty
    # chunk of padding moves the latents by more than 1 (the tiny random model's barely)
    from workers.demo import demo_checkpoint_path
    from workers.engine.loader import load_engine

    return load_engine(demo_checkpoint_path())


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_long_prompts_do_not_change_their_batch_mates(demo_engine, sampler):
    requests = [
        ImageRequest("a red circle on a blue background", "", 11),
        ImageRequest(LONG, "", 12),
        ImageRequest("a green square on a black background", LONG, 13),  # long negative
        ImageRequest("a white triangle on a purple background", "", 14),
    ]
    together = demo_engine.sample_latents(batch(requests, sampler, steps=4))
    for i, req in enumerate(requests):
        alone = demo_engine.sample_latents(batch([req], sampler, steps=4))[0]
        assert (together[i] - alone).abs().max() < 1e-3, i


def test_progress_is_told_of_every_step_and_changes_no_image(engine):
    ticks = []
    req = [ImageRequest("a red car", "ugly", 5), ImageRequest("a cat", "", 6)]
    for sampler, steps in (("Euler", 5), ("DPM++ 2M", 3)):
        ticks.clear()
        images = engine.render(batch(req, sampler, steps=steps), progress=lambda: ticks.append(1))
        assert len(ticks) == steps + 1  # one per UNet evaluation, one for the decode
        plain = engine.render(batch(req, sampler, steps=steps))
        for a, b in zip(images, plain, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def torch_modules(engine) -> set[str]:
    """The attributes of an engine that hold torch modules."""
    return {k for k, v in vars(engine).items() if isinstance(v, torch.nn.Module)}


def test_setting_the_device_moves_every_module_of_the_engine(engine, monkeypatch):
    """The worker parks an engine in host RAM by setting its device: every module must go."""
    assert set(engine.module_names) == torch_modules(engine)
    moved = []
    for name in engine.module_names:
        module = getattr(engine, name)
        monkeypatch.setattr(module, "to", lambda d, name=name: moved.append((name, d)))
    engine.device = "cuda:7"
    assert engine.device == "cuda:7" and sorted(moved) == sorted(
        (n, "cuda:7") for n in engine.module_names
    )
    monkeypatch.undo()
    engine.device = "cpu"
