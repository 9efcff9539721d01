"""Which registered embeddings a job's prompts use (``farm.embeddings``), checked against
CLIP's own tokenizer: a name is used where its tokens stand in the prompt's tokens."""

from __future__ import annotations

import pytest

from farm.embeddings import names_in, prompt_texts
from farm.spec import JobSpec

NAMES = ["easynegative", "bad-hands-5", "neg", "EasyNegative"]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("a cat, EasyNegative", ["easynegative", "EasyNegative"]),
        ("(easynegative:1.2), blurry", ["easynegative", "EasyNegative"]),
        ("easynegative_v2 and [bad-hands-5]", ["easynegative", "bad-hands-5", "EasyNegative"]),
        ("easynegatives, negative, neg2", ["neg"]),  # a digit is a token of its own
        ("negpost", []),
        ("", []),
    ],
)
def test_a_name_is_used_where_no_letter_follows_it(text: str, found: list[str]) -> None:
    assert names_in([text], NAMES) == found


def test_names_come_in_the_registry_order_once() -> None:
    texts = ["neg neg", "bad-hands-5 neg", "nothing"]
    assert names_in(texts, ["zzz", "bad-hands-5", "neg"]) == ["bad-hands-5", "neg"]
    assert names_in(texts, []) == []


def test_the_rule_never_misses_a_name_clip_tokens_match() -> None:
    """Wherever a name's token ids occur in a text's, ``names_in`` lists it; where the name
    stands as a word of its own, it lists it only then."""
    from workers.engine.sd1 import load_tokenizer

    tok = load_tokenizer()

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    def occurs(name: str, text: str) -> bool:
        n, t = ids(name), ids(text)
        return any(t[i : i + len(n)] == n for i in range(len(t) - len(n) + 1))

    texts = [
        "EasyNegative, a cat",
        "easynegativev2",
        "a (cat:1.2) easynegative3",
        "xeasynegative",
        "bad_prompt_version2 bad_prompt",
        "badprompt",
        "verybad",
        "style of neg, neg.",
    ]
    names = ["easynegative", "bad_prompt", "bad_prompt_version2", "neg", "verybad"]
    for text in texts:
        for name in names:
            listed = name in names_in([text], [name])
            if occurs(name, text):
                assert listed, (name, text)
            elif not any(f"{c}{name}" in text.lower() for c in "abcdefghijklmnopqrstuvwxyz"):
                assert not listed, (name, text)
    assert occurs("easynegative", "xeasynegative")  # the tokens alone tell inside a word
    assert not occurs("neg", "aneg") and names_in(["aneg"], ["neg"]) == ["neg"]


def test_prompt_texts_are_every_prompt_and_negative_prompt() -> None:
    spec = JobSpec(
        model="m",
        prompt=["one", "two"],
        negative_prompt="neg",
        sweep={"negative_prompt": ["n1", "n2"]},
    )
    assert prompt_texts(spec) == ["one", "two", "neg", "n1", "n2"]
