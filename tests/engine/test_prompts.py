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
