"""A1111's prompt emphasis: the parse (checked against the examples A1111 documents for its
``parse_prompt_attention``), the weights carried through the 75-token chunks, and the SD1
engine's states scaled as A1111's "Original" emphasis does, against an independent sum."""

from __future__ import annotations

import pytest
import torch

from workers.engine.base import BatchRequest, ImageRequest
from workers.engine.prompts import CHUNK_TOKENS, parse_emphasis, prompt_chunks


@pytest.mark.parametrize(
    ("prompt", "pieces"),
    [
        # A1111's own examples, with the weights it gives
        ("normal text", [[("normal text", 1.0)]]),
        ("an (important) word", [[("an ", 1.0), ("important", 1.1), (" word", 1.0)]]),
        ("(unbalanced", [[("unbalanced", 1.1)]]),
        ("\\(literal\\]", [[("(literal]", 1.0)]]),
        ("(unnecessary)(parens)", [[("unnecessaryparens", 1.1)]]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                [
                    ("a ", 1.0),
                    ("house", 1.3 * 1.1 * 1.1),
                    (" ", 1.1),
                    ("on", 1.0),
                    (" a ", 1.1),
                    ("hill", 0.55),
                    (", sun, ", 1.1),
                    ("sky", 1.1**4),
                    (".", 1.1),
                ]
            ],
        ),
        # more of the same rules
        (
            "[[faint]] (bold:1.5) [x:0.5]",
            [[("faint", 1 / 1.1 / 1.1), (" ", 1.0), ("bold", 1.5), (" ", 1.0), ("x:0.5", 1 / 1.1)]],
        ),
        ("x:1.2) y] z)", [[("x:1.2) y] z)", 1.0)]]),  # closes nothing: text
        ("a \\\\ b \\ c", [[("a \\ b \\ c", 1.0)]]),
        ("(a:-0.5)", [[("a", -0.5)]]),
        ("(a:1.2.3)", [[("a:1.2.3)", 1.1)]]),  # not a number: text, and the ( stays open
        ("", [[("", 1.0)]]),
        ("a BREAK (b BREAK c)", [[("a", 1.0)], [("b", 1.1)], [("c", 1.1)]]),
        ("BREAK", [[("", 1.0)], [("", 1.0)]]),
        ("a BREAKFAST", [[("a BREAKFAST", 1.0)]]),
    ],
)
def test_parse_as_a1111(prompt, pieces):
    got = parse_emphasis(prompt)
    assert [[t for t, _ in p] for p in got] == [[t for t, _ in p] for p in pieces]
    for gp, wp in zip(got, pieces, strict=True):
        assert [w for _, w in gp] == pytest.approx([w for _, w in wp], rel=1e-12)


def test_weights_follow_their_tokens_through_the_chunks():
    words = {"a": 1, "red": 2, "fox": 3, ",": 9}

    def tokenize(text):
        return [words[w] for w in text.replace(",", " , ").split()]

    # 81 tokens: the first chunk ends after the last comma within 20 tokens of its end
    prompt = "a " * 60 + ", (red:1.5) " + "fox " * 10 + ", [fox] " + "a " * 7
    chunks = prompt_chunks(prompt, tokenize, 9, 100, 101, 102)
    assert [len(c) for c in chunks] == [77, 77]
    assert all(len(c.weights) == 77 for c in chunks)
    flat = [(t, w) for c in chunks for t, w in zip(c[1:-1], c.weights[1:-1], strict=True)
            if t not in (101, 102)]  # fmt: skip
    assert [t for t, _ in flat] == tokenize(prompt.replace("(", "").replace(")", "")
                                              .replace("[", "").replace("]", "")
                                              .replace(":1.5", ""))  # fmt: skip
    assert [w for t, w in flat if t == 2] == [1.5]
    assert [round(w, 6) for t, w in flat if t == 3] == [1.0] * 10 + [round(1 / 1.1, 6)]
    assert all(w == 1.0 for t, w in flat if t in (1, 9))
    # the first chunk ends after the last comma within reach (the 73rd token), BOS ... EOS
    assert chunks[0] == [100] + [1] * 60 + [9, 2] + [3] * 10 + [9, 101, 102, 102]
    assert chunks[1].weights[0] == chunks[1].weights[-1] == 1.0
    plain = prompt_chunks("a red fox", tokenize, 9, 100, 101, 102)
    assert not plain[0].emphasised and plain[0] == [100, 1, 2, 3, 101] + [102] * (CHUNK_TOKENS - 3)


