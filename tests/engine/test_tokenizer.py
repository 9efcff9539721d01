import json

import pytest

from workers.engine.tokenizer_assets import ASSET_DIR, N_MERGES, VOCAB_SIZE, byte_chars


@pytest.fixture(scope="module")
def tokenizer():
    from workers.engine.sd1 import load_tokenizer

    return load_tokenizer()


def test_vocabulary_size(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE == 49408


def test_known_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407


def test_padding_and_truncation(tokenizer):
    ids = tokenizer(
        ["a cat", "dog " * 200], padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert [len(x) for x in ids] == [77, 77]
    assert tokenizer.pad_token_id == 49407
    assert ids[0][:4] == [49406, 320, 2368, 49407] and set(ids[0][4:]) == {49407}
    assert ids[1][0] == 49406 and ids[1][-1] == 49407


def test_shipped_files_follow_the_construction():
    vocab = json.loads((ASSET_DIR / "vocab.json").read_text(encoding="utf-8"))
    chars = byte_chars()
    assert len(set(chars)) == 256
    tokens = sorted(vocab, key=vocab.get)
    assert tokens[:512] == chars + [c + "</w>" for c in chars]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    merges = (ASSET_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == N_MERGES + 1
    assert tokens[512] == "".join(merges[1].split())
    assert (ASSET_DIR / "LICENSE").read_text().startswith("MIT License")
