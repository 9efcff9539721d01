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

Textual-inversion embeddings, as A1111 finds them (``EmbeddingIndex``, ``split_chunks``):
where a fragment's token ids spell an embedding's name, its vectors take that many
positions (placeholder ids the encoder's token embedding overwrites), with the fragment's
weight, and never straddle two chunks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding as the chunker sees it: the token ids of its name and
    how many positions its vectors take; ``vectors`` are whatever the encoder puts there
    (opaque here: the engines keep one tensor per text encoder)."""

    name: str
    ids: tuple[int, ...]  # the name, tokenized as prompts are
    length: int  # positions its vectors take in a chunk (1 to CHUNK_TOKENS)
    vectors: Any = None


class EmbeddingIndex:
    """Embeddings by the token ids of their names (A1111's ``EmbeddingDatabase``): at a
    position of a token stream, the one whose ids occur there, the longest name first and,
    of names with the same length, the first given. Matching on ids, not on text, means
    case does not matter (CLIP's tokenizer lowercases) but word boundaries do."""

    def __init__(self, embeddings: Iterable[Embedding]) -> None:
        self.by_first: dict[int, list[Embedding]] = {}
        for emb in embeddings:
            if not emb.ids:
                raise ValueError(f"embedding {emb.name!r}: its name gives no tokens")
            if not 1 <= emb.length <= CHUNK_TOKENS:
                raise ValueError(
                    f"embedding {emb.name!r}: {emb.length} vectors, a chunk takes 1 to "
                    f"{CHUNK_TOKENS}"
                )
            self.by_first.setdefault(emb.ids[0], []).append(emb)
        for found in self.by_first.values():
            found.sort(key=lambda e: len(e.ids), reverse=True)  # stable: ties keep order

    def __bool__(self) -> bool:
        return bool(self.by_first)

    def find(self, tokens: Sequence[int], position: int) -> Embedding | None:
        """The embedding whose name's ids start at ``tokens[position]``, if any."""
        for emb in self.by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(emb.ids)]) == emb.ids:
                return emb
        return None


Fix = tuple[int, Embedding]  # a chunk position and the embedding whose vectors start there


@dataclass
class _Chunk:
    ids: list[int]
    weights: list[float]
    fixes: list[Fix]


def split_chunks(
    pieces: list[list[tuple[list[int], float]]],
    comma: int,
    embeddings: EmbeddingIndex | None = None,
    size: int = CHUNK_TOKENS,
    backtrack: int = COMMA_BACKTRACK,
    placeholder: int = 0,
) -> list[tuple[list[int], list[float], list[Fix]]]:
    """A1111's ``tokenize_line``: the chunks ``(ids, weights, fixes)`` of a prompt's pieces
    (the texts between BREAKs, each a list of (token ids, weight) fragments as emphasis
    gives them; each piece after the first starts a new chunk). A chunk holds at most
    ``size`` positions. When one is full and its last ``comma`` lies at most ``backtrack``
    tokens back, it ends after that comma and the tokens behind it open the next one.

    Where a fragment's ids spell an embedding's name (``embeddings.find``), the name's
    tokens give way to ``embedding.length`` positions of ``placeholder`` with the
    fragment's weight and a fix ``(position in the chunk, embedding)``. An embedding never
    straddles two chunks: when it does not fit in what is left of the chunk, the chunk
    closes (shorter) and the embedding opens the next one. The full-chunk and comma rules
    are checked at the name's first token, as at any token. A comma backtrack moves the
    fixes of the tokens it moves with them (A1111 leaves them in the chunk it closes, where
    they overwrite its padding and leave the moved placeholders bare: a bug not copied).
    Always at least one chunk (an empty prompt gives one empty chunk)."""
    chunks: list[_Chunk] = []
    cur = _Chunk([], [], [])
    last_comma = -1

    def close() -> None:
        nonlocal cur, last_comma
        chunks.append(cur)
        cur, last_comma = _Chunk([], [], []), -1

    for k, piece in enumerate(pieces):
        if k:
            close()
        for tokens, weight in piece:
            position = 0
            while position < len(tokens):
                token = tokens[position]
                n = len(cur.ids)
                if token == comma:
                    last_comma = n
                elif n == size and last_comma != -1 and n - last_comma <= backtrack:
                    cut = last_comma + 1
                    moved = _Chunk(
                        cur.ids[cut:],
                        cur.weights[cut:],
                        [(at - cut, emb) for at, emb in cur.fixes if at >= cut],
                    )
                    cur.ids, cur.weights = cur.ids[:cut], cur.weights[:cut]
                    cur.fixes = [(at, emb) for at, emb in cur.fixes if at < cut]
                    close()
                    cur = moved
                if len(cur.ids) == size:
                    close()
                emb = embeddings.find(tokens, position) if embeddings else None
                if emb is None:
                    cur.ids.append(token)
                    cur.weights.append(weight)
                    position += 1
                    continue
                if len(cur.ids) + emb.length > size:
                    close()
                cur.fixes.append((len(cur.ids), emb))
                cur.ids.extend([placeholder] * emb.length)
                cur.weights.extend([weight] * emb.length)
                position += len(emb.ids)
    if cur.ids or not chunks:
        chunks.append(cur)
    return [(c.ids, c.weights, c.fixes) for c in chunks]


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
    hold every token once, in order (``split_chunks`` without embeddings)."""
    split = split_chunks([[(piece, 1.0)] for piece in pieces], comma, None, size, backtrack)
    return [ids for ids, _, _ in split]


class TokenChunk(list[int]):
    """One chunk as the text encoder reads it: BOS, up to 75 prompt ids, EOS, padding (77
    ids), with ``weights``: each position's emphasis (1.0 for BOS, EOS and padding), and
    ``fixes``: (position among the 77, embedding) where an embedding's vectors replace the
    token embeddings of its placeholder ids (none without embeddings)."""

    weights: tuple[float, ...]
    fixes: tuple[Fix, ...] = ()

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
    embeddings: EmbeddingIndex | None = None,
    placeholder: int = 0,
) -> list[TokenChunk]:
    """The prompt's chunks (``split_chunks`` of its emphasis pieces, each fragment
    tokenized on its own as A1111 does), each wrapped in BOS ... EOS and padded to 77 with
    ``pad``; at least one. ``embeddings``: the names to replace by their vectors
    (``placeholder`` ids, which must not be ``eos``, and the chunk's ``fixes``). A prompt of
    up to 75 tokens with neither brackets nor BREAK nor an embedding's name gives the usual
    77 ids, all of weight 1."""
    if embeddings and placeholder == eos:
        raise ValueError("the placeholder id of an embedding must not be the end token")
    pieces = [
        [(tokenize(text) if text else [], weight) for text, weight in piece]
        for piece in parse_emphasis(prompt)
    ]
    out = []
    for ids, weights, fixes in split_chunks(pieces, comma, embeddings, placeholder=placeholder):
        padding = CHUNK_TOKENS - len(ids)
        tc = TokenChunk([bos, *ids, eos] + [pad] * padding)
        tc.weights = (1.0, *weights, 1.0) + (1.0,) * padding
        if fixes:
            tc.fixes = tuple((at + 1, emb) for at, emb in fixes)  # after BOS
        out.append(tc)
    return out