def a1111_original_emphasis(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The sum written out for one chunk: states times weights, then the mean put back."""
    w = torch.tensor(weights).reshape(-1, 1)
    scaled = z * w
    return scaled * (z.mean() / scaled.mean())


def test_sd1_states_are_scaled_as_a1111_original_emphasis(engine):
    tok = engine.tokenizer
    ids = tok("a red fox", padding="max_length", max_length=77, return_tensors="pt").input_ids
    plain = engine.text_encoder(ids)[0][0]
    weights = [1.0] * 77
    weights[2] = 1.5  # BOS, "a", "red"
    expected = a1111_original_emphasis(plain, weights)
    got = engine.encode_prompts(["a (red:1.5) fox"])[0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    # weight 1 and no brackets are the plain states, to the bit
    assert torch.equal(
        engine.encode_prompts(["a (red:1) fox"])[0], engine.encode_prompts(["a red fox"])[0]
    )
    # escaped brackets are text: other tokens than both of the above
    assert engine.prompt_chunks("a \\(red\\) fox")[0] != engine.prompt_chunks("a red fox")[0]
    # per prompt: a prompt beside another in one encode gets what it gets alone
    both = engine.encode_prompts(["a (red:1.5) fox", "[a dog]"])
    assert torch.allclose(both[0], got, atol=1e-6)


def test_an_emphasised_prompt_renders_otherwise_and_alone_as_in_a_batch(engine):
    def render(*images):
        return engine.sample_latents(
            BatchRequest(tuple(images), 32, 32, 2, 5.0, "Euler", "Automatic")
        )

    plain, strong = ImageRequest("a red fox", "", 7), ImageRequest("a (red:1.8) fox", "", 7)
    together = render(strong, ImageRequest("((a dog))", "(blurry:1.3)", 8))
    assert not torch.allclose(render(plain)[0], together[0], atol=1e-4)
    assert torch.allclose(render(strong)[0], together[0], rtol=1e-4, atol=1e-3)


# ------------------------------------------------ textual-inversion embeddings (A1111's)

EMB_WORDS = {"a": 1, "red": 2, "fox": 3, "foo": 5, "bar": 6, ",": 9}


def emb_tokenize(text):
    return [EMB_WORDS[w] for w in text.replace(",", " , ").split()]


def emb_chunks(prompt, index):
    return prompt_chunks(prompt, emb_tokenize, 9, 100, 101, 102, index)


def emb_index():
    from workers.engine.prompts import Embedding, EmbeddingIndex

    foo = Embedding("foo", (5,), 2, "F")
    foo_bar = Embedding("foo bar", (5, 6), 3, "FB")
    return EmbeddingIndex([foo, foo_bar]), foo, foo_bar


def test_embeddings_take_their_positions_the_longest_name_first():
    index, foo, foo_bar = emb_index()
    (chunk,) = emb_chunks("a foo bar fox foo (foo:1.5) bar", index)
    assert chunk[:13] == [100, 1, 0, 0, 0, 3, 0, 0, 0, 0, 6, 101, 102]
    assert chunk.fixes == ((2, foo_bar), (6, foo), (8, foo))
    assert chunk.weights[:11] == (1.0,) * 8 + (1.5, 1.5, 1.0)
    # a name split by brackets is two fragments: only "foo" is found, "bar" stays text
    (split,) = emb_chunks("(foo) bar", index)
    assert split[:5] == [100, 0, 0, 6, 101] and split.fixes == ((1, foo),)
    assert split.weights[:4] == (1.0, 1.1, 1.1, 1.0)
    # no embeddings, or none named: exactly the ids and weights of today
    for prompt in ("a red fox", "a (red:1.3) fox, BREAK fox"):
        for other in (None, index):
            got, today = emb_chunks(prompt, other), emb_chunks(prompt, None)
            assert got == prompt_chunks(prompt, emb_tokenize, 9, 100, 101, 102) == today
            assert [c.weights for c in got] == [c.weights for c in today]
            assert all(c.fixes == () for c in got)


def test_an_embedding_that_does_not_fit_opens_the_next_chunk():
    index, foo, foo_bar = emb_index()
    fits = emb_chunks("a " * 72 + "foo bar", index)  # 72 + 3 = 75: the chunk's last three
    assert len(fits) == 1 and fits[0].fixes == ((73, foo_bar),) and fits[0][76] == 101
    moved = emb_chunks("a " * 73 + "foo bar a", index)  # 73 + 3 > 75: closes at 73
    assert [len(c) for c in moved] == [77, 77]
    assert moved[0][:76] == [100] + [1] * 73 + [101, 102] and moved[0].fixes == ()
    assert moved[1][:6] == [100, 0, 0, 0, 1, 101] and moved[1].fixes == ((1, foo_bar),)
    full = emb_chunks("a " * 75 + "foo", index)  # a full chunk: the embedding opens the next
    assert full[0].fixes == () and full[1].fixes == ((1, foo),)
    breaks = emb_chunks("foo BREAK foo", index)
    assert [c.fixes for c in breaks] == [((1, foo),), ((1, foo),)]


def test_a_comma_backtrack_moves_an_embedding_with_its_tokens():
    index, _, foo_bar = emb_index()
    # comma at 60, ten "a", foo bar at 71..73, "a" at 74: the chunk is full at the next
    # "a" and its last comma 15 back, so the 14 positions after the comma move on
    chunks = emb_chunks("a " * 60 + ", " + "a " * 10 + "foo bar a a", index)
    assert [c.fixes for c in chunks] == [(), ((11, foo_bar),)]
    assert chunks[0][:63] == [100] + [1] * 60 + [9, 101]
    assert chunks[1][:17] == [100] + [1] * 10 + [0, 0, 0, 1, 1, 101]
    # the same prompt with plain text for the name backtracks the same way (A1111's rule)
    plain = emb_chunks("a " * 60 + ", " + "a " * 10 + "red fox red a a", None)
    assert [c.index(101) for c in plain] == [c.index(101) for c in chunks]


def test_embedding_index_and_placeholder_checks():
    from workers.engine.prompts import Embedding, EmbeddingIndex

    index, _, _ = emb_index()
    with pytest.raises(ValueError, match="end token"):
        prompt_chunks("foo", emb_tokenize, 9, 100, 101, 102, index, placeholder=101)
    with pytest.raises(ValueError, match="no tokens"):
        EmbeddingIndex([Embedding("", (), 1)])
    with pytest.raises(ValueError, match="76 vectors"):
        EmbeddingIndex([Embedding("big", (5,), CHUNK_TOKENS + 1)])
