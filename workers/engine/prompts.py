"""A1111's prompt syntax for CLIP text encoders, torch-free: emphasis brackets, ``BREAK``, and
the split of a long prompt into chunks of 75 tokens.

Emphasis, as A1111 reads it (``parse_emphasis``):
- ``(text)`` multiplies the attention to ``text`` by 1.1, ``[text]`` divides it by 1.1,
  ``(text:1.5)`` multiplies it by 1.5; brackets nest and their factors multiply;
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the characters themselves;
- a bracket left open applies to the rest of the prompt; a closing one that opens nothing,
  or a ``:1.5)`` outside round brackets, is text;
- ``BREAK`` in capitals, as a word, ends the chunk and starts a new one.

Each token keeps the weight of the text it came from; the encoder's states of a chunk are
scaled token by token and then all together, so that their mean is what it was (A1111's
"Original" emphasis, ``emphasize`` in the engines). A1111 takes that mean over the batch;
here it is per prompt, so an image never depends on the prompts it shares a batch with.
"""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_TOKENS = 77
CHUNK_TOKENS = MAX_TOKENS - 2  # prompt tokens per 77-token chunk, between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's "comma_padding_backtrack" default
BREAK = re.compile(r"\s*\bBREAK\b\s*")  # A1111's keyword that starts a new chunk
ROUND, SQUARE = 1.1, 1 / 1.1  # the factors of ( ) and [ ]

_TOKEN = re.compile(
    r"""\\[()\[\]\\]   # an escaped bracket or backslash
    |\\                # a lone backslash
    |\(|\[             # an opening bracket
    |:\s*([+-]?[.\d]+)\s*\)  # an explicit weight, closing a round bracket
    |\)|]              # a closing bracket
    |[^\\()\[\]:]+     # plain text
    |:                 # a colon that is not a weight
    """,
    re.VERBOSE,
)

Fragment = tuple[str, float]  # text and its weight
Piece = list[Fragment]  # the text between two BREAKs


def parse_emphasis(prompt: str) -> list[Piece]:
    """The prompt's pieces between BREAKs (at least one), each a list of (text, weight)
    with neighbours of equal weight merged, e.g. ``"an (important) word"`` gives
    ``[[("an ", 1.0), ("important", 1.1), (" word", 1.0)]]``."""
    frags: list[list] = []  # [text, weight] or [None, 0] for a BREAK
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for frag in frags[start:]:
            if frag[0] is not None:
                frag[1] *= factor

    for m in _TOKEN.finditer(prompt):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            frags.append([text[-1] if len(text) == 2 else text, 1.0])
        elif text == "(":
            rounds.append(len(frags))
        elif text == "[":
            squares.append(len(frags))
        elif weight is not None and rounds and _number(weight) is not None:
            scale(rounds.pop(), _number(weight))
        elif text == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif text == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            for k, part in enumerate(BREAK.split(text)):
                if k:
                    frags.append([None, 0.0])
                frags.append([part, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)

    pieces: list[Piece] = [[]]
    for text, weight in frags:
        if text is None:
            pieces.append([])
        elif pieces[-1] and pieces[-1][-1][1] == weight:
            pieces[-1][-1] = (pieces[-1][-1][0] + text, weight)
        elif text:
            pieces[-1].append((text, weight))
    return [p or [("", 1.0)] for p in pieces]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def chunk_tokens(
    pieces: list[list[int]],
    comma: int,
    size: int = CHUNK_TOKENS,
    backtrack: int = COMMA_BACKTRACK,
) -> list[list[int]]:
    """A1111's split of a prompt's token ids into chunks of at most ``size``. ``pieces`` are
    the ids of the texts between BREAKs; each after the first starts a new chunk. When a
    chunk is full and its last ``comma`` lies at most ``backtrack`` tokens back, the chunk
    ends after that comma and the tokens behind it open the next one, so a phrase is not cut
    in two. Always at least one chunk (an empty prompt gives one empty chunk). The chunks
    hold every token once, in order."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    last_comma = -1

    def close() -> None:
        nonlocal cur, last_comma
        chunks.append(cur)
        cur, last_comma = [], -1

    for k, piece in enumerate(pieces):
        if k:
            close()
        for token in piece:
            if token == comma:
                last_comma = len(cur)
            elif len(cur) == size and last_comma != -1 and len(cur) - last_comma <= backtrack:
                moved = cur[last_comma + 1 :]
                cur = cur[: last_comma + 1]
                close()
                cur = moved
            if len(cur) == size:
                close()
            cur.append(token)
    if cur or not chunks:
        chunks.append(cur)
    return chunks


class TokenChunk(list[int]):
    """One chunk as the text encoder reads it: BOS, up to 75 prompt ids, EOS, padding (77
    ids), with ``weights``: each position's emphasis (1.0 for BOS, EOS and padding)."""

    weights: tuple[float, ...]

    @property
    def emphasised(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def prompt_chunks(
    prompt: str,
    tokenize: Callable[[str], list[int]],
    comma: int,
    bos: int,
    eos: int,
    pad: int,
) -> list[TokenChunk]:
    """The prompt's chunks (``chunk_tokens`` of its emphasis pieces), each wrapped in BOS
    ... EOS and padded to 77 with ``pad``; at least one. A prompt of up to 75 tokens with
    neither brackets nor BREAK gives the usual 77 ids, all of weight 1."""
    ids: list[list[int]] = []
    weights: list[float] = []
    for piece in parse_emphasis(prompt):
        ids.append([])
        for text, weight in piece:
            got = tokenize(text) if text else []
            ids[-1].extend(got)
            weights.extend([weight] * len(got))
    out = []
    start = 0
    for chunk in chunk_tokens(ids, comma):
        n = len(chunk)
        padding = CHUNK_TOKENS - n
        tc = TokenChunk([bos, *chunk, eos] + [pad] * padding)
        tc.weights = (1.0, *weights[start : start + n], 1.0) + (1.0,) * padding
        out.append(tc)
        start += n
    return out
